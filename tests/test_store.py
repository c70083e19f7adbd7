"""The serving store on its own: a real SQLite database in tmp_path and a real PostgreSQL
server (tests/conftest.py), called directly the way the server and the learner call it
(feedback rules, the learner's rows, state, schema)."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

sa = pytest.importorskip("sqlalchemy", reason="needs the serve extra: pip install 'resd[serve]'")

from resd.serve import store as store_module  # noqa: E402
from resd.serve.store import (  # noqa: E402
    FeedbackConflict,
    SchemaVersionError,
    Store,
    TrainingRow,
    sqlite_url,
)

MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


def _interaction(store: Store, completion_id: str, *, version: str = "base", **extra: Any) -> None:
    values: dict[str, Any] = dict(
        completion_id=completion_id, model_version=version, model_name="m", messages=MESSAGES,
        params={"temperature": 1.0}, response="7", prompt_token_ids=[1, 2, 3],
        response_token_ids=[4, 5], response_logprobs=[-0.1, -0.2], finish_reason="stop",
    )  # fmt: skip
    values.update(extra)
    store.record_interaction(**values)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on both databases the store supports: an SQLite file and a real
    PostgreSQL server (tests/conftest.py), which must accept and refuse the same rows."""
    if request.param == "sqlite":
        return str(tmp_path / "resd.db")
    return str(request.getfixturevalue("postgres_url"))


def _engine(database_url: str) -> sa.engine.Engine:
    """A second connection to the test's database, as a user's own SQL would open one."""
    return sa.create_engine(database_url if "://" in database_url else sqlite_url(database_url))


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    opened = Store(database_url)
    opened.add_version("base", parent=None, step=0)
    yield opened
    opened.close()


def _post(store: Store, completion_id: str, **note: Any) -> tuple[dict[str, Any], bool]:
    values: dict[str, Any] = {"source": "user", "reward": 1.0, "score": None, "feedback": "right"}
    values.update(note)
    return store.record_feedback(completion_id, **values)


# ---- feedback --------------------------------------------------------------------------------------------
def test_feedback_that_clears_a_reward_is_a_change_not_a_retry(store: Store) -> None:
    """Posting reward=None over reward=0.5 (same text) must replace the row, and once the row
    is consumed it must be a conflict: it is different content, not a retry."""
    _interaction(store, "chatcmpl-a")
    first, created = _post(store, "chatcmpl-a", reward=0.5, score=0.25)
    assert created
    cleared, created = _post(store, "chatcmpl-a", reward=None, score=0.25)
    assert not created and cleared["id"] == first["id"] and cleared["reward"] is None
    back, _ = _post(store, "chatcmpl-a", reward=0.5, score=None)
    assert back["reward"] == 0.5 and back["score"] is None
    store.mark_consumed([back["id"]], step=1)
    with pytest.raises(FeedbackConflict) as caught:
        _post(store, "chatcmpl-a", reward=0.5, score=0.25)
    assert caught.value.existing["consumed_step"] == 1 and caught.value.existing["score"] is None
    assert str(caught.value) == ("feedback from 'user' on chatcmpl-a was already used for training "
                                 "at step 1; it cannot be changed (post under another source)")  # fmt: skip
    with pytest.raises(FeedbackConflict):
        _post(store, "chatcmpl-a", reward=None, score=None)
    with pytest.raises(FeedbackConflict):
        _post(store, "chatcmpl-a", reward=0.5, score=None, feedback="other words")
    same, created = _post(store, "chatcmpl-a", reward=0.5, score=None)
    assert not created and same["consumed_step"] == 1


def test_feedback_rejects_what_the_learner_could_not_train_on(store: Store) -> None:
    """Out-of-range, non-finite or boolean rewards/scores, an empty source, an unknown
    completion and lone surrogates are refused, and no row is written for any of them."""
    _interaction(store, "chatcmpl-a")
    for bad in (-0.01, 1.01, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match=r"^reward: expected a"):  # the field named first
            _post(store, "chatcmpl-a", reward=bad)
        with pytest.raises(ValueError, match=r"^score: expected a"):
            _post(store, "chatcmpl-a", reward=None, score=bad)
    with pytest.raises(ValueError, match=r"^source: must be a non-empty string$"):
        _post(store, "chatcmpl-a", source="")
    with pytest.raises(ValueError, match="feedback"):
        _post(store, "chatcmpl-a", feedback="bad \ud800")
    with pytest.raises(ValueError, match="source"):
        _post(store, "chatcmpl-a", source="user \ud800")
    with pytest.raises(ValueError, match="completion_id"):
        _post(store, "chatcmpl-\ud800")
    with pytest.raises(KeyError):
        _post(store, "chatcmpl-nope")
    assert store.counts()["feedback"] == 0
    low, _ = _post(store, "chatcmpl-a", reward=0, score=1)  # the ends are allowed
    assert low["reward"] == 0.0 and low["score"] == 1.0 and isinstance(low["reward"], float)


def test_text_postgresql_cannot_hold_is_refused_or_replaced_on_both_databases(store: Store) -> None:
    """PostgreSQL's text cannot hold a NUL character: feedback carrying one was a driver
    error mid-transaction there (a 500) and stored on SQLite. Now it is a ValueError
    naming the field on both, writing nothing. A reply the model decoded with a NUL in
    it is kept, the NUL stored as U+FFFD and its token ids exact, rather than the
    completion lost; in the messages (JSON) a NUL is stored as sent."""
    _interaction(store, "chatcmpl-a")
    for field, note in (("feedback", {"feedback": "a\x00b"}), ("source", {"source": "us\x00er"}),
                        ("feedback", {"feedback": "\x00 first"}), ("completion_id", {})):  # fmt: skip
        completion = "chatcmpl-\x00" if field == "completion_id" else "chatcmpl-a"
        with pytest.raises(
            ValueError, match=rf"^{field}: contains a NUL character \(at index \d+\)"
        ):
            _post(store, completion, **note)
    assert store.counts()["feedback"] == 0
    messages = [{"role": "user", "content": "nul \x00 inside"}]
    _interaction(store, "chatcmpl-b", response="7\x00 8", messages=messages)
    stored = store.interaction("chatcmpl-b")
    assert stored is not None and stored["response"] == "7\ufffd 8"
    assert stored["messages"] == messages and stored["response_token_ids"] == [4, 5]
    assert [row.response for row in store.unconsumed(5)] == []  # no feedback yet
    _post(store, "chatcmpl-b")
    assert [row.response for row in store.unconsumed(5)] == ["7\ufffd 8"]


def test_feedback_that_keeps_colliding_is_an_error_naming_it(store: Store) -> None:
    """A first post that collides with another one (the database refuses the insert) is
    read back and retried; one that never gets through is a RuntimeError naming the
    completion and the source, not a silent None. Catches the error dropped after the
    last try. (A trigger makes the database refuse every insert.)"""
    _interaction(store, "chatcmpl-a")
    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON feedback "
                                 "BEGIN SELECT RAISE(ABORT, 'taken'); END")  # fmt: skip
        else:  # PostgreSQL: a unique violation, as a concurrent first post would raise
            conn.exec_driver_sql("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                                 "$$ BEGIN RAISE unique_violation USING MESSAGE = 'taken'; END $$")  # fmt: skip
            conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON feedback "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse()")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^feedback on chatcmpl-a from 'user': kept colliding"):
        _post(store, "chatcmpl-a")
    assert store.counts()["feedback"] == 0


# ---- the learner's rows ------------------------------------------------------------------------------
def test_unconsumed_rows_come_oldest_first_up_to_the_limit_and_leave_once_marked(
    store: Store,
) -> None:
    store.add_version("v1", parent="base", step=1)
    _interaction(store, "chatcmpl-a")
    _interaction(store, "chatcmpl-b", version="v1", response_logprobs=None, response="8")
    ids = [
        _post(store, "chatcmpl-b", source="grader", reward=None, score=0.5, feedback="")[0]["id"],
        _post(store, "chatcmpl-a")[0]["id"],
        _post(store, "chatcmpl-b", feedback="nice")[0]["id"],
    ]
    rows = store.unconsumed(10)
    assert [r.feedback_id for r in rows] == ids
    assert rows[0] == TrainingRow(
        feedback_id=ids[0], completion_id="chatcmpl-b", model_version="v1", messages=MESSAGES,
        response="8", prompt_token_ids=[1, 2, 3], response_token_ids=[4, 5],
        response_logprobs=None, reward=None, score=0.5, feedback="", source="grader",
    )  # fmt: skip
    assert rows[1].response_logprobs == [-0.1, -0.2] and rows[1].model_version == "base"
    # a greedy reply's missing log-probs are SQL NULL, not the JSON text 'null': a user's
    # own SQL (`WHERE response_logprobs IS NULL`) finds them
    with store.engine.begin() as conn:
        nulls = conn.exec_driver_sql(
            "SELECT id FROM interactions WHERE response_logprobs IS NULL"
        ).scalars().all()  # fmt: skip
    assert nulls == ["chatcmpl-b"]
    assert [r.feedback_id for r in store.unconsumed(2)] == ids[:2]
    assert store.unconsumed(0) == [] and store.unconsumed(-3) == []

    store.mark_consumed([], step=1)  # nothing to mark, no cursor: changes nothing
    assert len(store.unconsumed(10)) == 3 and store.get_state("cursor") is None
    store.mark_consumed([ids[0], ids[2]], step=7, cursor={"feedback_id": ids[2]})
    assert [r.feedback_id for r in store.unconsumed(10)] == [ids[1]]
    assert store.get_state("cursor") == {"feedback_id": ids[2]}
    assert store.counts() == {"interactions": 2, "feedback": 3, "consumed": 2, "versions": 2}
    store.mark_consumed([ids[1]], step=8)  # no cursor given: the old one stays
    assert store.get_state("cursor") == {"feedback_id": ids[2]} and store.unconsumed(10) == []
    steps = {f["id"]: f["consumed_step"] for f in store.interaction("chatcmpl-b")["feedback"]}
    assert steps == {ids[0]: 7, ids[2]: 7}


def test_the_learners_rows_are_values_it_cannot_change(store: Store) -> None:
    """A TrainingRow is what the database held when the learner read it: read-only, so no
    step can rewrite the reward it trains on. Catches the dataclass made mutable."""
    _interaction(store, "chatcmpl-a")
    _post(store, "chatcmpl-a")
    [row] = store.unconsumed(10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.reward = 0.0  # type: ignore[misc]
    assert row.reward == 1.0


def test_learner_state_is_none_until_set_and_then_replaced(store: Store) -> None:
    assert store.get_state("cursor") is None
    store.set_state("cursor", {"feedback_id": 3})
    store.set_state("other", [1, 2])
    store.set_state("cursor", {"feedback_id": 5})
    assert store.get_state("cursor") == {"feedback_id": 5} and store.get_state("other") == [1, 2]
    store.set_state("other", None)
    assert store.get_state("other") is None


# ---- reading back ------------------------------------------------------------------------------------------
def test_interaction_and_recent_return_rows_with_their_feedback(store: Store) -> None:
    assert store.interaction("chatcmpl-nope") is None and store.recent(5) == []
    for name in ("chatcmpl-a", "chatcmpl-b", "chatcmpl-c"):
        _interaction(store, name)
    _post(store, "chatcmpl-a", source="user")
    _post(store, "chatcmpl-a", source="grader", reward=None, score=0.5)
    _post(store, "chatcmpl-c", source="user", reward=0.0)

    one = store.interaction("chatcmpl-a")
    assert one is not None
    assert one["id"] == "chatcmpl-a" and one["response_token_ids"] == [4, 5]
    assert one["params"] == {"temperature": 1.0} and one["finish_reason"] == "stop"
    assert [f["source"] for f in one["feedback"]] == ["user", "grader"]
    assert one["created_at"].endswith("Z") and one["feedback"][0]["created_at"].endswith("Z")

    recent = store.recent(2)
    assert [r["id"] for r in recent] == ["chatcmpl-c", "chatcmpl-b"]  # newest first
    assert recent[0]["prompt_tokens"] == 3 and recent[0]["completion_tokens"] == 2
    assert [f["reward"] for f in recent[0]["feedback"]] == [0.0] and recent[1]["feedback"] == []
    assert "response_logprobs" not in recent[0] and "prompt_token_ids" not in recent[0]
    assert recent[0]["created_at"].endswith("Z") and recent[0]["response"] == "7"
    assert [r["id"] for r in store.recent(10)] == ["chatcmpl-c", "chatcmpl-b", "chatcmpl-a"]
    assert store.recent(0) == [] and store.recent(-1) == []


def test_add_version_keeps_accuracy_and_note_unless_given(store: Store) -> None:
    store.add_version("v1", parent="base", step=1, accuracy=0.25, note="first")
    store.add_version("v1", parent="base", step=2)
    store.add_version("v1", parent="base", step=2, accuracy=0.75)
    store.add_version("v1", parent="base", step=3, note="second")
    versions = {v["id"]: v for v in store.versions()}
    assert versions["v1"]["accuracy"] == 0.75 and versions["v1"]["note"] == "second"
    assert versions["v1"]["step"] == 3 and versions["v1"]["parent"] == "base"
    assert versions["base"]["accuracy"] is None and versions["base"]["note"] == ""
    assert [v["id"] for v in store.versions()] == ["base", "v1"]  # oldest first
    with pytest.raises(ValueError, match=r"^accuracy: expected a finite number"):
        store.add_version("v2", parent="v1", step=4, accuracy=math.inf)


def test_versions_give_their_creation_time_as_iso_utc(store: Store) -> None:
    """Times leave the store as ISO-8601 UTC text (JSON-ready, as the page shows them), for
    versions as for completions. Catches a version's time left as a datetime."""
    [base] = store.versions()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", base["created_at"]), base
    written = datetime.fromisoformat(base["created_at"].removesuffix("Z"))
    assert abs(datetime.now(timezone.utc).replace(tzinfo=None) - written) < timedelta(minutes=5)
    assert set(base) == {"id", "created_at", "parent", "step", "accuracy", "note"}


# ---- opening, schema and migrations -----------------------------------------------------------------------
def test_without_sqlalchemy_the_store_names_the_serve_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An install with the web packages but not SQLAlchemy: importing the store says which
    package is missing and how to install the extra. Catches the import error swallowed
    (the module then failed later with a NameError about `sa`)."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # what Python does for a missing one
    monkeypatch.delitem(sys.modules, "resd.serve.store")  # put back after the test
    with pytest.raises(
        ImportError, match=r"needs sqlalchemy; install it with: pip install 'resd\[serve\]'"
    ):
        importlib.import_module("resd.serve.store")


def test_a_plain_path_creates_its_folder_and_an_in_memory_store_works(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "resd.db"
    opened = Store(str(path))
    assert path.exists() and opened.url == sqlite_url(path) and opened.dialect == "sqlite"
    opened.close()
    deeper = tmp_path / "c" / "d" / "resd.db"  # an sqlite:/// URL gets its folders made too
    Store(sqlite_url(deeper)).close()
    assert deeper.exists()
    engine = sa.create_engine(sqlite_url(path))  # the tables the module docstring documents
    assert set(sa.inspect(engine).get_table_names()) == {
        "schema_version", "model_versions", "interactions", "feedback", "learner_state"
    }  # fmt: skip
    engine.dispose()
    memory = Store("sqlite://")
    memory.add_version("base", parent=None, step=0)
    _interaction(memory, "chatcmpl-a")
    assert memory.counts()["interactions"] == 1 and memory.schema_version() == 1
    memory.close()


def test_sqlite_memory_spelled_out_is_one_database_for_every_thread() -> None:
    """`sqlite:///:memory:` is the same in-memory database as `sqlite://`: one connection
    shared by the server's request threads and the learner's. Catches the long spelling
    taken as a file database, where each thread opened its own empty database (no tables)."""
    memory = Store("sqlite:///:memory:")
    memory.add_version("base", parent=None, step=0)
    _interaction(memory, "chatcmpl-a")
    seen: list[Any] = []

    def count() -> None:
        try:
            seen.append(memory.counts()["interactions"])
        except Exception as exc:  # an empty database of its own: no such table
            seen.append(exc)

    thread = threading.Thread(target=count)
    thread.start()
    thread.join()
    memory.close()
    assert seen == [1]


def test_an_in_memory_store_runs_one_threads_transaction_at_a_time() -> None:
    """`sqlite://` is one connection shared by every thread, so the store's lock runs one
    transaction at a time: a read that starts while another thread's write is mid-way
    waits for it and sees its row. Catches an in-memory store without its lock (the read
    ran on the shared connection in the middle of the writer's transaction and saw
    nothing)."""
    memory = Store("sqlite://")
    memory.add_version("base", parent=None, step=0)
    inside = threading.Event()

    def slow_insert(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith("INSERT INTO interactions"):
            inside.set()
            time.sleep(0.5)  # the writer is in its transaction, its row not yet written

    sa.event.listen(memory.engine, "before_cursor_execute", slow_insert)
    writer = threading.Thread(target=_interaction, args=(memory, "chatcmpl-a"))
    writer.start()
    try:
        assert inside.wait(10)
        seen = memory.counts()["interactions"]
    finally:
        writer.join()
        sa.event.remove(memory.engine, "before_cursor_execute", slow_insert)
        memory.close()
    assert seen == 1


def test_a_writer_waits_ten_seconds_for_the_lock(tmp_path: Path) -> None:
    """Every SQLite connection waits up to SQLITE_BUSY_TIMEOUT_MS (10 s) for another
    writer's lock (the learner's, another process's) instead of failing at once, and
    enforces foreign keys. Catches the wait left to the driver's own 5 s, or changed."""
    store = Store(str(tmp_path / "resd.db"))
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    store.close()


def test_the_tables_have_the_documented_columns_nulls_and_keys(database_url: str) -> None:
    """The database is read by more than this module (a learner in another process, the
    page, a user's own SQL, PostgreSQL): the module docstring's shape is its contract. Only
    the columns documented as NULL may be NULL (a row without its step, time or source is
    refused by the database itself), the keys are as documented, and the string lengths
    hold what the API accepts (completion ids and sources of up to 100 characters, which
    PostgreSQL enforces). Catches a column made nullable, a length or a key changed."""
    Store(database_url).close()
    engine = _engine(database_url)
    inspector = sa.inspect(engine)
    shape = {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            inspector.get_pk_constraint(table)["constrained_columns"],
            [
                (f["constrained_columns"], f["referred_table"], f["referred_columns"])
                for f in inspector.get_foreign_keys(table)
            ],
            [u["column_names"] for u in inspector.get_unique_constraints(table)],
        )
        for table in inspector.get_table_names()
    }
    engine.dispose()
    text = "VARCHAR(200)"  # the same type names on both, but for times and reals
    when, real = (
        ("DATETIME", "FLOAT") if "://" not in database_url else ("TIMESTAMP", "DOUBLE PRECISION")
    )
    assert shape == {
        "schema_version": ([("version", "INTEGER", False), ("applied_at", when, False)],
                           ["version"], [], []),
        "model_versions": ([("id", text, False), ("created_at", when, False), ("parent", text, True),
                            ("step", "INTEGER", False), ("accuracy", real, True),
                            ("note", "TEXT", False)], ["id"], [], []),
        "interactions": ([("id", "VARCHAR(100)", False), ("created_at", when, False),
                          ("model_version", text, False), ("model_name", "VARCHAR(500)", False),
                          ("messages", "JSON", False), ("params", "JSON", False),
                          ("response", "TEXT", False), ("prompt_token_ids", "JSON", False),
                          ("response_token_ids", "JSON", False), ("response_logprobs", "JSON", True),
                          ("finish_reason", "VARCHAR(32)", False)],
                         ["id"], [(["model_version"], "model_versions", ["id"])], []),
        "feedback": ([("id", "INTEGER", False), ("completion_id", "VARCHAR(100)", False),
                      ("source", "VARCHAR(100)", False), ("reward", real, True),
                      ("score", real, True), ("feedback", "TEXT", False),
                      ("created_at", when, False), ("consumed_step", "INTEGER", True)],
                     ["id"], [(["completion_id"], "interactions", ["id"])],
                     [["completion_id", "source"]]),
        "learner_state": ([("key", text, False), ("value", "JSON", True)], ["key"], [], []),
    }  # fmt: skip


def test_the_columns_the_page_and_the_learner_search_by_are_indexed(database_url: str) -> None:
    """The page reads the newest completions (by `created_at`) and the learner the feedback
    no step has used (`consumed_step` NULL) on every poll: both are indexed, so neither
    scans a table of a long-running server. Catches an index left out of the schema."""
    Store(database_url).close()
    engine = _engine(database_url)
    inspector = sa.inspect(engine)
    indexed = {
        # PostgreSQL also lists the index behind the UNIQUE constraint, which SQLite hides
        table: [
            i["column_names"]
            for i in inspector.get_indexes(table)
            if "duplicates_constraint" not in i
        ]
        for table in ("interactions", "feedback")
    }
    engine.dispose()
    assert indexed == {"interactions": [["created_at"]], "feedback": [["consumed_step"]]}


def test_a_server_database_url_makes_no_folder_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an SQLite file gets its folder made: the database path of a PostgreSQL URL
    names no local folder (here nothing listens, so opening it fails). Catches a store
    that made `sub/` in the working folder for `postgresql+psycopg://.../sub/db`."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ModuleNotFoundError, sa.exc.OperationalError)):  # no driver, or no server
        Store("postgresql+psycopg://user@127.0.0.1:1/sub/db")
    assert list(tmp_path.iterdir()) == []


def test_foreign_keys_are_enforced(store: Store) -> None:
    """SQLite and PostgreSQL must reject the same rows: an interaction of an unknown version."""
    with pytest.raises(sa.exc.IntegrityError):
        _interaction(store, "chatcmpl-a", version="never-registered")
    assert store.counts()["interactions"] == 0


def test_a_database_holding_any_of_our_tables_but_no_version_is_refused(database_url: str) -> None:
    """Any one of our table names in a database without `schema_version` means a database
    this code did not write: refused, not filled in around a table of another shape.
    Catches a table left out of the names checked (a lone `feedback` table was taken)."""
    engine = _engine(database_url)
    for table in ("model_versions", "interactions", "feedback", "learner_state"):
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (id TEXT)")
        with pytest.raises(SchemaVersionError, match="no schema_version"):
            Store(database_url)
        with engine.begin() as conn:
            assert sa.inspect(conn).get_table_names() == [table]  # nothing made beside it
            conn.exec_driver_sql(f"DROP TABLE {table}")
    engine.dispose()


def test_a_refused_database_is_left_with_no_connection_open(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a database the store refuses closes what it opened: a caller that keeps the
    error (a traceback holds the half-made store) would otherwise keep a connection, on
    PostgreSQL one of its `max_connections`. Catches the engine left open when the
    schema check raises."""
    engine = _engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE feedback (id TEXT)")
    engine.dispose()
    opened: list[sa.engine.Engine] = []
    create = sa.create_engine
    monkeypatch.setattr(
        sa, "create_engine", lambda *a, **k: opened.append(create(*a, **k)) or opened[-1]
    )
    with pytest.raises(SchemaVersionError) as caught:
        Store(database_url)
    assert caught.traceback  # the error and its frames are still held here
    assert [e.pool.checkedin() + e.pool.checkedout() for e in opened] == [0]


def test_a_server_databases_password_stays_out_of_the_url_and_its_errors(postgres_url: str) -> None:
    """`Store.url` is what errors, logs and the page show: a PostgreSQL URL's password is
    masked there, in the error refusing the database too. Catches the URL rendered with
    its password. (The test server trusts local connections, so any password opens it.)"""
    url = sa.make_url(postgres_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    opened = Store(url)
    assert "s3cret-pw" not in opened.url and "***" in opened.url
    opened.close()
    engine = _engine(postgres_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE schema_version SET version = 99")
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=r"schema version 99, newer") as caught:
        Store(url)
    assert "s3cret-pw" not in str(caught.value) and "***" in str(caught.value)


def test_a_new_database_records_the_versions_1_to_current(database_url: str) -> None:
    """A new database records schema versions 1..SCHEMA_VERSION, one row each, as the
    module docstring says (a tool reading the table sees which steps it holds). Catches a
    version 0 recorded besides them."""
    Store(database_url).close()
    engine = _engine(database_url)
    with engine.begin() as conn:
        versions = [v for (v,) in conn.exec_driver_sql("SELECT version FROM schema_version")]
    engine.dispose()
    assert versions == list(range(1, store_module.SCHEMA_VERSION + 1))


def test_an_empty_schema_version_table_is_not_taken_for_a_version(database_url: str) -> None:
    """A `schema_version` table with no row says nothing about the database's shape: it is
    refused (no migration leads to version 1), not used as if it were at version 1.
    Catches an empty table read as version 1."""
    Store(database_url).close()
    engine = _engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM schema_version")
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="schema version 0; no migration to version 1"):
        Store(database_url)


def test_an_older_database_is_migrated_in_one_transaction(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 -> 2 runs MIGRATIONS[2] and records version 2; a failed migration leaves
    the database at version 1 (its DDL undone too, on both databases); a missing
    migration is refused."""
    Store(database_url).close()
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(store_module, "MIGRATIONS", {})
    with pytest.raises(SchemaVersionError, match="no migration to version 2"):
        Store(database_url)

    def broken(conn: sa.engine.Connection) -> None:
        conn.exec_driver_sql("ALTER TABLE model_versions ADD COLUMN tag TEXT")
        raise RuntimeError("half way")

    monkeypatch.setattr(store_module, "MIGRATIONS", {2: broken})
    with pytest.raises(RuntimeError, match="half way"):
        Store(database_url)
    engine = _engine(database_url)
    with engine.begin() as conn:
        columns = [c["name"] for c in sa.inspect(conn).get_columns("model_versions")]
        assert "tag" not in columns
        assert conn.exec_driver_sql("SELECT max(version) FROM schema_version").scalar() == 1
    engine.dispose()

    def add_tag(conn: sa.engine.Connection) -> None:
        conn.exec_driver_sql("ALTER TABLE model_versions ADD COLUMN tag TEXT")

    monkeypatch.setattr(store_module, "MIGRATIONS", {2: add_tag})
    migrated = Store(database_url)
    assert migrated.schema_version() == 2
    migrated.close()
    Store(database_url).close()  # at the current version: opened as is, not migrated again


def test_a_change_that_races_the_learner_marking_the_row_is_a_conflict(store: Store) -> None:
    """The learner marks the row consumed after the store read it but before its UPDATE: the
    change must be refused (FeedbackConflict naming the step), not written over trained data."""
    _interaction(store, "chatcmpl-a")
    row, _ = _post(store, "chatcmpl-a", reward=1.0)
    learner = sa.create_engine(store.engine.url)

    def learner_marks_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("UPDATE feedback SET reward"):
            with learner.begin() as other:
                other.exec_driver_sql("UPDATE feedback SET consumed_step = 9")

    sa.event.listen(store.engine, "before_cursor_execute", learner_marks_first)
    try:
        with pytest.raises(FeedbackConflict) as caught:
            _post(store, "chatcmpl-a", reward=0.0, feedback="changed")
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", learner_marks_first)
        learner.dispose()
    assert caught.value.existing["consumed_step"] == 9
    kept = store.interaction("chatcmpl-a")["feedback"]  # type: ignore[index]
    assert [(f["id"], f["reward"], f["feedback"]) for f in kept] == [(row["id"], 1.0, "right")]
