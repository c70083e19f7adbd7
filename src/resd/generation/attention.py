"""Decode-step attention on a CPU: grouped-query heads packed, not broadcast by the kernel.

Qwen, Llama and SmolLM2 share each key/value head among several query heads (GQA).
transformers' `sdpa` attention hands a decode step (one query position) to PyTorch in
one of two ways: with a padding mask it packs each group's query heads as the rows of a
small matrix against their shared keys (`pack_gqa`), and without one (every row of the
batch the same length: one request, GRPO's copies of one prompt, evaluation samples) it
asks the kernel to broadcast the key/value heads (`enable_gqa=True`). On a CPU the second
way is slow, and slower the longer the context: a decode step of the 0.5B model at batch 8
took 87 ms against 61 ms packed at 256 cached positions, and 205 ms against 81 ms at 1,024
(2 cores, benchmarks/decode_attention.py). `packed_sdpa` packs in both cases on a CPU and
leaves every other call (prefill, a GPU, a mask) to transformers' own function; the
result is the same attention, to floating-point rounding (the same tokens in every case
measured).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "resd_packed_sdpa"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (batch, heads, 1, dim), key and
    value (batch, kv heads, positions, dim); returns (batch, 1, heads, dim)."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu" or query.shape[2] != 1 or attention_mask is not None
        or groups == 1 or kwargs.get("position_bias") is not None
    ):  # fmt: skip
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)  # a group's heads as rows
    out = torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, dropout_p=dropout, scale=scaling
    )
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa)
AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets (None when unpadded)


def use_packed_sdpa(model: torch.nn.Module) -> bool:
    """Switch a model that uses transformers' `sdpa` to `packed_sdpa`; False (and nothing
    changed) for any other implementation, which the caller chose."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
