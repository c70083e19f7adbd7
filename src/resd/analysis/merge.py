"""`resd merge`: one comparison from the `comparison.json` files of several `resd compare` calls.

    resd merge runs/node0/cmp runs/node1/cmp --out runs/cmp_all
    resd merge docs/results/headline_qwen/comparison.json runs/headline_qwen --out runs/merged

Why it exists: the seeds of one study rarely run in one call. They run on different
machines (a seed per node), or across sessions where only each call's `comparison.json`
was kept, not its run directories. Every `resd compare` call writes the record of each
of its runs (config, status, evaluation curve in samples drawn); merging reads those
records, never the run directories, so it works from the JSON alone.

What it refuses, with a message that names the runs and keys, and without writing
anything: a source that is not a `comparison.json` of runs (a run record missing a field,
or with a field of the wrong type, is named with its file and position), an `--out` that is
one of the sources (it would overwrite that source and lose what only it holds, e.g. the
`overrides` of its `resd compare` call), two different finished records for one run name
(the same seed ran twice with different outcomes; keep one source out), and seeds of one
algorithm trained with different settings (everything but `seed` and `output_dir` must
match; `--ignore-keys` accepts named keys, e.g. a setting that only changes logging). Differences between
algorithms in a key that `resd compare` would have flagged (`SHARED_KEYS`) are listed in
`unshared_overrides`, as `resd compare` lists them. An unfinished run is kept as such, and
a finished record of the same run from another source replaces it.

The output is a `comparison.json` like `resd compare`'s (per-algorithm summaries, paired
differences against `--reference` at equal samples drawn, with bootstrap intervals) plus
`sources`, and `plots/compare_eval.png` drawn from the records' evaluation curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from resd.analysis.compare import (
    SHARED_KEYS,
    format_paired,
    format_table,
    stopped_early_lines,
    write_comparison,
)
from resd.rundir import metric_keys, path_option

# Keys that differ between the seeds of one algorithm by construction.
PER_RUN_KEYS = frozenset({"seed", "output_dir"})


class MergeError(ValueError):
    """The sources cannot be merged into one honest comparison."""


def load_comparison(source: str | Path) -> dict[str, Any]:
    """A `comparison.json`, given as the file or the directory that holds it."""
    path = Path(source)
    if path.is_dir():
        path = path / "comparison.json"
    if not path.is_file():
        raise MergeError(f"{source}: no comparison.json there (run `resd compare` first)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes not text
        raise MergeError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise MergeError(f"{path}: not a comparison.json (no 'runs' list)")
    if not data["runs"]:
        raise MergeError(f"{path}: no runs in it, nothing to merge from it")
    requested = data.get("algorithms_requested")
    if requested is not None and not (
        isinstance(requested, list) and all(isinstance(a, str) and a for a in requested)
    ):
        raise MergeError(f"{path}: 'algorithms_requested' is not a list of algorithm names")
    for i, run in enumerate(data["runs"]):
        problem = run_record_problem(run)
        if problem:
            name = run.get("name") if isinstance(run, dict) else None
            named = f" ({name!r})" if isinstance(name, str) else ""
            raise MergeError(f"{path}: run {i + 1} of {len(data['runs'])}{named} {problem}")
    data["_path"] = str(path)
    return data


def _is_number(value: Any) -> bool:
    """int or float; a bool is an int to Python but never a metric or a count here."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def run_record_problem(run: Any) -> str | None:
    """What is wrong with one run record of a comparison.json, or None.

    Checks every field that merging and `resd compare`'s summaries (`summarize`,
    `paired_differences`) read, so that a hand-edited or truncated file is refused here,
    naming the run, instead of failing later with a traceback deep in the statistics.
    """
    if not isinstance(run, dict):
        return f"is {run!r}, not a run record (an object)"
    for key in ("name", "algorithm", "status"):
        if key not in run:
            return f"has no {key!r}"
        if not isinstance(run[key], str) or not run[key]:
            return f"has {key!r} {run[key]!r}, not a non-empty string"
    if "seed" not in run:
        return "has no 'seed'"
    if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
        return f"has 'seed' {run['seed']!r}, not an integer"
    if run.get("config") is not None and not isinstance(run["config"], dict):
        return f"has 'config' of type {type(run['config']).__name__}, not an object"
    if "eval" not in run:
        return "has no 'eval'"
    if not isinstance(run["eval"], list):
        return f"has 'eval' {run['eval']!r}, not a list"
    for j, point in enumerate(run["eval"]):
        if not isinstance(point, dict):
            return f"has eval point {j + 1} that is not an object"
        if not isinstance(point.get("step"), int) or isinstance(point["step"], bool):
            return f"has eval point {j + 1} without an integer 'step'"
        bad = [
            k
            for k in ("samples_drawn", *metric_keys([point]))
            if k in point and not _is_number(point[k])
        ]
        if "samples_drawn" not in point or bad:
            return f"has eval point {j + 1} without a number for {(bad or ['samples_drawn'])[0]!r}"
    if "final" in run and run["final"] is not None:
        if not isinstance(run["final"], dict):
            return f"has 'final' of type {type(run['final']).__name__}, not an object"
        bad = [
            k
            for k in metric_keys([run["final"]])
            if k in run["final"] and not _is_number(run["final"][k])
        ]
        if bad:
            return f"has 'final' {bad[0]!r} {run['final'][bad[0]]!r}, not a number"
    if run["status"] == "finished":  # only finished runs enter the summaries
        if "final" not in run:
            return "is finished but has no 'final'"
        if not _is_number(run.get("samples_drawn")):
            return "is finished but has no number for 'samples_drawn'"
    return None


def check_out_is_not_a_source(out: Path, loaded: list[dict[str, Any]]) -> None:
    """Refuse an `--out` that is a source's folder (or its file): writing the merge there
    would replace that source, and what only it holds (its `overrides`, `algorithm_args`)
    would be lost; `sources` would also list the merge itself."""
    target = out.resolve()
    for data in loaded:
        path = Path(data["_path"]).resolve()
        if target in (path, path.parent):
            raise MergeError(
                f"--out {out} is where the source {data['_path']} lives; merging there would "
                "overwrite it: choose a new directory"
            )
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} is a file, not a directory")


def config_differences(a: dict[str, Any], b: dict[str, Any], ignore: frozenset[str]) -> list[str]:
    """The keys whose values differ between two run configs (a key missing on one side
    counts: it means another code version), leaving out `ignore`."""
    keys = (set(a) | set(b)) - ignore
    return sorted(k for k in keys if a.get(k, "<missing>") != b.get(k, "<missing>"))


def _union_runs(sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run once, in first-seen order; a finished record beats an unfinished one."""
    by_name: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for data in sources:
        for run in data["runs"]:
            name = run["name"]
            seen = by_name.get(name)
            if seen is None or (seen["status"] != "finished" and run["status"] == "finished"):
                by_name[name], origin[name] = run, data["_path"]
            elif seen["status"] == run["status"] == "finished" and (
                seen["eval"] != run["eval"] or seen.get("final") != run.get("final")
            ):
                raise MergeError(
                    f"run {name!r} finished with different results in {origin[name]} and "
                    f"{data['_path']}; leave one of them out of the merge"
                )
    return list(by_name.values())


def _check_seeds_agree(runs: list[dict[str, Any]], ignore: frozenset[str]) -> None:
    """Finished seeds of one algorithm must have run with the same settings."""
    first: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run["status"] != "finished" or not run.get("config"):
            continue
        ref = first.setdefault(run["algorithm"], run)
        diff = config_differences(ref["config"], run["config"], PER_RUN_KEYS | ignore)
        if diff:
            shown = ", ".join(
                f"{k}: {ref['config'].get(k, '<missing>')!r} vs {run['config'].get(k, '<missing>')!r}"
                for k in diff[:5]
            )
            raise MergeError(
                f"{ref['name']} and {run['name']} ran with different settings ({shown}); "
                "merge only seeds of one study, or pass --ignore-keys for keys that do not matter"
            )


def _unshared(runs: list[dict[str, Any]], reference: str) -> list[str]:
    """`algo:key=value` for each shared key where an algorithm differs from the reference."""
    configs = {
        r["algorithm"]: r["config"] for r in runs if r["status"] == "finished" and r.get("config")
    }
    ref = configs.get(reference)
    if ref is None:
        return []
    return [
        f"{algorithm}:{key}={config.get(key)}"
        for algorithm, config in configs.items()
        if algorithm != reference
        for key in sorted(SHARED_KEYS - PER_RUN_KEYS)
        if config.get(key) != ref.get(key)
    ]


def merge_comparisons(
    sources: list[str | Path],
    out: str | Path,
    *,
    reference: str | None = None,
    ignore_keys: frozenset[str] = frozenset(),
    plots: bool = True,
) -> dict[str, Any]:
    """Merge the sources' run records into `<out>/comparison.json`; returns its content."""
    if not sources:
        raise MergeError("nothing to merge: name at least one comparison")
    loaded = [load_comparison(s) for s in sources]
    out = Path(out)
    check_out_is_not_a_source(out, loaded)
    runs = _union_runs(loaded)
    _check_seeds_agree(runs, ignore_keys)
    algorithms = list(dict.fromkeys(
        [a for d in loaded for a in d.get("algorithms_requested") or []] + [r["algorithm"] for r in runs]
    ))  # fmt: skip
    reference = reference or algorithms[0]
    if reference not in algorithms:
        raise MergeError(
            f"--reference {reference!r} ran in none of the sources ({', '.join(algorithms)})"
        )
    algorithms = [reference] + [a for a in algorithms if a != reference]
    payload = {
        "sources": [d["_path"] for d in loaded],
        "base_config": sorted({str(d.get("base_config")) for d in loaded}),
        "algorithms_requested": algorithms,
        "seeds": sorted({r["seed"] for r in runs}),
        "unshared_overrides": _unshared(runs, reference),
        "fairness": loaded[0].get("fairness"),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = write_comparison(out, payload, runs)
    data = json.loads(path.read_text())
    if plots:  # the records' page, with plots/compare_eval.png (`write_curve_plot`)
        from resd.analysis.report import build_report

        build_report(out)
    return data


def write_curve_plot(path: Path, algorithms: dict[str, dict[str, Any]]) -> Path | None:
    """Evaluation metrics against samples drawn: the mean over seeds and its min-max band,
    from the records alone (the run directories may be gone). None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(
            "[merge] no plots: matplotlib is not installed (pip install resd[report])",
            file=sys.stderr,
        )
        return None
    points = [p for a in algorithms.values() for p in a["curve"]]
    keys = [k for k in metric_keys(points) if any(p.get(k) for p in points)]  # and each reward's
    if not keys:
        return None
    fig = Figure(figsize=(6.0, 3.2 * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for row, key in enumerate(keys):
        ax = axes[row][0]
        for i, (algorithm, info) in enumerate(algorithms.items()):
            points = [p for p in info["curve"] if p.get(key) and p.get("samples_drawn")]
            if not points:
                continue
            x = [p["samples_drawn"]["mean"] for p in points]
            ax.plot(x, [p[key]["mean"] for p in points], color=f"C{i}", marker="o",
                    label=f"{algorithm} (n={info['finished']})")  # fmt: skip
            ax.fill_between(x, [p[key]["min"] for p in points], [p[key]["max"] for p in points],
                            color=f"C{i}", alpha=0.2)  # fmt: skip
        ax.set(title=f"{key} vs samples drawn", xlabel="samples drawn", ylabel=key)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def cmd_merge(args: argparse.Namespace) -> int:
    ignore = frozenset(k.strip() for k in (args.ignore_keys or "").split(",") if k.strip())
    try:
        data = merge_comparisons(args.sources, args.out, reference=args.reference,
                                 ignore_keys=ignore, plots=not args.no_plots)  # fmt: skip
    except MergeError as exc:
        print(f"resd merge: error: {exc}", file=sys.stderr)
        return 2
    print("final evaluation, mean [min, max] over finished seeds:")
    print(format_table(data["algorithms"]))
    for line in stopped_early_lines(data["runs"]):
        print(line)
    if data.get("paired"):
        print("\npaired differences per seed, at equal samples drawn:")
        print(format_paired(data["paired"]))
    for note in data["unshared_overrides"]:
        print(f"note: {note} differs from the reference {data['algorithms_requested'][0]}")
    print(f"\ncomparison: {Path(args.out) / 'comparison.json'}")
    if not args.no_plots:
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def add_merge_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `resd merge SOURCE [SOURCE ...] --out DIR`."""
    parser = subparsers.add_parser(
        "merge", help="merge the comparison.json of several `resd compare` calls (seeds run apart)"
    )
    parser.add_argument(
        "sources", nargs="+", type=path_option, help="comparison.json files or their directories"
    )
    parser.add_argument(
        "--out", type=path_option, required=True, help="directory for the merged comparison.json"
    )
    parser.add_argument("--reference", help="algorithm the paired differences start from "
                        "(default: the first one requested)")  # fmt: skip
    parser.add_argument(
        "--ignore-keys", help="comma-separated config keys allowed to differ between seeds"
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="skip report.html and its plots/compare_eval.png"
    )
    parser.set_defaults(fn=cmd_merge)
    return parser
