"""`resd compare`: several algorithms × several seeds, same data, same evaluation.

    resd compare --config configs/demo.yaml --algorithms resd,sdpo,sdpo_ss,grpo \\
        --seeds 0,1,2 --algorithm-args grpo:rollouts_per_prompt=8 --out runs/cmp steps=40

Every run is `resd train` on the base config plus the command line's `key=value`
overrides, then the algorithm's own overrides (`--algorithm-args ALGO:key=value`,
repeatable), and finally `algorithm=`, `seed=` and `output_dir=<out>/<algo>-seed<k>`,
which nothing can override: an override of one of these three is refused, since it would
lose without a word (a base config's own are simply replaced).

Fairness. For a given seed index every algorithm sees the same prompts in the same
order: the trainer shuffles the training items with `random.Random(cfg.seed)` and cuts
the result into consecutive batches of `batch_size`, and the environment's own items
come from `env_args` (its `seed` included), which all runs share. The evaluation
schedule (`eval_every`, `eval_items`, `eval_samples`, ...) and the model are shared too.
An algorithm override of a key that changes the data order or the evaluation (see
`SHARED_KEYS`) is allowed, since a study may want it, but it is flagged in the output.
Drawing more rollouts per prompt (GRPO's N = 8) keeps the prompts the same and is what
the "samples drawn" axis accounts for.

Samples drawn = prompts × rollouts per prompt, summed over steps: the interaction budget.
Each step draws fresh rollouts for its batch, so a run with K inner updates draws its
batch K times. A metrics row's `rollouts` count is used where the trainer records one
(exact also for a short last batch); otherwise batch_size × rollouts_per_prompt.

Isolation and restarts. Each run is its own `python -m resd.cli train` process, with its
output in `<run>/train.log`, so an exception, an out-of-memory kill or a segfault fails
that run only; it is recorded with its error and the others go on. Running the same
command again skips finished runs (those with `summary.json`), resumes unfinished ones
from their last checkpoint (`--resume`), and retries the others from scratch. Before
anything is launched, every run's resolved config is validated, and a finished or
checkpointed run is only reused if it was made with the settings this command resolves
for it; otherwise the command stops and names the run, the keys and both values.

Outputs in `<out>/`: `comparison.json` (every run: config, status, error, eval curve with
steps and samples drawn, final metrics; every algorithm: mean / std / min / max over its
finished seeds, and its mean curve), `plots/compare_eval.png` (accuracy against steps and
against samples drawn, mean line and min-max band over seeds) and `report.html`
(`resd report` on the comparison directory); the plots need matplotlib.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from resd.config import (
    ALIASES,
    ConfigError,
    TrainConfig,
    load_config,
    recorded_settings,
    settings_differences,
    yaml_problem,
)
from resd.rundir import (
    EVAL_KEYS,
    cumulative_samples,
    holding,
    metric_keys,
    path_option,
    read_jsonl,
    read_summary,
    reward_keys,
    samples_per_step,
)

log = logging.getLogger(__name__)

# Keys that must match across algorithms for a like-for-like comparison.
SHARED_KEYS = frozenset(
    {"model", "env", "env_args", "seed", "shuffle", "batch_size", "inner_updates", "steps",
     "eval_every", "eval_items", "eval_samples", "eval_temperature", "eval_top_p",
     "eval_top_k", "eval_min_p", "eval_max_new_tokens"}
)  # fmt: skip
# What the trainer leaves in a run directory that a fresh start must not append to.
TRAINER_LOGS = ("metrics.jsonl", "eval.jsonl", "samples.jsonl", "playbook_history.jsonl")
RUN_CONFIG = "compare-config.yaml"  # the resolved config the run was started with
ERROR_LINES = 20  # lines of train.log kept as a failed run's error


@dataclass
class RunSpec:
    """One (algorithm, seed) cell of the comparison."""

    algorithm: str
    seed: int
    path: Path
    overrides: list[str]

    @property
    def name(self) -> str:
        return self.path.name


# ---- planning ------------------------------------------------------------------------------
def parse_csv(text: str, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    return values


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` → [0, 1, 2]; anything else is an error that names the option."""
    values = parse_csv(text, "--seeds")
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None


def check_list_spelling(args: argparse.Namespace) -> None:
    """`--algorithms sdpo grpo` (spaces, as `--seeds 0 1` might be typed) leaves `grpo` among
    the overrides, where it reads as a malformed one: say which option it belongs to."""
    from resd.training.algorithms import ALGORITHMS

    for word in (o for o in args.overrides if "=" not in o):
        option = ("--algorithms" if word.strip(",") in ALGORITHMS
                  else "--seeds" if word.strip(",").isdigit() else None)  # fmt: skip
        if option:
            given = args.algorithms if option == "--algorithms" else args.seeds
            raise ValueError(f"{option}: one comma-separated list, without spaces "
                             f"({option} {given.strip(',')},{word.strip(',')}); {word!r} was "
                             f"read as a key=value override")  # fmt: skip


def parse_algorithm_args(items: list[str]) -> dict[str, list[str]]:
    """["grpo:rollouts_per_prompt=8", "grpo:lr=1e-6"] → {"grpo": [...two overrides...]}."""
    by_algorithm: dict[str, list[str]] = defaultdict(list)
    for item in items:
        algorithm, sep, override = item.partition(":")
        if not sep or not algorithm.strip() or "=" not in override:
            raise ValueError(f"--algorithm-args: expected ALGORITHM:key=value, got {item!r}")
        by_algorithm[algorithm.strip()].append(override.strip())
    return dict(by_algorithm)


# What compare sets in each run's config itself, and from which option.
SET_PER_RUN = {"algorithm": "--algorithms", "seed": "--seeds", "output_dir": "--out"}


def plan_runs(
    algorithms: list[str],
    seeds: list[int],
    out: Path,
    overrides: list[str],
    algorithm_args: dict[str, list[str]],
) -> list[RunSpec]:
    """The runs, seed-major (all algorithms at seed 0 first): after an interruption, the
    finished part is a complete comparison over fewer seeds."""
    stray = sorted(set(algorithm_args) - set(algorithms))
    if stray:
        raise ValueError(f"--algorithm-args: {stray[0]!r} is not in --algorithms")
    given = [("", o) for o in overrides]
    given += [(f"{a}:", o) for a, items in algorithm_args.items() for o in items]
    for where, item in given:  # each run's own: an override of it lost without a word
        if option := SET_PER_RUN.get(override_key(item)):
            raise ValueError(f"{where}{item}: compare sets {override_key(item)} in each run's "
                             f"config, from {option}")  # fmt: skip
    specs = []
    for seed in seeds:
        for algorithm in algorithms:
            path = out / f"{algorithm}-seed{seed}"
            fixed = [f"algorithm={algorithm}", f"seed={seed}", f"output_dir={path}"]
            specs.append(
                RunSpec(
                    algorithm, seed, path, [*overrides, *algorithm_args.get(algorithm, []), *fixed]
                )
            )
    return specs


def resolve_configs(specs: list[RunSpec], base_config: str | None) -> dict[str, TrainConfig]:
    """Every run's config, resolved and validated before anything is launched: a bad base
    config, override or algorithm argument stops the study here, rather than becoming a
    failed run (with no log) for every cell of it."""
    configs = {}
    for spec in specs:
        try:
            configs[spec.name] = load_config(base_config, spec.overrides)
        except ConfigError as exc:
            raise ConfigError(f"{spec.name}: {exc}") from None
    return configs


def override_key(item: str) -> str:
    """The config key a `key=value` override sets: `env_args.seed=3` sets `env_args`, and
    TRL's `num_generations=8` sets `rollouts_per_prompt`."""
    key = item.partition("=")[0].split(".")[0].strip()
    return ALIASES.get(key) or key


def unshared_overrides(algorithm_args: dict[str, list[str]]) -> list[str]:
    """Algorithm overrides that make that algorithm's data or evaluation differ."""
    flagged = []
    for algorithm, items in algorithm_args.items():
        for item in items:
            if override_key(item) in SHARED_KEYS:
                flagged.append(f"{algorithm}:{item}")
    return flagged


# ---- reading a run -------------------------------------------------------------------------
def has_checkpoint(run_dir: Path) -> bool:
    """As `resd.training.checkpoint.latest_checkpoint(...) is not None`, without importing torch."""
    return any(run_dir.glob("checkpoint-*/state.json"))


def stored_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run was made with: the one `launch` wrote, else the trainer's own copy;
    None for a run that has neither. One that is there but damaged (emptied, cut short,
    overwritten) is refused by name: it was said to be missing ("no compare-config.yaml
    or config.yaml holding a config"), and an emptied one hid the trainer's intact copy."""
    for name in (RUN_CONFIG, "config.yaml"):
        path = run_dir / name
        if path.exists():
            try:
                return recorded_settings(path)
            except (yaml.YAMLError, ValueError) as exc:  # UnicodeDecodeError among them
                copy = name == RUN_CONFIG and (run_dir / "config.yaml").exists()
                way = "delete it to judge the run by its config.yaml, or use another --out"
                raise ConfigError(
                    f"{path}: cannot tell which settings this run was made with "
                    f"({yaml_problem(exc)}); {way if copy else 'use another --out'}"
                ) from None
    return None


def check_reused_runs(specs: list[RunSpec], configs: dict[str, TrainConfig]) -> None:
    """Refuse to reuse (skip or resume) a run made with other settings than this command's.

    A finished run is skipped and a checkpointed one resumed, so a run made with, say,
    `steps=1` would otherwise sit beside new runs of `steps=3` in one comparison. The
    stored config is the run's whole resolved config (base file, overrides, its
    algorithm's arguments), so every setting is compared but `resd.config.UNCOMPARED_KEYS`. A run
    with neither a summary nor a checkpoint starts over: its old settings do not matter. One
    with no stored config (a folder that holds something else) is refused, not reused.
    """
    for spec in specs:
        if not ((spec.path / "summary.json").exists() or has_checkpoint(spec.path)):
            continue
        old = stored_config(spec.path)
        if old is None:  # not a run this command can vouch for: refuse rather than reuse it
            raise ConfigError(
                f"{spec.path}: cannot tell which settings this run was made with (no "
                f"{RUN_CONFIG} or config.yaml holding a config); use another --out"
            )
        new = yaml.safe_load(yaml.safe_dump(configs[spec.name].to_dict()))  # as stored
        differ = settings_differences(old, new)
        if differ:
            shown = "; ".join(differ)
            raise ConfigError(
                f"{spec.path} was made with other settings than this command gives it "
                f"({shown}); reusing it would compare unlike runs. Use another --out, "
                "or the settings it was made with"
            )


def eval_curve(run_dir: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every evaluation of a run with its step and the samples drawn by then."""
    drawn = cumulative_samples(read_jsonl(run_dir / "metrics.jsonl"), config)
    per_step = samples_per_step(config)
    curve = []
    for row in read_jsonl(run_dir / "eval.jsonl"):
        step = int(row.get("step", 0))
        point = {"step": step, "samples_drawn": drawn.get(step, step * per_step)}
        point.update({k: row[k] for k in (*metric_keys([row]), "k", "items") if k in row})
        curve.append(point)
    return curve


def error_tail(log_path: Path, lines: int = ERROR_LINES) -> str:
    """The end of a failed run's log: the traceback or `resd: error: ...` line."""
    if not log_path.exists():
        return ""
    text = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(text[-lines:])


def run_record(spec: RunSpec, config: dict[str, Any] | None) -> dict[str, Any]:
    """What comparison.json says about one run, read from its directory."""
    config = config or {}
    summary = read_summary(spec.path)
    metrics = read_jsonl(spec.path / "metrics.jsonl")
    curve = eval_curve(spec.path, config) if config else []
    drawn = cumulative_samples(metrics, config) if config else {0: 0}
    steps = int(summary.get("steps", metrics[-1]["step"] if metrics else 0))
    return {
        "name": spec.name,
        "algorithm": spec.algorithm,
        "seed": spec.seed,
        "dir": str(spec.path),
        "status": "finished" if summary else "pending",
        "skipped": False,
        "returncode": None,
        "error": None,
        "log": str(spec.path / "train.log"),
        "overrides": spec.overrides,
        "config": config or None,
        "samples_per_step": samples_per_step(config) if config else None,
        "steps": steps,
        "samples_drawn": drawn.get(steps, max(drawn.values())),
        # `early_stopping` or a callback ended it before `steps`: its final point is earlier
        "stopped_early": summary.get("stopped_early"),
        "eval": curve,
        "final": final_point(curve),
    }


def final_point(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last evaluation (for a finished run: the one after training), or None."""
    if not curve:
        return None
    last = curve[-1]
    return {k: last[k] for k in (*metric_keys([last]), "step", "samples_drawn") if k in last}


# ---- running -------------------------------------------------------------------------------
def launch(spec: RunSpec, cfg: TrainConfig, *, python: str = sys.executable) -> int:
    """Run `resd train` for one spec in its own process; returns its exit code.

    The resolved config is written to the run directory and passed as the only config,
    so what comparison.json records is exactly what ran, even if the base config file
    changes before a re-run resumes it.
    """
    spec.path.mkdir(parents=True, exist_ok=True)
    config_file = spec.path / RUN_CONFIG
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    command = [python, "-m", "resd.cli", "train", "--config", str(config_file)]
    if has_checkpoint(spec.path):
        command.append("--resume")
    else:  # a run that died before its first checkpoint starts over, with clean logs
        for name in TRAINER_LOGS:
            (spec.path / name).unlink(missing_ok=True)
        for stale in spec.path.glob("eval-step-*.jsonl"):
            stale.unlink()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with (spec.path / "train.log").open("a") as log_file:
        log_file.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(command)}\n")
        log_file.flush()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        return _wait_for_run(proc, spec.name)


def _wait_for_run(proc: subprocess.Popen, name: str) -> int:
    """The run's exit status. On Ctrl-C, give the run the time to checkpoint after its step
    (it got the terminal's Ctrl-C, or gets it now; `resd train` takes the two as one) and
    then stop too; a second Ctrl-C stops it at once. `subprocess.run` would kill it a
    quarter of a second later, losing every step since its last checkpoint."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        print(f"\n[compare] waiting for {name} to checkpoint after its step (Ctrl-C again "
              "to stop it at once)", file=sys.stderr, flush=True)  # fmt: skip
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        raise


def execute(
    spec: RunSpec, base_config: str | None, cfg: TrainConfig | None = None
) -> dict[str, Any]:
    """Run (or skip, or resume) one spec and describe the outcome.

    `cfg` is the config resolved when the study started (`resolve_configs`), so that an
    edit of the base config during a long study does not change its later runs.
    """
    if cfg is None:
        try:
            cfg = load_config(base_config, spec.overrides)
        except ConfigError as exc:  # nothing to launch: record why
            record = run_record(spec, None)
            record.update(status="failed", error=str(exc))
            return record
    if (spec.path / "summary.json").exists():
        ran = spec.path / RUN_CONFIG  # what it ran with, should the base config have changed
        config = yaml.safe_load(ran.read_text()) if ran.exists() else cfg.to_dict()
        record = run_record(spec, config)
        record["skipped"] = True
        return record
    resumed = has_checkpoint(spec.path)
    print(f"[compare] {spec.name}: {'resuming' if resumed else 'starting'}", flush=True)
    start = time.perf_counter()
    code = launch(spec, cfg)
    record = run_record(spec, cfg.to_dict())
    record.update(returncode=code, time_s=round(time.perf_counter() - start, 1))
    if code != 0 or record["status"] != "finished":
        record.update(status="failed", error=error_tail(spec.path / "train.log"))
    print(f"[compare] {spec.name}: {record['status']} ({record['time_s']} s)", flush=True)
    return record


# ---- aggregating ---------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float] | None:
    """mean, population std, min, max and n of some values; None for none."""
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per algorithm, over its finished seeds: final metrics and the curve by step.

    Seeds of one algorithm share the evaluation schedule, so curves align on the step;
    where one seed evaluated at a step the others did not, that point has a smaller n.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[run["algorithm"]].append(run)
    out = {}
    for algorithm, members in groups.items():
        done = [r for r in members if r["status"] == "finished"]
        keys = metric_keys(r["final"] for r in done if r["final"])
        final = {
            key: spread([r["final"][key] for r in done if r["final"] and key in r["final"]])
            for key in keys
        }
        points: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for run in done:
            for point in run["eval"]:
                points[point["step"]].append(point)
        curve = [
            {
                "step": step,
                "samples_drawn": spread([p["samples_drawn"] for p in pts]),
                **{k: spread([p[k] for p in pts if k in p]) for k in metric_keys(pts)},
            }
            for step, pts in sorted(points.items())
        ]
        out[algorithm] = {
            "runs": len(members),
            "finished": len(done),
            "failed": [r["name"] for r in members if r["status"] == "failed"],
            "stopped_early": [r["name"] for r in done if r.get("stopped_early")],
            "seeds": [r["seed"] for r in done],
            "final": final,
            "samples_drawn": spread([r["samples_drawn"] for r in done]),
            "curve": curve,
        }
    return out


def bootstrap_ci(
    values: list[float], *, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile-bootstrap interval for the mean of `values` (seeded: reproducible).

    With 3 to 5 seeds the interval is coarse, and it can only be as wide as the values
    allow; read it as "do the seeds agree", not as a calibrated test.
    """
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


# Resampling two values can only give their two values and their mean, so an "interval"
# from two seeds that agree is a single point and would always read as a difference.
MIN_SEEDS_FOR_INTERVAL = 3


def trained_points(run: dict[str, Any], key: str) -> dict[int, dict[str, Any]]:
    """A run's evaluations of `key` by samples drawn, leaving out the one before training."""
    return {p["samples_drawn"]: p for p in run["eval"] if key in p and p["samples_drawn"] > 0}


def paired_differences(
    runs: list[dict[str, Any]],
    reference: str,
    keys: tuple[str, ...] = ("task_mean@k", "case_mean@k"),
) -> list[dict[str, Any]]:
    """`reference` minus every other algorithm, seed by seed, at equal samples drawn.

    For each seed both runs must have evaluated after the same number of samples; the
    last such point counts (runs that share the evaluation schedule in samples drawn, as
    `eval_every` set per algorithm allows, compare at their end). The evaluation before
    training (0 samples drawn) never counts: both models are the untrained one there, so
    it would always read as "no difference". A seed where either run is unfinished or has
    no common point after training is listed as missing, never dropped silently; the
    latter also in `no_common_point`.
    The bootstrap interval and its verdict need `MIN_SEEDS_FOR_INTERVAL` paired seeds.
    """
    by_algorithm: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for run in runs:
        by_algorithm[run["algorithm"]][run["seed"]] = run
    out = []
    for other in by_algorithm:
        if other == reference:
            continue
        for key in keys:
            per_seed, missing, at, no_common = {}, [], {}, []
            for seed, a in sorted(by_algorithm[reference].items()):
                b = by_algorithm[other].get(seed)
                if b is None or a["status"] != "finished" or b["status"] != "finished":
                    missing.append(seed)
                    continue
                points_a, points_b = trained_points(a, key), trained_points(b, key)
                common = sorted(set(points_a) & set(points_b))
                if not common:
                    missing.append(seed)
                    no_common.append(seed)
                    continue
                at[seed] = common[-1]
                per_seed[seed] = points_a[common[-1]][key] - points_b[common[-1]][key]
            values = list(per_seed.values())
            row = {"a": reference, "b": other, "key": key, "per_seed": per_seed, "samples_drawn": at,
                   "missing_seeds": missing, "no_common_point": no_common,
                   "mean": sum(values) / len(values) if values else None}  # fmt: skip
            if len(values) >= MIN_SEEDS_FOR_INTERVAL:
                lo, hi = bootstrap_ci(values)
                row.update(ci95=[lo, hi], distinguishable=lo > 0 or hi < 0)
            out.append(row)
    return out


def paired_verdict(row: dict[str, Any]) -> str:
    """What a paired row supports; no seed with a common point after training says so,
    rather than "too few seeds", which would suggest more seeds would help."""
    if row.get("ci95"):
        return (
            "distinguishable from 0" if row.get("distinguishable") else "not distinguishable from 0"
        )
    if not row["per_seed"] and row.get("no_common_point"):
        return "no common point after training (equal samples drawn)"
    return f"too few seeds (an interval needs {MIN_SEEDS_FOR_INTERVAL})"


def format_paired(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'difference':24s} {'metric':12s} {'seeds':>5s} {'mean':>8s} {'95% bootstrap CI':>20s}  verdict"
    ]
    for r in rows:
        ci = r.get("ci95")
        cell = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"
        mean = f"{r['mean']:+.3f}" if r["mean"] is not None else "-"
        verdict = paired_verdict(r)
        lines.append(
            f"{r['a'] + ' - ' + r['b']:24s} {r['key']:12s} {len(r['per_seed']):5d} {mean:>8s} {cell:>20s}  {verdict}"
        )
    return "\n".join(lines)


def write_comparison(out: Path, payload: dict[str, Any], runs: list[dict[str, Any]]) -> Path:
    path = out / "comparison.json"
    reference = (payload.get("algorithms_requested") or [None])[0]
    data = {**payload, "runs": runs, "algorithms": summarize(runs),
            "paired": paired_differences(runs, reference) if reference else []}  # fmt: skip
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # a reader never sees half a file
    return path


# ---- plots ---------------------------------------------------------------------------------
def write_plots(out: Path, algorithms: dict[str, dict[str, Any]]) -> list[Path]:
    """The HTML report of the comparison, with its plots in `plots/` (accuracy against
    steps and samples drawn: `compare_eval.png`); skipped with a note without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (the report's plots need it)

        from resd.analysis.report import build_report
    except ImportError as exc:
        print(f"[compare] no plots: {exc}", file=sys.stderr)
        return []
    with contextlib.suppress(FileNotFoundError):  # no run produced a run directory
        return [build_report(out)]
    return []


# ---- the command ---------------------------------------------------------------------------
def format_table(algorithms: dict[str, dict[str, Any]]) -> str:
    def cell(s: dict[str, float] | None) -> str:
        return "-" if s is None else f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"

    header = f"{'algorithm':18s} {'done':>5s} " + " ".join(f"{k:>21s}" for k in EVAL_KEYS)
    lines = [header + f" {'samples drawn':>14s}"]
    for algorithm, info in algorithms.items():
        drawn = "-" if info["samples_drawn"] is None else f"{info['samples_drawn']['mean']:.0f}"
        lines.append(
            f"{algorithm:18s} {info['finished']:>2d}/{info['runs']:<2d} "
            + " ".join(f"{cell(info['final'][k]):>21s}" for k in EVAL_KEYS)
            + f" {drawn:>14s}"
        )
    parts = reward_keys(info["final"] for info in algorithms.values())
    if parts:  # a list of reward functions scored the replies: each one's final mean
        widths = [max(21, len(k)) for k in parts]
        lines += [
            "",
            f"{'algorithm':18s} "
            + " ".join(f"{k:>{w}s}" for k, w in zip(parts, widths, strict=True)),
        ]
        for algorithm, info in algorithms.items():
            cells = (cell(info["final"].get(k)) for k in parts)
            lines.append(
                f"{algorithm:18s} "
                + " ".join(f"{c:>{w}s}" for c, w in zip(cells, widths, strict=True))
            )
    return "\n".join(lines)


def stopped_early_lines(runs: list[dict[str, Any]]) -> list[str]:
    """A line per run that ended before its `steps`: its final point is earlier than its
    peers', which the table alone does not say."""
    return [f"stopped early: {r['name']} at step {r['steps']} ({r['stopped_early']})"
            for r in runs if r.get("stopped_early")]  # fmt: skip


def run_comparison(
    base_config: str | None,
    algorithms: list[str],
    seeds: list[int],
    out: str | Path,
    overrides: list[str] | None = None,
    algorithm_args: dict[str, list[str]] | None = None,
    *,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every (algorithm, seed) and write comparison.json; returns its content."""
    from resd.training.algorithms import ALGORITHMS

    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:  # a typo should stop the study, not become a failed run
        raise ValueError(
            f"--algorithms: unknown {unknown[0]!r}; choose from {', '.join(ALGORITHMS)}"
        )
    out = Path(out)
    algorithms, seeds = list(dict.fromkeys(algorithms)), list(dict.fromkeys(seeds))
    algorithm_args = algorithm_args or {}
    specs = plan_runs(algorithms, seeds, out, list(overrides or []), algorithm_args)
    configs = resolve_configs(specs, base_config)  # nothing launched, nothing written yet
    check_reused_runs(specs, configs)
    flagged = unshared_overrides(algorithm_args)
    for item in flagged:
        print(f"[compare] note: {item} changes data or evaluation for that algorithm only")
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "base_config": base_config,
        "overrides": list(overrides or []),
        "algorithm_args": algorithm_args,
        "algorithms_requested": algorithms,
        "seeds": seeds,
        "unshared_overrides": flagged,
        "fairness": "for a seed index, every algorithm shuffles the training items with "
        "random.Random(seed) and shares env_args, model and evaluation settings",
    }
    with holding(out, "--out"):  # a second `resd compare` on it, while this one runs: refused
        runs = [run_record(spec, None) for spec in specs]
        write_comparison(out, payload, runs)
        for i, spec in enumerate(specs):
            runs[i] = execute(spec, base_config, configs[spec.name])
            write_comparison(out, payload, runs)  # progress is visible while later runs train
        data = json.loads((out / "comparison.json").read_text())
        if plots:
            write_plots(out, data["algorithms"])
    return data


def cmd_compare(args: argparse.Namespace) -> int:
    check_list_spelling(args)
    seeds = parse_seeds(args.seeds)
    data = run_comparison(
        args.config, parse_csv(args.algorithms, "--algorithms"), seeds, args.out, args.overrides,
        parse_algorithm_args(args.algorithm_args), plots=not args.no_plots,
    )  # fmt: skip
    print("\nfinal evaluation, mean [min, max] over finished seeds:")
    print(format_table(data["algorithms"]))
    for line in stopped_early_lines(data["runs"]):
        print(line)
    if data.get("paired"):
        print("\npaired differences per seed, at equal samples drawn:")
        print(format_paired(data["paired"]))
    failed = [r for r in data["runs"] if r["status"] == "failed"]
    for run in failed:
        last = (run["error"] or "").splitlines()[-1:] or ["?"]
        print(f"FAILED {run['name']}: {last[0]}  (log: {run['log']})")
    print(f"\ncomparison: {Path(args.out) / 'comparison.json'}")
    return 1 if failed else 0


def add_compare_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `resd compare --config FILE --algorithms A,B --seeds 0,1 --out DIR [k=v ...]`."""
    parser = subparsers.add_parser(
        "compare", help="train several algorithms over several seeds and compare them"
    )
    parser.add_argument("--config", type=path_option, help="base YAML config shared by every run")
    parser.add_argument("--algorithms", required=True, help="comma-separated, e.g. resd,sdpo")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--out", type=path_option, required=True, help="comparison directory")
    parser.add_argument(
        "--algorithm-args", action="append", default=[], metavar="ALGO:KEY=VALUE",
        help="an override for one algorithm only (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="skip plots and report.html")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.set_defaults(fn=cmd_compare)
    return parser
