"""`resd compare`: planning, samples-drawn arithmetic, isolation of a failing run, re-runs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import yaml

from resd.analysis import compare
from resd.analysis.compare import (
    RunSpec,
    cumulative_samples,
    eval_curve,
    execute,
    format_paired,
    launch,
    paired_differences,
    parse_algorithm_args,
    plan_runs,
    run_comparison,
    spread,
    unshared_overrides,
)
from resd.cli import main as cli_main
from resd.config import ConfigError, load_config

TESTS = Path(__file__).resolve().parent


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_algorithm_args_and_plan():
    args = parse_algorithm_args(["grpo:rollouts_per_prompt=8", "grpo:lr=1e-6", "sdpo:batch_size=4"])
    assert args == {"grpo": ["rollouts_per_prompt=8", "lr=1e-6"], "sdpo": ["batch_size=4"]}
    for bad in ("grpo", "grpo:lr", ":lr=1"):
        with pytest.raises(ValueError, match="ALGORITHM:key=value"):
            parse_algorithm_args([bad])
    specs = plan_runs(["sdpo", "grpo"], [0, 1], Path("out"), ["steps=3"], args)
    assert [s.name for s in specs] == ["sdpo-seed0", "grpo-seed0", "sdpo-seed1", "grpo-seed1"]
    grpo = specs[3]
    # base overrides, then the algorithm's, then what no override may change
    assert grpo.overrides == ["steps=3", "rollouts_per_prompt=8", "lr=1e-6", "algorithm=grpo",
                              "seed=1", f"output_dir={Path('out') / 'grpo-seed1'}"]  # fmt: skip
    assert unshared_overrides(args) == ["sdpo:batch_size=4"]  # changes sdpo's data order
    with pytest.raises(ValueError, match="not in --algorithms"):
        plan_runs(["sdpo"], [0], Path("out"), [], {"grpo": ["lr=1"]})


def test_samples_drawn_arithmetic(tmp_path):
    config = {"batch_size": 4, "rollouts_per_prompt": 8}
    metrics = [{"step": s} for s in (1, 2, 3)]
    assert cumulative_samples(metrics, config) == {0: 0, 1: 32, 2: 64, 3: 96}
    # a recorded rollout count wins (a short last batch draws fewer)
    metrics[2]["rollouts"] = 16
    assert cumulative_samples(metrics, config)[3] == 80
    assert cumulative_samples([{"step": 1}], {})[1] == 8  # TrainConfig defaults: 8 × 1

    write_jsonl(tmp_path / "metrics.jsonl", metrics)
    write_jsonl(tmp_path / "eval.jsonl", [{"step": 0, "case_mean@k": 0.1, "k": 2.0},
                                          {"step": 3, "case_mean@k": 0.4, "k": 2.0}])  # fmt: skip
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 4, "cut by a ki')  # a killed run
    curve = eval_curve(tmp_path, config)
    assert curve == [
        {"step": 0, "samples_drawn": 0, "case_mean@k": 0.1, "k": 2.0},
        {"step": 3, "samples_drawn": 80, "case_mean@k": 0.4, "k": 2.0},
    ]
    assert spread([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 2}
    assert spread([]) is None


def test_an_unknown_algorithm_stops_the_comparison(tmp_path):
    with pytest.raises(ValueError, match="--algorithms: unknown 'ppo'"):
        run_comparison(None, ["sdpo", "ppo"], [0], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()


def test_a_bad_config_is_recorded_without_launching(tmp_path):
    spec = RunSpec("sdpo", 0, tmp_path / "sdpo-seed0", ["lr=fast", "algorithm=sdpo"])
    record = execute(spec, None)
    assert record["status"] == "failed" and record["error"].startswith("lr:")
    assert not spec.path.exists()


@pytest.mark.slow
def test_compare_runs_isolates_failures_and_skips_finished_runs(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # The runs are subprocesses: one thread each is faster for a tiny model on a shared CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "env": "toy_envs:ParityEnv",
        "env_args": {"n_train": 8, "n_test": 2}, "batch_size": 2, "inner_updates": 1,
        "max_new_tokens": 8, "eval_samples": 1, "eval_every": 1, "lr": 1e-2, "warmup_steps": 0,
        "progress": False, "generation_dtype": None, "log_samples": 8,
    }))  # fmt: skip
    out = tmp_path / "cmp"
    algorithm_args = parse_algorithm_args(["grpo:rollouts_per_prompt=2", "resd:env=no_such_env"])
    data = run_comparison(
        str(base), ["sdpo", "grpo", "resd"], [0], out, ["steps=2"], algorithm_args
    )

    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"sdpo-seed0", "grpo-seed0", "resd-seed0"}
    failed = runs["resd-seed0"]
    assert failed["status"] == "failed" and failed["returncode"] != 0
    assert "unknown environment 'no_such_env'" in failed["error"]
    assert "no_such_env" in (out / "resd-seed0" / "train.log").read_text()
    sdpo, grpo = runs["sdpo-seed0"], runs["grpo-seed0"]
    assert sdpo["status"] == grpo["status"] == "finished" and not sdpo["skipped"]
    # samples drawn = prompts × rollouts per step, cumulative; evaluations every step
    assert (sdpo["samples_per_step"], grpo["samples_per_step"]) == (2, 4)
    assert [(p["step"], p["samples_drawn"]) for p in sdpo["eval"]] == [(0, 0), (1, 2), (2, 4)]
    assert [(p["step"], p["samples_drawn"]) for p in grpo["eval"]] == [(0, 0), (1, 4), (2, 8)]
    assert (sdpo["samples_drawn"], grpo["samples_drawn"]) == (4, 8)
    assert grpo["final"]["step"] == 2 and grpo["final"]["samples_drawn"] == 8
    assert grpo["config"]["rollouts_per_prompt"] == 2 and grpo["config"]["seed"] == 0
    assert "case_mean@k" in sdpo["final"]

    summary = data["algorithms"]
    assert summary["grpo"]["finished"] == 1 and summary["grpo"]["seeds"] == [0]
    assert summary["grpo"]["samples_drawn"]["mean"] == 8
    final = summary["sdpo"]["final"]["case_mean@k"]
    assert final["n"] == 1 and final["mean"] == sdpo["final"]["case_mean@k"] and final["std"] == 0
    assert [p["step"] for p in summary["sdpo"]["curve"]] == [0, 1, 2]
    assert summary["resd"]["finished"] == 0 and summary["resd"]["failed"] == ["resd-seed0"]
    assert json.loads((out / "comparison.json").read_text())["runs"] == data["runs"]
    if importlib.util.find_spec("matplotlib"):  # plots are optional (resd[report])
        assert (out / "plots" / "compare_eval.png").read_bytes().startswith(b"\x89PNG")
        assert (out / "report.html").exists()

    # Fairness: at a given seed both algorithms train on the same prompts in the same order.
    def prompts(run: str) -> list[str]:
        rows = [json.loads(x) for x in (out / run / "samples.jsonl").read_text().splitlines()]
        return list(dict.fromkeys(r["item"] for r in rows if r["step"] == 1))

    assert prompts("sdpo-seed0") == prompts("grpo-seed0")

    # Re-running skips finished runs untouched (failed ones would be retried; leaving the
    # failing algorithm out saves launching it again).
    metrics = [out / run / "metrics.jsonl" for run in ("sdpo-seed0", "grpo-seed0")]
    mtimes = [m.stat().st_mtime_ns for m in metrics]
    again = run_comparison(
        str(base), ["sdpo", "grpo"], [0], out, ["steps=2"], {"grpo": ["rollouts_per_prompt=2"]},
        plots=False,
    )  # fmt: skip
    runs = {r["name"]: r for r in again["runs"]}
    assert set(runs) == {"sdpo-seed0", "grpo-seed0"}
    assert runs["sdpo-seed0"]["skipped"] and runs["grpo-seed0"]["skipped"]
    assert runs["grpo-seed0"]["eval"] == grpo["eval"] and runs["grpo-seed0"]["status"] == "finished"
    assert [m.stat().st_mtime_ns for m in metrics] == mtimes

    # `resd merge` reads the records alone: a real comparison merged on its own is unchanged
    from resd.analysis.merge import merge_comparisons

    merged = merge_comparisons([out], tmp_path / "merged", plots=False)
    assert merged["runs"] == again["runs"] and merged["algorithms"] == again["algorithms"]


def test_launch_resumes_from_a_checkpoint_or_starts_clean(tmp_path):
    """The command line a run is launched with; `echo` stands in for python."""
    from resd.config import build_config

    spec = RunSpec("sdpo", 0, tmp_path / "run", [])
    cfg = build_config({"algorithm": "sdpo", "output_dir": str(spec.path)})
    spec.path.mkdir()
    write_jsonl(spec.path / "metrics.jsonl", [{"step": 1}])  # died before any checkpoint
    (spec.path / "eval-step-000000.jsonl").write_text("{}\n")
    assert launch(spec, cfg, python="echo") == 0
    log = (spec.path / "train.log").read_text()
    assert "resd.cli train --config" in log and "--resume" not in log
    assert not (spec.path / "metrics.jsonl").exists()  # a fresh start must not append
    assert not list(spec.path.glob("eval-step-*.jsonl"))
    assert yaml.safe_load((spec.path / "compare-config.yaml").read_text()) == cfg.to_dict()

    ckpt = spec.path / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    write_jsonl(spec.path / "metrics.jsonl", [{"step": 1}, {"step": 2}])
    assert launch(spec, cfg, python="echo") == 0
    assert (spec.path / "train.log").read_text().rstrip().endswith("--resume")
    assert (spec.path / "metrics.jsonl").exists()  # the trainer truncates on resume


def _run(algorithm, seed, curve, status="finished"):
    return {"algorithm": algorithm, "seed": seed, "status": status,
            "eval": [{"samples_drawn": n, "case_mean@k": v, "task_mean@k": v / 2} for n, v in curve]}  # fmt: skip


def test_paired_differences_at_equal_samples_by_hand():
    from resd.analysis.compare import bootstrap_ci, format_paired, paired_differences

    runs = [
        _run("resd", 0, [(0, 0.1), (64, 0.5), (128, 0.6)]), _run("sdpo", 0, [(0, 0.1), (64, 0.3), (128, 0.4)]),
        _run("resd", 1, [(0, 0.2), (64, 0.4), (128, 0.7)]), _run("sdpo", 1, [(0, 0.2), (64, 0.2), (128, 0.5)]),
        # GRPO draws 8x per step: it evaluated at 64 and 512 samples; the common point is 64
        _run("grpo", 0, [(0, 0.1), (64, 0.45), (512, 0.9)]), _run("grpo", 1, [(0, 0.2), (64, 0.5), (512, 0.9)]),
        _run("resd", 2, [(0, 0.2), (64, 0.4)], status="failed"), _run("sdpo", 2, [(0, 0.2), (64, 0.3)]),
        _run("resd", 3, [(0, 0.1), (64, 0.6), (128, 0.5)]), _run("sdpo", 3, [(0, 0.1), (64, 0.2), (128, 0.2)]),
        _run("grpo", 3, [(0, 0.1), (64, 0.55), (512, 0.9)]),
    ]  # fmt: skip
    rows = {(r["b"], r["key"]): r for r in paired_differences(runs, "resd")}
    sdpo = rows["sdpo", "case_mean@k"]
    assert sdpo["per_seed"] == pytest.approx({0: 0.2, 1: 0.2, 3: 0.3})
    assert sdpo["samples_drawn"] == {0: 128, 1: 128, 3: 128}
    assert sdpo["missing_seeds"] == [2]  # a failed run is named, not silently left out
    assert sdpo["ci95"][0] == pytest.approx(0.2) and sdpo["distinguishable"]
    grpo = rows["grpo", "case_mean@k"]
    assert grpo["samples_drawn"] == {0: 64, 1: 64, 3: 64}
    assert grpo["per_seed"] == pytest.approx({0: 0.05, 1: -0.1, 3: 0.05})
    assert grpo["ci95"][0] < 0 < grpo["ci95"][1] and not grpo["distinguishable"]
    # Two seeds that agree would "resample" to one point and always read as a difference:
    # no interval, no verdict.
    two = paired_differences([r for r in runs if r["seed"] in (0, 1)], "resd")
    assert all("ci95" not in r and "distinguishable" not in r for r in two)
    assert "too few seeds" in format_paired(two)
    assert rows["sdpo", "task_mean@k"]["per_seed"] == pytest.approx({0: 0.1, 1: 0.1, 3: 0.15})
    lo, hi = bootstrap_ci([0.0, 1.0, 2.0, 3.0])
    assert 0.0 <= lo < 1.5 < hi <= 3.0 and bootstrap_ci([0.0, 1.0, 2.0, 3.0]) == (lo, hi)  # seeded


def test_the_evaluation_before_training_is_never_a_paired_point():
    """GRPO draws twice sdpo's samples per step: at their ends (2 and 4 samples drawn) no
    point is common, and the untrained models at 0 samples must not stand in for one."""
    runs = [run for seed in (0, 1, 2) for run in (_run("sdpo", seed, [(0, 0.1), (2, 0.4)]),
                                                  _run("grpo", seed, [(0, 0.1), (4, 0.2)]))]  # fmt: skip
    rows = paired_differences(runs, "sdpo")
    assert all(r["per_seed"] == {} and r["mean"] is None and "ci95" not in r for r in rows)
    assert all(r["no_common_point"] == r["missing_seeds"] == [0, 1, 2] for r in rows)
    assert "no common point after training" in format_paired(rows)
    assert "not distinguishable" not in format_paired(rows)


def compare_cli(*args: str) -> int:
    return cli_main(["compare", "--algorithms", "sdpo,grpo", "--no-plots", *args])


def test_bad_seeds_name_the_option(tmp_path, capsys):
    assert compare_cli("--seeds", "0,a", "--out", str(tmp_path / "cmp")) == 2
    assert "resd: error: --seeds: expected comma-separated integers, got '0,a'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    ("config", "args", "message"),
    [
        ("steps: [1\n", [], "is not valid YAML"),
        ("stepz: 3\n", [], "sdpo-seed0: stepz: unknown config key"),
        ("steps: 2\n", ["--algorithm-args", "grpo:lr=fast"], "grpo-seed0: lr: expected a number"),
    ],
)
def test_a_bad_config_stops_the_study_before_any_run(
    tmp_path, capsys, monkeypatch, config, args, message
):
    """Every run's resolved config is checked up front: nothing launched, nothing written,
    rather than every run recorded as failed with a log that does not exist."""
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: pytest.fail(f"launched {spec.name}"))
    base = tmp_path / "bad.yaml"
    base.write_text(config)
    out = tmp_path / "cmp"
    assert compare_cli("--config", str(base), "--seeds", "0,1", "--out", str(out), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("resd: error: ") and message in err
    assert not out.exists()


def fake_run(spec: RunSpec, *, finished: bool) -> None:
    """A run directory as an earlier `resd compare` left it: the config `launch` wrote, and
    a summary (finished) or a checkpoint (interrupted)."""
    cfg = load_config(None, spec.overrides)
    spec.path.mkdir(parents=True)
    (spec.path / "compare-config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if finished:
        (spec.path / "summary.json").write_text(json.dumps({"steps": cfg.steps}))
    else:
        (spec.path / "checkpoint-1").mkdir()
        (spec.path / "checkpoint-1" / "state.json").write_text("{}")


def test_a_run_made_with_other_settings_is_not_reused(tmp_path, monkeypatch):
    launched: list[str] = []
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: launched.append(spec.name) or 1)
    out = tmp_path / "cmp"
    grpo_args = {"grpo": ["rollouts_per_prompt=2"]}
    sdpo, grpo = plan_runs(["sdpo", "grpo"], [0], out, ["steps=1"], grpo_args)
    fake_run(sdpo, finished=True)
    fake_run(grpo, finished=False)  # interrupted after its first checkpoint

    # a shared key: sdpo-seed0 made 1 step, the new grpo runs would make 3
    with pytest.raises(ConfigError, match="sdpo-seed0 was made with other settings") as exc:
        run_comparison(None, ["sdpo", "grpo"], [0], out, ["steps=3"], grpo_args, plots=False)
    assert "steps: 1 then, 3 now" in str(exc.value) and "another --out" in str(exc.value)
    # the algorithm's own argument (given under TRL's name): GRPO's rollouts per prompt
    with pytest.raises(ConfigError, match="rollouts_per_prompt: 2 then, 4 now"):
        run_comparison(None, ["sdpo", "grpo"], [0], out, ["steps=1"],
                       {"grpo": ["num_generations=4"]}, plots=False)  # fmt: skip
    # any other setting the runs share, such as the learning rate
    with pytest.raises(ConfigError, match=r"lr: 1e-06 then, 1e-05 now"):
        run_comparison(
            None, ["sdpo", "grpo"], [0], out, ["steps=1", "lr=1e-5"], grpo_args, plots=False
        )
    assert launched == [] and not (out / "comparison.json").exists()  # nothing ran or changed

    # the same settings: the finished run is skipped, the interrupted one resumed
    data = run_comparison(None, ["sdpo", "grpo"], [0], out, ["steps=1"], grpo_args, plots=False)
    assert data["runs"][0]["skipped"] and launched == ["grpo-seed0"]
    # an algorithm argument of the call that made the run, left out now, is still checked
    with pytest.raises(ConfigError, match=r"grpo-seed0 .*rollouts_per_prompt: 2 then, 1 now"):
        run_comparison(None, ["sdpo", "grpo"], [0], out, ["steps=1"], plots=False)
