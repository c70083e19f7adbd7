"""What `resd.training.policy` decides from the config: whether a LoRA policy samples from
a merged copy, and which reply prefills a sampler accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from resd.config import ConfigError, load_config
from resd.models import load_model, load_tokenizer
from resd.parallel import Parallel
from resd.training.policy import PolicySampler, load_policy, merged_sampling


@pytest.mark.parametrize(
    ("overrides", "merged"),
    [
        (["lora={r: 4}", "generation_dtype=bfloat16"], True),  # a bf16 copy, adapter merged in
        (["lora={r: 4}", "generation_dtype=null"], False),  # samples from the policy itself
        (["lora={r: 4}", "generation_dtype=float32"], False),  # the training dtype: no copy
        (["lora=null", "generation_dtype=bfloat16"], False),  # a full copy, nothing to merge
    ],
)
def test_only_a_lora_policy_sampled_in_another_dtype_keeps_a_merged_copy(
    overrides: list[str], merged: bool
) -> None:
    """A merged copy costs a second set of base weights: catches one kept for a LoRA
    policy that samples from itself, or for a full fine-tune."""
    cfg = load_config(None, ["dtype=float32", "device=cpu", *overrides])
    assert merged_sampling(cfg, Parallel()) is merged


def test_a_prefill_with_vllm_structured_output_is_refused_by_name(tiny_model_dir: Path) -> None:
    """vLLM's structured output starts every reply itself, so a prefill would be decoded
    twice; catches a sampler that accepts one (the refusal comes before any engine)."""
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "generation_backend=vllm", "structured_output=auto",
         "device=cpu", "reflection_prefill={\"reasoning\": \""],
    )  # fmt: skip
    model = load_model(str(tiny_model_dir), device="cpu")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"^reflection_prefill: a prefill cannot be combined"):
        PolicySampler(cfg, model, tokenizer, Parallel())


def test_a_new_lora_adapter_records_the_base_models_revision(tiny_model_dir: Path) -> None:
    """Loading the adapter later must fetch the same base weights: catches an adapter
    config without the `revision` the base was loaded at."""
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "lora={r: 2, target_modules: [q_proj]}",
         "model_init_kwargs={revision: v1.0}"],
    )  # fmt: skip
    model, base_copy = load_policy(cfg, Parallel(), None)
    assert model.peft_config["default"].revision == "v1.0" and base_copy is None
