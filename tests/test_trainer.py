"""End to end: a tiny local model through every phase, algorithm switches, and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resd.analysis.evaluation import safe_score
from resd.config import apply_overrides, build_config
from resd.envs.base import Environment, Item, Score
from resd.generation.hf import chat_prompt_ids
from resd.rundir import COUNTERS, SKIP_REASONS
from resd.training.callbacks import Callback
from resd.training.rollout import GivenRollout, row_seed
from resd.training.trainer import (
    CONFIRMING_ADVANTAGE,
    PHASES,
    Trainer,
    memory_metrics,
    teacher_confirms_failures,
)
from toy_envs import ParityEnv

TESTS = Path(__file__).resolve().parent
SEED_PLAYBOOK = (
    "## Strategies & Insights\n[strat-00001] helpful=2 harmful=0 :: Keep replies short.\n"
)
# A random tiny model cannot write JSON. The prefill feature (text that opens every
# reflector/curator reply) lets it "answer" with a complete object, so the real parsing,
# tagging and curation paths run; whatever the model appends is ignored by the parser.
PREFILLS = {
    "structured_output": "off",  # the prefill scripts the whole reply; no grammar
    "reflection_prefill": '{"error_identification": "odd length", "key_insight": "count the characters",'
    ' "bullet_tags": [{"id": "strat-00001", "tag": "helpful"}, {"id": "ghost-00009", "tag": "harmful"}]}',
    "curation_prefill": '{"operations": [{"type": "ADD", "section": "Common Mistakes to Avoid",'
    ' "content": "Count the characters of a reply before sending it."}]}',
}


def config(tiny_model_dir: Path, out: Path, *extra: str, prefills: dict[str, str] = PREFILLS,
           seed_playbook: str = SEED_PLAYBOOK):  # fmt: skip
    (out.parent / "seed-playbook.md").write_text(seed_playbook)
    return build_config(apply_overrides(
        prefills,
        [
            f"model={tiny_model_dir}", f"output_dir={out}", "env=toy_envs:ParityEnv", "steps=4",
            "batch_size=4", "inner_updates=2", "max_new_tokens=12", "reflection_max_new_tokens=12",
            "curation_max_new_tokens=12", "eval_samples=2", "lr=1e-2", "warmup_steps=0", "progress=false",
            f"playbook_init={out.parent / 'seed-playbook.md'}", "teacher_update_rate=0.5",
            *extra,
        ],
    ))  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resd_runs_every_phase(tiny_model_dir, tmp_path):
    cfg = config(
        tiny_model_dir, tmp_path / "run", "save_every=2", "eval_every=2", "playbook_prune_every=100"
    )
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.train()
    run = tmp_path / "run"

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [(m["batch"], m["inner"]) for m in metrics] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for m in metrics:
        assert set(f"time_{p}" for p in PHASES) <= set(m)
        assert m["time_rollout"] > 0 and m["time_update"] > 0 and m["time_teacher"] > 0
        failures = round((1 - m["success_rate"]) * 4)
        assert m["reflections"] == failures  # every failed rollout is reflected on
        if failures:
            assert m["time_reflect"] > 0 and m["time_curate"] > 0
            assert m["reflection_parse_failures"] == 0 and m["tags_applied"] >= failures
        assert m["distilled"] >= failures and m["loss"] > 0
        # every entry that came or went is named: the sizes add up
        assert m["playbook_size"] == (
            m["playbook_size_before"] + m["playbook_added"] - m["playbook_removed"]
        )
    # The process's peak in GiB (not KiB, not bytes): never falling, and at most what the
    # process has peaked at by now (the run's evaluation and saving came after its last
    # step, so what the process holds now may be more than that step's peak).
    peaks = [m["host_memory_peak_gib"] for m in metrics]
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    assert peaks[0] > 0.05 and peaks == sorted(peaks) and peaks[-1] <= peak_now + 0.001
    assert "device_memory_peak_gib" not in metrics[0]  # a CPU run
    samples = read_jsonl(run / "samples.jsonl")
    assert {
        "prompt",
        "response",
        "feedback",
        "reflection",
        "teacher_prompt",
        "reward",
        "token_losses",
    } <= set(samples[0])
    failed = [s for s in samples if s["reward"] == 0]
    assert failed and all("<feedback>" in s["teacher_prompt"] for s in failed)
    assert all(
        "<playbook>" in s["teacher_prompt"] and "Keep replies short." in s["teacher_prompt"]
        for s in samples
    )
    assert all(len(s["token_losses"]) == len(s["tokens"]) for s in samples if s["distilled"])

    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    # every column the run wrote has its line in docs/metrics.md
    documented = set(re.findall(r"`([\w@]+)`", (TESTS.parent / "docs" / "metrics.md").read_text()))
    history = read_jsonl(run / "playbook_history.jsonl")
    for rows in (metrics, samples, evals, history):
        assert set(rows[0]) <= documented, sorted(set(rows[0]) - documented)
    assert {"task_mean@k", "task_best@k", "case_mean@k", "case_best@k"} <= set(evals[0])
    assert summary["eval_before"]["step"] == 0 and summary["eval_after"]["step"] == 4
    assert (run / "playbook.md").read_text().startswith("## Strategies")
    playbook_md = (run / "playbook.md").read_text()
    assert (
        "[err-00002] helpful=0 harmful=0 :: Count the characters of a reply before sending it."
        in playbook_md
    )
    assert sum(m["playbook_added"] for m in metrics) == 1  # later identical ADDs are de-duplicated
    helpful = int(playbook_md.split("[strat-00001] helpful=")[1].split()[0])
    assert helpful == 2 + sum(round((1 - m["success_rate"]) * 4) for m in metrics)
    assert json.loads((run / "playbook.json").read_text())["entries"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # each checkpoint has its own card; an evaluation only where one was of its weights
    # (checkpoint-4 is written before the run's final evaluation)
    cards = {n: (run / f"checkpoint-{n}" / "README.md").read_text() for n in (2, 4)}
    assert "for 2 optimizer steps" in cards[2]
    assert (
        f"| case_mean@k | {evals[0]['case_mean@k']:.3f} | {evals[1]['case_mean@k']:.3f} |"
        in cards[2]
    )
    assert "for 4 optimizer steps" in cards[4] and "No evaluation was recorded." in cards[4]
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert changed
    # the EMA teacher moved toward the student but is not the student
    t, s = trainer.teacher.copy.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(t[k], s[k]) for k in s)
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg)


def test_a_lora_checkpoint_carries_the_runs_card_not_pefts_blank_template(tiny_model_dir, tmp_path):
    """peft writes a template card ("[More Information Needed]") beside every adapter it
    saves. Catches a LoRA checkpoint left with it, where the final model has ours."""
    run = tmp_path / "lora"
    cfg = config(tiny_model_dir, run, "lora={r: 2}", "steps=1", "eval_samples=1")
    Trainer(cfg, env=ParityEnv()).train()  # given in Python: the card names it, not cfg.env
    card = (run / "checkpoint-1" / "README.md").read_text()
    assert card.startswith('---\nlibrary_name: "peft"') and "More Information Needed" not in card
    assert "for 1 optimizer step " in card and "LoRA" in card
    assert "on the environment `parity`" in card


def one_step(tiny_model_dir, tmp_path, algorithm, *extra):
    trainer = Trainer(
        config(tiny_model_dir, tmp_path / algorithm, f"algorithm={algorithm}", *extra)
    )
    items = trainer.train_items[:4]
    metrics = trainer.train_step(items)
    return trainer, metrics, read_jsonl(tmp_path / algorithm / "samples.jsonl")


def test_sdpo_skips_self_successes_and_sdpo_ss_does_not(tiny_model_dir, tmp_path):
    extra = ("rollouts_per_prompt=2", "log_samples=8", "max_new_tokens=9")
    _, m_sdpo, s_sdpo = one_step(tiny_model_dir, tmp_path, "sdpo", *extra)
    _, m_ss, s_ss = one_step(tiny_model_dir, tmp_path, "sdpo_ss", *extra)
    # Same seed, same step: identical rollouts for both algorithms.
    assert [s["response"] for s in s_sdpo] == [s["response"] for s in s_ss]
    successes = sum(s["reward"] == 1 for s in s_sdpo)
    assert 0 < successes < 8, "the toy task should give a mix of outcomes"
    assert m_sdpo["distilled"] == 8 - successes
    assert m_ss["distilled"] == 8
    assert all(not s["distilled"] for s in s_sdpo if s["reward"] == 1)
    for (
        s
    ) in s_sdpo:  # SDPO's teacher sees feedback, never a playbook, reflection or its own attempt
        assert (
            "<playbook>" not in s["teacher_prompt"]
            and "<previous_trial>" not in s["teacher_prompt"]
        )
    assert m_sdpo["reflections"] == 0 and m_sdpo["playbook_size"] == 1
    # With N = 2, a failed rollout whose sibling succeeded sees the sibling as a solution.
    by_item: dict[str, list[dict]] = {}
    for s in s_sdpo:
        by_item.setdefault(s["item"], []).append(s)
    mixed = [g for g in by_item.values() if {x["reward"] for x in g} == {0.0, 1.0}]
    for group in mixed:
        fail = next(x for x in group if x["reward"] == 0)
        win = next(x for x in group if x["reward"] == 1)
        assert (
            "<successful_trial>" in fail["teacher_prompt"]
            and win["response"].strip() in fail["teacher_prompt"]
        )


def test_resd_no_playbook_never_renders_a_playbook(tiny_model_dir, tmp_path):
    _, metrics, samples = one_step(tiny_model_dir, tmp_path, "resd_no_playbook")
    assert all("<playbook>" not in s["teacher_prompt"] for s in samples)
    assert metrics["reflections"] == round((1 - metrics["success_rate"]) * 4)


def test_solution_buffer_reaches_later_inner_steps(tiny_model_dir, tmp_path):
    trainer = Trainer(config(tiny_model_dir, tmp_path / "buf", "log_samples=8", "batch_size=8"))
    items = trainer.train_items[:8]
    for _ in range(2):
        trainer.train_step(items)
    samples = read_jsonl(tmp_path / "buf" / "samples.jsonl")
    solved = {s["item"] for s in samples if s["step"] == 1 and s["reward"] == 1}
    assert solved, "the toy task should give at least one success in a batch of 8"
    second = [s for s in samples if s["step"] == 2 and s["item"] in solved]
    assert all("<successful_trial>" in s["teacher_prompt"] for s in second)
    assert len(trainer.buffer) >= len(solved)


def _run_cli(
    out: Path, tiny_model_dir: Path, *extra: str, sigint_default: bool = False
) -> subprocess.Popen:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "seed-playbook.md").write_text(SEED_PLAYBOOK)
    (out.parent / "prefills.yaml").write_text(json.dumps(PREFILLS))  # JSON is YAML
    args = [
        sys.executable, "-m", "resd.cli", "train", "--config", str(out.parent / "prefills.yaml"),
        f"model={tiny_model_dir}", f"output_dir={out}",
        "env=toy_envs:ParityEnv", "steps=4", "batch_size=4", "inner_updates=2", "max_new_tokens=48",
        "reflection_max_new_tokens=32", "curation_max_new_tokens=32", "eval_samples=1", "lr=1e-2",
        "warmup_steps=1", "save_every=1", "keep_checkpoints=5", "progress=false", "teacher_update_rate=0.3",
        f"playbook_init={out.parent / 'seed-playbook.md'}", *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    restore = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint_default else None
    return subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=restore,
    )


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    full = _run_cli(tmp_path / "a" / "full", tiny_model_dir)
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err

    out = tmp_path / "b" / "killed"
    proc = _run_cli(out, tiny_model_dir)
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-4").exists()

    resumed = _run_cli(out, tiny_model_dir, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err

    a, b = tmp_path / "a" / "full", out
    assert json.loads((a / "playbook.json").read_text()) == json.loads(
        (b / "playbook.json").read_text()
    )
    state_a = json.loads((a / "checkpoint-4" / "state.json").read_text())
    state_b = json.loads((b / "checkpoint-4" / "state.json").read_text())
    for key in ("cursor", "playbook", "buffer", "step"):
        assert state_a[key] == state_b[key], key
    assert [m["step"] for m in read_jsonl(b / "metrics.jsonl")] == [1, 2, 3, 4]

    # Exact: every logged number but the timings and the process's memory (a fresh
    # process peaks elsewhere), every sample, every evaluation, every weight of the
    # student and of the teacher, bit for bit.
    def untimed(rows):
        return [{k: v for k, v in r.items()
                 if not (k.startswith("time_") or k.endswith("memory_peak_gib"))} for r in rows]  # fmt: skip

    assert untimed(read_jsonl(a / "metrics.jsonl")) == untimed(read_jsonl(b / "metrics.jsonl"))
    assert read_jsonl(a / "samples.jsonl") == read_jsonl(b / "samples.jsonl")
    assert read_jsonl(a / "eval.jsonl") == read_jsonl(b / "eval.jsonl")
    for name in ("model.safetensors", "teachers/teacher.safetensors"):
        wa = load_file(a / "checkpoint-4" / name)
        wb = load_file(b / "checkpoint-4" / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.slow
def test_resume_before_the_first_checkpoint_starts_over_without_duplicating_logs(
    tiny_model_dir, tmp_path
):
    """A run killed before its first checkpoint: `--resume` has nothing to resume from, so it
    starts again from step 0 and says so; the logs of the lost steps must not stay behind
    (they used to, and every step then appeared twice in metrics, samples and eval)."""
    out = tmp_path / "r" / "early"
    out.mkdir(parents=True)
    for name, rows in (("metrics.jsonl", [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 9.0}]),
                       ("samples.jsonl", [{"step": 1, "response": "stale"}]),
                       ("eval.jsonl", [{"step": 0, "task_mean@k": 9.0}])):  # fmt: skip
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = _run_cli(out, tiny_model_dir, "steps=2", "save_every=0", "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "no checkpoint" in err and "from step 0" in err
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert all(m["loss"] != 9.0 for m in read_jsonl(out / "metrics.jsonl"))
    assert "stale" not in (out / "samples.jsonl").read_text()
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2]


@pytest.mark.parametrize(
    ("env", "env_args"),
    [
        ("manufactoria", "env_args={n_train: 4, n_test: 2}"),
        ("ifeval", "env_args={n_train: 4, n_test: 2}"),
        ("code", "env_args={timeout_s: 2}"),
        ("arithmetic", "env_args={n_train: 4, n_test: 2}"),
    ],
)
def test_trainer_runs_on_every_builtin_environment(tiny_model_dir, tmp_path, env, env_args):
    """Each built-in environment, through a step: every logged reward, score and feedback is
    what the environment itself says of the logged response (the wiring, not just a run)."""
    cfg = config(tiny_model_dir, tmp_path / env, f"env={env}", env_args, "steps=1", "eval_items=2",
                 "eval_samples=1", "inner_updates=1", "log_samples=4")  # fmt: skip
    trainer = Trainer(cfg)
    summary = trainer.train()
    assert summary["steps"] == 1 and summary["eval_after"]["items"] == 2
    items = {it.id: it for it in trainer.train_items}
    samples = read_jsonl(tmp_path / env / "samples.jsonl")
    assert len(samples) == 4
    for sample in samples:
        again = trainer.env.score(items[sample["item"]], sample["response"])
        assert (sample["reward"], sample["score"], sample["feedback"]) == (
            again.reward,
            again.score,
            again.feedback,
        )
        assert sample["feedback"]  # a random model's reply always earns feedback
    metrics = read_jsonl(tmp_path / env / "metrics.jsonl")[0]
    assert metrics["score"] == pytest.approx(sum(s["score"] for s in samples) / 4)


def test_trainer_runs_on_qa(tiny_model_dir, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"Q{i}?", "answer": f"A{i}"}) + "\n" for i in range(8))
    )
    cfg = config(tiny_model_dir, tmp_path / "qa", "env=qa", f"env_args.path={data}", "steps=1",
                 "inner_updates=1", "eval_samples=1")  # fmt: skip
    assert Trainer(cfg).train()["steps"] == 1


def test_report_to_tensorboard_mirrors_train_and_eval_metrics(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tiny_model_dir, tmp_path / "tb", "steps=2", "inner_updates=1", "eval_samples=1",
                 "report_to=[tensorboard]")  # fmt: skip
    Trainer(cfg).train()
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/reward", "eval/case_mean@k"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_trainer_survives_hostile_code(tiny_model_dir, tmp_path):
    """Infinite loops, fork bombs, 10 GB allocations, 100 MB of output, killing the parent,
    network access and writes outside the sandbox: each is scored as a failure with
    feedback, and training goes on."""
    import os

    from toy_envs import HOSTILE_PROGRAMS

    cfg = config(tiny_model_dir, tmp_path / "hostile", "env=toy_envs:HostileCodeEnv",
                 "env_args={timeout_s: 2, memory_mb: 256}", f"batch_size={len(HOSTILE_PROGRAMS)}", "log_samples=7",
                 "steps=1", "inner_updates=1", "eval_items=1", "eval_samples=1")  # fmt: skip
    summary = Trainer(cfg).train()
    assert summary["steps"] == 1
    samples = read_jsonl(tmp_path / "hostile" / "samples.jsonl")
    assert len(samples) == len(HOSTILE_PROGRAMS)
    assert all(s["reward"] == 0.0 and s["score"] == 0.0 for s in samples)
    feedback = [s["feedback"] for s in samples]
    # the attacks are reported for what they did, not as one generic failure
    assert len(set(feedback)) >= 4
    assert any("time" in f.lower() for f in feedback)  # the infinite loop hit the time limit
    assert not os.path.exists("/tmp/resd-hostile-was-here")


def test_report_from_a_tiny_model_run(tiny_model_dir, tmp_path):
    """`resd report` on a real run: an HTML file whose embedded images all decode."""
    import base64
    import io
    import re

    from matplotlib.image import imread

    from resd.analysis.report import build_report

    cfg = config(tiny_model_dir, tmp_path / "rep", "steps=2", "inner_updates=1", "eval_samples=1",
                 "playbook_prune_every=100")  # fmt: skip
    Trainer(cfg).train()
    html = build_report(tmp_path / "rep").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 3
    for data in images:
        assert imread(io.BytesIO(base64.b64decode(data)), format="png").size > 0
    assert "Count the characters of a reply before sending it." in html  # the final playbook
    assert 'title="loss ' in html  # the token-level loss view
    assert "<script" not in html


def test_given_rollouts_train_exactly_like_sampled_ones(tiny_model_dir, tmp_path):
    """The off-policy entry is the on-policy step with its sampling moved outside: given
    the very replies the step would have sampled, the step ends in the same place."""
    sampled = Trainer(config(tiny_model_dir, tmp_path / "a", "rollout_is_cap=2.0"))
    given_to = Trainer(config(tiny_model_dir, tmp_path / "b", "rollout_is_cap=2.0"))
    items = sampled.train_items[: sampled.cfg.batch_size]
    on_policy = sampled.train_step(items)

    cfg = given_to.cfg
    given_to._seed(cfg.seed * 1_000_003 + 1)  # what train_step does first at step 1
    prompts = [
        chat_prompt_ids(given_to.tokenizer, it.messages, cfg.max_prompt_tokens) for it in items
    ]
    gens = given_to.sampler.rollouts(
        prompts, [row_seed(cfg.seed, 1, "rollout", g) for g in range(len(items))]
    )
    given = [GivenRollout(it, p, gen, safe_score(given_to.env, it, gen.text))
             for it, p, gen in zip(items, prompts, gens, strict=True)]  # fmt: skip
    off_policy = given_to.train_step([], given)

    for key in (
        "loss",
        "reward",
        "score",
        "distilled",
        "reflections",
        "playbook_size",
        "grad_norm",
    ):
        assert off_policy[key] == pytest.approx(on_policy[key], rel=1e-6, abs=1e-9), key
    for (name, a), b in zip(
        sampled.model.state_dict().items(), given_to.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # fmt: skip
    assert sampled.playbook.render() == given_to.playbook.render()


def test_single_call_lessons_come_from_the_reflection_not_the_curator(tiny_model_dir, tmp_path):
    one_call = '{"error_identification": "odd length", "key_insight": "count", "bullet_tags": [],' \
        ' "operations": [{"type": "ADD", "section": "Others", "content": "A lesson written in the reflection reply."}]}'  # fmt: skip
    cfg = config(tiny_model_dir, tmp_path / "run", "lesson_calls=one", f"reflection_prefill={one_call!r}",
                 "steps=2", "playbook_prune_every=100")  # fmt: skip
    trainer = Trainer(cfg)
    metrics = [trainer.train_step(trainer.train_items[:4]) for _ in range(2)]
    lessons = [e.content for e in trainer.playbook.entries.values()]
    assert sum(m["reflections"] for m in metrics) > 0
    assert "A lesson written in the reflection reply." in lessons
    # the curator's prefilled lesson would appear had the curator been called
    assert not any("Count the characters" in text for text in lessons)
    assert all(m["curations"] == m["reflections"] for m in metrics)


def test_conversation_layout_reflects_on_the_rollouts_own_cached_tokens(tiny_model_dir, tmp_path):
    """`reflection_layout: conversation`: reflections begin with the rollout's tokens, whose
    keys and values the rollout kept; the weights' update empties that cache."""
    counts = {}
    for layout in ("prompt", "conversation"):
        trainer = Trainer(config(tiny_model_dir, tmp_path / layout, f"reflection_layout={layout}",
                                 "playbook_prune_every=100"))  # fmt: skip
        items = trainer.train_items[:8]
        prompt_tokens = min(len(chat_prompt_ids(trainer.tokenizer, i.messages)) for i in items)
        steps = [trainer.train_step(items[i : i + 4]) for i in (0, 4, 0)]
        reflections = sum(m["reflections"] for m in steps)
        assert reflections > 0 and sum(m["reflection_parse_failures"] for m in steps) == 0
        counts[layout] = sum(m["reflection_cached_tokens"] for m in steps)
        if layout == "conversation":
            # at least each rollout's whole prompt came from the cache
            assert counts[layout] >= reflections * prompt_tokens
            assert len(trainer.sampler.prefix_cache) == 0  # dropped after the reflections
        else:
            assert trainer.sampler.prefix_cache is None
    assert counts["prompt"] == 0 and counts["conversation"] > 0


def test_a_teacher_that_confirms_failed_rollouts_is_reported_once(tiny_model_dir, tmp_path, caplog):
    failing = {"success_rate": 0.0, "distilled": 8, "teacher_advantage": 0.58}
    assert teacher_confirms_failures(failing)
    assert not teacher_confirms_failures({**failing, "teacher_advantage": -0.79})  # disagrees
    assert not teacher_confirms_failures({**failing, "teacher_advantage": 0.004})  # has not moved
    assert not teacher_confirms_failures({**failing, "success_rate": 0.25})  # successes agree
    assert not teacher_confirms_failures({**failing, "distilled": 0})  # nothing distilled
    trainer, metrics, _ = one_step(tiny_model_dir, tmp_path, "sdpo")
    trainer.log_step({**metrics, "teacher_advantage": -0.5, "success_rate": 0.0})
    assert "teacher_advantage" not in caplog.text
    trainer.log_step({**metrics, **failing, "step": 2})
    trainer.log_step({**metrics, **failing, "step": 3})
    assert caplog.text.count("teacher_advantage is +0.58") == 1 and "step 2:" in caplog.text


def test_epochs_repeat_the_training_items_each_pass_in_its_own_order(tiny_model_dir, tmp_path):
    import random

    one = Trainer(config(tiny_model_dir, tmp_path / "one", "steps=null"))
    three = Trainer(config(tiny_model_dir, tmp_path / "three", "steps=null", "num_train_epochs=3"))
    items = list(one.env.train_items())
    expected = list(items)
    random.Random(one.cfg.seed).shuffle(expected)
    assert [it.id for it in one.train_items] == [it.id for it in expected]  # one pass: as before
    n = len(items)
    passes = [three.train_items[i * n : (i + 1) * n] for i in range(3)]
    assert len(three.train_items) == 3 * n and passes[0] == one.train_items
    assert all(sorted(it.id for it in p) == sorted(it.id for it in items) for p in passes)
    assert len({tuple(it.id for it in p) for p in passes}) > 1  # each pass shuffled anew
    assert three.total_steps == -(-3 * n // 4) * 2  # batch_size 4, inner_updates 2
    with pytest.raises(Exception, match="epochs: must be >= 1"):
        config(tiny_model_dir, tmp_path / "zero", "epochs=0")


class CoinFlipEnv(ParityEnv):
    """Scores with Python's global generator, as an environment that samples its own test
    cases or asks a judge at a temperature does."""

    def score(self, item: Item, response: str) -> Score:
        draw = random.random()
        return Score(float(draw < 0.5), draw, "" if draw < 0.5 else "Unlucky.")


def test_a_step_draws_its_randomness_from_the_seed_and_the_step_alone(tiny_model_dir, tmp_path):
    """Steps are seeded from (seed, step), so a resumed run replays what the uninterrupted run
    did: whatever used the global generators before step 1 (another trainer, a callback) leaves
    its scores as they were. Catches a step that does not reseed before sampling and scoring."""
    first = Trainer(config(tiny_model_dir, tmp_path / "a"), env=CoinFlipEnv())
    assert first.env_name == "parity"  # what the summary and model card call it: its name
    items = first.train_items[:4]
    before = first.train_step(items)
    second = Trainer(config(tiny_model_dir, tmp_path / "b"), env=CoinFlipEnv())
    random.seed(12345)  # what ran in between drew numbers
    torch.manual_seed(12345)
    again = second.train_step(items)
    assert (again["score"], again["reward"]) == (before["score"], before["reward"])


def scripted(trainer: Trainer, *rewards: float) -> list[GivenRollout]:
    """The first batch's replies (sampled once by the trainer's own model), scored `rewards`
    in turn (the last one repeated): steps whose outcomes the test decides, through the
    off-policy entry."""
    cfg, items = trainer.cfg, trainer.train_items[: trainer.cfg.batch_size]
    prompts = [
        chat_prompt_ids(trainer.tokenizer, it.messages, cfg.max_prompt_tokens) for it in items
    ]
    gens = trainer.sampler.rollouts(
        prompts, [row_seed(cfg.seed, 1, "rollout", g) for g in range(len(items))]
    )
    given = []
    for g, (it, p, gen) in enumerate(zip(items, prompts, gens, strict=True)):
        reward = rewards[min(g, len(rewards) - 1)]
        feedback = "" if reward == 1 else "Wrong: the reply is too long."
        given.append(GivenRollout(it, p, gen, Score(float(reward == 1), reward, feedback)))
    return given


def test_a_steps_metrics_describe_its_rollouts(tiny_model_dir, tmp_path):
    """Each metrics row's figures are those of the step's own rollouts: means over the batch,
    not sums or products, and the step's place in the stream. Catches a wrong average, a
    missing or misnamed column, and batch/inner numbering that only holds for two inner
    updates."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "m", "inner_updates=3"))
    given = scripted(trainer, 1.0, 0.5, 0.0)  # rewards 1, 0, 0, 0; scores 1, 0.5, 0, 0
    rows = [trainer.train_step([], given) for _ in range(4)]
    placed = [(1, 0, 0), (2, 0, 1), (3, 0, 2), (4, 1, 0)]  # three inner updates a batch
    assert [(m["step"], m["batch"], m["inner"]) for m in rows] == placed
    tokens = [len(r.gen.token_ids) for r in given]
    first = rows[0]
    assert first["rollouts"] == 4 and first["lr"] == trainer.cfg.lr
    assert (first["reward"], first["score"], first["success_rate"]) == (0.25, 0.375, 0.25)
    assert first["response_tokens"] == pytest.approx(sum(tokens) / 4)
    assert first["truncated"] == sum(not r.gen.finished for r in given) / 4
    assert first["truncated"] > 0  # 12 new tokens: some replies are cut
    assert first["playbook_size_before"] == 1 and first["playbook_size"] == 2  # seed + a lesson
    assert rows[1]["playbook_size_before"] == 2
    assert first["buffer_size"] == len(trainer.buffer) == 1  # the one solved item
    assert all(m["playbook_removed"] == 0 for m in rows)  # playbook_prune_every=4: not yet
    # the same lesson again is skipped as a duplicate: reasons add up to the skipped count
    assert rows[1]["ops_skipped"] > 0
    assert all(sum(m[f"ops_skipped_{k}"] for k in SKIP_REASONS) == m["ops_skipped"] for m in rows)


def test_playbook_history_records_each_steps_additions_and_prunings(tiny_model_dir, tmp_path):
    """playbook_history.jsonl (the report's and `resd serve`'s playbook timeline): one row a
    step with the playbook's size, sections, and the ids added and removed. With pruning
    every step, the lesson added at step 1 and never tagged is dropped at step 3. Catches a
    step that skips the history, or the every-F pruning."""
    out = tmp_path / "h"
    trainer = Trainer(config(tiny_model_dir, out, "playbook_prune_every=1"))
    failing = scripted(trainer, 0.0)
    metrics = [trainer.train_step([], failing) for _ in range(3)]
    history = read_jsonl(out / "playbook_history.jsonl")
    assert [h["step"] for h in history] == [1, 2, 3]
    assert [h["size"] for h in history] == [m["playbook_size"] for m in metrics]
    assert all(sum(h["sections"].values()) == h["size"] for h in history)
    assert history[0]["added"] == ["err-00002"] and history[0]["removed"] == []
    assert history[2]["removed"] == ["err-00002"]  # unused for more than one step
    assert [len(h["removed"]) for h in history] == [m["playbook_removed"] for m in metrics]


@pytest.mark.parametrize(
    ("operation", "removed", "added", "updated"),
    [
        ({"type": "DELETE", "id": "strat-00001"}, ["strat-00001"], [], []),
        ({"type": "MERGE", "ids": ["strat-00001", "strat-00002"],
          "content": "Keep replies short and of even length."}, ["strat-00001", "strat-00002"], ["strat-00003"], []),
        ({"type": "UPDATE", "id": "strat-00002", "content": "Count the characters of a reply first."},
         [], [], ["strat-00002"]),
    ],
    ids=["delete", "merge", "update"],
)  # fmt: skip
def test_the_curators_deletions_merges_and_updates_reach_the_playbooks_timeline(
    tiny_model_dir, tmp_path, operation, removed, added, updated
):
    """A curator's DELETE or MERGE takes entries out of the playbook and an UPDATE rewrites
    one: `playbook_removed` / `playbook_updated` and the history's `removed` / `updated`
    name them, as they name the entries pruning drops. Catches the step that counted only
    pruning, so a playbook shrank by a deletion with nothing removed in its metrics or its
    timeline (found on a SmolLM2 run: size 2 → 1, removed 0), and a rewritten lesson
    that left no trace there."""
    seed = SEED_PLAYBOOK + "[strat-00002] helpful=1 harmful=0 :: Count the characters first.\n"
    prefills = {**PREFILLS, "curation_prefill": json.dumps({"operations": [operation]})}
    out = tmp_path / "r"
    trainer = Trainer(config(tiny_model_dir, out, prefills=prefills, seed_playbook=seed))
    metrics = trainer.train_step([], scripted(trainer, 0.0))
    (history,) = read_jsonl(out / "playbook_history.jsonl")
    assert metrics["ops_applied"] >= 1
    assert history["removed"] == removed and metrics["playbook_removed"] == len(removed)
    assert history["added"] == added and metrics["playbook_added"] == len(added)
    assert history["updated"] == updated and metrics["playbook_updated"] == len(updated)
    assert metrics["playbook_size"] == 2 - len(removed) + len(added) == len(trainer.playbook)
    if updated:
        assert trainer.playbook.entries["strat-00002"].content == operation["content"]


def test_a_step_without_curation_omits_nothing_from_the_curator(tiny_model_dir, tmp_path):
    """`playbook_omitted_<reader>` counts the entries a reader was not shown in this step: a
    step with no failure to curate shows the curator nothing and omits nothing. Catches the
    count of the last curated step carrying over to later steps."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "o", "curation_playbook_tokens=1"))
    failed = trainer.train_step([], scripted(trainer, 0.0))
    assert failed["curations"] > 0 and failed["playbook_omitted_curation"] >= 1
    solved = trainer.train_step([], scripted(trainer, 1.0))
    assert solved["curations"] == 0 and solved["playbook_omitted_curation"] == 0


def test_a_checkpoint_keeps_the_runs_totals_and_a_resume_reports_what_changed(
    tiny_model_dir, tmp_path, caplog
):
    """A checkpoint's `totals` are the run's per-step counters summed, carried on by a resumed
    run; a resume refuses every setting that decides the stream or the method (and dropping
    the KL reference the run started with), says which free settings changed, trains whole
    batches, and does not evaluate a complete run again. Catches totals not kept or not
    restored, a fixed setting let through, a silent change, and a duplicated evaluation."""
    out = tmp_path / "t"

    def run_config(*extra: str):
        return config(
            tiny_model_dir, out, "inner_updates=1", "save_every=1", "kl_coef=0.05", *extra
        )

    Trainer(run_config("steps=2")).train()
    assert "given in Python" not in (out / "config.yaml").read_text()  # cfg.env is what ran
    with pytest.raises(ValueError, match=r"^kl_coef: 0\.0 now, 0\.05 in checkpoint-2"):
        Trainer(config(tiny_model_dir, out, "inner_updates=1", "save_every=1", "steps=3"),
                resume=True)  # fmt: skip
    shutil.copytree(tiny_model_dir, tmp_path / "same-model")
    for changed in (f"model={tmp_path / 'same-model'}", "algorithm=sdpo", "env=toy_envs:ConstantEnv",
                    "env_args={n_train: 8}", "seed=1", "shuffle=false", "epochs=2", "batch_size=2",
                    "inner_updates=2", "rollouts_per_prompt=2", "lora={r: 4}", "teacher=live"):  # fmt: skip
        key = changed.split("=")[0]
        with pytest.raises(ValueError, match=f"^{key}: .* now, .* in checkpoint-2"):
            Trainer(run_config("steps=3", changed), resume=True)
    resumed = Trainer(run_config("steps=3", "lr=1e-3"), resume=True)
    assert "resume: lr changed since checkpoint-2: 0.01 -> 0.001" in caplog.text
    summary = resumed.train()
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and summary["last"] == metrics[-1]
    assert all(m["rollouts"] == 4 for m in metrics)  # each step: a whole batch of 4 items
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 3]
    Trainer(run_config("steps=3", "lr=1e-3"), resume=True).train()  # complete: evaluated
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 3]
    for step in (2, 3):
        totals = json.loads((out / f"checkpoint-{step}" / "state.json").read_text())["totals"]
        rows = metrics[:step]
        assert {k: totals.get(k) for k in COUNTERS} == {
            k: sum(m[k] for m in rows) for k in COUNTERS
        }
        assert sum(totals[k] for k in COUNTERS) > 0  # the reflector and curator did count


def test_the_teacher_warning_threshold_and_rows_missing_its_figures():
    """The warning needs an advantage above CONFIRMING_ADVANTAGE (at it, the teacher has not
    moved) and one distilled failure is enough; a row that lacks a figure (an older log)
    confirms nothing. Catches an off-by-one at either bound and defaults that warn."""
    failing = {"success_rate": 0.0, "distilled": 1, "teacher_advantage": 0.58}
    assert teacher_confirms_failures(failing)
    assert not teacher_confirms_failures({**failing, "teacher_advantage": CONFIRMING_ADVANTAGE})
    for key in failing:
        assert not teacher_confirms_failures({k: v for k, v in failing.items() if k != key}), key


def test_a_scorer_given_with_an_environment_is_refused(tiny_model_dir, tmp_path):
    """`scorer` scores a dataset passed as `env`; an Environment scores itself. Given both,
    the scorer was silently ignored and the run trained on the environment's own rewards."""
    cfg = config(tiny_model_dir, tmp_path / "s")
    for env in (ParityEnv(), None):  # given in Python, or named by the config
        with pytest.raises(ValueError, match=r"^scorer: only used with a dataset"):
            Trainer(cfg, env=env, scorer="exact_match")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_host_memory_peak_is_the_processs_peak_resident_set_in_gib():
    """`host_memory_peak_gib` is the process's peak resident memory in GiB, the figure the
    kernel reports as VmHWM (in KiB). Catches a wrong unit (a KiB figure divided as if it were
    bytes, or by 2**21), which halves or shrinks the number a user watches for a leak."""

    def peak_kib() -> int:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1])

    before = peak_kib()
    reported = memory_metrics(torch.device("cpu"))
    after = peak_kib()
    assert set(reported) == {"host_memory_peak_gib"}  # no device figure on the CPU
    assert before / 2**20 - 0.001 <= reported["host_memory_peak_gib"] <= after / 2**20 + 0.001


def test_an_ema_teacher_moves_toward_the_student_after_every_step(tiny_model_dir, tmp_path):
    """teacher=ema with teacher_update_rate 0.5: after a step the teacher's weights are the
    midpoint of what they were and the student's new weights. Catches a trainer that never
    updates the teacher (it stayed the initial model, which is also "not the student")."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "ema", "teacher=ema"))
    before = {k: v.clone() for k, v in trainer.teacher.copy.state_dict().items()}
    trainer.train_step(trainer.train_items[:4])
    teacher, student = trainer.teacher.copy.state_dict(), trainer.model.state_dict()
    assert any(not torch.equal(before[k], teacher[k]) for k in before)
    for k, v in teacher.items():
        torch.testing.assert_close(v, before[k].lerp(student[k].to(v.dtype), 0.5))


def test_a_grpo_run_keeps_no_copy_of_the_model_for_a_teacher(tiny_model_dir, tmp_path):
    """grpo never queries a teacher (distillation weight 0): even with teacher=ema configured
    it keeps no second copy of the model's weights, which would double the memory it needs."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "g", "algorithm=grpo", "teacher=ema"))
    assert trainer.teacher.kind == "live" and trainer.teacher.copy is None


def test_state_a_caller_keeps_in_extra_state_survives_a_resume(tiny_model_dir, tmp_path):
    """`extra_state` (where `resd serve --learn` keeps what it consumed and served) is saved
    in each checkpoint and restored by a resumed run. Catches it saved under the wrong key or
    not restored: a resumed learner would train the same feedback again."""
    out = tmp_path / "x"
    trainer = Trainer(config(tiny_model_dir, out, "steps=1", "inner_updates=1", "save_every=1"))
    trainer.extra_state = {"served_version": 3, "consumed": [1, 2]}
    trainer.train()
    resumed = Trainer(
        config(tiny_model_dir, out, "steps=2", "inner_updates=1", "save_every=1"), resume=True
    )
    assert resumed.step == 1 and resumed.extra_state == {"served_version": 3, "consumed": [1, 2]}


class PlaceholderNameEnv(ParityEnv):
    """Keeps the base class's placeholder name, as an environment written in a hurry does."""

    name = Environment.name


def test_an_environment_that_keeps_the_placeholder_name_is_named_by_its_class(
    tiny_model_dir, tmp_path
):
    """An environment given in Python is named in the summary and model card by its `name`,
    or, where it kept the base's placeholder ("custom"), by its class path. Catches every
    such run being recorded under the same meaningless "custom"."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "p"), env=PlaceholderNameEnv())
    assert trainer.env_name == f"{PlaceholderNameEnv.__module__}:PlaceholderNameEnv"


def test_a_run_configured_in_python_with_tuples_resumes(tiny_model_dir, tmp_path):
    """A checkpoint keeps its config as JSON, where a tuple is a list: a run configured in
    Python with `target_modules=("q_proj", "v_proj")` resumes as the same run. It was refused
    ("lora: ... now, ... in checkpoint-1"), the tuple and its list compared as different.
    (Its output_dir is in folders not made yet: the run makes them.)"""
    lora = {"r": 4, "target_modules": ("q_proj", "v_proj")}
    cfg = config(tiny_model_dir, tmp_path / "tuples", "steps=1", "inner_updates=1")
    cfg = dataclasses.replace(cfg, lora=lora, output_dir=str(tmp_path / "runs" / "tuples"))
    Trainer(cfg).train()
    resumed = Trainer(dataclasses.replace(cfg, steps=2), resume=True)
    assert resumed.step == 1 and resumed.train()["steps"] == 2


def test_an_environment_without_training_items_is_refused(tiny_model_dir, tmp_path):
    """Nothing to train on is said at once, before the model loads, not found as a run of
    zero steps."""
    with pytest.raises(ValueError, match=r"^env: 'parity' has no training items"):
        Trainer(config(tiny_model_dir, tmp_path / "empty", "env_args={n_train: 0}"))


def test_the_sampling_copy_gets_every_steps_new_weights(tiny_model_dir, tmp_path):
    """With a bfloat16 sampling copy of the policy, each optimizer step's weights reach the
    copy before the next rollout. Catches a step that leaves the sampler on stale weights."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "g", "generation_dtype=bfloat16"))
    assert trainer.sampler.generator is not trainer.model
    trainer.train_step(trainer.train_items[:4])
    sampled = dict(trainer.sampler.generator.named_parameters())
    for name, weight in trainer.model.named_parameters():
        assert torch.equal(sampled[name], weight.detach().to(torch.bfloat16)), name


def test_evaluate_returns_its_row_and_cuts_replies_at_eval_max_new_tokens(tiny_model_dir, tmp_path):
    """`Trainer.evaluate` returns the row it logs; evaluation replies are as long as
    `eval_max_new_tokens` allows, not the rollouts' `max_new_tokens` (12 here), and are
    seeded by the step: evaluated again at the same step, whatever used the generators in
    between, the replies are the same."""
    out = tmp_path / "e"
    trainer = Trainer(config(tiny_model_dir, out, "eval_max_new_tokens=2", "eval_items=2"))
    row = trainer.evaluate()
    assert row is not None and row == read_jsonl(out / "eval.jsonl")[-1] and row["step"] == 0
    replies = [r["response"] for r in read_jsonl(out / "eval-step-000000.jsonl")]
    assert len(replies) == 4  # 2 items, eval_samples=2
    longer = Trainer(
        config(tiny_model_dir, tmp_path / "e12", "eval_items=2", "eval_max_new_tokens=12")
    )
    longer.evaluate()  # the same seeds with 12 new tokens: the same replies, continued
    full = [r["response"] for r in read_jsonl(tmp_path / "e12" / "eval-step-000000.jsonl")]
    assert all(len(short) < len(long) for short, long in zip(replies, full, strict=True))
    random.seed(12345)
    torch.manual_seed(12345)
    assert trainer.evaluate() == row
    assert [r["response"] for r in read_jsonl(out / "eval-step-000000.jsonl")] == replies


def test_evaluation_samples_with_its_own_top_k_and_min_p(tiny_model_dir, tmp_path):
    """`eval_top_k: 1` (or `eval_min_p: 1`) leaves the top token alone: the evaluation's
    replies at `eval_temperature` 1.5 are then greedy evaluation's. Catches the trainer
    evaluating without them, or with the rollouts' `top_k` / `min_p` instead."""

    def replies(name: str, *overrides: str) -> list[str]:
        trainer = Trainer(config(tiny_model_dir, tmp_path / name, "eval_items=2",
                                 "eval_max_new_tokens=6", *overrides))  # fmt: skip
        trainer.evaluate()
        return [r["response"] for r in read_jsonl(tmp_path / name / "eval-step-000000.jsonl")]

    greedy = replies("greedy", "eval_temperature=0")
    assert replies("k", "eval_temperature=1.5", "eval_top_k=1") == greedy
    assert replies("p", "eval_temperature=1.5", "eval_min_p=1") == greedy
    assert replies("rollouts", "eval_temperature=1.5", "top_k=1", "min_p=1") != greedy


def test_a_lora_checkpoint_holds_the_adapter_and_not_the_base_weights(tiny_model_dir, tmp_path):
    """A LoRA run's checkpoint is its adapter (megabytes for a 0.5B model), not the base
    weights it was loaded from (a gigabyte, every save_every steps). Catches a save that
    writes the wrapped base model or a merged copy. (Handing PEFT the full state dict, as a
    sharded run does, is not such a bug: PEFT keeps the adapter's tensors of it.)"""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "lora", "lora={r: 4}"))
    trainer.train_step(trainer.train_items[:4])
    path = trainer.save()
    assert not (path / "model.safetensors").exists()
    adapter = load_file(str(path / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter), sorted(adapter)


def test_star_import_gives_the_trainer_and_its_phases():
    """`from resd.training.trainer import *` gives the names in `__all__`. Catches a name in
    `__all__` that the module does not define: the star import then raises."""
    namespace: dict[str, object] = {}
    exec("from resd.training.trainer import *", namespace)
    assert namespace["Trainer"] is Trainer and namespace["PHASES"] is PHASES


class Recorder(Callback):
    """Keeps what each hook was given, and the order of the hooks."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.evals: list[dict | None] = []
        self.saves: list[str] = []
        self.order: list[str] = []
        self.summary: dict | None = None

    def on_train_begin(self, trainer):
        self.order.append(f"begin@{trainer.step}")
        self.config_written = (trainer.run_dir / "config.yaml").exists()

    def on_step_end(self, trainer, metrics):
        self.steps.append(metrics)
        self.order.append(f"step{metrics['step']}")

    def on_evaluate(self, trainer, row):
        self.evals.append(row)
        self.order.append(f"eval{row['step']}")

    def on_save(self, trainer, path):
        self.saves.append(path.name)
        self.order.append(path.name)

    def on_train_end(self, trainer, summary):
        self.order.append("end")
        self.summary = summary
        self.summary_written = (trainer.run_dir / "summary.json").exists()


def test_a_run_evaluates_and_checkpoints_on_schedule_and_always_at_its_last_step(
    tiny_model_dir, tmp_path, capsys
):
    """eval_every and save_every count steps, and the last step is evaluated and checkpointed
    once even where neither divides the run's length (3 steps, every 2); the callbacks see
    each step's metrics row, each eval row and each checkpoint as logged; the progress bar
    counts the steps and shows the loss; summary.json is the summary `train` returns. Catches
    a last step that is not saved, a save or evaluation at every step, callbacks that are
    not called (or out of order: the run's begin before its first evaluation, its end
    after summary.json, with the summary), and a bar that does not count."""
    out, recorder = tmp_path / "sched", Recorder()
    cfg = config(tiny_model_dir, out, "steps=3", "inner_updates=1", "eval_every=2",
                 "save_every=2", "keep_checkpoints=5", "eval_items=1", "progress=true")  # fmt: skip
    summary = Trainer(cfg, callbacks=[recorder]).train()
    evals, metrics = read_jsonl(out / "eval.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 3] and recorder.evals == evals
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert recorder.saves == ["checkpoint-2", "checkpoint-3"]
    assert [m["step"] for m in metrics] == [1, 2, 3] and recorder.steps == metrics
    assert recorder.order == ["begin@0", "eval0", "step1", "step2", "eval2", "checkpoint-2",
                              "step3", "checkpoint-3", "eval3", "end"]  # fmt: skip
    assert recorder.config_written and recorder.summary_written and recorder.summary == summary
    assert (summary["strategy"], summary["world_size"]) == ("single", 1)
    assert json.loads((out / "summary.json").read_text()) == summary
    lines = re.split(r"[\r\n]", capsys.readouterr().err)  # other bars load and write the model
    assert any(line.startswith("resd:") and "3/3" in line and "loss=" in line for line in lines)
    resumed = Recorder()  # a resumed run begins at its checkpoint's step
    Trainer(dataclasses.replace(cfg, steps=4), resume=True, callbacks=[resumed]).train()
    assert resumed.order == ["begin@3", "step4", "checkpoint-4", "eval4", "end"]


def test_a_run_without_test_items_never_evaluates(tiny_model_dir, tmp_path, capsys):
    """An environment with no test split trains without evaluating: no eval.jsonl and no
    eval rows in the summary. With progress=false no bar is drawn. Catches an evaluation
    of nothing before or after training and a bar that ignores `progress`."""
    out = tmp_path / "no-eval"
    summary = Trainer(config(tiny_model_dir, out, "steps=1", "inner_updates=1",
                             "env_args={n_test: 0}")).train()  # fmt: skip
    assert summary["steps"] == 1 and "eval_before" not in summary
    assert not (out / "eval.jsonl").exists()
    assert "loss=" not in capsys.readouterr().err  # the run's bar shows the loss


def test_a_resumed_run_continues_with_the_checkpoints_playbook_and_solution_buffer(
    tiny_model_dir, tmp_path
):
    """A resumed run's playbook and solution buffer are the checkpoint's, not the seed
    playbook and an empty buffer. Catches a restore that skips either: the resumed run would
    show its teacher and student other lessons and solutions than the uninterrupted run,
    and a checkpoint whose data cursor does not say where in the stream it stopped."""
    cfg = config(tiny_model_dir, tmp_path / "r", "inner_updates=3")
    trainer = Trainer(cfg)
    trainer.train_step([], scripted(trainer, 1.0, 0.0))  # one solved item, a lesson learned
    path = trainer.save()
    assert len(trainer.playbook) == 2 and len(trainer.buffer) == 1
    # the data cursor: step 1 of 3 on the first batch
    assert json.loads((path / "state.json").read_text())["cursor"] == {"batch": 0, "inner": 1}
    resumed = Trainer(cfg, resume=True)
    assert resumed.step == 1
    assert resumed.playbook.to_dict() == trainer.playbook.to_dict()
    assert resumed.buffer.solutions == trainer.buffer.solutions


def test_resume_says_when_there_is_no_run_to_continue(tiny_model_dir, tmp_path, caplog):
    """`--resume` on a folder with no run starts a new one and says so; a run not asked to
    resume says nothing. Catches the warning given the wrong way round."""
    cfg = config(tiny_model_dir, tmp_path / "new")
    Trainer(cfg)
    assert "resume:" not in caplog.text
    Trainer(cfg, resume=True)
    assert "resume: no run in" in caplog.text


def test_a_dataset_given_without_a_scorer_is_scored_by_exact_match(tiny_model_dir, tmp_path):
    """A `datasets.Dataset` passed as `env` with no `scorer` is scored by the built-in exact
    match: the answer scores 1, anything else 0. Catches a default the environment does not
    know or scores otherwise."""
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    env = datasets.Dataset.from_list(rows)
    trainer = Trainer(
        config(tiny_model_dir, tmp_path / "d", "env_args={answer_column: answer}"), env=env
    )
    answers = {r["prompt"]: r["answer"] for r in rows}
    item = trainer.train_items[0]
    assert trainer.env.score(item, answers[item.prompt_text]).reward == 1.0
    assert trainer.env.score(item, "It is a number.").reward == 0.0


def test_samples_hold_the_first_log_samples_rollouts_of_each_step(tiny_model_dir, tmp_path):
    """samples.jsonl (what the report shows) holds the first `log_samples` rollouts of the
    batch, no more, each with its step and the reflector's and curator's raw replies.
    Catches an off-by-one that logs a row more, and rows missing their step or a reply."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "s", "log_samples=2"))
    trainer.train_step([], scripted(trainer, 0.0))
    rows = read_jsonl(tmp_path / "s" / "samples.jsonl")
    assert len(rows) == 2 and all(r["step"] == 1 for r in rows)
    assert all({"reflection_reply", "curation_reply"} <= set(r) for r in rows)


def test_a_run_without_steps_trains_its_whole_stream(tiny_model_dir, tmp_path):
    """steps=null: the run is as long as its stream of batches, however long that is.
    Catches a cap that cut long runs short."""
    cfg = config(tiny_model_dir, tmp_path / "long", "steps=null", "env_args={n_train: 1000}")
    assert Trainer(cfg).total_steps == 1000 // 4 * 2  # batch_size 4, inner_updates 2


def test_a_lora_adapter_starts_from_the_runs_seed(tiny_model_dir, tmp_path):
    """A LoRA adapter's random initial weights come from the run's seed, not from whatever
    used the global generator before: the same config starts from the same weights.
    Catches a trainer that does not seed before the model loads."""
    weights = []
    for other in (1, 2):
        torch.manual_seed(other)
        trainer = Trainer(config(tiny_model_dir, tmp_path / f"l{other}", "lora={r: 4}"))
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_bfloat16_master_weights_are_warned_about_and_float32_is_not(
    tiny_model_dir, tmp_path, caplog
):
    """bfloat16 master weights silently lose most small updates: a run asking for them is
    told so, once, before it costs anything; the default float32 run is not.
    Catches the warning given for the wrong dtype, or never given (trainer mutant 373)."""
    Trainer(config(tiny_model_dir, tmp_path / "f32"))
    assert "dtype: bfloat16 master weights" not in caplog.text
    Trainer(config(tiny_model_dir, tmp_path / "bf16", "dtype=bfloat16"))
    assert caplog.text.count("dtype: bfloat16 master weights round away updates") == 1


def test_a_push_goes_to_hub_model_id_or_else_to_the_run_folders_name(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The Hub cannot be reached here: the upload itself is replaced by one that records
    where it was sent. Without `hub_model_id` the model goes to a repo named as the run's
    folder; with it, there. Catches a push sent to no name (trainer mutant 418)."""
    import resd.training.trainer as trainer_module

    sent: list[tuple[Path, str]] = []
    monkeypatch.setattr(
        trainer_module, "push_to_hub", lambda folder, repo_id: sent.append((folder, repo_id))
    )
    out = tmp_path / "parity-run"
    trainer = Trainer(config(tiny_model_dir, out, "push_to_hub=true"))
    trainer.save_model()
    trainer.save_model(push=False)  # a save that is not a push (every checkpoint's kind)
    trainer.cfg.hub_model_id = "me/parity"
    trainer.save_model()
    assert sent == [(out, "parity-run"), (out, "me/parity")]
