"""`resd merge`: comparisons whose seeds ran apart (other machines, other sessions) become
one, with the same paired statistics; runs that cannot honestly be pooled are refused."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from resd.analysis.compare import paired_differences
from resd.analysis.merge import MergeError, merge_comparisons, write_curve_plot
from resd.cli import main as cli_main
from resd.rundir import EVAL_KEYS

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
        # bytes, not text: UnicodeDecodeError's words alone, naming no file
        (tmp_path / "bytes", r"bytes.comparison\.json: not valid JSON \('utf-8' codec"),
    ):
        bad.mkdir()
        if bad.name == "junk":
            (bad / "comparison.json").write_text("{cut")
        if bad.name == "bytes":
            (bad / "comparison.json").write_bytes(b"\x10\x80 damaged")
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


def test_refuses_an_out_that_is_one_of_the_sources_and_leaves_it_as_it_was(tmp_path, capsys):
    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", SEED1)
    kept = json.loads((a / "comparison.json").read_text())
    kept.update(overrides=["steps=24"], algorithm_args={"resd": ["lr=5e-5"]})  # only a has them
    (a / "comparison.json").write_text(json.dumps(kept))
    before = (a / "comparison.json").read_bytes()
    (tmp_path / "link").symlink_to(a)
    for out in (a, a / "comparison.json", b / ".." / "a", tmp_path / "link"):
        with pytest.raises(MergeError, match=r"--out .* is where the source .*a/comparison\.json"):
            merge_comparisons([a, b], out, plots=False)
    assert cli_main(["merge", str(a), str(b), "--out", str(a), "--no-plots"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert (a / "comparison.json").read_bytes() == before
    assert [p.name for p in a.iterdir()] == ["comparison.json"]  # no plots, no temporary file


def _without(key: str) -> Callable[[list[dict]], list]:
    """The runs with `key` left out of the last one's record."""
    return lambda runs: [*runs[:-1], {k: v for k, v in runs[-1].items() if k != key}]


def _with(key: str, value: Any) -> Callable[[list[dict]], list]:
    """The runs with the last one's `key` set to `value`."""
    return lambda runs: [*runs[:-1], {**runs[-1], key: value}]


def _null_metric(runs: list[dict]) -> list:
    """The runs with a metric of the last one's last evaluation lost (null)."""
    runs[-1]["eval"][-1]["case_mean@k"] = None
    return runs


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        (lambda runs: [], r"no runs in it"),
        (_without("status"), r"run 2 of 2 \('sdpo-seed1'\) has no 'status'"),
        (_with("seed", None), r"run 2 of 2 \('sdpo-seed1'\) has 'seed' None, not an integer"),
        (lambda runs: [1, 2], r"run 1 of 2 is 1, not a run record"),
        (_with("eval", None), r"run 2 of 2 \('sdpo-seed1'\) has 'eval' None, not a list"),
        (_null_metric, r"run 2 of 2 \('sdpo-seed1'\) has eval point 2 without a number for 'case_mean@k'"),
        (_without("final"), r"run 2 of 2 \('sdpo-seed1'\) is finished but has no 'final'"),
        (_with("config", ["lr=5e-5"]), r"run 2 of 2 \('sdpo-seed1'\) has 'config' of type list"),
        (_with("name", ""), r"run 2 of 2 \(''\) has 'name' '', not a non-empty string"),
        (_with("algorithm", 3), r"run 2 of 2 \('sdpo-seed1'\) has 'algorithm' 3, not a non-empty string"),
        (_without("seed"), r"run 2 of 2 \('sdpo-seed1'\) has no 'seed'"),
        (_without("eval"), r"run 2 of 2 \('sdpo-seed1'\) has no 'eval'"),
        (_with("eval", [1]), r"run 2 of 2 \('sdpo-seed1'\) has eval point 1 that is not an object"),
        (_with("eval", [{"samples_drawn": 0}]), r"run 2 of 2 \('sdpo-seed1'\) has eval point 1 without an integer 'step'"),
        (_with("eval", [{"step": True, "samples_drawn": 0}]), r"run 2 of 2 \('sdpo-seed1'\) has eval point 1 without an integer 'step'"),
        (_with("eval", [{"step": 0}]), r"run 2 of 2 \('sdpo-seed1'\) has eval point 1 without a number for 'samples_drawn'"),
        (_with("eval", [{"step": 0, "samples_drawn": "64"}]), r"run 2 of 2 \('sdpo-seed1'\) has eval point 1 without a number for 'samples_drawn'"),
        (_with("final", [0.5]), r"run 2 of 2 \('sdpo-seed1'\) has 'final' of type list, not an object"),
        (_with("final", {"case_mean@k": "high"}), r"run 2 of 2 \('sdpo-seed1'\) has 'final' 'case_mean@k' 'high', not a number"),
        # a reward function's mean (`rewards/<name>`) is summarized as the accuracies are
        (_with("final", {"rewards/fmt": None}), r"run 2 of 2 \('sdpo-seed1'\) has 'final' 'rewards/fmt' None, not a number"),
        (_without("samples_drawn"), r"run 2 of 2 \('sdpo-seed1'\) is finished but has no number for 'samples_drawn'"),
    ],
    ids=["no-runs", "no-status", "null-seed", "not-records", "null-eval", "null-metric",
         "no-final", "config-list", "empty-name", "int-algorithm", "no-seed", "no-eval",
         "eval-not-object", "eval-no-step", "eval-bool-step", "eval-no-samples",
         "eval-text-samples", "final-list", "final-text-metric", "final-null-reward",
         "no-samples-drawn"],
)  # fmt: skip
def test_a_malformed_record_is_named_with_its_file_and_nothing_is_written(tmp_path, runs, message):
    """Each of these used to end in a traceback, some of them after `--out` was created."""
    a = write(tmp_path / "a", SEED0)
    bad = write(tmp_path / "bad", runs([json.loads(json.dumps(r)) for r in SEED1]))
    for sources in ([a, bad], [bad]):  # alone, `{"runs": []}` was an IndexError
        with pytest.raises(MergeError, match=r"bad/comparison\.json: " + message):
            merge_comparisons(sources, tmp_path / "out", plots=False)
        assert not (tmp_path / "out").exists()


def test_algorithms_requested_must_name_algorithms(tmp_path):
    """A string there would be read letter by letter, each letter an algorithm."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "comparison.json").write_text(
        json.dumps({"algorithms_requested": "resd", "runs": SEED0})
    )
    with pytest.raises(MergeError, match="'algorithms_requested' is not a list"):
        merge_comparisons([tmp_path / "a"], tmp_path / "out", plots=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content", [[SEED0], {"summary": {}}, {"runs": {"resd-seed0": SEED0[0]}}], ids=str
)
def test_a_json_file_that_is_not_a_comparison_is_refused(tmp_path, content):
    """Valid JSON of another shape (a list, an object without `runs`, `runs` not a list)
    was a TypeError or a KeyError instead of a refusal that names the file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "comparison.json").write_text(json.dumps(content))
    with pytest.raises(MergeError, match=r"a/comparison\.json: not a comparison\.json"):
        merge_comparisons([tmp_path / "a"], tmp_path / "out", plots=False)
    with pytest.raises(MergeError, match="nothing to merge"):
        merge_comparisons([], tmp_path / "out", plots=False)
    assert not (tmp_path / "out").exists()


def test_unfinished_runs_neither_block_the_merge_nor_set_the_reference_settings(tmp_path):
    """A run that failed (other settings, no final, no samples count) is kept as it is:
    only finished seeds must agree, and only they say what settings an algorithm ran
    with, so it neither refuses the merge nor shows up in `unshared_overrides`."""
    failed = {**record("resd", 2, [(0, 0.3)], status="failed", lr=1e-4), "final": None}
    del failed["samples_drawn"]
    grpo = record("grpo", 0, [(0, 0.3), (64, 0.3)])
    grpo_failed = record("grpo", 1, [(0, 0.3)], status="failed", steps=6)
    bare = {**record("sdpo", 2, [(0, 0.3), (64, 0.3)]), "config": None}  # an older record
    a = write(tmp_path / "a", [*SEED0, failed, grpo, grpo_failed, bare])
    data = merge_comparisons([a], tmp_path / "all", plots=False)
    runs = {r["name"]: r for r in data["runs"]}
    assert runs["resd-seed2"]["status"] == "failed" and len(runs) == 6
    assert data["unshared_overrides"] == []
    assert data["algorithms"]["resd"]["finished"] == 1
    # a reference whose every run failed has no settings to compare the others with
    only_failed = write(tmp_path / "f", [grpo_failed, *SEED0], algorithms=("grpo", "resd"))
    assert merge_comparisons([only_failed], tmp_path / "g", plots=False)["unshared_overrides"] == []


def test_the_merge_keeps_what_the_sources_say_about_the_study(tmp_path):
    """The reference comes first and once; the sources' base configs and the first
    source's fairness note are carried over; an --out that exists is reused."""
    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", SEED1)
    for path, base in ((a, "configs/house.yaml"), (b, "configs/house_b.yaml")):
        data = json.loads((path / "comparison.json").read_text())
        (path / "comparison.json").write_text(json.dumps({**data, "base_config": base}))
    out = tmp_path / "deep" / "merged"  # parents are made
    data = merge_comparisons([a, b], out, reference="sdpo", plots=False)
    assert data["algorithms_requested"] == ["sdpo", "resd"]
    assert data["base_config"] == ["configs/house.yaml", "configs/house_b.yaml"]
    assert data["fairness"] == "same data"
    again = merge_comparisons([a, b], out, plots=False)  # a second merge into the same --out
    assert again["algorithms_requested"] == ["resd", "sdpo"]
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(MergeError, match=r"--out .*file is a file, not a directory"):
        merge_comparisons([a, b], tmp_path / "file", plots=False)


def test_plots_are_drawn_by_default_and_again_into_the_same_out(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", SEED1)
    plot = tmp_path / "all" / "plots" / "compare_eval.png"
    for _ in range(2):  # the second merge finds plots/ already there
        merge_comparisons([a, b], tmp_path / "all")
        assert plot.read_bytes().startswith(b"\x89PNG")
        assert "compare_eval.png" in (tmp_path / "all" / "report.html").read_text()  # its page
    # nothing to draw (no evaluation metric in any curve): no plot, no error
    assert write_curve_plot(tmp_path / "none.png", {"resd": {"curve": [{"step": 0}]}}) is None
    assert not (tmp_path / "none.png").exists()


def test_cli_notes_the_settings_an_algorithm_differs_in_and_needs_out(tmp_path, capsys):
    a = write(tmp_path / "a", SEED0)
    grpo = write(tmp_path / "grpo", [record("grpo", 0, [(0, 0.3), (64, 0.3)], steps=6)])
    assert cli_main(["merge", str(a), str(grpo), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "paired differences per seed" in printed
    assert "note: grpo:steps=6 differs from the reference resd" in printed
    with pytest.raises(SystemExit):
        cli_main(["merge", str(a)])  # no --out: argparse refuses
    assert "--out" in capsys.readouterr().err


def test_a_run_in_two_sources_is_pooled_once_and_its_final_must_agree(tmp_path):
    """The same finished seed in two sources (a copy kept by both sessions) counts once;
    the same curve with another final result is two outcomes of one run, refused."""
    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", [*SEED0, *SEED1])
    data = merge_comparisons([a, b], tmp_path / "all", plots=False)
    assert [r["name"] for r in data["runs"]] == [r["name"] for r in SEED0 + SEED1]
    assert data["algorithms"]["resd"]["final"]["case_mean@k"]["n"] == 2
    other_final = json.loads(json.dumps(SEED0))
    other_final[0]["final"]["case_mean@k"] = 0.9
    c = write(tmp_path / "c", other_final)
    with pytest.raises(MergeError, match=r"'resd-seed0' finished with different results"):
        merge_comparisons([a, c], tmp_path / "x", plots=False)


def figures_drawn(monkeypatch) -> list:
    """Every matplotlib Figure made from now on, kept for the test to read."""
    matplotlib_figure = pytest.importorskip("matplotlib.figure")
    drawn = []

    class Kept(matplotlib_figure.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn.append(self)

    monkeypatch.setattr(matplotlib_figure, "Figure", Kept)
    return drawn


def test_the_curve_plot_draws_each_algorithm_and_metric_from_the_records(tmp_path, monkeypatch):
    """One panel per evaluation metric, a line per algorithm (mean over seeds against
    samples drawn, labelled with its finished seeds) and its min-max band; an algorithm
    with no finished evaluation is left out rather than drawn empty."""
    drawn = figures_drawn(monkeypatch)
    grpo = record("grpo", 0, [(0, 0.3)], status="failed")
    a, b = write(tmp_path / "a", [*SEED0, grpo]), write(tmp_path / "b", SEED1)
    data = merge_comparisons([a, b], tmp_path / "all")
    (fig,) = drawn
    keys = [k for k in EVAL_KEYS if k in ("case_mean@k", "task_mean@k")]  # the records hold two
    assert [ax.get_title() for ax in fig.axes] == [f"{k} vs samples drawn" for k in keys]
    for ax, key in zip(fig.axes, keys, strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["resd (n=2)", "sdpo (n=2)"]
        curve = data["algorithms"]["resd"]["curve"]
        assert list(lines[0].get_xdata()) == [p["samples_drawn"]["mean"] for p in curve]
        assert list(lines[0].get_ydata()) == [p[key]["mean"] for p in curve]
        assert len(ax.collections) == 2  # the bands
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["resd (n=2)", "sdpo (n=2)"]


def test_merging_keeps_each_reward_functions_mean_and_plots_it(tmp_path, monkeypatch):
    """Records whose evaluations have `rewards/<name>` (a list of reward functions scored
    the replies): the merged summary has each one's final mean over every seed, and the
    curve plot a panel for it after the accuracies. Catches the columns dropped when the
    seeds are pooled, or left out of the figure."""
    drawn = figures_drawn(monkeypatch)

    def with_fmt(run: dict, value: float) -> dict:
        evals = [{**point, "rewards/fmt": value} for point in run["eval"]]
        return {**run, "eval": evals, "final": {**run["final"], "rewards/fmt": value}}

    a = write(tmp_path / "a", [with_fmt(r, 0.25) for r in SEED0])
    b = write(tmp_path / "b", [with_fmt(r, 0.75) for r in SEED1])
    data = merge_comparisons([a, b], tmp_path / "all")
    assert data["algorithms"]["resd"]["final"]["rewards/fmt"]["mean"] == pytest.approx(0.5)
    (fig,) = drawn
    assert [ax.get_title() for ax in fig.axes][-1] == "rewards/fmt vs samples drawn"


def test_a_merged_comparison_without_run_folders_gets_a_report_from_its_records(tmp_path, capsys):
    """`resd merge`'s output holds comparison.json and no run folders, and `resd report`
    refused it ("neither a run directory nor a directory of run directories"). Its page
    comes from the records: the final evaluation per algorithm over the merged seeds, the
    paired differences, every run, and the evaluation curves. Catches a summary taken over
    one source's seeds only, and a malformed record ending in a traceback."""
    pytest.importorskip("matplotlib")
    import re

    from resd.analysis.report import build_report
    from resd.cli import main

    a, b = write(tmp_path / "a", SEED0), write(tmp_path / "b", SEED1)
    out = tmp_path / "all"
    merge_comparisons([a, b], out, plots=False)
    text = build_report(out).read_text()
    assert "<title>resd comparison: all (records)</title>" in text
    rows = [
        r
        for row in re.findall(r"<tr>(.*?)</tr>", text)
        if (r := re.findall(r"<td>(.*?)</td>", row))
    ]
    # resd's final case_mean@k over seeds 0 and 1 (0.5 and 0.45), task_mean@k half of it
    assert rows[:2] == [
        ["resd", "2", "2", "0.2375 [0.225, 0.25]", "", "0.475 [0.45, 0.5]", "", "64 [64, 64]"],
        ["sdpo", "2", "2", "0.15 [0.125, 0.175]", "", "0.3 [0.25, 0.35]", "", "64 [64, 64]"],
    ]
    assert rows[3] == ["resd − sdpo", "case_mean@k", "2", "+0.1750", "",
                       "too few seeds (an interval needs 3)"]  # fmt: skip
    assert [r[:2] + r[6:8] for r in rows[4:]] == [
        ["resd-seed0", "resd", "0.25", "0.5"], ["sdpo-seed0", "sdpo", "0.175", "0.35"],
        ["resd-seed1", "resd", "0.225", "0.45"], ["sdpo-seed1", "sdpo", "0.125", "0.25"],
    ]  # fmt: skip
    assert (out / "plots" / "compare_eval.png").is_file()
    (out / "comparison.json").write_text('{"runs": [{"name": "x"}]}')
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 2
    assert "resd: error: " in capsys.readouterr().err and not (out / "report.html").exists()
