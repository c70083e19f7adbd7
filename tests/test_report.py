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
    add_report_subcommand,
    build_report,
    group_curve,
    group_runs,
    load_run,
    loss_colour,
    moving_average,
    token_samples,
)

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
    with pytest.raises(ImportError, match=re.escape("pip install resd[report]")):
        build_report(run_dir)


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
