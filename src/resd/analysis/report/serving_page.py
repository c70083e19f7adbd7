"""The report of a `resd serve` folder: what was served and what the learner made of it.

The folder holds the server's database (`resd.db`) and, with `--learn`, the learner's run
folder (`learner/`), an ordinary run folder. The page is the learner's run report with a
section before it from the database: the traffic and feedback counts, and every version
the server registered (the starting model and each learner step the guard let through),
with the guard metric each was served at.
"""

from __future__ import annotations

from pathlib import Path

from resd.analysis.report.markup import PlotSink, esc, not_recorded, page, section, table
from resd.analysis.report.run_page import SINGLE_NAV, run_sections
from resd.analysis.report.runs import is_run_dir, load_run
from resd.config import first_line
from resd.rundir import LEARNER_DIR, SERVE_DB


def section_serving(path: Path) -> str:
    """Counts and versions, read from the SQLite database (the `serve` extra reads it)."""
    try:
        from resd.serve.store import Store, sqlite_url
    except ImportError:
        return section("serving", "Serving", not_recorded(
            f"{SERVE_DB} (its reader needs the serve extra: pip install 'resd[serve]')"
        ))  # fmt: skip
    try:
        store = Store(sqlite_url(path / SERVE_DB), read_only=True)  # a report changes nothing
    except Exception as exc:  # not a database, or another program's: one line, no traceback
        # SQLAlchemy's message ends in a second line ("Background on this error at: ...");
        # the driver's own words are the ones that say what is wrong with the file
        said = first_line(getattr(exc, "orig", None) or exc)
        raise ValueError(f"report: {path / SERVE_DB} is not a resd serve database "
                         f"({type(exc).__name__}: {said})") from None  # fmt: skip
    try:
        counts, versions = store.counts(), store.versions()
    finally:
        store.close()
    totals = table(["", "count"], [
        ["completions served", counts["interactions"]],
        ["feedback rows", counts["feedback"]],
        ["feedback rows trained on", counts["consumed"]],
        ["versions registered", counts["versions"]],
    ])  # fmt: skip
    rows = [[v["id"], v.get("parent") or "", v.get("step"), v.get("accuracy"), v.get("note") or "",
             v.get("created_at")] for v in versions]  # fmt: skip
    listed = table(["version", "parent", "learner step", "guard metric", "note", "registered"],
                   rows)  # fmt: skip
    note = (
        "<p>A version is registered when it is served: the starting model, then each learner "
        "step whose guard metric did not fall. Its guard metric is the held-out evaluation "
        "it was served on; the learner's own evaluations, served or not, are below.</p>"
    )
    return section("serving", "Serving", totals + "<h3>Versions</h3>" + listed + note)


def serving_report(path: Path, sink: PlotSink) -> str:
    learner = path / LEARNER_DIR
    body = f"<p>Serving folder: <code>{esc(path)}</code></p>" + section_serving(path)
    nav = [("serving", "serving")]
    if is_run_dir(learner):
        body += run_sections(load_run(learner), sink)
        nav += SINGLE_NAV
    else:
        body += not_recorded("a learner run (the server ran without --learn)")
    return page(f"resd serve: {path.name}", nav, body)
