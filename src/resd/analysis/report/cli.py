"""`build_report`, which tells a run directory from a comparison directory, and the
`resd report` sub-command around it.

The command turns the failures a user can cause (a path that holds no run, an --out that
cannot be written, a config value the report cannot compute with, matplotlib not
installed) into one line on stderr and exit status 2 rather than a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resd.analysis.report.comparison_page import comparison_report
from resd.analysis.report.continual_page import CONTINUAL_FILE, continual_report
from resd.analysis.report.markup import PlotSink
from resd.analysis.report.records_page import RECORDS_FILE, records_report
from resd.analysis.report.run_page import run_report
from resd.analysis.report.runs import RUN_MARKERS, find_runs, is_run_dir, load_run
from resd.analysis.report.serving_page import serving_report
from resd.rundir import SERVE_DB, check_out_file, path_option


def build_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run, comparison or continual directory; returns its path.

    `path` is a `resd continual` folder (it holds continual.json), a `resd serve` folder
    (it holds resd.db, and the learner's run), a run directory (it holds config.yaml,
    metrics.jsonl or summary.json), a comparison directory whose immediate
    sub-directories are run directories, or one that holds only their records
    (comparison.json, as `resd merge` writes it). The
    report goes to `out` (default `<path>/report.html`), its PNGs to `plots/` beside it;
    both are checked before anything is written.
    """
    path = Path(path)
    if not path.exists():  # a typo: "is not a directory" read as a file given by mistake
        raise FileNotFoundError(f"report: no such folder {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"report: {path} is not a directory")
    out = Path(out) if out is not None else path / "report.html"
    check_out_file(out, "report")
    plots = out.parent / "plots"
    if plots.exists() and not plots.is_dir():
        raise ValueError(f"report: {plots} (where the PNGs go) is not a directory")
    sink = PlotSink(plots)
    if (path / CONTINUAL_FILE).is_file():  # stages of one model in turn, not seeds to average
        text = continual_report(path, sink)
    elif (path / SERVE_DB).is_file():  # `resd serve`'s folder: its database and learner run
        text = serving_report(path, sink)
    elif is_run_dir(path):
        text = run_report(load_run(path), sink)
    elif not (runs := find_runs(path)) and (path / RECORDS_FILE).is_file():
        text = records_report(path, sink)  # `resd merge`'s output: the records, no run folders
    else:
        if not runs:
            raise FileNotFoundError(
                f"report: {path} is neither a run directory (no {', '.join(RUN_MARKERS)}) "
                "nor a directory of run directories"
            )
        text = comparison_report(path, runs, sink)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    try:
        out = build_report(args.path, args.out)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        print(f"resd: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


def add_report_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `resd report PATH [--out FILE]` on the CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "report",
        help="write an HTML report of a run, a comparison, a continual or a serve directory",
    )
    parser.add_argument(
        "path",
        type=path_option,
        help="a run directory, a directory of run directories (resd compare), a resd "
        "continual folder, or a resd serve --output-dir",
    )
    parser.add_argument(
        "--out", type=path_option, default=None, help="HTML file (default: PATH/report.html)"
    )
    parser.set_defaults(fn=cmd_report)
    return parser
