"""Int8 weights for decoding on a CPU: `generation_dtype: int8`.

A decode step multiplies each weight matrix by a handful of rows (the batch), and on a
CPU that product is bound by reading the weights, not by arithmetic. On the AVX2-only
machine of docs/benchmarks.md an fp32 linear layer of Qwen2.5-0.5B's MLP took 8.4 ms for
8 rows against 2.7 ms with int8 weights (PyTorch's weight-only int8 kernel, bf16
activations), and the 152k-token output head 292 ms against 77 ms. For a prompt's many
rows the same kernel is slower than fp32's GEMM (1.3-2.3x at 64-256 rows), so each layer
keeps its fp32 weight for prefill and uses the int8 copy only when it sees few rows.

Quantization is symmetric, per output channel (scale = max |w| / 127), of the weights
the sampler was just synced to: numerically close to the fp32 model (Qwen2.5-0.5B: mean
KL 0.0009 nats per token, the same top token at 98.7 % of positions:
benchmarks/int8_sampling.py), and the sampler's own
log-probabilities go to rollout correction like any other sampler's. Activations are
not quantized: dynamic int8 activations (PyTorch's fbgemm path) were faster still but
broke SmolLM2 (mean KL 1.4, half the greedy tokens changed) on its activation outliers.
"""

from __future__ import annotations

import torch
from torch import nn

from resd.models import contiguous_head_input

# Rows at or below which a layer uses its int8 weights. Measured on 2 AVX2 cores
# (`int8_sampling.py --layers`): int8 won at 8 rows on every shape and lost from 32-64 on.
DECODE_ROWS = 16


def int8_decoding_available(device: str | torch.device) -> bool:
    """PyTorch's weight-only int8 matmul is here, and the device is a CPU (a GPU samples
    in bf16, which its tensor cores run at full speed)."""
    return torch.device(device).type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (int8 weight, bf16 scale per row), w ~ q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(torch.bfloat16)


class Int8DecodeLinear(nn.Linear):
    """An `nn.Linear` that also holds an int8 copy of its weight for small batches.

    It keeps the same `weight` (and `bias`) parameters, so names, tied weights and weight
    loading by name are unchanged; call `requantize()` after the weight changes. Hooks of
    the wrapped layer are not carried over (`quantize_for_decoding` puts back the head's).
    """

    max_rows: int = DECODE_ROWS

    @classmethod
    def wrap(cls, linear: nn.Linear) -> Int8DecodeLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias  # shared, not copied
        layer.register_buffer("weight_int8", torch.empty(0, dtype=torch.int8), persistent=False)
        layer.register_buffer("weight_scale", torch.empty(0), persistent=False)
        layer.requantize()
        return layer

    def requantize(self) -> None:
        self.weight_int8, self.weight_scale = quantize_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows or torch.is_grad_enabled():
            return super().forward(x)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.weight_scale)
        # In the dtype nn.Linear gives: autocast's where it is on. The prefill's keys and
        # values came from nn.Linear, and a static KV cache holds one dtype.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = y.to(dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(dtype)


def quantize_for_decoding(model: nn.Module) -> int:
    """Give every eligible linear layer of `model` an int8 copy for decoding, in place;
    returns how many. The kernel needs `in_features` divisible by 8 (others stay fp32:
    it crashes on the rest rather than refusing them)."""
    device = next(model.parameters()).device
    if not int8_decoding_available(device):
        raise ValueError(
            f"int8 decoding needs a CPU and PyTorch's int8 matmul (device {device}, "
            f"torch {torch.__version__}); on a GPU use bfloat16"
        )
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and child.in_features % 8 == 0:
                setattr(module, name, Int8DecodeLinear.wrap(child))
                count += 1
    if hasattr(model, "get_output_embeddings"):  # a transformers model: its head's hook again
        contiguous_head_input(model)
    return count


def requantize(model: nn.Module) -> None:
    """Refresh every int8 copy from its (just loaded) weight."""
    for module in model.modules():
        if isinstance(module, Int8DecodeLinear):
            module.requantize()
