"""Ctrl-C and SIGTERM while a run trains: the step finishes, a checkpoint is saved, the run
stays unfinished and resumes (`Trainer.interrupt`, `checkpoint_on_signals`), and `resd
compare` gives the run it waits for the time to do so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from resd import Interrupted, checkpoint_on_signals  # as a script imports them
from resd.training import interrupts
from resd.training.callbacks import Callback
from resd.training.trainer import Trainer
from test_trainer import _run_cli, config, read_jsonl


class InterruptAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.step:
            trainer.interrupt("SIGTERM during step 2")


def test_an_interrupted_run_checkpoints_after_its_step_stays_unfinished_and_resumes(
    tiny_model_dir, tmp_path
):
    """`interrupt` during step 2 of a 6-step run that checkpoints every 10: the run ends
    after step 2 with checkpoint-2 and no summary.json (no final evaluation either), so
    `resd compare` resumes it instead of taking it as finished; `--resume` runs steps 3-6.
    Catches the interruption ignored, the run left without a checkpoint (two steps lost),
    and a summary written as by `stop` (the run would read as done)."""
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, "steps=6", "save_every=10")
    with pytest.raises(Interrupted) as ended:
        Trainer(cfg, callbacks=[InterruptAt(2)]).train()
    assert (ended.value.step, ended.value.checkpoint) == (2, out / "checkpoint-2")
    assert ended.value.reason == "SIGTERM during step 2"
    assert (out / "checkpoint-2").is_dir() and not (out / "summary.json").exists()
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [0]
    summary = Trainer(cfg, resume=True).train()
    assert summary["steps"] == 6 and summary["stopped_early"] is None
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_the_first_signal_interrupts_a_second_stops_at_once_and_ignored_stays_ignored(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The handler the block installs: the first SIGTERM asks the trainer to end after its
    step and says so; another within a second (the terminal's Ctrl-C and `resd compare`'s
    copy of it) is the same press; a later one raises KeyboardInterrupt at once. A signal
    the process was started ignoring (a background job's SIGINT) stays ignored, and the
    handlers before the block are back after it."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "run"))
    before_term = signal.getsignal(signal.SIGTERM)
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with checkpoint_on_signals(trainer):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            handler = signal.getsignal(signal.SIGTERM)
            handler(signal.SIGTERM, None)
            assert trainer.interrupt_reason == "SIGTERM during step 1"
            assert trainer.interrupt_signal == signal.SIGTERM
            handler(signal.SIGTERM, None)  # the same press
            monkeypatch.setattr(interrupts, "SAME_PRESS_S", -1.0)  # a press a while later
            with pytest.raises(KeyboardInterrupt):
                handler(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is before_term
    finally:
        signal.signal(signal.SIGINT, previous_int)


def test_resd_train_given_sigterm_saves_its_step_and_exits_143(tiny_model_dir, tmp_path):
    """A preempted machine sends SIGTERM: the process died at once, losing every step
    since its last checkpoint (here: all of them, it checkpoints every 1000). Now it ends
    after its step with a checkpoint, one line that says so, exit status 143, and no
    summary; `--resume` goes on from the checkpoint."""
    out = tmp_path / "run"
    proc = _run_cli(out, tiny_model_dir, "steps=200", "save_every=1000")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    steps = [row["step"] for row in read_jsonl(out / "metrics.jsonl")]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 200
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{last}"]
    assert not (out / "summary.json").exists()
    assert f"resd: interrupted (SIGTERM during step {last}) after step {last}: " in err
    assert f"checkpoint-{last} saved; `resd train ... --resume` continues the run" in err


CHILD = """
import pathlib, signal, sys, time
marker, got = pathlib.Path(sys.argv[1]), []
signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
marker.write_text("ready")
while not got:
    time.sleep(0.02)
time.sleep(0.5)  # the step it finishes before its checkpoint
marker.write_text(f"checkpointed after {len(got)} signal(s)")
sys.exit(130)
"""


def test_compare_waits_for_the_run_to_checkpoint_on_ctrl_c(tmp_path):
    """`resd compare` ran each run with `subprocess.run`, which kills the child a quarter
    of a second after Ctrl-C: the run's graceful checkpoint never happened. Now it passes
    the Ctrl-C on, waits for the run to end, and then stops itself. A child that takes
    half a second after the signal stands for the run's step and checkpoint."""
    from resd.analysis.compare import _wait_for_run

    marker = tmp_path / "marker"
    (tmp_path / "child.py").write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(marker)])
    deadline = time.time() + 60
    while not marker.exists():
        assert time.time() < deadline
        time.sleep(0.02)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            _wait_for_run(proc, "sdpo-seed0")
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert proc.returncode == 130
    assert marker.read_text() == "checkpointed after 1 signal(s)"


def test_the_learner_thread_leaves_signals_alone(tiny_model_dir, tmp_path):
    """`resd serve --learn` trains in a thread, where Python cannot install handlers: the
    block does nothing there (it raised ValueError: signal only works in main thread)."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "run"))
    before = signal.getsignal(signal.SIGTERM)
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with checkpoint_on_signals(trainer):
                assert signal.getsignal(signal.SIGTERM) is before
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert errors == []


def test_resd_continual_given_sigterm_checkpoints_its_stage_and_the_same_command_goes_on(
    tiny_model_dir, tmp_path
):
    """`resd continual` trains its stages in its own process: SIGTERM killed it, losing the
    stage's steps since its last checkpoint (here all: it checkpoints every 1000). Now the
    stage checkpoints after its step, the command says the same command continues, exits
    143, and run again it resumes the stage from that checkpoint and finishes."""
    import json

    from test_trainer import PREFILLS, TESTS

    out = tmp_path / "cl"
    parity = {"env": "toy_envs:ParityEnv", "env_args": {"n_train": 24, "n_test": 1}}
    config = {**PREFILLS, "model": str(tiny_model_dir), "output_dir": str(out), "batch_size": 2,
              "inner_updates": 1, "max_new_tokens": 8, "reflection_max_new_tokens": 8,
              "curation_max_new_tokens": 8, "warmup_steps": 0, "progress": False,
              "save_every": 1000, "eval_items": 1, "eval_samples": 1,
              "stages": [{"name": "long", "steps": 12, **parity}]}  # fmt: skip
    path = tmp_path / "continual.yaml"
    path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "resd.cli", "continual", "--config", str(path)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    metrics = out / "stage-1-long" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() or not metrics.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    last = read_jsonl(metrics)[-1]["step"]
    assert sorted(p.name for p in metrics.parent.glob("checkpoint-*")) == [f"checkpoint-{last}"]
    assert "the same `resd continual` command continues from there" in err
    assert last < 12
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[continual] stage 1 (long): resuming" in done.stdout
    assert [row["step"] for row in read_jsonl(metrics)] == list(range(1, 13))
