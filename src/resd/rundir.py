"""A run directory: the files a run writes, the names in them, and how to read them.

One module for the trainer that writes a run and the tools that read it (`resd report`,
`resd compare`, `resd continual`), kept free of heavy imports so that reading a run
does not need torch. `docs/metrics.md` says what each column of the logs means.

    metrics.jsonl             one row per optimizer step (`PHASES`, `COUNTERS`, ...)
    samples.jsonl             the first `log_samples` rollouts of every step
    eval.jsonl                one row per evaluation (`EVAL_KEYS`)
    eval-step-NNNNNN.jsonl    every evaluation sample
    playbook_history.jsonl    the playbook's size and changes per step
    playbook.md / .json       the playbook
    config.yaml, summary.json the run's settings and its end
    config.json, model.safetensors, tokenizer files, (adapter_*)   the final model
    checkpoint-N/             see `resd.training.checkpoint`
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What a run writes at the top of its folder besides its logs (the final model, its card,
# the playbook, the summary, the config): a fresh run refuses a folder that holds any.
TOP_LEVEL_FILES = ("config.yaml", "README.md", "summary.json", "playbook.json", "playbook.md",
                   "config.json", "*.safetensors", "adapter_config.json", "tokenizer*", "*.jinja")  # fmt: skip

# config.yaml's first line when the run's environment was built in Python: its `env` key
# names the config's default, which did not run (`resd eval --config` reads it).
GIVEN_IN_PYTHON = "given in Python; the `env` below did not run"

# A `resd serve --output-dir`: the server's SQLite database (unless --db names another),
# and, with --learn, the learner's run folder.
SERVE_DB = "resd.db"
LEARNER_DIR = "learner"

# The JSON-lines logs of a run, cut back to the checkpoint's step when a run resumes.
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "playbook_history.jsonl")

# The accuracy metrics of every evaluation: per-task and per-test-case, mean and best of k.
EVAL_KEYS = ("task_mean@k", "task_best@k", "case_mean@k", "case_best@k")
# ... and, where a list of reward functions scores the replies, each one's mean under this
# prefix (`rewards/<name>`): their names are known only once a reply is scored.
REWARD_PREFIX = "rewards/"


def reward_keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The `rewards/<name>` columns of `rows`, in the order first seen."""
    return list(dict.fromkeys(k for row in rows for k in row if k.startswith(REWARD_PREFIX)))


def metric_keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The evaluation metrics in `rows`: `EVAL_KEYS` (all four, as every evaluation has
    them), then each `rewards/<name>` in the order first seen."""
    return [*EVAL_KEYS, *reward_keys(rows)]


def eval_metric_problem(name: object) -> str | None:
    """What makes `name` no evaluation metric, or None: one of `EVAL_KEYS` is, and so is a
    reward function's `rewards/<name>`, whose presence only an evaluation can tell."""
    if name in EVAL_KEYS or (isinstance(name, str) and name.startswith(REWARD_PREFIX)
                             and name.removeprefix(REWARD_PREFIX)):  # fmt: skip
        return None
    return (f"{name!r} is not an evaluation metric (one of {', '.join(EVAL_KEYS)}, or "
            f"{REWARD_PREFIX}<name> of a reward function)")  # fmt: skip


def eval_metric(row: dict[str, Any], name: str, option: str) -> float:
    """`row[name]` of an evaluation row, or an error that names `option` and the metrics
    the evaluation has: a `rewards/<name>` that the environment's scores do not carry
    (a typo, or an environment that scores in one piece)."""
    if name not in row:
        known = [key for key in row if key in EVAL_KEYS or key.startswith(REWARD_PREFIX)]
        raise ValueError(f"{option}: the evaluation has no metric {name!r} (it has "
                         f"{', '.join(known)})")  # fmt: skip
    return float(row[name])


# Phases timed in every step; metrics.jsonl has `time_<phase>` for each.
PHASES = ("rollout", "feedback", "reflect", "curate", "teacher", "update")

# Per-step counters of the reflection / curation machinery in metrics.jsonl.
COUNTERS = (
    "reflections",
    "reflections_parsed",  # a whole JSON object with diagnostic fields (not the fallback)
    "reflection_parse_failures",
    "reflection_loose_parses",
    "reflection_truncated",  # cut at reflection_max_new_tokens
    "reflection_fields_cut",  # diagnosis fields the token budget closed (transformers backend)
    "reflections_raw",  # unparsed replies handed on as raw text (unparsed_reflection: raw)
    "tag_replies",
    "tag_parse_failures",
    "tag_fields_cut",
    "curations",
    "curations_parsed",  # a reply whose operation list could be read
    "curation_parse_failures",
    "curation_truncated",
    "curation_fields_cut",  # reasoning and lessons the token budget closed
    "curations_effective",  # curation replies of which at least one operation was applied
    "reflection_tokens",  # tokens generated for reflections, success tags and curation
    "tag_tokens",
    "curation_tokens",
    "reflection_cached_tokens",  # reflection prompt tokens whose keys/values were reused
    "reflection_cache_hits",  # reflections whose prompt began with a cached sequence
    "tag_cached_tokens",  # (reflection_layout: conversation, or a server's prefix cache)
    "tags_applied",
    "ops_applied",
    "ops_skipped",
)

# Why curator operations were skipped (`ops_skipped_<reason>` in metrics.jsonl): the
# playbook's own checks, then the content guards of `resd.training.guards`.
SKIP_REASONS = (
    "malformed",
    "not_allowed",
    "unknown_id",
    "retired",  # merged away or deleted by an earlier reply of the same step
    "empty",
    "duplicate",
    "near_duplicate",  # mostly the same words as another entry (playbook_similarity)
    "too_short",
    "placeholder",
    "copies_task",
    "copies_feedback",
    "leaks_answer",
)

# Who reads the playbook, each under its own token budget (`<reader>_playbook_tokens`);
# `playbook_omitted_<reader>` counts the entries left out of that reader's view.
PLAYBOOK_READERS = ("reflection", "curation", "teacher")


def output_dir_problem(run_dir: Path) -> str | None:
    """Why a run could not make or write `run_dir`, or None: a file where the folder (or
    one above it) would be, or a folder it may not write in. Checked before a model loads:
    found at the first write, it cost the load and ended in a traceback."""
    folder = Path(run_dir).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if existing == folder and not folder.is_dir():
        return f"{run_dir} is a file, not a folder"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder, so {run_dir} cannot be made"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}"
    return None


def holds_run_logs(run_dir: Path) -> bool:
    """Whether a run has written to `run_dir` (any of `RUN_LOGS`), checkpoint or not."""
    return any((run_dir / name).exists() for name in RUN_LOGS)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, or [] if it does not exist.

    A run still in progress (or killed) may end in a half-written line; such lines are
    skipped with a warning instead of failing the reader.
    """
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: not valid JSON, skipped", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a summary, a checkpoint's state, an adapter's
    config), or a ValueError that says why not: json's for a file cut short, Python's
    UnicodeDecodeError for bytes that are not text, ours for JSON of another shape. Each
    caller says which file it was and the way on."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds a {type(data).__name__}, not a JSON object")
    return data


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json ({} where there is none), or a ValueError that names
    it and the way on. `resd compare` and `resd continual` reuse a finished run by it; a
    damaged one failed them with json's words alone ("Expecting value: line 1 column 1")
    or, as a list, with a traceback."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ValueError(
            f"{path}: cannot be read ({exc}); delete it and run the same command again: the "
            "run resumes from its last checkpoint and writes it anew"
        ) from None


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop rows written after `max_step` (the checkpoint a run resumes from: those steps
    will be redone); -1 drops every row."""
    if not path.exists():
        return
    kept = []
    # bytes that are not UTF-8 (a damaged log) failed every resume with Python's decode
    # error, naming no file; they are no row either, as for `read_jsonl`
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill, or damaged
        # a line of another shape is none of our rows (readers skip it): kept, as found
        if not isinstance(row, dict) or row.get("step", 0) <= max_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")  # replaced whole: a kill now cuts no log
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


def samples_per_step(config: dict[str, Any]) -> int:
    """Rollouts one step draws: batch_size × rollouts_per_prompt (TrainConfig's defaults
    where a key is missing, as the trainer would have used)."""
    from resd.config import TrainConfig  # torch-free

    batch = config.get("batch_size") or TrainConfig.batch_size
    return int(batch) * int(config.get("rollouts_per_prompt") or TrainConfig.rollouts_per_prompt)


def cumulative_samples(metrics: list[dict[str, Any]], config: dict[str, Any]) -> dict[int, int]:
    """Samples drawn up to and including each step (step 0: none), from the `rollouts`
    each step logged (the config's count for steps that did not log it)."""
    per_step = samples_per_step(config)
    drawn, total = {0: 0}, 0
    for row in sorted(metrics, key=lambda m: m.get("step", 0)):
        rollouts = row.get("rollouts")
        total += int(rollouts) if isinstance(rollouts, int | float) else per_step
        drawn[int(row["step"])] = total
    return drawn


def path_option(text: str) -> str:
    """An argparse `type` for a path option: an empty one is refused. `Path("")` is the
    working directory, so `--out ""` (an unset shell variable) wrote a comparison's run
    folders, or a server's database, among the user's own files."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def check_out_file(out: Path, what: str) -> None:
    """Fail now if `out` cannot be written as a file, with a message that starts `what:`.

    A command that finds out only when it writes would lose what it computed (an
    evaluation) or leave files behind (a report's PNGs). Nothing is created here: the
    nearest existing folder on the way to `out` must be one that may be written in.
    """
    if out.is_dir():
        raise ValueError(f"{what}: {out} is a directory; give a file path in it")
    folder = out.parent
    while not folder.exists():  # ends at the root or the working directory at the latest
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what}: cannot write {out}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: cannot write in {folder} (permission denied)")
    if out.exists() and not os.access(out, os.W_OK):
        raise ValueError(f"{what}: cannot overwrite {out} (permission denied)")


# ---- one writer per folder ------------------------------------------------------------------
# The folders this process writes, by (device, inode): [descriptor, holders]. A lock is an
# advisory `flock` on the folder's own descriptor, so there is no lock file to go stale:
# the kernel lets go when the process ends, killed or not.
_HELD: dict[tuple[int, int], list[int]] = {}


def hold_folder(folder: Path, what: str) -> Callable[[], None] | None:
    """Refuse `folder` if another process is writing to it, else hold it; returns the call
    that lets it go (the process's end does too), or None where nothing is held.

    Two processes writing one run folder (a `resd train --resume` started twice, a second
    `resd compare` on the same --out while the first still runs) interleave their logs and
    overwrite each other's checkpoints, and nothing said so. Within this process a folder
    may be held more than once (a Trainer built again to resume, in a notebook); a folder
    that does not exist, a system without `fcntl` or a filesystem without locks (some
    network mounts) is not guarded, as before."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    held = _HELD.get(key)
    if held is not None and os.fstat(held[0]).st_nlink == 0:  # a removed folder's inode, reused
        del _HELD[key]
        held = None
    if held is not None:
        os.close(fd)
        held[1] += 1
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileExistsError(
                f"{what}: another process is writing to {folder} (a run, `resd compare`, "
                f"`resd continual` or `resd serve --learn` still going); wait for it to end, "
                f"or choose another {what}"
            ) from None
        except OSError:
            os.close(fd)
            return None
        _HELD[key] = held = [fd, 1]
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        held[1] -= 1
        if held[1] == 0:
            if _HELD.get(key) is held:
                del _HELD[key]
            os.close(held[0])  # closing the descriptor lets go of the lock

    return release


@contextmanager
def holding(folder: Path, what: str) -> Iterator[None]:
    """`hold_folder` for the length of a `with` block."""
    release = hold_folder(folder, what)
    try:
        yield
    finally:
        if release is not None:
            release()
