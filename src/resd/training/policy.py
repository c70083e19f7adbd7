"""The policy being trained, and what samples from it.

`load_policy` loads the student (a full model, or a base model with a LoRA adapter).
`PolicySampler` is the generation side, chosen once from the config: which backend
(transformers in this process, or a vLLM engine), what it samples from (the policy
itself, a full copy in the sampling dtype, or, for LoRA, a plain copy with the adapter
merged in), how it gets the policy's new weights after each step, and whether replies
are constrained to JSON (structured output).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resd.config import SHORT_LORA_KEYS, ConfigError, TrainConfig, check_lora, did_you_mean
from resd.generation.base import Generation, Sampler
from resd.generation.hf import PrefixCache, TransformersSampler, eos_token_ids
from resd.generation.int8 import quantize_for_decoding
from resd.generation.structured import JsonGrammar, StructuredOutputUnavailable
from resd.models import (
    DTYPES,
    autocast_dtype,
    fast_bfloat16,
    load_adapter,
    load_model,
    quiet_peft_wrapping,
    resolve_model_path,
)
from resd.parallel import Parallel
from resd.training.teacher import is_peft

log = logging.getLogger(__name__)

# Opens reflector and curator replies when no grammar constrains them, so a small model
# starts inside the JSON object instead of chatting (see `structured_output`).
JSON_OPENER = '{\n  "reasoning": "'


def sampling_dtype(cfg: TrainConfig, device: str | torch.device) -> str:
    """The dtype rollouts are sampled in. `generation_dtype: auto` is bfloat16 on a device
    with fast bf16 kernels and the training dtype elsewhere (an AVX2-only CPU ran bf16 at
    a half to a sixth of fp32's speed: `resd.models.fast_bfloat16`); null is the training
    dtype."""
    name = cfg.generation_dtype
    if name == "auto":
        return "bfloat16" if fast_bfloat16(device) else cfg.dtype
    return name or cfg.dtype


def sampling_copy_needed(cfg: TrainConfig, device: str | torch.device) -> bool:
    """Whether rollouts come from a copy of the policy rather than the policy itself:
    another dtype, or int8 decoding weights beside the training ones."""
    return sampling_dtype(cfg, device) != cfg.dtype


def merged_sampling(cfg: TrainConfig, parallel: Parallel) -> bool:
    """A LoRA policy samples from a plain copy of the base model with the adapter merged
    in: decoding through unmerged fp32 adapters ran 4x slower than a merged bf16 copy."""
    device = parallel.device(cfg.device)
    return (
        bool(cfg.lora) and cfg.generation_backend == "transformers" and not parallel.sharded
        and sampling_copy_needed(cfg, device)
    )  # fmt: skip


def load_policy(
    cfg: TrainConfig, parallel: Parallel, checkpoint: Path | None, *, keep_base: bool = False
) -> tuple[nn.Module, nn.Module | None]:
    """The student (from `checkpoint` when resuming), and with `keep_base` a copy of the
    LoRA base model taken before the adapter wraps it (a deep copy of the PEFT model
    decoded 5x slower than this plain one)."""
    device = parallel.device(cfg.device)
    # a bad key fails first; the base's revision is recorded with the adapter, so that
    # loading it later fetches the same base weights
    revision = cfg.model_init_kwargs.get("revision")
    lora = lora_config(cfg.lora, revision) if cfg.lora and not checkpoint else None
    if not cfg.lora:
        source = str(checkpoint) if checkpoint else cfg.model
        model = load_model(
            source, dtype=cfg.dtype, device=device, init_kwargs=cfg.model_init_kwargs
        )
        return _checkpointed(model, cfg), None
    from peft import get_peft_model

    base = load_model(cfg.model, dtype=cfg.dtype, device=device, init_kwargs=cfg.model_init_kwargs)
    base_copy = copy.deepcopy(base) if keep_base else None
    _checkpointed(base, cfg)
    if checkpoint:
        model = load_adapter(base, checkpoint, is_trainable=True)
    else:
        with quiet_peft_wrapping():
            try:
                model = get_peft_model(base, lora)
            except (TypeError, ValueError) as exc:  # e.g. no module matches target_modules
                raise ConfigError(f"lora: {exc}") from None
    compute = autocast_dtype(device, cfg.autocast)
    if compute is not None and not parallel.sharded:  # FSDP / ZeRO shard one dtype
        cast_frozen_linears(model, compute)
        keep_adapter_inputs(model)
    return model, base_copy


class AutocastLinear(nn.Linear):
    """A frozen linear layer whose weight is stored in autocast's compute dtype.

    Under autocast it is an `nn.Linear` (autocast casts the input; the weight is already
    cast). Outside autocast, where a caller runs the float32 model directly, the weight is
    widened to the input's dtype for that call, so the model still runs in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.weight.dtype:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def cast_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen linear weights of a LoRA policy in `dtype`, autocast's compute
    dtype (`AutocastLinear`); returns how many layers.

    Exact under autocast, which casts each such weight to `dtype` before its matmul
    anyway; but a frozen weight does not qualify for autocast's cache, so a float32 one
    is cast anew in every forward pass, into a copy that lives as long as the pass. On
    the 0.5B model's LoRA step (2 CPU cores) this took peak memory from 10.3 to 8.2 GiB
    and 0.45 s off the teacher's 2.9 s (docs/benchmarks.md). Left as they are:
    trainable weights, the adapters (the EMA teacher's adapter is frozen but moves),
    norms and embeddings (autocast keeps those in float32), and a head tied to the input
    embeddings."""
    tied = model.get_input_embeddings().weight
    count = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is not nn.Linear or ".lora_" in f".{name}" or weight is tied
            or weight.requires_grad or weight.dtype == dtype
            or (module.bias is not None and module.bias.requires_grad)
        ):  # fmt: skip
            continue
        module.weight.data = weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        module.__class__ = AutocastLinear  # the same module, parameters and hooks
        count += 1
    return count


def keep_adapter_inputs(model: nn.Module) -> int:
    """Let LoRA adapters take their input in the dtype it comes in; returns how many layers.

    PEFT casts each adapter's input to the adapter's dtype (float32) before `lora_A`.
    Under autocast that copy is wasted twice over: `lora_A`'s matmul casts it straight
    back to the compute dtype, and backward pays both casts again on the gradient. With
    the input left in bf16 the values are the same, bit for bit (autocast rounds the
    float32 copy of a bf16 tensor to itself), 0.6 s less per micro-batch of 4 × 232
    tokens on the 0.5B model (docs/benchmarks.md). Called with `cast_frozen_linears`:
    outside autocast that model's hidden states are float32 (embeddings and norms stay
    float32, `AutocastLinear` widens), so an adapter still meets its own dtype."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def _checkpointed(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Turn on activation recomputation (`gradient_checkpointing`). The non-reentrant
    variant needs no input that requires grad, so it also works under a frozen LoRA base."""
    if cfg.gradient_checkpointing:
        # transformers 5.x renamed it (the old name warns); early 5.x releases have only that
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is None:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def lora_config(settings: dict[str, Any], revision: str | None = None):
    """`peft.LoraConfig(**settings)` with our defaults (and the base model's `revision`);
    a key it does not take is named with the closest field, PEFT's own error a bad value."""
    import dataclasses

    from peft import LoraConfig

    kwargs = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM",
              "revision": revision}  # fmt: skip
    fields = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key, value in settings.items():
        name = SHORT_LORA_KEYS.get(key, key)
        if name not in fields:
            hint = did_you_mean(key, [*fields, *SHORT_LORA_KEYS])
            raise ConfigError(f"lora: unknown key {key!r}{hint} (a peft.LoraConfig field, "
                              f"or {', '.join(SHORT_LORA_KEYS)})")  # fmt: skip
        if name in settings and name != key:
            raise ConfigError(f"lora: {key!r} and {name!r} are the same setting; give one")
        kwargs[name] = value
    if problem := check_lora(settings):  # a config built by hand was never read
        raise ConfigError(f"lora.{problem}")
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lora: {exc}") from None


def check_lora_targets(model_config: Any, lora: Any, *, trust_remote_code: bool = False) -> None:
    """Wrap the model's skeleton (its config on the meta device: no weights, no memory) in
    the adapter, as the run will wrap the model: `resd train --dry-run` names a
    `target_modules` entry the model lacks without loading a weight. A model whose
    skeleton cannot be built from its config alone is not checked here (the run checks)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(
                model_config, trust_remote_code=trust_remote_code
            )
    except Exception as exc:  # an architecture transformers builds only from its weights
        log.info("lora: target_modules not checked (no skeleton of %s: %s)",
                 type(model_config).__name__, exc)  # fmt: skip
        return
    try:
        with quiet_peft_wrapping():
            get_peft_model(skeleton, lora)
    except ValueError as exc:
        raise ConfigError(f"lora: {exc}") from None


class PolicySampler:
    """The policy's generation backend; `sync()` after every optimizer step, so that every
    rollout is drawn on-policy.

    Call it before the policy is sharded: a sharded policy is sampled through a full copy.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        tokenizer: Any,
        parallel: Parallel,
        base_copy: nn.Module | None = None,
    ) -> None:
        self.cfg, self.model, self.tokenizer, self.parallel = cfg, model, tokenizer, parallel
        self.merged = base_copy is not None
        device = next(model.parameters()).device
        sample_dtype = sampling_dtype(cfg, device)
        self.int8 = sample_dtype == "int8"
        self.generator = model
        if cfg.generation_backend == "transformers" and (
            parallel.sharded or sampling_copy_needed(cfg, device)
        ):
            copied = base_copy if base_copy is not None else copy.deepcopy(model)
            copy_dtype = DTYPES[cfg.dtype if self.int8 else sample_dtype]
            self.generator = copied.to(copy_dtype).eval().requires_grad_(False)
            if self.int8:
                quantize_for_decoding(self.generator)
        self.grammar = self._grammar()
        self.structured = self.grammar is not None or (
            cfg.generation_backend == "vllm" and cfg.structured_output != "off"
        )
        self.prefills = {
            "reflection": self._prefill("reflection_prefill", cfg.reflection_prefill),
            "curation": self._prefill("curation_prefill", cfg.curation_prefill),
        }
        # Rollouts' keys and values, kept for conversation-layout reflections that begin
        # with them (transformers backend, dynamic KV cache); cleared by every sync.
        self.prefix_cache = (
            PrefixCache()
            if cfg.reflection_layout == "conversation" and cfg.generation_backend == "transformers"
            and cfg.generation_cache is None
            else None
        )  # fmt: skip
        self.backend: Sampler = self._backend()
        self.needs_sync = cfg.generation_backend == "vllm" or self.generator is not model
        if cfg.generation_backend == "vllm" or self.merged:  # a resumed policy's weights
            self.sync()

    def _backend(self) -> Sampler:
        cfg = self.cfg
        if cfg.generation_backend == "vllm":
            from resd.generation.vllm_engine import VLLMSampler

            return VLLMSampler(
                resolve_model_path(cfg.model), self.tokenizer, dtype=sampling_dtype(cfg, torch.device("cuda")),
                seed=cfg.seed, max_model_len=cfg.max_teacher_prompt_tokens + cfg.max_new_tokens,
                vllm_args=cfg.vllm_args,
            )  # fmt: skip
        return TransformersSampler(
            self.generator, self.tokenizer, batch_size=cfg.generation_batch_size, autocast=cfg.autocast,
            cache_implementation=cfg.generation_cache, compile=cfg.generation_compile, grammar=self.grammar,
            prefix_cache=self.prefix_cache,
        )  # fmt: skip

    def _grammar(self) -> JsonGrammar | None:
        """xgrammar for JSON replies on the transformers backend (vLLM brings its own)."""
        cfg = self.cfg
        if cfg.structured_output == "off" or cfg.generation_backend == "vllm":
            return None
        try:
            return JsonGrammar(
                self.tokenizer,
                self.model.config.vocab_size,
                eos_token_ids(self.model, self.tokenizer),
            )
        except StructuredOutputUnavailable as exc:
            if cfg.structured_output == "on":
                raise ConfigError(f"structured_output: {exc}") from None
            log.warning(
                "structured_output: auto and xgrammar is missing; replies are parsed as free text"
            )
            return None

    def _prefill(self, name: str, value: str | None) -> str:
        """The text that opens a reply: none under a grammar, a JSON opener without one."""
        if value is None:
            return "" if self.structured else JSON_OPENER
        if value and self.structured and self.cfg.generation_backend == "vllm":
            raise ConfigError(
                f"{name}: a prefill cannot be combined with vLLM's structured output; "
                "drop it or set structured_output: off"
            )
        return value

    def weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The current policy as (plain name, full tensor) pairs, for a sampler to load."""
        if is_peft(self.model) and (self.cfg.generation_backend == "vllm" or self.merged):
            from resd.generation.vllm_engine import merged_lora_weights

            return merged_lora_weights(self.model)
        return self.parallel.full_parameters(self.model)

    def forget_prefixes(self) -> None:
        """Drop the rollouts' kept keys and values once nothing will read them (after the
        reflection phase): they cost memory for every token of every rollout."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @torch.no_grad()
    def sync(self) -> None:
        """Push the policy's new weights to whatever samples (a no-op when that is the
        policy), and forget prefixes computed with the old ones."""
        self.forget_prefixes()
        if self.needs_sync:
            self.backend.load_weights(self.weights())

    # ---- sampling ----------------------------------------------------------------------------
    def rollouts(self, prompts: list[list[int]], seeds: list[int]) -> list[Generation]:
        """Rollouts, with the sampler's log-probs for rollout correction."""
        cfg = self.cfg
        return self.backend.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                                     seeds=seeds, return_logprobs=True,
                                     min_new_tokens=cfg.min_new_tokens,
                                     keep_prefixes=self.prefix_cache is not None)  # fmt: skip

    def replies(
        self,
        prompts: list[list[int]],
        kind: str,
        max_new_tokens: int,
        seeds: list[int],
        schema: dict[str, Any] | None = None,
    ) -> list[Generation]:
        """Reflection / tagging / curation replies: opened with the `kind`'s prefill (the
        returned text includes it), decoded under `schema` when structured output is on."""
        prefill = self.prefills.get(kind, "")
        prefix = self.tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []
        schemas: Sequence[dict | None] | None = (
            [schema] * len(prompts) if self.structured and schema else None
        )
        gens = self.backend.generate(
            [p + prefix for p in prompts], max_new_tokens=max_new_tokens, temperature=self.cfg.temperature,
            top_p=self.cfg.top_p, top_k=self.cfg.top_k, min_p=self.cfg.min_p, seeds=seeds,
            json_schemas=schemas,
            json_prefixes=[prefill] * len(prompts) if schemas and prefill else None,
        )  # fmt: skip
        return [Generation(g.token_ids, prefill + g.text, g.finished, cached_tokens=g.cached_tokens,
                           fields_cut=g.fields_cut) for g in gens]  # fmt: skip
