"""The one loader for every environment that reads rows from a file or a dataset.

`load_rows` / `load_splits` read a Hugging Face Hub id, a local data file or directory, or
a `save_to_disk` folder; `rows_from_dataset` takes an in-memory `datasets.Dataset`. The
dataset-backed environment, the QA, code and IFEval environments all read through here,
so every one of them accepts the same formats and names a bad row the same way.

JSON and JSON-lines files are read directly: no Arrow cache, a column may mix strings,
numbers and lists (Arrow refuses that), and errors name the line. Everything else (csv,
tsv, parquet, arrow, directories, Hub ids, `save_to_disk` folders) goes through
`datasets`, which is imported only when needed.

Splits: a single local file holds one split, ``train``. A split may be sliced the way
`datasets` slices, ``train[:80%]`` or ``train[100:200]``, which also works for the files
read directly and for in-memory datasets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from resd.config import first_line
from resd.templating import from_where, read_text_file

__all__ = [
    "DATA_SUFFIXES",
    "Rows",
    "Span",
    "first_file",
    "load_rows",
    "load_splits",
    "rows_from_dataset",
    "split_span",
    "splits_overlap",
]

# File suffix -> the `datasets` builder that reads it.
DATA_SUFFIXES: dict[str, str] = {
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_READ_DIRECTLY = {".jsonl", ".ndjson", ".json"}
# `datasets`' split grammar, spaces allowed: `_canonical` removes them before `datasets`
# reads a spec (it refuses them), and bounds may group digits (`train[1_000:]`) as it allows.
# Specs such as ``train[:50%]+test`` or ``train[:33%](pct1_dropremainder)`` go to `datasets`.
_SPLIT = re.compile(
    r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d(?:_?\d)*%?)?\s*:\s*(-?\d(?:_?\d)*%?)?\s*\])?\s*$"
)
_ROUNDING = re.compile(r"\((?:closest|pct1_dropremainder)\)\s*$")


def _canonical(spec: str, field: str) -> str:
    """`spec` as `datasets` reads it, spaces removed (``train[ 2 : 5 ] + test`` ->
    ``train[2:5]+test``), or a ValueError naming `field` when a ``+`` part, its rounding
    cut, does not match `_SPLIT`: checked before anything loads."""
    parts = []
    for part in str(spec).split("+"):
        rounding = _ROUNDING.search(part)
        m = _SPLIT.match(part[: rounding.start()] if rounding else part)
        if m is None:
            raise ValueError(
                f"{field}: cannot read the split {spec!r}; write e.g. train or train[:80%]"
            )
        name, lo, hi = m.groups()
        sliced = f"[{lo or ''}:{hi or ''}]" if "[" in part else ""
        parts.append(name + sliced + (rounding.group().strip() if rounding else ""))
    return "+".join(parts)


class Span(NamedTuple):
    """Which rows of which underlying split a `Rows` holds: rows `start` to `stop - 1` of
    the split `split`, which has `total` rows (what ``train[700:]`` means once the length
    of ``train`` is known)."""

    split: str
    start: int
    stop: int
    total: int

    def shared(self, other: Span) -> range:
        """The rows of the underlying split that both hold (empty for different splits)."""
        if self.split != other.split:
            return range(0)
        return range(max(self.start, other.start), min(self.stop, other.stop))


@dataclass
class Rows:
    """The rows of one split, with what an error message needs to point at one of them."""

    records: list[dict[str, Any]]
    columns: list[str]
    source: str  # the file or dataset the rows came from
    split: str  # the split as asked for, slice included
    lines: list[int] | None = None  # 1-based line numbers, for JSON-lines files
    # Which rows of the underlying split these are; None where that is not known (a split
    # spec only `datasets` reads, such as ``train+test``).
    span: Span | None = None

    def __len__(self) -> int:
        return len(self.records)

    def where(self, i: int) -> str:
        """`file.jsonl:12` for JSON lines, `source [split] row 11` otherwise (0-based)."""
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} [{self.split}] row {i}"


def load_rows(path: str | Path | None, split: str = "train", **options: Any) -> Rows:
    """The rows of one split of a local file, directory or Hub dataset; `options` are
    `load_splits`'s keyword arguments (`name`, `data_files`, `required`, ...)."""
    return load_splits(path, [split], **options)[0]


def load_splits(
    path: str | Path | None,
    splits: Sequence[str] = ("train",),
    *,
    name: str | None = None,
    data_files: Any = None,
    cache_dir: str | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    required: Sequence[str] = (),
    field: str = "env_args.path",
    split_fields: Sequence[str] | None = None,
) -> list[Rows]:
    """Several splits of one dataset, read in a single pass.

    `path` is a local file (jsonl, json, csv, tsv, parquet, arrow), a local directory (data
    files, or a `save_to_disk` folder), a Hub id, or a `datasets` builder name such as
    "parquet" used with `data_files`; it may be None when `data_files` is given. `name`,
    `data_files`, `cache_dir` and `load_kwargs` go to `datasets.load_dataset`. A row that
    lacks a `required` key (or holds null there) is an error naming the row; `field` and
    `split_fields` are the argument names that error messages cite.
    """
    split_fields = list(split_fields or ["env_args.split"] * len(splits))
    splits = [_canonical(s, f) for s, f in zip(splits, split_fields, strict=True)]
    options = dict(load_kwargs or {})
    if path is None and data_files is None:
        raise ValueError(f"{field}: give a dataset: a local file or directory, or a Hub id")
    if path is None:
        path = _builder_for(data_files)
        source = Path(first_file(data_files)).name
    else:
        source = str(path)
    local = Path(str(path)).expanduser()
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix not in DATA_SUFFIXES:
            known = ", ".join(s[1:] for s in DATA_SUFFIXES)
            raise ValueError(f"{field}: cannot read {suffix or 'extensionless'} files; use {known}")
        if data_files is not None:
            raise ValueError("env_args.data_files: not with a single file as env_args.path")
    if local.is_dir() and any((local / f).is_file() for f in ("state.json", "dataset_dict.json")):
        rows = _from_disk(local, splits, split_fields, field)
    elif local.is_file() and local.suffix.lower() in _READ_DIRECTLY and not (name or options):
        rows = _json_splits(local, splits, split_fields, source, required)
    else:
        target = str(path)
        if local.is_file():  # a file goes to its builder: load_dataset("parquet", data_files=...)
            target, data_files = DATA_SUFFIXES[local.suffix.lower()], str(local)
            if local.suffix.lower() == ".tsv":
                options.setdefault("sep", "\t")
        elif local.is_dir():  # `datasets` names its cache after the folder, and "." has none
            target = str(local.resolve())
        elif _looks_local(target):
            raise ValueError(f"{field}: no such file: {path}{from_where(path)}")
        options.update(name=name, data_files=data_files, cache_dir=cache_dir)
        loaded = _load_dataset(target, splits, split_fields, field, source, options)
        rows = [
            _to_rows(ds, _loaded_span(ds, s), source, s)
            for ds, s in zip(loaded, splits, strict=True)
        ]
    for r in rows:
        _check_required(r, required)
    return rows


def rows_from_dataset(
    dataset: Any, splits: Sequence[str] = ("train",), split_fields: Sequence[str] | None = None
) -> list[Rows]:
    """Splits of an in-memory `datasets.Dataset` (its one split is "train") or DatasetDict."""
    split_fields = list(split_fields or ["env_args.split"] * len(splits))
    splits = [_canonical(s, f) for s, f in zip(splits, split_fields, strict=True)]
    try:
        import datasets
    except ImportError as exc:  # nobody holds a Dataset without the package, but say so
        raise ValueError("dataset: needs the 'datasets' package (pip install datasets)") from exc
    if isinstance(dataset, datasets.DatasetDict):
        available = dict(dataset)
    elif isinstance(dataset, datasets.Dataset):
        available = {"train": dataset}
    elif isinstance(dataset, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError("dataset: streaming datasets are not supported; load it without streaming")
    else:
        raise ValueError(
            f"dataset: expected a datasets.Dataset or DatasetDict, got {type(dataset).__name__} "
            "(a list of dicts becomes one with datasets.Dataset.from_list(rows))"
        )
    return [
        _to_rows(*_select(available, s, f, "the dataset"), "the dataset", s)
        for s, f in zip(splits, split_fields, strict=True)
    ]


def _read_json(
    path: Path, required: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows of a JSON-lines file (with line numbers), or of a .json file holding a list."""
    text = read_text_file(path, "env_args.path")
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # not one document: JSON lines in a .json file, as datasets allows
        if isinstance(whole, list):
            for i, rec in enumerate(whole):
                if not isinstance(rec, dict):
                    need = _need(required) if required else "need a JSON object"
                    raise ValueError(f"{path} [train] row {i}: {need}")
            return whole, None
        if isinstance(whole, dict) and len(text.strip().splitlines()) > 1:
            raise ValueError(
                f"{path}: one JSON object, not rows; if the rows sit under a key, set "
                "env_args.load_kwargs.field to that key"
            )
    records, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):  # blank and comment lines
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from exc
        if not isinstance(rec, dict):
            need = _need(required) if required else "need a JSON object"
            raise ValueError(f"{where}: {need}, got {type(rec).__name__}")
        records.append(rec)
        lines.append(lineno)
    return records, lines


def _json_splits(
    path: Path,
    splits: Sequence[str],
    split_fields: Sequence[str],
    source: str,
    required: Sequence[str],
) -> list[Rows]:
    """Splits (slices of "train") of a JSON or JSON-lines file, read once."""
    records, lines = _read_json(path, required)
    numbered = list(zip(lines or range(len(records)), records, strict=True))
    out = []
    for spec, field in zip(splits, split_fields, strict=True):
        chosen, span = _select({"train": numbered}, spec, field, source)
        numbers = [n for n, _ in chosen] if lines else None
        out.append(_filled(Rows([rec for _, rec in chosen], [], source, spec, numbers, span)))
    return out


def _filled(rows: Rows) -> Rows:
    """Give every row every column (None where absent), as `datasets` does."""
    columns: dict[str, None] = {}
    for rec in rows.records:
        columns.update(dict.fromkeys(rec))
    rows.columns = list(columns)
    rows.records = [{c: rec.get(c) for c in rows.columns} for rec in rows.records]
    return rows


def _need(required: Sequence[str]) -> str:
    keys = [f'"{k}"' for k in required]
    listed = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
    return f"need an object with {listed}"


def _check_required(rows: Rows, required: Sequence[str]) -> None:
    if not required:
        return
    for i, rec in enumerate(rows.records):
        if any(rec.get(k) is None for k in required):
            raise ValueError(f"{rows.where(i)}: {_need(required)}")


def splits_overlap(a: str, b: str) -> bool:
    """Whether two split specs surely share rows, whatever the split's length.

    True for the same split written twice (spacing aside), for a split and a slice of it
    (``train`` and ``train[:50%]``), and for percent slices of one split whose ranges
    meet; this is the check before anything is loaded. Slices with row numbers are left
    to `Span.shared` once the rows are loaded (see `Rows.span`), since whether they meet
    depends on the length. A spec that does not parse is `_select`'s to report.
    """
    ma, mb = _SPLIT.match(str(a)), _SPLIT.match(str(b))
    if not ma or not mb or ma.group(1) != mb.group(1):
        return False
    if "[" not in str(a) or "[" not in str(b):
        return True
    (lo_a, hi_a), (lo_b, hi_b) = ma.groups()[1:], mb.groups()[1:]
    if (lo_a, hi_a) == (lo_b, hi_b):
        return True
    bounds = [lo_a, hi_a, lo_b, hi_b]
    if not all(x is None or (x.endswith("%") and not x.startswith("-")) for x in bounds):
        return False

    def pct(x: str | None, default: int) -> int:
        return default if x is None else int(x[:-1])

    return max(pct(lo_a, 0), pct(lo_b, 0)) < min(pct(hi_a, 100), pct(hi_b, 100))


def split_span(spec: str, total: int) -> Span | None:
    """The rows that `spec` (``train``, ``train[:80%]``, ``train[-300:]``) selects from a
    split of `total` rows, or None for a spec that does not parse.

    The one place where slice bounds become row numbers, as `datasets` reads them: a
    percentage rounds to the nearest row (one ``%`` makes both bounds percentages), a
    negative bound counts from the end, bounds past either end are clipped (as in Python).
    """
    m = _SPLIT.match(str(spec))
    if not m:
        return None
    split_name, lo, hi = m.groups()

    def bound(text: str | None) -> int | None:
        if text is None:
            return None
        return round(total * int(text.rstrip("%")) / 100) if "%" in f"{lo}{hi}" else int(text)

    chosen = range(total)[slice(bound(lo), bound(hi))]
    return Span(split_name, chosen.start, chosen.stop, total)


def _select(available: Mapping[str, Any], spec: str, field: str, source: str) -> tuple[Any, Span]:
    """`train`, `train[:80%]`, `test[10:-5]` from named splits (lists or Datasets), and
    which rows of the split they are."""
    m = _SPLIT.match(str(spec))
    if not m:
        raise ValueError(
            f"{field}: cannot read the split {spec!r}; write e.g. train or train[:80%]"
        )
    split_name = m.group(1)
    if any(b and b.endswith("%") and abs(int(b[:-1])) > 100 for b in m.groups()[1:]):
        raise ValueError(  # `datasets` refuses these for the sources it loads itself
            f"{field}: the split {spec!r} has a percentage outside -100% to 100%"
        )
    if split_name not in available:
        raise ValueError(
            f"{field}: {source} has no split {split_name!r}; it has {', '.join(available)}"
        )
    data = available[split_name]
    span = split_span(spec, len(data))
    assert span is not None  # the spec parsed above
    if "[" not in str(spec):
        return data, span
    if isinstance(data, list):
        return data[span.start : span.stop], span
    # `Dataset.select(range(n, n))` raises IndexError on a split of n rows: empty is []
    chosen = range(span.start, span.stop)
    return data.select(chosen if chosen else []), span


def _loaded_span(ds: Any, spec: str) -> Span | None:
    """Which rows of its split a Dataset that `datasets.load_dataset` sliced holds: the
    split's length is in the dataset's info; None where it is not, or does not agree."""
    m = _SPLIT.match(str(spec))
    splits = getattr(getattr(ds, "info", None), "splits", None) or {}
    info = splits.get(m.group(1)) if m else None
    total = getattr(info, "num_examples", None)
    if not isinstance(total, int):
        return None
    span = split_span(spec, total)
    return span if span is not None and len(range(span.start, span.stop)) == len(ds) else None


def _to_rows(ds: Any, span: Span | None, source: str, split: str) -> Rows:
    return Rows(ds.to_list(), list(ds.column_names), source, split, span=span)


def _from_disk(
    path: Path, splits: Sequence[str], split_fields: Sequence[str], field: str
) -> list[Rows]:
    datasets = _import_datasets(field, "a save_to_disk folder")
    data = datasets.load_from_disk(str(path))
    available = dict(data) if isinstance(data, datasets.DatasetDict) else {"train": data}
    return [
        _to_rows(*_select(available, s, f, str(path)), str(path), s)
        for s, f in zip(splits, split_fields, strict=True)
    ]


def _import_datasets(field: str, what: str) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(
            f"{field}: reading {what} needs the 'datasets' package (pip install datasets)"
        ) from exc
    return datasets


def _load_dataset(
    path: str,
    splits: Sequence[str],
    split_fields: Sequence[str],
    field: str,
    source: str,
    kwargs: Mapping[str, Any],
) -> list[Any]:
    """`datasets.load_dataset(path, **kwargs)` for all splits at once, errors as ValueErrors."""
    datasets = _import_datasets(field, repr(source))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        loaded = datasets.load_dataset(path, split=list(splits), **kwargs)
    except Exception as exc:
        unknown = re.search(r'Unknown split "([^"]+)"', str(exc))
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(exc))
        culprit = field
        if unknown or empty:
            named = [
                f
                for s, f in zip(splits, split_fields, strict=True)
                if (empty and s == empty.group(1))
                or (unknown and _SPLIT.match(s) and _SPLIT.match(s).group(1) == unknown.group(1))
            ]
            culprit = named[0] if named else split_fields[0]
        if empty:  # the message every other source gives for a slice past the end
            raise ValueError(f"{culprit}: {source} [{empty.group(1)}] has no rows") from exc
        # datasets wraps a parser's error in "An error occurred while generating the
        # dataset": the cause (pandas' "EOF inside string starting at row 1") says what
        cause = exc.__cause__
        cause = f" ({type(cause).__name__}: {first_line(cause)})" if cause else ""
        raise ValueError(f"{culprit}: cannot load {source!r}: {exc}{cause}") from exc
    if any(
        isinstance(ds, (datasets.IterableDataset, datasets.IterableDatasetDict)) for ds in loaded
    ):
        raise ValueError("env_args.load_kwargs: streaming datasets are not supported")
    return list(loaded)


def first_file(data_files: Any) -> str:
    if isinstance(data_files, Mapping):
        data_files = next(iter(data_files.values()), "")
    if isinstance(data_files, (list, tuple)):
        data_files = data_files[0] if data_files else ""
    return str(data_files)


def _builder_for(data_files: Any) -> str:
    suffix = Path(first_file(data_files)).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(
            f"env_args.data_files: cannot tell the format of {first_file(data_files)!r}; "
            "set env_args.path to json, csv or parquet"
        )
    return DATA_SUFFIXES[suffix]


def _looks_local(path: str) -> bool:
    """A path nobody would take for a Hub id: a data suffix, absolute, ./ ~/, two slashes."""
    return (
        Path(path).suffix.lower() in DATA_SUFFIXES
        or path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
    )
