"""`resd report DIR`: one self-contained HTML report of a training run, a comparison, a
continual run or a serving folder.

Why a single static file: runs happen on remote GPU machines, and the report has to be
copied back and opened anywhere (a browser, a mail attachment, a CI artifact). So the
plots are embedded as base64 PNG data URIs, the styling is one inline <style> block, and
there is no JavaScript at all: the collapsible parts use <details>/<summary>. Every PNG
is also written to `plots/` beside the report, for slides and papers.

Model text (prompts, responses, reflections, playbook entries) is untrusted: it may
contain HTML such as `<script>`. Every piece of text goes through `esc()` (directly or
through `table()`, `pre()`, `details()`, whose text arguments are never markup) before
it reaches the page; the only raw HTML is the markup built in this package.

The modules, in the order the data flows through them:
  runs             reading a run directory (any file may be missing but one of
                   config.yaml, metrics.jsonl, summary.json)
  curves           numbers: smoothing, a mean and spread over the seeds of an algorithm
  plots            the figures (matplotlib is imported lazily, so `import resd` stays light)
  markup           HTML helpers that escape all text, and the page around the sections
  run_page         the sections of a single-run report
  comparison_page  the report of a directory of runs
  continual_page   the report of a `resd continual` folder (its continual.json)
  serving_page     the report of a `resd serve` folder (its database and learner run)
  records_page     the report of a comparison from its records alone (`resd merge`'s)
  cli              `build_report` and the `resd report` sub-command

The names below are re-exported so that code importing them from
`resd.analysis.report` does not depend on how the package is split.
"""

from __future__ import annotations

from resd.analysis.report.cli import add_report_subcommand, build_report, cmd_report
from resd.analysis.report.comparison_page import comparison_report, comparison_tables
from resd.analysis.report.continual_page import continual_report, read_continual
from resd.analysis.report.curves import (
    Band,
    group_curve,
    moving_average,
    phase_times,
    series,
    smoothing_window,
)
from resd.analysis.report.markup import (
    CSS,
    PlotSink,
    _fmt,
    details,
    esc,
    not_recorded,
    page,
    pre,
    section,
    table,
)
from resd.analysis.report.plots import (
    PLOT_DPI,
    _figure,
    _png,
    plot_comparison,
    plot_continual,
    plot_learning_curves,
    plot_playbook,
    plot_step_times,
)
from resd.analysis.report.run_page import (
    CONFIG_HIGHLIGHTS,
    COUNTERS,
    EXAMPLE_FIELDS,
    LOSS_COLOURS,
    N_EXAMPLES,
    N_TOKEN_SAMPLES,
    N_TOP_ENTRIES,
    SINGLE_NAV,
    loss_colour,
    pick_examples,
    run_report,
    section_examples,
    section_learning,
    section_playbook,
    section_summary,
    section_timing,
    section_tokens,
    token_html,
    token_samples,
)
from resd.analysis.report.runs import (
    RUN_MARKERS,
    TRAIN_KEYS,
    Run,
    find_runs,
    group_runs,
    is_run_dir,
    load_run,
)

__all__ = [
    "CONFIG_HIGHLIGHTS",
    "COUNTERS",
    "CSS",
    "EXAMPLE_FIELDS",
    "LOSS_COLOURS",
    "N_EXAMPLES",
    "N_TOKEN_SAMPLES",
    "N_TOP_ENTRIES",
    "PLOT_DPI",
    "RUN_MARKERS",
    "SINGLE_NAV",
    "TRAIN_KEYS",
    "Band",
    "PlotSink",
    "Run",
    "_figure",  # private, but imported from here by name
    "_fmt",
    "_png",
    "add_report_subcommand",
    "build_report",
    "cmd_report",
    "comparison_report",
    "comparison_tables",
    "continual_report",
    "details",
    "esc",
    "find_runs",
    "group_curve",
    "group_runs",
    "is_run_dir",
    "load_run",
    "loss_colour",
    "moving_average",
    "not_recorded",
    "page",
    "phase_times",
    "pick_examples",
    "plot_comparison",
    "plot_continual",
    "plot_learning_curves",
    "plot_playbook",
    "plot_step_times",
    "pre",
    "read_continual",
    "run_report",
    "section",
    "section_examples",
    "section_learning",
    "section_playbook",
    "section_summary",
    "section_timing",
    "section_tokens",
    "series",
    "smoothing_window",
    "table",
    "token_html",
    "token_samples",
]
