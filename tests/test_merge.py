"""`resd merge`: comparisons whose seeds ran apart (other machines, other sessions) become
one, with the same paired statistics; runs that cannot honestly be pooled are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resd.analysis.compare import paired_differences
from resd.analysis.merge import MergeError, merge_comparisons
from resd.cli import main as cli_main

CONFIG = {"model": "m", "env": "house_rules", "steps": 24, "lr": 5e-5, "eval_every": 8}


def record(algorithm: str, seed: int, curve, *, status="finished", **config) -> dict:
    evals = [{"step": i, "samples_drawn": n, "case_mean@k": v, "task_mean@k": v / 2}
             for i, (n, v) in enumerate(curve)]  # fmt: skip
    return {
        "name": f"{algorithm}-seed{seed}", "algorithm": algorithm, "seed": seed, "status": status,
        "config": {**CONFIG, **config, "seed": seed, "output_dir": f"out/{algorithm}-seed{seed}"},
        "samples_drawn": curve[-1][0], "eval": evals,
        "final": {k: evals[-1][k] for k in ("case_mean@k", "task_mean@k", "step", "samples_drawn")},
    }  # fmt: skip


def write(path: Path, runs: list[dict], algorithms=("resd", "sdpo")) -> Path:
    path.mkdir(parents=True)
    (path / "comparison.json").write_text(json.dumps(
        {"algorithms_requested": list(algorithms), "runs": runs, "fairness": "same data"}))  # fmt: skip
    return path


SEED0 = [record("resd", 0, [(0, 0.3), (64, 0.5)]), record("sdpo", 0, [(0, 0.3), (64, 0.35)])]
SEED1 = [record("resd", 1, [(0, 0.3), (64, 0.45)]), record("sdpo", 1, [(0, 0.3), (64, 0.25)])]


def test_seeds_run_apart_merge_into_one_paired_comparison(tmp_path):
    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", SEED1)
    data = merge_comparisons([a, b / "comparison.json"], tmp_path / "all", plots=False)
    assert [r["name"] for r in data["runs"]] == [
        "resd-seed0",
        "sdpo-seed0",
        "resd-seed1",
        "sdpo-seed1",
    ]
    assert data["seeds"] == [0, 1] and data["sources"][0].endswith("a/comparison.json")
    # the same statistics `resd compare` computes for runs of one call
    assert data["paired"] == json.loads(json.dumps(paired_differences(SEED0 + SEED1, "resd")))
    case = next(r for r in data["paired"] if r["b"] == "sdpo" and r["key"] == "case_mean@k")
    assert case["per_seed"] == pytest.approx({"0": 0.15, "1": 0.2})  # JSON keys are strings
    assert case["samples_drawn"] == {"0": 64, "1": 64} and "ci95" not in case  # 2 seeds
    final = data["algorithms"]["resd"]["final"]["case_mean@k"]
    assert final["n"] == 2 and final["mean"] == pytest.approx(0.475)
    assert json.loads((tmp_path / "all" / "comparison.json").read_text())["runs"] == data["runs"]


def test_a_finished_record_replaces_an_unfinished_one_and_the_reference_can_change(tmp_path):
    cut = record("resd", 1, [(0, 0.3)], status="failed")
    a = write(tmp_path / "a", [*SEED0, cut])  # the session ended during resd-seed1
    b = write(tmp_path / "b", SEED1, algorithms=("sdpo", "resd"))
    data = merge_comparisons([a, b], tmp_path / "all", reference="sdpo", plots=False)
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["resd-seed1"]["status"] == "finished" and len(runs) == 4
    assert data["algorithms_requested"][0] == "sdpo"
    assert {r["a"] for r in data["paired"]} == {"sdpo"}
    # and the other way round: an unfinished record never replaces a finished one
    data = merge_comparisons([b, a], tmp_path / "again", plots=False)
    assert {r["name"]: r["status"] for r in data["runs"]}["resd-seed1"] == "finished"


def test_refuses_to_pool_what_is_not_one_study(tmp_path):
    a = write(tmp_path / "a", SEED0)
    twice = write(tmp_path / "twice", [record("resd", 0, [(0, 0.3), (64, 0.9)])])
    with pytest.raises(MergeError, match=r"resd-seed0.*different results"):
        merge_comparisons([a, twice], tmp_path / "x")
    other_lr = write(tmp_path / "lr", [record("resd", 1, [(0, 0.3), (64, 0.4)], lr=1e-4)])
    with pytest.raises(MergeError, match=r"resd-seed0 and resd-seed1 .*lr: 5e-05 vs 0\.0001"):
        merge_comparisons([a, other_lr], tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written on a refusal
    # a key that does not matter can be named; a key another algorithm differs in is flagged
    data = merge_comparisons(
        [a, other_lr], tmp_path / "ok", ignore_keys=frozenset({"lr"}), plots=False
    )
    assert data["algorithms"]["resd"]["finished"] == 2
    grpo = write(tmp_path / "grpo", [record("grpo", 0, [(0, 0.3), (64, 0.3)], steps=6)])
    data = merge_comparisons([a, grpo], tmp_path / "g", plots=False)
    assert data["unshared_overrides"] == ["grpo:steps=6"]
    for bad, message in (
        (tmp_path / "none", "no comparison.json"),
        (tmp_path / "junk", "not valid JSON"),
    ):
        bad.mkdir()
        if bad.name == "junk":
            (bad / "comparison.json").write_text("{cut")
        with pytest.raises(MergeError, match=message):
            merge_comparisons([a, bad], tmp_path / "x")
    with pytest.raises(MergeError, match="--reference 'ppo'"):
        merge_comparisons([a], tmp_path / "x", reference="ppo")


def test_cli_prints_the_tables_and_exits_2_on_a_refusal(tmp_path, capsys):
    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", SEED1)
    assert cli_main(["merge", str(a), str(b), "--out", str(tmp_path / "all")]) == 0
    printed = capsys.readouterr().out
    assert "resd - sdpo" in printed and "case_mean@k" in printed
    pytest.importorskip("matplotlib")
    assert (tmp_path / "all" / "plots" / "compare_eval.png").read_bytes().startswith(b"\x89PNG")
    assert cli_main(["merge", str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "no comparison.json" in capsys.readouterr().err and not (tmp_path / "y").exists()
