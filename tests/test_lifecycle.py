"""Behaviour no other test covered: the CLI's entry points, damaged checkpoints, checkpoint
pruning, a checker that raises, malformed lesson replies inside a step, and the schedule
switches (warm-up, success weighting, the reflection cap)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from resd.cli import main
from resd.envs.base import SUCCESS_REWARD, Score
from resd.parallel.base import NonFiniteGradient
from resd.rundir import PHASES
from resd.training.callbacks import Callback
from resd.training.playbook import Playbook
from resd.training.rollout import PhaseTimer, row_seed
from resd.training.trainer import Trainer
from test_trainer import PREFILLS, config, read_jsonl
from toy_envs import ConstantEnv, ParityEnv

# ---- the command line -------------------------------------------------------------------------


def test_cli_train_runs_and_names_bad_input(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps({**PREFILLS, "model": str(tiny_model_dir), "env": "toy_envs:ParityEnv"})
    )
    base = ["train", "--config", str(cfg), f"output_dir={tmp_path / 'run'}", "steps=1", "batch_size=2",
            "max_new_tokens=4", "reflection_max_new_tokens=8", "curation_max_new_tokens=8",
            "eval_samples=1", "progress=false"]  # fmt: skip
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "(1 step)" in out and "task_mean@k" in out
    assert main(base) == 2  # the folder holds a run now: refused, nothing overwritten
    assert "already holds a run" in capsys.readouterr().err
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config: file not found" in capsys.readouterr().err
    assert main([*base, "lerning_rate=1"]) == 2
    assert "lerning_rate: unknown config key" in capsys.readouterr().err
    assert main([*base, "lr=fast"]) == 2
    assert "lr: expected a number" in capsys.readouterr().err


def test_cli_envs_env_check_and_compare_errors(capsys):
    assert main(["envs"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("arithmetic", "manufactoria", "house_rules", "qa"))
    assert main(["env-check", "arithmetic", "n_train=6", "n_test=2", "--samples", "1"]) == 0
    assert "8 reference answers, 8 score 1.0" in capsys.readouterr().out
    assert main(["env-check", "arithmetic", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "env_args" in err and "bogus" in err
    assert main(["compare", "--algorithms", "resd,nonsense", "--out", "x"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["env-check", "toy_envs:UnreachableEnv"]) == 2  # one line, not a traceback
    assert capsys.readouterr().err == (
        "resd: error: env: toy_envs:UnreachableEnv could not be built: RuntimeError: the data "
        "server did not answer\n"
    )
    assert main(["env-check", "arithmetic", "n_train=0", "n_test=0"]) == 1  # nothing to check
    assert "no items" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["env-check", "arithmetic", "--samples", "-1"])  # was: every item but the last
    assert "--samples: expected a whole number >= 0" in capsys.readouterr().err


def test_the_console_script_imports_an_environment_from_the_working_directory(tmp_path):
    """The README's `resd train ... env=mytasks:Capitals`, run beside mytasks.py: the
    `resd` console script's sys.path lacks the working directory (`python -m` has it)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "mytasks_cwd.py").write_text(
        "from resd.envs.arithmetic import ArithmeticEnv\n\n"
        "class Sums(ArithmeticEnv):\n    name = 'sums'\n"
    )
    script = Path(sys.executable).with_name("resd")
    done = subprocess.run([str(script), "env-check", "mytasks_cwd:Sums", "n_train=2", "n_test=1",
                           "--samples", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3 reference answers, 3 score 1.0" in done.stdout


@pytest.mark.slow
def test_ctrl_c_ends_a_run_with_a_line_not_a_traceback(tiny_model_dir, tmp_path):
    import signal
    import time

    from test_trainer import _run_cli

    out = tmp_path / "run"
    # A suite started as a background job of a non-interactive shell (`make test &`)
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: the child
    # gets the default disposition back, as a terminal's Ctrl-C would find it.
    proc = _run_cli(out, tiny_model_dir, "steps=40", sigint_default=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    # 130, or ended by the signal itself (-2) when a library re-raises it at exit: a
    # shell shows both as 130
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert "interrupted" in err and "--resume" in err


# ---- checkpoints --------------------------------------------------------------------------------


def test_keep_checkpoints_prunes_the_oldest(tiny_model_dir, tmp_path):
    Trainer(config(tiny_model_dir, tmp_path / "k", "save_every=1", "keep_checkpoints=2")).train()
    assert sorted(p.name for p in (tmp_path / "k").glob("checkpoint-*")) == [
        "checkpoint-3",
        "checkpoint-4",
    ]


def test_a_checkpoint_is_a_model_folder_any_server_reads_and_resumes_strictly(
    tiny_model_dir, tmp_path
):
    """Its top level holds the student alone (vLLM reads every *.safetensors there, and the
    teacher's tensors have the student's names), readable as the run folder is; older
    checkpoints with the teacher beside the student still resume; a resume may not change
    the teacher, bring in a KL reference, or swap an environment given in Python."""
    import os

    out = tmp_path / "c"
    cfg = config(tiny_model_dir, out, "save_every=2", "steps=2", "inner_updates=1")
    trainer = Trainer(cfg)
    summary = trainer.train()
    ckpt = out / "checkpoint-2"
    assert [p.name for p in ckpt.glob("*.safetensors")] == ["model.safetensors"]
    assert (ckpt / "teachers" / "teacher.safetensors").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    written = (out / "summary.json").stat().st_mtime_ns
    assert trainer.train() == summary and (out / "summary.json").stat().st_mtime_ns == written

    more = config(tiny_model_dir, out, "save_every=2", "steps=3", "inner_updates=1")
    for changed, message in [("teacher=live", r"^teacher: 'live' now, 'ema'"),
                             ("kl_coef=0.1", r"^kl_coef: 0\.1 now, 0\.0 in checkpoint-2")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Trainer(config(tiny_model_dir, out, "save_every=2", "steps=3", "inner_updates=1", changed),
                    resume=True)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"^env: toy_envs:ConstantEnv now, toy_envs:ParityEnv in checkpoint-2"
    ):
        Trainer(more, resume=True, env=ConstantEnv())

    Trainer(more, resume=True, env=ParityEnv())  # the same class given in Python: fine
    saved = load_file(ckpt / "teachers" / "teacher.safetensors")
    (ckpt / "teachers" / "teacher.safetensors").rename(ckpt / "teacher.safetensors")  # old layout
    (ckpt / "teachers").rmdir()
    resumed = Trainer(more, resume=True)
    teacher = resumed.teacher.copy.state_dict()
    assert all(torch.equal(teacher[k], t) for k, t in saved.items())


def test_resume_skips_a_damaged_checkpoint_and_a_leftover_temporary(
    tiny_model_dir, tmp_path, caplog
):
    out = tmp_path / "d"
    Trainer(config(tiny_model_dir, out, "save_every=1", "keep_checkpoints=5", "steps=3")).train()
    (out / "checkpoint-3" / "optimizer.pt").unlink()  # damaged newest
    shutil.copytree(out / "checkpoint-2", out / ".tmp-checkpoint-killed")  # a killed save
    resumed = Trainer(
        config(tiny_model_dir, out, "save_every=1", "keep_checkpoints=5", "steps=3"), resume=True
    )
    assert resumed.step == 2  # the newest complete one
    assert "checkpoint-3 is incomplete (no optimizer.pt)" in caplog.text
    summary = resumed.train()
    assert summary["steps"] == 3
    assert not list(out.glob(".tmp-checkpoint-*"))  # the killed save's leftovers went
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


# torch.load warns about the damaged rng_torch.pt's "pickle protocol" before it fails
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_checkpoint_damaged_after_it_was_written_is_named_and_nothing_is_changed(
    tiny_model_dir, tmp_path, capsys
):
    """Found by `fuzz_combinations.py corrupt`: a checkpoint's file emptied, cut short or
    overwritten failed the resume with the reader's own traceback (EOFError, safetensors'
    "header too small", "pop from empty list", a list where state.json holds an object).
    Each is now one line naming the file and the way on, and the run's files stay as
    they were; with the damaged checkpoint moved away, the one before it resumes."""
    out = tmp_path / "run"
    words = ["save_every=1", "steps=2"]
    Trainer(config(tiny_model_dir, out, *words)).train()
    capsys.readouterr()  # its loading bars, on a worker where no `resd` command turned them off
    intact = _files(out)
    damages = {"optimizer.pt": b"", "rng_torch.pt": b"\x80garbage", "state.json": b"[1, 2]",
               "teachers/teacher.safetensors": intact["checkpoint-2/teachers/teacher.safetensors"][:99],
               # `fuzz_combinations.py serve`: said as "model_init_kwargs: 'list' object is not a
               # mapping", as transformers' guess, and as "model: cannot read the folder"
               "generation_config.json": b'["a list"]', "config.json": intact["checkpoint-2/config.json"][:40],
               "model.safetensors": intact["checkpoint-2/model.safetensors"][:99]}  # fmt: skip
    argv = ["train", "--resume", "--config", str(out / "config.yaml"), "steps=3"]
    for name, damaged in damages.items():
        (out / "checkpoint-2" / name).write_bytes(damaged)
        before = _files(out)
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(f"resd: error: resume: cannot read {out / 'checkpoint-2' / name} (")
        assert (
            "checkpoint checkpoint-2 is damaged: move it out of" in err and "Traceback" not in err
        )
        assert _files(out) == before, name
        (out / "checkpoint-2" / name).write_bytes(intact[f"checkpoint-2/{name}"])
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    (out / "checkpoint-2").rename(tmp_path / "set-aside")
    assert Trainer(config(tiny_model_dir, out, "save_every=1", "steps=3"), resume=True).step == 1


def test_a_damaged_file_a_resume_does_without_does_not_stop_it(tiny_model_dir, tmp_path):
    """A resume reads the run's tokenizer from `model`, not from the checkpoint, and
    transformers reads a generation config it cannot parse as absent: a check that read
    every JSON file of the checkpoint refused resumes that had worked. (One holding JSON
    of another shape does fail transformers, and is refused by name: the test above.)"""
    out = tmp_path / "run"
    Trainer(config(tiny_model_dir, out, "save_every=1", "steps=2")).train()
    (out / "checkpoint-2" / "tokenizer.json").write_bytes(b"")
    (out / "checkpoint-2" / "generation_config.json").write_bytes(b'{"max_len')
    assert Trainer(config(tiny_model_dir, out, "save_every=1", "steps=3"), resume=True).step == 2


def test_a_checkpoint_without_its_weights_is_skipped_as_incomplete(
    tiny_model_dir, tmp_path, caplog
):
    """A checkpoint whose model.safetensors is gone counted as complete, and the resume
    failed in transformers ("no file named model.safetensors"); it is skipped with a
    warning, as one without its optimizer is, and the one before it resumes."""
    out = tmp_path / "run"
    Trainer(config(tiny_model_dir, out, "save_every=1", "steps=2")).train()
    (out / "checkpoint-2" / "model.safetensors").unlink()
    resumed = Trainer(config(tiny_model_dir, out, "save_every=1", "steps=3"), resume=True)
    assert resumed.step == 1
    assert "checkpoint-2 is incomplete (no model weights); skipped" in caplog.text


def test_a_fresh_run_refuses_a_folder_whose_files_it_would_overwrite(tiny_model_dir, tmp_path):
    """`output_dir=.` in a project, or the model's own folder: the run would replace the
    README, the config, the weights. A config.yaml the trainer wrote there itself (an
    attempt killed before it logged anything, as `resd compare` retries) is no obstacle."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my notes")
    (project / "config.yaml").write_text("my: config\n")
    with pytest.raises(FileExistsError, match=r"holds README\.md, config\.yaml, which a run"):
        Trainer(config(tiny_model_dir, project))
    assert (project / "README.md").read_text() == "my notes"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    with pytest.raises(FileExistsError, match=r"config\.json.*model\.safetensors"):
        Trainer(config(tiny_model_dir, model), resume=True)  # nothing to resume: same refusal
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileExistsError, match="is a file"):
        Trainer(config(tiny_model_dir, tmp_path / "afile"))
    # a file above the folder, or a folder it may not write in: said before the model
    # loads (a NotADirectoryError traceback at the first write, after the load)
    with pytest.raises(FileExistsError, match=rf"^output_dir: {tmp_path / 'afile'} is a file, "
                       rf"not a folder, so {tmp_path / 'afile' / 'run'} cannot be made$"):  # fmt: skip
        Trainer(dataclasses.replace(config(tiny_model_dir, project),
                                    output_dir=str(tmp_path / "afile" / "run")))  # fmt: skip
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(FileExistsError, match=rf"^output_dir: cannot write in {locked}$"):
            Trainer(dataclasses.replace(config(tiny_model_dir, project),
                                        output_dir=str(locked / "run")))  # fmt: skip
    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = config(tiny_model_dir, killed, "steps=1")
    (killed / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    Trainer(cfg)  # its own config.yaml: accepted


def test_a_run_killed_during_its_first_step_is_a_run(tiny_model_dir, tmp_path):
    """Killed after the first evaluation and before the first metrics row: eval.jsonl says
    a run is here. A second start is refused; --resume starts over with clean logs, so
    the step-0 evaluation is not logged twice."""
    out = tmp_path / "k"
    cfg = config(tiny_model_dir, out, "steps=1")
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (out / "eval.jsonl").write_text(json.dumps({"step": 0, "task_mean@k": 0.5}) + "\n")
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(cfg)
    Trainer(cfg, resume=True).train()
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [0, 1]


class PoisonedGradients(Callback):
    """After step 1, every gradient of one weight turns nan: a diverged step, made
    deterministic (the forward passes, and so the rollouts, stay finite)."""

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == 1:
            param = next(p for p in trainer.model.parameters() if p.requires_grad)
            param.register_hook(lambda grad: grad * float("nan"))


def test_a_nonfinite_gradient_stops_the_run_with_its_checkpoint_intact(tiny_model_dir, tmp_path):
    out = tmp_path / "nan"
    cfg = config(tiny_model_dir, out, "save_every=1", "keep_checkpoints=1", "inner_updates=1")
    trainer = Trainer(cfg, callbacks=[PoisonedGradients()])
    with pytest.raises(NonFiniteGradient, match=r"^grad_norm: nan .*the update was not applied"):
        trainer.train()
    weights = trainer.model.state_dict().values()
    assert all(torch.isfinite(v).all() for v in weights)  # refused before AdamW stepped
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]  # not rotated away
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]
    # Resuming: the stream's settings are the checkpoint's; the others may change.
    with pytest.raises(ValueError, match=r"^batch_size: 2 now, 4 in checkpoint-1; a resumed run"):
        Trainer(config(tiny_model_dir, out, "save_every=1", "inner_updates=1", "batch_size=2"),
                resume=True)  # fmt: skip
    resumed = Trainer(config(tiny_model_dir, out, "save_every=1", "inner_updates=1", "lr=1e-3"),
                      resume=True)  # fmt: skip
    assert resumed.step == 1 and resumed.train()["steps"] == 4


class CheckpointWatcher(Callback):
    """Overrides `on_save` alone: the hooks it leaves to `Callback` must do nothing."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, bool]] = []

    def on_save(self, trainer, path):
        self.saved.append((path.name, (path / "config.json").exists()))


def test_a_callback_may_override_one_hook_and_sees_its_files_written(tiny_model_dir, tmp_path):
    """The hook API (`resd.training.callbacks`): a subclass overriding only `on_save` sees a
    whole run through (the base class's `on_step_end` and `on_evaluate` do nothing), once
    per checkpoint, after the checkpoint's files are written. Catches a base hook that is
    not a no-op."""
    watcher = CheckpointWatcher()
    cfg = config(tiny_model_dir, tmp_path / "run", "steps=2", "save_every=1")
    assert Trainer(cfg, callbacks=[watcher]).train()["steps"] == 2
    assert watcher.saved == [("checkpoint-1", True), ("checkpoint-2", True)]


def test_row_seeds_tell_apart_every_run_step_phase_and_row():
    """Every (run seed, step, phase, global row) samples from its own seed, the same on every
    call (a resumed or multi-process run draws what a one-process run draws), and one that
    seeds a torch generator (at most 64 bits). Catches a key that drops or runs together its
    parts: seed 1 at step 23 and seed 12 at step 3 must not share their rollouts."""
    keys = [(seed, step, phase, row) for seed in (0, 1, 12) for step in (1, 2, 3, 23)
            for phase in ("rollout", "reflect", "tag", "curate") for row in (0, 1, 3, 23)]  # fmt: skip
    seeds = [row_seed(*key) for key in keys]
    assert len(set(seeds)) == len(keys)
    assert seeds == [row_seed(*key) for key in keys]
    assert all(0 <= seed < 2**63 for seed in seeds)
    torch.Generator().manual_seed(max(seeds))


class PartialCreditEnv(ParityEnv):
    """A user scorer's partial credit: an even-length reply earns exactly `SUCCESS_REWARD`
    ("good enough"), an odd one a reward below it but above zero."""

    def score(self, item, response):
        if len(response) % 2 == 0:
            return Score(SUCCESS_REWARD, SUCCESS_REWARD, "")
        return Score(0.25, 0.25, "The reply has an odd number of characters.")


def test_a_reward_at_the_success_threshold_is_a_success_and_one_below_is_not(
    tiny_model_dir, tmp_path
):
    """A reward counts as a success iff it is at least `SUCCESS_REWARD`, the same everywhere
    (`resd.envs.base`): SDPO distils exactly the failures, and the step's success rate counts
    the successes. Catches `Outcome.success` comparing with > (the success rate misses the
    rewards of exactly 0.5) and a rollout's success read as reward > 0 (SDPO skips 0.25)."""
    cfg = config(tiny_model_dir, tmp_path / "run", "algorithm=sdpo", "rollouts_per_prompt=2",
                 "log_samples=8", "max_new_tokens=9")  # fmt: skip
    trainer = Trainer(cfg, env=PartialCreditEnv())
    metrics = trainer.train_step(trainer.train_items[:4])
    rewards = [s["reward"] for s in read_jsonl(tmp_path / "run" / "samples.jsonl")]
    wins = rewards.count(SUCCESS_REWARD)
    assert len(rewards) == 8 and 0 < wins < 8 and set(rewards) == {0.25, SUCCESS_REWARD}
    assert (metrics["success_rate"], metrics["distilled"]) == (wins / 8, 8 - wins)


def test_each_phase_of_a_step_takes_part_of_the_steps_time(tiny_model_dir, tmp_path):
    """The phase table's `time_<phase>` (metrics.jsonl, the report) are seconds spent inside
    the step: each between 0 and the whole step's `time_step`, and the phases that ran
    took some. Catches a phase timer that adds the clock's reading instead of the
    elapsed time, or drops it."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "run"))
    metrics = trainer.train_step(trainer.train_items[:4])
    times = {p: metrics[f"time_{p}"] for p in PHASES}
    assert all(0 <= t <= metrics["time_step"] for t in times.values()), times
    assert times["rollout"] > 0 and times["teacher"] > 0 and times["update"] > 0


def test_a_phase_entered_several_times_in_a_step_adds_up():
    """A phase runs once per micro-batch (teacher, update): its time is the sum of all its
    runs, not the last one's. `sleep` waits at least as long as asked, so the bound holds
    on any machine. Catches a timer that keeps only the last run."""
    timer = PhaseTimer()
    for _ in range(3):
        with timer("teacher"):
            time.sleep(0.02)
    assert timer.seconds["teacher"] >= 0.06 and timer.seconds["update"] == 0.0


def test_a_missing_relative_path_says_where_it_was_looked_for(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A config's paths are read from the working directory, not from the config file's
    folder: `resd eval --config configs/paper/ifeval_forgetting.yaml` run from another
    folder said only "no such file: ../shared/data/ifeval_100.parquet". Each setting that
    reads a file now names the folder it looked in; an absolute path needs no such note."""
    import re

    from resd.envs.dataset import DatasetEnv

    monkeypatch.chdir(tmp_path)
    where = re.escape(f" (relative to the working directory {Path.cwd()})")
    cases = {
        "chat_template=templates/chat.jinja": r"^chat_template: no such file 'templates/chat\.jinja'",
        "playbook_init=seeds/p.md": r"^playbook_init: no such file 'seeds/p\.md'",
        "teacher_template=teacher.txt": r"^teacher_template: no such file 'teacher\.txt'",
    }
    for override, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message + where):
            Trainer(config(tiny_model_dir, tmp_path / f"run{len(override)}", override))
    with pytest.raises(ValueError, match=r"^env_args\.path: no such file: data/x\.jsonl" + where):
        DatasetEnv(path="data/x.jsonl", prompt_column="q", answer_column="a")
    with pytest.raises(FileNotFoundError) as absolute:
        Trainer(config(tiny_model_dir, tmp_path / "abs", f"playbook_init={tmp_path / 'no.md'}"))
    assert "relative to" not in str(absolute.value)


def test_inputs_that_name_no_usable_file_are_refused_by_name(tiny_model_dir, tmp_path, monkeypatch):
    cases = {
        "model=/no/such/model": r"^model: no such folder '/no/such/model'",
        "chat_template=templates/chat.jinja": r"^chat_template: no such file 'templates/chat\.jinja'",
        "model_init_kwargs={revisio: main}": r"^model_init_kwargs: .*'revisio' \(did you mean 'revision'\?\)",
        "model_init_kwargs={attn_implementation: flash_attention_2}": r"^model_init_kwargs: FlashAttention2",
        f"playbook_init={tmp_path / 'missing.md'}": r"^playbook_init: no such file",
    }
    for override, message in cases.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            Trainer(config(tiny_model_dir, tmp_path / f"run{len(override)}", override))
    # `runs/x` beside an existing runs/ is a folder, not a Hub id to look up on the network
    from resd.models import resolve_model_path

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^model: no such folder 'runs/typo'"):
        resolve_model_path("runs/typo")
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # a Hub id, untouched
    # a local folder by its absolute path: what a LoRA adapter records as its base
    assert resolve_model_path("runs") == str(tmp_path.resolve() / "runs")
    for step in (8, 16):  # no final model yet
        (tmp_path / "runs" / "killed" / f"checkpoint-{step}").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"without a final model .*checkpoints: checkpoint-8, checkpoint-16$"
    ):
        resolve_model_path("runs/killed")


def test_what_fails_only_later_is_checked_before_the_model_loads(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A tracker's missing package (was: a traceback after the model, teacher and optimizer
    were built) and a chat template that cannot render (was: a TypeError at the first
    evaluation)."""
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ValueError, match=r"^report_to: wandb needs the wandb package"):
        Trainer(config(tiny_model_dir, tmp_path / "w", "report_to=wandb"))
    with pytest.raises(ValueError, match=r"^chat_template: the chat template cannot render"):
        Trainer(config(tiny_model_dir, tmp_path / "t", "chat_template={{ messages[0]['content'] }"))
    with pytest.raises(ValueError, match=r"^chat_template_kwargs: the chat template cannot render"):
        Trainer(config(tiny_model_dir, tmp_path / "k", "chat_template_kwargs={tools: 3}"))
    assert not any((tmp_path / name).exists() for name in ("w", "t", "k"))


def test_a_failed_push_keeps_the_finished_run(tiny_model_dir, tmp_path, monkeypatch):
    """The Hub cannot be reached here: the push is replaced by one that fails as an
    offline push does. The run's summary was written before it, and the error says so."""
    import resd.training.trainer as trainer_module

    def offline(folder, repo_id):
        raise ConnectionError("huggingface.co is unreachable")

    monkeypatch.setattr(trainer_module, "push_to_hub", offline)
    out = tmp_path / "p"
    with pytest.raises(ValueError, match=r"^push_to_hub: the run is complete in .*ConnectionError"):
        Trainer(config(tiny_model_dir, out, "steps=1", "push_to_hub=true")).train()
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()


# ---- a checker that raises ----------------------------------------------------------------------


class RaisingEnv(ParityEnv):
    """Scores the odd-numbered items, raises on the even ones."""

    def score(self, item, response):
        if int(item.id.rsplit("/", 1)[1]) % 2 == 0:
            raise RuntimeError("checker crashed")
        return super().score(item, response)


def test_an_environment_that_raises_is_a_failure_with_feedback(tiny_model_dir, tmp_path):
    trainer = Trainer(
        config(tiny_model_dir, tmp_path / "r", "steps=1", "log_samples=4"), env=RaisingEnv()
    )
    trainer.train()
    samples = read_jsonl(tmp_path / "r" / "samples.jsonl")
    crashed = [s for s in samples if int(s["item"].rsplit("/", 1)[1]) % 2 == 0]
    assert crashed and len(crashed) < len(samples)
    for s in crashed:
        assert (s["reward"], s["score"]) == (0.0, 0.0)
        assert s["feedback"] == "The checker failed on this response: RuntimeError: checker crashed"


# ---- malformed lesson replies inside a step -----------------------------------------------------


def test_malformed_curator_replies_are_counted_and_the_playbook_stays_valid(
    tiny_model_dir, tmp_path
):
    broken = '{"operations": [{"type": "ADD", "section": "Others", "content": "no closing'
    _, m = _step(tiny_model_dir, tmp_path / "m", f"curation_prefill={json.dumps('}}]] not json ' + broken)}",
                 "reflection_prefill=not json either", "env=toy_envs:ConstantEnv")  # fmt: skip
    assert m["reflections"] == 4 and m["reflection_parse_failures"] == 4
    assert m["curations"] == 0  # nothing parsed, nothing to curate from
    for garbage in ('{"operations": "DELETE everything"}', '[1, 2, {"type": "MERGE", "ids": "x"}]'):
        _, m = _step(tiny_model_dir, tmp_path / f"g{len(garbage)}", f"curation_prefill={json.dumps(garbage)}",
                     "env=toy_envs:ConstantEnv")  # fmt: skip
        assert m["curations"] == 4 and m["ops_applied"] == 0
        assert m["curation_parse_failures"] + m["ops_skipped"] >= 4
    pb = Playbook.load(tmp_path / f"g{len(garbage)}" / "playbook.json")
    assert [e.id for e in pb.entries.values()] == ["strat-00001"]  # the seed, untouched


def _step(tiny_model_dir, out, *extra):
    trainer = Trainer(config(tiny_model_dir, out, *extra))
    m = trainer.train_step(trainer.train_items[: trainer.cfg.batch_size])
    trainer.playbook.save(out)
    return trainer, m


# ---- schedule switches --------------------------------------------------------------------------


def test_warmup_then_constant_learning_rate(tiny_model_dir, tmp_path):
    Trainer(config(tiny_model_dir, tmp_path / "w", "warmup_steps=3", "lr=0.01")).train()
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "w" / "metrics.jsonl")]
    assert lrs == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.01])


def test_max_reflections_per_step_caps_the_reflector(tiny_model_dir, tmp_path):
    _, m = _step(
        tiny_model_dir, tmp_path / "cap", "max_reflections_per_step=2", "env=toy_envs:ConstantEnv"
    )
    assert m["reflections"] == 2 and m["success_rate"] == 0.0


def test_success_weighting_reweights_rare_successes(tiny_model_dir, tmp_path):
    common = (
        "algorithm=sdpo_ss",
        "generation_dtype=float32",
        "autocast=none",
        "batch_size=8",
        "log_samples=8",
    )
    _, plain = _step(tiny_model_dir, tmp_path / "p", *common)
    _, weighted = _step(tiny_model_dir, tmp_path / "w", *common, "success_weighting=true")
    assert plain["reward"] == weighted["reward"] and 0 < plain["success_rate"] < 1
    assert weighted["loss"] != pytest.approx(plain["loss"], rel=1e-6)
    # by hand: s clamped to [1/8, 7/8]; successes weigh (1 − s), failures s, then mean 1
    s = min(max(plain["success_rate"], 1 / 8), 7 / 8)
    rows = read_jsonl(tmp_path / "p" / "samples.jsonl")
    raw = [(1 - s) if r["reward"] else s for r in rows]
    weights = [w * len(raw) / sum(raw) for w in raw]
    means = [sum(r["token_losses"]) for r in rows]
    tokens = sum(len(r["token_losses"]) for r in rows)
    expected = sum(w * m for w, m in zip(weights, means, strict=True)) / tokens
    assert weighted["loss"] == pytest.approx(expected, rel=2e-2)  # logged losses are rounded


def test_settings_that_do_nothing_useful_are_warned_about(tiny_model_dir, tmp_path, caplog):
    from resd.analysis.continual import build_plan

    Trainer(config(tiny_model_dir, tmp_path / "w", "warmup_steps=10", "steps=4"))
    assert "warmup_steps: 10 for a run of 4 steps" in caplog.text
    Trainer(config(tiny_model_dir, tmp_path / "f", "warmup_steps=0.9", "steps=4"))
    assert "warmup_steps: 4 for a run of 4 steps" in caplog.text  # 3.6 steps, rounded up
    Trainer(config(tiny_model_dir, tmp_path / "one", "warmup_steps=2", "steps=1"))
    assert "warmup_steps: 2 for a run of 1 step: " in caplog.text  # not "1 steps"
    build_plan({"stages": [{"steps": 1}]})
    assert "stages[0]: no env, here or in the base config" in caplog.text


def test_a_strategy_without_a_launcher_runs_alone_and_says_so(caplog, monkeypatch):
    from resd.parallel import make_parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert make_parallel("auto").name == "single" and "launcher" not in caplog.text
    assert make_parallel("fsdp").name == "single"
    assert "strategy: fsdp asked for, but no launcher" in caplog.text


def test_a_run_compare_or_continual_another_process_is_writing_is_refused(
    tiny_model_dir, tmp_path, capsys
):
    """`resd train --resume` started while the run still trained elsewhere (a grid resumed
    in a second terminal) appended to the same logs and overwrote its checkpoints; a second
    `resd compare` or `resd continual` on one folder did the same to every run in it. Each
    is now refused in one line before the model loads, and the folder is left as it was;
    once the other process has ended, the same command resumes the run."""
    from test_rundir import hold_elsewhere

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({**PREFILLS, "model": str(tiny_model_dir), "env": "toy_envs:ParityEnv",
                               "batch_size": 2, "max_new_tokens": 4, "reflection_max_new_tokens": 8,
                               "curation_max_new_tokens": 8, "eval_samples": 1, "progress": False}))  # fmt: skip
    run = tmp_path / "run"
    base = ["train", "--config", str(cfg), f"output_dir={run}", "steps=1", "save_every=1"]
    assert main(base) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = hold_elsewhere(run)
    try:
        assert main([*base, "--resume", "steps=2"]) == 2
        said = capsys.readouterr().err.strip()
        assert said == (f"resd: error: output_dir: another process is writing to {run} (a run, "
                        "`resd compare`, `resd continual` or `resd serve --learn` still going); "
                        "wait for it to end, or choose another output_dir")  # fmt: skip
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        out = tmp_path / "cmp"
        out.mkdir()
        held_cmp = hold_elsewhere(out)
        try:
            compare = ["compare", "--algorithms", "sdpo", "--out", str(out), "--no-plots",
                       f"model={tiny_model_dir}"]  # fmt: skip
            assert main(compare) == 2
            assert "resd: error: --out: another process is writing to" in capsys.readouterr().err
            assert list(out.iterdir()) == []
            stages = tmp_path / "continual.yaml"
            stages.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "output_dir": str(out),
                                              "stages": [{"env": "toy_envs:ParityEnv"}]}))  # fmt: skip
            assert main(["continual", "--config", str(stages)]) == 2
            said = capsys.readouterr().err
            assert "resd: error: output_dir: another process is writing to" in said
            assert list(out.iterdir()) == []
        finally:
            held_cmp.kill()
            held_cmp.wait()
    finally:
        other.kill()
        other.wait()
    assert main([*base, "--resume", "steps=2"]) == 0  # the other process has ended
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2]
