"""The report of a comparison whose run folders are not here: `resd merge`'s output (seeds
that ran on other machines, or in sessions whose folders are gone), or a `comparison.json`
copied back alone. Everything on it comes from the file's run records: each run's status
and final evaluation, the summary per algorithm, the paired differences, and the
evaluation curves against samples drawn. Training curves, step times, playbooks and
samples live in the run folders; `resd report` on a folder that has them shows those.
"""

from __future__ import annotations

from pathlib import Path

from resd.analysis.report.markup import PlotSink, details, esc, page, pre, section, table
from resd.rundir import metric_keys

RECORDS_FILE = "comparison.json"


def _spread(s: dict[str, float] | None) -> str:
    return "" if s is None else f"{s['mean']:.4g} [{s['min']:.4g}, {s['max']:.4g}]"


def records_report(path: Path, sink: PlotSink) -> str:
    from resd.analysis.compare import paired_verdict, summarize
    from resd.analysis.merge import load_comparison, write_curve_plot

    data = load_comparison(path)  # a malformed record is one line naming it (a ValueError)
    runs, algorithms = data["runs"], summarize(data["runs"])
    keys = metric_keys(info["final"] for info in algorithms.values())
    by_algorithm = table(
        ["algorithm", "runs", "finished", *(f"final {k}" for k in keys), "samples drawn"],
        [[name, info["runs"], info["finished"], *(_spread(info["final"].get(k)) for k in keys),
          _spread(info["samples_drawn"])] for name, info in algorithms.items()],
    )  # fmt: skip
    finals = ("task_mean@k", "case_mean@k")
    each = table(
        ["run", "algorithm", "seed", "status", "steps", "samples drawn",
         *(f"final {k}" for k in finals), "stopped early"],
        [[r["name"], r["algorithm"], r["seed"], r["status"], r.get("steps"), r.get("samples_drawn"),
          *((r.get("final") or {}).get(k) for k in finals), r.get("stopped_early") or ""]
         for r in runs],
    )  # fmt: skip
    paired = table(
        ["difference", "metric", "seeds", "mean", "95% bootstrap CI", "verdict"],
        [[f"{p['a']} − {p['b']}", p["key"], len(p["per_seed"]),
          None if p.get("mean") is None else f"{p['mean']:+.4f}",
          f"[{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p.get("ci95") else "",
          paired_verdict(p)] for p in data.get("paired") or []],
    )  # fmt: skip
    summary = (
        "<h3>By algorithm: mean [min, max] over finished seeds</h3>" + by_algorithm
        + "<h3>Paired differences per seed, at equal samples drawn</h3>" + paired
        + "<h3>Runs</h3>" + each
    )  # fmt: skip
    curves = ""
    drawn = write_curve_plot(sink.directory / "compare_eval.png", algorithms)
    if drawn is not None:
        caption = "Evaluation metrics against samples drawn; line: mean over seeds, band: min/max."
        curves = sink.embed("compare_eval", drawn.read_bytes(), caption)
    sources = data.get("sources") or []
    note = (
        f"<p>Comparison records: <code>{esc(data['_path'])}</code>"
        + (f", merged from {len(sources)} source(s)" if sources else "")
        + ". The run folders are not here: for a run's curves, playbook and samples, run "
        "<code>resd report</code> where its folder is.</p>"
    )
    raw = Path(data["_path"]).read_text(errors="replace")
    nav = [("summary", "summary"), ("curves", "evaluation curves"), ("meta", "metadata")]
    body = (
        note
        + section("summary", "1. Summary", summary)
        + section("curves", "2. Evaluation curves", curves or "<p>No evaluation recorded.</p>")
        + section("meta", "3. Metadata", details(RECORDS_FILE, pre(raw)))
    )
    return page(f"resd comparison: {path.name} (records)", nav, body)
