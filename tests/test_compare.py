"""`resd compare`: planning, samples-drawn arithmetic, isolation of a failing run, re-runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
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

    # A finished run's summary damaged (found by probing with the fuzz tool's damages):
    # json's "Expecting value" alone, or a traceback for a list; now the file and the way
    # on, and nothing written. Followed, the way on works: the run resumes and finishes.
    summary = out / "sdpo-seed0" / "summary.json"
    written = (out / "comparison.json").read_bytes()
    for damaged in (b"", b"\x80 not text", b"[1, 2]"):
        summary.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(summary))}: cannot be read \(.+\); "
                           "delete it and run the same command again"):  # fmt: skip
            run_comparison(str(base), ["sdpo"], [0], out, ["steps=2"], plots=False)
        assert (out / "comparison.json").read_bytes() == written
    summary.unlink()
    redone = run_comparison(str(base), ["sdpo"], [0], out, ["steps=2"], plots=False)
    assert (
        redone["runs"][0]["status"] == "finished" and json.loads(summary.read_text())["steps"] == 2
    )


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


def test_an_empty_list_option_is_refused(tmp_path, capsys):
    """`--seeds ,` or `--algorithms ' '` must stop with the option's name, not plan no runs."""
    with pytest.raises(ValueError, match="--seeds: expected a comma-separated list"):
        compare.parse_seeds(" , ")
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--algorithms", ",", "--out", str(out), "--no-plots"]) == 2
    assert "--algorithms: expected a comma-separated list" in capsys.readouterr().err
    assert not out.exists()


def test_repeated_algorithms_and_seeds_run_once(tmp_path, monkeypatch):
    """`--algorithms sdpo,sdpo --seeds 0,0` is one run, not one run counted twice."""
    launched: list[str] = []
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: launched.append(spec.name) or 1)
    data = run_comparison(
        None, ["sdpo", "sdpo"], [0, 0], tmp_path / "cmp", ["steps=1"], plots=False
    )
    assert launched == ["sdpo-seed0"] and [r["name"] for r in data["runs"]] == ["sdpo-seed0"]
    assert data["algorithms_requested"] == ["sdpo"] and data["seeds"] == [0]
    assert data["runs"][0]["skipped"] is False and data["runs"][0]["status"] == "failed"
    assert data["algorithms"]["sdpo"]["runs"] == 1


def test_a_rerun_skips_finished_runs_and_keeps_their_records(tmp_path, monkeypatch):
    """Resuming a finished comparison launches nothing and reads each run from its folder."""
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: pytest.fail(f"launched {spec.name}"))
    out = tmp_path / "cmp"
    specs = plan_runs(["sdpo", "grpo"], [0, 1], out, ["steps=2"], {})
    for spec, value in zip(specs, (0.5, 0.3, 0.7, 0.1), strict=True):
        fake_run(spec, finished=True)
        write_jsonl(spec.path / "metrics.jsonl", [{"step": 1}, {"step": 2}])
        write_jsonl(spec.path / "eval.jsonl", [{"step": 0, "case_mean@k": 0.0},
                                               {"step": 2, "case_mean@k": value}])  # fmt: skip
    data = run_comparison(None, ["sdpo", "grpo"], [0, 1], out, ["steps=2"], plots=False)
    assert [(r["name"], r["status"], r["skipped"]) for r in data["runs"]] == [
        (s.name, "finished", True) for s in specs
    ]
    sdpo = data["algorithms"]["sdpo"]
    assert (sdpo["runs"], sdpo["finished"], sdpo["seeds"]) == (2, 2, [0, 1])
    assert sdpo["final"]["case_mean@k"]["mean"] == pytest.approx(0.6)
    # sdpo's default batch 8 x 1 rollout, two steps
    assert data["runs"][0]["samples_drawn"] == 16 and data["runs"][0]["final"]["step"] == 2
    assert data["runs"][0]["final"]["samples_drawn"] == 16
    # not launched this time: no exit code, no error; the overrides it was planned with
    assert data["runs"][0]["returncode"] is None and data["runs"][0]["error"] is None
    assert data["runs"][0]["overrides"] == specs[0].overrides
    assert data["runs"][0]["dir"] == str(specs[0].path)
    assert (data["runs"][0]["steps"], data["runs"][0]["samples_per_step"]) == (2, 8)
    assert data["runs"][0]["log"] == str(specs[0].path / "train.log")
    assert json.loads((out / "comparison.json").read_text())["algorithms"] == data["algorithms"]
    paired = {r["key"]: r for r in data["paired"]}["case_mean@k"]
    assert paired["per_seed"] == pytest.approx({"0": 0.2, "1": 0.6})  # JSON keys are strings


def test_a_run_that_died_before_its_first_checkpoint_starts_over_with_new_settings(
    tmp_path, monkeypatch, capsys
):
    """Nothing of such a run is reused, so the settings it was started with do not matter."""
    launched: list[str] = []
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: launched.append(spec.name) or 1)
    out = tmp_path / "cmp"
    (old,) = plan_runs(["sdpo"], [0], out, ["steps=1"], {})
    fake_run(old, finished=False)
    for stale in (old.path / "checkpoint-1").iterdir():
        stale.unlink()
    (old.path / "checkpoint-1").rmdir()
    data = run_comparison(None, ["sdpo"], [0], out, ["steps=3"], plots=False)
    assert launched == ["sdpo-seed0"]
    assert "[compare] sdpo-seed0: starting" in capsys.readouterr().out
    assert 0 <= data["runs"][0]["time_s"] < 60  # the time the run took, in seconds


def test_a_failed_run_keeps_the_end_of_its_log(tmp_path, monkeypatch):
    """A crash records the last 20 non-blank log lines (the traceback's end); a run whose
    process exited 0 without a summary (killed) is failed too, not finished."""
    spec = RunSpec("sdpo", 0, tmp_path / "sdpo-seed0", ["algorithm=sdpo"])

    def crash(spec: RunSpec, cfg) -> int:
        spec.path.mkdir(parents=True, exist_ok=True)
        lines = [f"line {i}\n\n" for i in range(30)]
        # a byte that is not UTF-8 (a cut multi-byte character) must not hide the error
        (spec.path / "train.log").write_bytes(b"\xe2\x80\n" + "".join(lines).encode())
        return 3

    monkeypatch.setattr(compare, "launch", crash)
    record = execute(spec, None)
    assert record["status"] == "failed" and record["returncode"] == 3
    assert record["error"] == "\n".join(f"line {i}" for i in range(10, 30))
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: 0)
    record = execute(spec, None)
    assert record["status"] == "failed" and record["returncode"] == 0
    assert record["error"].endswith("line 29")


def _record(algorithm: str, seed: int, status: str, curve: list[tuple[int, int, float]]) -> dict:
    eval_ = [{"step": s, "samples_drawn": n, "case_mean@k": v} for s, n, v in curve]
    final = compare.final_point(eval_)
    return {"name": f"{algorithm}-seed{seed}", "algorithm": algorithm, "seed": seed,
            "status": status, "eval": eval_, "final": final,
            "samples_drawn": curve[-1][1] if curve else 0}  # fmt: skip


def test_summarize_by_hand():
    """Means, population std, ranges and n over finished seeds only; a step only one seed
    evaluated has n = 1; failed and pending runs count as runs, not as results."""
    runs = [
        _record("sdpo", 0, "finished", [(0, 0, 0.0), (1, 8, 0.2), (2, 16, 0.4)]),
        _record("sdpo", 1, "finished", [(0, 0, 0.0), (2, 16, 0.8)]),
        _record("sdpo", 2, "failed", [(0, 0, 0.0), (1, 8, 0.9)]),
        _record("sdpo", 3, "pending", []),
        _record("grpo", 0, "failed", [(0, 0, 0.5)]),
    ]
    out = compare.summarize(runs)
    sdpo = out["sdpo"]
    assert (sdpo["runs"], sdpo["finished"], sdpo["seeds"]) == (4, 2, [0, 1])
    assert sdpo["failed"] == ["sdpo-seed2"]
    assert sdpo["final"]["case_mean@k"] == pytest.approx(
        {"mean": 0.6, "std": 0.2, "min": 0.4, "max": 0.8, "n": 2}
    )
    assert sdpo["final"]["task_mean@k"] is None  # no seed measured it
    assert sdpo["samples_drawn"] == {"mean": 16, "std": 0.0, "min": 16, "max": 16, "n": 2}
    curve = {p["step"]: p for p in sdpo["curve"]}
    assert list(curve) == [0, 1, 2]
    assert curve[1]["case_mean@k"] == {"mean": 0.2, "std": 0.0, "min": 0.2, "max": 0.2, "n": 1}
    assert curve[2]["case_mean@k"]["mean"] == pytest.approx(0.6)
    assert curve[1]["samples_drawn"]["mean"] == 8
    grpo = out["grpo"]
    assert grpo["finished"] == 0 and grpo["final"]["case_mean@k"] is None
    assert grpo["samples_drawn"] is None
    assert grpo["curve"] == [] and grpo["failed"] == ["grpo-seed0"]
    table = compare.format_table(out).splitlines()
    assert len(table) == 3 and table[0].split()[:2] == ["algorithm", "done"]
    assert "0.600 [0.400, 0.800]" in table[1] and " 2/4 " in table[1]
    assert table[2].split() == ["grpo", "0/1", "-", "-", "-", "-", "-"]  # nothing finished


def test_each_reward_functions_final_mean_is_summarized_and_printed_below(tmp_path):
    """Runs whose replies a list of reward functions scored have `rewards/<name>` in each
    evaluation; the comparison carries them from eval.jsonl to each run's curve and final
    point, summarizes them over seeds and prints a second table of them under the
    accuracies. Catches a column dropped on the way (eval.jsonl to curve, curve to final,
    final to summary) and a table that shows another function's number."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "case_mean@k": 0.1, "rewards/fmt": 0.2, "k": 2, "items": 4},
            {"step": 2, "case_mean@k": 0.3, "rewards/fmt": 0.6, "rewards/len": 0.125}]  # fmt: skip
    write_jsonl(run / "eval.jsonl", rows)
    curve = compare.eval_curve(run, {"batch_size": 4, "rollouts_per_prompt": 1})
    assert [p["rewards/fmt"] for p in curve] == [0.2, 0.6] and "rewards/len" not in curve[0]
    final = compare.final_point(curve)
    assert (final["rewards/fmt"], final["rewards/len"]) == (0.6, 0.125)
    runs = [{**_record("sdpo", seed, "finished", [(2, 8, 0.3)]),
             "final": {**final, "rewards/fmt": 0.6 - seed / 10}} for seed in (0, 1)]  # fmt: skip
    runs.append(_record("grpo", 0, "finished", [(2, 8, 0.3)]))  # scored in one piece
    out = compare.summarize(runs)
    assert out["sdpo"]["final"]["rewards/fmt"]["mean"] == pytest.approx(0.55)
    assert (
        out["sdpo"]["final"]["rewards/len"]["n"] == 2 and "rewards/fmt" not in out["grpo"]["final"]
    )
    table = compare.format_table(out).splitlines()
    assert table[3:] == [
        "",
        f"{'algorithm':18s} {'rewards/fmt':>21s} {'rewards/len':>21s}",
        f"{'sdpo':18s} {'0.550 [0.500, 0.600]':>21s} {'0.125 [0.125, 0.125]':>21s}",
        f"{'grpo':18s} {'-':>21s} {'-':>21s}",
    ]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["--algorithms", "sdpo", "grpo"], r"^--algorithms: one comma-separated list, without "
         r"spaces \(--algorithms sdpo,grpo\); 'grpo' was read as a key=value override$"),
        (["--algorithms", "sdpo,grpo", "--seeds", "0", "1,"], r"^--seeds: .* \(--seeds 0,1\); "
         r"'1,' was read"),
    ],
)  # fmt: skip
def test_a_list_typed_with_spaces_is_named_before_any_run(tmp_path, words, message):
    """`--algorithms sdpo grpo`, typed as `--seeds 0 1` might be, left `grpo` among the
    key=value overrides: "sdpo-seed0: grpo: overrides take the form key=value", naming
    neither the option nor the fix. Catches the stray word taken for an override again."""
    from resd.cli import build_parser

    args = build_parser().parse_args(["compare", "--out", str(tmp_path / "out"), *words, "lr=1"])
    with pytest.raises(ValueError, match=message):
        compare.cmd_compare(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("config_file", "text", "message"),
    [
        (None, None, "cannot tell which settings"),  # a summary and nothing saying how
        ("config.yaml", "", "cannot tell which settings"),  # an empty config
        # broken YAML: its problem and where, in one line (yaml's message ran to five, its
        # first the context "while parsing a flow sequence", its last a caret)
        (
            "compare-config.yaml",
            "steps: [1\n",
            r"cannot tell which settings this run was made "
            r"with \(expected ',' or '\]', but got '<stream end>' at line 2, column 1\)",
        ),
    ],
)
def test_a_folder_holding_a_run_of_unknown_settings_is_refused(
    tmp_path, monkeypatch, config_file, text, message
):
    """A finished-looking run with no readable config was skipped as if this command had
    made it, and its figures mixed into the comparison; now the command stops before any
    run, naming the folder."""
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: pytest.fail(f"launched {spec.name}"))
    out = tmp_path / "cmp"
    run = out / "sdpo-seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 1}))
    if config_file:
        (run / config_file).write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        run_comparison(None, ["sdpo"], [0], out, ["steps=1"], plots=False)
    assert "sdpo-seed0" in str(exc.value) and "another --out" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert not (out / "comparison.json").exists()


@pytest.mark.parametrize(("damaged", "held"), [(b"", "nothing"), (b"q7 garbage", "a str")])
def test_a_damaged_run_config_is_named_with_the_way_on(tmp_path, monkeypatch, damaged, held):
    """An emptied or overwritten compare-config.yaml was said to be missing ("no
    compare-config.yaml or config.yaml holding a config"), and the emptied one hid the
    trainer's intact config.yaml. It is named, with what it holds, and the way on: delete
    it, and the run is judged by its config.yaml, which this command's settings match."""
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: pytest.fail(f"launched {spec.name}"))
    out = tmp_path / "cmp"
    run = out / "sdpo-seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"steps": 1}))
    [spec] = compare.plan_runs(["sdpo"], [0], out, ["steps=1"], {})
    intact = yaml.safe_dump(compare.resolve_configs([spec], None)[spec.name].to_dict())
    (run / "config.yaml").write_text(intact)
    (run / "compare-config.yaml").write_bytes(damaged)
    with pytest.raises(ConfigError, match=re.escape(
        f"{run / 'compare-config.yaml'}: cannot tell which settings this run was made with (it "
        f"holds {held}, not the settings); delete it to judge the run by its config.yaml, or use "
        "another --out")):  # fmt: skip
        run_comparison(None, ["sdpo"], [0], out, ["steps=1"], plots=False)
    (run / "compare-config.yaml").unlink()
    assert (
        run_comparison(None, ["sdpo"], [0], out, ["steps=1"], plots=False)["runs"][0]["name"]
        == "sdpo-seed0"
    )


def test_the_command_exits_1_and_names_each_failed_run(tmp_path, monkeypatch, capsys):
    """A study with a failed run must not exit 0: scripts chaining `resd compare` rely on it."""

    def train(spec: RunSpec, cfg) -> int:  # sdpo finishes, grpo crashes
        spec.path.mkdir(parents=True, exist_ok=True)
        if spec.algorithm == "sdpo":
            (spec.path / "summary.json").write_text(json.dumps({"steps": 1}))
            return 0
        (spec.path / "train.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
        return 1

    monkeypatch.setattr(compare, "launch", train)
    out = tmp_path / "cmp"
    assert compare_cli("--seeds", "0", "--out", str(out), "steps=1") == 1
    printed = capsys.readouterr().out
    assert "FAILED grpo-seed0: RuntimeError: CUDA out of memory" in printed
    assert "FAILED sdpo-seed0" not in printed and str(out / "comparison.json") in printed
    # the paired table (sdpo, the first algorithm, minus grpo) is printed, its seed missing
    assert "paired differences per seed" in printed and "sdpo - grpo" in printed


def test_overrides_of_shared_keys_are_flagged_under_any_spelling():
    """`env_args.seed=3` changes env_args and TRL's `max_steps` is `steps`: both change what
    the algorithm is compared on; GRPO's rollouts per prompt (`num_generations`) do not."""
    args = {"grpo": ["num_generations=8", "env_args.seed=3", "max_steps=2", "lr=1e-6"]}
    assert unshared_overrides(args) == ["grpo:env_args.seed=3", "grpo:max_steps=2"]


def test_paired_rows_print_their_numbers():
    rows = [
        {"a": "resd", "b": "sdpo", "key": "case_mean@k", "per_seed": {0: 0.2, 1: 0.2, 2: 0.3},
         "mean": 0.7 / 3, "ci95": [0.2, 0.3], "distinguishable": True},
        {"a": "resd", "b": "grpo", "key": "task_mean@k", "per_seed": {0: -0.1},
         "mean": -0.1, "no_common_point": [1]},
        {"a": "resd", "b": "grpo", "key": "case_mean@k", "per_seed": {0: 0.1, 1: -0.1, 2: 0.0},
         "mean": 0.0, "ci95": [-0.1, 0.1], "distinguishable": False},
        {"a": "resd", "b": "ppo", "key": "case_mean@k", "per_seed": {}, "mean": None},
    ]  # fmt: skip
    lines = format_paired(rows).splitlines()
    assert lines[1].split() == ["resd", "-", "sdpo", "case_mean@k", "3", "+0.233", "[+0.200,",
                                "+0.300]", "distinguishable", "from", "0"]  # fmt: skip
    # one seed paired, another without a common point: more seeds would help
    assert lines[2].split()[4:7] == ["1", "-0.100", "-"] and "too few seeds" in lines[2]
    assert lines[3].endswith("  not distinguishable from 0")
    assert lines[4].split()[4:7] == ["0", "-", "-"]  # no seed paired: no mean, no interval


@pytest.mark.parametrize(
    ("overrides", "algorithm_args", "message"),
    [(["seed=5"], {}, "seed=5: compare sets seed in each run's config, from --seeds"),
     (["steps=1", "output_dir=x"], {}, "output_dir=x: compare sets output_dir in each run's "
                                       "config, from --out"),
     ([], {"grpo": ["lr=1e-6", "seed=3"]}, "grpo:seed=3: compare sets seed"),
     ([], {"sdpo": ["algorithm=grpo"]}, "sdpo:algorithm=grpo: compare sets algorithm in each "
                                        "run's config, from --algorithms")],
)  # fmt: skip
def test_an_override_of_what_compare_sets_per_run_is_refused(overrides, algorithm_args, message):
    """Each run's algorithm, seed and folder are compare's to set, last: `seed=5` (or
    `grpo:seed=3`) lost to them without a word, so the study ran seed 0 as asked for by
    nobody."""
    with pytest.raises(ValueError) as refused:
        plan_runs(["sdpo", "grpo"], [0], Path("out"), overrides, algorithm_args)
    assert str(refused.value).startswith(message)


def test_an_algorithm_override_of_any_shared_setting_is_flagged(tmp_path, monkeypatch, capsys):
    """Changing the model, the data order or the evaluation for one algorithm only is
    allowed but must be noted on screen and in comparison.json."""
    shared = ["model=other", "env=toy", "seed=1", "shuffle=false", "inner_updates=2",
              "eval_every=2", "eval_items=3", "eval_samples=2", "eval_temperature=0.5",
              "eval_top_p=0.9", "eval_max_new_tokens=9", "batch_size=4", "steps=2",
              "env_args.n=1"]  # fmt: skip
    flagged = unshared_overrides({"grpo": [*shared, "lr=1e-6", "rollouts_per_prompt=4"]})
    assert flagged == [f"grpo:{item}" for item in shared]
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: 1)
    data = run_comparison(
        None, ["sdpo", "grpo"], [0], tmp_path / "cmp", ["steps=1"],
        {"grpo": ["eval_samples=2"]}, plots=False,
    )  # fmt: skip
    assert data["unshared_overrides"] == ["grpo:eval_samples=2"]
    # what the study was asked, recorded beside its results
    assert (data["base_config"], data["overrides"]) == (None, ["steps=1"])
    assert data["algorithm_args"] == {"grpo": ["eval_samples=2"]}
    assert "random.Random(seed)" in data["fairness"]
    assert "note: grpo:eval_samples=2 changes data or evaluation" in capsys.readouterr().out


def test_plots_are_made_unless_turned_off(tmp_path, monkeypatch):
    """The report and its plots are on by default in the Python API too; plots=False (the
    command's --no-plots) makes none."""
    drawn: list[Path] = []
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: 1)
    monkeypatch.setattr(compare, "write_plots", lambda out, algorithms: drawn.append(out) or [])
    run_comparison(None, ["sdpo"], [0], tmp_path / "a", ["steps=1"])
    assert drawn == [tmp_path / "a"]
    run_comparison(None, ["sdpo"], [0], tmp_path / "b", ["steps=1"], plots=False)
    assert drawn == [tmp_path / "a"]


def test_a_run_made_by_resd_train_is_checked_against_its_own_config(tmp_path, monkeypatch):
    """A finished run with only the trainer's config.yaml (no compare-config.yaml) is
    compared on that config, not skipped unchecked."""
    monkeypatch.setattr(compare, "launch", lambda spec, cfg: pytest.fail(f"launched {spec.name}"))
    out = tmp_path / "cmp"
    (spec,) = plan_runs(["sdpo"], [0], out, ["steps=1"], {})
    fake_run(spec, finished=True)
    (spec.path / "compare-config.yaml").rename(spec.path / "config.yaml")
    with pytest.raises(ConfigError, match="steps: 1 then, 3 now"):
        run_comparison(None, ["sdpo"], [0], out, ["steps=3"], plots=False)
    data = run_comparison(None, ["sdpo"], [0], out, ["steps=1"], plots=False)
    assert data["runs"][0]["skipped"] and data["runs"][0]["config"]["steps"] == 1


def test_a_run_is_launched_as_resd_train_on_its_resolved_config(tmp_path):
    """The child process is `python -m resd.cli train --config <run>/compare-config.yaml`;
    `echo` stands in for python and writes the arguments it got into train.log."""
    from resd.config import build_config

    spec = RunSpec("sdpo", 0, tmp_path / "run", [])
    cfg = build_config({"algorithm": "sdpo", "output_dir": str(spec.path)})
    assert launch(spec, cfg, python="echo") == 0
    echoed = (spec.path / "train.log").read_text().splitlines()[-1]
    assert echoed == f"-m resd.cli train --config {spec.path / 'compare-config.yaml'}"


def test_a_run_record_reads_its_folder(tmp_path):
    """Before launching, a run is `pending` with nothing drawn; a finished run's step count
    comes from its summary, and its samples drawn from the last step that logged any."""
    spec = RunSpec("sdpo", 0, tmp_path / "sdpo-seed0", [])
    spec.path.mkdir()
    write_jsonl(spec.path / "metrics.jsonl", [{"step": 1}, {"step": 2}])
    pending = compare.run_record(spec, None)
    assert (pending["status"], pending["steps"], pending["samples_drawn"]) == ("pending", 2, 0)
    assert pending["config"] is None and pending["samples_per_step"] is None
    assert pending["eval"] == [] and pending["final"] is None
    empty = compare.run_record(RunSpec("sdpo", 1, tmp_path / "sdpo-seed1", []), None)
    assert (empty["status"], empty["steps"], empty["samples_drawn"]) == ("pending", 0, 0)
    # an evaluation past the logged metrics counts the config's samples per step
    write_jsonl(spec.path / "eval.jsonl", [{"step": 3, "case_mean@k": 0.5, "items": 5}])
    assert eval_curve(spec.path, {"batch_size": 2, "rollouts_per_prompt": 4}) == [
        {"step": 3, "samples_drawn": 24, "case_mean@k": 0.5, "items": 5}
    ]
    # the summary says 3 steps; the metrics of the last step were lost with a kill
    (spec.path / "summary.json").write_text(json.dumps({"steps": 3}))
    record = compare.run_record(spec, {"batch_size": 2, "rollouts_per_prompt": 4})
    assert (record["status"], record["steps"], record["samples_drawn"]) == ("finished", 3, 16)
    assert record["stopped_early"] is None
    (spec.path / "summary.json").write_text(json.dumps({"steps": 3, "stopped_early": "why"}))
    assert compare.run_record(spec, {"batch_size": 2})["stopped_early"] == "why"


def test_the_bootstrap_interval_cuts_each_end_alike():
    """2.5% off each end: the interval of the negated differences is the negated interval
    (the same draws, seeded), and with 40 resamples exactly one mean goes from each end."""
    from resd.analysis.compare import bootstrap_ci

    values = [0.3, -0.1, 0.05, 0.2, 0.0, 0.45, -0.2]
    for resamples in (10_000, 40):
        lo, hi = bootstrap_ci(values, resamples=resamples)
        negated = bootstrap_ci([-v for v in values], resamples=resamples)
        assert negated == pytest.approx((-hi, -lo)) and lo < hi
    assert bootstrap_ci([0.0, 1.0], resamples=40) == (0.0, 1.0)


def test_the_command_exits_0_when_every_run_finishes(tmp_path, monkeypatch, capsys):
    def train(spec: RunSpec, cfg) -> int:
        spec.path.mkdir(parents=True, exist_ok=True)
        (spec.path / "summary.json").write_text(json.dumps({"steps": 1}))
        return 0

    drawn: list[Path] = []
    monkeypatch.setattr(compare, "launch", train)
    monkeypatch.setattr(compare, "write_plots", lambda out, algorithms: drawn.append(out) or [])
    out = tmp_path / "studies" / "cmp"  # parent folders are made
    assert compare_cli("--seeds", "0,1", "--out", str(out), "steps=1") == 0
    assert "FAILED" not in capsys.readouterr().out
    assert drawn == []  # --no-plots
    assert json.loads((out / "comparison.json").read_text())["algorithms"]["sdpo"]["finished"] == 2


def test_the_command_names_each_run_that_stopped_early(tmp_path, monkeypatch, capsys):
    """A run ended by `early_stopping` finished with fewer steps than its peers, and the
    table showed it as done like the others. Catches the record, the summary or the
    printed lines losing which run stopped, at which step and why."""

    def train(spec: RunSpec, cfg) -> int:
        spec.path.mkdir(parents=True, exist_ok=True)
        stopped = "case_mean@k has not improved on 0.5 for 1 evaluation (step 2)"
        early = (spec.algorithm, spec.seed) == ("sdpo", 1)
        summary = {"steps": 2, "stopped_early": stopped} if early else {"steps": 4}
        (spec.path / "summary.json").write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(compare, "launch", train)
    out = tmp_path / "cmp"
    assert compare_cli("--seeds", "0,1", "--out", str(out), "steps=4") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("stopped early")] == [
        "stopped early: sdpo-seed1 at step 2 (case_mean@k has not improved on 0.5 for 1 "
        "evaluation (step 2))"
    ]
    data = json.loads((out / "comparison.json").read_text())
    assert data["algorithms"]["sdpo"]["stopped_early"] == ["sdpo-seed1"]
    assert data["algorithms"]["grpo"]["stopped_early"] == []
    assert [r["name"] for r in data["runs"] if r["stopped_early"]] == ["sdpo-seed1"]


def test_the_command_needs_its_algorithms_and_out(tmp_path, capsys):
    for args in (["--out", str(tmp_path / "cmp")], ["--algorithms", "sdpo"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(["compare", *args])
        assert exc.value.code == 2 and "required" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_one_sample_drawn_is_already_a_trained_point():
    """Only the evaluation before training (0 samples) is left out of the pairing: a run
    of batch 1 × 1 rollout has evaluated a trained model after 1 sample."""
    runs = [_run("resd", 0, [(0, 0.1), (1, 0.5)]), _run("sdpo", 0, [(0, 0.1), (1, 0.3)])]
    row = paired_differences(runs, "resd", keys=("case_mean@k",))[0]
    assert row["per_seed"] == pytest.approx({0: 0.2}) and row["samples_drawn"] == {0: 1}


def test_an_interval_that_touches_0_is_not_a_difference():
    """Three seeds with no difference and one with 0.3: the interval starts at 0 exactly,
    which does not rule out "no difference" (and likewise below 0)."""
    for sign in (1, -1):
        runs = [run for seed, d in enumerate((0.0, 0.0, 0.0, 0.3 * sign))
                for run in (_run("resd", seed, [(8, 0.5 + d)]), _run("sdpo", seed, [(8, 0.5)]))]  # fmt: skip
        row = paired_differences(runs, "resd", keys=("case_mean@k",))[0]
        assert 0.0 in row["ci95"] and row["distinguishable"] is False
