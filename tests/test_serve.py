"""`resd serve` end to end: a real uvicorn server in a thread, the tiny random-init model,
a real SQLite database, and the real `openai` client and httpx on the other side."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'resd[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sa = pytest.importorskip("sqlalchemy")

from resd.generation.hf import chat_prompt_ids  # noqa: E402
from resd.serve.app import (  # noqa: E402
    DEFAULT_MAX_BODY_BYTES,
    BackgroundServer,
    _started,
    create_app,
)
from resd.serve.engine import (  # noqa: E402
    Completion,
    EngineStopped,
    GenerationEngine,
    ModelHolder,
    PromptError,
    ServedModel,
    StreamedCompletion,
    load_served_model,
)
from resd.serve.store import SchemaVersionError, Store, sqlite_url  # noqa: E402

KEY = "test-key-123"
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "What is 3 + 4?"}]


@dataclass
class Running:
    """A started server and the parts behind it."""

    url: str
    store: Store
    holder: ModelHolder
    engine: GenerationEngine
    api_key: str | None

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.api_key or "none",
                             max_retries=0, timeout=60)  # fmt: skip

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", json=body, headers=headers, timeout=60, **kwargs)


@contextmanager
def start_server(
    served: ServedModel,
    db: Path | str,
    *,
    api_key: str | None = KEY,
    learner: Any = None,
    max_body_bytes: int = 16_384,
    **engine_options: Any,
) -> Iterator[Running]:
    """A real server on a free loopback port, its own store and engine; stopped on exit."""
    store = Store(str(db))
    store.add_version(served.version, parent=None, step=0, note="the test model")
    holder = ModelHolder(served)
    engine = GenerationEngine(holder, **{"max_new_tokens": 16, "autocast": None, **engine_options})
    app = create_app(holder, store, api_key=api_key, model_name=MODEL, learner=learner,
                     max_body_bytes=max_body_bytes, engine=engine)  # fmt: skip
    try:
        with BackgroundServer(app) as server:
            yield Running(server.url, store, holder, engine, api_key)
    finally:
        store.close()


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> ServedModel:
    # float32 on every machine: `auto` would differ between CPUs with and without bf16
    return load_served_model(str(tiny_model_dir), version="v1", name=MODEL, dtype="float32")


@pytest.fixture(scope="module")
def server(served: ServedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    with start_server(served, tmp_path_factory.mktemp("serve") / "resd.db") as running:
        yield running


def chat(running: Running, **kwargs: Any) -> Any:
    args = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, **kwargs}
    return running.client().chat.completions.create(**args)


# ---- completions ---------------------------------------------------------------------------------
def test_served_dtype_auto_is_what_training_samples_in(tiny_model_dir: Path) -> None:
    """`resd serve`'s default dtype follows the device as the trainer's sampler does:
    bfloat16 weights where bf16 is fast, float32 elsewhere; a bad name is an error."""
    import torch

    from resd.models import fast_bfloat16

    auto = load_served_model(str(tiny_model_dir), dtype="auto", device="cpu")
    expected = torch.bfloat16 if fast_bfloat16("cpu") else torch.float32
    assert {p.dtype for p in auto.model.parameters()} == {expected}
    with pytest.raises(ValueError, match="dtype"):
        load_served_model(str(tiny_model_dir), dtype="bf16", device="cpu")


def test_chat_completion_is_served_and_stored(server: Running) -> None:
    response = chat(server, temperature=0.8, seed=7)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.system_fingerprint == "v1"
    assert response.model_extra["resd_model_version"] == "v1"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")

    row = server.store.interaction(response.id)
    assert row is not None and row["model_version"] == "v1" and row["model_name"] == MODEL
    assert row["messages"] == MESSAGES and row["response"] == choice.message.content
    assert len(row["response_token_ids"]) == response.usage.completion_tokens > 0
    assert len(row["prompt_token_ids"]) == response.usage.prompt_tokens > 0
    assert len(row["response_logprobs"]) == len(row["response_token_ids"])
    assert all(lp <= 0 for lp in row["response_logprobs"])
    assert row["params"] == {"temperature": 0.8, "top_p": 1.0, "seed": 7, "max_tokens": 8,
                             "stream": False}  # fmt: skip

    # the same seed gives the same reply; no seed gets a fresh one, which is recorded
    assert (
        chat(server, temperature=0.8, seed=7).choices[0].message.content == choice.message.content
    )
    unseeded = chat(server)
    assert isinstance(server.store.interaction(unseeded.id)["params"]["seed"], int)
    greedy = chat(server, temperature=0)  # no sampler, so no log-probs to record
    assert server.store.interaction(greedy.id)["response_logprobs"] is None
    assert (
        chat(server, temperature=0).choices[0].message.content == greedy.choices[0].message.content
    )


def test_a_streamed_reply_comes_token_by_token_while_it_is_generated(served: ServedModel) -> None:
    """The engine's side of streaming: the first token is handed out while the batch is
    still decoding (a reply generated whole, then cut, would be done by then), the pieces
    come about a token each (partial UTF-8 characters wait for the rest) and join to the
    completion's text; under a stop, no piece ever holds any of the stop."""
    holder = ModelHolder(served)
    engine = GenerationEngine(holder, max_new_tokens=300, autocast=None)
    engine.start()
    try:
        future = engine.submit(MESSAGES, temperature=1.3, seed=3, max_tokens=300, stream=True)
        assert future.next_piece(timeout=60) is StreamedCompletion.STARTED
        assert not future.done()  # 300 tokens to go: the first came before the last
        pieces = list(iter(lambda: future.next_piece(timeout=60), None))
        completion = future.result()
        assert "".join(pieces) == completion.text and all(pieces)
        assert len(completion.token_ids) // 3 < len(pieces) <= len(completion.token_ids)
        # a stop across a token boundary whose first character was whole before the second
        # came: streamed at once, it would be sent before the stop was known
        plain = engine.submit(MESSAGES, temperature=1.3, seed=3, max_tokens=40).result()
        decode = served.tokenizer.decode
        start = next(
            len(left) - 1
            for k in range(2, len(plain.token_ids))
            if (left := decode(plain.token_ids[:k])) and plain.text.startswith(left)
            and "\ufffd" not in left[-1] and len(left) < len(plain.text)
            and plain.text.find(plain.text[len(left) - 1 : len(left) + 1]) == len(left) - 1
        )  # fmt: skip
        stop = plain.text[start : start + 2]
        cut = engine.submit(MESSAGES, temperature=1.3, seed=3, max_tokens=40, stream=True,
                            stop=["never-written", stop])  # fmt: skip
        pieces = [p for p in iter(lambda: cut.next_piece(timeout=60), None)
                  if p is not StreamedCompletion.STARTED]  # fmt: skip
        assert "".join(pieces) == cut.result().text == plain.text[:start]
    finally:
        engine.stop()


def test_an_engine_request_that_names_no_option_is_the_models_own_reply(
    served: ServedModel,
) -> None:
    """`submit`'s defaults are no penalty and no bias: a greedy request that names nothing
    else is the reply `generate` gives with no processors. The server always names every
    option, so only a direct caller of the engine (a script, a benchmark) would see a
    default that steered sampling."""
    import torch

    engine = GenerationEngine(ModelHolder(served), max_new_tokens=12, autocast=None)
    engine.start()
    try:
        reply = engine.submit(MESSAGES, temperature=0).result(timeout=60)
    finally:
        engine.stop()
    prompt = chat_prompt_ids(served.tokenizer, MESSAGES)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = served.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=12)  # fmt: skip
    assert reply.prompt_token_ids == prompt
    assert reply.token_ids == out[0, len(prompt) :].tolist()[: len(reply.token_ids)]
    assert len(reply.token_ids) == 12 or reply.finish_reason == "stop"


def test_logprobs_are_scored_under_the_engines_autocast(served: ServedModel) -> None:
    """A reply's `logprobs` come from one forward pass under the engine's autocast, the
    precision the sampler drew in: an engine told to run in bf16 scores in bf16, not in
    `score_reply`'s default (`auto`, which is float32 on a CPU without fast bf16)."""
    from resd.generation.hf import score_reply

    engine = GenerationEngine(ModelHolder(served), max_new_tokens=6, autocast="bfloat16")
    engine.start()
    try:
        reply = engine.submit(MESSAGES, seed=3, top_logprobs=0).result(timeout=60)
    finally:
        engine.stop()
    given = [entry.logprob for entry in reply.token_logprobs]
    ids = reply.token_ids[: len(given)]

    def scored(autocast: str | None) -> list[float]:
        return score_reply(served.model, reply.prompt_token_ids, ids, autocast=autocast).logprobs

    assert given and given == scored("bfloat16") != scored(None)


def test_a_stream_reader_that_fails_does_not_fail_its_batch(
    served: ServedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """`listen` hands pieces to a callback on the worker's thread; one that raises (a
    reader whose event loop went away) is dropped (not called again), and the batch it
    shared, its own completion included, finishes. Catches the error escaping into
    `generate`."""
    engine = GenerationEngine(ModelHolder(served), max_new_tokens=8, batch_wait_ms=500.0,
                              autocast=None)  # fmt: skip
    engine.start()
    try:
        with engine.paused():  # both in one batch
            broken = engine.submit(MESSAGES, seed=1, stream=True)
            other = engine.submit(MESSAGES, seed=2, stream=True)

            calls = []

            def fail(item: object) -> None:
                calls.append(item)
                raise RuntimeError("Event loop is closed")

            broken.listen(fail)
        pieces = list(iter(lambda: other.next_piece(timeout=60), None))
        assert (
            "".join(p for p in pieces if p is not StreamedCompletion.STARTED) == other.result().text
        )
        assert broken.result(timeout=60).text is not None and engine.batch_sizes == [2]
        assert calls == [StreamedCompletion.STARTED]  # dropped after its first failure
        assert "a stream's listener failed" in caplog.text  # with its traceback
    finally:
        engine.stop()


def test_a_stream_holds_back_only_what_a_stop_could_still_begin(
    served: ServedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """`StreamedCompletion.push` on its own: without a stop, each token's text is handed out
    once it is whole; under stops, the last `len(longest) - 1` characters wait (they may
    begin a stop) until the completion is set. Tokens after the EOS (the padding a batch
    draws for a row that has ended) add nothing. Catches a longer hold, padding streamed
    as text, and a reader's timeout dropped. A reader that listens late hears what came
    before first; a record the stream's text does not begin (a tokenizer's clean-up) is
    logged, not patched into the stream."""
    tok = served.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("What is 3 + 4? Answer: 7", add_special_tokens=False)["input_ids"]
    text = tok.decode(ids)

    def drain(stream: StreamedCompletion) -> list[Any]:
        items = []
        while not stream._pieces.empty():
            items.append(stream.next_piece(timeout=1))
        return items

    def completion(text: str) -> Completion:
        return Completion(version="v1", model_name=MODEL, prompt_token_ids=[], token_ids=[],
                          text=text, content=text, logprobs=None, finish_reason="stop", seed=0)  # fmt: skip

    for stops, held in (((), 0), (("never", "xy"), 4)):
        stream = StreamedCompletion("v1", 0, tok, stops, [eos])
        with pytest.raises(queue.Empty):  # nothing yet: a reader's timeout is kept
            stream.next_piece(timeout=0.01)
        for token in ids:
            stream.push(token)
        first = drain(stream)
        assert first[0] is StreamedCompletion.STARTED
        assert "".join(first[1:]) == text[: len(text) - held], stops
        for token in (eos, ids[0], ids[1]):
            stream.push(token)
        assert drain(stream) == []
        stream.set_result(completion(text))
        assert drain(stream) == ([text[len(text) - held :]] if held else []) + [None]
    # a stop the reply opens with: nothing of it is streamed
    stream = StreamedCompletion("v1", 0, tok, (text[:2],), [eos])
    for token in ids:
        stream.push(token)
    stream.set_result(completion(""))
    assert drain(stream) == [StreamedCompletion.STARTED, None]
    # a completion set before any token was pushed still starts its reader first
    stream = StreamedCompletion("v1", 0, tok, (), [eos])
    stream.set_result(completion(text))
    assert drain(stream) == [StreamedCompletion.STARTED, text, None]
    # a reader that listens late hears what came before first, in order, then the rest
    stream = StreamedCompletion("v1", 0, tok, (), [eos])
    for token in ids[:3]:
        stream.push(token)
    heard: list[Any] = []
    stream.listen(heard.append)
    for token in ids[3:]:
        stream.push(token)
    stream.set_result(completion(text))
    assert heard[0] is StreamedCompletion.STARTED and heard[-1] is None
    assert "".join(heard[1:-1]) == text and stream._pieces.empty()
    # a record that is not what was streamed (a tokenizer's clean-up rewrote the text):
    # nothing is sent after the fact, and the log says so
    stream = StreamedCompletion("v1", 0, tok, (), [eos])
    for token in ids:
        stream.push(token)
    with caplog.at_level(logging.WARNING, logger="resd.serve.engine"):
        stream.set_result(completion("rewritten: " + text))
    items = drain(stream)
    assert items[0] is StreamedCompletion.STARTED and items[-1] is None
    assert "".join(items[1:-1]) == text
    assert "pieces differ from its recorded text" in caplog.text


def test_the_engine_refuses_stops_and_biases_it_cannot_honour_when_they_are_submitted(
    server: Running,
) -> None:
    """`submit` raises at once for an empty stop, a stop under a JSON schema and a bias on
    a token id outside the vocabulary: queued, each would fail `generate` for the whole
    batch it shared. The vocabulary's first and last ids are in it. A negative top-k or a
    min-p above 1 is refused too (min-p 1.5 keeps no token: at top-p 1 every draw was
    token 0)."""
    vocab = server.holder.current().model.config.vocab_size
    refused = [{"stop": ["x", ""]}, {"stop": ["x"], "json_schema": {"type": "object"}},
               {"logit_bias": {vocab: 1.0}}, {"logit_bias": {-1: 1.0}}, {"top_k": -1},
               {"min_p": 1.5}, {"min_p": -0.5}]  # fmt: skip
    for options in refused:
        with pytest.raises(ValueError, match=r"^(stop|logit_bias|top_k)"):
            server.engine.submit(MESSAGES, max_tokens=1, **options)
    for edge in (0, vocab - 1):  # the vocabulary's first and last ids are biased
        accepted = server.engine.submit(
            MESSAGES, max_tokens=2, temperature=0, logit_bias={edge: 100.0}
        )
        assert accepted.result(timeout=60).token_ids[0] == edge


def test_a_streamed_completion_that_cannot_be_stored_is_logged(
    server: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream's completion is stored in a task of its own (a client that leaves cannot
    cancel it); nothing else waits for that task to its end, so a failure to store is
    logged, with its traceback, not lost, and the stream ends with an `error` event, not
    `[DONE]`. A cancelled task (a server shutting down) is no failure. Unstreamed, a
    failure to store is a 500."""
    import asyncio

    from resd.serve.app import _log_failure

    def fail(**_: Any) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(server.store, "record_interaction", fail)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "seed": 1}
    # unstreamed, the failure is the response's: no reply whose id takes no feedback
    assert server.post("/v1/chat/completions", body).status_code == 500
    body["stream"] = True
    with caplog.at_level("ERROR", logger="resd.serve.app"):
        streamed = server.post("/v1/chat/completions", body)  # nothing stored: it says so
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert "could not be stored: RuntimeError" in events[-1] and "[DONE]" not in streamed.text
    message = "a streamed completion could not be recorded"
    logged = [record for record in caplog.records if record.getMessage() == message]
    assert [str(record.exc_info[1]) for record in logged] == ["database is locked"]

    caplog.clear()
    loop = asyncio.new_event_loop()
    try:
        failed, cancelled = loop.create_future(), loop.create_future()
        failed.set_exception(RuntimeError("disk full"))
        cancelled.cancel()
        with caplog.at_level("ERROR", logger="resd.serve.app"):
            _log_failure(cancelled)
            _log_failure(failed)
    finally:
        loop.close()
    assert [record.exc_info[1] for record in caplog.records] == [failed.exception()]


def test_a_streamed_request_cancelled_in_the_queue_tells_its_reader(
    served: ServedModel, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream whose future is cancelled before it ran (its waiter went away at a
    shutdown) hands its reader an `EngineStopped`, not nothing: a reader left waiting
    would hold its connection open for ever. The worker skips it and goes on. Telling
    the reader is all the cancellation does (a mutant's callback went on and raised)."""
    engine = GenerationEngine(ModelHolder(served), max_new_tokens=4, autocast=None)
    engine.start()
    try:
        with engine.paused():
            cancelled = engine.submit(MESSAGES, seed=1, stream=True)
            with caplog.at_level("ERROR"):
                assert cancelled.cancel()
            assert caplog.records == []
        assert isinstance(cancelled.next_piece(timeout=10), EngineStopped)
        assert engine.submit(MESSAGES, seed=2).result(timeout=60).text is not None
    finally:
        engine.stop()


def test_streaming_through_openai_client(server: Running) -> None:
    stream = chat(server, stream=True, seed=3, max_tokens=12,
                  stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and all(c.system_fingerprint == "v1" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    row = server.store.interaction(ids.pop())
    assert row["response"] == text and row["params"]["stream"] is True
    assert usage.completion_tokens == len(row["response_token_ids"])
    # the same request unstreamed gives the same text (same seed, same settings)
    assert chat(server, seed=3, max_tokens=12).choices[0].message.content == text


def test_a_stream_is_server_sent_events_ending_in_done(server: Running) -> None:
    """What a client without the openai package reads: `text/event-stream` (an EventSource
    or a proxy goes by it), the role first, the text, a finish, then `data: [DONE]`, which
    many SSE readers wait for before they close the stream."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "seed": 5, "stream": True}
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in c for c in chunks)  # only asked for with include_usage
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert server.store.interaction(chunks[0]["id"])["response"] == text
    # with include_usage, one more chunk: no choices, the usage (as OpenAI sends it)
    body["stream_options"] = {"include_usage": True}
    events = [e for e in server.post("/v1/chat/completions", body).text.split("\n\n") if e]
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    usage = last["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_a_stream_comes_in_token_pieces_each_a_chat_completion_chunk(server: Running) -> None:
    """A streamed reply arrives in pieces of about a token, one chunk each, not as one lump,
    joining to the stored reply; and each SSE chunk names its object
    `chat.completion.chunk` as OpenAI's do: clients and proxies that dispatch on `object`
    drop anything else (a mutant sent '' there)."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "seed": 2, "stream": True}
    events = [e for e in server.post("/v1/chat/completions", body).text.split("\n\n") if e]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    sent = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    row = server.store.interaction(chunks[0]["id"])
    assert "".join(sent) == row["response"] and all(sent)
    assert len(row["response_token_ids"]) // 3 < len(sent) <= len(row["response_token_ids"])


def test_a_client_that_leaves_mid_stream_still_leaves_its_completion_recorded(
    served: ServedModel, tmp_path: Path
) -> None:
    """The completion is stored when it is done, whoever still listens: a client that
    closes the stream after the first piece (a long reply still decoding) leaves a row
    that takes feedback. Catches storing inside the stream, which a disconnect cancels."""
    with start_server(served, tmp_path / "resd.db", max_new_tokens=300) as running:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 300, "seed": 3,
                "temperature": 1.3, "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body,
                          headers=running.headers(), timeout=60) as response:  # fmt: skip
            lines = response.iter_lines()
            first = json.loads(next(line for line in lines if line).removeprefix("data: "))
        _wait_for(lambda: running.store.interaction(first["id"]) is not None, "the row")
        assert len(running.store.interaction(first["id"])["response_token_ids"]) > 100
        posted = running.post("/v1/feedback", {"completion_id": first["id"], "reward": 0.0})
        assert posted.status_code == 201, posted.text


def test_models_and_health(server: Running) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/v1/models/{MODEL}", headers=server.headers()).status_code == 200
    health = httpx.get(f"{server.url}/health").json()  # open, no key needed
    assert health["status"] == "ok" and health["model_version"] == "v1"
    assert health["counts"]["interactions"] == server.store.counts()["interactions"]
    assert health["learner"] is None


def test_health_reports_how_many_requests_are_queued(server: Running) -> None:
    """/health's `queue` is the engine's count of accepted, unfinished requests: 0 once
    every reply went out (a mutant filed it under an empty key, so monitors read nothing)."""
    chat(server, max_tokens=1)
    health = httpx.get(f"{server.url}/health").json()
    assert health["queue"] == server.engine.pending == 0


def test_health_is_a_503_naming_the_error_when_the_database_fails(
    served: ServedModel, tmp_path: Path
) -> None:
    """/health is what a monitor polls: with the database unreadable (a table dropped
    behind the store's back) it answers 503 with the error's name, not a 500 or a 200
    (a mutant answered 504, which monitors read as a proxy timeout)."""
    with start_server(served, tmp_path / "resd.db") as running:
        _execute(tmp_path / "resd.db", "DROP TABLE feedback")
        response = httpx.get(f"{running.url}/health")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "error" and body["error"].startswith("OperationalError: ")
    assert "feedback" in body["error"]


def test_a_request_does_not_read_the_versions_table_again(server: Running) -> None:
    """The served version is checked against the store once, then remembered: a
    completion reads no `model_versions` rows (a mutant that forgot it read the whole
    table on every request, a cost that grows with every learner step)."""
    chat(server, max_tokens=1)  # the served version is known from here on
    reads: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM model_versions" in statement:
            reads.append(statement)

    sa.event.listen(server.store.engine, "before_cursor_execute", count)
    try:
        assert server.store.interaction(chat(server, max_tokens=1).id) is not None
    finally:
        sa.event.remove(server.store.engine, "before_cursor_execute", count)
    assert reads == []


def test_the_model_card_and_the_default_sampling_settings(server: Running) -> None:
    """`GET /v1/models/<id>` answers the served model's card (clients check it before use)
    and a 404 for another id; a request without temperature or top_p samples at OpenAI's
    defaults, 1 and 1, and is recorded so."""
    card = httpx.get(f"{server.url}/v1/models/{MODEL}", headers=server.headers()).json()
    assert (card["id"], card["object"], card["resd_model_version"]) == (MODEL, "model", "v1")
    other = httpx.get(f"{server.url}/v1/models/gpt-4o", headers=server.headers())
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    params = server.store.interaction(chat(server, max_tokens=1).id)["params"]
    assert (params["temperature"], params["top_p"]) == (1.0, 1.0)


def test_the_model_list_is_an_openai_list_object(server: Running) -> None:
    """`GET /v1/models` as OpenAI answers it: `{"object": "list", "data": [card]}`; clients
    without the openai package dispatch on `object`. Catches another `object` value."""
    listed = httpx.get(f"{server.url}/v1/models", headers=server.headers()).json()
    card = httpx.get(f"{server.url}/v1/models/{MODEL}", headers=server.headers()).json()
    assert listed == {"object": "list", "data": [card]} and card["owned_by"] == "resd"


def test_feedback_from_an_empty_source_is_a_400_naming_it(server: Running) -> None:
    """`source` names who judged a reply (the idempotency key with the completion): an empty
    one is a 400 naming the field, not a 500 from the store's own check, and no row."""
    completion = chat(server, max_tokens=1).id
    before = _counts(server)
    response = server.post(
        "/v1/feedback", {"completion_id": completion, "reward": 1.0, "source": ""}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "source" and _counts(server) == before


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(server: Running) -> None:
    """A request whose `Content-Length` is over `max_body_bytes` gets its 413 at once, from
    the header alone: the server does not wait to read a body it will refuse. Catches a
    server that ignored the declared length (it waited for a gigabyte that never came)."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (f"POST /v1/feedback HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")  # fmt: skip
    raw = b""
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode())
        while b"bytes" not in raw and (data := sock.recv(65536)):  # until the body is in
            raw += data
    answer = raw.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "request body too large (1000000000 bytes" in answer


# ---- feedback -----------------------------------------------------------------------------------------
def test_feedback_idempotency_and_conflicts(server: Running) -> None:
    completion = chat(server).id
    rows_before = server.store.counts()["feedback"]
    note = {"completion_id": completion, "reward": 1.0, "feedback": "good"}
    first = server.post("/v1/feedback", note)
    assert first.status_code == 201, first.text
    row = first.json()
    assert row["consumed_step"] is None and row["source"] == "user" and row["reward"] == 1.0
    assert row["object"] == "resd.feedback"  # the body names its kind, as OpenAI's objects do

    again = server.post("/v1/feedback", note)  # a retry: the same row, nothing new
    assert again.status_code == 200 and again.json() == row

    changed = server.post("/v1/feedback", {**note, "reward": 0.0, "feedback": "wrong after all"})
    assert changed.status_code == 200
    assert changed.json()["id"] == row["id"] and changed.json()["reward"] == 0.0
    assert server.store.counts()["feedback"] == rows_before + 1  # replaced, not added

    other = server.post("/v1/feedback", {**note, "source": "grader", "score": 0.5})
    assert other.status_code == 201 and other.json()["id"] != row["id"]

    pending = [r for r in server.store.unconsumed(1000) if r.completion_id == completion]
    assert {r.source for r in pending} == {"user", "grader"}
    user_row = next(r for r in pending if r.source == "user")
    assert user_row.reward == 0.0 and user_row.feedback == "wrong after all"
    assert len(user_row.response_logprobs) == len(user_row.response_token_ids)
    server.store.mark_consumed(
        [user_row.feedback_id], step=4, cursor={"feedback_id": user_row.feedback_id}
    )
    assert server.store.get_state("cursor") == {"feedback_id": user_row.feedback_id}

    conflict = server.post("/v1/feedback", {**note, "reward": 1.0, "feedback": "changed my mind"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "feedback_consumed"
    same = server.post("/v1/feedback", {**note, "reward": 0.0, "feedback": "wrong after all"})
    assert same.status_code == 200 and same.json()["consumed_step"] == 4

    missing = server.post("/v1/feedback", {**note, "completion_id": "chatcmpl-nope"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "completion_id"
    assert missing.json()["error"]["code"] == "completion_not_found"  # what a client branches on


# ---- rejected requests ----------------------------------------------------------------------------------
def _counts(running: Running) -> tuple[int, int]:
    counts = running.store.counts()
    return counts["interactions"], counts["feedback"]


def test_rejected_requests_answer_openai_errors_and_write_nothing(server: Running) -> None:
    completion = chat(server).id
    before = _counts(server)
    good = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
    cases: list[tuple[int, str, dict[str, Any]]] = [
        (401, "/v1/chat/completions", {"json": good, "headers": {"Authorization": ""}}),
        (401, "/v1/chat/completions", {"json": good, "headers": {"Authorization": "Bearer wrong"}}),
        (401, "/v1/feedback", {"json": {"completion_id": completion, "reward": 1},
                               "headers": {"Authorization": "Bearer wrong"}}),
        (413, "/v1/chat/completions", {"json": {**good, "user": "x" * 40_000}}),
        (413, "/v1/feedback", {"json": {"completion_id": completion, "feedback": "x" * 40_000}}),
        (400, "/v1/chat/completions", {"content": b'{"model": "tiny", "messages": ['}),
        (400, "/v1/chat/completions", {"content": b'{"model": "tiny", "temperature": NaN}'}),
        (400, "/v1/chat/completions", {"json": [1, 2]}),
        (400, "/v1/chat/completions", {"json": {"model": MODEL}}),
        (400, "/v1/chat/completions", {"json": {**good, "temperature": "hot"}}),
        (400, "/v1/chat/completions", {"json": {**good, "messages": [{"role": "robot", "content": "x"}]}}),
        (400, "/v1/chat/completions", {"json": {**good, "tools": []}}),
        (400, "/v1/chat/completions", {"json": {**good, "n": 17}}),
        (400, "/v1/chat/completions", {"json": {**good, "n": 0}}),
        (400, "/v1/chat/completions", {"json": {**good, "stop": ["a", "b", "c", "d", "e"]}}),
        (400, "/v1/chat/completions", {"json": {**good, "stop": ["a", ""]}}),
        (400, "/v1/chat/completions", {"json": {**good, "stop": 7}}),
        (400, "/v1/chat/completions", {"json": {**good, "top_logprobs": 2}}),
        (400, "/v1/chat/completions", {"json": {**good, "presence_penalty": 2.5}}),
        (400, "/v1/chat/completions", {"json": {**good, "frequency_penalty": -2.01}}),
        (400, "/v1/chat/completions", {"json": {**good, "presence_penalty": -2.01}}),
        (400, "/v1/chat/completions", {"json": {**good, "frequency_penalty": 2.01}}),
        (400, "/v1/chat/completions", {"json": {**good, "logprobs": True, "top_logprobs": 21}}),
        (404, "/v1/chat/completions", {"json": {**good, "model": "gpt-4o"}}),
        (400, "/v1/feedback", {"json": {"completion_id": completion}}),
        (400, "/v1/feedback", {"json": {"completion_id": completion, "reward": "high"}}),
        (400, "/v1/feedback", {"content": b'{"completion_id": "x", "reward": Infinity}'}),
        (404, "/v1/feedback", {"json": {"completion_id": "chatcmpl-unknown", "reward": 1}}),
    ]  # fmt: skip
    for status, path, kwargs in cases:
        headers = {**server.headers(), **kwargs.pop("headers", {})}
        if "content" in kwargs:
            headers["Content-Type"] = "application/json"
        response = httpx.post(f"{server.url}{path}", headers=headers, timeout=60, **kwargs)
        assert response.status_code == status, (path, kwargs, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    chunked = httpx.post(f"{server.url}/v1/feedback", headers=server.headers(), timeout=60,
                         content=iter([b'{"feedback": "', b"x" * 10_000, b"y" * 10_000]))  # fmt: skip
    assert chunked.status_code == 413 and "content-length" not in chunked.request.headers
    assert _counts(server) == before

    # the same refusals through the openai client raise its typed errors
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=MESSAGES, n=30)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert (
        httpx.get(f"{server.url}/nowhere", headers=server.headers()).json()["error"]["code"]
        == "not_found"
    )
    assert _counts(server) == before


def test_a_wrong_method_and_an_empty_completion_id_are_named_errors(server: Running) -> None:
    """A GET on a POST endpoint is a 405 with code `method_not_allowed` (a mutant blanked the
    code), and feedback on an empty completion id is a 400 naming `completion_id`, not a
    404 looked up in the database (a mutant let the empty id through)."""
    wrong = httpx.get(f"{server.url}/v1/chat/completions", headers=server.headers())
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    before = _counts(server)
    empty = server.post("/v1/feedback", {"completion_id": "", "reward": 1.0})
    assert empty.status_code == 400, empty.text
    assert empty.json()["error"]["param"] == "completion_id"
    assert _counts(server) == before


def test_options_that_make_no_sense_together_are_refused_by_name(server: Running) -> None:
    """Options that cannot be honoured together are a 400 naming the option rather than
    a reply that ignored one: `top_logprobs` without `logprobs`, a stop under a JSON
    format; so are an empty stop in a list and more than 4 stops. An empty message list is
    refused too, not answered from a bare prompt. The no-op values of every option pass."""
    good = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    before = _counts(server)
    refused = [({"top_logprobs": 2}, ("top_logprobs", "invalid_value")),
               ({"stop": "}", "response_format": {"type": "json_object"}},
                ("stop", "unsupported_value")),
               ({"stop": ["x", ""]}, ("stop", "invalid_value")),
               ({"stop": ["a", "b", "c", "d", "e"]}, ("stop", "invalid_value"))]  # fmt: skip
    for options, named in refused:
        response = server.post("/v1/chat/completions", {**good, **options})
        assert response.status_code == 400, (options, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == named, error
    empty = server.post("/v1/chat/completions", {**good, "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    assert _counts(server) == before
    no_ops = {"n": 1, "stop": [], "logprobs": False, "presence_penalty": 0.0,
              "frequency_penalty": 0.0}  # fmt: skip
    assert server.post("/v1/chat/completions", {**good, **no_ops}).status_code == 200
    four = server.post("/v1/chat/completions", {**good, "stop": ["never", "nor", "this", "one"]})
    assert four.status_code == 200, four.text  # 4 stops are OpenAI's most, and allowed
    for bound in (-2.0, 2.0):  # the penalties' range is closed
        edge = {"presence_penalty": bound, "frequency_penalty": bound}
        assert server.post("/v1/chat/completions", {**good, **edge}).status_code == 200, bound


def test_validation_errors_name_the_first_field_and_count_the_rest(server: Running) -> None:
    """A client fixes what the error names: the first bad field as a dotted path (no
    `body.` prefix), with how many more there are, under code invalid_value."""
    two_bad = {"model": MODEL, "messages": MESSAGES, "temperature": 5.0, "top_p": 0.0}
    error = server.post("/v1/chat/completions", two_bad).json()["error"]
    assert (error["param"], error["code"]) == ("temperature", "invalid_value"), error
    assert error["message"].startswith("temperature: ") and error["message"].endswith(
        "(and 1 more)"
    )
    nested = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": 5}],
    }
    error = server.post("/v1/chat/completions", nested).json()["error"]
    assert error["param"].startswith("messages.1.") and "more" in error["message"], error
    not_object = server.post("/v1/feedback", ["chatcmpl-x"]).json()["error"]
    assert not_object["code"] == "invalid_value" and not_object["param"] is None
    for top_p in (0.0, 1.5):  # (0, 1]
        refused = server.post(
            "/v1/chat/completions", {**two_bad, "temperature": 1.0, "top_p": top_p}
        )
        assert refused.json()["error"]["param"] == "top_p", refused.text
        # one bad field is named alone (a mutant added "(and 0 more)")
        assert "more" not in refused.json()["error"]["message"], refused.text
    nucleus = chat(server, top_p=0.5, temperature=2.0, max_tokens=2)
    assert server.store.interaction(nucleus.id)["params"]["top_p"] == 0.5
    # and top_p reaches the sampler: a nucleus of only the top token draws the greedy reply
    greedy = chat(server, temperature=0, max_tokens=6).choices[0].message.content
    narrow = chat(server, top_p=1e-9, temperature=2.0, seed=1, max_tokens=6)
    assert narrow.choices[0].message.content == greedy


def test_response_format_options_are_checked_and_recorded(
    served: ServedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`json_schema` without its schema is a 400 naming it; `text` is an ordinary reply,
    recorded with the format; without the grammar package a JSON format is a 400 naming
    the install, not a 500, and plain requests are still answered."""
    good = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    with start_server(served, tmp_path / "resd.db") as running:
        missing = running.post(
            "/v1/chat/completions", {**good, "response_format": {"type": "json_schema"}}
        )
        assert missing.status_code == 400, missing.text
        assert missing.json()["error"]["param"] == "response_format.json_schema"
        assert missing.json()["error"]["code"] == "invalid_value"
        text = running.post("/v1/chat/completions", {**good, "response_format": {"type": "text"}})
        assert text.status_code == 200, text.text
        params = running.store.interaction(text.json()["id"])["params"]
        assert params["response_format"] == {"type": "text"}

        monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
        refused = running.post(
            "/v1/chat/completions", {**good, "response_format": {"type": "json_object"}}
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("response_format", "unsupported_value")
        assert (
            error["message"].startswith("response_format: ") and "pip install" in error["message"]
        )
        # a forced tool call is decoded under its schema too: without xgrammar, the request's
        # tool_choice is what cannot be honoured
        tools = [{"type": "function", "function": {"name": "f"}}]
        forced = running.post("/v1/chat/completions",
                              {**good, "tools": tools, "tool_choice": "required"})  # fmt: skip
        assert forced.status_code == 400, forced.text
        error = forced.json()["error"]
        assert (error["param"], error["code"]) == ("tool_choice", "unsupported_value")
        assert running.post("/v1/chat/completions", good).status_code == 200
        assert _counts(running) == (2, 0)


def test_a_json_object_reply_opens_a_json_object(server: Running) -> None:
    """`response_format: {"type": "json_object"}` decodes under the schema of any JSON
    object: every reply opens one (the tiny model's replies are cut at max_tokens before
    they close it). Catches json_object decoded under a schema that names no type, which
    lets any JSON value through (a number, a string, a list)."""
    pytest.importorskip("xgrammar")
    for seed in range(6):
        reply = chat(server, seed=seed, max_tokens=3, response_format={"type": "json_object"})
        content = reply.choices[0].message.content
        assert content.lstrip().startswith("{"), (seed, content)


def test_a_background_server_restarts_at_once_on_the_port_it_used(
    served: ServedModel, tmp_path: Path
) -> None:
    """A notebook stops its server and starts another on the same port straight away: the
    stopped server's closed connections (left waiting on that port) do not block the new
    one, as with uvicorn's own binding. Catches the socket bound without SO_REUSEADDR."""
    store = Store(str(tmp_path / "resd.db"))
    try:
        app = create_app(ModelHolder(served), store, api_key=None, model_name=MODEL)
        with BackgroundServer(app) as first, httpx.Client() as client:
            assert client.get(f"{first.url}/health").status_code == 200
            port = first.port
            first.stop()  # the server closes the open connection: the port's side waits
        with BackgroundServer(app, port=port) as again:
            assert httpx.get(f"{again.url}/health", timeout=30).status_code == 200
    finally:
        store.close()


# uvicorn ends its thread with SystemExit(3) on a failed startup: Python ignores that in a
# thread, pytest reports it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_background_server_that_fails_to_start_gives_its_port_back() -> None:
    """An app whose startup fails (its lifespan raises, as a model that will not load
    would) makes `start` raise, and the port it had bound is free again for a second try.
    Catches a stop that left the socket open: uvicorn closes it only after serving."""
    from fastapi import FastAPI

    @asynccontextmanager
    async def failing(_app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("the model would not load")
        yield

    server = BackgroundServer(FastAPI(lifespan=failing), log_level="critical")
    with pytest.raises(RuntimeError, match="did not start"):
        server.start()
    with socket.socket() as probe:  # without SO_REUSEADDR: a socket still bound there refuses
        probe.bind((server.host, server.port))


def test_a_page_query_of_the_wrong_type_is_an_openai_400(server: Running) -> None:
    """`/?refresh=soon` fails the page's own parameter check: answered as every other
    refused request, a 400 in OpenAI's error shape naming the parameter, not FastAPI's
    422. Catches the handler of FastAPI's validation errors answering nothing (a 500)."""
    page = httpx.get(f"{server.url}/?refresh=soon", headers=server.headers(), timeout=30)
    assert page.status_code == 400, page.text
    error = page.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        "query.refresh", "invalid_value", "invalid_request_error"
    )  # fmt: skip


def test_the_app_holds_its_engine_store_and_holder(served: ServedModel, tmp_path: Path) -> None:
    """A notebook holding only the app reaches what it serves through `app.state` (its
    engine, store and model holder). Catches them left off."""
    store = Store(str(tmp_path / "resd.db"))
    try:
        holder = ModelHolder(served)
        engine = GenerationEngine(holder)
        app = create_app(holder, store, api_key=None, model_name=MODEL, engine=engine)
        assert (app.state.engine, app.state.store, app.state.holder) == (engine, store, holder)
        # the served version is registered when the app is made, before any request, so the
        # page and the learner see it at once (catches registering it only on first use)
        assert [v["id"] for v in store.versions()] == [served.version]
    finally:
        store.close()


def _raw_post(running: Running, path: str, body: bytes) -> httpx.Response:
    headers = {**running.headers(), "Content-Type": "application/json"}
    return httpx.post(f"{running.url}{path}", headers=headers, content=body, timeout=60)


def test_lone_surrogates_are_a_400_naming_the_field(server: Running) -> None:
    """`"a\ud800"` is valid JSON but no Unicode text: it was a 500 from the database (and a
    dropped connection) in feedback, a puzzling tokenizer message in a chat message; now a
    400 naming the field, before anything is written, and the server keeps answering."""
    completion = chat(server).id
    before = _counts(server)
    cid = completion.encode()
    feedback_cases = [
        (b'{"completion_id": "%s", "feedback": "a\\ud800"}' % cid, "feedback"),
        (b'{"completion_id": "%s", "reward": 1, "source": "\\udfff"}' % cid, "source"),
        (b'{"completion_id": "chatcmpl-\\ud800", "reward": 1}', "completion_id"),
    ]
    chat_cases = [
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
         "messages.0.content"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
         b'"text": "ok"}, {"type": "text", "text": "\\udc00"}]}]}', "messages.0.content.1.text"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
         b'"metadata": {"k": "\\ud83d"}}', "metadata.k"),
    ]  # fmt: skip
    for path, cases in (("/v1/feedback", feedback_cases), ("/v1/chat/completions", chat_cases)):
        for body, param in cases:
            response = _raw_post(server, path, body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and "surrogate" in error["message"], error
    # a surrogate *pair* is one ordinary character, and is stored as such
    paired = _raw_post(server, "/v1/feedback",
                       b'{"completion_id": "%s", "feedback": "ok \\ud83d\\ude00"}' % cid)  # fmt: skip
    assert paired.status_code == 201 and paired.json()["feedback"] == "ok \U0001f600"
    deep = _raw_post(server, "/v1/feedback", b"[" * 10_000)  # deeper than json can parse
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    assert _counts(server) == (before[0], before[1] + 1)
    with pytest.raises(ValueError, match="feedback: not valid Unicode text"):
        server.store.record_feedback(completion, source="lib", reward=None, score=None,
                                     feedback="a\ud800")  # fmt: skip


def test_reward_score_and_max_tokens_are_strict(server: Running) -> None:
    """reward and score are in [0, 1] (a reward of 5 counted as a success and scaled the
    policy gradient; a score of 7 was clamped unseen), and numbers are numbers: `true` and
    `"1"` were read as 1, `"max_tokens": "5"` as 5."""
    completion = chat(server).id
    before = _counts(server)
    good = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/feedback", {"completion_id": completion, "reward": 5}, "reward"),
        ("/v1/feedback", {"completion_id": completion, "reward": -0.5}, "reward"),
        ("/v1/feedback", {"completion_id": completion, "score": 7}, "score"),
        ("/v1/feedback", {"completion_id": completion, "score": 1.0001}, "score"),
        ("/v1/feedback", {"completion_id": completion, "reward": True}, "reward"),
        ("/v1/feedback", {"completion_id": completion, "reward": "1"}, "reward"),
        ("/v1/feedback", {"completion_id": completion, "score": "0.5"}, "score"),
        ("/v1/chat/completions", {**good, "max_tokens": "5"}, "max_tokens"),
        ("/v1/chat/completions", {**good, "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {**good, "max_completion_tokens": "5"}, "max_completion_tokens"),
        ("/v1/chat/completions", {**good, "temperature": "0.5"}, "temperature"),
        ("/v1/chat/completions", {**good, "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {**good, "seed": -1}, "seed"),  # drew as seed 2**63 − 1
        ("/v1/chat/completions", {**good, "seed": 2**70}, "seed"),  # drew as seed 0
    ]
    for path, body, param in refused:
        response = server.post(path, body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.text
    assert _counts(server) == before
    # the ends of the range, and JSON integers for floats, are fine
    ok = server.post("/v1/feedback", {"completion_id": completion, "reward": 1, "score": 0})
    assert ok.status_code == 201 and (ok.json()["reward"], ok.json()["score"]) == (1.0, 0.0)
    assert chat(server, temperature=1, max_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(ValueError, match="reward: expected a number from 0 to 1"):
        server.store.record_feedback(completion, source="lib", reward=5, score=None, feedback="")


def test_a_max_tokens_of_zero_is_refused_not_read_as_unset(server: Running) -> None:
    """`max_tokens: 0` (or `max_completion_tokens: 0`) asks for an empty reply, which the
    server cannot give: a 400 naming the field, and no row. Catches 0 accepted, where
    `or` then read it as unset and the reply ran to the server's cap."""
    before = _counts(server)
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"model": MODEL, "messages": MESSAGES, field: 0}
        response = server.post("/v1/chat/completions", body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field
    assert _counts(server) == before


# ---- concurrency, batching, swapping ---------------------------------------------------------------------
def test_concurrent_requests_all_recorded(server: Running) -> None:
    before = server.store.counts()["interactions"]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda i: chat(server, seed=i, max_tokens=6), range(6)))
    ids = {r.id for r in responses}
    assert len(ids) == 6
    assert server.store.counts()["interactions"] == before + len(responses)
    assert all(server.store.interaction(i) is not None for i in ids)


def _wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queued_requests_batch_and_rows_do_not_depend_on_batching(server: Running) -> None:
    alone = [chat(server, seed=100 + i, max_tokens=6).choices[0].message.content for i in range(4)]
    with ThreadPoolExecutor(4) as pool, server.engine.paused():
        futures = [pool.submit(chat, server, seed=100 + i, max_tokens=6) for i in range(4)]
        _wait_for(lambda: server.engine.pending == 4, "4 queued requests")
    batched = [f.result().choices[0].message.content for f in futures]
    assert server.engine.batch_sizes[-1] == 4  # one batch of four
    assert batched == alone  # per-row seeds: the same samples as one by one


def test_swap_while_a_request_is_in_flight(
    server: Running, served: ServedModel, caplog: pytest.LogCaptureFixture
) -> None:
    server.store.add_version("v2", parent="v1", step=1, note="test swap")
    new = ServedModel(model=served.model, tokenizer=served.tokenizer, version="v2", name=MODEL)
    try:
        with ThreadPoolExecutor(1) as pool, server.engine.paused():
            in_flight = pool.submit(chat, server)
            _wait_for(lambda: server.engine.pending == 1, "the request to be accepted")
            with caplog.at_level("INFO", logger="resd.serve.engine"):
                old = server.holder.swap(new)
            assert old is served
        # the operator's log says which version now answers (a swap without it is silent)
        assert "serving model version v2 (was v1)" in caplog.text
        first = in_flight.result()
        second = chat(server)
        assert first.system_fingerprint == "v1" and second.system_fingerprint == "v2"
        assert server.store.interaction(first.id)["model_version"] == "v1"
        assert server.store.interaction(second.id)["model_version"] == "v2"
        assert httpx.get(f"{server.url}/health").json()["model_version"] == "v2"
        assert [v["id"] for v in server.store.versions()][-1] == "v2"

        # a version swapped in without add_version is registered on first use, not lost
        server.holder.swap(ServedModel(served.model, served.tokenizer, version="v3", name=MODEL))
        third = chat(server)
        assert server.store.interaction(third.id)["model_version"] == "v3"
        registered = server.store.versions()[-1]
        assert registered["note"] == "registered by the server"
        # a placeholder: no parent and step 0 until the learner's add_version fills them in
        # (catches a placeholder that claimed a training step it never had)
        assert registered["parent"] is None and registered["step"] == 0
    finally:
        server.holder.swap(served)


def test_max_batch_caps_each_batch_and_the_sizes_are_kept(
    served: ServedModel, tmp_path: Path
) -> None:
    """Five queued requests with `max_batch=2` run as batches of 2, 2 and 1 (a larger batch
    could exhaust the device's memory), and `batch_sizes` keeps every batch, newest last."""
    with start_server(served, tmp_path / "resd.db", max_batch=2) as running:
        with ThreadPoolExecutor(5) as pool, running.engine.paused():
            futures = [pool.submit(chat, running, seed=i, max_tokens=2) for i in range(5)]
            _wait_for(lambda: running.engine.pending == 5, "5 queued requests")
        assert all(f.result().id for f in futures)
        assert running.engine.batch_sizes == [2, 2, 1]
        chat(running, max_tokens=2)
        assert running.engine.batch_sizes == [2, 2, 1, 1]


def test_a_request_arriving_within_the_batch_wait_joins_the_batch(served: ServedModel) -> None:
    """After the first request the worker waits up to `batch_wait_ms` for others to batch
    with it: one sent half a second later (within a 10 s wait) shares its batch, and a full
    batch starts at once. Catches a worker that batched only what was queued already."""
    engine = GenerationEngine(ModelHolder(served), max_batch=2, max_new_tokens=2,
                              batch_wait_ms=10_000.0, autocast=None)  # fmt: skip
    engine.start()
    try:
        first = engine.submit(MESSAGES, seed=0)
        time.sleep(0.5)  # the worker has taken the first request and waits for more
        second = engine.submit(MESSAGES, seed=1)
        assert first.result(timeout=60).token_ids and second.result(timeout=60).token_ids
        assert engine.batch_sizes == [2]
    finally:
        engine.stop()


def test_one_schema_with_its_keys_in_another_order_shares_a_batch(served: ServedModel) -> None:
    """Requests batch only under the same sampling settings, a JSON schema among them: the
    schema is compared as canonical JSON, so two clients sending one schema with its keys
    in another order share a batch (a mutant kept each client's key order: two batches)."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    reordered = {"required": ["a"], "properties": {"a": {"type": "integer"}}, "type": "object"}
    engine = GenerationEngine(ModelHolder(served), max_new_tokens=2, autocast=None)
    engine.start()
    try:
        with engine.paused():  # both queued before the worker gathers a batch
            futures = [engine.submit(MESSAGES, seed=0, json_schema=schema),
                       engine.submit(MESSAGES, seed=1, json_schema=reordered)]  # fmt: skip
        assert all(f.result(timeout=60).token_ids for f in futures)
        assert engine.batch_sizes == [2]
    finally:
        engine.stop()


def test_messages_the_chat_template_refuses_fail_alone_and_are_not_generated(
    served: ServedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Many chat templates raise on messages they do not take (roles out of order): that
    request fails with a PromptError giving the template's reason, no batch runs for it,
    and the worker goes on serving. Catches a refused request still handed to the model
    (with an empty prompt, its future already failed)."""
    from resd.models import load_tokenizer

    refuse = ("{% if messages[0]['role'] == 'assistant' %}"
              "{{ raise_exception('a conversation opens with the user') }}{% endif %}")  # fmt: skip
    picky = load_tokenizer(
        str(tiny_model_dir), chat_template=refuse + served.tokenizer.chat_template
    )
    engine = GenerationEngine(ModelHolder(replace(served, tokenizer=picky)), max_new_tokens=2,
                              autocast=None)  # fmt: skip
    engine.start()
    try:
        refused = engine.submit([{"role": "assistant", "content": "hi"}], seed=0)
        with pytest.raises(PromptError, match="refused them: a conversation opens with the user"):
            refused.result(timeout=30)
        assert engine.submit(MESSAGES, seed=1).result(timeout=30).token_ids
        assert engine.batch_sizes == [1]
    finally:
        engine.stop()
    # over HTTP the refusal is the client's error (a 400 naming the messages), streamed or
    # not, and nothing is stored; catches an unstreamed request that does not wait for its
    # replies inside the error handling (the refusal then surfaced as a 500)
    with start_server(replace(served, tokenizer=picky), tmp_path / "resd.db") as running:
        opening = [{"role": "assistant", "content": "hi"}]
        for stream in (False, True):
            response = running.post("/v1/chat/completions",
                                    {"model": MODEL, "messages": opening, "stream": stream})  # fmt: skip
            assert response.status_code == 400, (stream, response.text)
            error = response.json()["error"]
            assert (error["param"], error["code"]) == ("messages", "invalid_messages"), error
            assert "a conversation opens with the user" in error["message"]
        assert _counts(running) == (0, 0)


def test_finish_reason_says_whether_the_model_ended_the_reply(server: Running) -> None:
    """OpenAI's `finish_reason`, answered and stored: "stop" when the reply ends in the
    model's end-of-turn token, "length" when it was cut at max_tokens. Catches the two
    swapped (a client then reads a cut reply as complete)."""
    from resd.generation.hf import eos_token_ids

    served = server.holder.current()
    eos = set(eos_token_ids(served.model, served.tokenizer))
    reasons = []
    for seed in range(3):
        reply = chat(server, seed=seed, max_tokens=3)
        tokens = server.store.interaction(reply.id)["response_token_ids"]
        expected = "stop" if tokens[-1] in eos else "length"
        assert reply.choices[0].finish_reason == expected, (seed, tokens)
        assert server.store.interaction(reply.id)["finish_reason"] == expected
        assert expected == "stop" or len(tokens) == 3
        reasons.append(expected)
    assert "length" in reasons


def test_a_stop_sequence_ends_the_reply_before_it_and_is_recorded(server: Running) -> None:
    """OpenAI's `stop`: the reply is the seeded reply without a stop up to where the stop
    begins, `finish_reason` is "stop", and the store keeps the stop among the params, the
    text the client saw, and the sampled tokens through the one that completed the stop
    (`usage` counts them). Streamed, the pieces join to the same cut text. "" is no stop
    (a stop under a JSON format: `test_options_that_make_no_sense_together_...`)."""
    plain = chat(server, seed=5, max_tokens=16)
    text = plain.choices[0].message.content
    start = next(i for i in range(3, len(text) - 2) if text.find(text[i : i + 2]) == i)
    stop = text[start : start + 2]
    cut = chat(server, seed=5, max_tokens=16, stop=[stop, "never-written"])
    assert cut.choices[0].message.content == text[:start]
    assert cut.choices[0].finish_reason == "stop"
    row = server.store.interaction(cut.id)
    assert row["params"]["stop"] == [stop, "never-written"] and row["response"] == text[:start]
    tokens = server.store.interaction(plain.id)["response_token_ids"]
    assert row["response_token_ids"] == tokens[: len(row["response_token_ids"])]
    assert stop in server.holder.current().tokenizer.decode(row["response_token_ids"])
    assert cut.usage.completion_tokens == len(row["response_token_ids"]) < len(tokens)
    stream = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, seed=5, stop=stop, stream=True
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == text[:start]
    assert chunks[-1].finish_reason == "stop"
    none = chat(server, seed=5, max_tokens=16, stop="")
    assert none.choices[0].message.content == text
    assert "stop" not in server.store.interaction(none.id)["params"]


def test_logprobs_are_the_models_own_and_spell_the_reply(server: Running) -> None:
    """OpenAI's `logprobs` / `top_logprobs`: one entry per reply token (the EOS left out),
    each the log-probability the sampler drew it with, the alternatives most likely first,
    and the tokens' bytes joining to the reply. A greedy reply, which has no sampler,
    picks its top alternative every time. Streamed, the chunks carry the same entries.
    Catches scores shifted by a position, another row's or a tempered distribution,
    alternatives out of order, and an EOS reported as a token."""
    from resd.generation.hf import eos_token_ids

    served = server.holder.current()
    eos = set(eos_token_ids(served.model, served.tokenizer))
    contents = {}
    for seed in (5, 6, 20):  # seed 20's reply ends on EOS (found by trying seeds)
        reply = chat(
            server, seed=seed, max_tokens=12, temperature=1.3, logprobs=True, top_logprobs=3
        )
        row = server.store.interaction(reply.id)
        tokens, drawn = row["response_token_ids"], row["response_logprobs"]
        content = contents[seed] = reply.choices[0].logprobs.content
        assert len(content) == len(tokens) - (tokens[-1] in eos)
        assert [c.logprob for c in content] == pytest.approx(drawn[: len(content)], abs=1e-4)
        for entry in content:
            assert len(entry.top_logprobs) == 3 and entry.logprob <= entry.top_logprobs[0].logprob
            assert [a.logprob for a in entry.top_logprobs] == sorted(
                (a.logprob for a in entry.top_logprobs), reverse=True
            )
        spelled = b"".join(bytes(entry.bytes) for entry in content)
        assert spelled.decode("utf-8", errors="replace") == reply.choices[0].message.content
        assert row["params"]["logprobs"] is True and row["params"]["top_logprobs"] == 3
    assert reply.choices[0].finish_reason == "stop" and len(content) == len(tokens) - 1
    greedy = chat(server, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    for entry in greedy.choices[0].logprobs.content:
        assert (entry.token, entry.logprob) == (
            entry.top_logprobs[0].token,
            entry.top_logprobs[0].logprob,
        )
    bare = chat(server, seed=5, max_tokens=12, temperature=1.3, logprobs=True)
    assert [c.logprob for c in bare.choices[0].logprobs.content] == [c.logprob for c in contents[5]]
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)
    assert server.store.interaction(bare.id)["params"]["top_logprobs"] == 0
    assert chat(server, seed=5, max_tokens=12).choices[0].logprobs is None
    stream = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, seed=6, temperature=1.3, logprobs=True,
        top_logprobs=3, stream=True,
    )  # fmt: skip
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in contents[6]]


def test_token_bytes_spell_byte_level_and_sentencepiece_vocabularies(served: ServedModel) -> None:
    """A token's bytes, for `logprobs`: byte-level vocabularies (the tiny model's, Qwen's)
    spell bytes in their own alphabet, so "é" is two tokens' worth of one character;
    SentencePiece ones write a space as "▁" and an unknown byte as "<0xNN>", and their "é"
    is the character's UTF-8, not byte 0xE9 of the byte-level alphabet. Either way the
    bytes of a text's tokens join to the text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from resd.serve.engine import token_bytes

    text = "héllo wörld ✓ — 3 + 4"
    tok = served.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes(tok, i) for i in ids) == text.encode()
    # every byte a UTF-8 text holds (the tiny vocabulary, trained on ASCII, spells these
    # characters byte by byte), and the bytes no UTF-8 text holds by the alphabet's rule:
    # a printable byte is its own character, the others the characters from U+0100 on.
    # Catches an alphabet whose printable ranges are off by one at either end.
    points = [*range(1, 0x100), *range(0x100, 0x800, 0x40), 0x800, *range(0x1000, 0x10000, 0x1000),
              0x10000, 0x40000, 0x80000, 0xC0000, 0x100000]  # fmt: skip
    every = "".join(map(chr, points))
    assert len(set(every.encode())) == 256 - len({0, 0xC0, 0xC1, *range(0xF5, 0x100)})
    ids = tok(every, add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes(tok, i) for i in ids) == every.encode()
    for char, byte in (("\u0100", 0), ("\u00c0", 0xC0), ("\u00c1", 0xC1), ("\u00ff", 0xFF)):
        assert token_bytes(tok, tok.convert_tokens_to_ids(char)) == bytes([byte]), char

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Replace(" ", "\u2581")
    sp.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    sp.train_from_iterator(["héllo wörld 3 + 4"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>", "<|end\u2581turn|>", *byte_tokens]))  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", eos_token="</s>",
                                   additional_special_tokens=["<|end\u2581turn|>"])  # fmt: skip
    ids = fast(text, add_special_tokens=False)["input_ids"]
    assert any(fast.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte fallback used
    assert b"".join(token_bytes(fast, i) for i in ids) == b" " + text.encode()
    # a special token (a top alternative may be one) is its own text, "\u2581" and all
    special = fast.convert_tokens_to_ids("<|end\u2581turn|>")
    assert token_bytes(fast, special) == "<|end\u2581turn|>".encode()


def test_penalties_reach_the_sampler_and_are_recorded(server: Running) -> None:
    """OpenAI's presence and frequency penalties: the tiny model at its default init
    repeats one token when greedy; with a presence or a frequency penalty of 2 no token
    comes twice (either outweighs the logits' spread). Each is recorded, so the reply can
    be regenerated; a request without them records neither."""
    plain = chat(server, temperature=0, max_tokens=12)
    row = server.store.interaction(plain.id)
    assert len(set(row["response_token_ids"])) == 1 and "presence_penalty" not in row["params"]
    for name in ("presence_penalty", "frequency_penalty"):
        steered = chat(server, temperature=0, max_tokens=12, **{name: 2.0})
        row = server.store.interaction(steered.id)
        tokens = row["response_token_ids"]
        assert len(set(tokens)) == len(tokens) == 12, name
        assert row["params"][name] == 2.0


def test_vllms_top_k_and_min_p_reach_the_sampler_and_are_recorded(server: Running) -> None:
    """vLLM's `top_k` and `min_p` (the openai client sends them in `extra_body`): either
    at its tightest leaves the top token alone, so a reply at temperature 1.5 is the greedy
    one, and each is recorded for regenerating it; -1 is vLLM's "off" for top_k, and values
    out of range are a 400 naming the field. Catches the settings ignored, or refused as
    unknown fields (a client written for vLLM got a 400)."""
    greedy = chat(server, temperature=0, max_tokens=10).choices[0].message.content
    sampled = chat(server, temperature=1.5, max_tokens=10, seed=9)
    assert sampled.choices[0].message.content != greedy  # unfiltered, it samples
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        reply = chat(server, temperature=1.5, max_tokens=10, seed=9, extra_body=extra)
        assert reply.choices[0].message.content == greedy, extra
        assert server.store.interaction(reply.id)["params"].items() >= extra.items()
    off = chat(server, temperature=1.5, max_tokens=10, seed=9, extra_body={"top_k": -1})
    assert off.choices[0].message.content == sampled.choices[0].message.content
    good = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    for bad in ({"top_k": -2}, {"top_k": 1.5}, {"min_p": 1.5}, {"min_p": -0.1}):
        refused = server.post("/v1/chat/completions", {**good, **bad})
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["param"] == next(iter(bad)), refused.text


def test_n_choices_share_a_batch_and_each_is_stored_under_its_own_id(server: Running) -> None:
    """`n`: choice i of a request with seed s is the reply seed s + i gives alone, the n
    rows are decoded as one batch, and each is stored under its own id (the response's
    for the first, `-i` after it for the others, in `resd_completion_id`), which takes
    feedback; usage counts the prompt once. Streamed, each choice's pieces carry its
    index and join to the same texts, the last ones too (they come after the first
    choice has ended)."""
    reply = chat(server, n=3, seed=7, max_tokens=8, temperature=1.3)
    assert server.engine.batch_sizes[-1] == 3
    ids = [choice.model_extra["resd_completion_id"] for choice in reply.choices]
    assert ids == [reply.id, f"{reply.id}-1", f"{reply.id}-2"]
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    texts = [choice.message.content for choice in reply.choices]
    assert texts == [chat(server, seed=7 + i, max_tokens=8, temperature=1.3).choices[0].message.content
                     for i in range(3)]  # fmt: skip
    rows = [server.store.interaction(cid) for cid in ids]
    assert [r["response"] for r in rows] == texts
    assert [(r["params"]["seed"], r["params"]["choice"], r["params"]["n"]) for r in rows] == [
        (7, 0, 3), (8, 1, 3), (9, 2, 3),
    ]  # fmt: skip
    assert reply.usage.completion_tokens == sum(len(r["response_token_ids"]) for r in rows)
    assert reply.usage.prompt_tokens == len(rows[0]["prompt_token_ids"])
    assert server.post("/v1/feedback", {"completion_id": ids[2], "reward": 1.0}).status_code == 201
    # a long stop that never comes holds each choice's last characters back to its end
    stream = chat(server, n=3, seed=7, max_tokens=8, temperature=1.3, stream=True,
                  stop="a stop never written")  # fmt: skip
    streamed = {0: "", 1: "", 2: ""}
    finishes, opened = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
            if "resd_completion_id" in (choice.model_extra or {}):  # where feedback goes
                opened.setdefault(choice.index, choice.model_extra["resd_completion_id"])
    assert [streamed[i] for i in range(3)] == texts and sorted(finishes) == [0, 1, 2]
    assert opened == {0: chunk.id, 1: f"{chunk.id}-1", 2: f"{chunk.id}-2"}
    # without a stop, a choice's first piece can come before the other choices have
    # started: it is kept for after their first chunks, not dropped
    stream = chat(server, n=3, seed=7, max_tokens=8, temperature=1.3, stream=True)
    streamed = {0: "", 1: "", 2: ""}
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[i] for i in range(3)] == texts

    def stored_params(reply: Any) -> list[dict[str, Any]]:
        return [server.store.interaction(c.model_extra["resd_completion_id"])["params"]
                for c in reply.choices]  # fmt: skip

    params = stored_params(chat(server, n=2, max_tokens=2))
    assert len({p["seed"] for p in params}) == 2
    assert [(p["choice"], p["n"]) for p in params] == [(0, 2), (1, 2)]  # n = 2 is several too
    # choice i's seed wraps at 2**63, the seeds a request may name (a mutant wrapped at 2**64)
    last = stored_params(chat(server, n=2, seed=2**63 - 1, max_tokens=1))
    assert [p["seed"] for p in last] == [2**63 - 1, 0]


def test_pieces_that_come_before_every_choice_started_keep_their_place() -> None:
    """A streamed request with n choices waits for every choice's first token before its
    200 (a failure until then is an HTTP error); a choice's pieces that come meanwhile go
    back into the queue ahead of the ones behind the last start. Catches them put back
    behind those: a choice's text then arrives out of order, which the server test above
    saw only when the worker happened to run ahead."""
    started = StreamedCompletion.STARTED

    async def order() -> list[tuple[int, Any]]:
        pieces: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        for entry in [(0, started), (0, "a"), (1, started), (0, "b"), (1, "c"), (0, None)]:
            pieces.put_nowait(entry)
        await _started(pieces, 2)
        return [pieces.get_nowait() for _ in range(pieces.qsize())]

    assert asyncio.run(order()) == [(0, "a"), (0, "b"), (1, "c"), (0, None)]


def test_a_logit_bias_reaches_the_sampler_and_names_bad_token_ids(server: Running) -> None:
    """OpenAI's `logit_bias`: +100 on a token makes a greedy reply that token only, and
    the bias is recorded; a key that is not a token id of the model, or a bias outside
    [-100, 100], is a 400 naming `logit_bias` and writes nothing."""
    reply = chat(server, temperature=0, max_tokens=6, logit_bias={"42": 100})
    row = server.store.interaction(reply.id)
    assert row["response_token_ids"] == [42] * 6 and row["params"]["logit_bias"] == {"42": 100}
    before = _counts(server)
    vocab = server.holder.current().model.config.vocab_size
    for bias in ({"x": 1}, {"-1": 1}, {str(vocab): 1}, {"42": 101}):
        refused = server.post("/v1/chat/completions",
                              {"model": MODEL, "messages": MESSAGES, "logit_bias": bias})  # fmt: skip
        assert refused.status_code == 400, (bias, refused.text)
        assert refused.json()["error"]["param"].startswith("logit_bias"), refused.text
        assert refused.json()["error"]["code"] == "invalid_value", refused.text
    assert _counts(server) == before


def test_the_server_caps_max_tokens_and_records_the_cap(server: Running) -> None:
    """A request for more tokens than `max_new_tokens` (16 here) gets 16, and 16 is what is
    recorded; `max_completion_tokens`, OpenAI's newer name, wins over `max_tokens`."""
    capped = chat(server, max_tokens=1000, seed=11, temperature=1.5)
    assert capped.usage.completion_tokens <= 16
    assert server.store.interaction(capped.id)["params"]["max_tokens"] == 16
    newer = chat(server, max_tokens=9, max_completion_tokens=3, seed=11)
    assert newer.usage.completion_tokens <= 3
    assert server.store.interaction(newer.id)["params"]["max_tokens"] == 3


def test_engine_settings_below_one_are_refused(served: ServedModel) -> None:
    """`--max-batch 0` would never generate, `--max-new-tokens 0` reply with nothing."""
    holder = ModelHolder(served)
    for bad in ({"max_batch": 0}, {"max_new_tokens": 0}, {"max_prompt_tokens": 0},
                {"batch_wait_ms": -1.0}):  # fmt: skip
        with pytest.raises(ValueError, match="must be >= 1"):
            GenerationEngine(holder, **bad)
    edge = GenerationEngine(holder, max_batch=1, max_new_tokens=1, max_prompt_tokens=1,
                            batch_wait_ms=0.0)  # fmt: skip
    assert (edge.max_batch, edge.max_new_tokens, edge.batch_wait_s) == (1, 1, 0.0)


def test_an_engine_built_without_options_has_the_cli_defaults(served: ServedModel) -> None:
    """A library user's `GenerationEngine(holder)` batches, waits and caps as `resd serve`
    does with no options (catches an engine default drifting from the documented one)."""
    import argparse

    from resd.serve.command import add_serve_subcommand

    parser = argparse.ArgumentParser()
    add_serve_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "tiny"])
    engine = GenerationEngine(ModelHolder(served))
    assert engine.max_batch == args.max_batch
    assert engine.batch_wait_s == args.batch_wait_ms / 1000.0
    assert engine.max_new_tokens == args.max_new_tokens
    assert engine.max_prompt_tokens == args.max_prompt_tokens
    # a plain `resd serve` listens at 127.0.0.1:8000, as docs/serving.md says (a mutant: 8001)
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    # and takes bodies up to 1,000,000 bytes, as the docs' table and `create_app` do
    assert args.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 1_000_000
    for level in ("critical", "error", "warning", "info", "debug"):  # uvicorn's levels, all taken
        assert parser.parse_args(["serve", "--model", "m", "--log-level", level]).log_level == level
    assert (
        parser.parse_args(["serve", "--model", "m", "--dtype", "auto"]).dtype
        == args.dtype
        == "auto"
    )
    assert args.api_key_env == "RESD_API_KEY"  # the variable docs/serving.md tells users to set
    assert args.output_dir == "runs/serve"  # docs/serving.md's table: where resd.db goes
    with pytest.raises(SystemExit):  # a server of no model: argparse's own error
        parser.parse_args(["serve"])


def test_the_cli_guards_a_learner_as_a_learner_built_in_code_does() -> None:
    """`resd serve --learn` without guard options serves a step only if its guard metric
    did not fall, as `Learner.from_config` and `LearnerSettings` do by default (catches a
    CLI default tolerance of 1, which served any step however far its metric fell)."""
    import argparse
    import inspect

    from resd.serve.command import add_serve_subcommand
    from resd.serve.learner import Learner, LearnerSettings

    parser = argparse.ArgumentParser()
    add_serve_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "tiny", "--learn", "learn.yaml"])
    library = inspect.signature(Learner.from_config).parameters
    assert args.guard_tolerance == library["guard_tolerance"].default == 0.0
    assert args.guard_metric == library["guard_metric"].default
    assert args.learn_min_rows is library["min_rows"].default is None  # the config's batch_size
    settings = LearnerSettings(min_rows=1)
    assert (settings.guard_metric, settings.guard_tolerance) == (args.guard_metric, 0.0)


def test_a_schema_max_length_is_held_to_the_letter(served: ServedModel, tmp_path: Path) -> None:
    """A client's `maxLength` is a character limit in every reply (the trainer's own schemas
    budget free text in tokens instead, which would let a reply run past it)."""
    pytest.importorskip("xgrammar", reason="structured output needs the structured extra")
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}},
              "required": ["a"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "short", "schema": schema}}
    with start_server(served, tmp_path / "resd.db", max_new_tokens=64) as running:
        for seed in range(4):
            reply = chat(running, response_format=fmt, max_tokens=64, seed=seed, temperature=1.5)
            obj = json.loads(reply.choices[0].message.content, strict=False)  # raw control chars
            assert len(obj["a"]) <= 3, obj


def test_a_json_reply_writes_its_keys_in_the_schemas_order(served: ServedModel) -> None:
    """A schema's key order is the order the reply writes them in, a client's way to have
    the model reason before it answers; requests whose schemas differ only in that order
    still share a batch. Catches each row decoded under the batch's canonical (sorted)
    schema, which wrote `answer` before `reasoning`."""
    pytest.importorskip("xgrammar", reason="structured output needs the structured extra")
    reasoning_first = {"type": "object", "required": ["reasoning", "answer"],
                       "properties": {"reasoning": {"type": "string", "maxLength": 4},
                                      "answer": {"type": "integer", "maximum": 9}}}  # fmt: skip
    answer_first = {
        **reasoning_first,
        "properties": dict(reversed(reasoning_first["properties"].items())),
    }
    engine = GenerationEngine(ModelHolder(served), max_new_tokens=40, autocast=None)
    engine.start()
    try:
        with engine.paused():
            futures = [engine.submit(MESSAGES, seed=seed, json_schema=schema)
                       for seed in range(3) for schema in (reasoning_first, answer_first)]  # fmt: skip
        texts = [future.result(timeout=60).text for future in futures]
        assert engine.batch_sizes == [6]
    finally:
        engine.stop()
    for text, first in zip(texts, ["reasoning", "answer"] * 3, strict=True):
        assert text.startswith(f'{{"{first}":'), text


def test_requests_without_a_seed_each_draw_a_fresh_one(server: Running) -> None:
    """An unseeded request draws its own random seed (recorded, so the reply can be
    regenerated); one fixed seed for all would give every unseeded prompt the same sample."""
    seeds = {server.store.interaction(chat(server, max_tokens=1).id)["params"]["seed"]
             for _ in range(3)}  # fmt: skip
    assert len(seeds) == 3 and all(0 <= seed < 2**63 for seed in seeds)


def test_one_worker_whose_stop_finishes_what_it_accepted(served: ServedModel) -> None:
    """A second `start` is a no-op (two workers would race for the model and split every
    batch). `stop` lets the batch in progress finish, paused or not: a request accepted
    before a shutdown is answered, not left waiting forever. `submit`'s defaults sample (temperature 1), so
    the reply has the sampler's log-probabilities."""
    engine = GenerationEngine(ModelHolder(served), max_batch=3, max_new_tokens=3,
                              batch_wait_ms=1000.0, autocast=None)  # fmt: skip
    engine.start()
    worker = engine._thread
    assert worker is not None
    engine.start()
    assert engine._thread is worker  # catches a second start that started a second worker
    with engine.paused():
        queued = [engine.submit(MESSAGES, seed=i) for i in range(3)]
    assert all(f.result(timeout=60).text is not None for f in queued)
    # not streamed unless asked (catches `submit` streaming by default)
    assert not any(isinstance(f, StreamedCompletion) for f in queued)
    assert engine.batch_sizes == [3]
    with engine.paused():  # a shutdown while the engine is held paused (by a learner step)
        accepted = engine.submit(MESSAGES)
        engine.stop()  # arrives while the worker waits, then gathers a batch (up to 1 s)
    assert accepted.done() and accepted.result().logprobs is not None
    # the stop that arrived while the worker gathered ends it (catches a worker that took the
    # stop as "no more requests" and went back to wait: stop gave up on it after 30 s)
    assert not worker.is_alive()


def test_a_stop_that_gives_up_on_the_worker_fails_the_queued_requests(
    served: ServedModel,
) -> None:
    """`stop` waits `timeout` seconds for the batch in progress; a request still queued
    behind it then fails with EngineStopped (the server answers a 503) instead of waiting
    for a worker that will never take it. Catches queued requests left pending forever."""
    engine = GenerationEngine(ModelHolder(served), max_batch=1, max_new_tokens=64,
                              batch_wait_ms=0.0, autocast=None)  # fmt: skip
    engine.start()
    long = engine.submit(MESSAGES, seed=0)  # seed 0 runs to the 64-token cap
    _wait_for(long.running, "the worker taking the first request", timeout=60)
    queued = engine.submit(MESSAGES, seed=1)  # behind a batch of 64 tokens
    engine.stop(timeout=0.0)
    assert queued.done()
    with pytest.raises(EngineStopped, match="shutting down"):
        queued.result()
    assert len(long.result(timeout=120).token_ids) == 64  # the batch in progress finishes


def test_a_script_that_never_stops_its_engine_still_exits(tmp_path: Path) -> None:
    """A notebook or script that starts an engine (or a server) and ends without `stop`
    must still exit: the idle worker, waiting for requests, must not keep the process
    alive. Catches a worker thread that is not a daemon (the script hung)."""
    script = (
        "from resd.serve.engine import GenerationEngine, ModelHolder, ServedModel\n"
        "engine = GenerationEngine(ModelHolder(ServedModel(None, None, 'v0', 'm')))\n"
        "engine.start()\n"
        "print('started', engine.pending)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0 and done.stdout == "started 0\n", done.stderr[-2000:]


def test_stopping_an_idle_engine_ends_its_worker_quietly(
    served: ServedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every shutdown of an idle server stops an idle engine: its worker ends without an
    exception (which Python would print as a traceback on the way out), and a second stop,
    or a stop before any start, is a no-op."""
    errors: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    engine = GenerationEngine(ModelHolder(served), autocast=None)
    engine.stop()
    engine.start()
    engine.stop()  # joins the worker
    engine.stop()
    assert errors == [] and engine.pending == 0


def test_a_failed_batch_is_a_500_and_the_worker_keeps_serving(
    served: ServedModel, tmp_path: Path
) -> None:
    """A batch whose generation fails (here: weights with a smaller vocabulary than their
    tokenizer's, as a mismatched folder has) answers its requests with a 500 and writes
    nothing; the worker goes on, so the next request is answered."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    mismatched = ServedModel(LlamaForCausalLM(config).eval(), served.tokenizer, "v1", MODEL)
    with start_server(served, tmp_path / "resd.db") as running:
        running.holder.swap(mismatched)
        failed = running.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        streamed = running.post("/v1/chat/completions",
                                {"model": MODEL, "messages": MESSAGES, "stream": True})  # fmt: skip
        assert streamed.status_code == 500, streamed.text  # it failed before its first token
        running.holder.swap(served)
        assert chat(running, max_tokens=2).choices[0].finish_reason in ("stop", "length")
        assert _counts(running) == (1, 0)


def test_a_stream_that_fails_after_its_first_token_ends_in_an_error_event(
    served: ServedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once a stream has begun its status is sent: a failure later (here: weights with
    learned positions for only 3 tokens past the prompt) ends it with an `error` event,
    not `[DONE]` and not a finish, and records nothing, and the server's log says what
    failed (the client is told only its type); the worker goes on serving."""
    from transformers import GPT2Config, GPT2LMHeadModel

    prompt = len(chat_prompt_ids(served.tokenizer, MESSAGES))
    config = GPT2Config(vocab_size=len(served.tokenizer), n_positions=prompt + 3, n_embd=16,
                        n_layer=1, n_head=2)  # fmt: skip
    short = ServedModel(GPT2LMHeadModel(config).eval(), served.tokenizer, "v1", MODEL)
    with start_server(served, tmp_path / "resd.db") as running:
        running.holder.swap(short)
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "seed": 1, "stream": True}
        response = running.post("/v1/chat/completions", body)
        assert response.status_code == 200
        events = [json.loads(e.removeprefix("data: ")) for e in response.text.split("\n\n") if e]
        assert events[-1]["error"]["type"] == "server_error"
        assert not any(e.get("choices") and e["choices"][0]["finish_reason"] for e in events[:-1])
        assert "a streamed reply failed: IndexError" in caplog.text
        running.holder.swap(served)
        assert chat(running, max_tokens=2).choices[0].finish_reason in ("stop", "length")
        assert _counts(running) == (1, 0)


def test_a_request_after_the_engine_stopped_is_a_503(served: ServedModel, tmp_path: Path) -> None:
    """While the server shuts down its engine is stopped first: a request then is a 503 (the
    openai client retries those), not a 500, and it leaves no row."""
    with start_server(served, tmp_path / "resd.db") as running:
        running.engine.stop()
        response = running.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "unavailable"
        assert _counts(running) == (0, 0)


def test_a_server_that_shuts_down_stops_its_engine(served: ServedModel, tmp_path: Path) -> None:
    """The app's shutdown stops the generation worker it started: a server stopped in a
    script or a test leaves no worker behind holding the model (catches a lifespan that
    never stopped the engine), and the engine then refuses new work."""
    with start_server(served, tmp_path / "resd.db") as running:
        assert chat(running, max_tokens=2).id
    with pytest.raises(EngineStopped, match="not running"):
        running.engine.submit(MESSAGES)


# ---- the database ----------------------------------------------------------------------------------------
NEWER_SCHEMA = "INSERT INTO schema_version VALUES (2, '2030-01-01 00:00:00')"  # as a newer resd


def _execute(path: Path, sql: str) -> None:
    """Change a database behind the store's back, as another program would."""
    engine = sa.create_engine(sqlite_url(path))
    with engine.begin() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


def _fill(store: Store) -> None:
    store.add_version("base", parent=None, step=0, note="first")
    store.record_interaction(
        completion_id="chatcmpl-a", model_version="base", model_name="m", messages=MESSAGES,
        params={"temperature": 1.0}, response="7", prompt_token_ids=[1, 2], response_token_ids=[3],
        response_logprobs=[-0.1], finish_reason="stop",
    )  # fmt: skip
    store.record_feedback("chatcmpl-a", source="user", reward=1.0, score=None, feedback="right")


def test_sqlite_store_is_wal_and_reopens_with_a_version_check(tmp_path: Path) -> None:
    path = tmp_path / "db" / "resd.db"
    store = Store(sqlite_url(path))
    assert store.journal_mode() == "wal" and store.schema_version() == 1
    _fill(store)
    store.close()

    store = Store(str(path))  # a plain path is SQLite too
    assert store.counts() == {"interactions": 1, "feedback": 1, "consumed": 0, "versions": 1}
    store.add_version("base", parent=None, step=0, accuracy=0.5)  # measured later
    store.add_version("base", parent=None, step=0)  # registered again: nothing is erased
    assert store.versions()[0]["accuracy"] == 0.5 and store.versions()[0]["note"] == "first"
    assert store.unconsumed(10)[0].feedback == "right"
    store.close()

    _execute(path, NEWER_SCHEMA)  # a newer resd wrote this database
    with pytest.raises(SchemaVersionError, match="schema version 2, newer"):
        Store(str(path))

    foreign = tmp_path / "foreign.db"  # our table names, but no schema_version
    _execute(foreign, "CREATE TABLE interactions (id TEXT)")
    with pytest.raises(SchemaVersionError, match="no schema_version"):
        Store(str(foreign))


def test_in_memory_store_is_shared_between_threads() -> None:
    store = Store("sqlite://")
    _fill(store)
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(store.counts()["interactions"]))
    thread.start()
    thread.join()
    assert seen == [1] and store.journal_mode() == "memory"


def test_postgresql_store(postgres_url: str) -> None:
    """The store on a real PostgreSQL server (tests/conftest.py): a new database at the
    current version, rows in and out, the learner's marks, and a reopen."""
    store = Store(postgres_url)
    try:
        assert store.dialect == "postgresql"
        assert store.schema_version() == 1 and store.journal_mode() is None
        _fill(store)
        row, created = store.record_feedback("chatcmpl-a", source="user", reward=1.0, score=None,
                                             feedback="right")  # fmt: skip
        assert not created and row["reward"] == 1.0
        [training] = store.unconsumed(10)
        assert training.response_token_ids == [3] and training.messages == MESSAGES
        store.mark_consumed([training.feedback_id], step=1, cursor={"at": training.feedback_id})
        assert store.unconsumed(10) == [] and store.get_state("cursor") == {
            "at": training.feedback_id
        }
        assert store.recent(5)[0]["feedback"][0]["consumed_step"] == 1
    finally:
        store.close()
    Store(postgres_url).close()  # reopens at the same version


def test_the_server_on_postgresql_keeps_a_reply_holding_a_nul(
    served: ServedModel, postgres_url: str
) -> None:
    """`resd serve --db postgresql+psycopg://…` end to end. PostgreSQL's text cannot hold a
    NUL character, which a byte-level model can decode (`logit_bias` forces one here):
    such a reply was a 500 after generation, the completion lost, and feedback carrying
    one a 500 from the driver. Now the client gets the reply as decoded and the row keeps
    it (the NUL stored as U+FFFD, the token ids exact), streamed or not; feedback with a
    NUL is a 400 naming the field, writing nothing; the page reads the rows back."""
    nul = served.tokenizer.convert_tokens_to_ids("\u0100")  # byte-level BPE's name for byte 0
    assert served.tokenizer.decode([nul]) == "\x00"
    messages = [{"role": "user", "content": "a NUL \x00 in the prompt"}]
    forced = {
        "temperature": 0,
        "max_tokens": 3,
        "logit_bias": {str(nul): 100},
        "messages": messages,
    }
    with start_server(served, postgres_url) as running:
        reply = chat(running, **forced)
        assert reply.choices[0].message.content == "\x00" * 3
        stream = list(chat(running, stream=True, **forced))
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == "\x00" * 3
        for completion_id in (reply.id, stream[0].id):
            row = running.store.interaction(completion_id)
            assert row is not None and row["response"] == "\ufffd" * 3, completion_id
            assert row["response_token_ids"] == [nul] * 3 and row["messages"] == messages
        for field, extra in (("feedback", {"feedback": "a\x00b"}), ("source", {"source": "u\x00"}),
                             ("completion_id", {"completion_id": "chatcmpl-\x00"})):  # fmt: skip
            refused = running.post(
                "/v1/feedback", {"completion_id": reply.id, "reward": 1.0, **extra}
            )
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == field and "NUL character" in error["message"], error
        assert running.store.counts()["feedback"] == 0
        noted = running.post("/v1/feedback", {"completion_id": reply.id, "reward": 1.0})
        assert noted.status_code == 201, noted.text
        [row] = running.store.unconsumed(10)
        assert row.completion_id == reply.id and row.response == "\ufffd" * 3
        page = httpx.get(f"{running.url}/?refresh=0", headers=running.headers())
        assert page.status_code == 200 and reply.id in page.text and stream[0].id in page.text
        health = httpx.get(f"{running.url}/health").json()
        assert health["counts"] == {"interactions": 2, "feedback": 1, "consumed": 0, "versions": 1}


# ---- the page --------------------------------------------------------------------------------------------
class PlaybookLearner:
    """Test data shaped like the learner's `status()`: a playbook, its history, steps."""

    def status(self) -> dict[str, Any]:
        return {
            "running": True,
            "playbook_markdown": "## strategy\n- Check the SUM twice <b>bold</b>",
            "playbook_history": [{"step": 1, "playbook_markdown": "## strategy\n- first lesson"}],
            "steps": [{"step": 1, "served": "v1", "accuracy": 0.25, "rows": 3},
                      {"step": 2, "served": "v2", "accuracy": 0.5, "rows": 4}],
            "accuracy": [{"step": 0, "accuracy": 0.1}, {"step": 1, "accuracy": 0.25},
                         {"step": 2, "accuracy": 0.5}],
        }  # fmt: skip


@pytest.fixture(scope="module")
def page_server(served: ServedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    db = tmp_path_factory.mktemp("page") / "resd.db"
    with start_server(served, db, api_key=None, learner=PlaybookLearner()) as running:
        yield running


def test_page_shows_interactions_playbook_and_curve(page_server: Running) -> None:
    question = "Unusual question <script>alert(1)</script> 4 + 5?"
    response = chat(page_server, messages=[{"role": "user", "content": question}])
    page_server.post("/v1/feedback", {"completion_id": response.id, "reward": 0.0,
                                      "feedback": "off by one & more"})  # fmt: skip
    page = httpx.get(f"{page_server.url}/?refresh=0")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "Unusual question &lt;script&gt;alert(1)&lt;/script&gt; 4 + 5?" in html
    assert "<script>" not in html
    assert "Check the SUM twice &lt;b&gt;bold&lt;/b&gt;" in html and "first lesson" in html
    assert response.id in html and "off by one &amp; more" in html
    assert "<svg" in html and "<polyline" in html and 'http-equiv="refresh"' not in html
    # unless asked otherwise the page reloads itself every 10 s (a mutant made it 11)
    assert '<meta http-equiv="refresh" content="10">' in httpx.get(f"{page_server.url}/").text
    health = httpx.get(f"{page_server.url}/health").json()
    assert health["learner"]["steps"] == 2 and health["learner"]["running"] is True


def test_health_summarises_the_learner_without_its_playbook(page_server: Running) -> None:
    """/health is polled by monitors: the learner's scalars, its step count, its last step
    and latest accuracy, never the playbook text (which grows with every step)."""
    learner = httpx.get(f"{page_server.url}/health").json()["learner"]
    assert "playbook_markdown" not in learner and "playbook_history" not in learner
    assert learner["last_step"] == {"step": 2, "served": "v2", "accuracy": 0.5, "rows": 4}
    assert learner["accuracy"] == {"step": 2, "accuracy": 0.5}


def test_page_without_learner_and_with_basic_auth(server: Running) -> None:
    assert httpx.get(f"{server.url}/").status_code == 401
    basic = base64.b64encode(f"operator:{KEY}".encode()).decode()
    page = httpx.get(f"{server.url}/", headers={"Authorization": f"Basic {basic}"})
    assert page.status_code == 200 and "no learner" in page.text


def test_auth_challenges_name_the_scheme_and_a_garbled_basic_header_is_a_401(
    server: Running,
) -> None:
    """A browser asks for a password only when the page's 401 challenges with Basic; the API
    challenges with Bearer. A Basic header that is not base64, or not UTF-8 inside, is a
    wrong password (a 401), not a server error."""
    page = httpx.get(f"{server.url}/")
    assert page.headers["www-authenticate"] == 'Basic realm="resd serve"'
    api = httpx.get(f"{server.url}/v1/models")
    assert api.status_code == 401 and api.headers["www-authenticate"] == "Bearer"
    assert api.json()["error"]["message"].startswith("missing API key")
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.json()["error"]["message"].startswith("invalid API key")
    not_utf8 = base64.b64encode(b"operator:\xff\xfe").decode()
    for garbled in ("Basic !!!not-base64!!!", f"Basic {not_utf8}"):
        response = httpx.get(f"{server.url}/", headers={"Authorization": garbled})
        assert response.status_code == 401, (garbled, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_basic_auth_opens_the_page_only(server: Running) -> None:
    """HTTP Basic with the key as password is for a browser on the page; the API takes the
    key as `Bearer` only (as the module docstring says and OpenAI clients send it), and no
    other scheme carrying a Basic credential opens the page. Catches Basic accepted by the
    API, and any scheme parsed as Basic on the page."""
    basic = base64.b64encode(f"operator:{KEY}".encode()).decode()
    for path in ("/v1/models", f"/v1/models/{MODEL}"):
        api = httpx.get(f"{server.url}{path}", headers={"Authorization": f"Basic {basic}"})
        assert api.status_code == 401 and api.headers["www-authenticate"] == "Bearer", path
    note = httpx.post(f"{server.url}/v1/feedback", json={"completion_id": "chatcmpl-x", "reward": 1.0},
                      headers={"Authorization": f"Basic {basic}"})  # fmt: skip
    assert note.status_code == 401 and note.json()["error"]["code"] == "invalid_api_key"
    page = httpx.get(f"{server.url}/", headers={"Authorization": f"Token {basic}"})
    assert page.status_code == 401


def test_page_screenshot_in_headless_chromium(page_server: Running, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    chat(page_server)
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1280,1600", f"{page_server.url}/?refresh=0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file(), done.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # a rendered page, not a blank one
    pil = pytest.importorskip("PIL.Image")
    with pil.open(shot) as image:
        colours = image.convert("RGB").resize((64, 80)).getcolors(maxcolors=64 * 80)
    assert colours is not None and len(colours) > 10


# ---- the command line ----------------------------------------------------------------------------------
def test_cli_refuses_a_public_host_without_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    from resd.cli import main

    os.environ.pop("RESD_TEST_UNSET_KEY", None)
    code = main(
        ["serve", "--model", "unused", "--host", "0.0.0.0", "--api-key-env", "RESD_TEST_UNSET_KEY"]
    )
    assert code == 2 and "needs an API key" in capsys.readouterr().err


def test_only_loopback_hosts_count_as_loopback() -> None:
    """`resd serve` without a key binds only where no other machine can reach it:
    `localhost` and every loopback address (IPv6 in brackets too), nothing else."""
    from resd.serve.app import on_loopback

    for host in ("localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "::1", "[::1]"):
        assert on_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.2", "example.com", "localhost.example.com", ""):
        assert not on_loopback(host), host


def test_cli_without_the_serve_extra_names_it(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'sqlalchemy', 'starlette'):\n"
        "    sys.modules[name] = None\n"
        "import resd\n"
        "from resd.cli import main\n"
        "sys.exit(main(['serve', '--model', 'unused']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    # the first missing package by name (`resd.serve.command` imports uvicorn first)
    assert (
        "resd: error: resd serve needs uvicorn; install it with: pip install 'resd[serve]'"
        in done.stderr
    )


def _no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make loading a model a recorded failure: what must be refused before it."""
    import resd.serve.engine

    loads: list[str] = []

    def load(model: str, **_kwargs: Any) -> ServedModel:
        loads.append(model)
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(resd.serve.engine, "load_served_model", load)
    return loads


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--port", "70000"], "resd: error: --port: must be from 1 to 65535"),
        # one past each end of the range (catches a range check off by one)
        (["--port", "65536"], "resd: error: --port: must be from 1 to 65535"),
        (["--port", "0"], "resd: error: --port: must be from 1 to 65535"),
        (["--port", "-1"], "resd: error: --port: must be from 1 to 65535"),
        (["--max-body-bytes", "0"], "resd: error: --max-body-bytes: must be at least 1"),
        (["--max-body-bytes", "-1"], "resd: error: --max-body-bytes: must be at least 1"),
        (["--served-model-name", ""], "resd: error: --served-model-name: must not be empty"),
        (["--served-model-name", "  "], "resd: error: --served-model-name: must not be empty"),
        (["--db", "foo://x/y"], "resd: error: --db: cannot open foo://x/y: Can't load plugin"),
        (["--db", "://nothing"], "resd: error: --db: not a database URL"),
        # a metric no evaluation has was a KeyError traceback after the model and the
        # learner's baseline evaluation (a `rewards/<name>` only an evaluation can tell)
        (
            ["--guard-metric", "accuracy"],
            "resd: error: --guard-metric: 'accuracy' is not an "
            "evaluation metric (one of task_mean@k, task_best@k, case_mean@k, case_best@k, or "
            "rewards/<name> of a reward function)",
        ),
        (["--guard-metric", "rewards/"], "resd: error: --guard-metric: 'rewards/' is not"),
        # the engine's limits were refused only after the model loaded, four in one sentence
        (["--max-batch", "0"], "resd: error: --max-batch: must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "resd: error: --max-new-tokens: must be at least 1"),
        (["--max-prompt-tokens", "-1"], "resd: error: --max-prompt-tokens: must be at least 1"),
        (["--batch-wait-ms", "-1"], "resd: error: --batch-wait-ms: must be a finite number"),
        # inf: a lone request waited for a full batch for ever; nan slipped past `< 0`
        (["--batch-wait-ms", "inf"], "resd: error: --batch-wait-ms: must be a finite number"),
        (["--batch-wait-ms", "nan"], "resd: error: --batch-wait-ms: must be a finite number"),
        # nan: the guard refused every learner step; inf: the guard was off, unannounced
        (["--guard-tolerance", "nan"], "resd: error: --guard-tolerance: must be a finite"),
        (["--guard-tolerance", "inf"], "resd: error: --guard-tolerance: must be a finite"),
        (["--learn-min-rows", "0"], "resd: error: --learn-min-rows: must be at least 1, got 0"),
        # torch.device's RuntimeError, a traceback; meta loaded and failed at the first reply
        (["--device", "gpu"], "resd: error: --device: expected auto, cpu, cuda, cuda:N, mps"),
        (["--device", "meta"], "resd: error: --device: expected auto, cpu, cuda, cuda:N, mps"),
        # replies recorded under a blank version id; an unnamed key variable: no auth
        (["--base-version", " "], "resd: error: --base-version: must not be empty"),
        (["--api-key-env", ""], "resd: error: --api-key-env: must not be empty"),
        # `Path("")` is the working directory: the database went among the user's files
        (["--output-dir", ""], "resd serve: error: argument --output-dir: must not be empty"),
        (["--db", ""], "resd serve: error: argument --db: must not be empty"),
        (["--learn", ""], "resd serve: error: argument --learn: must not be empty"),
    ],
)
def test_cli_refuses_bad_options_before_loading_the_model(
    extra: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from resd.cli import main

    loads = _no_model_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["serve", "--model", "unused", "--output-dir", str(tmp_path / "out"), *extra])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_cli_refuses_a_bad_learner_config_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--learn` with a config the learner cannot run (a missing file, an environment that
    does not import, early stopping, more rows than a batch) was read only after the served
    model had loaded: minutes for a large model. Each is one error line before the load,
    and the output folder is left as it was."""
    from resd.cli import main

    loads = _no_model_load(monkeypatch)
    (tmp_path / "badenv.yaml").write_text("env: toy_envs:NoSuchEnv\n")
    (tmp_path / "stops.yaml").write_text("eval_every: 1\nearly_stopping: {patience: 2}\n")
    (tmp_path / "ok.yaml").write_text("batch_size: 4\n")
    for extra, expected in [
        (["--learn", str(tmp_path / "none.yaml")], "resd: error: config: file not found"),
        (["--learn", str(tmp_path / "badenv.yaml")], "resd: error: env: module 'toy_envs' has no "
         "attribute 'NoSuchEnv'"),
        (["--learn", str(tmp_path / "stops.yaml")], "resd: error: early_stopping: a learner trains"),
        (["--learn", str(tmp_path / "ok.yaml"), "--learn-min-rows", "5"],
         "resd: error: --learn-min-rows: 5 is not in 1..4"),
    ]:  # fmt: skip
        code = main(["serve", "--model", "unused", "--output-dir", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert loads == [] and not (tmp_path / "out").exists()


def test_cli_takes_the_ports_at_the_ends_of_the_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ports 1 and 65535 pass the range check and go on to be listened on (here the model
    load after it fails with a message). Catches a range check that refused port 1."""
    import resd.serve.engine
    from resd.cli import main

    def load(model: str, **_kwargs: Any) -> ServedModel:
        raise ValueError(f"the model load was reached for {model}")

    monkeypatch.setattr(resd.serve.engine, "load_served_model", load)
    for port in (1, 65535):
        code = main(["serve", "--model", "unused", "--output-dir", str(tmp_path / "out"),
                     "--port", str(port)])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and "--port: must be" not in err, err
        # bound and let go, then the model load; or (without the rights) named as such
        assert ("the model load was reached for unused" in err
                or f"cannot listen on 127.0.0.1:{port}" in err), err  # fmt: skip


def test_cli_names_a_port_in_use_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from resd.cli import main

    loads = _no_model_load(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["serve", "--model", "unused", "--port", str(port), "--output-dir", str(tmp_path / "o")]
        )
    err = capsys.readouterr().err
    assert code == 2 and f"--host/--port: cannot listen on 127.0.0.1:{port}" in err, err
    assert loads == [] and not (tmp_path / "o").exists()  # its new database removed again


def test_cli_names_an_output_dir_it_cannot_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --output-dir under a file cannot be made: one error line saying so, before the
    model loads. Catches the failure passed over (it surfaced later as a database that
    could not be opened)."""
    from resd.cli import main

    loads = _no_model_load(monkeypatch)
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    out = tmp_path / "notes.txt" / "serve"
    assert main(["serve", "--model", "unused", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"resd: error: --output-dir: cannot create {out}" in err, err
    assert loads == []


def test_the_signal_handlers_are_given_back_when_the_server_returns() -> None:
    """`resd serve` turns SIGINT and SIGTERM into a clean return while uvicorn runs, and
    puts back the handlers it found once it has: a program that calls `main` (or a test)
    keeps its own Ctrl-C afterwards. Catches the handlers left installed."""
    from resd.serve.command import _run_until_signalled

    def mine(_signum: int, _frame: object) -> None:  # pragma: no cover - never signalled
        pass

    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen: list[Any] = []
    try:
        server = SimpleNamespace(run=lambda: seen.append(signal.getsignal(signal.SIGTERM)))
        _run_until_signalled(server)
        assert seen and seen[0] is not mine  # its own handler while serving
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_cli_names_a_database_that_cannot_be_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not a database, and a PostgreSQL URL without its driver, are one
    `--db:` line each (the latter with the install hint), and the file is left as it was."""
    from resd.cli import main

    loads = _no_model_load(monkeypatch)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database, but someone's notes\n" * 200)
    text = notes.read_text()
    assert main(["serve", "--model", "unused", "--db", str(notes)]) == 2
    err = capsys.readouterr().err
    assert f"resd: error: --db: cannot open {notes}: file is not a database" in err, err
    assert notes.read_text() == text and sorted(tmp_path.iterdir()) == [notes]
    # a database whose folder cannot be made (a file stands where it would be): the OS's words
    inside = notes / "resd.db"
    assert main(["serve", "--model", "unused", "--db", str(inside)]) == 2
    err = capsys.readouterr().err
    assert f"resd: error: --db: cannot open {inside}: [Errno" in err, err
    assert notes.read_text() == text and sorted(tmp_path.iterdir()) == [notes]

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    url = "postgresql+psycopg://resd:secret@db.invalid/resd"
    assert main(["serve", "--model", "unused", "--db", url]) == 2
    err = capsys.readouterr().err
    assert "resd: error: --db: postgresql+psycopg://resd:***@db.invalid/resd" in err, err
    assert "its database driver 'psycopg' is not installed (pip install 'psycopg[binary]')\n" in err
    assert "secret" not in err

    # without --db the database is <output-dir>/resd.db, and its error names that option
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "resd.db").write_text(text)
    assert main(["serve", "--model", "unused", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "resd: error: --output-dir: cannot open " in err and "file is not a database" in err, err

    # a database a newer resd wrote is one `--db:` line too (catches the schema error being
    # swallowed, which left the CLI to fail later with a traceback)
    newer = tmp_path / "newer.db"
    Store(str(newer)).close()
    _execute(newer, NEWER_SCHEMA)
    assert main(["serve", "--model", "unused", "--db", str(newer)]) == 2
    err = capsys.readouterr().err
    assert "resd: error: --db: database " in err and "schema version 2, newer" in err, err
    assert "Traceback" not in err
    assert loads == []


def test_cli_names_the_psycopg_url_for_a_psycopg2_url_and_takes_a_body_limit_of_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `postgresql+psycopg2://` URL without psycopg2 is told to install psycopg and use a
    `postgresql+psycopg://` URL (a mutant dropped that hint); `--max-body-bytes 1`, the
    least there is, passes the checks (a mutant refused it)."""
    from resd.cli import main

    loads = _no_model_load(monkeypatch)
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if not installed
    out = ["--output-dir", str(tmp_path / "out"), "--port", str(_free_port())]
    assert main(["serve", "--model", "unused", "--db", "postgresql+psycopg2://u@db.invalid/r",
                 *out]) == 2  # fmt: skip
    assert "and use a postgresql+psycopg:// URL" in capsys.readouterr().err
    assert loads == []
    args = ["serve", "--model", "m", "--db", "sqlite://", "--max-body-bytes", "1", *out]
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(args)
    assert loads == ["m"]


def test_cli_records_the_base_version_with_the_model_it_was_loaded_from(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A first start files its base version as `loaded from <model>`, what a restart with
    another model is checked against. Catches a start that left the row to the server's
    fallback registration, so a restart with another model went unchecked. (The server
    itself is not run.)"""
    import resd.serve.command
    from resd.cli import main

    monkeypatch.setattr(resd.serve.command, "_run_until_signalled", lambda _server: None)
    args = ["serve", "--output-dir", str(tmp_path), "--port", str(_free_port()),
            "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--model", str(tiny_model_dir)]) == 0
    store = Store(str(tmp_path / "resd.db"))
    try:
        [base] = store.versions()
    finally:
        store.close()
    assert (base["id"], base["note"]) == ("base", f"loaded from {tiny_model_dir}")
    # the model before any learning: step 0 and no parent, where the page's accuracy curve
    # starts (catches a base version filed at step 1)
    assert (base["step"], base["parent"]) == (0, None)
    capsys.readouterr()
    assert main([*args, "--model", str(tmp_path / "other")]) == 2
    assert "--base-version: 'base' is recorded in this database" in capsys.readouterr().err


def test_cli_failed_start_removes_only_the_database_it_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from resd.cli import main

    fresh = tmp_path / "new" / "serve"
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--output-dir", str(fresh)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # no empty database, no empty folders

    # a --db apart from --output-dir: its new folders go too (catches removing only the
    # output dir's)
    elsewhere = tmp_path / "elsewhere" / "db" / "resd.db"
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--output-dir", str(fresh),
                 "--db", str(elsewhere)]) == 2  # fmt: skip
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "elsewhere").exists()

    kept = tmp_path / "kept"
    store = Store(str(kept / "resd.db"))
    store.add_version("old", parent=None, step=0, note="from an earlier run")
    store.close()
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--output-dir", str(kept)]) == 2
    store = Store(str(kept / "resd.db"))
    assert [v["id"] for v in store.versions()] == ["old"]
    store.close()


def test_a_restart_with_another_model_does_not_reuse_the_base_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replies of the new model would be filed (and learnt from) under the old one's id."""
    from resd.cli import main

    out = tmp_path / "serve"
    store = Store(str(out / "resd.db"))
    store.add_version("base", parent=None, step=0, note="loaded from Qwen/Qwen3-0.6B")
    store.close()
    args = ["serve", "--model", str(tmp_path / "other"), "--output-dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        "--base-version: 'base' is recorded in this database as loaded from Qwen/Qwen3-0.6B" in err
    )
    assert main([*args, "--base-version", "other-base"]) == 2  # past that check: the model
    assert "no such folder" in capsys.readouterr().err


def test_cli_a_restart_on_the_same_model_or_an_in_memory_database_passes_the_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restart on the same model reuses the base version recorded for it, and `--db
    sqlite://` (in memory, no files to clean up) is a database like any other: both get as
    far as loading the model (missing here), and a failed start leaves no folders."""
    from resd.cli import main

    model, out = tmp_path / "model", tmp_path / "serve"
    store = Store(str(out / "resd.db"))
    store.add_version("base", parent=None, step=0, note=f"loaded from {model}")
    store.close()
    assert main(["serve", "--model", str(model), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "--base-version" not in err, err
    memory = ["--db", "sqlite://", "--output-dir", str(tmp_path / "new" / "dir")]
    assert main(["serve", "--model", str(model), *memory]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_cli_says_when_it_serves_without_a_key_and_binds_the_port_asked(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Without a key (the variable unset or empty) the start-up says the server is
    unauthenticated; with one it does not. The server is built for the host and port
    asked for. (The server itself is not run.)"""
    import resd.serve.command
    from resd.cli import main

    ran: list[Any] = []
    monkeypatch.setattr(resd.serve.command, "_run_until_signalled", ran.append)
    port = _free_port()
    args = ["serve", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path), "--port",
            str(port), "--api-key-env", "RESD_TEST_SERVE_KEY", "--dtype", "float32",
            "--device", "cpu"]  # fmt: skip
    for key in (None, "", "a-key"):
        if key is None:
            monkeypatch.delenv("RESD_TEST_SERVE_KEY", raising=False)
        else:
            monkeypatch.setenv("RESD_TEST_SERVE_KEY", key)
        assert main(args) == 0
        err = capsys.readouterr().err
        unauthenticated = "resd serve: no API key ($RESD_TEST_SERVE_KEY is unset)" in err
        assert unauthenticated == (not key), (key, err)
        assert (ran[-1].config.host, ran[-1].config.port) == ("127.0.0.1", port)


def test_create_app_refuses_an_empty_name_and_a_body_limit_below_one(served: ServedModel) -> None:
    store = Store("sqlite://")
    try:
        holder = ModelHolder(served)
        with pytest.raises(ValueError, match="max_body_bytes"):
            create_app(holder, store, api_key=None, model_name=MODEL, max_body_bytes=0)
        with pytest.raises(ValueError, match="model_name"):
            create_app(holder, store, api_key=None, model_name="")
        # an empty key would let in anyone sending "Authorization: Bearer " (a mutant did)
        with pytest.raises(ValueError, match=r"^api_key: an empty key"):
            create_app(holder, store, api_key="", model_name=MODEL)
    finally:
        store.close()


def test_cli_startup_line_names_the_version_a_restarted_learner_serves(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A restarted learner swaps in the version it last served while it is built; the
    start-up line said the base version even so. (The learner here is a stand-in that
    does just that, and the server is not run.)"""
    import dataclasses

    import resd.serve.command
    import resd.serve.engine
    import resd.serve.learner
    from resd.cli import main

    class RestartedLearner:
        stopped = False

        def start(self) -> None:
            pass

        def stop(self) -> None:
            RestartedLearner.stopped = True

        def status(self) -> dict[str, Any]:
            return {}

    def from_config(_config: str, *, store: Store, holder: ModelHolder, **_kw: Any) -> Any:
        store.add_version("tiny@step1", parent="base", step=1)
        holder.swap(dataclasses.replace(holder.current(), version="tiny@step1"))
        return RestartedLearner()

    ran: list[Any] = []
    loaded: list[ServedModel] = []
    load = resd.serve.engine.load_served_model  # imported by the command when it runs
    monkeypatch.setattr(resd.serve.learner.Learner, "from_config", from_config)
    monkeypatch.setattr(resd.serve.command, "_run_until_signalled", ran.append)
    monkeypatch.setattr(resd.serve.engine, "load_served_model",
                        lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])  # fmt: skip
    (tmp_path / "learn.yaml").write_text("batch_size: 4\n")  # read before the model loads
    code = main(["serve", "--model", str(tiny_model_dir), "--served-model-name", MODEL,
                 "--output-dir", str(tmp_path), "--learn", str(tmp_path / "learn.yaml"), "--dtype", "float32",
                 "--device", "cpu", "--max-prompt-tokens", "300", "--max-new-tokens", "20"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and len(ran) == 1 and RestartedLearner.stopped, err
    assert f"resd serve: model {MODEL!r} (version tiny@step1)" in err, err
    # the line ends naming the database and the learner's config
    database = sqlite_url(tmp_path / "resd.db")
    assert (
        f", page http://127.0.0.1:8000/, database {database}, learning with "
        f"{tmp_path / 'learn.yaml'}\n"
    ) in err
    # the tokenizer holds a whole request: the longest prompt and the longest reply
    assert loaded[0].tokenizer.model_max_length == 320
    assert (tmp_path / "resd.db").is_file()  # a start that got to serving keeps its database


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_resd_serve_command_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`resd serve` as a process: start, answer, record, and shut down cleanly on SIGTERM
    (what systemd and docker send; Ctrl-C's SIGINT takes the same path)."""
    port = _free_port()
    command = [sys.executable, "-m", "resd", "serve", "--model", str(tiny_model_dir),
               "--served-model-name", MODEL, "--port", str(port), "--output-dir", str(tmp_path),
               "--max-new-tokens", "8", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "RESD_API_KEY": KEY}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "resd serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1)
        assert reply.system_fingerprint == "base"
        note = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {KEY}"},
                          json={"completion_id": reply.id, "score": 0.5})  # fmt: skip
        assert note.status_code == 201
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "resd serve: model 'tiny' (version base)" in stderr
    # it closed its database on the way out: SQLite folds the write-ahead log back into the
    # file and removes it at the last close (a mutant that skipped the close left it behind)
    assert not (tmp_path / "resd.db-wal").exists()
    store = Store(str(tmp_path / "resd.db"))
    assert store.counts() == {"interactions": 1, "feedback": 1, "consumed": 0, "versions": 1}
    assert store.interaction(reply.id)["feedback"][0]["score"] == 0.5
    store.close()
