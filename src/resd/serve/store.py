"""The serving database: model versions, completions, feedback and the learner's state.

Why a real database rather than JSON-lines files: the server writes from many request
threads while a learner reads and marks rows from another thread (or process), and the
"train on each piece of feedback exactly once" rule needs transactions. SQLAlchemy Core
keeps one code path for SQLite (the default, a file beside the run) and any server
database (`postgresql+psycopg://user:pw@host/db`).

SQLite connections are switched to WAL journaling (readers never block the writer, so
the page and the learner can read while requests are recorded), get a `busy_timeout`
(a writer waits for the lock instead of failing at once) and enforce foreign keys, so
SQLite and PostgreSQL reject the same rows.

Schema (version 1; all times are naive UTC)
-------------------------------------------

    schema_version   version INT PK, applied_at DATETIME
                     one row per schema version applied; the current one is the highest
    model_versions   id TEXT PK, created_at, parent TEXT NULL, step INT,
                     accuracy REAL NULL, note TEXT
                     every set of weights the server has served ("base", then the learner's)
    interactions     id TEXT PK (the completion id, "chatcmpl-…"), created_at,
                     model_version TEXT FK → model_versions.id, model_name TEXT,
                     messages JSON ([{role, content}]), params JSON (temperature, top_p,
                     max_tokens, seed, stream; response_format, stop, logprobs,
                     top_logprobs, the penalties, logit_bias, n and choice when given),
                     response TEXT (a NUL character in it, which PostgreSQL's text
                     cannot hold, is stored as U+FFFD; the token ids are exact),
                     prompt_token_ids JSON,
                     response_token_ids JSON, response_logprobs JSON NULL (the sampler's
                     log π of each sampled token at temperature 1; NULL for greedy
                     decoding), finish_reason TEXT ("stop" or "length")
    feedback         id INT PK autoincrement, completion_id TEXT FK → interactions.id,
                     source TEXT, reward REAL NULL, score REAL NULL (both in [0, 1]),
                     feedback TEXT, created_at, consumed_step INT NULL (the learner step
                     that trained on it; NULL = not yet used); UNIQUE (completion_id, source)
    learner_state    key TEXT PK, value JSON (e.g. "cursor": where the learner stands)

Feedback is idempotent per (completion, source), so a client may retry a post safely:

* the first post creates the row (`created=True`; HTTP 201);
* posting the same reward, score and text again returns the existing row unchanged
  (`created=False`; HTTP 200);
* posting different content before the learner consumed the row replaces it in place
  (same id, `created=False`; HTTP 200): the learner will train on the latest word;
* posting different content after the row was consumed raises `FeedbackConflict`
  (HTTP 409): the training it fed cannot be undone, and silently keeping two versions
  would make the record disagree with what was learned. Post under another `source`.

A replacement that lands between the learner reading a row (`unconsumed`) and marking it
(`mark_consumed`) is marked consumed with its new content; the window is one step.

Versioning and migration
------------------------

`SCHEMA_VERSION` is the version this code writes. Opening a database:

* empty: every table is created and version 1..SCHEMA_VERSION recorded;
* at SCHEMA_VERSION: used as is;
* older: each step in `MIGRATIONS` (version N-1 → N) runs, in order, in one transaction,
  and its version is recorded; a failed migration leaves the database as it was;
* newer than this code, or holding our tables but no `schema_version`: refused with
  `SchemaVersionError` (upgrade resd, or point `--db` elsewhere) rather than guessed at.

To change the schema: bump `SCHEMA_VERSION`, change the tables below to the new shape
(what a fresh database gets), add `MIGRATIONS[new] = function(connection)` that brings a
version-(new-1) database to the same shape (`ALTER TABLE ... ADD COLUMN ...`), describe
the change in this docstring, and add a test that opens a database of the old version.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from resd.config import is_finite_number
from resd.serve import missing_extra

try:
    import sqlalchemy as sa
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.pool import StaticPool
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise missing_extra("sqlalchemy", _exc) from _exc

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "FeedbackConflict",
    "InvalidField",
    "SchemaVersionError",
    "Store",
    "TrainingRow",
    "sqlite_url",
]

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_MS = 10_000

# version N -> the function that upgrades a version N-1 database (none yet: 1 is the first)
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


class SchemaVersionError(ValueError):
    """The database was written by another (newer, or unversioned) schema."""


class InvalidField(ValueError):
    """A value the store refuses, its field named first in the message and kept as
    `field`: the server answers it as a 400 whose `param` is that field, so a check made
    here is not repeated there."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class FeedbackConflict(Exception):
    """Different feedback for a (completion, source) whose row a learner already used."""

    def __init__(self, existing: dict[str, Any]) -> None:
        super().__init__(
            f"feedback from {existing['source']!r} on {existing['completion_id']} was already "
            f"used for training at step {existing['consumed_step']}; it cannot be changed "
            "(post under another source)"
        )
        self.existing = existing


@dataclass(frozen=True)
class TrainingRow:
    """One feedback row joined with the completion it judges: what a learner trains on."""

    feedback_id: int
    completion_id: str
    model_version: str
    messages: list[dict[str, str]]
    response: str
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float] | None
    reward: float | None
    score: float | None
    feedback: str
    source: str
    finish_reason: str = "stop"  # "length": the reply was cut at max_tokens, not ended by EOS


_JSON = sa.JSON(none_as_null=True)  # None is SQL NULL, not the JSON text 'null'

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("parent", sa.String(200), nullable=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("accuracy", sa.Float, nullable=True),
    sa.Column("note", sa.Text, nullable=False, default=""),
)
interactions = sa.Table(
    "interactions",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("created_at", sa.DateTime, nullable=False, index=True),
    sa.Column("model_version", sa.String(200), sa.ForeignKey("model_versions.id"), nullable=False),
    sa.Column("model_name", sa.String(500), nullable=False),
    sa.Column("messages", _JSON, nullable=False),
    sa.Column("params", _JSON, nullable=False),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("prompt_token_ids", _JSON, nullable=False),
    sa.Column("response_token_ids", _JSON, nullable=False),
    sa.Column("response_logprobs", _JSON, nullable=True),
    sa.Column("finish_reason", sa.String(32), nullable=False),
)
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("completion_id", sa.String(100), sa.ForeignKey("interactions.id"), nullable=False),
    sa.Column("source", sa.String(100), nullable=False),
    sa.Column("reward", sa.Float, nullable=True),
    sa.Column("score", sa.Float, nullable=True),
    sa.Column("feedback", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("consumed_step", sa.Integer, nullable=True, index=True),
    sa.UniqueConstraint("completion_id", "source", name="uq_feedback_completion_source"),
)
learner_state = sa.Table(
    "learner_state",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", _JSON, nullable=True),
)
OUR_TABLES = ("model_versions", "interactions", "feedback", "learner_state")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _iso(moment: datetime | None) -> str | None:
    """Times leave the store as ISO-8601 UTC strings: JSON-ready, and unambiguous."""
    return None if moment is None else moment.isoformat(timespec="milliseconds") + "Z"


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def _is_memory_sqlite(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _recorded_version(conn: Connection) -> int:
    """The newest schema version the database records (0: none)."""
    return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)


def _sqlite_reading(dbapi_connection: Any, _record: Any) -> None:
    """A reader's connection: waits for a writer's lock, and sets nothing in the file."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Run on every new SQLite connection: WAL, wait for locks, enforce foreign keys."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is None and b is None)


def _check_number(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not is_finite_number(value):
        raise InvalidField(name, f"expected a finite number or None, got {value!r}")
    return float(value)


def _check_unit(name: str, value: float | None) -> float | None:
    """A reward or score: in [0, 1], as the trainer's `Score` reads them. A reward of 5
    would count as a success and scale the learner's policy gradient fivefold; a score
    of 7 would be clamped to 1 without a word. Refused here, so no row holds either."""
    value = _check_number(name, value)
    if value is not None and not 0.0 <= value <= 1.0:
        raise InvalidField(name, f"expected a number from 0 to 1 or None, got {value!r}")
    return value


def _check_text(name: str, text: str) -> None:
    """Text a TEXT column can hold on every database, else an `InvalidField` (the driver
    would fail mid-transaction): a lone UTF-16 surrogate (`"\\ud800"` from
    JSON) has no UTF-8 form, and PostgreSQL's text cannot hold a NUL character (refused
    on SQLite too, so both databases take the same rows)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidField(
            name, f"not valid Unicode text (a lone UTF-16 surrogate at index {exc.start})"
        ) from exc
    at = text.find("\x00")
    if at >= 0:
        raise InvalidField(
            name, f"contains a NUL character (at index {at}), which PostgreSQL's text cannot hold"
        )


class Store:
    """The database behind `resd serve`; safe to share between threads.

    `url` is any SQLAlchemy URL, or a plain file path (taken as SQLite). An in-memory
    SQLite database (`sqlite://`) is one connection shared by every thread, so its
    operations are serialised by a lock; use a file for anything but quick experiments.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        """`read_only` (what `resd report` opens): no schema is made or migrated and no
        journal mode set, so a file that is not a resd database (emptied, another
        program's) is refused as it is; opened to write, it was given resd's tables."""
        if "://" not in url:  # a plain path: its folder is made below, as for an sqlite:/// URL
            url = sqlite_url(url)
        parsed = sa.make_url(url)
        self.url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        options: dict[str, Any] = {}
        self._lock: threading.Lock | None = None
        if _is_memory_sqlite(parsed):
            options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
            self._lock = threading.Lock()
        elif self.dialect == "sqlite" and parsed.database and not read_only:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = sa.create_engine(parsed, **options)
        if self.dialect == "sqlite":
            sa.event.listen(
                self.engine, "connect", _sqlite_pragmas if not read_only else _sqlite_reading
            )
        try:
            self._check_schema() if read_only else self._init_schema()
        except Exception:
            self.engine.dispose()
            raise

    # ---- plumbing ------------------------------------------------------------------------------
    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """A transaction: committed when the block ends, rolled back on an exception."""
        with self._lock or nullcontext(), self.engine.begin() as connection:
            yield connection

    def _init_schema(self) -> None:
        with self._begin() as conn:
            if self.dialect == "sqlite":
                # pysqlite opens no transaction before DDL: without this, a failed migration
                # stays half done (and two processes creating one database race)
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            tables = set(sa.inspect(conn).get_table_names())
            if "schema_version" not in tables:
                if tables & set(OUR_TABLES):
                    raise SchemaVersionError(
                        f"database {self.url} holds resd tables but no schema_version table; "
                        "it was not written by this version of resd serve"
                    )
                metadata.create_all(conn)
                conn.execute(
                    schema_version.insert(),
                    [{"version": v, "applied_at": _now()} for v in range(1, SCHEMA_VERSION + 1)],
                )
                return
            found = _recorded_version(conn)
            if found > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"database {self.url} has schema version {found}, newer than the {SCHEMA_VERSION} "
                    "this resd understands; upgrade resd, or use another database (--db)"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                if version not in MIGRATIONS:
                    raise SchemaVersionError(
                        f"database {self.url} has schema version {found}; no migration to "
                        f"version {version} is known"
                    )
                MIGRATIONS[version](conn)
                conn.execute(schema_version.insert().values(version=version, applied_at=_now()))

    def _check_schema(self) -> None:
        """A database to read as it is: resd's tables, at this resd's schema version."""
        with self._begin() as conn:
            if "schema_version" not in set(sa.inspect(conn).get_table_names()):
                raise SchemaVersionError(f"database {self.url} holds no resd serve tables")
            found = _recorded_version(conn)
        if found != SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database {self.url} has schema version {found}, not the {SCHEMA_VERSION} this "
                "resd reads; `resd serve` on it upgrades an older one"
            )

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._begin() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar())

    def journal_mode(self) -> str | None:
        """SQLite's journal mode ('wal' once opened here); None for other databases."""
        if self.dialect != "sqlite":
            return None
        with self._begin() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()

    def close(self) -> None:
        self.engine.dispose()

    # ---- model versions --------------------------------------------------------------------------
    def add_version(
        self,
        version_id: str,
        *,
        parent: str | None,
        step: int,
        accuracy: float | None = None,
        note: str = "",
    ) -> None:
        """Register weights about to be served. Adding an id again updates it in place
        (its creation time stays): parent and step are replaced, accuracy and note only
        when given (not None / not ""), so a restarted server can register its base model
        again without erasing what was measured, and a learner can add an accuracy later."""
        accuracy = _check_number("accuracy", accuracy)
        values: dict[str, Any] = {"parent": parent, "step": int(step)}
        changes = dict(values)
        if accuracy is not None:
            changes["accuracy"] = accuracy
        if note:
            changes["note"] = note
        with self._begin() as conn:
            updated = conn.execute(
                model_versions.update().where(model_versions.c.id == version_id).values(**changes)
            ).rowcount
            if not updated:
                conn.execute(model_versions.insert().values(
                    id=version_id, created_at=_now(), accuracy=accuracy, note=note, **values
                ))  # fmt: skip

    def versions(self) -> list[dict[str, Any]]:
        """Every registered version, oldest first."""
        query = sa.select(model_versions).order_by(model_versions.c.created_at, model_versions.c.id)
        with self._begin() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**row, "created_at": _iso(row["created_at"])} for row in rows]

    # ---- interactions ------------------------------------------------------------------------------
    def record_interaction(
        self,
        *,
        completion_id: str,
        model_version: str,
        model_name: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        response: str,
        prompt_token_ids: list[int],
        response_token_ids: list[int],
        response_logprobs: list[float] | None,
        finish_reason: str,
    ) -> None:
        """Store one completion. `model_version` must have been registered (`add_version`)."""
        with self._begin() as conn:
            conn.execute(
                interactions.insert().values(
                    id=completion_id, created_at=_now(), model_version=model_version,
                    model_name=model_name, messages=messages, params=params,
                    response=response.replace("\x00", "\ufffd"),  # see the module docstring
                    prompt_token_ids=list(prompt_token_ids), response_token_ids=list(response_token_ids),
                    response_logprobs=None if response_logprobs is None else list(response_logprobs),
                    finish_reason=finish_reason,
                )
            )  # fmt: skip

    def interaction(self, completion_id: str) -> dict[str, Any] | None:
        """One stored completion, every column, with its feedback rows; None if unknown."""
        with self._begin() as conn:
            row = conn.execute(
                sa.select(interactions).where(interactions.c.id == completion_id)
            ).mappings().first()  # fmt: skip
            if row is None:
                return None
            rows = conn.execute(
                sa.select(feedback).where(feedback.c.completion_id == completion_id)
                .order_by(feedback.c.id)
            ).mappings().all()  # fmt: skip
        return {**row, "created_at": _iso(row["created_at"]),
                "feedback": [self._feedback_dict(r) for r in rows]}  # fmt: skip

    def recent(self, n: int) -> list[dict[str, Any]]:
        """The latest `n` completions, newest first, each with its feedback (for the page);
        token ids and log-probs are left out, their counts kept."""
        columns = [c for c in interactions.c if c.name not in
                   ("prompt_token_ids", "response_token_ids", "response_logprobs")]  # fmt: skip
        query = (
            sa.select(*columns, interactions.c.prompt_token_ids, interactions.c.response_token_ids)
            .order_by(interactions.c.created_at.desc(), interactions.c.id.desc())
            .limit(max(0, int(n)))
        )
        with self._begin() as conn:
            rows = conn.execute(query).mappings().all()
            ids = [row["id"] for row in rows]
            notes = conn.execute(
                sa.select(feedback).where(feedback.c.completion_id.in_(ids)).order_by(feedback.c.id)
            ).mappings().all() if ids else []  # fmt: skip
        by_completion: dict[str, list[dict[str, Any]]] = {}
        for note in notes:
            by_completion.setdefault(note["completion_id"], []).append(self._feedback_dict(note))
        out = []
        for row in rows:
            item = {k: v for k, v in row.items() if not k.endswith("_token_ids")}
            item.update(created_at=_iso(row["created_at"]), prompt_tokens=len(row["prompt_token_ids"]),
                        completion_tokens=len(row["response_token_ids"]),
                        feedback=by_completion.get(row["id"], []))  # fmt: skip
            out.append(item)
        return out

    # ---- feedback ------------------------------------------------------------------------------------
    @staticmethod
    def _feedback_dict(row: Any) -> dict[str, Any]:
        return {**row, "created_at": _iso(row["created_at"])}

    def _feedback_row(self, conn: Connection, completion_id: str, source: str) -> Any:
        return conn.execute(
            sa.select(feedback).where(
                feedback.c.completion_id == completion_id, feedback.c.source == source
            )
        ).mappings().first()  # fmt: skip

    def record_feedback(
        self,
        completion_id: str,
        *,
        source: str,
        reward: float | None,
        score: float | None,
        feedback: str,
    ) -> tuple[dict[str, Any], bool]:
        """Record feedback on a completion: (the row, whether it was created). The rules
        per (completion, source) are in the module docstring. Raises KeyError for an
        unknown completion, `InvalidField` for a value no row may hold and
        `FeedbackConflict` for a change to a consumed row."""
        reward, score = _check_unit("reward", reward), _check_unit("score", score)
        if not source:
            raise InvalidField("source", "must be a non-empty string")
        for name, text in (("completion_id", completion_id), ("source", source),
                           ("feedback", feedback)):  # fmt: skip
            _check_text(name, text)
        for _attempt in range(3):  # a concurrent first post of the same row: read it back
            try:
                return self._record_feedback_once(completion_id, source, reward, score, feedback)
            except IntegrityError:
                continue
        raise RuntimeError(f"feedback on {completion_id} from {source!r}: kept colliding")

    def _record_feedback_once(
        self, completion_id: str, source: str, reward: float | None, score: float | None, text: str
    ) -> tuple[dict[str, Any], bool]:
        with self._begin() as conn:
            known = conn.execute(
                sa.select(interactions.c.id).where(interactions.c.id == completion_id)
            ).first()
            if known is None:
                raise KeyError(completion_id)
            row = self._feedback_row(conn, completion_id, source)
            if row is None:
                conn.execute(feedback.insert().values(
                    completion_id=completion_id, source=source, reward=reward, score=score,
                    feedback=text, created_at=_now(), consumed_step=None,
                ))  # fmt: skip
                return self._feedback_dict(self._feedback_row(conn, completion_id, source)), True
            if (
                _same(row["reward"], reward)
                and _same(row["score"], score)
                and row["feedback"] == text
            ):
                return self._feedback_dict(row), False
            if row["consumed_step"] is not None:
                raise FeedbackConflict(self._feedback_dict(row))
            changed = conn.execute(
                feedback.update()
                .where(feedback.c.id == row["id"], feedback.c.consumed_step.is_(None))
                .values(reward=reward, score=score, feedback=text)
            ).rowcount
            current = self._feedback_row(conn, completion_id, source)
            if not changed:  # consumed between our read and our update
                raise FeedbackConflict(self._feedback_dict(current))
            return self._feedback_dict(current), False

    def unconsumed(self, limit: int) -> list[TrainingRow]:
        """Feedback no learner step has used yet, oldest first, joined with its completion."""
        query = (
            sa.select(feedback, interactions)
            .join(interactions, feedback.c.completion_id == interactions.c.id)
            .where(feedback.c.consumed_step.is_(None))
            .order_by(feedback.c.id)
            .limit(max(0, int(limit)))
        )
        with self._begin() as conn:
            rows = conn.execute(query).all()
        out = []
        for row in rows:
            fb, it = row._mapping, row._mapping  # columns by Column object: no name clashes
            out.append(TrainingRow(
                feedback_id=fb[feedback.c.id], completion_id=fb[feedback.c.completion_id],
                model_version=it[interactions.c.model_version], messages=it[interactions.c.messages],
                response=it[interactions.c.response], prompt_token_ids=it[interactions.c.prompt_token_ids],
                response_token_ids=it[interactions.c.response_token_ids],
                response_logprobs=it[interactions.c.response_logprobs], reward=fb[feedback.c.reward],
                score=fb[feedback.c.score], feedback=fb[feedback.c.feedback], source=fb[feedback.c.source],
                finish_reason=it[interactions.c.finish_reason],
            ))  # fmt: skip
        return out

    def mark_consumed(
        self, feedback_ids: list[int], step: int, cursor: dict[str, Any] | None = None
    ) -> None:
        """In one transaction: these rows were trained on at `step`, and (unless None)
        `learner_state['cursor']` becomes `cursor`; a crash leaves neither or both."""
        with self._begin() as conn:
            if feedback_ids:
                conn.execute(
                    feedback.update().where(feedback.c.id.in_([int(i) for i in feedback_ids]))
                    .values(consumed_step=int(step))
                )  # fmt: skip
            if cursor is not None:
                self._put_state(conn, "cursor", cursor)

    # ---- learner state ---------------------------------------------------------------------------------
    def get_state(self, key: str) -> Any:
        """A learner value; None when never set."""
        with self._begin() as conn:
            return conn.execute(
                sa.select(learner_state.c.value).where(learner_state.c.key == key)
            ).scalar()

    def set_state(self, key: str, value: Any) -> None:
        with self._begin() as conn:
            self._put_state(conn, key, value)

    @staticmethod
    def _put_state(conn: Connection, key: str, value: Any) -> None:
        """Upsert as update-then-insert: portable to any database SQLAlchemy speaks."""
        updated = conn.execute(
            learner_state.update().where(learner_state.c.key == key).values(value=value)
        ).rowcount
        if not updated:
            conn.execute(learner_state.insert().values(key=key, value=value))

    # ---- summary -------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """How many interactions, feedback rows, consumed feedback rows and versions."""
        count = sa.func.count()
        with self._begin() as conn:
            return {
                "interactions": int(conn.execute(sa.select(count).select_from(interactions)).scalar()),
                "feedback": int(conn.execute(sa.select(count).select_from(feedback)).scalar()),
                "consumed": int(conn.execute(
                    sa.select(count).select_from(feedback).where(feedback.c.consumed_step.is_not(None))
                ).scalar()),
                "versions": int(conn.execute(sa.select(count).select_from(model_versions)).scalar()),
            }  # fmt: skip
