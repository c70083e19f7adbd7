"""Environments for trainer tests: random tiny models succeed on them about half the time."""

from __future__ import annotations

from resd.envs.base import Environment, Item, Score
from resd.envs.code import CodeEnv


class ParityEnv(Environment):
    """Success iff the response has an even number of characters; says so in feedback."""

    name = "parity"
    description = "test-only: even-length replies succeed"

    def __init__(self, n_train: int = 16, n_test: int = 4) -> None:
        def make(i: int) -> Item:
            return Item(
                f"parity/{i}", [{"role": "user", "content": f"Task {i}: reply."}], reference="ab"
            )

        self._train = [make(i) for i in range(n_train)]
        self._test = [make(1000 + i) for i in range(n_test)]

    def train_items(self) -> list[Item]:
        return self._train

    def test_items(self) -> list[Item]:
        return self._test

    def score(self, item: Item, response: str) -> Score:
        even = len(response) % 2 == 0
        fb = (
            ""
            if even
            else f"The reply has {len(response)} characters, an odd number; it needs an even number."
        )
        return Score(float(even), 1.0 if even else 0.5, fb)


class ConstantEnv(ParityEnv):
    """Every reply fails the same way: all rewards equal, so GRPO has nothing to learn."""

    def score(self, item: Item, response: str) -> Score:
        return Score(0.0, 0.0, "Always wrong.")


HOSTILE_PROGRAMS = [
    "def f():\n    while True:\n        pass\nwhile True:\n    pass\n",
    "import os\nwhile True:\n    os.fork()\n",
    "x = bytearray(10 * 1024**3)\n",
    "print('x' * (100 * 1024**2))\n",
    "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
    "open('/tmp/resd-hostile-was-here', 'w').write('x')\n",
]


class HostileCodeEnv(CodeEnv):
    """A code environment whose 'answers' are attacks, whatever the model wrote."""

    calls = 0

    def score(self, item: Item, response: str) -> Score:
        program = HOSTILE_PROGRAMS[HostileCodeEnv.calls % len(HOSTILE_PROGRAMS)]
        HostileCodeEnv.calls += 1
        return super().score(item, f"```python\n{program}```")


class UnreachableEnv(ParityEnv):
    """An environment whose constructor fails, as one fetching its data from a server might."""

    def __init__(self) -> None:
        raise RuntimeError("the data server did not answer")
