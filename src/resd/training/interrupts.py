"""Ctrl-C and SIGTERM while a run trains: finish the step, checkpoint, leave.

A run killed between checkpoints loses every step since the last one. A preempted machine
or a queue's time limit sends SIGTERM first (and SIGKILL some seconds later); a person
presses Ctrl-C. Under `checkpoint_on_signals` the first of either asks the trainer to
end after its current step with a checkpoint and no summary (`Trainer.interrupt`), so the
run reads as unfinished and `--resume` continues it; a second one stops at once.

The terminal sends Ctrl-C to every process of its group, and `resd compare` passes it on
to the run it is waiting for as well: two signals a few milliseconds apart are one press.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resd.training.trainer import Trainer

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Signals closer together than this are one press (the terminal's and a parent's copy).
SAME_PRESS_S = 1.0


@contextlib.contextmanager
def checkpoint_on_signals(trainer: Trainer) -> Iterator[None]:
    """While the block runs, the first SIGINT or SIGTERM interrupts `trainer` after its
    step; the next (a second later or more) raises KeyboardInterrupt at once. A signal the
    process was started ignoring (`nohup`, a background job's SIGINT) stays ignored.
    Outside the main thread, where Python cannot install handlers, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def handle(signum: int, _frame: object) -> None:
        now = time.monotonic()
        if not first:
            first.append(now)
            name = signal.Signals(signum).name
            trainer.interrupt(f"{name} during step {trainer.step + 1}", signum=signum)
            if trainer.parallel.is_main:  # one line, not one per rank
                print(f"\nresd: {name}: finishing step {trainer.step + 1}, then saving a checkpoint "
                      "(press Ctrl-C again to stop at once, losing that step)", file=sys.stderr,
                      flush=True)  # fmt: skip
        elif now - first[0] > SAME_PRESS_S:
            raise KeyboardInterrupt

    previous = {}
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
