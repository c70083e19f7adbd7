"""The serving learner: off-policy steps on served traffic, the guard, the hot swap and
exactly-once consumption of stored feedback, with the real trainer, server, store and holder."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest
import sqlalchemy.exc
import torch
import yaml

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'resd[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import resd.serve.store  # noqa: E402
from resd.rundir import read_jsonl  # noqa: E402
from resd.serve.engine import ModelHolder, load_served_model  # noqa: E402
from resd.serve.learner import Learner, LearnerSettings, given_rollout  # noqa: E402
from resd.serve.store import Store, TrainingRow  # noqa: E402
from resd.training.checkpoint import latest_checkpoint  # noqa: E402
from resd.training.trainer import Trainer  # noqa: E402
from test_serve import (  # noqa: E402
    KEY,
    MODEL,
    _free_port,
    start_server,
)
from test_structured import _trainer_config  # noqa: E402
from test_trainer import config  # noqa: E402

# ---- against a real server, store and holder ------------------------------------------------------


PROMPT_MESSAGES = [{"role": "user", "content": "Is 'abc' of even length?"}]
PROMPTS = ["Is 'abcd' of even length?", "Is 'abc' of even length?", "Is 'ab' of even length?",
           "Is 'a' of even length?"]  # fmt: skip


def learn_config(tiny_model_dir: Path, tmp_path: Path, *extra: str) -> Path:
    """A learner config on the tiny model: the parity task's test items guard each swap."""
    cfg = config(tiny_model_dir, tmp_path / "unused", "batch_size=4", "eval_items=2", "eval_samples=1",
                 "save_every=1", *extra)  # fmt: skip
    # rollout_is_cap only where given: a config that is silent on it gets the learner's cap
    data = {k: v for k, v in cfg.to_dict().items()
            if k != "output_dir" and not (k == "rollout_is_cap" and v is None)}  # fmt: skip
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def serve_and_collect(running, n: int = 4, reward: float = 0.0) -> list[str]:
    """Real traffic: n completions through the openai client, each with posted feedback."""
    ids = []
    for i in range(n):
        reply = running.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=8, temperature=1.0, seed=i,
        )  # fmt: skip
        answer = running.post("/v1/feedback", {"completion_id": reply.id, "reward": reward,
                                               "feedback": "Wrong: answer yes or no."})  # fmt: skip
        assert answer.status_code == 201, answer.text
        ids.append(reply.id)
    return ids


def consumed_steps(store) -> list[int | None]:
    return [row["consumed_step"] for row in _feedback_rows(store)]


def _feedback_rows(store) -> list[dict]:
    return [f for r in store.recent(100) for f in r["feedback"]]


@contextmanager
def learning(
    tiny_model_dir, tmp_path, served, *, collect: bool = True, extra: tuple[str, ...] = ()
):
    """A server on the tiny model, 4 served replies with feedback (unless `collect` is
    off), and a learner built from its config (with `extra` overrides): (running server,
    config path, learner)."""
    path = learn_config(tiny_model_dir, tmp_path, *extra)
    with start_server(served, tmp_path / "resd.db", max_new_tokens=8) as running:
        if collect:
            serve_and_collect(running)
        learner = Learner.from_config(
            path, store=running.store, holder=running.holder, output_dir=tmp_path
        )
        yield running, path, learner


def test_a_row_without_reward_or_score_counts_as_a_failure() -> None:
    """How stored feedback becomes the trainer's Score: words alone are a failure (reward
    0, score 0), a perfect score alone a success, a partial score alone a failure with that
    partial credit, and a reward alone is also the score. Catches a row with neither
    reward nor score trained on as a success."""
    row = TrainingRow(
        feedback_id=1, completion_id="chatcmpl-a", model_version="v0", messages=PROMPT_MESSAGES,
        response="yes", prompt_token_ids=[1, 2], response_token_ids=[3], response_logprobs=None,
        reward=None, score=None, feedback="Wrong: it has odd length.", source="user",
    )  # fmt: skip
    given = given_rollout(row)
    assert (given.score.reward, given.score.score) == (0.0, 0.0)
    assert given.score.feedback == "Wrong: it has odd length."
    assert (given.prompt_ids, given.gen.token_ids) == ([1, 2], [3])
    for reward, score, expected in [(None, 1.0, (1.0, 1.0)), (None, 0.5, (0.0, 0.5)),
                                    (0.0, None, (0.0, 0.0)), (1.0, 0.25, (1.0, 0.25))]:  # fmt: skip
        scored = given_rollout(replace(row, reward=reward, score=score)).score
        assert (scored.reward, scored.score) == expected, (reward, score)
    again = given_rollout(replace(row, feedback_id=2, response="no"))
    assert again.item.id == given.item.id  # one prompt, one item: the solution buffer's key


def test_different_prompts_are_different_items_with_stable_ids() -> None:
    """Each prompt is its own item for the solution buffer, under an id made from the
    messages alone ("served/" and 12 hex digits of their hash), the same after a restart,
    since a resumed learner's buffer is keyed by it. Catches every served row filed under
    one item (a success on one prompt then stood in for all) and a shortened id."""
    row = TrainingRow(
        feedback_id=1, completion_id="chatcmpl-a", model_version="v0", messages=PROMPT_MESSAGES,
        response="yes", prompt_token_ids=[1, 2], response_token_ids=[3], response_logprobs=None,
        reward=1.0, score=None, feedback="", source="user",
    )  # fmt: skip
    other = replace(row, messages=[{"role": "user", "content": "Is 'ab' of even length?"}])
    ids = [given_rollout(r).item.id for r in (row, other)]
    assert ids[0] != ids[1] and all(re.fullmatch(r"served/[0-9a-f]{12}", i) for i in ids), ids
    # the same prompt from a client that writes "content" before "role" is the same item
    # (catches an id hashed from the JSON's key order, not from the messages)
    reordered = [{"content": m["content"], "role": m["role"]} for m in PROMPT_MESSAGES]
    assert given_rollout(replace(row, messages=reordered)).item.id == ids[0]


def test_a_reply_cut_at_max_tokens_is_given_to_the_trainer_unfinished(tmp_path) -> None:
    """A served reply that hit max_tokens (finish_reason "length") reaches the trainer as an
    unfinished generation, one that ended on EOS as finished: the step's `truncated` metric
    counts the cut replies, and a conversation-layout reflection shows a cut reply whole
    (an ended one without its EOS). Catches every stored reply given as finished (it was:
    the learner's `truncated` read 0 and a cut reply lost its last token)."""
    store = Store(str(tmp_path / "resd.db"))
    try:
        store.add_version("v0", parent=None, step=0)
        for completion_id, reason in (("chatcmpl-cut", "length"), ("chatcmpl-ended", "stop")):
            store.record_interaction(
                completion_id=completion_id, model_version="v0", model_name=MODEL,
                messages=PROMPT_MESSAGES, params={}, response="yes", prompt_token_ids=[1, 2],
                response_token_ids=[3, 4], response_logprobs=None, finish_reason=reason,
            )  # fmt: skip
            store.record_feedback(completion_id, source="user", reward=0.0, score=None,
                                  feedback="Wrong: it has odd length.")  # fmt: skip
        given = {row.completion_id: given_rollout(row) for row in store.unconsumed(10)}
    finally:
        store.close()
    cut, ended = given["chatcmpl-cut"].gen, given["chatcmpl-ended"].gen
    assert (cut.finished, cut.content_ids) == (False, [3, 4])
    assert (ended.finished, ended.content_ids) == (True, [3])


@pytest.fixture
def tiny_served(tiny_model_dir):
    return load_served_model(str(tiny_model_dir), version="v0", name=MODEL, dtype="float32")


def test_the_learner_config_is_read_as_written(tiny_model_dir, tmp_path, tiny_served, caplog):
    """The off-policy cap is 2 only where the config is silent; a minimum of rows a step
    can never gather is refused; a config that trains the served model says nothing, and
    one that trains another model warns that the first swap replaces the served one (a
    mutant said nothing)."""
    with start_server(tiny_served, tmp_path / "resd.db", max_new_tokens=8) as running:

        def cap(*extra: str, min_rows: int | None = None) -> float | None:
            path = learn_config(tiny_model_dir, tmp_path, *extra)
            out = tmp_path / f"out{len(extra)}{min_rows}"
            return Learner.from_config(path, store=running.store, holder=running.holder,
                                       output_dir=out, min_rows=min_rows).trainer.cfg.rollout_is_cap  # fmt: skip

        with caplog.at_level("WARNING", logger="resd.serve.learner"):
            assert cap() == 2.0
        assert "while the server serves" not in caplog.text
        assert cap("rollout_is_cap=5.0") == 5.0
        with pytest.raises(ValueError, match=r"^--learn-min-rows: 5 is not in 1\.\.4"):
            cap(min_rows=5)
        with pytest.raises(ValueError, match=r"^early_stopping: a learner trains for as long"):
            cap("eval_every=1", "early_stopping={patience: 2}")  # it never calls train()
        other = ModelHolder(replace(tiny_served, source="Qwen/Qwen3-0.6B"))
        with caplog.at_level("WARNING", logger="resd.serve.learner"):
            Learner.from_config(learn_config(tiny_model_dir, tmp_path), store=running.store,
                                holder=other, output_dir=tmp_path / "other")  # fmt: skip
        assert "while the server serves Qwen/Qwen3-0.6B; the first swap replaces" in caplog.text


def test_a_learner_step_consumes_feedback_once_and_swaps_the_served_model(
    tiny_model_dir, tmp_path, tiny_served, caplog
):
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, _, learner):
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=1.0)  # always serve
        with caplog.at_level("INFO", logger="resd.serve.learner"):
            record = learner.step_once()
        assert record is not None  # and the server's log says so, in one line
        logged = [r.getMessage() for r in caplog.records if r.name == "resd.serve.learner"]
        assert logged == [f"learner step 1: {record}"]
        assert learner.step_once() is None  # nothing left to train on
        assert consumed_steps(running.store) == [1, 1, 1, 1]
        served = running.holder.current()
        assert served.version == f"{MODEL}@step1" and served.model is not tiny_served.model
        versions = {v["id"]: v for v in running.store.versions()}
        assert versions[served.version]["parent"] == "v0" and versions["v0"]["accuracy"] is not None
        assert versions[served.version]["note"] == "trained on 4 rows"
        # the served copy is the trainer's sampling weights after the step, frozen
        trained = dict(learner.trainer.sampler.generator.named_parameters())
        for name, p in served.model.named_parameters():
            torch.testing.assert_close(p, trained[name], msg=name)
            # frozen: a served copy that required grad would build autograd state per request
            assert not p.requires_grad, name
        # the next completion comes from the new version and is recorded under it
        reply = running.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.model_extra["resd_model_version"] == served.version
        state = json.loads((latest_checkpoint(tmp_path / "learner") / "state.json").read_text())
        assert sorted(state["extra"]["consumed"]) == sorted(
            f["id"] for f in _feedback_rows(running.store)
        )
        status = learner.status()
        assert status["steps"][0]["served"] and status["accuracy"][0]["step"] == 0
        assert status["playbook_markdown"] == learner.trainer.playbook.render()  # the page's
        # where the served weights came from (the learner's warning compares the next start's)
        assert served.source == f"{learner.trainer.run_dir}@{served.version}"
        # its run folder holds the resolved config as any run's does (it never calls train(),
        # which writes it): `resd report` named its algorithm "unknown", `resd eval --config` failed
        from resd.analysis.report import load_run
        from resd.config import load_config

        assert load_config(tmp_path / "learner" / "config.yaml") == learner.trainer.cfg
        assert load_run(tmp_path / "learner").algorithm == learner.trainer.cfg.algorithm


def test_a_step_may_wait_for_a_whole_batch_and_records_how_far_it_got(
    tiny_model_dir, tmp_path, tiny_served
):
    """`--learn-min-rows` may be the config's batch_size itself (not only less), and 0 is
    refused; a guard that is not told otherwise serves only a step that did not fall, so
    one that holds level is served (here the guard metric is `items`, the number of
    held-out items: the same at every evaluation; a guard that served only a rise kept it
    off). The step's record (the page's table of steps, /health's last step) holds the
    step's logged metrics, its guard score and the served version's score it was held
    against, under those names. After a step the database's cursor says which step
    consumed rows and what it served."""
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, _):
        with pytest.raises(ValueError, match=r"^--learn-min-rows: 0 is not in 1\.\.4"):
            Learner.from_config(path, store=running.store, holder=running.holder,
                                output_dir=tmp_path / "zero", min_rows=0)  # fmt: skip
        learner = Learner.from_config(path, store=running.store, holder=running.holder,
                                      output_dir=tmp_path / "four", min_rows=4,
                                      guard_metric="items")  # fmt: skip
        assert (learner.settings.min_rows, learner.settings.guard_tolerance) == (4, 0.0)
        # the class's own defaults are the command's: settings built in code guard alike (a
        # mutant's default tolerance of 1 served any step however far its metric fell)
        assert LearnerSettings(min_rows=4, guard_metric="items") == learner.settings
        with pytest.raises(FrozenInstanceError):  # swapped whole, never edited under the thread
            learner.settings.guard_tolerance = 1.0  # type: ignore[misc]
        record = learner.step_once()
        assert record is not None and record["rows"] == 4
        [logged] = read_jsonl(tmp_path / "four" / "learner" / "metrics.jsonl")
        assert record == {
            "step": 1, "rows": 4, "reward": logged["reward"], "score": logged["score"],
            "loss": logged["loss"], "playbook_size": logged["playbook_size"], "accuracy": 2.0,
            "served_accuracy": 2.0, "served": True, "version": f"{MODEL}@step1",
        }  # fmt: skip
        cursor = running.store.get_state("cursor")
        assert cursor == {"step": 1, "version": record["version"]}


def test_one_row_may_start_a_step_and_stop_waits_for_the_learner_thread(
    tiny_model_dir, tmp_path, tiny_served
):
    """`--learn-min-rows 1`, the least there is, is accepted (a mutant refused it); the
    learner's thread is a daemon, as the engine's worker is, so a script or notebook that
    never calls `stop()` still exits (a mutant's thread kept polling and held the
    interpreter open); and `stop()` returns only once the learner's thread has ended, even
    mid-step, so the caller may close the database behind it (a mutant returned without
    joining the thread)."""
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, _):
        learner = Learner.from_config(path, store=running.store, holder=running.holder,
                                      output_dir=tmp_path / "one", min_rows=1)  # fmt: skip
        assert learner.settings.min_rows == 1
        learner.start()  # rows are waiting: the thread steps at once
        try:
            daemons = [t.daemon for t in threading.enumerate() if t.name == "resd-learner"]
        finally:
            learner.stop(timeout=120)
        assert daemons == [True]
        assert not [t for t in threading.enumerate() if t.name == "resd-learner" and t.is_alive()]


def test_a_failing_step_is_reported_and_the_server_keeps_answering(
    tiny_model_dir, tmp_path, tiny_served, caplog
):
    """A step that raises (here: a guard metric the evaluation does not have) does not end
    the learner's thread silently: `status()` (hence the page and /health) names the error,
    nothing is consumed, and the served model stays. After a failed step the thread waits
    `poll_seconds` before it tries again: it read the rows once, not again and again (a
    mutant retried at once, retraining on the same rows in a loop that kept a core busy)."""
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, _, learner):
        learner.settings = LearnerSettings(min_rows=4, poll_seconds=60, guard_metric="no_such")
        reads: list[str] = []

        def count(_conn, _cursor, statement: str, *_args) -> None:
            if "FROM feedback" in statement:
                reads.append(statement)

        sqlalchemy.event.listen(running.store.engine, "before_cursor_execute", count)
        caplog.set_level("ERROR", logger="resd.serve.learner")
        learner.start()
        try:
            deadline = time.monotonic() + 120
            while learner.status()["error"] is None and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # a retry would read the rows again at once
        finally:
            learner.stop(timeout=120)  # ends the 60 s wait at once
            sqlalchemy.event.remove(running.store.engine, "before_cursor_execute", count)
        assert learner.status()["error"] == (
            "ValueError: --guard-metric: the evaluation has no metric 'no_such' (it has "
            "task_mean@k, task_best@k, case_mean@k, case_best@k)"
        )
        # the server's log has the traceback, which the page's one line does not
        [logged] = [r for r in caplog.records if r.name == "resd.serve.learner"]
        assert logged.getMessage() == "learner step failed" and logged.exc_info[0] is ValueError
        assert len(reads) == 1, reads
        assert consumed_steps(running.store) == [None] * 4
        assert running.holder.current() is tiny_served


def test_health_answers_while_a_learner_step_runs(tiny_model_dir, tmp_path, tiny_served):
    # a step holds the learner's lock for minutes on a real model; /health must not wait
    with (
        learning(tiny_model_dir, tmp_path, tiny_served, collect=False) as (_, _, learner),
        start_server(tiny_served, tmp_path / "page.db", learner=learner) as running,
        learner._lock,
    ):
        health = httpx.get(f"{running.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["learner"]["step"] == 0


def test_the_guard_keeps_a_worse_model_off_the_server(tiny_model_dir, tmp_path, tiny_served):
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, _, learner):
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=-2.0)  # must gain 2: never
        record = learner.step_once()
        assert record is not None and not record["served"]
        assert running.holder.current() is tiny_served
        assert [v["id"] for v in running.store.versions()] == ["v0"]
        assert consumed_steps(running.store) == [1, 1, 1, 1]  # trained on, just not served


def test_killed_between_checkpoint_and_database_trains_nothing_twice(
    tiny_model_dir, tmp_path, tiny_served
):
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, learner):

        def killed(*args, **kwargs):
            raise SystemExit("killed after the checkpoint, before the database write")

        learner.store = type("Dying", (), {"mark_consumed": killed, "unconsumed": running.store.unconsumed,
                                            "versions": running.store.versions})()  # fmt: skip
        with pytest.raises(SystemExit):
            learner.step_once()
        assert consumed_steps(running.store) == [None] * 4  # the database never heard of it

        restarted = Learner.from_config(
            path, store=running.store, holder=running.holder, output_dir=tmp_path
        )
        assert restarted.trainer.step == 1  # resumed from the step's checkpoint ...
        assert consumed_steps(running.store) == [1, 1, 1, 1]  # ... which marked its rows
        assert restarted.step_once() is None  # so nothing is trained on again
        assert [m["step"] for m in read_jsonl(tmp_path / "learner" / "metrics.jsonl")] == [1]


def test_a_database_write_that_fails_after_the_checkpoint_trains_nothing_twice(
    tiny_model_dir, tmp_path, tiny_served, monkeypatch
):
    """The database is locked by another process when a step marks its rows: the step fails,
    the server keeps running, and the next poll must not read those rows as new and train on
    them a second time (the checkpoint already holds them). Catches a learner that relies on
    a restart to mark them (it did: the retry trained the same 4 rows again at step 2)."""
    monkeypatch.setattr(resd.serve.store, "SQLITE_BUSY_TIMEOUT_MS", 200)  # fail fast when locked
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, _, learner):
        other = sqlite3.connect(tmp_path / "resd.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock; reads still work
        try:
            with pytest.raises(sqlalchemy.exc.OperationalError, match="database is locked"):
                learner.step_once()
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert consumed_steps(running.store) == [None] * 4  # the write failed ...
        assert learner.step_once() is None  # ... and the next poll marks them, trains nothing
        assert consumed_steps(running.store) == [1, 1, 1, 1]
        assert running.store.get_state("cursor")["step"] == 1
        assert [m["step"] for m in read_jsonl(tmp_path / "learner" / "metrics.jsonl")] == [1]


def test_killed_before_the_checkpoint_trains_the_rows_once_after_restart(
    tiny_model_dir, tmp_path, tiny_served
):
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, learner):

        def killed() -> None:
            raise SystemExit("killed while writing the checkpoint")

        learner.trainer.save = killed
        with pytest.raises(SystemExit):
            learner.step_once()
        assert consumed_steps(running.store) == [None] * 4

        restarted = Learner.from_config(
            path, store=running.store, holder=running.holder, output_dir=tmp_path
        )
        assert restarted.trainer.step == 0  # no checkpoint: the lost step's logs are cleared
        assert restarted.step_once()["step"] == 1
        assert consumed_steps(running.store) == [1, 1, 1, 1]
        assert [m["step"] for m in read_jsonl(tmp_path / "learner" / "metrics.jsonl")] == [1]


def test_a_restarted_learner_serves_the_version_it_last_served(
    tiny_model_dir, tmp_path, tiny_served
):
    """Step 1 is served, step 2 is kept off by the guard: a server restarted on the same
    folder serves step 1's weights again, not the base model and not step 2's. Catches a
    restart that skips the swap, and a step kept off the server that forgets which version
    was served. The starting model's row keeps step 0 when the learner scores it, and the
    status the page draws from holds each evaluation's guard metric and the playbook's
    timeline."""
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, learner):
        base = {v["id"]: v for v in running.store.versions()}["v0"]
        assert (base["step"], base["parent"]) == (0, None) and base["accuracy"] is not None
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=1.0)  # always serve
        assert learner.step_once()["version"] == f"{MODEL}@step1"
        serve_and_collect(running)
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=-2.0)  # must gain 2: never
        assert not learner.step_once()["served"]
        assert learner.trainer.extra_state["served_version"] == f"{MODEL}@step1"

        holder = ModelHolder(tiny_served)  # the restarted server loads the base model again
        restarted = Learner.from_config(path, store=running.store, holder=holder,
                                        output_dir=tmp_path)  # fmt: skip
        assert restarted.trainer.step == 2 and holder.current().version == f"{MODEL}@step1"
        assert holder.current().model is not tiny_served.model
        # the page's accuracy curve: the guard metric of each evaluation, the baseline's first
        evaluations = read_jsonl(tmp_path / "learner" / "eval.jsonl")
        assert restarted.status()["accuracy"] == [
            {"step": e["step"], "accuracy": e["case_mean@k"]} for e in evaluations
        ]
        assert [e["step"] for e in evaluations] == [0, 1, 2]
        # and its playbook timeline, as the run folder holds it
        history = read_jsonl(tmp_path / "learner" / "playbook_history.jsonl")
        assert restarted.status()["playbook_history"] == history
        # and the steps table: both steps, from the checkpoint (a mutant restarted it empty)
        assert restarted.status()["steps"] == learner.status()["steps"]
        assert [(r["step"], r["served"]) for r in restarted.status()["steps"]] == [
            (1, True),
            (2, False),
        ]


def test_a_learner_on_a_store_without_its_model_files_it_as_the_starting_model(
    tiny_model_dir, tmp_path, tiny_served
):
    """A learner used from code, on a store its model was never registered in (no server
    did), files the served version itself: step 0, no parent, the baseline's accuracy and
    the note "the starting model", so the first step has a parent row and a score to
    beat. Catches the note lost or changed for such a store."""
    store = Store(str(tmp_path / "resd.db"))
    try:
        learner = Learner.from_config(learn_config(tiny_model_dir, tmp_path), store=store,
                                      holder=ModelHolder(tiny_served), output_dir=tmp_path)  # fmt: skip
        [row] = store.versions()
        assert (row["id"], row["parent"], row["step"]) == (tiny_served.version, None, 0)
        assert row["note"] == "the starting model"
        assert row["accuracy"] == learner.status()["accuracy"][0]["accuracy"] is not None
    finally:
        store.close()


def test_a_learning_server_restarted_with_another_model_is_refused(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """`resd serve --learn` files its base version as `loaded from <model>` like a plain
    start, so a restart on the same folder with another `--model` is refused as for any
    server. The learner's first scoring of the base model used to overwrite that note
    with "the starting model", and the restart check, which reads it, then let any model
    file its replies under the old model's version. (The server itself is not run.)"""
    import resd.serve.command
    from resd.cli import main

    monkeypatch.setattr(resd.serve.command, "_run_until_signalled", lambda _server: None)
    args = ["serve", "--output-dir", str(tmp_path), "--port", str(_free_port()),
            "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    learn = ["--learn", str(learn_config(tiny_model_dir, tmp_path))]
    assert main([*args, "--model", str(tiny_model_dir), *learn]) == 0
    store = Store(str(tmp_path / "resd.db"))
    try:
        [base] = store.versions()
    finally:
        store.close()
    assert base["note"] == f"loaded from {tiny_model_dir}" and base["accuracy"] is not None
    capsys.readouterr()
    assert main([*args, "--model", str(tmp_path / "other"), *learn]) == 2
    assert "--base-version: 'base' is recorded in this database" in capsys.readouterr().err


def test_a_learning_server_restarted_before_its_first_step_starts_its_learner_again(
    tiny_model_dir, tmp_path, tiny_served
):
    """No feedback came before the server stopped, so the learner's folder holds only the
    starting model's evaluation: a restart on the same folder starts the learner over
    from step 0 (scoring the starting model again, once). It was refused ("already holds
    a run; pass --resume"): such a server could not be restarted without deleting its
    learner folder by hand."""
    with learning(tiny_model_dir, tmp_path, tiny_served, collect=False) as (running, path, first):
        assert first.trainer.step == 0
        assert [e["step"] for e in read_jsonl(tmp_path / "learner" / "eval.jsonl")] == [0]
        first.stop()  # never started: stopping it is a no-op (the server's shutdown may do it)
        restarted = Learner.from_config(path, store=running.store, holder=running.holder,
                                        output_dir=tmp_path)  # fmt: skip
        assert restarted.trainer.step == 0 and running.holder.current() is tiny_served
        assert [e["step"] for e in read_jsonl(tmp_path / "learner" / "eval.jsonl")] == [0]


def test_a_restart_after_steps_the_guard_kept_off_serves_the_base_model(
    tiny_model_dir, tmp_path, tiny_served
):
    """Every step so far was kept off the server by the guard: a server restarted on the
    same folder serves the base model it loaded, as before the restart. Catches a restart
    that swapped in the learner's weights (under no version) once any step was taken."""
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, learner):
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=-2.0)  # must gain 2: never
        assert not learner.step_once()["served"]
        holder = ModelHolder(tiny_served)  # the restarted server loads the base model again
        restarted = Learner.from_config(path, store=running.store, holder=holder,
                                        output_dir=tmp_path)  # fmt: skip
        assert restarted.trainer.step == 1 and holder.current() is tiny_served


@pytest.mark.parametrize("extra", [(), ("lora={r: 4}",)], ids=["full", "lora"])
def test_a_restart_serves_the_weights_of_the_version_it_last_served(
    tiny_model_dir, tmp_path, tiny_served, extra
):
    """Step 1 was served, step 2 kept off by the guard, then the server restarted: it
    must serve step 1's weights under step 1's name. It served the trainer's latest
    weights (step 2's, the ones the guard refused) named as step 1, and it must still do
    so once `keep_checkpoints` has pruned step 1's checkpoint (here: after steps 2 and 3
    both were kept off). A LoRA learner serves its policy with the adapter: the same."""
    with learning(tiny_model_dir, tmp_path, tiny_served, extra=extra) as (running, path, learner):
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=1.0)  # always serve
        assert learner.step_once()["served"]
        step1 = {
            n: p.detach().clone() for n, p in running.holder.current().model.named_parameters()
        }
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=-2.0)  # must gain 2: never
        for _ in range(2):
            serve_and_collect(running)
            assert not learner.step_once()["served"]
        assert not (tmp_path / "learner" / "checkpoint-1").exists()  # pruned (keep 2)
        latest = dict(learner.trainer.sampler.generator.named_parameters())
        assert any(not torch.equal(latest[n], p) for n, p in step1.items())  # steps 2-3 moved it
        holder = ModelHolder(tiny_served)  # the restarted server loads the base model again
        restarted = Learner.from_config(path, store=running.store, holder=holder,
                                        output_dir=tmp_path)  # fmt: skip
        served = holder.current()
        assert restarted.trainer.step == 3 and served.version == f"{MODEL}@step1"
        for name, param in served.model.named_parameters():
            torch.testing.assert_close(param, step1[name], msg=name)
            assert not param.requires_grad, name


def test_a_restart_with_the_served_weights_damaged_serves_the_loaded_model_and_says_why(
    tiny_model_dir, tmp_path, tiny_served, caplog
):
    """`learner/served.safetensors` cut short or overwritten (a copy, a full disk): the
    restart failed with safetensors' traceback ("header too small"), and the server did
    not start. It now starts on the model it loaded, as without the file, with a warning
    that names the file and what is wrong with it."""
    with learning(tiny_model_dir, tmp_path, tiny_served) as (running, path, learner):
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=1.0)  # always serve
        assert learner.step_once()["served"]
        serve_and_collect(running)
        learner.settings = LearnerSettings(min_rows=4, guard_tolerance=-2.0)  # never
        assert not learner.step_once()["served"]
        weights = tmp_path / "learner" / "served.safetensors"
        for damaged, said in ((b"", "header too small"), (weights.read_bytes()[:100], "")):
            weights.write_bytes(damaged)
            holder = ModelHolder(tiny_served)
            caplog.clear()
            with caplog.at_level("WARNING", logger="resd.serve.learner"):
                Learner.from_config(path, store=running.store, holder=holder, output_dir=tmp_path)
            assert holder.current().version == "v0"  # the loaded model, under its own name
            assert (
                f"the weights of {MODEL}@step1, the version last served, are not in {weights} "
                f"(cannot be read: "
                in caplog.text
                and said in caplog.text
            )


def test_an_idle_learner_waits_between_polls(tiny_model_dir, tmp_path, tiny_served):
    """With no feedback to train on, the learner's thread looks again only after
    `poll_seconds` (2 s unless set): a second after its first look it has read the
    waiting rows once or twice, not again and again. Catches a default poll of 0 s and a
    loop that did not wait after an idle poll (both read the database without pause and
    kept a core busy). The bound is loose: a busy loop reads hundreds of times."""
    with learning(tiny_model_dir, tmp_path, tiny_served, collect=False) as (running, _, learner):
        # what `resd serve --learn` polls at (it has no option for it): 2 s, not longer (a
        # mutant's 4 s left new feedback waiting twice as long for its step)
        assert learner.settings.poll_seconds == 2.0
        reads: list[str] = []

        def count(_conn, _cursor, statement: str, *_args) -> None:
            if "FROM feedback" in statement:
                reads.append(statement)

        sqlalchemy.event.listen(running.store.engine, "before_cursor_execute", count)
        try:
            learner.start()
            deadline = time.monotonic() + 60
            while not reads and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            polls = len(reads)
        finally:
            learner.stop(timeout=120)
            sqlalchemy.event.remove(running.store.engine, "before_cursor_execute", count)
        assert 1 <= polls <= 3, polls


def test_the_background_thread_learns_while_the_server_answers(
    tiny_model_dir, tmp_path, tiny_served
):
    with learning(tiny_model_dir, tmp_path, tiny_served, collect=False) as (running, _, learner):
        learner.settings = LearnerSettings(min_rows=4, poll_seconds=0.2, guard_tolerance=1.0)
        learner.start()
        try:
            serve_and_collect(running)
            deadline = time.monotonic() + 120
            while running.holder.current() is tiny_served and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            learner.stop(timeout=120)
        assert learner.error is None and running.holder.current().version == f"{MODEL}@step1"


# ---- lessons from a server --------------------------------------------------------------------------
def test_response_format_json_schema_is_honoured(tiny_served, tmp_path):
    from resd.generation.schemas import reflection_schema

    schema = reflection_schema(["strat-00001"], 160)
    with start_server(tiny_served, tmp_path / "resd.db", max_new_tokens=700) as running:
        reply = running.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "reflect"}], max_tokens=700, seed=3,
            response_format={"type": "json_schema", "json_schema": {"name": "reflection", "schema": schema}},
        )  # fmt: skip
        obj = json.loads(reply.choices[0].message.content, strict=False)
        assert set(obj) <= set(schema["properties"]) and "bullet_tags" in obj
        # stored with the schema it was decoded under, so the row can be regenerated
        params = running.store.interaction(reply.id)["params"]
        assert params["response_format"]["json_schema"]["schema"] == schema and params["seed"] == 3
        bad = running.post("/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        })  # fmt: skip
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"
        assert ".cc:" not in bad.json()["error"]["message"]  # the reason, not the C++ location
        assert "nonsense" in bad.json()["error"]["message"]
        assert running.store.counts()["interactions"] == 1  # the refused request left no row


def test_lessons_can_come_from_another_model_behind_an_openai_api(
    tiny_model_dir, tiny_served, tmp_path, monkeypatch
):
    """`reflector:` sends reflection and curation to a server: here `resd serve` with the
    tiny model; every reply it writes is schema-valid, so every one parses."""
    from resd.training.reflector import RemoteReflector

    monkeypatch.setenv("RESD_TEST_REFLECTOR_KEY", KEY)
    with start_server(tiny_served, tmp_path / "resd.db", max_new_tokens=500) as running:
        reflector = {
            "base_url": f"{running.url}/v1",
            "model": MODEL,
            "api_key_env": "RESD_TEST_REFLECTOR_KEY",
        }
        cfg = _trainer_config(
            tiny_model_dir, tmp_path / "run", f"reflector={json.dumps(reflector)}"
        )
        trainer = Trainer(cfg)
        assert isinstance(trainer.lessons.reflector, RemoteReflector)
        trainer.train()
        asked = running.store.counts()["interactions"]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    total = {k: sum(m[k] for m in rows) for k in ("reflections", "reflections_parsed", "curations",
                                                  "curations_parsed", "tag_replies")}  # fmt: skip
    assert total["reflections"] > 0 and total["reflections_parsed"] == total["reflections"]
    assert total["curations_parsed"] == total["curations"] == total["reflections"]
    # every lesson call went to the server (and the eval and rollouts did not)
    assert asked == total["reflections"] + total["curations"] + total["tag_replies"]


def test_a_reflector_without_its_key_or_url_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from resd.config import ConfigError

    with pytest.raises(ConfigError, match="reflector: needs base_url"):
        _trainer_config(tiny_model_dir, tmp_path / "a", "reflector={model: m}")
    with pytest.raises(ConfigError, match="reflector: unknown key 'url'"):
        _trainer_config(tiny_model_dir, tmp_path / "b", "reflector={url: x, model: m}")
    monkeypatch.delenv("RESD_NO_SUCH_KEY", raising=False)
    cfg = _trainer_config(
        tiny_model_dir,
        tmp_path / "c",
        "reflector={base_url: 'http://127.0.0.1:9/v1', model: m, api_key_env: RESD_NO_SUCH_KEY}",
    )
    with pytest.raises(ValueError, match="RESD_NO_SUCH_KEY is not set"):
        Trainer(cfg)


# ---- the five-command session, as processes ----------------------------------------------------------


def _start(command: list[str], url: str) -> subprocess.Popen:
    tests = str(Path(__file__).resolve().parent)  # the learner's env is tests/toy_envs.py
    env = {**os.environ, "RESD_API_KEY": KEY,
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "resd serve did not come up"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_resd_serve_learn_survives_sigkill(tiny_model_dir, tmp_path, database, request):
    """serve → ask → feedback → a learner step swaps the version → SIGKILL → restart:
    every acknowledged feedback row is there, nothing is trained twice, and the restarted
    server answers with the version the learner last served. On the default SQLite file
    beside the run, and on a PostgreSQL server named by `--db`."""
    db = str(tmp_path / "resd.db")
    if database == "postgresql":
        db = request.getfixturevalue("postgres_url")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "resd", "serve", "--model", str(tiny_model_dir),
               "--served-model-name", MODEL, "--port", str(port), "--output-dir", str(tmp_path),
               "--max-new-tokens", "8", "--log-level", "warning",
               "--learn", str(learn_config(tiny_model_dir, tmp_path)), "--guard-tolerance", "1"]  # fmt: skip
    if database == "postgresql":
        command += ["--db", db]
    process = _start(command, url)
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        acknowledged = []
        for i in range(6):  # 4 make a step; 2 wait for the next one
            reply = client.chat.completions.create(model=MODEL, seed=i, max_tokens=8,
                                                   messages=[{"role": "user", "content": PROMPTS[i % 4]}])  # fmt: skip
            note = httpx.post(f"{url}/v1/feedback", headers=headers,
                              json={"completion_id": reply.id, "reward": 0.0, "feedback": "Answer yes or no."})  # fmt: skip
            assert note.status_code == 201
            acknowledged.append(reply.id)
        deadline = time.monotonic() + 180
        while httpx.get(f"{url}/health").json()["model_version"] == "base":
            assert time.monotonic() < deadline, "no learner step was served"
            time.sleep(0.5)
        after = client.chat.completions.create(model=MODEL, messages=MESSAGES_HI, max_tokens=4)
        assert after.system_fingerprint == f"{MODEL}@step1"
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)

    process = _start(command, url)
    try:
        health = httpx.get(f"{url}/health").json()
        assert health["model_version"] == f"{MODEL}@step1"
        assert health["learner"]["step"] == 1
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    store = Store(db)
    rows = {f["completion_id"]: f for r in store.recent(100) for f in r["feedback"]}
    assert set(acknowledged) <= set(rows)  # every acknowledged row survived the SIGKILL
    assert sorted(f["consumed_step"] or 0 for f in rows.values()) == [0, 0, 1, 1, 1, 1]
    store.close()


MESSAGES_HI = [{"role": "user", "content": "hi"}]


def test_one_folder_named_two_ways_is_one_model(tmp_path, monkeypatch):
    """`resd serve --model tiny` beside a learner config naming /abs/.../tiny: no warning
    that the first swap replaces the served model."""
    from resd.serve.learner import same_model

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert same_model(str(tmp_path / "tiny"), "tiny") and same_model(
        "Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"
    )
    assert not same_model(str(tmp_path / "tiny"), "other") and not same_model("a/b", "a/c")


def test_a_second_learning_server_on_one_folder_is_refused_before_its_model_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """Two `resd serve --learn` on one --output-dir each ran a learner on the same rows
    and the same run folder: both trained every row, and each overwrote the other's
    checkpoints. The second is refused in one line before any model loads (the model
    named here does not exist), and leaves the folder as it found it."""
    import resd.serve.command
    from resd.cli import main
    from test_rundir import hold_elsewhere

    monkeypatch.setattr(resd.serve.command, "_run_until_signalled", lambda _server: None)
    other = hold_elsewhere(tmp_path)  # the first server's process
    try:
        assert main(["serve", "--output-dir", str(tmp_path), "--port", str(_free_port()),
                     "--model", str(tmp_path / "no-such-model"),
                     "--learn", str(learn_config(tiny_model_dir, tmp_path))]) == 2  # fmt: skip
    finally:
        other.kill()
        other.wait()
    assert capsys.readouterr().err.strip() == (
        f"resd: error: --output-dir: another process is writing to {tmp_path} (a run, `resd "
        "compare`, `resd continual` or `resd serve --learn` still going); wait for it to end, "
        "or choose another --output-dir"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learn.yaml", "seed-playbook.md"]
