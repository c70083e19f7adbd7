"""What every generation backend shares: the result of one sampled continuation, how raw
tokens become one, and the interface the trainer samples through.

The trainer talks to a backend only through `Sampler.generate` and `Sampler.load_weights`,
so the in-process transformers sampler (`hf.TransformersSampler`) and the vLLM engine
(`vllm_engine.VLLMSampler`) are interchangeable: chosen once, from `generation_backend`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Generation:
    token_ids: list[int]  # sampled tokens, cut after the first EOS (the EOS is kept)
    text: str  # decoded without special tokens
    finished: bool  # True if it stopped on EOS or a stop string, False if it hit max_new_tokens
    # The sampler's log π of each token (when asked for): what rollout correction compares
    # with the trainer's log-probs. Grammar-constrained replies record the masked scores.
    logprobs: list[float] | None = None
    # Prompt tokens whose KV came from a cache instead of a prefill (the transformers
    # backend's prefix cache; like OpenAI's `cached_tokens`): the prefix-reuse metric.
    cached_tokens: int = 0
    # Free-text strings of a structured reply that its token budget closed (the
    # transformers backend's `token_budget`): how often the model was stopped, not done.
    fields_cut: int = 0
    # The stop string that ended the reply (`generate(stop_strings=...)`), as OpenAI's
    # `stop`: `text` ends before it, `token_ids` run through the token that completed it.
    stop: str | None = None

    @property
    def content_ids(self) -> list[int]:
        """The reply's tokens without the EOS it stopped on: what a conversation that
        continues it shows as the assistant's turn."""
        return self.token_ids[:-1] if self.finished and self.stop is None else self.token_ids


def cut_at_eos(
    tokens: list[int],
    eos: list[int],
    tokenizer: Any,
    logprobs: list[float] | None = None,
) -> Generation:
    """Build a `Generation` from raw sampled tokens: cut after the first EOS, keep the EOS.

    Shared by every backend so they agree on the schema: a batch row keeps padding after
    its EOS, and vLLM may report extra stop tokens; both end up cut the same way.
    """
    eos_set = set(eos)
    kept, finished = tokens, False
    for pos, tok in enumerate(tokens):
        if tok in eos_set:
            kept, finished = tokens[: pos + 1], True
            break
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(kept, text, finished, logprobs[: len(kept)] if logprobs is not None else None)


def first_stop(text: str, stops: Sequence[str], since: int = 0) -> tuple[int, int, str] | None:
    """(end, start, stop) of the stop that `text` completes first, looking from `since`:
    the earliest end, on a tie the earliest start (so none of a longer stop is left
    before the cut). None if the text holds none."""
    found = [(i + len(s), i, s) for s in stops if (i := text.find(s, since)) >= 0]
    return min(found) if found else None


def cut_at_stop(gen: Generation, stops: Sequence[str], tokenizer: Any) -> Generation:
    """`gen` ended at the first of `stops` its text holds (`first_stop`), as OpenAI's
    `stop` ends a reply.

    The text ends before it; the tokens run through the first token whose text
    completes it, so they and their log-probs are what was sampled, the stop included.
    Without a stop in the text, `gen` is returned as it is.
    """
    first = first_stop(gen.text, stops)
    if first is None:
        return gen
    end, start, stop = first
    head = gen.text[:end]
    content = gen.token_ids[:-1] if gen.finished else gen.token_ids
    lo, hi = 1, len(content)  # the shortest prefix that decodes to `head` and more
    while lo < hi:
        mid = (lo + hi) // 2
        if tokenizer.decode(content[:mid], skip_special_tokens=True).startswith(head):
            hi = mid
        else:
            lo = mid + 1
    logprobs = gen.logprobs[:lo] if gen.logprobs is not None else None
    return Generation(content[:lo], gen.text[:start], True, logprobs, gen.cached_tokens,
                      gen.fields_cut, stop)  # fmt: skip


class Sampler(Protocol):
    """A generation backend: samples continuations, and takes new policy weights by name."""

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int = 0,
        min_p: float = 0.0,
        seeds: list[int] | None = None,
        json_schemas: Sequence[dict | None] | None = None,
        json_prefixes: Sequence[str] | None = None,
        return_logprobs: bool = False,
        min_new_tokens: int = 0,
        keep_prefixes: bool = False,
    ) -> list[Generation]:
        """One continuation per prompt, sampled at `temperature` (0: greedy) from what
        top-k, top-p and min-p keep (`top_k` and `min_p` 0: off). `seeds` make each row's
        sample depend only on its prompt and seed; `json_schemas` constrain rows to JSON
        (structured output);
        `return_logprobs` fills `Generation.logprobs` with the sampler's own;
        `min_new_tokens` keeps EOS out of the first that many tokens; `keep_prefixes`
        keeps each prompt + reply for later prompts that begin as it does (a prefix cache; vLLM
        caches prefixes by itself and ignores it)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights in, by plain parameter name."""
        ...
