"""Optional vLLM generation backend, colocated with training on the same GPU.

`VLLMSampler` has the same `generate`/`load_weights` interface and the same output schema
as `resd.generation.hf.TransformersSampler`, so the trainer can swap one for the other. vLLM
is imported lazily: the package works without it, and asking for this backend without
vLLM (or without a CUDA GPU) fails at construction with a `ConfigError` that says what to
install, not with an ImportError deep inside the first rollout.

Weight sync. After every optimizer step the trainer pushes the policy's weights into the
engine with `load_weights`. The cheap path is in-process: the engine core runs in this
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by default here), so the model object
inside vLLM is reachable and its own `load_weights` copies our GPU tensors straight in.
If the engine runs in a separate process, the weights are sent through
`LLM.collective_rpc` instead (serialised on the CPU, so slower; newer vLLM versions need
`VLLM_ALLOW_INSECURE_SERIALIZATION=1` to ship a function). For a LoRA policy the trainer
sends `merged_lora_weights(policy)`, since the engine holds a plain model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from resd.config import ConfigError
from resd.generation.base import Generation, cut_at_eos

# Colocated with training: the policy, its gradients and optimizer state share the GPU,
# so the engine only takes a modest slice for its weights and KV cache.
DEFAULT_LLM_ARGS: dict[str, Any] = {"gpu_memory_utilization": 0.3}

_INSTALL_HINT = (
    "generation_backend: 'vllm' needs the vllm package: pip install 'resd[vllm]' "
    "(vLLM needs a CUDA GPU); or use generation_backend: transformers"
)


def import_vllm() -> Any:
    """Import vllm or raise the user-facing ConfigError (vllm is an optional extra), and
    refuse a machine without a CUDA GPU. Called before anything is loaded (by the trainer
    and `--dry-run`) as well as by the sampler."""
    try:
        import vllm
    except ImportError as exc:
        raise ConfigError(_INSTALL_HINT) from exc
    if not torch.cuda.is_available():
        raise ConfigError(
            "generation_backend: 'vllm' needs a CUDA GPU and none is visible; "
            "use generation_backend: transformers on this machine"
        )
    return vllm


class VLLMSampler:
    """Sample with a vLLM engine; outputs match `TransformersSampler`'s schema.

    `model_path` is a Hugging Face folder with the policy's architecture (the base model
    for a LoRA policy); its weights are replaced by `load_weights` after each step.
    `vllm_args` are passed to `vllm.LLM` and override the defaults here.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int,
        vllm_args: dict[str, Any] | None = None,
    ) -> None:
        vllm = import_vllm()
        # Must be set before the engine is built; a user's explicit setting wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args: dict[str, Any] = {
            **DEFAULT_LLM_ARGS,
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            **(vllm_args or {}),
        }
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.llm = vllm.LLM(model=model_path, **args)
        # vLLM's stop set may differ from ours (generation_config vs tokenizer); pass ours.
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.eos: list[int] = sorted(eos | set(_config_eos(model_path)))

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
        keep_prefixes: bool = False,  # vLLM's automatic prefix caching keeps them anyway
    ) -> list[Generation]:
        """One continuation per prompt; temperature 0 is greedy.

        With `seeds`, each request gets its own seeded generator in vLLM, so a row's
        sample depends on its prompt and seed only, as with the transformers backend
        (the two backends draw different samples for the same seed, though).
        `json_schemas` (one per prompt, None for a free row) go to vLLM's structured
        outputs, which start at the first generated token: no prefill can precede them.
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError("generate: need one seed per prompt")
        if json_schemas is not None and len(json_schemas) != len(prompts):
            raise ValueError("generate: need one schema (or None) per prompt")
        if json_prefixes and any(json_prefixes):
            raise ValueError("generate: vLLM's structured output cannot follow a prefill")
        if not prompts:
            return []
        greedy = temperature <= 0
        params = [
            self._vllm.SamplingParams(
                n=1,
                max_tokens=max_new_tokens,
                min_tokens=min_new_tokens,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                # off unless set (vLLM's "off" for top_k was -1 in older releases, 0 later)
                **({"top_k": top_k} if top_k and not greedy else {}),
                **({"min_p": min_p} if min_p and not greedy else {}),
                seed=None if seeds is None or greedy else int(seeds[i]) % (2**63),
                stop_token_ids=self.eos,
                detokenize=False,  # we decode ourselves, exactly as the other backend
                **({"logprobs": 0} if return_logprobs else {}),  # 0: the sampled token's only
                **self._structured(json_schemas[i] if json_schemas else None),
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]  # a TokensPrompt
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        gens = [self._to_generation(out.outputs[0]) for out in outputs]
        for gen, out in zip(gens, outputs, strict=True):
            gen.cached_tokens = int(getattr(out, "num_cached_tokens", 0) or 0)
        return gens

    def _structured(self, schema: dict | None) -> dict[str, Any]:
        """SamplingParams keywords for a JSON schema: `structured_outputs` (vLLM >= 0.10.2;
        the only spelling from 0.12), else the older `guided_decoding`."""
        if schema is None:
            return {}
        params = self._vllm.sampling_params
        if hasattr(params, "StructuredOutputsParams"):
            return {"structured_outputs": params.StructuredOutputsParams(json=schema)}
        return {"guided_decoding": params.GuidedDecodingParams(json=schema)}

    def _to_generation(self, completion: Any) -> Generation:
        """vLLM completion → `Generation`, cut after the first EOS like the other backend.

        vLLM normally keeps the stop token in `token_ids`; if a version drops it, it is
        put back from `stop_reason` so `finished` and the kept EOS agree across backends.
        """
        tokens = list(completion.token_ids)
        logprobs = _sampled_logprobs(tokens, getattr(completion, "logprobs", None))
        gen = cut_at_eos(tokens, self.eos, self.tokenizer, logprobs)
        if not gen.finished and completion.finish_reason == "stop" and self.eos:
            stop = completion.stop_reason
            tokens.append(stop if isinstance(stop, int) else self.eos[0])
            gen = cut_at_eos(tokens, self.eos, self.tokenizer, logprobs and [*logprobs, math.nan])
        return gen

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push new policy weights (plain HF parameter names) into the engine.

        Cached prefixes hold keys/values computed with the old weights, so the prefix
        cache is cleared afterwards; otherwise a reused prompt would mix policies.
        """
        model = _in_process_model(self.llm)
        if model is not None:
            model.load_weights(weights)
        elif hasattr(self.llm, "collective_rpc"):
            # engine in another process: ship CPU copies, load them in each worker
            batch = [(name, t.detach().to("cpu")) for name, t in weights]
            try:
                self.llm.collective_rpc(_load_weights_in_worker, args=(batch,))
            except Exception as exc:
                raise RuntimeError(
                    "vllm_backend: could not send weights to the vLLM worker process; "
                    "set VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine) or "
                    "VLLM_ALLOW_INSECURE_SERIALIZATION=1"
                ) from exc
        else:
            raise RuntimeError(
                "vllm_backend: this vLLM version exposes neither the in-process model "
                "(llm.llm_engine.model_executor.driver_worker) nor LLM.collective_rpc, so "
                "weights cannot be synced; use vllm>=0.10"
            )
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()


def _sampled_logprobs(tokens: list[int], logprobs: Any) -> list[float] | None:
    """vLLM's per-position {token id: Logprob} dicts → the sampled tokens' log-probs."""
    if not logprobs or len(logprobs) < len(tokens):
        return None
    values = []
    for token, position in zip(tokens, logprobs, strict=False):
        entry = position.get(token) if isinstance(position, dict) else None
        if entry is None:
            return None
        values.append(float(getattr(entry, "logprob", entry)))
    return values


def _config_eos(model_path: str) -> list[int]:
    """EOS ids from the folder's generation_config.json (what HF generate also stops on)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        return []
    return list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])


def _in_process_model(llm: Any) -> nn.Module | None:
    """The engine's model object when the engine runs in this process, else None.

    The attribute path moved between releases: the driver worker is either the worker
    itself or a wrapper holding it as `.worker`.
    """
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    driver = getattr(executor, "driver_worker", None)
    for worker in (getattr(driver, "worker", None), driver):
        runner = getattr(worker, "model_runner", None)
        model = getattr(runner, "model", None)
        if model is not None and hasattr(model, "load_weights"):
            return model
    return None


def _load_weights_in_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside a vLLM worker process (via collective_rpc): load into its model."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    device = next(model.parameters()).device
    model.load_weights((name, t.to(device)) for name, t in weights)
    return len(weights)


_LORA_SEGMENT = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


@torch.no_grad()
def merged_lora_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (plain HF name, tensor) for every parameter, LoRA deltas merged in.

    Works for a PEFT LoRA model and passes a plain model's parameters through unchanged.
    Names are the base model's (`model.layers.0.self_attn.q_proj.weight`): without
    `base_model.model.` and `.base_layer`, which is what vLLM's `load_weights` and a
    plain copy of the model expect. Merged tensors are computed as W + Δ on the fly,
    one at a time; the model itself is never modified, because merging and unmerging in
    place drifts bf16 base weights a little on every sync.

    Adapters already merged into the base weights, or disabled, add nothing (the yielded
    weights are what the model computes with). LoRA variants such as DoRA are refused:
    their merge is not additive.
    """
    for name, param in model.named_parameters():
        if _LORA_SEGMENT.search(name) or ".original_module." in name:
            continue  # adapter tensors and the pre-training copy of modules_to_save
        plain = name.removeprefix("base_model.model.")
        plain = _MODULES_TO_SAVE.sub(".", plain)
        if ".base_layer." not in plain:
            yield plain, param.detach()
            continue
        owner_name, attr = name.rsplit(".base_layer.", 1)
        yield plain.replace(".base_layer.", "."), _merged(model.get_submodule(owner_name), attr)


def _merged(layer: nn.Module, attr: str) -> torch.Tensor:
    """A LoRA layer's base `weight` or `bias` with its active, unmerged adapters added."""
    base = getattr(layer.get_base_layer(), attr).detach()
    if getattr(layer, "disable_adapters", False):
        return base
    merged_already = set(getattr(layer, "merged_adapters", []))
    out = base
    for adapter in layer.active_adapters:
        owns = adapter in getattr(layer, "lora_A", {}) or adapter in getattr(
            layer, "lora_embedding_A", {}
        )
        if not owns or adapter in merged_already:
            continue
        if adapter in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(
                f"merged_lora_weights: adapter {adapter!r} is a LoRA variant (e.g. DoRA) "
                "whose merge is not additive; sync it with merge_adapter() instead"
            )
        if attr == "weight":
            delta = layer.get_delta_weight(adapter)
        elif attr == "bias" and getattr(layer, "lora_bias", {}).get(adapter, False):
            delta = layer.lora_B[adapter].bias * layer.scaling[adapter]
        else:
            continue
        # in the wider of the two dtypes: a base kept in bf16 under autocast
        # (`cast_frozen_linears`) gets its float32 delta added before any rounding
        wide = torch.promote_types(out.dtype, delta.dtype)
        out = out.to(wide) + delta.to(wide)
    return out
