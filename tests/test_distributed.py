"""Data parallelism: 2 CPU processes (gloo, via `accelerate launch`) reproduce a 1-process run,
with full replicas (ddp) and with sharded parameters (fsdp), and checkpoints move between them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from resd.parallel import make_parallel, resolve_strategy
from test_trainer import PREFILLS, SEED_PLAYBOOK, TESTS, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                                reason="accelerate launcher not installed")]  # fmt: skip


ROOT = TESTS.parent
# DeepSpeed's ZeRO-3 keeps parameters under 100,000 elements whole, which is all of a tiny
# model's: with this zero_optimization setting every one is partitioned and gathered
PARTITION_EVERY_PARAMETER = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    tmp_path: Path, tiny_model_dir: Path, name: str, processes: int, *,
    launch_config: str | None = None, resume: bool = False, launch_args: tuple[str, ...] = (),
    **overrides,
) -> Path:  # fmt: skip
    cmd, env = launch(tmp_path, tiny_model_dir, name, processes, launch_config=launch_config,
                      resume=resume, launch_args=launch_args, **overrides)  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / f"{name}.log").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name


def launch(
    tmp_path: Path, tiny_model_dir: Path, name: str, processes: int, *,
    launch_config: str | None = None, resume: bool = False, launch_args: tuple[str, ...] = (),
    **overrides,
) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """The command and environment of a `resd train` run on `processes` processes."""
    (tmp_path / "seed.md").write_text(SEED_PLAYBOOK)
    cfg = {
        **PREFILLS, "model": str(tiny_model_dir), "env": "toy_envs:ParityEnv", "steps": 4, "batch_size": 4,
        "inner_updates": 2, "rollouts_per_prompt": 1, "max_new_tokens": 10, "reflection_max_new_tokens": 10,
        "curation_max_new_tokens": 10, "generation_dtype": "float32", "autocast": "none", "lr": 0.01,
        "warmup_steps": 0, "progress": False, "eval_samples": 1, "teacher_update_rate": 0.3,
        "micro_batch_size": 1, "playbook_init": str(tmp_path / "seed.md"), "output_dir": str(tmp_path / name),
        "playbook_prune_every": 100, **overrides,
    }  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg))
    # One process is a plain `resd train`, as a user resumes on one machine; the launcher
    # would only add its own start-up (a few seconds per run, most of what these runs cost).
    if processes == 1:
        launcher = [sys.executable]
    else:
        launcher = [str(Path(sys.executable).with_name("accelerate")), "launch"]
        if launch_config:
            launcher += ["--config_file", str(ROOT / launch_config), *launch_args]
        else:
            launcher.append("--multi_gpu")  # torchrun-style processes; gloo when there is no GPU
        # No `--cpu`: with it, accelerate starts a single process and leaves the rest to MPI.
        # A port of its own: under pytest-xdist two launches at once would both take the
        # default 29500, and one would fail to listen (EADDRINUSE).
        launcher += ["--num_processes", str(processes), "--num_machines", "1",
                     "--main_process_port", str(free_port()),
                     "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd = [*launcher, "-m", "resd", "train", "--config", str(tmp_path / f"{name}.yaml")]
    if resume:
        cmd.append("--resume")
    env = dict(
        os.environ,
        PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
        # the launcher's own scratch (torchelastic_*) stays behind when a run is killed
        TMPDIR=str(tmp_path),
    )
    return cmd, env


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> Path:
    """The reference: a 1-process run with the global batch the multi-process runs split."""
    return run(tmp_path_factory.mktemp("one"), tiny_model_dir, "one", 1, save_every=2)


def assert_same_run(
    one: Path, two: Path, steps: list[int] | None = None, later_rel: float = 1e-3
) -> None:
    """`later_rel`: the relative tolerance of loss and gradient norm after the first
    step compared, where the two runs' float rounding may have compounded."""
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == (steps or [1, 2, 3, 4])  # written once, by rank 0
    m1 = [m for m in m1 if m["step"] in [m["step"] for m in m2]]
    for i, (a, b) in enumerate(zip(m1, m2, strict=True)):
        rel = 1e-3 if i == 0 else later_rel
        assert (a["reward"], a["distilled"], a["playbook_size"]) == (
            b["reward"],
            b["distilled"],
            b["playbook_size"],
        )
        assert b["loss"] == pytest.approx(a["loss"], rel=rel, abs=1e-6)
        # AdamW and clipping hide a constant gradient scale (a sum where a mean belongs, a
        # stray × world_size) from the loss and the samples; the gradient norm shows it.
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel, abs=1e-7)
        assert b["reflections"] == a["reflections"] and b["tags_applied"] == a["tags_applied"]
    assert json.loads((one / "playbook.json").read_text()) == json.loads(
        (two / "playbook.json").read_text()
    )
    assert json.loads((two / "playbook.json").read_text())["entries"]
    samples1, samples2 = read_jsonl(one / "samples.jsonl"), read_jsonl(two / "samples.jsonl")
    assert [s["response"] for s in samples1] == [s["response"] for s in samples2]
    # and the weights the runs end with: the student and its EMA teacher. AdamW moves every
    # element by about lr (0.01) per step whatever its gradient's size, so summation-order
    # noise can flip a near-zero gradient's sign and move that element the other way: a
    # few elements may differ by most of a step (4 of 9,600 of the embedding after the
    # chunked-head FSDP run, on an Intel AVX-512 host), the rest by a fraction of one. A
    # parameter left out of the update, or a shard left out of the sync, moves every
    # element of it, or half of them, by whole steps.
    last = "checkpoint-4"
    files = ["model.safetensors", "adapter_model.safetensors", "teachers/teacher.safetensors"]
    compared = 0
    for name in files:
        if (one / last / name).exists():
            wa, wb = load_file(one / last / name), load_file(two / last / name)
            assert wa.keys() == wb.keys(), name
            for key in wa:
                diff = (wa[key].float() - wb[key].float()).abs()
                off = (diff > 2.5e-3).float().mean().item()
                assert off < 0.01, f"{name}:{key}: {off:.1%} of it differs, by up to {diff.max()}"
            compared += 1
    assert compared == 2  # the student (full or adapter) and the teacher


def resume_elsewhere(
    tmp_path, tiny_model_dir, source: Path, name: str, processes: int, **kw
) -> Path:
    """Copy a finished run, drop its last checkpoint and resume it from step 2."""
    resumed = tmp_path / name
    shutil.copytree(source, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    return run(tmp_path, tiny_model_dir, name, processes, resume=True, save_every=2, **kw)


def test_two_processes_match_one_process(tiny_model_dir, tmp_path, one_process):
    two = run(tmp_path, tiny_model_dir, "two", 2, save_every=2)
    assert_same_run(one_process, two)
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"]) == ("ddp", 2)
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_fsdp_with_two_passes_over_each_batch_matches_one_process(tiny_model_dir, tmp_path):
    """`update_epochs: 2` first computes the rollout policy's log-probs with forwards that
    have no backward. Under FSDP those left the root (embeddings, tied head, final norm)
    gathered, and the passes' backwards then gave it no gradient: it never trained (the
    first step's gradient norm 21 % low here). Catches that, in the gradient norm and in
    the root's weights at the end."""
    one = run(tmp_path, tiny_model_dir, "one", 1, update_epochs=2, save_every=2)
    two = run(tmp_path, tiny_model_dir, "two", 2, launch_config="configs/accelerate/fsdp.yaml",
              update_epochs=2, save_every=2)  # fmt: skip
    assert_same_run(one, two)


def test_an_early_stop_decided_on_rank_0_ends_both_processes_at_one_step(tiny_model_dir, tmp_path):
    """Only rank 0 evaluates, so only it can judge `early_stopping`; the other rank must
    stop at the same step, or it waits forever in the next step's collectives. With a
    gain of more than 1 needed, the evaluation at step 2 ends a 4-step run there. Catches
    the decision kept to rank 0 (the launch hangs until its timeout)."""
    two = run(tmp_path, tiny_model_dir, "stop2", 2, eval_every=2,
              early_stopping={"patience": 1, "min_delta": 1.0})  # fmt: skip
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert summary["stopped_early"].startswith("case_mean@k has not improved on ")
    assert [row["step"] for row in read_jsonl(two / "eval.jsonl")] == [0, 2]
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2"]


def test_sigterm_to_both_processes_ends_them_at_one_step_with_one_checkpoint(
    tiny_model_dir, tmp_path
):
    """A preempted machine's SIGTERM reaches every rank (and the launcher, which passes it
    on). Each rank finishes its step, they agree on the step in one collective, save one
    checkpoint and leave, without a summary; `--resume` on one process goes on from it.
    Catches ranks that stop at different steps (one waits in the other's next collective
    until the launcher kills it, and no checkpoint is written)."""
    cmd, env = launch(tmp_path, tiny_model_dir, "term", 2, steps=400, save_every=1000)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.exists() or not metrics.read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler signals the job's processes
    _, err = proc.communicate(timeout=300)
    steps = [row["step"] for row in read_jsonl(metrics)]
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and last < 400, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "term").glob("checkpoint-*")) == [
        f"checkpoint-{last}"
    ]
    assert not (tmp_path / "term" / "summary.json").exists()
    assert err.count(f"resd: interrupted (SIGTERM during step {last}) after step {last}") == 1, err[
        -3000:
    ]
    resumed = run(tmp_path, tiny_model_dir, "term", 1, resume=True, steps=last + 1, save_every=1000)
    assert [row["step"] for row in read_jsonl(resumed / "metrics.jsonl")] == [*steps, last + 1]


def test_sequence_mean_loss_is_the_same_on_two_processes(tiny_model_dir, tmp_path):
    """The release's loss averaging (mean over the batch's sequences of per-sequence token
    means) holds across processes and micro-batch sizes: same loss and gradient norm.
    SDPO leaves its successes out of the loss, and those rows still count."""
    common = {"loss_aggregation": "seq_mean_token_mean", "algorithm": "sdpo"}
    one = run(tmp_path, tiny_model_dir, "seq1", 1, **common)
    two = run(tmp_path, tiny_model_dir, "seq2", 2, micro_batch_size=2, **common)
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert any(0 < m["distilled"] < m["rollouts"] for m in m1)
    for a, b in zip(m1, m2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3, abs=1e-7)


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_unsharded(
    tiny_model_dir, tmp_path, one_process
):
    """Launched with the shipped accelerate FSDP config (`strategy: auto` follows it) and the
    chunked loss (output head applied outside the forward): the sharded run reproduces the
    replicated full-logits one, and its checkpoint, holding full tensors and name-keyed
    optimizer state, resumes in one process to the same end."""
    sharded = run(tmp_path, tiny_model_dir, "fsdp", 2, launch_config="configs/accelerate/fsdp.yaml",
                  save_every=2, loss_chunk_size=4)  # fmt: skip
    # The chunked head's matmuls round differently from the full one, and the difference
    # grows through AdamW at lr 0.01: 0.2 % in loss and 0.3 % in gradient norm by step 4
    # on an Intel AVX-512 host (step 1 equal to the last digit). A gradient scaled by the
    # world size or left unsummed is off by half or twice.
    drift = 1e-2
    assert_same_run(one_process, sharded, later_rel=drift)
    summary = json.loads((sharded / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"]) == ("fsdp", 2)
    with safe_open(str(sharded / "checkpoint-4/teachers/teacher.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").shape == (32,)  # full tensors, not shards
    # Continue the sharded run from step 2 in one process, and the one-process run in two
    # sharded processes: FSDP's optimizer-state load runs in each. (Two to two adds nothing:
    # a checkpoint holds full tensors whoever wrote it, so 1to2 is the sharded load.)
    fsdp = {"launch_config": "configs/accelerate/fsdp.yaml", "loss_chunk_size": 4}
    resumed = resume_elsewhere(tmp_path, tiny_model_dir, sharded, "2to1", 1)
    assert_same_run(one_process, resumed, later_rel=drift)
    resumed = resume_elsewhere(tmp_path, tiny_model_dir, one_process, "1to2", 2, **fsdp)
    assert_same_run(one_process, resumed, later_rel=drift)


def test_strategy_follows_the_accelerate_config(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert resolve_strategy("auto") == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_strategy("auto") == "fsdp"
    assert resolve_strategy("ddp") == "ddp"  # an explicit choice wins
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert resolve_strategy("auto") == "deepspeed"


def test_zero_stage_comes_from_accelerate_or_the_resd_config(monkeypatch, tmp_path):
    from resd.parallel.zero import zero_options

    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", raising=False)
    assert zero_options(None) == {"stage": 2}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert zero_options(None) == {"stage": 3}
    assert zero_options(1) == {"stage": 1}  # the resd config wins
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json))
    assert zero_options(None) == {"stage": 1, "overlap_comm": True}


def test_a_single_process_ignores_the_strategy():
    assert make_parallel("fsdp").name == "single"  # nothing to shard over: plain training


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process_and_its_checkpoint_resumes_unsharded(
    tiny_model_dir, tmp_path, one_process, stage
):
    pytest.importorskip("deepspeed")
    name = f"zero{stage}"
    # the runs gather across the two processes (see PARTITION_EVERY_PARAMETER)
    partition_all = tmp_path / "deepspeed.json"
    partition_all.write_text(json.dumps(PARTITION_EVERY_PARAMETER))
    zero = {"launch_config": f"configs/accelerate/deepspeed_zero{stage}.yaml",
            "launch_args": ("--deepspeed_config_file", str(partition_all))}  # fmt: skip
    run(tmp_path, tiny_model_dir, name, 2, save_every=2, **zero)
    assert_same_run(one_process, tmp_path / name)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"]) == ("deepspeed", 2)
    assert_same_run(
        one_process, resume_elsewhere(tmp_path, tiny_model_dir, tmp_path / name, "2to1", 1)
    )
    # ZeRO's name-keyed optimizer state loaded by two processes, into an engine that has
    # not stepped yet (catches the ZeRO-3 resume that raised KeyError: 'exp_avg')
    assert_same_run(
        one_process, resume_elsewhere(tmp_path, tiny_model_dir, one_process, "1to2", 2, **zero)
    )


LORA = {"lora": {"r": 4, "alpha": 8}, "save_every": 2}


@pytest.fixture(scope="module")
def one_process_lora(tiny_model_dir, tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("one-lora"), tiny_model_dir, "one", 1, **LORA)


@pytest.mark.parametrize("launch_config", ["fsdp.yaml", "deepspeed_zero2.yaml"])
def test_lora_sharded_matches_one_process_and_resumes(
    tiny_model_dir, tmp_path, one_process_lora, launch_config
):
    """A LoRA policy with its EMA adapter teacher: the adapter (and, under FSDP, the frozen
    base) sharded over 2 processes reproduces the 1-process run, and resumes in one."""
    if launch_config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    two = run(
        tmp_path,
        tiny_model_dir,
        "two",
        2,
        launch_config=f"configs/accelerate/{launch_config}",
        **LORA,
    )
    assert_same_run(one_process_lora, two)
    assert (two / "checkpoint-4/adapter_config.json").exists()
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    run(tmp_path, tiny_model_dir, "resumed", 1, resume=True, **LORA)
    assert_same_run(one_process_lora, resumed)
