"""`resd report`: built from synthetic run directories, no model involved."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("matplotlib")
from matplotlib.image import imread

from resd.analysis.report import (
    LOSS_COLOURS,
    PlotSink,
    add_report_subcommand,
    build_report,
    group_curve,
    group_runs,
    load_run,
    loss_colour,
    moving_average,
    pick_examples,
    plot_comparison,
    plot_learning_curves,
    plot_playbook,
    plot_step_times,
    run_report,
    table,
    token_html,
    token_samples,
)
from resd.cli import main as cli_main

EVIL = "<script>alert('pwned')</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
TOKEN_BLOCK = re.compile(r'<div class="tokens">(.*?)</div>', re.DOTALL)
PHASE_SECONDS = {"rollout": 2.0, "feedback": 0.5, "reflect": 1.0, "curate": 0.5,
                 "teacher": 0.25, "update": 0.75}  # fmt: skip

# Three distilled samples with known mean token losses (0.9 > 0.5 > 0.1), one that was
# not distilled (no losses) and one whose losses do not match its tokens (both skipped).
TOKEN_SAMPLES = [
    (["<script>", "x", " =", "\n", "1"], [2.0, 0.0, 0.5, 0.5, 1.5]),  # mean 0.9
    (["a", "b", "c", "d"], [0.5, 0.5, 0.5, 0.5]),  # mean 0.5
    (["p", "q"], [0.1, 0.1]),  # mean 0.1
    (["no", "loss"], []),
    (["bad"], [1.0, 2.0]),
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(
    path: Path,
    *,
    algorithm: str = "resd",
    seed: int = 0,
    steps: int = 6,
    batch_size: int = 2,
    rollouts: int = 2,
    offset: float = 0.0,
    playbook: bool = True,
    evals: bool = True,
    samples: bool = True,
    summary: bool = True,
) -> Path:
    """A run directory as `Trainer` writes it; reward at step s is 0.1·s + offset."""
    path.mkdir(parents=True)
    config = {"model": "tiny", "env": "arithmetic", "algorithm": algorithm, "seed": seed,
              "batch_size": batch_size, "rollouts_per_prompt": rollouts, "lr": 1e-6}  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 0.5 / s, "reward": 0.1 * s + offset, "score": 0.15 * s,
               "success_rate": 0.1 * s, "playbook_size": s, "playbook_added": 2,
               "playbook_removed": 1, "reflections": 3, "reflection_parse_failures": 1,
               "curation_parse_failures": 0, "ops_applied": 2, "distilled": 4}  # fmt: skip
        row |= {f"time_{p}": t for p, t in PHASE_SECONDS.items()}
        row["time_step"] = sum(PHASE_SECONDS.values()) + 1.0  # 1 s outside the timed phases
        metrics.append(row)
    write_jsonl(path / "metrics.jsonl", metrics)
    eval_rows = [
        {"step": s, "task_mean@k": 0.05 * s + offset, "task_best@k": 0.1 * s,
         "case_mean@k": 0.1 * s, "case_best@k": 0.15 * s, "k": 4.0, "items": 8.0}
        for s in (0, steps // 2, steps)
    ]  # fmt: skip
    if evals:
        write_jsonl(path / "eval.jsonl", eval_rows)
    if summary:
        summary_data = {"steps": steps, "run_dir": str(path), "last": metrics[-1]}
        if evals:
            summary_data |= {"eval_before": eval_rows[0], "eval_after": eval_rows[-1]}
        (path / "summary.json").write_text(json.dumps(summary_data))
    if samples:
        rows = []
        for i, (tokens, losses) in enumerate(TOKEN_SAMPLES):
            rows.append(
                {"step": i + 1, "item": f"item-{i}", "prompt": f"What is 1? {EVIL}",
                 "response": "".join(tokens), "reward": 1.0 if i == 2 else 0.0,
                 "score": 0.5, "feedback": f"Expected 1. {EVIL}",
                 "reflection": f"Key insight: {EVIL}" if i != 2 else None,
                 "reflection_reply": "{}", "curation_reply": "", "teacher_prompt": f"T {EVIL}",
                 "distilled": bool(losses), "tokens": tokens, "token_losses": losses}
            )  # fmt: skip
        write_jsonl(path / "samples.jsonl", rows)
    if playbook:
        history = [
            {"step": s, "size": 2 * s, "sections": {"strat": s, "err": s, "calc": 0},
             "added": [f"strat-{s:05d}", f"err-{s:05d}"], "removed": ["x"] if s % 2 else []}
            for s in range(1, steps + 1)
        ]  # fmt: skip
        write_jsonl(path / "playbook_history.jsonl", history)
        entries = [
            {"id": f"strat-{i:05d}", "section": "strat", "content": f"lesson {i} {EVIL}",
             "helpful": i, "harmful": 0, "created_step": 1, "last_used_step": i}
            for i in range(1, 20)
        ]  # fmt: skip
        (path / "playbook.json").write_text(json.dumps({"next_id": 20, "entries": entries}))
        (path / "playbook.md").write_text(
            f"## Strategies & Insights\n[strat-00001] helpful=1 harmful=0 :: {EVIL}\n"
        )
    return path


def embedded_pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(text)]


def assert_valid_png(data: bytes) -> None:
    assert data.startswith(PNG_SIGNATURE)
    image = imread(io.BytesIO(data), format="png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "resd-seed0")


def test_run_report_embeds_valid_pngs_also_written_beside_it(run_dir: Path) -> None:
    out = build_report(run_dir)
    assert out == run_dir / "report.html"
    text = out.read_text()
    pngs = embedded_pngs(text)
    assert len(pngs) == 3  # learning curves, step times, playbook
    for data in pngs:
        assert_valid_png(data)
    written = {p.name: p.read_bytes() for p in (run_dir / "plots").glob("*.png")}
    assert set(written) == {"learning_curves.png", "step_times.png", "playbook.png"}
    assert sorted(written.values()) == sorted(pngs)
    assert "Not recorded" not in text


def test_untrusted_text_is_escaped_everywhere(run_dir: Path) -> None:
    text = build_report(run_dir).read_text()
    assert "<script" not in text.lower()  # the report uses no JavaScript at all
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in text
    # in prompts / responses / feedback / reflections, the playbook table and playbook.md
    assert text.count("&lt;script&gt;alert") >= 8


def test_summary_shows_config_eval_before_after_and_phase_means(run_dir: Path) -> None:
    text = build_report(run_dir).read_text()
    assert "before (step 0)" in text and "after (step 6)" in text
    assert "<td>task_mean@k</td><td>0</td><td>0.3</td><td>+0.3</td>" in text
    assert "<td>samples drawn</td><td>24</td>" in text  # 6 steps × 2 prompts × 2 rollouts
    # steps take 6 s: 5 s in the timed phases (2 s of them rollout), 1 s outside them
    assert "<td>rollout</td><td>2</td><td>12</td><td>33.3%</td>" in text
    assert "<td>other</td><td>1</td><td>6</td><td>16.7%</td>" in text
    assert "<td>step (all)</td><td>6</td><td>36</td><td>100%</td>" in text
    assert "<td>reflection_parse_failures</td><td>6</td>" in text
    # top entries by helpful count: the most helpful first
    assert text.index("strat-00019") < text.index("strat-00018") < text.index("strat-00005")


def test_token_view_one_span_per_token_highest_loss_first(run_dir: Path) -> None:
    text = build_report(run_dir).read_text()
    blocks = TOKEN_BLOCK.findall(text)
    assert len(blocks) == 3  # the undistilled and the malformed samples are left out
    spans = [re.findall(r'<span class="tok" style="background:(#[0-9a-f]{6})" '
                        r'title="loss ([0-9.]+)">(.*?)</span>', b, re.DOTALL) for b in blocks]  # fmt: skip
    assert [len(s) for s in spans] == [5, 4, 2]  # ordered by mean loss: 0.9, 0.5, 0.1
    top = spans[0]
    assert [float(loss) for _, loss, _ in top] == [2.0, 0.0, 0.5, 0.5, 1.5]
    assert [tok for _, _, tok in top] == ["&lt;script&gt;", "x", " =", "\n", "1"]
    full, white = "#{:02x}{:02x}{:02x}".format(*LOSS_COLOURS[-1]), "#ffffff"
    assert top[0][0] == full and top[1][0] == white  # max loss: full colour; zero: white
    assert top[4][0] not in (full, white)


def test_missing_optional_files_are_reported_as_not_recorded(tmp_path: Path) -> None:
    run = make_run(tmp_path / "sdpo-seed0", algorithm="sdpo", playbook=False, evals=False,
                   samples=False, summary=False)  # fmt: skip
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.')  # a run still writing its last line
    text = build_report(run).read_text()
    assert text.count("Not recorded") >= 5  # eval table, eval curves, playbook, examples, tokens
    assert "Not recorded: evaluation (no eval.jsonl / summary.json with eval metrics)." in text
    assert "Not recorded: evaluation during training (no eval.jsonl)." in text  # under the curves
    assert "keeps no playbook" in text
    assert "<td>steps run</td><td>6</td>" in text
    assert len(embedded_pngs(text)) == 2  # learning curves and step times still drawn


def test_config_only_run_still_yields_a_report(tmp_path: Path) -> None:
    run = tmp_path / "empty-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "resd"}))
    text = build_report(run).read_text()
    assert embedded_pngs(text) == []
    assert "Not recorded: metrics.jsonl" in text


def test_an_empty_playbook_is_not_called_missing(tmp_path: Path) -> None:
    run = tmp_path / "empty-playbook"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "resd"}))
    (run / "playbook.json").write_text(json.dumps({"entries": []}))
    text = build_report(run).read_text()
    assert "the playbook is empty" in text and "no playbook.json" not in text
    assert "Not recorded: playbook entries (the playbook is empty)." in text  # the whole note


def test_an_environment_given_in_python_is_the_one_the_report_names(tmp_path: Path) -> None:
    run = tmp_path / "given"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "resd", "env": "arithmetic"}))
    (run / "summary.json").write_text(json.dumps({"steps": 0, "env": "mytasks:Capitals"}))
    text = build_report(run).read_text()
    assert "<td>env</td><td>mytasks:Capitals</td>" in text


def colour_present(image, hex_colour: str, tol: float = 0.04) -> bool:
    rgb = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    diff = abs(image[..., :3] - rgb).max(axis=-1)
    return bool((diff < tol).sum() > 20)


def test_comparison_overlays_algorithms_with_seed_spread(tmp_path: Path) -> None:
    root = tmp_path / "cmp"
    make_run(root / "resd-seed0", seed=0, offset=0.0)
    make_run(root / "resd-seed1", seed=1, offset=0.2)
    make_run(root / "sdpo-seed0", algorithm="sdpo", rollouts=1, playbook=False)
    (root / "notes").mkdir()  # not a run directory: ignored
    (root / "comparison.json").write_text(json.dumps({"note": EVIL}))
    out = build_report(root)
    text = out.read_text()
    assert "<script" not in text.lower()
    assert "<td>resd</td><td>2</td>" in text and "<td>sdpo</td><td>1</td>" in text
    assert {p.name for p in (root / "plots").glob("*.png")} == {
        "compare_train.png",
        "compare_eval.png",
    }
    for name in ("compare_train.png", "compare_eval.png"):
        data = (root / "plots" / name).read_bytes()
        assert_valid_png(data)
        image = imread(io.BytesIO(data), format="png")
        assert colour_present(image, "#1f77b4")  # C0: resd
        assert colour_present(image, "#ff7f0e")  # C1: sdpo, in the same figure
    assert len(embedded_pngs(text)) == 2
    assert not (root / "resd-seed0" / "report.html").exists()


def test_group_curve_mean_spread_and_samples_axis(tmp_path: Path) -> None:
    runs = [
        load_run(make_run(tmp_path / "a", seed=0, offset=0.0, steps=4)),
        load_run(make_run(tmp_path / "b", seed=1, offset=0.2, steps=6)),
        load_run(make_run(tmp_path / "c", algorithm="sdpo", rollouts=1, steps=4)),
    ]
    groups = group_runs(runs)
    assert list(groups) == ["resd", "sdpo"]
    band = group_curve("resd", groups["resd"], "reward")
    assert band.x == [1, 2, 3, 4, 5, 6]
    assert band.mean[0] == pytest.approx(0.2) and band.lo[0] == pytest.approx(0.1)
    assert band.hi[0] == pytest.approx(0.3)
    assert band.mean[5] == pytest.approx(0.8)  # only the longer seed reached step 6
    by_samples = group_curve("resd", groups["resd"], "task_mean@k", source="evals", axis="samples")
    assert by_samples.x == [0, 8, 12, 16, 24]  # eval steps × 4 samples per step
    sdpo = group_curve("sdpo", groups["sdpo"], "reward", axis="samples")
    assert sdpo.x == [2, 4, 6, 8]  # 2 prompts × 1 rollout per step


def test_helpers() -> None:
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert loss_colour(0.0, 1.0) == "#ffffff"
    assert loss_colour(5.0, 1.0) == loss_colour(1.0, 1.0) == "#e31a1c"  # clipped
    assert loss_colour(float("nan"), 1.0) == "#ffffff"
    samples = [{"tokens": t, "token_losses": loss} for t, loss in TOKEN_SAMPLES]
    assert [len(s["tokens"]) for s in token_samples(samples, n=2)] == [5, 4]


def test_cli_subcommand_and_errors(tmp_path: Path, run_dir: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="resd")
    add_report_subcommand(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "elsewhere" / "r.html"
    args = parser.parse_args(["report", str(run_dir), "--out", str(out)])
    assert args.fn(args) == 0
    assert out.exists() and (out.parent / "plots" / "learning_curves.png").exists()
    assert not (run_dir / "report.html").exists()

    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        build_report(empty)
    args = parser.parse_args(["report", str(empty)])
    assert args.fn(args) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(run_dir: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match=re.escape("pip install resd[report]")) as raised:
        build_report(run_dir)
    assert str(raised.value) == (
        "resd report needs matplotlib; install it with: pip install resd[report]"
    )


def test_importing_the_module_stays_light() -> None:
    code = "import sys, resd.analysis.report; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_an_out_that_is_a_directory_fails_before_anything_is_written(
    tmp_path: Path, run_dir: Path, capsys
) -> None:
    parser = argparse.ArgumentParser(prog="resd")
    add_report_subcommand(parser.add_subparsers(dest="command", required=True))
    runs = tmp_path / "runs"
    runs.mkdir()
    args = parser.parse_args(["report", str(run_dir), "--out", str(runs)])
    assert args.fn(args) == 2
    assert f"{runs} is a directory" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists() and list(runs.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        build_report(run_dir, tmp_path / "file" / "r.html")


def test_a_config_value_the_report_computes_with_is_checked_up_front(tmp_path: Path) -> None:
    """`batch_size: large` in a foreign run is named with its file; odd values that are
    only shown (a seed) are shown as they are."""
    good = make_run(tmp_path / "cmp" / "good")
    foreign = make_run(tmp_path / "cmp" / "foreign")
    config = yaml.safe_load((foreign / "config.yaml").read_text())
    (foreign / "config.yaml").write_text(yaml.safe_dump({**config, "batch_size": "large"}))
    with pytest.raises(ValueError, match=re.escape(f"{foreign / 'config.yaml'}: batch_size")):
        build_report(tmp_path / "cmp")
    assert not (tmp_path / "cmp" / "plots").exists()
    assert not (tmp_path / "cmp" / "report.html").exists()

    (foreign / "config.yaml").write_text(yaml.safe_dump({**config, "seed": "abc"}))
    text = build_report(tmp_path / "cmp").read_text()
    assert "<td>abc</td>" in text and good.name in text


def test_a_run_without_a_config_is_reported_with_the_trainers_defaults(tmp_path: Path) -> None:
    """metrics.jsonl alone makes a run (config.yaml lost on the way back from the GPU
    machine): it is reported with TrainConfig's batch shape, and its steps are the last
    step logged, not the rows read (a damaged line in the middle is skipped). Catches a
    missing config.yaml read without checking that it exists, or read as None."""
    run = tmp_path / "metrics-only"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "reward": 0.5}\n{"step": 2, "rew\n{"step": 3}\n'
    )
    text = build_report(run).read_text()
    assert "<title>resd report: metrics-only (unknown)</title>" in text
    assert "Not recorded: config.yaml" in text
    assert "<td>steps run</td><td>3</td>" in text
    assert "<td>samples per step</td><td>8</td>" in text  # 8 prompts × 1 rollout
    assert "<td>samples drawn</td><td>24</td>" in text
    assert "Not recorded: phase timings." in text


def test_an_unreadable_config_or_summary_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A config.yaml or summary.json that does not parse reads as empty, so the rest of
    the run is still reported. Catches an invalid config.yaml read as None."""
    run = make_run(tmp_path / "broken", evals=False)
    (run / "config.yaml").write_text("model: [unclosed\n")
    (run / "summary.json").write_text('{"steps": ')
    text = build_report(run).read_text()
    assert "Not recorded: config.yaml" in text
    assert "<td>steps run</td><td>6</td>" in text  # from metrics.jsonl
    assert "not valid YAML" in caplog.text and "not valid JSON" in caplog.text


def test_files_that_are_not_utf8_are_read_with_replacement_characters(tmp_path: Path) -> None:
    """A config, summary or playbook written in Latin-1 by some other tool is shown with
    U+FFFD where a byte is not UTF-8, instead of failing the report."""
    run = make_run(tmp_path / "latin1", evals=False, samples=False)
    (run / "config.yaml").write_bytes(b"algorithm: resd\nmodel: caf\xe9\n")
    (run / "summary.json").write_bytes(b'{"steps": 6, "note": "caf\xe9"}')
    (run / "playbook.md").write_bytes(b"## Strategies & Insights\nna\xefve\n")
    text = build_report(run).read_text()
    assert "<td>model</td><td>caf\ufffd</td>" in text
    assert "na\ufffdve" in text


def test_a_run_with_only_its_summary_reports_its_steps_and_evaluations(tmp_path: Path) -> None:
    """summary.json alone (metrics.jsonl and eval.jsonl not copied back) still gives the
    steps run, the samples drawn and the evaluation before / after."""
    run = tmp_path / "summary-only"
    run.mkdir()
    config = {"algorithm": "resd", "batch_size": 2, "rollouts_per_prompt": 2}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    before = {"task_mean@k": 0.25, "k": 4, "items": 8}  # no step: before training
    after = {"step": 40, "task_mean@k": 0.5, "k": 4, "items": 8}
    summary = {"steps": 40, "eval_before": before, "eval_after": after}
    (run / "summary.json").write_text(json.dumps(summary))
    text = build_report(run).read_text()
    assert "<td>steps run</td><td>40</td>" in text
    assert "<td>samples drawn</td><td>160</td>" in text
    assert "<th>metric</th><th>before (step 0)</th><th>after (step 40)</th><th>change</th>" in text
    assert "<td>task_mean@k</td><td>0.25</td><td>0.5</td><td>+0.25</td>" in text
    assert "<p>k = 4 samples per item, 8 test items.</p>" in text
    assert "stopped early" not in text  # it ran to the end
    summary["stopped_early"] = "case_mean@k reached 1 (target 1) at step 40"
    (run / "summary.json").write_text(json.dumps(summary))
    shorter = build_report(run).read_text()  # a run ended by `Trainer.stop` says why
    assert "<td>stopped early</td><td>case_mean@k reached 1 (target 1) at step 40</td>" in shorter
    missing = re.findall(
        r'<section id="(\w+)"><h2>([^<]*)</h2><p class="missing">([^<]*)</p>', text
    )
    assert missing == [
        ("learning", "2. Learning curves", "Not recorded: metrics.jsonl."),
        ("timing", "3. Step time by phase", "Not recorded: phase timings."),
        ("playbook", "4. Playbook evolution", "Not recorded: playbook history (algorithm "
         "&#x27;resd&#x27; keeps no playbook, or it was not logged)."),
        ("examples", "5. Examples", "Not recorded: samples (no samples.jsonl)."),
        ("tokens", "6. Token-level self-distillation loss",
         "Not recorded: per-token losses of distilled samples."),
    ]  # fmt: skip


def test_the_last_evaluation_is_the_after_and_a_single_one_is_before_only(tmp_path: Path) -> None:
    """Without summary.json the evaluations come from eval.jsonl: the first is "before",
    the last "after". One evaluation (a run stopped before its second) is a "before" with
    no "after" column: comparing it with itself would show a change of +0."""
    run = make_run(tmp_path / "evals", summary=False)
    text = build_report(run).read_text()
    assert "before (step 0)" in text and "after (step 6)" in text
    write_jsonl(run / "eval.jsonl", [{"step": 0, "task_mean@k": 0.25, "k": 4, "items": 8}])
    text = build_report(run).read_text()
    assert "before (step 0)" in text and "<td>task_mean@k</td><td>0.25</td></tr>" in text
    assert "after (" not in text and "<th>change</th>" not in text


def test_a_metric_missing_from_one_evaluation_leaves_its_change_blank(tmp_path: Path) -> None:
    """case_mean@k was evaluated before training but not after: its row shows the value
    it has and no change, instead of failing on None - 0.5."""
    run = make_run(tmp_path / "evals", summary=False)
    write_jsonl(run / "eval.jsonl", [
        {"step": 0, "task_mean@k": 0.25, "case_mean@k": 0.5, "k": 4, "items": 8},
        {"step": 6, "task_mean@k": 0.5, "k": 4, "items": 8},
    ])  # fmt: skip
    text = build_report(run).read_text()
    assert "<tr><td>task_mean@k</td><td>0.25</td><td>0.5</td><td>+0.25</td></tr>" in text
    assert "<tr><td>case_mean@k</td><td>0.5</td><td></td><td></td></tr>" in text


@pytest.mark.parametrize(
    ("key", "value"), [("batch_size", 0), ("rollouts_per_prompt", 0), ("rollouts_per_prompt", 2.5)]
)
def test_a_count_below_one_or_fractional_is_refused(tmp_path: Path, key: str, value: float) -> None:
    """batch_size: 0 would otherwise be replaced by the default 8 without a word, and the
    samples-drawn axis of every plot would be wrong."""
    run = make_run(tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, key: value}))
    with pytest.raises(ValueError, match=re.escape(f"{key}: expected a whole number >= 1")):
        build_report(run)


def test_training_table_compares_the_first_and_last_tenth_of_the_steps(tmp_path: Path) -> None:
    """Each training metric's mean over the first and the last 10% of the steps (2 of 20
    here, at least 1); reward at step s is 0.1·s, score 0.15·s, the loss 0.5/s."""
    text = build_report(make_run(tmp_path / "long", steps=20)).read_text()
    assert "<th>first 2 step(s)</th><th>last 2 step(s)</th>" in text
    assert "<td>reward</td><td>0.15</td><td>1.95</td>" in text
    assert "<td>score</td><td>0.225</td><td>2.925</td>" in text
    assert "<td>success_rate</td><td>0.15</td><td>1.95</td>" in text
    assert "<td>loss</td><td>0.375</td><td>0.02566</td>" in text
    assert "<td>time_step</td><td>6</td><td>6</td>" in text
    short = make_run(tmp_path / "short", steps=6, playbook=False, samples=False)
    text = build_report(short).read_text()  # under 10 steps: the first and the last step
    assert "<th>first 1 step(s)</th><th>last 1 step(s)</th>" in text
    assert "<td>reward</td><td>0.1</td><td>0.6</td>" in text


def test_a_metric_logged_only_in_the_last_steps_still_gets_its_training_row(
    tmp_path: Path,
) -> None:
    """No loss in the first 2 of 20 steps (nothing distilled yet): the loss row stays,
    its "first" cell blank and its "last" the mean of the last 2 steps."""
    run = make_run(tmp_path / "late", steps=20, playbook=False, samples=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows[:2]:
        del row["loss"]
    write_jsonl(run / "metrics.jsonl", rows)
    assert "<td>loss</td><td></td><td>0.02566</td>" in build_report(run).read_text()


def test_the_counter_table_sums_each_counter_and_a_step_without_it_adds_nothing(
    tmp_path: Path,
) -> None:
    """Totals over 6 steps, in the trainer's counter order; step 1 did not log
    "reflections" (3 a step), so it sums to 15, and a counter that is always 0 stays 0."""
    run = make_run(tmp_path / "counted", playbook=False, samples=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    del rows[0]["reflections"]
    write_jsonl(run / "metrics.jsonl", rows)
    text = build_report(run).read_text()
    counters = text[text.index("<th>counter</th>") :]
    counters = counters[: counters.index("</table>")]
    assert re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", counters) == [
        ("distilled", "24"), ("reflections", "15"), ("reflection_parse_failures", "6"),
        ("curation_parse_failures", "0"), ("ops_applied", "12"),
    ]  # fmt: skip


def test_the_training_table_shows_the_response_length_when_it_was_logged(
    tmp_path: Path,
) -> None:
    """response_tokens (10 tokens a step more each step) gets its own row, between the loss
    and the step time; a run without metrics.jsonl says its training table is missing."""
    run = make_run(tmp_path / "lengths", playbook=False, samples=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(run / "metrics.jsonl", [{**r, "response_tokens": 10 * r["step"]} for r in rows])
    text = build_report(run).read_text()
    training = text[text.index("<h3>Training rollouts</h3>") : text.index("<th>counter</th>")]
    keys = re.findall(r"<tr><td>(\w+)</td>", training)
    assert keys == ["reward", "score", "success_rate", "loss", "response_tokens", "time_step"]
    assert "<td>response_tokens</td><td>10</td><td>60</td>" in training
    (run / "metrics.jsonl").unlink()
    text = build_report(run).read_text()
    assert "Not recorded: training metrics (no metrics.jsonl)." in text


def test_comparison_curves_smooth_each_run_over_about_5_percent_of_its_steps(
    tmp_path: Path,
) -> None:
    """With smooth=True each run is a trailing mean over max(1, steps // 20) steps (3 of
    60 here; reward at step s is 0.1·s); without it, and under 40 steps, the values are
    the raw ones."""
    long = load_run(make_run(tmp_path / "long", steps=60, playbook=False, samples=False))
    short = load_run(make_run(tmp_path / "short", steps=10, playbook=False, samples=False))
    smoothed = group_curve("resd", [long], "reward", smooth=True)
    assert smoothed.mean[:3] == pytest.approx([0.1, 0.15, 0.2])  # fewer at the start
    assert smoothed.mean[59] == pytest.approx(5.9)  # mean of steps 58, 59, 60
    assert group_curve("resd", [long], "reward").mean[59] == pytest.approx(6.0)
    raw = group_curve("resd", [short], "reward", smooth=True)
    assert raw.mean == pytest.approx([0.1 * s for s in range(1, 11)])


def test_curves_skip_rows_where_the_metric_is_missing(tmp_path: Path) -> None:
    """A step that logged no value (or null) for a metric, and a row without a step,
    leave no point on its curve rather than breaking the mean over seeds."""
    run = make_run(tmp_path / "gaps", steps=4, playbook=False, samples=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    del rows[1]["reward"]
    rows[2]["reward"] = None
    rows.append({"reward": 0.9})
    write_jsonl(run / "metrics.jsonl", rows)
    band = group_curve("resd", [load_run(run)], "reward")
    assert band.x == [1, 4] and band.mean == pytest.approx([0.1, 0.4])


def test_step_time_table_counts_untimed_phases_as_zero_and_never_a_negative_other(
    tmp_path: Path,
) -> None:
    """A phase a run never timed (GRPO has no reflection) is 0 s, not 1 s; "other" is the
    step time not covered by the phases, 0 when the phases fill it or overrun it, and 0
    for a step that logged no step time."""
    run = tmp_path / "grpo"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algorithm": "grpo"}))
    write_jsonl(
        run / "metrics.jsonl",
        [
            {"step": 1, "reward": 0.5, "time_rollout": 2.0, "time_update": 1.0, "time_step": 3.0},
            {"step": 2, "reward": 0.5, "time_rollout": 2.0, "time_update": 1.0, "time_step": 2.5},
            {"step": 3, "reward": 0.5, "time_rollout": 0.5},
        ],
    )
    text = build_report(run).read_text()
    assert "<th>phase</th><th>mean s / step</th><th>total s</th><th>share</th>" in text
    assert "<td>rollout</td><td>1.5</td><td>4.5</td><td>69.2%</td>" in text
    assert "<td>reflect</td><td>0</td><td>0</td><td>0.0%</td>" in text
    assert "<td>other</td><td>0</td><td>0</td><td>0.0%</td>" in text
    assert "<td>step (all)</td><td>2.167</td><td>6.5</td><td>100%</td>" in text


def test_table_cells_format_numbers_and_show_nothing_for_missing_values() -> None:
    """Whole floats as integers (also past 4 digits), other floats to 4 significant
    digits, a missing value as an empty cell (not "None"), dicts and lists as JSON, and
    every cell escaped."""
    cells = [None, True, 12345.0, 2.0, 0.123456, {"digits": 3}, ["a"], EVIL]
    html_table = table(["h"] * len(cells), [cells])
    found = re.findall(r"<td>(.*?)</td>", html_table)
    assert found == ["", "True", "12345", "2", "0.1235", "{&quot;digits&quot;: 3}",
                     "[&quot;a&quot;]", "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;"]  # fmt: skip


def test_example_texts_and_playbook_md_are_shown_in_full(run_dir: Path) -> None:
    """The prompt, response, feedback and reflection of an example and the final
    playbook.md appear as (escaped) preformatted text, not just their lengths."""
    text = build_report(run_dir).read_text()
    evil = "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;"
    for shown in (f"What is 1? {evil}", f"Expected 1. {evil}", f"Key insight: {evil}"):
        assert f"<pre>{shown}</pre>" in text
    assert (
        f"<pre>## Strategies &amp; Insights\n[strat-00001] helpful=1 harmful=0 :: {evil}\n</pre>"
        in text
    )


def test_the_plot_sink_lists_the_pngs_it_wrote(run_dir: Path) -> None:
    """`PlotSink.written` is how a caller of `run_report` learns which files it added."""
    sink = PlotSink(run_dir / "plots")
    run_report(load_run(run_dir), sink)
    assert [p.name for p in sink.written] == [
        "learning_curves.png",
        "step_times.png",
        "playbook.png",
    ]
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in sink.written)


def test_comparison_tables_show_each_runs_evaluations_and_each_algorithms_spread(
    tmp_path: Path,
) -> None:
    """Per run: eval before / after, and why it stopped early if it did; per algorithm:
    mean [min, max] over its runs of the final evaluation (the "before" of a run evaluated
    once), each reward function's among them, and of the seconds per step, empty where no
    run recorded any."""
    root = tmp_path / "cmp"
    make_run(root / "resd-seed0", seed=0, offset=0.0, playbook=False, samples=False)
    make_run(root / "resd-seed1", seed=1, offset=0.2, playbook=False, samples=False)
    summary = json.loads((root / "resd-seed1" / "summary.json").read_text())
    summary["stopped_early"] = "case_mean@k reached 0.6 (target 0.6) at step 6"
    (root / "resd-seed1" / "summary.json").write_text(json.dumps(summary))
    once = root / "sdpo-seed0"
    once.mkdir()
    (once / "config.yaml").write_text(yaml.safe_dump({"algorithm": "sdpo"}))
    # ... scored by a list of reward functions: their means get columns of their own
    write_jsonl(once / "eval.jsonl", [{"step": 0, "task_mean@k": 0.1, "rewards/fmt": 0.25}])
    text = build_report(root).read_text()
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", text)]
    assert ["resd-seed1", "resd", "1", "6", "24", "0.2", "0.5", "0", "0.6",
            "case_mean@k reached 0.6 (target 0.6) at step 6"] in rows  # fmt: skip
    assert rows[1][0] == "resd-seed0" and rows[1][-1] == ""  # not stopped: an empty cell
    assert ["sdpo-seed0", "sdpo", "?", "0", "0", "0.1", "", "", "", ""] in rows
    assert ["resd", "2", "0.4 [0.3, 0.5]", "0.6 [0.6, 0.6]", "0.6 [0.6, 0.6]",
            "0.9 [0.9, 0.9]", "", "6 [6, 6]"] in rows  # fmt: skip
    assert ["sdpo", "1", "0.1 [0.1, 0.1]", "", "", "", "0.25 [0.25, 0.25]", ""] in rows
    assert "<th>final rewards/fmt</th>" in text


def test_comparison_page_labels_its_tables_sections_and_figures(tmp_path: Path) -> None:
    """Column headers, the sections the navigation links to, each figure's own caption,
    and comparison.json shown (escaped, a byte that is not UTF-8 replaced) under its name."""
    root = tmp_path / "cmp"
    make_run(root / "resd-seed0", steps=2, playbook=False, samples=False)
    (root / "comparison.json").write_bytes(
        json.dumps({"note": EVIL, "by": "caf\xe9"}, ensure_ascii=False).encode("latin-1")
    )
    text = build_report(root).read_text()
    assert "<title>resd comparison: cmp</title>" in text
    heads = [re.findall(r"<th>(.*?)</th>", h) for h in re.findall(r"<thead>(.*?)</thead>", text)]
    assert heads == [
        ["run", "algorithm", "seed", "steps", "samples drawn", "task_mean@k before",
         "task_mean@k after", "case_mean@k before", "case_mean@k after", "stopped early"],
        ["algorithm", "runs", "final task_mean@k", "final task_best@k", "final case_mean@k",
         "final case_best@k", "s / step"],
    ]  # fmt: skip
    links = re.findall(r'<a href="#(\w+)">(.*?)</a>', text)
    assert links == [("summary", "runs"), ("learning", "learning curves"), ("meta", "metadata")]
    assert re.findall(r"<h3>(.*?)</h3>", text) == [
        "Runs",
        "By algorithm: mean [min, max] over runs",
    ]
    sections = re.findall(r'<section id="(\w+)"><h2>(.*?)</h2>', text)
    assert sections == [("summary", "1. Runs"), ("learning", "2. Learning curves"),
                        ("meta", "3. Metadata")]  # fmt: skip
    captions = re.findall(r"<figcaption>(.*?) \(also <code>plots/(.*?)</code>\)", text)
    assert [(c.split(";")[0].split(",")[0], name) for c, name in captions] == [
        ("Training reward and score", "compare_train.png"),
        ("Evaluation metrics", "compare_eval.png"),
    ]
    assert "<summary>comparison.json</summary><pre>{&quot;note&quot;: &quot;&lt;script" in text
    assert "&quot;by&quot;: &quot;caf\ufffd&quot;}</pre>" in text


def continual_folder(root: Path, *, done: int = 2) -> Path:
    """A `resd continual` folder as the command leaves it after `done` of its 2 stages:
    continual.json (in the command's format) and one run folder per finished stage."""
    rows = ["before", "stage-1-arith", "stage-2-rules"][: done + 1]
    acc = [[0.25, None], [0.75, None], [0.5, 0.625]][: done + 1]
    task = [[0.0, None], [0.5, None], [0.25, 0.5]][: done + 1]
    held = [[0.4], [0.375], [0.3]][: done + 1]
    stages = []
    for k, (name, env) in enumerate((("arith", "arithmetic"), ("rules", "house_rules"))[:done]):
        run = make_run(root / f"stage-{k + 1}-{name}", steps=4, offset=0.1 * k, samples=False)
        summary = json.loads((run / "summary.json").read_text())
        # the recorded folder is relative to where the command ran, not to the report
        stages.append({"name": name, "env": env, "dir": f"elsewhere/stage-{k + 1}-{name}",
                       "model_in": "base-model" if k == 0 else "stage-1/checkpoint-4",
                       "summary": summary})  # fmt: skip
    forgetting = 0.25 if done == 2 else None
    result = {
        "stages": stages, "accuracy_key": "case_mean@k", "rows": rows,
        "tasks": ["arith", "rules"], "heldout": ["ifeval"],
        "metrics": {
            "case_mean@k": {"forgetting": forgetting, "backward_transfer": -forgetting if done == 2 else None,
                            "heldout_change": {"ifeval": held[-1][0] - held[0][0]}},
            "task_mean@k": {"forgetting": None, "backward_transfer": None, "heldout_change": {}},
        },
        "accuracy": acc, "heldout_accuracy": held, "accuracy_task": task,
        "heldout_accuracy_task": held, "evaluations": [],
    }  # fmt: skip
    (root / "continual.json").write_text(json.dumps(result))
    (root / "continual-config.yaml").write_text("model: base-model\nstages: []\n")
    return root


def test_a_continual_folder_gets_its_matrix_forgetting_and_stages(tmp_path: Path) -> None:
    """`resd report` on a `resd continual` folder drew the comparison page, whose "by
    algorithm" row averaged stage 1 (one task) with stage 2 (another) as if they were
    seeds. Its page shows the accuracy matrix (rows: before and after each stage; a task
    not yet trained has an empty cell), forgetting, backward transfer and the held-out
    change, each stage's run (found beside continual.json, wherever the command ran), the
    figure, and the files. Catches a matrix cell put in another row or column, a metric
    shown under the other matrix, and a stage read from the folder recorded elsewhere."""
    root = continual_folder(tmp_path / "cont")
    text = build_report(root).read_text()
    assert "<title>resd continual: cont</title>" in text and "By algorithm" not in text
    assert "2 of 2 stages done" in text
    rows = [
        r
        for row in re.findall(r"<tr>(.*?)</tr>", text)
        if (r := re.findall(r"<td>(.*?)</td>", row))
    ]
    heads = [re.findall(r"<th>(.*?)</th>", h) for h in re.findall(r"<thead>(.*?)</thead>", text)]
    assert heads[0] == ["after", "arith", "rules", "held-out: ifeval"] == heads[1]
    assert rows[:3] == [["before", "0.25", "", "0.4"], ["stage-1-arith", "0.75", "", "0.375"],
                        ["stage-2-rules", "0.5", "0.625", "0.3"]]  # fmt: skip
    assert rows[3:6] == [["before", "0", "", "0.4"], ["stage-1-arith", "0.5", "", "0.375"],
                         ["stage-2-rules", "0.25", "0.5", "0.3"]]  # fmt: skip
    assert heads[2] == ["metric", "case_mean@k", "task_mean@k"]
    assert rows[6:9] == [["forgetting", "+0.2500", "n/a"], ["backward transfer", "-0.2500", "n/a"],
                         ["held-out ifeval: last row − before", "-0.1000", "n/a"]]  # fmt: skip
    # each stage's own run: reward at its first and last step (0.1·s + offset), its eval
    stage_rows = rows[9:]
    assert [r[:4] for r in stage_rows] == [["arith", "arithmetic", "4", "base-model"],
                                           ["rules", "house_rules", "4", "stage-1/checkpoint-4"]]  # fmt: skip
    assert [r[4:8] for r in stage_rows] == [["0.1", "0.4", "0", "0.4"],
                                            ["0.2", "0.5", "0", "0.4"]]  # fmt: skip
    assert len(embedded_pngs(text)) == 1 and (root / "plots" / "continual_accuracy.png").is_file()
    assert "<summary>continual-config.yaml</summary><pre>model: base-model" in text


def test_a_continual_run_in_progress_or_a_broken_record_is_said_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After its first stage a continual run has one row and no forgetting yet: the page
    says how far it got and n/a, not a number. A continual.json that is cut off, or not
    the command's, is one error line and exit status 2, and no page is written."""
    root = continual_folder(tmp_path / "cont", done=1)
    text = build_report(root).read_text()
    assert "1 of 2 stages done" in text
    rows = [
        r
        for row in re.findall(r"<tr>(.*?)</tr>", text)
        if (r := re.findall(r"<td>(.*?)</td>", row))
    ]
    assert ["forgetting", "n/a", "n/a"] in rows and ["stage-2-rules"] not in [r[:1] for r in rows]
    for content, message in (
        ('{"rows": [', "is not valid JSON"),
        ('{"runs": []}', "has no 'rows'"),
    ):
        (root / "continual.json").write_text(content)
        (root / "report.html").unlink(missing_ok=True)
        assert cli_main(["report", str(root)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("resd: error: report: ") and message in err, err
        assert not (root / "report.html").exists()


def test_a_serve_folder_gets_its_versions_counts_and_learner_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resd report` on a `resd serve --output-dir` drew a comparison page of one run named
    "learner", and said nothing of what was served. Its page starts with the database's
    counts and every version registered (the starting model, each step the guard let
    through, with the guard metric it was served at), then the learner's run report.
    Catches a count or a version's cells read from another column, and a folder whose
    resd.db is not a database ending in a traceback."""
    pytest.importorskip("sqlalchemy")
    from resd.serve.store import Store, sqlite_url

    root = tmp_path / "serve"
    make_run(root / "learner", steps=2, samples=False)
    store = Store(sqlite_url(root / "resd.db"))
    store.add_version("base", parent=None, step=0, accuracy=0.25, note="loaded from tiny")
    store.add_version("tiny@step2", parent="base", step=2, accuracy=0.5, note="trained on 4 rows")
    for i in range(3):
        store.record_interaction(
            completion_id=f"chatcmpl-{i}", model_version="base", model_name="tiny",
            messages=[{"role": "user", "content": "hi"}], params={}, response="yes",
            prompt_token_ids=[1], response_token_ids=[2], response_logprobs=None,
            finish_reason="stop",
        )  # fmt: skip
    store.record_feedback("chatcmpl-0", source="user", reward=0.0, score=None, feedback="no")
    store.mark_consumed([1], 2)
    store.close()
    text = build_report(root).read_text()
    assert "<title>resd serve: serve</title>" in text and "By algorithm" not in text
    rows = [
        r
        for row in re.findall(r"<tr>(.*?)</tr>", text)
        if (r := re.findall(r"<td>(.*?)</td>", row))
    ]
    assert rows[:4] == [["completions served", "3"], ["feedback rows", "1"],
                        ["feedback rows trained on", "1"], ["versions registered", "2"]]  # fmt: skip
    assert [r[:5] for r in rows[4:6]] == [["base", "", "0", "0.25", "loaded from tiny"],
                                          ["tiny@step2", "base", "2", "0.5", "trained on 4 rows"]]  # fmt: skip
    assert re.findall(r"<h2>(.*?)</h2>", text)[:2] == ["Serving", "1. Run summary"]
    (root / "resd.db").write_text("not a database")
    (root / "report.html").unlink()
    assert cli_main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"resd: error: report: {root / 'resd.db'} is not a resd serve database")
    # one line: SQLAlchemy's "(Background on this error at: ...)" came on a second
    assert err.count("\n") == 1 and "(DatabaseError: file is not a database)" in err, err
    assert not (root / "report.html").exists()
    # an emptied database, or another program's: the report wrote resd's tables into it
    # (`fuzz_combinations.py serve`); it reads, and refuses what holds none of them
    import sqlite3

    (root / "resd.db").write_bytes(b"")
    assert cli_main(["report", str(root)]) == 2
    assert "holds no resd serve tables" in capsys.readouterr().err
    assert (root / "resd.db").read_bytes() == b""
    (root / "resd.db").unlink()
    with sqlite3.connect(root / "resd.db") as theirs:
        theirs.execute("CREATE TABLE notes (text TEXT)")
    theirs.close()
    before = (root / "resd.db").read_bytes()
    assert cli_main(["report", str(root)]) == 2
    assert "holds no resd serve tables" in capsys.readouterr().err
    assert (root / "resd.db").read_bytes() == before
    assert sorted(p.name for p in root.glob("resd.db*")) == ["resd.db"]


def test_a_comparisons_curves_show_each_reward_function(tmp_path: Path) -> None:
    """Runs scored by a list of reward functions log `rewards/<name>` per step and per
    evaluation: the comparison's figures get a row for each (3.4 inches, 340 pixels, a
    row), beside reward and score and the four accuracies. Catches them left out."""
    root = tmp_path / "cmp"
    for seed in (0, 1):
        run = make_run(root / f"sdpo-seed{seed}", algorithm="sdpo", seed=seed, steps=4,
                       playbook=False, samples=False)  # fmt: skip
        for name in ("metrics.jsonl", "eval.jsonl"):
            rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
            write_jsonl(run / name, [{**row, "rewards/fmt": 0.5} for row in rows])
    build_report(root)
    heights = {name: imread(root / "plots" / f"{name}.png").shape[0]
               for name in ("compare_train", "compare_eval")}  # fmt: skip
    assert heights == {"compare_train": 3 * 340, "compare_eval": 5 * 340}


def test_a_comparison_without_curves_or_metadata_says_so(tmp_path: Path) -> None:
    """Runs that logged no training metrics and no evaluation, in a directory without
    comparison.json, give a page that names each missing part instead of empty figures."""
    root = tmp_path / "cmp"
    for name in ("resd-seed0", "sdpo-seed0"):
        (root / name).mkdir(parents=True)
        (root / name / "config.yaml").write_text(yaml.safe_dump({"algorithm": name[:4]}))
    text = build_report(root).read_text()
    assert embedded_pngs(text) == []
    assert "Not recorded: training metrics." in text
    assert "Not recorded: evaluation (no eval.jsonl in any run)." in text
    assert "Not recorded: comparison.json." in text


def test_comparison_plots_smoothed_training_reward_and_score_and_raw_evaluations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the two comparison figures are drawn from: the training reward and score,
    each run smoothed, and every evaluation metric unsmoothed (evaluations are few and
    already averages). The real plotting runs; the calls are only recorded."""
    from resd.analysis.report import comparison_page

    calls: list[tuple[tuple[str, ...], str, bool]] = []
    real = comparison_page.plot_comparison

    def recording(groups, keys, *, source, smooth):
        calls.append((tuple(keys), source, smooth))
        return real(groups, keys, source=source, smooth=smooth)

    monkeypatch.setattr(comparison_page, "plot_comparison", recording)
    make_run(tmp_path / "cmp" / "resd-seed0", steps=2, playbook=False, samples=False)
    build_report(tmp_path / "cmp")
    assert calls == [
        (("reward", "score"), "metrics", True),
        (("task_mean@k", "task_best@k", "case_mean@k", "case_best@k"), "evals", False),
    ]


def test_the_command_names_a_bad_path_or_plots_folder_and_prints_where_the_report_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resd report` answers a path that is a file, and a `plots` beside --out that is a
    file, with one line naming it (exit 2, nothing written); otherwise it creates the
    folders --out needs (even for a run with no figures) and prints the report's path."""
    parser = argparse.ArgumentParser(prog="resd")
    report = add_report_subcommand(parser.add_subparsers(dest="command", required=True))
    assert report.prog == "resd report"

    def run(*argv: str) -> int:
        args = parser.parse_args(["report", *argv])
        return args.fn(args)

    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    assert run(str(a_file)) == 2
    assert capsys.readouterr().err == f"resd: error: report: {a_file} is not a directory\n"
    assert run(str(tmp_path / "no-such-run")) == 2  # a typo: was "is not a directory" too
    assert (
        capsys.readouterr().err
        == f"resd: error: report: no such folder {tmp_path / 'no-such-run'}\n"
    )

    run_dir = tmp_path / "config-only"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"algorithm": "resd"}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plots").write_text("")
    assert run(str(run_dir), "--out", str(tmp_path / "out" / "r.html")) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"resd: error: report: {tmp_path / 'out' / 'plots'} (where the PNGs go) is not a directory\n"
    )
    assert not (tmp_path / "out" / "r.html").exists()
    assert run(str(run_dir), "--out", str(tmp_path / "out")) == 2
    assert capsys.readouterr().err.startswith(
        f"resd: error: report: {tmp_path / 'out'} is a directory"
    )

    nested = tmp_path / "a" / "b" / "r.html"  # no figures: nothing else creates a/b
    assert run(str(run_dir), "--out", str(nested)) == 0
    assert capsys.readouterr().out == f"report: {nested}\n"
    assert nested.read_text().startswith("<!DOCTYPE html>")


def test_the_configuration_table_lists_the_highlighted_settings_in_order(tmp_path: Path) -> None:
    """The settings that tell runs apart are rows of the summary, in this order; any
    other key is only in the collapsed config.yaml below it, which keeps the file's order."""
    shown = ["algorithm", "model", "env", "env_args", "seed", "steps", "batch_size",
             "rollouts_per_prompt", "inner_updates", "lr", "alpha", "topk", "teacher",
             "teacher_update_rate", "max_new_tokens", "playbook_max_entries", "playbook_policy",
             "eval_samples", "eval_items"]  # fmt: skip
    config = {key: f"value-{key}" for key in reversed(shown)}
    config |= {"batch_size": 2, "rollouts_per_prompt": 3, "micro_batch_size": 4}
    run = tmp_path / "configured"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    text = build_report(run).read_text()
    table_html = text[text.index("<h3>Configuration</h3>") : text.index("<details")]
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", table_html)
    assert "<th>setting</th><th>value</th>" in table_html
    assert [key for key, _ in rows] == [*shown, "steps run", "samples per step", "samples drawn"]
    assert rows[0] == ("algorithm", "value-algorithm") and rows[-2] == ("samples per step", "6")
    assert "micro_batch_size" not in table_html and "micro_batch_size: 4" in text
    full = text[text.index("<summary>full config.yaml</summary>") :]
    assert full.index("eval_items: value-eval_items") < full.index("algorithm: value-algorithm")


def test_the_configuration_shows_the_env_of_config_yaml_when_the_summary_names_none(
    tmp_path: Path,
) -> None:
    """config.yaml's env is shown while summary.json names none (the summary's own env
    replacing it is tested above, with a run from Python)."""
    run = make_run(tmp_path / "envs", playbook=False, samples=False)
    assert "<tr><td>env</td><td>arithmetic</td></tr>" in build_report(run).read_text()


def test_token_losses_that_are_all_nan_are_shown_uncoloured(tmp_path: Path) -> None:
    """A sample whose token losses are all NaN (an overflow in the loss) is still shown,
    every token white, on a scale that ends at 1."""
    run = make_run(tmp_path / "nan", samples=False, playbook=False)
    nan = float("nan")
    row = {"step": 1, "prompt": "p", "distilled": True, "tokens": ["a", "b"],
           "token_losses": [nan, nan]}  # fmt: skip
    (run / "samples.jsonl").write_text(json.dumps(row) + "\n")
    text = build_report(run).read_text()
    (block,) = TOKEN_BLOCK.findall(text)
    assert re.findall(r"background:(#[0-9a-f]{6})", block) == ["#ffffff", "#ffffff"]
    tokens = text[text.index('<section id="tokens">') :]
    assert "<details><summary>prompt (1 chars)</summary><pre>p</pre></details>" in tokens
    assert "≥ 1 (hover a token for its loss)" in text


def test_the_run_page_links_each_of_its_six_sections(run_dir: Path) -> None:
    """The navigation bar names the six sections and each link has its section."""
    text = build_report(run_dir).read_text()
    links = re.findall(r'<a href="#(\w+)">(.*?)</a>', text)
    assert links == [("summary", "summary"), ("learning", "learning curves"),
                     ("timing", "step time"), ("playbook", "playbook"),
                     ("examples", "examples"), ("tokens", "token losses")]  # fmt: skip
    sections = re.findall(r'<section id="(\w+)"><h2>(.*?)</h2>', text)
    assert sections == [("summary", "1. Run summary"), ("learning", "2. Learning curves"),
                        ("timing", "3. Step time by phase"), ("playbook", "4. Playbook evolution"),
                        ("examples", "5. Examples"),
                        ("tokens", "6. Token-level self-distillation loss")]  # fmt: skip
    assert f"<title>resd report: {run_dir.name} (resd)</title>" in text


def test_the_run_page_labels_its_tables_and_subsections(run_dir: Path) -> None:
    """The column headers of every table, the sub-headings and the figure captions, top to
    bottom, as the reader sees them. Catches a header or heading left empty (e.g. the "id" column of
    the top entries, the "Training rollouts" heading)."""
    text = build_report(run_dir).read_text()
    heads = [re.findall(r"<th>(.*?)</th>", h) for h in re.findall(r"<thead>(.*?)</thead>", text)]
    assert heads == [
        ["setting", "value"],
        ["metric", "before (step 0)", "after (step 6)", "change"],
        ["metric", "first 1 step(s)", "last 1 step(s)"],
        ["counter", "total over the run"],
        ["phase", "mean s / step", "total s", "share"],
        ["id", "section", "helpful", "harmful", "created", "last used", "content"],
    ]
    h3 = re.findall(r"<h3>(.*?)</h3>", text)
    assert h3[:5] == ["Configuration", "Evaluation before / after", "Training rollouts",
                      "Top 15 of 19 entries by helpful count", "Final playbook"]  # fmt: skip
    assert [h.split(" · ")[0] for h in h3[5:]] == ["step 1", "step 2", "step 3"]  # token samples
    captions = re.findall(r"<figcaption>(.*?) \(also <code>plots/(.*?)</code>\)", text)
    assert [(c.split(",")[0], name) for c, name in captions] == [
        ("Training rollouts per step (faint: raw; solid: moving average)", "learning_curves.png"),
        ("Seconds per step", "step_times.png"),
        (
            "Playbook entries per section; entries added and rewritten (+) or removed (−).",
            "playbook.png",
        ),
    ]


TEXT_ELEMENT = re.compile(
    r"<(style|title|h1|h2|h3|p|pre|td|th|summary|figcaption|a|span)\b[^>]*>.*?</\1>", re.DOTALL
)


def stray_text(html: str) -> str:
    """What a reader sees of `html` outside its headings, paragraphs, table cells,
    summaries, captions, links, token spans and preformatted blocks: nothing, on a
    well-built page."""
    return re.sub(r"<[^>]+>", "", TEXT_ELEMENT.sub("", html)).strip()


def test_the_run_page_shows_no_text_outside_its_blocks_and_names_the_run_directory(
    run_dir: Path,
) -> None:
    """Every word on the page is in a heading, paragraph, table, summary, caption or
    <pre>, and the page opens with the run directory. Catches a stray string glued to
    the markup (mutants put one before the "Evaluation before / after" heading and the
    "Final playbook" heading) and a lost run-directory line."""
    text = build_report(run_dir).read_text()
    assert stray_text(text) == ""
    assert f"</nav><p>Run directory: <code>{run_dir}</code></p><section " in text


def test_the_final_playbook_comes_from_playbook_md_else_from_playbook_json(tmp_path: Path) -> None:
    """playbook.md is shown (opened) as written; without it the playbook.json is rendered,
    or named as unreadable; with neither (only the history) both the entries and the
    final playbook say so."""
    run = make_run(tmp_path / "pb", evals=False, samples=False)
    (run / "playbook.md").unlink()
    text = build_report(run).read_text()
    assert "<details open><summary>playbook.md</summary><pre>## Strategies &amp; Insights\n" in text
    assert "[strat-00019] helpful=19 harmful=0 :: lesson 19 &lt;script&gt;" in text
    (run / "playbook.json").write_text(json.dumps({"entries": [{"id": "x", "bogus": 1}]}))
    text = build_report(run).read_text()
    assert "Not recorded: final playbook (playbook.json unreadable: " in text
    (run / "playbook.json").unlink()
    text = build_report(run).read_text()
    assert "Not recorded: playbook entries (no playbook.json)." in text
    assert "Not recorded: final playbook (no playbook.md)." in text
    assert len(embedded_pngs(text)) == 3  # the history is still plotted


def test_a_playbook_without_its_history_says_so_and_still_lists_its_entries(
    tmp_path: Path,
) -> None:
    """playbook.json and playbook.md without playbook_history.jsonl: no figure, a note
    naming the missing file, and the entries and final playbook shown below it."""
    run = make_run(tmp_path / "no-history", evals=False, samples=False)
    (run / "playbook_history.jsonl").unlink()
    text = build_report(run).read_text()
    playbook = text[text.index('<section id="playbook">') : text.index('<section id="examples">')]
    assert playbook.startswith(
        '<section id="playbook"><h2>4. Playbook evolution</h2><p class="missing">Not recorded: '
        "playbook history (no playbook_history.jsonl).</p><h3>Top 15 of 19 entries"
    )
    assert "<h3>Final playbook</h3>" in playbook and "<figure>" not in playbook


def test_examples_are_shown_in_step_order_even_when_the_success_came_first() -> None:
    """The latest success (step 2) is picked after the late reflected failure (step 3),
    yet shown before it: the examples read in step order. Catches a sort key that
    no longer is the step."""
    samples = [{"step": 1, "reward": 0.0, "reflection": "r1"}, {"step": 2, "reward": 1.0},
               {"step": 3, "reward": 0.0, "reflection": "r3"}, {"step": 4, "reward": 0.0}]  # fmt: skip
    assert [s["step"] for s in pick_examples(samples)] == [1, 2, 3]


def test_an_example_that_logged_no_step_is_shown_as_step_0_first() -> None:
    """A sample without a step (a hand-written or older log) sorts as step 0, before the
    step-1 failure that was picked ahead of it. Catches a missing step taken as step 1,
    which kept the pick order instead."""
    failure = {"step": 1, "reward": 0.0, "reflection": "r1"}
    success = {"reward": 1.0}
    assert pick_examples([failure, success]) == [success, failure]


def test_a_failure_with_some_reward_is_not_the_latest_success() -> None:
    """Partial credit below SUCCESS_REWARD (0.25 here) is a failure: the latest success
    is step 2, not the partly rewarded step 4. Catches a success test that took any
    non-zero reward as a success."""
    samples = [{"step": 1, "reward": 0.25, "reflection": "r1"}, {"step": 2, "reward": 1.0},
               {"step": 3, "reward": 0.25, "reflection": "r3"}, {"step": 4, "reward": 0.25}]  # fmt: skip
    assert [s["step"] for s in pick_examples(samples)] == [1, 2, 3]


def test_examples_are_an_early_and_a_late_reflected_failure_and_the_latest_success(
    tmp_path: Path,
) -> None:
    """Three samples, in step order (a reward of 0.5 is a success, even with a reflection),
    each with every field under its label (the response,
    feedback and reflection opened, the rest collapsed; an empty one said to be empty),
    and only the first example opened."""
    run = make_run(tmp_path / "ex", samples=False, playbook=False)
    fields = {"prompt": "P", "response": "R", "feedback": "F", "reflection_reply": "{}",
              "curation_reply": "[]", "teacher_prompt": "T"}  # fmt: skip
    plan = [(1, 0.0, "r1"), (2, 0.0, "r2"), (3, 1.0, None), (4, 0.0, "r4"), (5, 0.5, "r5"),
            (6, 0.0, None)]  # fmt: skip
    rows = [{"step": s, "item": f"i{s}", "reward": r, "score": r, "reflection": ref, **fields}
            for s, r, ref in plan]  # fmt: skip
    rows[3]["curation_reply"] = ""  # step 4: the curator was not asked
    write_jsonl(run / "samples.jsonl", rows)
    text = build_report(run).read_text()
    examples = text[text.index('<section id="examples">') : text.index('<section id="tokens">')]
    titles = re.findall(r"<details( open)?><summary>(step .*?)</summary>", examples)
    assert titles == [(" open", "step 1 · item i1 · reward 0 · score 0"),
                      ("", "step 4 · item i4 · reward 0 · score 0"),
                      ("", "step 5 · item i5 · reward 0.5 · score 0.5")]  # fmt: skip
    first = examples[: examples.index("step 4 · item")]
    parts = re.findall(
        r'<details( open)?><summary>([^<]*?)</summary><pre>|<p class="empty">(.*?)</p>', first
    )
    assert parts == [("", "prompt (1 chars)", ""), (" open", "response (1 chars)", ""),
                     (" open", "environment feedback (1 chars)", ""),
                     (" open", "reflection (parsed) (2 chars)", ""),
                     ("", "reflector&#x27;s raw reply (2 chars)", ""),
                     ("", "curator&#x27;s raw reply (2 chars)", ""),
                     ("", "teacher prompt (privileged context) (1 chars)", "")]  # fmt: skip
    second = examples[examples.index("step 4 · item") : examples.index("step 5 · item")]
    assert '<p class="empty">curator&#x27;s raw reply: (empty)</p>' in second


def test_token_colours_follow_the_white_yellow_orange_red_scale() -> None:
    """The colour of a loss on a scale to `vmax`: white at 0, then the three colours at
    1/3, 2/3 and all of it, blended in between (pinned, as a reader compares colours)."""
    assert [loss_colour(v, 3.0) for v in (0.0, 1.0, 2.0, 3.0)] == [
        "#ffffff", "#ffeda0", "#fd8d3c", "#e31a1c"
    ]  # fmt: skip
    assert loss_colour(1.5, 3.0) == "#febd6e"  # halfway from yellow to orange


def test_an_infinite_token_loss_gets_the_full_colour_not_white(tmp_path: Path) -> None:
    """A token whose loss overflowed to infinity is where the teacher disagrees most: it
    gets the top of the scale (it was white, like a loss of 0). NaN stays white."""
    assert loss_colour(float("inf"), 1.0) == "#e31a1c"
    assert loss_colour(float("-inf"), 1.0) == loss_colour(float("nan"), 1.0) == "#ffffff"
    run = make_run(tmp_path / "inf", samples=False, playbook=False)
    row = {"step": 1, "prompt": "p", "distilled": True, "tokens": ["a", "b"],
           "token_losses": [float("inf"), 1.0]}  # fmt: skip
    (run / "samples.jsonl").write_text(json.dumps(row) + "\n")
    (block,) = TOKEN_BLOCK.findall(build_report(run).read_text())
    assert re.findall(r"background:(#[0-9a-f]{6})", block) == ["#e31a1c", "#e31a1c"]


def test_the_colour_scale_ends_at_the_99th_percentile_and_never_at_zero(tmp_path: Path) -> None:
    """One outlier among 200 tokens does not wash out the others: the scale ends at the
    99th percentile of the losses shown (1 here), and all-zero losses get a scale to 1."""
    run = make_run(tmp_path / "scale", samples=False, playbook=False)
    outlier = {"step": 1, "prompt": "p", "distilled": True, "tokens": ["t"] * 201,
               "token_losses": [1.0] * 200 + [100.0]}  # fmt: skip
    zeros = {"step": 2, "prompt": "p", "distilled": True, "tokens": ["z"], "token_losses": [0.0]}
    write_jsonl(run / "samples.jsonl", [outlier])
    text = build_report(run).read_text()
    assert "≥ 1 (hover a token for its loss)" in text
    gradient = "linear-gradient(to right, #ffffff, #fff2b8, #febd6e, #f67034, #e31a1c)"
    assert f'<span class="scale" style="background:{gradient}"></span>' in text
    (block,) = TOKEN_BLOCK.findall(text)
    assert set(re.findall(r"background:(#[0-9a-f]{6})", block)) == {"#e31a1c"}
    write_jsonl(run / "samples.jsonl", [zeros])
    assert "≥ 1 (hover a token for its loss)" in build_report(run).read_text()


def test_token_losses_below_one_get_a_scale_ending_at_their_99th_percentile(
    tmp_path: Path,
) -> None:
    """Losses under 1 (the usual case) are not drawn pale against a fixed scale to 1: the
    scale ends at their 99th percentile (0.4 of 0.1, 0.2, 0.4), so the worst is full red."""
    run = make_run(tmp_path / "low", samples=False, playbook=False)
    sample = {"step": 1, "prompt": "p", "distilled": True, "tokens": ["a", "b", "c"],
              "token_losses": [0.1, 0.2, 0.4]}  # fmt: skip
    write_jsonl(run / "samples.jsonl", [sample])
    text = build_report(run).read_text()
    assert "≥ 0.4 (hover a token for its loss)" in text
    (block,) = TOKEN_BLOCK.findall(text)
    assert re.findall(r"background:(#[0-9a-f]{6})", block)[-1] == "#e31a1c"


def test_a_zero_scale_colours_white_and_tokens_must_match_their_losses() -> None:
    """A scale that ends at 0 colours every loss white instead of dividing by zero; one
    loss per token, a missing one is an error rather than a silently dropped token."""
    assert loss_colour(0.5, 0.0) == loss_colour(0.0, 0.0) == "#ffffff"
    assert token_html(["a", "b"], [0.0, 1.0], 1.0).count('<span class="tok"') == 2
    with pytest.raises(ValueError):
        token_html(["a", "b"], [0.0], 1.0)


def test_the_token_section_shows_the_three_samples_of_highest_mean_loss(
    tmp_path: Path,
) -> None:
    """Four distilled samples with token losses: the page shows three, highest mean loss
    first, and leaves out the lowest (step 3)."""
    run = make_run(tmp_path / "four", samples=False, playbook=False)
    means = {1: 0.9, 2: 0.5, 3: 0.1, 4: 0.3}
    write_jsonl(run / "samples.jsonl", [
        {"step": s, "prompt": "p", "distilled": True, "tokens": ["t"], "token_losses": [m]}
        for s, m in means.items()
    ])  # fmt: skip
    text = build_report(run).read_text()
    tokens = text[text.index('<section id="tokens">') :]
    heads = re.findall(r"<h3>step (\d) · .*? · mean token loss (.*?)</h3>", tokens)
    assert heads == [("1", "0.9000"), ("2", "0.5000"), ("4", "0.3000")]
    assert len(TOKEN_BLOCK.findall(tokens)) == 3


def test_an_entry_without_a_helpful_count_ranks_as_helpful_0(tmp_path: Path) -> None:
    """Entry a has no helpful count: it ranks below b (helpful 1) and ties with c (helpful
    0, equally harmless), the tie going to the id. Catches a missing count taken as 1."""
    run = make_run(tmp_path / "counts", evals=False, samples=False)
    entries = [{"id": "c", "section": "strat", "content": "C", "helpful": 0, "harmful": 0},
               {"id": "a", "section": "strat", "content": "A", "harmful": 0},
               {"id": "b", "section": "strat", "content": "B", "helpful": 1, "harmful": 0}]  # fmt: skip
    (run / "playbook.json").write_text(json.dumps({"entries": entries}))
    text = build_report(run).read_text()
    top = text[text.index("<h3>Top 3") : text.index("<h3>Final playbook")]
    assert re.findall(r"<tr><td>(\w)</td>", top) == ["b", "a", "c"]


def test_playbook_entries_are_ranked_by_helpful_then_least_harmful(tmp_path: Path) -> None:
    """The top-entries table: most helpful first, ties to the less harmful one, then by
    id; a missing count ranks as 0; each row shows the section's heading and the lesson."""
    run = make_run(tmp_path / "ranked", evals=False, samples=False)

    def entry(id_: str, helpful: int | None, harmful: int) -> dict:
        return {"id": id_, "section": id_[:-6], "content": f"lesson {id_}", "helpful": helpful,
                "harmful": harmful, "created_step": 1, "last_used_step": 4}  # fmt: skip

    entries = [entry("strat-00000", 2, 1), entry("strat-00002", 2, 0), entry("err-00004", None, 0),
               entry("strat-00001", 2, 0), entry("err-00005", 5, 3)]  # fmt: skip
    (run / "playbook.json").write_text(json.dumps({"entries": entries}))
    text = build_report(run).read_text()
    assert "<h3>Top 5 of 5 entries by helpful count</h3>" in text
    top = text[text.index("<h3>Top 5") : text.index("<h3>Final playbook")]
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(<td>.*?)</tr>", top)]
    assert [r[0] for r in rows] == ["err-00005", "strat-00001", "strat-00002", "strat-00000",
                                    "err-00004"]  # fmt: skip
    assert rows[0] == [
        "err-00005",
        "Common Mistakes to Avoid",
        "5",
        "3",
        "1",
        "4",
        "lesson err-00005",
    ]
    assert rows[1][1] == "Strategies &amp; Insights"


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures the report draws, kept as they are turned into PNGs (they
    are still drawn and encoded), so a test can read the data handed to matplotlib."""
    from resd.analysis.report import plots

    figures: list = []
    real = plots._png

    def keep(fig) -> bytes:
        figures.append(fig)
        return real(fig)

    monkeypatch.setattr(plots, "_png", keep)
    return figures


def titled_axes(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def test_learning_curves_plot_raw_and_smoothed_rollouts_the_loss_and_evaluations(
    tmp_path: Path, drawn: list
) -> None:
    """40 steps: each training metric raw and as its trailing mean over 2 steps, the loss
    per step, and each evaluation metric at the evaluated steps, all against the step."""
    plot_learning_curves(load_run(make_run(tmp_path / "r", steps=40, playbook=False,
                                           samples=False)))  # fmt: skip
    (fig,) = drawn
    axes = titled_axes(fig)
    assert list(axes) == ["training rollouts", "self-distillation loss", "evaluation (k = 4)"]
    assert all(ax.get_xlabel() == "step" for ax in axes.values())
    rates = (axes["training rollouts"], axes["evaluation (k = 4)"])
    assert all(ax.get_ylim() == (-0.02, 1.02) for ax in rates)  # rates: the full 0..1
    steps = [float(s) for s in range(1, 41)]
    train = {line.get_label(): line for line in axes["training rollouts"].get_lines()}
    assert [label for label in train if not label.startswith("_")] == [
        "reward (avg 2)", "score (avg 2)", "success_rate (avg 2)"
    ]  # fmt: skip
    smooth = train["reward (avg 2)"]
    assert list(smooth.get_xdata()) == steps
    assert list(smooth.get_ydata()) == pytest.approx([0.1] + [0.1 * s - 0.05 for s in steps[1:]])
    raw = [line for label, line in train.items() if label.startswith("_")]
    assert list(raw[0].get_ydata()) == pytest.approx([0.1 * s for s in steps])
    (loss,) = axes["self-distillation loss"].get_lines()
    assert list(loss.get_ydata()) == pytest.approx([0.5 / s for s in steps])
    evals = {line.get_label(): line for line in axes["evaluation (k = 4)"].get_lines()}
    assert list(evals) == ["task_mean@k", "task_best@k", "case_mean@k", "case_best@k"]
    assert list(evals["task_mean@k"].get_xdata()) == [0, 20, 40]
    assert list(evals["task_mean@k"].get_ydata()) == pytest.approx([0.0, 1.0, 2.0])


def test_each_learning_curve_has_a_top_axis_of_the_samples_drawn(
    tmp_path: Path, drawn: list
) -> None:
    """Above each panel a second x axis, "samples drawn", spans the panel's steps times
    the samples per step (2 prompts × 2 rollouts = 4). Catches a top axis that is
    missing, unlabelled, or that adds the samples per step instead of multiplying."""
    run = load_run(make_run(tmp_path / "r", steps=6, playbook=False, samples=False))
    plot_learning_curves(run)
    (fig,) = drawn
    panels = titled_axes(fig)
    assert len(panels) == 3
    for ax in panels.values():
        (top,) = ax.child_axes
        assert top.get_xlabel() == "samples drawn"
        low, high = ax.get_xlim()
        assert top.get_xlim() == pytest.approx((4 * low, 4 * high))


def test_step_times_are_stacked_bars_per_phase(tmp_path: Path, drawn: list) -> None:
    """One bar series per phase and "other", each stacked on the phases before it."""
    run = make_run(tmp_path / "r", steps=3, playbook=False, samples=False, evals=False)
    plot_step_times(load_run(run))
    (fig,) = drawn
    ax = titled_axes(fig)["seconds per step, by phase"]
    bars = {c.get_label(): c for c in ax.containers}
    assert list(bars) == ["rollout", "feedback", "reflect", "curate", "teacher", "update", "other"]
    assert [(p.get_y(), p.get_height()) for p in bars["rollout"]] == [(0.0, 2.0)] * 3
    assert [p.get_x() + p.get_width() / 2 for p in bars["other"]] == [1.0, 2.0, 3.0]
    assert [p.get_y() for p in bars["feedback"]] == [2.0, 2.0, 2.0]
    assert [(p.get_y(), p.get_height()) for p in bars["other"]] == [(5.0, 1.0)] * 3


def test_playbook_plot_stacks_the_used_sections_and_shows_additions_rewrites_and_removals(
    tmp_path: Path, drawn: list
) -> None:
    """Sections with entries, known ones under their heading in the playbook's order and
    one the trainer did not know under its slug; entries added up, those rewritten
    stacked on them, removed ones down. Catches a history's rewritten entries not drawn,
    or drawn over the added ones instead of on top of them."""
    run = make_run(tmp_path / "r", steps=3, evals=False, samples=False)
    rows = [json.loads(line) for line in (run / "playbook_history.jsonl").read_text().splitlines()]
    rows[2]["sections"]["extra"] = 4
    rows[1]["updated"] = ["strat-00001", "err-00001", "err-00002"]
    write_jsonl(run / "playbook_history.jsonl", rows)
    plot_playbook(load_run(run))
    (fig,) = drawn
    axes = titled_axes(fig)
    areas = axes["playbook entries per section"].collections
    assert [a.get_label() for a in areas] == [
        "Strategies & Insights", "Common Mistakes to Avoid", "extra"
    ]  # fmt: skip
    bars = {c.get_label(): c for c in axes["entries added (+) / removed (−) per step"].containers}
    assert [(p.get_x() + p.get_width() / 2, p.get_height()) for p in bars["added"]] == [
        (1.0, 2), (2.0, 2), (3.0, 2)
    ]  # fmt: skip
    assert [p.get_height() for p in bars["removed"]] == [-1, 0, -1]
    assert [(p.get_y(), p.get_height()) for p in bars["rewritten"]] == [(2, 0), (2, 3), (2, 0)]


def test_comparison_plot_draws_each_algorithms_mean_and_a_band_over_several_seeds(
    tmp_path: Path, drawn: list
) -> None:
    """Per metric, against step and against samples drawn: a line per algorithm (its
    mean over seeds, n in the label) and a min/max band where it has several seeds."""
    runs = [load_run(make_run(tmp_path / "a", seed=0, steps=3, playbook=False, samples=False)),
            load_run(make_run(tmp_path / "b", seed=1, offset=0.2, steps=3, playbook=False,
                              samples=False)),
            load_run(make_run(tmp_path / "c", algorithm="sdpo", rollouts=1, steps=3,
                              playbook=False, samples=False))]  # fmt: skip
    plot_comparison(group_runs(runs), ("reward",), source="metrics", smooth=False)
    (fig,) = drawn
    axes = titled_axes(fig)
    assert list(axes) == ["reward vs step", "reward vs samples drawn"]
    for title, xs in (("reward vs step", [1, 2, 3]), ("reward vs samples drawn", [4, 8, 12])):
        lines = {line.get_label(): line for line in axes[title].get_lines()}
        assert list(lines) == ["resd (n=2)", "sdpo (n=1)"]
        assert [t.get_text() for t in axes[title].get_legend().get_texts()] == list(lines)
        assert list(lines["resd (n=2)"].get_xdata()) == xs
        assert list(lines["resd (n=2)"].get_ydata()) == pytest.approx([0.2, 0.3, 0.4])
        (band,) = axes[title].collections  # resd only: one seed has no spread
        ys = band.get_paths()[0].vertices[:, 1]
        assert (ys.min(), ys.max()) == pytest.approx((0.1, 0.5))


def test_a_short_run_marks_each_training_point_without_smoothing(
    tmp_path: Path, drawn: list
) -> None:
    """Under 40 steps there is nothing to smooth: each training metric is one line of its
    raw values, a dot at each step, under its plain name. The loss is dotted under 50
    steps only. Catches those lines not drawn (the panel was left empty for any run
    shorter than 40 steps) and dots on a loss of 50 steps."""
    run = load_run(make_run(tmp_path / "r", steps=3, playbook=False, samples=False))
    plot_learning_curves(run)
    plot_learning_curves(load_run(make_run(tmp_path / "50", steps=50, playbook=False,
                                           samples=False)))  # fmt: skip
    short, long = (titled_axes(fig) for fig in drawn)
    lines = short["training rollouts"].get_lines()
    assert [line.get_label() for line in lines] == ["reward", "score", "success_rate"]
    assert all(line.get_marker() == "." for line in lines)
    assert list(lines[0].get_xdata()) == [1.0, 2.0, 3.0]
    assert list(lines[0].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    (loss,) = short["self-distillation loss"].get_lines()
    (long_loss,) = long["self-distillation loss"].get_lines()
    assert (loss.get_marker(), long_loss.get_marker()) == (".", "None")


def test_each_figure_has_its_size_panels_axis_labels_and_legends(
    tmp_path: Path, drawn: list
) -> None:
    """The size (inches), the panels and what each axis is labelled, per figure: a panel
    each, 5 in wide, for the learning curves (the evaluation panel only with eval.jsonl);
    one wide panel of step times; two panels for the playbook; two per metric compared.
    The PNGs are rendered at 100 dpi whatever the local matplotlib settings. Catches
    extra empty panels, a changed figure size or DPI, a wrong axis label and a legend
    left out."""
    full = load_run(make_run(tmp_path / "full", steps=3))
    no_evals = load_run(make_run(tmp_path / "no-evals", steps=3, evals=False, samples=False))
    plot_learning_curves(full)
    plot_learning_curves(no_evals)
    step_times = plot_step_times(full)
    plot_playbook(full)
    plot_comparison(group_runs([full]), ("reward", "score"), source="metrics", smooth=False)
    shapes = [(tuple(fig.get_size_inches()), len(fig.axes)) for fig in drawn]
    assert shapes == [((15.0, 4.0), 3), ((10.0, 4.0), 2), ((10.0, 4.0), 1), ((12.0, 4.0), 2),
                      ((12.0, 6.8), 4)]  # fmt: skip
    assert imread(io.BytesIO(step_times), format="png").shape[:2] == (400, 1000)  # 100 dpi
    labels = [
        {title: (ax.get_xlabel(), ax.get_ylabel()) for title, ax in titled_axes(fig).items()}
        for fig in drawn
    ]
    assert labels[0] == {"training rollouts": ("step", ""), "self-distillation loss": ("step", ""),
                         "evaluation (k = 4)": ("step", "")}  # fmt: skip
    assert labels[2] == {"seconds per step, by phase": ("step", "seconds")}
    assert labels[3] == {"playbook entries per section": ("step", "entries"),
                         "entries added (+) / removed (−) per step": ("step", "")}  # fmt: skip
    assert labels[4] == {"reward vs step": ("step", ""),
                         "reward vs samples drawn": ("samples drawn", ""),
                         "score vs step": ("step", ""),
                         "score vs samples drawn": ("samples drawn", "")}  # fmt: skip
    legends = [
        {title: [t.get_text() for t in ax.get_legend().get_texts()]
         for title, ax in titled_axes(fig).items() if ax.get_legend()}
        for fig in drawn[:4]
    ]  # fmt: skip
    assert legends[0] == {"training rollouts": ["reward", "score", "success_rate"],
                          "evaluation (k = 4)": ["task_mean@k", "task_best@k", "case_mean@k",
                                                 "case_best@k"]}  # fmt: skip
    assert legends[2] == {"seconds per step, by phase": ["rollout", "feedback", "reflect", "curate",
                                                         "teacher", "update", "other"]}  # fmt: skip
    assert legends[3] == {"playbook entries per section": ["Strategies & Insights",
                                                           "Common Mistakes to Avoid"],
                          "entries added (+) / removed (−) per step": ["added", "removed"]}  # fmt: skip


def test_bars_are_one_step_wide_without_edges_at_the_logged_steps(
    tmp_path: Path, drawn: list
) -> None:
    """Step-time and playbook bars sit at the step each row logged (a resumed run starts at
    step 11; a metrics row without a step stands at its row number, a history row without
    one at 0), one step wide and without edges, so neighbours touch and do not overlap;
    prunings hang below a black line at 0. Catches bars placed by row number instead of
    the logged step, wider bars, drawn edges, a lost zero line, and a one-step run whose
    timings were looked for in a second row."""
    run = make_run(tmp_path / "r", steps=3, evals=False, samples=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{**r, "step": r["step"] + 10} for r in rows]
    del rows[2]["step"]  # a row that logged no step stands at its row number
    write_jsonl(run / "metrics.jsonl", rows)
    history = [
        json.loads(line) for line in (run / "playbook_history.jsonl").read_text().splitlines()
    ]
    del history[0]["step"]
    write_jsonl(run / "playbook_history.jsonl", history)
    loaded = load_run(run)
    plot_step_times(loaded)
    plot_playbook(loaded)
    times, playbook = (titled_axes(fig) for fig in drawn)
    patches = [p for ax in (*times.values(), *playbook.values()) for c in ax.containers for p in c]
    assert all(p.get_width() == 1.0 and p.get_linewidth() == 0 for p in patches)
    (rollout, *_) = times["seconds per step, by phase"].containers
    assert [p.get_x() + p.get_width() / 2 for p in rollout] == [11.0, 12.0, 3.0]
    changes = playbook["entries added (+) / removed (−) per step"]
    assert [p.get_x() + p.get_width() / 2 for p in changes.containers[0]] == [0.0, 2.0, 3.0]
    (zero,) = changes.get_lines()
    assert list(zero.get_ydata()) == [0, 0] and zero.get_color() == "black"
    one_step = make_run(tmp_path / "one", steps=1, playbook=False, evals=False, samples=False)
    assert plot_step_times(load_run(one_step)) is not None  # timed from its only row


def test_comparison_marks_each_evaluation_but_not_each_training_step(
    tmp_path: Path, drawn: list
) -> None:
    """Evaluations are few points: each gets a circle; training curves have a point per
    step and get none. Catches the markers swapped."""
    runs = group_runs([load_run(make_run(tmp_path / "r", steps=3, playbook=False, samples=False))])
    plot_comparison(runs, ("reward",), source="metrics", smooth=False)
    plot_comparison(runs, ("task_mean@k",), source="evals", smooth=False)
    markers = [{line.get_marker() for ax in fig.axes for line in ax.get_lines()} for fig in drawn]
    assert markers == [{"None"}, {"o"}]


def test_an_evaluation_that_logged_no_k_is_titled_with_a_question_mark(
    tmp_path: Path, drawn: list
) -> None:
    """eval.jsonl rows without "k" (samples per item): the evaluation panel says k = ?."""
    run = make_run(tmp_path / "r", steps=3, playbook=False, samples=False)
    write_jsonl(
        run / "eval.jsonl", [{"step": 0, "task_mean@k": 0.25}, {"step": 3, "task_mean@k": 0.5}]
    )
    plot_learning_curves(load_run(run))
    (fig,) = drawn
    assert "evaluation (k = ?)" in titled_axes(fig)
