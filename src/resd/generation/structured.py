"""Structured output: reflection, tagging and curation replies decoded under a JSON schema.

Asked for JSON, a small model writes almost-JSON: a missing comma, an invented entry id,
a section name of its own, an object that never closes. The parsers in `parsing.py`
rescue some of that; a grammar prevents it. Three parts, a file each:

- `schemas.py` builds the schema of each reply from the playbook's visible ids and the
  reply's token budget (pure functions);
- `budget.py` budgets the free text in tokens, closing strings where the budget says;
- this module compiles schemas for one tokenizer with xgrammar and makes a fresh logits
  processor for every transformers `generate` call. After the closing brace the grammar
  allows only end-of-sequence, so generation stops as soon as the object does. The vLLM
  backend hands the same schemas to vLLM's own structured outputs instead.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from resd.generation.budget import (
    SENTENCE_WINDOW_TOKENS,
    ArrayRoom,
    FieldCloser,
    ForcedText,
    Path,
    array_room,
    budgeted_schema,
    path_tail,
)
from resd.generation.schemas import SEPARATORS


class StructuredOutputUnavailable(RuntimeError):
    """Structured output was asked for, but the grammar library is not installed."""


def grammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


INSTALL_HINT = (
    "structured_output needs the xgrammar package: pip install 'resd[structured]' "
    "(on CPU-only machines: pip install --no-deps xgrammar apache-tvm-ffi, which skips triton)"
)


class JsonGrammar:
    """Compiles JSON schemas for one tokenizer and constrains transformers' `generate`.

    Compiled grammars are cached by schema text: within a step every reflection shares
    the same playbook snapshot, hence the same schema. With `token_budget` (the default)
    free text is budgeted in tokens by a `FieldCloser` rather than cut at its `maxLength`
    (the module's docstring says why); `cut` counts the strings it closed, by their
    innermost key, over the grammar's life.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        token_budget: bool = True,
        sentence_window: int = SENTENCE_WINDOW_TOKENS,
    ) -> None:
        try:
            import xgrammar as xgr
        except ImportError as exc:
            raise StructuredOutputUnavailable(INSTALL_HINT) from exc
        import torch

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: dict[str, Any] = {}
        self.token_budget = token_budget
        self.sentence_window = sentence_window
        self._tokenizer = tokenizer
        self._token_bytes = [
            t if isinstance(t, bytes) else str(t).encode() for t in info.decoded_vocab
        ]
        self._quote_starts = torch.tensor([t.startswith(b'"') for t in self._token_bytes])
        self._bracket_starts = torch.tensor([t.startswith(b"]") for t in self._token_bytes])
        special = set(info.special_token_ids)
        token_of: dict[bytes, int] = {}
        for token, text in enumerate(self._token_bytes):  # the first of equal spellings
            if text and token not in special:
                token_of.setdefault(text, token)
        self._forced_text = ForcedText(token_of)
        self._budgets: dict[tuple[str, str, Path], Any] = {}  # path_tail, array_room
        self.cut: Counter = Counter()

    def compile(self, schema: dict[str, Any]) -> Any:
        if self.token_budget:
            schema = budgeted_schema(schema)
        key = json.dumps(schema)  # key order is the order the reply must follow
        if key not in self._cache:
            self._cache[key] = self._compiler.compile_json_schema(
                key, any_whitespace=False, separators=SEPARATORS
            )
        return self._cache[key]

    def tail(self, schema: dict[str, Any], path: Path, key: str | None = None) -> int | None:
        """`path_tail` with this tokenizer, cached by the schema's text (`key`, if the
        caller has it): a step's replies share their schema, and a decode step asks for
        every row."""
        return self._budget(path_tail, schema, path, key)

    def room(self, schema: dict[str, Any], path: Path, key: str | None = None) -> ArrayRoom | None:
        """`array_room` with this tokenizer, cached like `tail`."""
        return self._budget(array_room, schema, path, key)

    def _budget(
        self, measure: Callable, schema: dict[str, Any], path: Path, key: str | None
    ) -> Any:
        cached = (measure.__name__, key or json.dumps(schema), path)
        if cached not in self._budgets:
            self._budgets[cached] = measure(schema, path, self._count_tokens)
        return self._budgets[cached]

    def _count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def processor(
        self,
        schemas: Sequence[dict[str, Any] | None],
        prefills: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> GrammarLogitsProcessor:
        """A fresh processor for one batch (rows in order); a None schema leaves its row free.

        `max_new_tokens` (the call's budget) turns on the token budget of free-text fields."""
        grammars = [self.compile(s) if s is not None else None for s in schemas]
        closer = None
        if self.token_budget and max_new_tokens is not None:
            keys = [json.dumps(s) if s is not None else None for s in schemas]
            tails = [partial(self.tail, s, key=k) if s is not None else None
                     for s, k in zip(schemas, keys, strict=True)]  # fmt: skip
            rooms = [partial(self.room, s, key=k) if s is not None else None
                     for s, k in zip(schemas, keys, strict=True)]  # fmt: skip
            closer = FieldCloser(tails, max_new_tokens, self._token_bytes, self._quote_starts,
                                 prefills, self.cut, self.sentence_window, self._forced_text,
                                 rooms, self._bracket_starts)  # fmt: skip
        return GrammarLogitsProcessor(self._xgr, grammars, self.vocab_size, prefills, closer)


class GrammarLogitsProcessor:
    """Masks each row's logits to the tokens its grammar allows next.

    One matcher per row, advanced by the token the row sampled last. A row's `prefill`
    (text already in its prompt that opens the reply) is fed to its matcher first, so the
    grammar continues from it. Rows whose object is closed and whose end-of-sequence was
    accepted are left alone: generate pads them from then on. Used once per `generate`
    call: matchers hold state.
    """

    def __init__(
        self,
        xgr: Any,
        grammars: Sequence[Any | None],
        vocab_size: int,
        prefills: Sequence[str] | None = None,
        closer: FieldCloser | None = None,
    ) -> None:
        self._xgr = xgr
        self.closer = closer
        self.generated = 0
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        for row, text in enumerate(prefills or []):
            matcher = self.matchers[row]
            if matcher is not None and text and not matcher.accept_string(text):
                raise ValueError(
                    f"structured output: the prefill {text[:40]!r} is not a valid start of the "
                    "reply's JSON; drop the prefill or set structured_output: off"
                )
        self.rows = [row for row, m in enumerate(self.matchers) if m is not None]
        self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), vocab_size)
        self.vocab_size = vocab_size
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            last = input_ids[:, -1].tolist()  # one read from the device, not one per row
            for row in self.rows:
                matcher = self.matchers[row]
                if matcher.is_terminated():
                    continue
                token = last[row]
                if not matcher.accept_token(token):
                    raise RuntimeError("structured output: a sampled token broke its grammar")
                if self.closer is not None:
                    self.closer.accept(row, token)
            self.generated += 1
        self.started = True
        live = [row for row in self.rows if not self.matchers[row].is_terminated()]
        for row in live:
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)
        if live:
            device = scores.device
            cpu = scores if device.type in ("cpu", "cuda") else scores.cpu()
            self._xgr.apply_token_bitmask_inplace(
                cpu, self.bitmask.to(cpu.device), vocab_size=self.vocab_size, indices=live
            )
            if self.closer is not None:
                for row in live:
                    forced = self.matchers[row].find_jump_forward_string()
                    if not (
                        forced and self.closer.force_structure(row, forced, cpu, self.generated)
                    ):
                        self.closer.narrow(row, cpu, self.generated)
            scores = cpu.to(device)
        return scores
