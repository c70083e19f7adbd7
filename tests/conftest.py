"""Shared fixtures: a tiny random-init Llama with a small locally trained tokenizer.

Nothing is downloaded: the tokenizer is trained with `tokenizers` on a few hundred
lines of text, and the model is a 2-layer Llama built from a config.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Workers share the cores (`make test` starts one per core): with torch's default of a
    thread per core in each of them, their thread pools fight and the suite runs slower
    than on one worker. One thread here, and in the subprocesses the tests start."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 3 + 4? Answer: 7",
    "The reflection says the answer was wrong because the sum was off by one.",
    '{"reasoning": "x", "operations": [{"type": "ADD", "section": "strat", "content": "check"}]}',
    "START start:\n    NEXT end\nEND end",
    "Playbook helpful harmful neutral lesson strategy mistake feedback attempt task",
] * 20


def build_tiny_model(path: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", model_max_length=2048,
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
        tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


# ---- PostgreSQL, for the serving store ---------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a real PostgreSQL database the store's tests may fill: the one named by
    RESD_TEST_POSTGRES_URL (`postgresql+psycopg://user:pw@host/db`), else a server started
    from the `pgserver` wheel (PostgreSQL's own binaries; `make test` installs it), one per
    test worker, stopped and deleted when the session ends. Its folder is a fresh one in
    the system's temporary folder, not pytest's: run as root, the server runs as a user of
    its own that must reach the folder, and another pytest run resets the permissions of
    pytest's folders to the owner's alone."""
    url = os.environ.get("RESD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    pytest.importorskip("psycopg", reason="needs psycopg: pip install 'psycopg[binary]'")
    pgserver = pytest.importorskip(
        "pgserver", reason="set RESD_TEST_POSTGRES_URL, or pip install pgserver"
    )
    folder = tempfile.mkdtemp(prefix="resd-test-postgres-")
    with pgserver.get_server(folder, cleanup_mode="delete") as server:
        yield server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """An empty PostgreSQL schema of its own for one test, as a URL whose connections see
    only it (`search_path`): tests and workers sharing one database never meet, and only
    the right to create a schema is needed. Dropped, with what the test made, afterwards."""
    import sqlalchemy as sa

    schema = f"resd_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_server)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.make_url(postgres_server).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            # a store the test left in a transaction would hold its locks: an error, not a hang
            conn.exec_driver_sql("SET LOCAL lock_timeout = '30s'")
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
