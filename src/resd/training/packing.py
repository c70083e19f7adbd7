"""Rows of a micro-batch packed into one row, their common prefix computed once.

A micro-batch usually holds the K rollouts of one prompt: K rows that start with the same
prompt tokens, and replies of different lengths padded to the longest. The plain forward
(`update.response_logits`) computes that prompt K times and every padding position
besides. Packed, the rows become one row: the common prefix once, then each row's own
tokens, with a 4-D attention mask that lets a row's tokens see the prefix and their own
earlier tokens, and nothing of the other rows; positions restart after the prefix, so a
row sees exactly the positions and context it has alone. The logits are those of the
plain forward (the same context for every token, rounding aside); the gradient flows into
the shared prefix from every row that reads it, as it would into K copies.

Two things bound it. The attention mask is dense, so attention costs the square of the
packed length, against the rows' squares in the plain batch: `Packing.pays` compares
the two forwards' multiply-adds and packs only where packing is cheaper. And a custom
mask replaces the model's own, so models with sliding-window layers whose window the
packed row could exceed, and attention kernels that take no 4-D mask (flash attention,
flex attention), keep the plain forward: `Packing.for_model` decides once, per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resd.generation.hf import shared_prefix

# Attention implementations that read a 4-D mask, and how: sdpa takes a boolean mask
# (True = attend), eager adds the mask to its scores.
_BOOLEAN_MASK = ("sdpa", "resd_packed_sdpa")
_ADDITIVE_MASK = ("eager",)


def common_prefix(sequences: list[list[int]]) -> int:
    """The number of leading tokens that every sequence shares."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for seq in sequences[1:]:
        n = shared_prefix(first[:n], seq)
    return n


@dataclass(frozen=True)
class PackedRows:
    """One packed row: `input_ids`, `position_ids` `[1, N]`, `attention_mask` `[1, 1, N, N]`,
    and `window` `[B·width]`: for each row, the packed positions whose outputs predict
    that row's last `width` tokens, in the layout of the plain forward (responses
    right-aligned; positions before a short row's window repeat its first position)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    window: torch.Tensor
    rows: int
    width: int


@dataclass(frozen=True)
class Packing:
    """Whether and how one model's forwards are packed (built once, by `for_model`).

    `token_cost` and `pair_cost` are a layer's multiply-adds per token (its linear layers)
    and per attending query-key pair (scores and weighted values), from the model's config.
    """

    token_cost: float
    pair_cost: float
    additive_mask: bool
    window_limit: int | None  # the smallest sliding window, if any layer slides

    @classmethod
    def for_model(cls, model: nn.Module, enabled: bool = True) -> Packing | None:
        """A `Packing` for `model`, or None where its forwards must stay plain."""
        config = getattr(model, "config", None)
        if not enabled or config is None:
            return None
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in _BOOLEAN_MASK + _ADDITIVE_MASK:
            return None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = getattr(text, "hidden_size", None)
        heads = getattr(text, "num_attention_heads", None)
        if not hidden or not heads:
            return None
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        inner = getattr(text, "intermediate_size", None) or 4 * hidden
        query = heads * head_dim
        token_cost = (
            hidden * (query + 2 * kv_heads * head_dim) + query * hidden + 3 * hidden * inner
        )
        layer_types = getattr(text, "layer_types", None) or []
        window = getattr(text, "sliding_window", None)
        slides = any(t != "full_attention" for t in layer_types) or (
            not layer_types and window is not None and getattr(text, "use_sliding_window", True)
        )
        return cls(
            token_cost=float(token_cost),
            pair_cost=float(2 * query),
            additive_mask=implementation in _ADDITIVE_MASK,
            window_limit=int(window or 0) if slides else None,  # 0: unknown, never pack
        )

    def pays(self, lengths: list[int], prefix: int) -> bool:
        """Whether one packed row costs fewer multiply-adds than the padded batch.

        The plain batch computes B rows of the longest length L; the packed row computes
        N = prefix + Σ (length − prefix) positions, but attends over all N² pairs of them.
        """
        rows, longest = len(lengths), max(lengths)
        packed = prefix + sum(n - prefix for n in lengths)
        if self.window_limit is not None and packed > self.window_limit:
            return False
        plain = rows * longest * self.token_cost + rows * longest**2 * self.pair_cost
        return packed * self.token_cost + packed**2 * self.pair_cost < plain

    def plan(
        self, sequences: list[list[int]], width: int, device: torch.device
    ) -> PackedRows | None:
        """The packed row for these sequences, or None where the plain forward is cheaper."""
        lengths = [len(s) for s in sequences]
        if len(sequences) < 2 or min(lengths) == 0:
            return None
        prefix = common_prefix(sequences)
        if not self.pays(lengths, prefix):
            return None
        return pack(sequences, width, prefix, device, additive=self.additive_mask)


def pack(
    sequences: list[list[int]],
    width: int,
    prefix: int,
    device: torch.device,
    additive: bool = False,
) -> PackedRows:
    """Pack `sequences`, which share their first `prefix` tokens, into one row."""
    ids = list(sequences[0][:prefix])
    positions = list(range(prefix))
    segment = [-1] * prefix  # -1: the shared prefix; r: row r's own tokens
    window: list[int] = []
    for row, seq in enumerate(sequences):
        start = len(ids)  # where this row's own tokens begin
        ids += seq[prefix:]
        positions += range(prefix, len(seq))
        segment += [row] * (len(seq) - prefix)
        for j in range(len(seq) - width - 1, len(seq) - 1):
            j = max(j, 0)  # before a short row's start: any position of its own, masked later
            window.append(j if j < prefix else start + j - prefix)
    seg = torch.tensor(segment, device=device)
    n = seg.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    visible = (seg[None, :] == -1) | (seg[None, :] == seg[:, None])
    allowed = (causal & visible)[None, None]
    if additive:
        mask = torch.zeros(allowed.shape, device=device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min
        )
    else:
        mask = allowed
    return PackedRows(
        input_ids=torch.tensor([ids], device=device),
        position_ids=torch.tensor([positions], device=device),
        attention_mask=mask,
        window=torch.tensor(window, device=device),
        rows=len(sequences),
        width=width,
    )
