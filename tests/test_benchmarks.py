"""The step-time benchmark runs end to end on a tiny random model (`--smoke`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_time.py"
OURS = ["resd", "sdpo", "sdpo_ss", "grpo"]
TRL = ["trl_sdpo", "trl_grpo"]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module, to call its `main` in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_step_time_smoke(tmp_path):
    has_trl = importlib.util.find_spec("trl") is not None
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--repeats", "1", "--fixed-length", "--out", str(out)]  # fmt: skip
    if not has_trl:
        cmd.append("--skip-trl")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads(out.read_text())
    methods = report["methods"]
    expected = OURS + (TRL if has_trl else [])
    assert sorted(methods) == sorted(expected)
    for name in expected:
        res = methods[name]
        assert "error" not in res, (name, res.get("error"))
        assert res["median"]["step"] > 0, name
        assert res["median"]["rollout"] > 0, name
        assert len(res["steps"]) == 2 and res["steps"][0]["warmup"], name  # 1 warm-up + 1 timed
        assert res["rollouts_per_step"] == res["prompts_per_step"] * res["n"], name
        for step in res["steps"]:
            assert step["forwards"]["student_grad"] >= 1, name
            # --fixed-length: both sides decode exactly max_new_tokens per completion
            assert step["completion_tokens_mean"] == report["settings"]["max_new_tokens"], name
        if name in OURS:  # and our trainer was asked to (a tiny model may never stop early)
            assert res["settings"]["min_new_tokens"] == res["settings"]["max_new_tokens"], name
    assert methods["grpo"]["n"] == report["settings"]["grpo_n"] > 1
    assert all(methods[m]["n"] == 1 for m in ["resd", "sdpo", "sdpo_ss"])
    # every method saw the same prompts: one list in the report, used by all
    assert len(report["settings"]["prompts"]) == 2
    assert report["ratios"]["resd_over_sdpo"] > 0
    if has_trl:
        assert methods["trl_sdpo"]["n"] == 1
        assert methods["trl_grpo"]["n"] == methods["grpo"]["n"]
        assert report["ratios"]["sdpo_over_trl_sdpo"] > 0
        # the SDPO teacher really ran on both sides
        assert all(s["forwards"]["teacher"] >= 1 for s in methods["trl_sdpo"]["steps"])
        assert all(s["forwards"]["teacher"] >= 1 for s in methods["sdpo"]["steps"])
    # the table is the last thing printed
    assert proc.stdout.rstrip().splitlines()[-1].startswith("|")


@pytest.mark.slow
def test_sharding_memory_benchmark_smoke(tmp_path):
    """FSDP over 2 processes holds half the policy/teacher/optimizer bytes per rank;
    ZeRO-2 halves the optimizer state, ZeRO-3 the weights too."""
    out = tmp_path / "sharding.json"
    script = ROOT / "benchmarks" / "sharding_memory.py"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {(r["strategy"], r["processes"]): r for r in json.loads(out.read_text())["runs"]}
    single, replicated, sharded = runs["ddp", 1], runs["ddp", 2], runs["fsdp", 2]
    for key in ("params", "grads", "optimizer", "teacher"):
        assert replicated["rank0"]["gib"][key] == pytest.approx(single["rank0"]["gib"][key])
        for rank in sharded["ranks"]:
            assert rank["gib"][key] == pytest.approx(single["rank0"]["gib"][key] / 2, rel=0.05)
    # The sampling copy stays whole: every rank samples on its own.
    assert sharded["rank0"]["gib"]["generator"] == pytest.approx(
        single["rank0"]["gib"]["generator"]
    )
    if ("deepspeed-zero2", 2) in runs:
        whole = single["rank0"]["gib"]
        zero2, zero3 = (
            runs["deepspeed-zero2", 2]["rank0"]["gib"],
            runs["deepspeed-zero3", 2]["rank0"]["gib"],
        )
        assert zero2["params"] == pytest.approx(whole["params"])
        assert zero3["params"] == pytest.approx(whole["params"] / 2, rel=0.05)
        for zero in (zero2, zero3):
            assert zero["optimizer"] < 0.8 * whole["optimizer"]
            assert zero["teacher"] == pytest.approx(whole["teacher"])  # stays whole


@pytest.mark.slow
def test_sd_sanity_probes_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The sanity benchmark trains on its 8 items and probes teacher and student each step:
    at step 0 the EMA teacher *is* the student (same numbers without the feedback); after
    training steps the student has moved and the teacher has followed only part-way."""
    out, report = tmp_path / "runs", tmp_path / "sd.json"
    script = ROOT / "benchmarks" / "sd_sanity.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--algorithms", "sdpo", "--feedback", "plain",
         "--steps", "2", "--eval-every", "2", "--json", str(report), f"model={tiny_model_dir}",
         "lora=null", "lr=1e-2", "max_new_tokens=8", "eval_samples=1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(report.read_text())["runs"]["sdpo-plain"]
    probes = {p["step"]: p for p in run["probes"]}
    assert sorted(probes) == [0, 1, 2] and [e["step"] for e in run["eval"]] == [0, 2]
    assert probes[0]["teacher_without_feedback"] == pytest.approx(probes[0]["student"], abs=1e-6)
    assert probes[2]["teacher_without_feedback"] != pytest.approx(probes[2]["student"], abs=1e-6)
    assert all(
        p["teacher_with_feedback"] == p["teacher_with_feedback"] for s, p in probes.items() if s
    )
    assert [s["step"] for s in run["steps"]] == [1, 2]


def test_teacher_context_probe_takes_a_logged_prompt_apart(tiny_model_dir, tmp_path):
    """One RESD step of the sanity benchmark, then the probe on its logged teacher prompts:
    every prompt re-renders exactly from its slots (else the probe refuses), and leaving a
    slot out changes what the teacher says."""
    out, report = tmp_path / "runs", tmp_path / "probe.json"
    common = dict(capture_output=True, text=True, timeout=600, cwd=tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sd_sanity.py"), "--out", str(out), "--algorithms", "resd",
         "--feedback", "quote", "--steps", "1", "--eval-every", "1", "--json", str(tmp_path / "sd.json"),
         f"model={tiny_model_dir}", "lora=null", "max_new_tokens=8", "eval_samples=1",
         "reflection_max_new_tokens=128", "curation_max_new_tokens=24"], **common,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "teacher_context_probe.py"), str(out / "resd-quote"),
         "--json", str(report)], **common,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(report.read_text())["results"]
    values = row["teacher_advantage"]
    assert row["rollouts"] == 8 and row["tokens"] > 0
    assert set(values) >= {
        "as logged",
        "without the previous attempt",
        "feedback only (SDPO's context)",
    }
    assert len({round(v, 6) for v in values.values()}) > 1  # the variants are different prompts
    assert "| as logged |" in done.stdout
    # the reflection counter reads the same run folder: every failed rollout's reflection,
    # its parsed fields, and the sampler's deadline cuts as metrics.jsonl logged them
    counts = load_benchmark("reflection_content").count(out / "resd-quote")
    metrics = [
        json.loads(line) for line in (out / "resd-quote" / "metrics.jsonl").read_text().splitlines()
    ]
    assert counts["replies"] == metrics[0]["reflections"] == 8
    assert counts["reflections"] == metrics[0]["reflections_parsed"] > 0
    assert counts["fields"] == 4 * counts["reflections"]
    assert counts["fields_cut_at_deadline"] == metrics[0]["reflection_fields_cut"]


def test_reflection_content_counts_whole_numbers_from_the_quoting_feedback(tmp_path):
    """The counter finds the right product and the feedback's quoted wrong number as whole
    numbers (5784 is not 57840; 57,760 is 57760), and a field that stops mid-word counts
    as mid-sentence. A counter matching substrings, or taking the wrong number from the
    reply instead of the feedback, fails here."""
    run = tmp_path / "run"
    run.mkdir()
    reply = {"reasoning": "r", "error_identification": "It wrote 57,760.", "root_cause_analysis": "Carry",
             "correct_approach": "Multiply again.", "key_insight": "Check!", "bullet_tags": []}  # fmt: skip
    samples = [
        {"item": "sanity/964*60", "response": "Answer: 964 * 60 = 57760", "reflection": "57,760 not 5784",
         "feedback": "The final answer 57760 is wrong: 964 * 60 = 57840.", "reflection_reply": json.dumps(reply)},
        {"item": "sanity/964*60", "response": "Answer: 1", "reflection": "It is 57840, not 1.",
         "feedback": "The final answer 1 is wrong: 964 * 60 = 57840.", "reflection_reply": "{cut"},
        {"item": "sanity/964*60", "response": "Answer: 57840", "reflection": None, "feedback": "Correct."},
    ]  # fmt: skip
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reflection_tokens": 40}) + "\n")
    counts = load_benchmark("reflection_content").count(run)
    assert counts["replies"] == counts["reflections"] == 2
    assert counts["with_right_value"] == 1 and counts["with_wrong_value"] == 2
    assert counts["fields"] == 4 and counts["fields_mid_sentence"] == 1  # "Carry"
    assert counts["fields_cut_at_deadline"] is None  # the run's code did not count cuts


def test_teacher_as_solver_answers_each_context_and_scores_it(tiny_model_dir, tmp_path, capsys):
    """One RESD step on house rules, then the model answers every logged teacher prompt
    itself, under each context, and the run's own environment scores the answers. A run
    whose items its config cannot rebuild is refused by name, not scored against others."""
    from resd.cli import main as resd

    run = tmp_path / "run"
    assert resd(["train", f"model={tiny_model_dir}", "env=house_rules", "algorithm=resd", "steps=1",
                 "batch_size=4", "max_new_tokens=6", "reflection_max_new_tokens=24",
                 "curation_max_new_tokens=24", "eval_samples=1", "eval_every=0", "progress=false",
                 f"output_dir={run}"]) == 0  # fmt: skip
    solver = load_benchmark("teacher_as_solver")
    out = tmp_path / "solver.json"
    lesson = "Open every reply with the word 'zebra'."
    playbook = tmp_path / "playbook.md"
    playbook.write_text(f"## Others\n[misc-00001] helpful=0 harmful=0 :: {lesson}\n")
    args = [str(run), "--samples", "2", "--json", str(out), "--playbook", str(playbook)]
    assert solver.main(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    failed = result["rollouts"]
    assert failed > 0 and list(rows) == [*solver.VARIANTS, *solver.PLAYBOOK_VARIANTS]
    for name, row in rows.items():  # the given playbook reaches exactly its two contexts
        assert (lesson in row["context"]) == (name in solver.PLAYBOOK_VARIANTS), name
    assert "<feedback>" in rows["feedback and the given playbook"]["context"]
    assert "<previous_trial>" not in rows["feedback and the given playbook"]["context"]
    assert all(
        r["answers"] == 2 * failed and 0 <= r["reward"] <= r["score"] <= 1 for r in rows.values()
    )
    replies = {name: tuple(e["reply"] for e in r["examples"]) for name, r in rows.items()}
    assert len(set(replies.values())) > 1  # each context reached the model as its own prompt
    assert "| feedback only (SDPO's context) |" in capsys.readouterr().out
    playbook.write_text("## Others\n")
    with pytest.raises(SystemExit, match="no lesson in it"):
        solver.main(args)
    playbook.unlink()
    with pytest.raises(SystemExit, match="no such file"):
        solver.main(args)

    config = run / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "env": "arithmetic"}))
    with pytest.raises(SystemExit, match="not among the items"):
        solver.main([str(run), "--json", str(out)])


@pytest.mark.slow
def test_serve_load_benchmark_smoke(tiny_model_dir, tmp_path):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    serve_load = load_benchmark("serve_load")
    out = tmp_path / "result.json"
    code = serve_load.main(["--model", str(tiny_model_dir), "--clients", "3", "--seconds", "3",
                            "--kill-after", "3", "--max-tokens", "4", "--out", str(tmp_path / "runs"),
                            "--json", str(out), "--dtypes", "float32,bfloat16"])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0 and list(result["load_by_dtype"]) == ["float32", "bfloat16"]
    for load in result["load_by_dtype"].values():  # each dtype had its own server and database
        assert load["completions"] > 0 and load["tokens_per_completion"] > 0
        assert load["rows"] == load["acknowledged_completions"]
    assert result["fault"]["acknowledged_feedback"] > 0 and result["fault"]["lost_feedback"] == 0


def _house_rules_smoke(name: str, out: Path) -> tuple[dict, str]:
    """Run a benchmark's `--smoke` on house rules; its only row, and its last printed line.

    Its temporary folder must be empty afterwards: the tiny model it builds is scratch, and
    every smoke run used to leave one behind in /tmp."""
    script = ROOT / "benchmarks" / f"{name}.py"
    scratch = out.parent / f"{name}-tmp"
    scratch.mkdir()
    done = subprocess.run([sys.executable, str(script), "--smoke", "--envs", "house_rules",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # its own folders are gone (torch's caches may stay)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("resd-")] == []
    return json.loads(out.read_text())["rows"][0], done.stdout.rstrip().splitlines()[-1]


def test_prefix_cache_benchmark_smoke(tmp_path):
    """The benchmark's cached arm really hits on the tiny model, and both arms decode the
    same number of tokens (a benchmark that never hit would report a fake 0 % saving)."""
    row, last_line = _house_rules_smoke("prefix_cache", tmp_path / "prefix_cache.json")
    assert row["env"] == "house_rules" and row["rows"] == 3
    assert row["hit_rate"] == 1.0 and row["cached_tokens_mean"] > 0
    assert 0 <= row["whole_match_rate"] <= row["hit_rate"]  # a whole match is a hit
    assert row["reflect_s"]["cached"]["1"] > 0 and row["reflect_s"]["prefill"]["4"] > 0
    assert last_line.startswith("house_rules")


def test_field_budget_benchmark_smoke(tmp_path):
    """Both arms decode the same reflection prompts, and the counts separate them: random
    text overruns the character limits' budget (nothing closes), while the token budget
    closes every reply and reports the fields it cut (a benchmark that counted cuts the
    same way in both arms, or fed them different prompts, would fail here)."""
    row, last_line = _house_rules_smoke("field_budget", tmp_path / "field_budget.json")
    chars, tokens = row["characters"], row["tokens"]
    assert row["reflections"] == chars["replies"] == tokens["replies"] == 3
    assert tokens["parsed"] == tokens["finished"] == 3 and tokens["fields_cut"] > 0
    assert chars["finished"] == 0 and chars["reply_tokens_max"] == 256
    # the curator reads the same three reflections in every arm, and must write a lesson
    assert row["curations"] == 3
    curation = row["sentences_curation"]
    assert curation["parsed"] == 3 and curation["lessons"] >= 3 and curation["strings_cut"] > 0
    assert last_line.startswith("house_rules")  # the tables were printed


@pytest.mark.slow
def test_gpu_step_takes_real_trainer_steps_for_both_algorithms(tiny_model_dir, tmp_path):
    """The GPU session's end-to-end part, run on CPU with the tiny shape and the test tokenizer.

    Fails if the benchmark drifts from the trainer (a renamed stat, a config key it sets
    that no longer exists), if RESD's reflection pass stops running, or if the ratio it
    reports is not the one of its own medians.
    """
    out = tmp_path / "gpu_step.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--smoke", "--device", "cpu",
           "--tokenizer", str(tiny_model_dir), "--repeats", "1", "--out", str(out)]  # fmt: skip
    scratch = tmp_path / "tmp"  # its model and each algorithm's run folder: removed at exit
    scratch.mkdir()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TMPDIR": str(scratch)})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # its own folders are gone (torch's caches may stay)
    assert [p.name for p in scratch.iterdir() if p.name.startswith("resd-")] == []
    report = json.loads(out.read_text())
    rows = {row["algorithm"]: row for row in report["rows"]}
    assert sorted(rows) == ["resd", "sdpo"]
    for row in rows.values():
        assert len(row["steps"]) == 2  # one warm-up, one timed
        assert row["model_device"] == "cpu" and row["structured_output"] == "on"
        assert row["median"]["rollout"] > 0 and row["median"]["update"] > 0
        assert row["steps"][-1]["step"] == 2  # the trainer counted both steps
    assert rows["resd"]["reflections"] > 0 and rows["resd"]["median"]["reflect"] > 0
    assert rows["sdpo"]["reflections"] == 0 and rows["sdpo"]["median"]["reflect"] == 0
    medians = {name: row["median"]["step"] for name, row in rows.items()}
    assert report["resd_over_sdpo"] == pytest.approx(medians["resd"] / medians["sdpo"])
    assert "RESD / SDPO per step" in done.stdout


def test_decode_attention_benchmark_smoke(tiny_model_dir, tmp_path):
    """Both arms decode the same tokens on unpadded and padded batches, and every row has
    a decode time per step (a hook that never fired would leave none)."""
    bench = load_benchmark("decode_attention")
    out = tmp_path / "decode_attention.json"
    bench.main(["--model", str(tiny_model_dir), "--dtype", "float32", "--contexts", "16", "--batches", "1,2",
                "--new-tokens", "3", "--repeats", "1", "--json", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["padded"]) for r in rows] == [(1, False), (2, False), (2, True)]
    for row in rows:
        assert row["same_tokens"]
        assert all(
            row[arm]["decode_ms"] > 0 for arm in ("sdpa (transformers)", "packed_sdpa (resd)")
        )
        assert all(len(t["steps"]) == 3 for t in row["raw"].values())  # 4 tokens: 3 decode steps


def test_loss_memory_benchmark_runs_its_four_variants_to_one_loss(tmp_path):
    """Each way of computing the loss runs in its own process and they agree on its value
    (a variant that dropped positions or misaligned the teacher would not)."""
    out = tmp_path / "loss_memory.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--batch", "2", "--seq", "24",
         "--hidden", "16", "--vocab", "300", "--chunk", "5", "--repeats", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "logits", "fused", "chunked"}
    for variant in ("logits", "fused", "chunked"):
        assert rows[variant]["loss"] == pytest.approx(rows["full"]["loss"], rel=1e-5)
    assert {"peak_ratio_logits_over_full", "peak_ratio_fused_over_full"} <= result.keys()
    assert all(r["seconds_later"] > 0 for r in rows.values())  # the second call was timed
    # a subset, as the GPU session asks for; an unknown name is refused before any run
    subset = tmp_path / "subset.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--batch", "1", "--seq", "8",
         "--hidden", "8", "--vocab", "300", "--variants", "full,fused", "--out", str(subset)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    subset_rows = json.loads(subset.read_text())["rows"]
    assert [r["variant"] for r in subset_rows] == ["full", "fused"]
    assert all("error" not in r for r in subset_rows)
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--variants", "full,fast"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown fast" in bad.stderr


def test_adapter_inputs_benchmark_compares_both_arms_bit_for_bit(tiny_model_dir, tmp_path):
    """Both arms time a forward and backward of the trainer's LoRA policy and agree bit
    for bit (PEFT's float32 cast of an adapter input changes no number under autocast)."""
    bench = load_benchmark("adapter_inputs")
    out = tmp_path / "adapter_inputs.json"
    bench.main(["--model", str(tiny_model_dir), "--rows", "2", "--tokens", "12", "--keep", "5",
                "--repeats", "1", "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["adapter_layers"] > 0
    assert result["same_logits"] and result["same_gradients"]
    assert [len(r["raw"]) for r in result["rows"]] == [2, 2]
    assert all(r["forward_s"] > 0 and r["backward_s"] > 0 for r in result["rows"])


def test_packed_rows_benchmark_packs_a_group_and_compares_the_arms(tiny_model_dir, tmp_path):
    """One group of K = 4 sampled replies, padded and packed: the packed row is shorter,
    and both arms' logits and gradients are recorded side by side."""
    bench = load_benchmark("packed_rows")
    out = tmp_path / "packed_rows.json"
    bench.main(["--model", str(tiny_model_dir), "--prompts", "1", "--max-new-tokens", "6",
                "--repeats", "1", "--out", str(out)])  # fmt: skip
    (group,) = json.loads(out.read_text())["groups"]
    assert group["packing_pays"] and group["prefix"] >= group["prompt"]
    assert group["packed_positions"] < group["padded_positions"]
    for kind in ("forward_backward", "forward"):
        assert len(group[kind]["raw"]["padded"]) == len(group[kind]["raw"]["packed"]) == 2
        assert group[kind]["max_logit_diff"] <= 0.05 * group[kind]["max_logit"]
    assert group["forward_backward"]["grad_rel_diff"] < 0.05


def test_packed_steps_benchmark_alternates_the_arms_in_one_trainer(tiny_model_dir, tmp_path):
    """Whole RESD steps with packing on and off in turn, on equal work: each arm gets its
    steps, draws the same replies (the script refuses to report otherwise), and the
    update's forward and backward are timed inside its phase."""
    bench = load_benchmark("packed_steps")
    out = tmp_path / "steps.json"
    bench.main(["--run", "house_rules/resd", "--steps", "2", "--out", str(out), "--set", f"model={tiny_model_dir}",
                "--set", "max_new_tokens=6", "--set", "batch_size=2", "--set", "lora={r: 2, alpha: 4}"])  # fmt: skip
    result = json.loads(out.read_text())
    assert [len(result["steps"][arm]) for arm in ("padded", "packed")] == [2, 2]
    assert (
        result["medians"]["padded"]["reply_tokens"] == result["medians"]["packed"]["reply_tokens"]
    )
    for row in result["medians"].values():
        assert 0 < row["forward"] + row["backward"] <= row["update"] <= row["step"]


def test_step_profile_counts_page_faults_and_memory_per_step(tiny_model_dir, tmp_path):
    """Each variant in its own process, each step with the page faults, system time and
    resident memory it left (the figures of "Freed memory kept" in docs/benchmarks.md)."""
    bench = load_benchmark("step_profile")
    out = tmp_path / "profile.json"
    bench.main(["--runs", "house_rules/sdpo/lora-freeing,house_rules/sdpo/lora", "--repeats", "2",
                "--out", str(out), "--set", f"model={tiny_model_dir}", "--set", "max_new_tokens=6",
                "--set", "batch_size=2", "--set", "lora={r: 2, alpha: 4}"])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["lora-freeing", "lora"]
    for row in rows:
        assert len(row["steps"]) == 2
        for step in row["steps"]:
            assert step["minor_faults"] >= 0 and step["system_s"] >= 0
            assert 0 < step["resident_gib"] <= row["peak_rss_gib"] * 1.01
        assert {"minor_faults", "system_s", "step"} <= row["median"].keys()


def test_ifeval_rescore_scores_each_reply_again_and_counts_the_changed(tmp_path):
    """The recorded figures come from the file, the new ones from the verifiers: a rescore
    that read the recorded rewards back, or matched replies to the wrong item or sample,
    would report no change here, where one recorded reward is wrong on purpose."""
    from resd.envs.ifeval import IFEvalEnv

    env_args = {"n_test": 3}
    items = IFEvalEnv(**env_args).test_items()
    samples = [{"item": it.id, "sample": k, "response": text} for it in items
               for k, text in enumerate(["Hello there.", "NO. " * 40])]  # fmt: skip
    env = IFEvalEnv(**env_args)
    truth = [env.score(next(i for i in items if i.id == s["item"]), s["response"]) for s in samples]
    rewards = [s.reward for s in truth]
    rewards[3] = 1.0 - rewards[3]  # a recorded verdict the verifiers no longer give
    per_item = [{"item": it.id, "rewards": rewards[2 * n : 2 * n + 2],
                 "scores": [s.score for s in truth[2 * n : 2 * n + 2]]} for n, it in enumerate(items)]  # fmt: skip
    record = {"env_args": env_args, "samples": samples, "per_item": per_item,
              "metrics": {"task_mean@k": sum(rewards) / 6, "case_mean@k": 0.5}}  # fmt: skip
    row = load_benchmark("ifeval_rescore").rescore(record)
    assert row["replies"] == 6 and row["replies_changed"] == 1
    assert row["task_now"] == sum(s.reward for s in truth) / 6
    assert row["task_recorded"] == sum(rewards) / 6
    assert row["case_now"] == pytest.approx(sum(s.score for s in truth) / 6)


def test_tool_calls_benchmark_reads_every_reply_with_the_servers_parser(tmp_path, monkeypatch):
    """`benchmarks/tool_calls.py --smoke`: every request is sent and read, and a reply that
    writes something shaped like a call, which the server does not take, is not counted as
    an answer."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its shared plumbing
    tool_calls = load_benchmark("tool_calls")
    out = tmp_path / "tool_calls.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tool_calls.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]  # the tiny template ignores tools=: one row
    kinds = [reply["kind"] for reply in row["replies"]]
    assert (kinds.count("call"), kinds.count("none"), kinds.count("result")) == (8, 4, 8)
    assert row["layout"] == "ours" and row["prompt_tokens"] > 0 and "| ours |" in done.stdout
    called_again = '{"name": "add", "arguments": {"a": 1, "b": 2}}\n{"sum": 3}'
    assert tool_calls.writes_a_call(called_again)
    assert tool_calls.writes_a_call('```json\n{\n  "name": "say_hello",\n  "parameters": {}\n}')
    assert not tool_calls.writes_a_call('The "name" of the sum is "add", its "arguments" two.')


def test_the_tool_answers_probe_scores_answers_not_calls(monkeypatch):
    """`benchmarks/tool_answers.py`: an item is the served layout of a request, its call
    and its result; a reply succeeds when it calls nothing and states every fact of the
    result, and the feedback of a failure says the result in words. Catches a repeated call (bare
    or tagged) scored as an answer, and a fact matched inside a longer number."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    env = load_benchmark("tool_answers").ToolAnswersEnv(seed=3, n_train=6, n_test=3)
    again = load_benchmark("tool_answers").ToolAnswersEnv(seed=3, n_train=6, n_test=3)
    assert [i.messages for i in env.test_items()] == [i.messages for i in again.test_items()]
    assert len(env.train_items()) == 6 and len(env.test_items()) == 3
    item = next(i for i in env.train_items() if i.meta["function"] == "add")
    assert item.messages[0]["role"] == "system" and "<tools>" in item.messages[0]["content"]
    assert item.messages[-1]["content"].startswith('<tool_response>\n{"sum": ')
    total = item.meta["facts"][0]
    for call in ['{"name": "add", "arguments": {"a": 1, "b": 2}}',
                 '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
                 f'{{"name": "add", "arguments": {{"a": 1, "b": 2}}}}\nThe sum is {total}.']:  # fmt: skip
        score = env.score(item, call)
        assert (score.reward, score.score) == (0.0, 0.0) and f"the sum is {total}" in score.feedback
    assert env.score(item, f"The sum is 1{total}.").score == 0.5  # not the fact: a longer number
    assert env.score(item, item.meta["result"]).reward == 0.0  # the result echoed is no answer
    assert env.score(item, f"The sum is {total}.").reward == 1.0


def test_the_teacher_context_probe_builds_the_chats_the_trainer_built(monkeypatch):
    """`benchmarks/teacher_context_probe.py` on a conversation (a tool's call and result):
    the student reads every turn, and each variant's teacher reads the turns before the
    last user message, then the logged prompt less that variant's slots. Catches a probe
    that shows the teacher (or the student) the last user message alone, as it did, a
    variant that leaves out the wrong slot, and items from another run's env_args taken
    for the logged ones."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from resd.training.teacher_context import TeacherTemplate

    probe = load_benchmark("teacher_context_probe")
    env = load_benchmark("tool_answers").ToolAnswersEnv(seed=0, n_train=4, n_test=1)
    items = {it.id: it for it in env.train_items()}
    item = next(iter(items.values()))
    template = TeacherTemplate()
    values = {"prompt": item.prompt_text, "previous_trial": "CALLED AGAIN",
              "feedback": "FEEDBACK", "reflection": "REFLECTION", "successful_trial": "SUCCESS"}  # fmt: skip
    sample = {
        "item": item.id,
        "prompt": item.prompt_text,
        "teacher_prompt": template.render(**values),
    }
    chats = probe.sample_chats(Path("run"), template, items, sample)
    assert [m["role"] for m in item.messages] == ["system", "user", "assistant", "user"]
    assert chats.student == item.messages
    for chat in chats.teacher.values():
        assert chat[:-1] == item.messages[:-1] and chat[-1]["role"] == "user"
    shown = {name: {v for v in values.values() if v in chat[-1]["content"]}
             for name, chat in chats.teacher.items()}  # fmt: skip
    everything = set(values.values())
    assert shown["as logged"] == everything
    assert shown["without the reflection"] == everything - {"REFLECTION"}
    assert shown["without the successful attempt"] == everything - {"SUCCESS"}
    assert shown["feedback only (SDPO's context)"] == {item.prompt_text, "FEEDBACK"}
    # an env that cannot be built here: the logged last message alone, on both sides
    alone = probe.sample_chats(Path("run"), template, {}, sample)
    assert alone.student == [{"role": "user", "content": item.prompt_text}]
    assert alone.teacher["as logged"] == [{"role": "user", "content": sample["teacher_prompt"]}]
    other = load_benchmark("tool_answers").ToolAnswersEnv(seed=1, n_train=4, n_test=1)
    with pytest.raises(SystemExit, match="is not the one it logged"):
        probe.sample_chats(Path("run"), template, {item.id: other.train_items()[0]}, sample)


def test_the_tool_answers_table_reads_a_run_and_an_eval_file_alike(tmp_path, monkeypatch):
    """`python benchmarks/tool_answers.py RUN FILE`: a run folder's evaluations are labelled
    by step, a `resd eval --out` file by its name, and each reply is counted by the kind its
    score names, an answer inside a code block apart. Catches an eval file's replies read
    from the wrong key, a step mislabelled, one source's environment arguments used for the
    other, or an answer in code counted as a plain one."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    env = load_benchmark("tool_answers").ToolAnswersEnv(seed=5, n_train=2, n_test=2)
    other = load_benchmark("tool_answers").ToolAnswersEnv(seed=6, n_train=2, n_test=2)
    first, second = env.test_items()
    third, fourth = other.test_items()  # the same ids, other facts
    answer = " and ".join(first.meta["facts"])  # states every fact: an answer
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("env_args: {seed: 5, n_train: 2, n_test: 2}\n")
    (run / "eval-step-000007.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"item": first.id, "response": answer}, {"item": second.id, "response": "{}"}]))  # fmt: skip
    out = tmp_path / "long.json"
    in_code = "```python\nprint(x)\n```\nIt prints " + " and ".join(third.meta["facts"])
    out.write_text(json.dumps({"samples": [{"item": third.id, "response": in_code},
                                           {"item": fourth.id, "response": "I cannot say."}]}))  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tool_answers.py"), str(run), str(out),
         "--env-args", '{"seed": 6, "n_train": 2, "n_test": 2}'],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert f"| {run} step 7 | 1/2 | 0/2 | 0/2 | 1/2 | 0/2 |" in lines
    assert f"| {out} | 0/2 | 1/2 | 0/2 | 0/2 | 1/2 |" in lines
