"""A small arithmetic task that the bundled 135M model solves some of the time.

It exists for the demo and the tests: cheap to score, with a success rate that starts
low but not at zero, and two checks per answer (the format and the value) so partial
credit and feedback are meaningful.
"""

from __future__ import annotations

import random
import re

from resd.envs.base import Environment, Item, Score, whole_number

_ANSWER_LINE = re.compile(r"answer\s*[:=]([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithmeticEnv(Environment):
    name = "arithmetic"
    description = "One-line integer arithmetic; the answer goes on a line 'Answer: <number>'"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 256,
        n_test: int = 64,
        ops: str = "+-*",
        max_operand: int = 20,
        reveal_answer: bool = True,
        mul_max_operand: int = 12,
        quote_answer: bool = False,
    ) -> None:
        """`mul_max_operand` bounds both factors of a product (12: times tables; 99:
        two-digit products, which a 0.5B model often gets wrong).
        `quote_answer=True` repeats the wrong number in the feedback ("The final answer
        1770384 is wrong: ..."); the default says what is right without it, because a small
        teacher that reads the wrong number in its context copies it (docs/results.md, the
        sanity check: SDPO learned 0 of 8 items quoted, 8 of 8 plain)."""
        bad = set(ops) - set(_OPS)
        if not ops or bad:
            raise ValueError(f"env_args.ops: use characters from '+-*', got {ops!r}")
        if max_operand < 1:
            raise ValueError("env_args.max_operand: must be >= 1")
        if mul_max_operand < 1:
            raise ValueError("env_args.mul_max_operand: must be >= 1")
        n_train = whole_number(n_train, "env_args.n_train") or 0
        n_test = whole_number(n_test, "env_args.n_test") or 0
        self.reveal_answer = reveal_answer
        self.quote_answer = quote_answer
        rng = random.Random(seed)
        seen: set[tuple[int, str, int]] = set()
        items: list[Item] = []
        # Distinct questions there are: a product's factors are cut to mul_max_operand, so
        # "*" has fewer than "+" and "-" (counting them all alike drew forever).
        pool = sum(
            ((min(mul_max_operand, max_operand) if op == "*" else max_operand) + 1) ** 2
            for op in set(ops)
        )
        while len(items) < n_train + n_test and len(seen) < pool:
            a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
            if op == "*":
                a, b = a % (mul_max_operand + 1), b % (mul_max_operand + 1)
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            value = _OPS[op](a, b)
            question = f"What is {a} {op} {b}?"
            items.append(
                Item(
                    id=f"arithmetic/{a}{op}{b}",
                    messages=[
                        {
                            "role": "user",
                            "content": f"{question} End your reply with a line of the form 'Answer: <number>'.",
                        }
                    ],
                    meta={"a": a, "b": b, "op": op, "value": value, "question": question},
                    reference=f"{a} {op} {b} = {value}.\nAnswer: {value}",
                    answer=str(value),
                )
            )
        if len(items) < n_train + n_test:  # the test split would take what there is
            raise ValueError(f"env_args: ops {ops!r} with operands up to {max_operand} (factors "
                             f"up to {mul_max_operand}) make "
                             f"{len(items)} distinct questions, fewer than n_train + n_test = "
                             f"{n_train + n_test}; raise max_operand or ask for fewer")  # fmt: skip
        self._test, self._train = items[:n_test], items[n_test:]

    def train_items(self) -> list[Item]:
        return self._train

    def test_items(self) -> list[Item]:
        return self._test

    def score(self, item: Item, response: str) -> Score:
        value, question = item.meta["value"], item.meta["question"]
        # The last number of the last "Answer:" line: "Answer: 12 + 13 = 25" means 25.
        lines = [
            _NUMBER.findall(_THOUSANDS.sub("", line)) for line in _ANSWER_LINE.findall(response)
        ]
        marked = [numbers for numbers in lines if numbers]
        if marked:
            given, format_ok = int(marked[-1][-1]), True
        else:
            numbers = _NUMBER.findall(_THOUSANDS.sub("", response))
            given, format_ok = (int(numbers[-1]) if numbers else None), False
        value_ok = given == value
        notes = []
        if not format_ok:
            notes.append(
                "The reply has no line 'Answer: <number>'; the final answer must be given that way."
            )
        if given is None:
            notes.append("No number was found in the reply.")
        elif not value_ok:
            direction = "too high" if given > value else "too low"
            fact = f"{question[8:-1]} = {value}" if self.reveal_answer else f"it is {direction}"
            if self.quote_answer:
                notes.append(f"The final answer {given} is wrong: {fact}.")
            else:
                notes.append(f"Incorrect. The correct value is {fact}." if self.reveal_answer
                             else f"Incorrect: the final answer is {direction}.")  # fmt: skip
        reward = float(format_ok and value_ok)
        return Score(
            reward=reward, score=0.5 * format_ok + 0.5 * value_ok, feedback=" ".join(notes)
        )
