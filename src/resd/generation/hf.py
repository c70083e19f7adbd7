"""Batched sampling with transformers: rollouts, reflections, curation and evaluation.

One function serves every generation pass so they share the same padding, EOS and
truncation rules. Prompts are sorted by length before batching so little compute is
spent on padding, and results come back in the caller's order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import (
    CompileConfig,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.cache_utils import DynamicLayer
from transformers.generation.streamers import BaseStreamer

from resd.generation.base import Generation, cut_at_eos, cut_at_stop
from resd.generation.int8 import requantize
from resd.models import autocast_context

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from resd.generation.structured import JsonGrammar


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (
    _signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a counter-based RNG."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def counter_uniform(seeds: torch.Tensor, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per (row seed, decode position, token id).

    A pure function of its inputs: no generator state, so a row's noise for a token is
    the same whatever else is in the batch and however many candidates are scored.
    """
    step = torch.full_like(seeds, position, dtype=torch.int64) * _GOLDEN  # wraps, as int64 does
    key = _splitmix64(seeds.to(torch.int64) + step)  # [B]
    bits = _splitmix64(key[:, None] ^ token_ids.to(torch.int64))  # [B, k]
    return (_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53


class RowSeededSampler(LogitsProcessor):
    """Temperature, top-k, top-p and min-p sampling where each row draws from its own
    seeded stream. The filters apply in transformers' order (temperature, top-k, top-p,
    min-p), each on what the one before kept, so a setting means what it means there.

    HF's sampler draws every row from one global RNG, so a row's sample depends on
    which other rows share its batch. That breaks two things we want: a data-parallel
    run (rows spread over processes) reproducing a one-process run, and resumed runs
    reproducing uninterrupted ones whatever the batching. Here each row adds Gumbel
    noise to its filtered log-probabilities and takes the argmax (an exact sample from
    the filtered distribution); the returned scores are −inf everywhere but the chosen
    token, so greedy decoding emits it.

    The noise comes from a counter-based hash of (row seed, decode position, token id),
    computed for the whole batch at once: indexed by token id rather than by rank, tiny
    numeric differences between batch layouts cannot reassign noise between near-tied
    tokens, and no per-row generator has to draw a vocabulary's worth of numbers.

    Cost: the nucleus is found among the top `candidates` tokens (a partial sort), and
    only those get noise; if a row's top candidates hold less than `top_p` of the mass,
    that row's whole vocabulary is sorted instead, so the result is exact either way.
    Rows that have already stopped are left out of that check: their draws are discarded.
    Min-p without a nucleus is drawn among the candidates too, and a row whose floor lies
    below its last candidate is sorted in full; top-k (up to `candidates`) draws among the
    top k alone. Without any filter (`top_p = 1`) a row draws one uniform number and
    inverts its CDF, in token-id order: hashing every token of a 150k vocabulary would
    cost more than the draw.
    """

    def __init__(
        self,
        seeds: list[int],
        temperature: float,
        top_p: float,
        device: torch.device,
        candidates: int = 1024,
        stop_ids: list[int] | None = None,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k  # 0: off
        # min-p keeps a token whose probability is at least min_p × the top token's: as a
        # log-probability margin below the top one (0: off)
        self.min_p_margin = math.log(min_p) if min_p > 0 else None
        self.candidates = candidates
        self.seeds = torch.tensor(
            [int(s) % (2**63) for s in seeds], dtype=torch.int64, device=device
        )
        self.position = 0
        # Rows that have drawn a stop token: generation pads them from then on, so their
        # draws are discarded, and their distributions (conditioned on padding) are often
        # flat enough to send a whole batch to the full sort.
        self.stop_ids = (
            torch.tensor(stop_ids, dtype=torch.int64, device=device) if stop_ids else None
        )
        self.finished: torch.Tensor | None = None
        # log π(token) of each sampled token under the model's own distribution (the
        # scores this processor receives, at temperature 1), per row, for rollout
        # correction: the trainer compares them with its own log-probs.
        self.logprobs: list[list[float]] = [[] for _ in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.position and self.stop_ids is not None:  # the last token is one we drew
            done = torch.isin(input_ids[:, -1], self.stop_ids)
            self.finished = done if self.finished is None else self.finished | done
        raw = torch.log_softmax(scores.float(), dim=-1)
        logp = (
            raw
            if self.temperature == 1.0
            else torch.log_softmax(scores.float() / self.temperature, -1)
        )
        rows, vocab = logp.shape
        seeds = self.seeds[:rows].to(logp.device)
        if self.candidates < self.top_k < vocab:  # rare: mask the vocabulary (ties stay)
            kth = logp.topk(self.top_k, dim=-1).values[:, -1:]
            logp = torch.log_softmax(logp.masked_fill(logp < kth, float("-inf")), -1)
        if 0 < self.top_k <= self.candidates and self.top_k < vocab:
            # everything the filters can keep is among the top k: draw there, renormalised
            # (a tie at the k-th place keeps k tokens, where transformers keeps the tie)
            cand, ids = logp.topk(self.top_k, dim=-1)
            picked = self._nucleus_sample(torch.log_softmax(cand, -1), ids, seeds)
        elif self.top_p >= 1.0 and self.min_p_margin is None:
            # no filter: inverse CDF, one uniform per row, in token-id order
            ids = torch.zeros(rows, 1, dtype=torch.int64, device=logp.device)
            uniform = counter_uniform(seeds, self.position, ids).to(logp.dtype)
            cdf = logp.exp().cumsum(-1)
            picked = torch.searchsorted(cdf, uniform * cdf[:, -1:]).clamp(max=vocab - 1)
        else:
            cand, ids = logp.topk(min(self.candidates, vocab), dim=-1)
            picked = self._nucleus_sample(cand, ids, seeds)
            if cand.shape[-1] < vocab:
                # rare: the candidates may not hold all that top-p (a very flat distribution)
                # or min-p (its floor below the last candidate) keeps
                if self.top_p < 1.0:
                    short = cand.exp().sum(-1) < self.top_p
                else:
                    short = cand[:, -1] >= cand[:, 0] + self.min_p_margin
                if self.finished is not None:  # a finished row's draw is thrown away
                    short &= ~self.finished[:rows]
                if bool(short.any()):
                    flat = short.nonzero()[:, 0]
                    full, order = logp[flat].sort(dim=-1, descending=True)
                    picked[flat] = self._nucleus_sample(full, order, seeds[flat])
        self.position += 1
        for row, value in enumerate(raw.gather(-1, picked)[:, 0].tolist()):
            self.logprobs[row].append(value)
        return torch.full_like(scores, float("-inf")).scatter_(-1, picked, 0.0)

    def _nucleus_sample(
        self, cand: torch.Tensor, ids: torch.Tensor, seeds: torch.Tensor
    ) -> torch.Tensor:
        """Token ids `[rows, 1]` drawn from the nucleus of candidates sorted by log-prob."""
        if self.top_p < 1.0:
            probs = cand.exp()
            keep = (probs.cumsum(-1) - probs) < self.top_p  # the top token always stays
        else:  # no nucleus (a cumulative sum that rounds to 1 would cut the tail)
            keep = torch.ones_like(cand, dtype=torch.bool)
        if self.min_p_margin is not None:  # of the nucleus, relative to its top token
            keep &= cand >= cand[:, :1] + self.min_p_margin
        cand = cand.masked_fill(~keep, float("-inf"))
        gumbel = -torch.log(-torch.log(counter_uniform(seeds, self.position, ids))).to(cand.dtype)
        return ids.gather(-1, (cand + gumbel).argmax(-1, keepdim=True))


class Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: a token's logit less `frequency` times
    how often the reply has drawn it so far, and less `presence` once it has. Only the
    reply counts (columns from `start` on), and the sampler after it draws from, and
    records the log-probabilities of, the penalised distribution it really samples."""

    def __init__(self, presence: float, frequency: float, start: int) -> None:
        self.presence = presence
        self.frequency = frequency
        self.start = start  # the first reply column of the batch's input ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        reply = input_ids[:, self.start :]
        counts = torch.zeros_like(scores).scatter_add_(
            -1, reply, torch.ones_like(reply, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogitBias(LogitsProcessor):
    """OpenAI's `logit_bias`: a fixed number added to chosen tokens' logits at every step
    (−100 bans a token in practice, 100 all but forces it)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids, values = self.ids.to(scores.device), self.values.to(scores.device, scores.dtype)
        return scores.index_add(-1, ids, values.expand(scores.shape[0], -1))


class StopStrings(StoppingCriteria):
    """Ends a row once its reply's text holds one of `stops` (OpenAI's `stop`).

    Only the reply counts: transformers' own `stop_strings` also match text that the
    prompt's end and the reply's start make together, which would end a reply before its
    first token. Each step decodes only the tail of each reply, long enough to hold the
    longest stop (a character is at most 4 byte-level tokens); `cut_at_stop` then cuts
    the finished reply where the stop began.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], start: int
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.start = start  # the first reply column of the batch's input ids
        self.window = 4 * max(len(s) for s in self.stops) + 4

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        tails = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        hit = [any(stop in text for stop in self.stops) for text in texts]
        return torch.tensor(hit, dtype=torch.bool, device=input_ids.device)


class _StepTokens(BaseStreamer):
    """Hands each decoding step's tokens to `callback(indices, tokens)`, with the batch's
    rows named by their index in the caller's prompt list. transformers puts the prompt
    first, then one token per row per step (padding for rows that have ended)."""

    def __init__(
        self, indices: list[int], callback: Callable[[list[int], list[int]], None]
    ) -> None:
        self.indices = indices
        self.callback = callback
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.callback(self.indices, value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_tokens: int | None = None,
) -> list[int]:
    """Apply the chat template and tokenize; over-long prompts keep their end.

    Keeping the end preserves the generation prompt (the assistant header), without
    which the model would not answer at all. The template receives the variables the
    run set (`chat_template_kwargs`, kept on the tokenizer by `load_tokenizer`).
    """
    text = render_chat(tokenizer, messages)
    return keep_end(tokenizer(text, add_special_tokens=False)["input_ids"], max_tokens)


def chat_ids_after(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    head: list[int],
    max_tokens: int | None = None,
) -> list[int]:
    """`chat_prompt_ids(messages)`, but beginning with the tokens `head` when the rendered
    conversation begins with their text.

    A conversation that continues a rollout (its prompt, then its reply as the assistant's
    turn) renders to the rollout's text followed by more; re-tokenizing the whole text
    could split the reply differently from how it was sampled, and then the cached prefix
    would end where the split differs. So the head keeps the sampled tokens and only the
    rest is tokenized. When the template rewrites the head (it strips or reformats the
    reply), the whole text is tokenized as usual, and the cache still covers the part
    before the rewrite.
    """
    text = render_chat(tokenizer, messages)
    head_text = tokenizer.decode(
        head, skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    if head and text.startswith(head_text):
        ids = head + tokenizer(text[len(head_text) :], add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return keep_end(ids, max_tokens)


_said_cut = False  # the first cut prompt is reported, once per process


def keep_end(ids: list[int], max_tokens: int | None) -> list[int]:
    """The prompt's last `max_tokens` tokens, the assistant header among them; the first
    prompt cut is logged, since what it loses (its start: a system prompt, the task
    itself) is otherwise lost without a word."""
    global _said_cut
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    if not _said_cut:
        _said_cut = True
        log.warning("a prompt of %d tokens was cut to its last %d (max_prompt_tokens or "
                    "max_teacher_prompt_tokens); its beginning is lost, and so may be others'",
                    len(ids), max_tokens)  # fmt: skip
    return ids[-max_tokens:]


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The prompt text; a template that refuses the system role (Gemma's raises) gets the
    system text as the opening paragraph of the first user message instead."""
    extra = getattr(tokenizer, "resd_chat_template_kwargs", {})
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **extra
        )
    except Exception:  # jinja2's TemplateError, raised by the template's own check
        if not messages or messages[0]["role"] != "system" or len(messages) < 2:
            raise
    system, first, *rest = messages
    merged = {**first, "content": f"{system['content']}\n\n{first['content']}"}
    return tokenizer.apply_chat_template(
        [merged, *rest], add_generation_prompt=True, tokenize=False, **extra
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg = model.generation_config.eos_token_id
    ids.update(cfg if isinstance(cfg, list) else ([cfg] if cfg is not None else []))
    return sorted(ids)


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a rectangle: returns input ids and the attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


class PrefixCache:
    """Keys and values of recent sequences (a prompt and its reply), so that a later prompt
    which begins as one does skips that part of its prefill.

    RESD's reflection prompt can be laid out as the rollout's own conversation continued
    (`reflection_layout: conversation`): the task, the attempt as the assistant's turn,
    then a user turn asking for the diagnosis. Its tokens then begin with the rollout's
    prompt and reply, whose keys and values the rollout has just computed with the same
    weights. On a CPU, prefill costs as much as decoding (a 2,000-token manufactoria task
    is about 2 TFLOP per row on the 0.5B model), so reusing it is the saving.

    Entries are valid only for the weights that made them: the owner clears the cache
    whenever those change. Only the last batch of kept sequences is held.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = []

    def clear(self) -> None:
        self.entries = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, tokens: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `tokens` with their keys/values, one (key, value) [heads, len, dim] per layer."""
        if tokens:
            self.entries.append((list(tokens), layers))

    def lookup(
        self, prompt: list[int]
    ) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest beginning `prompt` shares with a kept sequence: its length and the
        keys/values of those positions, or (0, None). A key depends only on the tokens up
        to its own, so the shared part is reusable even where the two then differ: a chat
        template that strips or rewrites the attempt (Qwen3 drops its reasoning, Llama 3
        trims it) still leaves the rollout's whole prompt shared. The last prompt token is
        always prefilled, since generation needs its logits."""
        best, kept = 0, None
        for tokens, layers in self.entries:
            n = min(shared_prefix(tokens, prompt), len(prompt) - 1)
            if n > best:
                best, kept = n, layers
        if kept is None:
            return 0, None
        return best, [(key[:, :best], value[:, :best]) for key, value in kept]


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens `a` and `b` begin with in common (list slices compare in C, so a
    bisection beats a token-by-token loop on prompts of thousands of tokens)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    same, differs = 0, n  # a[:same] == b[:same], a[:differs] != b[:differs]
    while differs - same > 1:
        mid = (same + differs) // 2
        if a[:mid] == b[:mid]:
            same = mid
        else:
            differs = mid
    return same


def _kept_layers(cache: object) -> list[DynamicLayer] | None:
    """The cache's layers if every one holds the full sequence (a sliding-window or
    quantized layer drops or changes positions, so nothing is kept from it)."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return layers


def _keep_prefixes(
    store: PrefixCache,
    cache: object,
    prompts: list[list[int]],
    replies: list[Generation],
    width: int,
) -> None:
    """Copy each row's prompt + reply (without its EOS) out of a finished batch's KV cache.

    Rows were left-padded to `width`; the cache holds every token fed to the model, that
    is all but the last one sampled, so a reply that ran to the end loses its last token.
    """
    layers = _kept_layers(cache)
    if layers is None:
        return
    fed = layers[0].keys.shape[2]
    for row, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        content = reply.content_ids
        start = width - len(prompt)
        length = min(len(prompt) + len(content), fed - start)
        tokens = (prompt + content)[:length]
        store.add(tokens, [(layer.keys[row, :, start : start + length].clone(),
                            layer.values[row, :, start : start + length].clone()) for layer in layers])  # fmt: skip


def _with_prefixes(
    model: PreTrainedModel,
    prompts: list[list[int]],
    hits: list[tuple[int, list | None]],
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    """Inputs and a primed KV cache for a batch where some rows begin as a cached sequence does.

    Layout per row: [pad][cached part][pad][rest of the prompt]. The cached parts are
    right-aligned in the first `width` columns, so the cache is a rectangle; the gap in
    the middle is masked, and positions come from the attention mask's running count, so
    every real token keeps the position it had when its keys were computed.
    """
    width = max(n for n, _ in hits)
    rest = [prompt[n:] for prompt, (n, _) in zip(prompts, hits, strict=True)]
    tail = max(len(r) for r in rest)
    rows = len(prompts)
    ids = torch.full((rows, width + tail), pad_id, dtype=torch.long)
    mask = torch.zeros((rows, width + tail), dtype=torch.long)
    for row, (prompt, (n, _), r) in enumerate(zip(prompts, hits, rest, strict=True)):
        ids[row, width - n : width] = torch.tensor(prompt[:n], dtype=torch.long)
        mask[row, width - n : width] = 1
        ids[row, width + tail - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[row, width + tail - len(r) :] = 1
    some = next(layers for n, layers in hits if layers is not None)
    primed = []
    for index, (key, value) in enumerate(some):
        keys = key.new_zeros((rows, key.shape[0], width, key.shape[2]))
        values = value.new_zeros((rows, value.shape[0], width, value.shape[2]))
        for row, (n, layers) in enumerate(hits):
            if layers is not None:
                keys[row, :, width - n :] = layers[index][0]
                values[row, :, width - n :] = layers[index][1]
        primed.append((keys.to(device), values.to(device)))
    return ids.to(device), mask.to(device), DynamicCache(primed, config=model.config)


CACHE_IMPLEMENTATIONS = (None, "static")

# Accelerators where transformers compiles on its own; elsewhere (CPU) it must be told to.
_AUTO_COMPILE_DEVICES = ("cuda", "xpu")


def decode_options(
    device: torch.device, cache_implementation: str | None, compile: bool
) -> dict[str, object]:
    """Extra `model.generate` keyword arguments for the KV cache and compilation.

    Defaults give `{}` so the default path is exactly the plain call. transformers 5.x
    compiles the decode step by itself whenever a static cache is used on a GPU, so
    `compile=False` has to say `disable_compile=True` explicitly; on CPU it never
    compiles unless the `CompileConfig` is flagged to (`_compile_all_devices`, which
    transformers documents as meant for testing). Prefill stays eager either way: only
    the one-token decode step has the fixed shapes that make compiling pay.
    """
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"generate: cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, "
            f"got {cache_implementation!r}"
        )
    if compile and cache_implementation != "static":
        raise ValueError(
            "generate: compile=True needs cache_implementation='static' "
            "(a growing dynamic cache changes shapes every step, so nothing is compiled)"
        )
    if cache_implementation is None:
        return {}
    options: dict[str, object] = {"cache_implementation": cache_implementation}
    if not compile:
        options["disable_compile"] = True
        return options
    config = CompileConfig()  # inductor, reduce-overhead (CUDA graphs on GPU), fullgraph off
    if device.type not in _AUTO_COMPILE_DEVICES:
        config.mode = "default"  # CUDA graphs do not exist here
        config._compile_all_devices = True
    options["compile_config"] = config
    return options


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    batch_size: int = 8,
    autocast: str | None = "auto",
    seeds: list[int] | None = None,
    sort_by_length: bool = True,
    cache_implementation: str | None = None,
    compile: bool = False,
    grammar: JsonGrammar | None = None,
    json_schemas: Sequence[dict | None] | None = None,
    json_prefixes: Sequence[str] | None = None,
    return_logprobs: bool = False,
    min_new_tokens: int = 0,
    prefix_cache: PrefixCache | None = None,
    keep_prefixes: bool = False,
    stop_strings: Sequence[str] = (),
    on_tokens: Callable[[list[int], list[int]], None] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
) -> list[Generation]:
    """Sample one continuation per prompt.

    With `seeds` (one per prompt), each row's sample depends only on its prompt and its
    seed, not on batching; without, seed torch's RNG before calling for repeatability.

    `cache_implementation="static"` pre-allocates the KV cache (batch × longest prompt +
    `max_new_tokens`) instead of growing it every step; `compile=True` (static cache
    only) has transformers `torch.compile` the decode step, whose shapes the static cache
    keeps fixed. Both leave the tokens unchanged up to floating-point rounding (exactly
    equal in float32; in bf16 a near-tie can flip); see `decode_options`.

    `json_schemas` (one per prompt, None for a free row) constrain replies with `grammar`;
    `json_prefixes` is reply text already at the end of a prompt that the grammar must
    read first (a prefill). `return_logprobs` fills `Generation.logprobs` (seeded
    sampling only: greedy decoding has no sampler to record them). `min_new_tokens` keeps
    EOS out of the first that many tokens (= `max_new_tokens`: every reply has the same
    length, the benchmarks' equal-work mode).

    With a `prefix_cache` (dynamic KV cache only), a prompt that begins as a kept sequence
    does starts from the keys and values of that shared beginning
    (`Generation.cached_tokens` says how many);
    `keep_prefixes` keeps this call's prompts and replies in it, replacing what it held.

    `stop_strings` end a reply as OpenAI's `stop` does (`cut_at_stop`; `Generation.stop`
    names the one that ended it). Not with `json_schemas`: a reply stopped inside its JSON
    would break the grammar that the schema holds it to.

    `top_k` (0: off) and `min_p` (0: off) filter as transformers' samplers do
    (`RowSeededSampler`).

    `presence_penalty`, `frequency_penalty` (`Penalties`) and `logit_bias` (`LogitBias`)
    are OpenAI's; they change the distribution the sampler draws from and records.

    `on_tokens(indices, tokens)` is called after every decoding step with the token each
    row of the batch drew, the rows named by their index in `prompts` (rows that have
    ended draw padding): what `resd serve` streams from.
    """
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError("generate: need one seed per prompt")
    if stop_strings and (json_schemas is not None or not all(stop_strings)):
        raise ValueError("generate: stop strings must be non-empty, and not with json_schemas")
    if json_schemas is not None:
        if grammar is None:
            raise ValueError("generate: json_schemas need a grammar (structured output is off)")
        if len(json_schemas) != len(prompts):
            raise ValueError("generate: need one schema (or None) per prompt")
    if not prompts:
        return []
    device = next(model.parameters()).device
    extra = decode_options(device, cache_implementation, compile)
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    order = list(range(len(prompts)))
    if sort_by_length:  # similar lengths share a batch: less padding, fewer wasted FLOPs
        order.sort(key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    if cache_implementation is not None:  # a static cache cannot be primed with a prefix
        prefix_cache = None
    keep = prefix_cache is not None and keep_prefixes
    if keep:
        prefix_cache.clear()
    was_training = model.training
    model.eval()
    sampling = temperature > 0
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [prompts[i] for i in chunk]
            # a keeping call starts from an empty cache: a hit there could only be one of its
            # own earlier batches, and a primed batch is not kept
            reads = prefix_cache is not None and not keep
            hits = [prefix_cache.lookup(p) if reads else (0, None) for p in rows]
            primed = {}
            if any(n for n, _ in hits):
                input_ids, attention_mask, cache = _with_prefixes(model, rows, hits, pad_id, device)
                primed = {"cache": cache}
            else:
                input_ids, attention_mask = left_pad(rows, pad_id, device)
            row_seeded = sampling and seeds is not None
            processors = LogitsProcessorList()
            if presence_penalty or frequency_penalty:  # penalise and bias, mask, then sample
                processors.append(
                    Penalties(presence_penalty, frequency_penalty, input_ids.shape[1])
                )
            if logit_bias:
                processors.append(LogitBias(logit_bias))
            masks = None
            if json_schemas is not None and grammar is not None:  # mask first, then sample
                masks = grammar.processor(
                    [json_schemas[i] for i in chunk],
                    [json_prefixes[i] for i in chunk] if json_prefixes else None,
                    max_new_tokens,
                )
                processors.append(masks)
            sampler = None
            if row_seeded:
                row_seeds = [seeds[i] for i in chunk]
                sampler = RowSeededSampler(row_seeds, temperature, top_p, device, stop_ids=eos,
                                           top_k=top_k, min_p=min_p)  # fmt: skip
                processors.append(sampler)
            stopping = StoppingCriteriaList(
                [StopStrings(tokenizer, stop_strings, input_ids.shape[1])] if stop_strings else []
            )
            with autocast_context(device, autocast):
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens or None,
                    do_sample=sampling and not row_seeded,
                    temperature=temperature if sampling and not row_seeded else None,
                    top_p=top_p if sampling and not row_seeded else None,
                    top_k=top_k if sampling and not row_seeded else None,
                    min_p=(min_p or None) if sampling and not row_seeded else None,
                    logits_processor=processors,
                    stopping_criteria=stopping,
                    streamer=_StepTokens(chunk, on_tokens) if on_tokens is not None else None,
                    eos_token_id=eos,
                    pad_token_id=pad_id,
                    return_dict_in_generate=keep,
                    **primed,
                    **extra,
                )
            sequences = out.sequences if keep else out
            new_tokens = sequences[:, input_ids.shape[1] :].tolist()
            for row, i in enumerate(chunk):
                logprobs = (
                    sampler.logprobs[row] if sampler is not None and return_logprobs else None
                )
                results[i] = cut_at_eos(new_tokens[row], eos, tokenizer, logprobs)
                if stop_strings:
                    results[i] = cut_at_stop(results[i], stop_strings, tokenizer)
                results[i].cached_tokens = hits[row][0]
                if masks is not None and masks.closer is not None:
                    results[i].fields_cut = masks.closer.rows_cut[row]
            if keep and not primed:
                _keep_prefixes(prefix_cache, out.cache, rows,
                               [results[i] for i in chunk], input_ids.shape[1])  # fmt: skip
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class TokenScores:
    """A reply's tokens as the model scores them: each token's log-probability and, per
    position, the `top_k` most likely tokens with theirs (most likely first)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@torch.no_grad()
def score_reply(
    model: PreTrainedModel,
    prompt_ids: list[int],
    reply_ids: list[int],
    *,
    top_k: int = 0,
    autocast: str | None = "auto",
) -> TokenScores:
    """The log-probabilities of `reply_ids` after `prompt_ids` under the model's own
    distribution (temperature 1, no grammar): one forward pass, whatever sampled the reply.

    For OpenAI's `logprobs`/`top_logprobs`, and for greedy replies, which have no sampler
    to record them. Only the reply's positions go through the output head
    (`logits_to_keep`), so a long prompt costs its forward pass, not a vocabulary-wide
    row per token.
    """
    if not reply_ids:
        return TokenScores([], [])
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt_ids, *reply_ids]], device=device)
    keep = len(reply_ids) + 1
    with autocast_context(device, autocast):
        try:
            logits = model(input_ids=ids, logits_to_keep=keep).logits[0, -keep:-1]
        except TypeError:  # a model whose forward has no `logits_to_keep` (remote code)
            logits = model(input_ids=ids).logits[0, -keep:-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, torch.tensor(reply_ids, device=device)[:, None])[:, 0]
    values, tokens = logp.topk(top_k, dim=-1) if top_k else (logp[:, :0], logp[:, :0].long())
    top = [
        list(zip(t, v, strict=True)) for t, v in zip(tokens.tolist(), values.tolist(), strict=True)
    ]
    return TokenScores(picked.tolist(), top)


class TransformersSampler:
    """Sampling from a model held in this process: the policy itself or a synced copy.

    The trainer talks to every backend through `generate` and `load_weights`, so the
    vLLM backend (`resd.generation.vllm_engine`) is a drop-in replacement with the same outputs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 8,
        autocast: str | None = "auto",
        cache_implementation: str | None = None,
        compile: bool = False,
        grammar: JsonGrammar | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        # fail at construction, not at the first rollout, on a bad cache/compile pair
        decode_options(next(model.parameters()).device, cache_implementation, compile)
        if prefix_cache is not None and cache_implementation is not None:
            raise ValueError(
                "a prefix cache needs the dynamic KV cache (cache_implementation=None)"
            )
        self.prefix_cache = prefix_cache
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast = autocast
        self.cache_implementation = cache_implementation
        self.compile = compile
        self.grammar = grammar  # xgrammar, for JSON-schema-constrained replies; None: off

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
        return generate(
            self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, batch_size=self.batch_size, autocast=self.autocast, seeds=seeds,
            cache_implementation=self.cache_implementation, compile=self.compile,
            grammar=self.grammar, json_schemas=json_schemas, json_prefixes=json_prefixes,
            return_logprobs=return_logprobs, min_new_tokens=min_new_tokens,
            prefix_cache=self.prefix_cache, keep_prefixes=keep_prefixes,
        )  # fmt: skip

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy new policy weights in, by parameter name (the copy was made from the policy)."""
        if self.prefix_cache is not None:  # its keys and values belong to the old weights
            self.prefix_cache.clear()
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            params[name].copy_(tensor)
        requantize(self.model)  # int8 decoding weights, if it has them, follow the new ones
