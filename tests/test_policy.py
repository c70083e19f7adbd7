"""What `resd.training.policy` decides from the config: whether a LoRA policy samples from
a merged copy, and which reply prefills a sampler accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from resd.config import ConfigError, load_config
from resd.models import load_model, load_tokenizer
from resd.parallel import Parallel
from resd.training.policy import JSON_OPENER, PolicySampler, load_policy, merged_sampling


@pytest.mark.parametrize(
    ("overrides", "merged"),
    [
        (["lora={r: 4}", "generation_dtype=bfloat16"], True),  # a bf16 copy, adapter merged in
        (["lora={r: 4}", "generation_dtype=null"], False),  # samples from the policy itself
        (["lora={r: 4}", "generation_dtype=float32"], False),  # the training dtype: no copy
        (["lora=null", "generation_dtype=bfloat16"], False),  # a full copy, nothing to merge
        # vLLM merges the adapter into its own engine's weights: no copy in this process
        (["lora={r: 4}", "generation_dtype=bfloat16", "generation_backend=vllm"], False),
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


def test_a_lora_policys_base_recomputes_activations_exactly_when_asked(
    tiny_model_dir: Path,
) -> None:
    """Activation recomputation trades compute for memory only when asked; under LoRA it
    is the base model, wrapped by the adapter, that must recompute. Catches a LoRA base
    that ignores `gradient_checkpointing` or turns it on regardless (the full model's
    case is `test_hf_outputs.py::test_gradient_checkpointing_gives_the_same_update`), and
    turning it on by the name transformers 5 deprecated (a FutureWarning every run)."""
    import warnings

    for asked in (True, False):
        cfg = load_config(
            None,
            [f"model={tiny_model_dir}", "device=cpu", "lora={r: 2}",
             f"gradient_checkpointing={str(asked).lower()}"],
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model, _ = load_policy(cfg, Parallel(), None)
        assert model.is_activation_checkpointing is asked


def test_a_resumed_lora_policy_samples_with_its_trained_adapter_from_the_first_step(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A LoRA policy sampled in bf16 decodes from a plain copy of the base with the adapter
    merged in; on a resume that copy must hold the checkpoint's adapter before the first
    rollout. Catches a sampler that syncs only after the first optimizer step, so the
    resumed run's first rollouts come from the bare base model."""
    import copy

    from peft import LoraConfig, get_peft_model

    trained = get_peft_model(
        load_model(str(tiny_model_dir), device="cpu"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False),
    )
    trained.save_pretrained(tmp_path / "adapter")
    expected = copy.deepcopy(trained).merge_and_unload()
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "dtype=float32", "lora={r: 4}",
         "generation_dtype=bfloat16", "structured_output=off"],
    )  # fmt: skip
    model, base_copy = load_policy(cfg, Parallel(), tmp_path / "adapter", keep_base=True)
    sampler = PolicySampler(cfg, model, load_tokenizer(str(tiny_model_dir)), Parallel(), base_copy)
    name = "model.layers.0.self_attn.q_proj.weight"
    sampled = sampler.generator.get_parameter(name)
    assert sampled.dtype == torch.bfloat16
    bare = trained.get_parameter(
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    )
    merged = expected.get_parameter(name)
    assert (merged - bare).abs().max() > 0.05  # the adapter changes q_proj
    torch.testing.assert_close(sampled.float(), merged, rtol=1e-2, atol=2e-3)  # bf16 rounding


def test_wrapping_a_model_in_an_adapter_prints_no_futurewarning(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a
    model. Catches the FutureWarning that then printed on every LoRA run (a new adapter
    and a resumed one) and on every `resd eval` of an adapter, and a silencing that
    outlives the wrapping."""
    import warnings

    from resd.analysis import eval_cli

    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "lora={r: 2}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model, _ = load_policy(cfg, Parallel(), None)
        model.save_pretrained(tmp_path / "adapter")
        load_policy(cfg, Parallel(), tmp_path / "adapter")
        eval_cli.load_policy(tmp_path / "adapter", device="cpu")
        with pytest.raises(FutureWarning, match="is_gradient_checkpointing"):
            model.base_model.model.is_gradient_checkpointing  # noqa: B018 (still deprecated)


def tiny_qwen2() -> torch.nn.Module:
    """A one-layer Qwen2 with random weights: like the bundled 0.5B model, its q/k/v
    projections carry biases (the tiny Llama's layers have none)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def test_frozen_linears_with_a_bias_keep_weight_and_bias_in_one_dtype() -> None:
    """`cast_frozen_linears` must store a frozen layer's bias in the compute dtype with
    its weight. Catches a bias left in float32, which a bf16 input outside autocast then
    cannot be added to ("self and mat2 must have the same dtype"), and a miscounted
    return; a float32 input still gets the float32 layer's output."""
    from resd.training.policy import AutocastLinear, cast_frozen_linears

    model = tiny_qwen2().requires_grad_(False)  # frozen, as under a LoRA adapter
    layer = model.model.layers[0].self_attn.q_proj
    plain = torch.nn.Linear(16, layer.out_features)
    plain.load_state_dict(layer.state_dict())

    assert cast_frozen_linears(model, torch.bfloat16) == 7  # q, k, v, o, gate, up, down
    assert type(layer) is AutocastLinear and layer.bias is not None
    assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert layer(x.bfloat16()).dtype == torch.bfloat16
        torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=5e-3)


def test_only_frozen_base_linears_are_cast_and_every_trained_or_adapter_tensor_stays_fp32() -> None:
    """What `cast_frozen_linears` leaves in float32: a layer whose bias trains (PEFT's
    `bias`), a trained full copy (`modules_to_save`), and every adapter, the frozen
    second one (the EMA teacher's) included, which moves every step and would lose its
    small updates to bf16 rounding. Catches any of those cast to bf16, and layers already
    in the dtype counted (by a second call, or in a bf16 model)."""
    from peft import LoraConfig, get_peft_model

    from resd.training.policy import cast_frozen_linears

    lora = LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only", modules_to_save=["o_proj"])
    model = get_peft_model(tiny_qwen2(), lora)
    model.add_adapter("teacher", LoraConfig(r=2, target_modules=["q_proj"]))
    # k, v, gate, up, down and o_proj's frozen original; not q_proj, whose bias trains
    assert cast_frozen_linears(model, torch.bfloat16) == 6
    assert cast_frozen_linears(model, torch.bfloat16) == 0
    frozen_bf16 = tiny_qwen2().to(torch.bfloat16).requires_grad_(False)
    assert cast_frozen_linears(frozen_bf16, torch.bfloat16) == 0
    cast = ("k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "o_proj.original_module")
    for name, param in model.named_parameters():  # norms and the tied embeddings stay too
        frozen_base = any(f".{key}." in name for key in cast)
        assert param.dtype == (torch.bfloat16 if frozen_base else torch.float32), name
    assert any(".teacher." in n and not p.requires_grad for n, p in model.named_parameters())


def test_lora_dropout_has_a_short_name_and_peft_value_errors_are_config_errors() -> None:
    """`dropout` is our short name for `lora_dropout` (`alpha`'s is checked in
    test_hf_outputs.py); a value PEFT refuses with a ValueError is a config error, named
    under `lora:`. Catches a short name PEFT would reject as an unknown key, and PEFT's
    bare ValueError reaching the user."""
    from resd.training.policy import lora_config

    assert lora_config({"dropout": 0.25}).lora_dropout == 0.25
    assert lora_config({}).lora_alpha == 32  # the default: twice the default rank
    with pytest.raises(ConfigError, match=r"^lora: `layers_to_transform` cannot be used"):
        lora_config({"layers_to_transform": [0]})  # the default target_modules is a string


def test_lora_targets_are_checked_on_the_models_skeleton_without_its_weights(
    tiny_model_dir: Path,
) -> None:
    """`--dry-run`'s check: the adapter wraps the model built from its config on the meta
    device, so a `target_modules` entry the model lacks is a config error; a model whose
    skeleton transformers cannot build from a config (no causal-LM class for it) is left
    to the run. Catches a missing target passed over, and a dry run failed on an
    architecture the check cannot build."""
    from transformers import AutoConfig, ViTConfig

    from resd.training.policy import check_lora_targets, lora_config

    config = AutoConfig.from_pretrained(tiny_model_dir)
    check_lora_targets(config, lora_config({"target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ConfigError, match=r"^lora: Target modules \{'qkv'\} not found"):
        check_lora_targets(config, lora_config({"target_modules": ["qkv"]}))
    check_lora_targets(ViTConfig(), lora_config({"target_modules": ["qkv"]}))  # not built


def test_a_run_names_lora_targets_the_model_lacks_and_bad_values_given_by_hand(
    tiny_model_dir: Path,
) -> None:
    """The run's own wrapping (not `--dry-run`'s): PEFT's error for a target the model
    lacks is a config error under `lora:`, and a hand-built config (never read by
    `load_config`) has its values checked too. Catches PEFT's bare
    NoMatchingPeftModuleError, and the TypeError a string rank raised deep in PEFT."""
    from resd.config import TrainConfig
    from resd.training.policy import lora_config

    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu",
                             "lora={target_modules: [qkv]}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"^lora: Target modules \{'qkv'\} not found"):
        load_policy(cfg, Parallel(), None)
    with pytest.raises(ConfigError, match=r"^lora.r: expected a whole number >= 1, got 'big'"):
        lora_config({"r": "big"})
    with pytest.raises(ConfigError, match=r"^lora.target_modules: expected"):
        TrainConfig(lora={"target_modules": 5})


class RecordingEngine:
    """Stands in for `VLLMSampler` (vLLM needs CUDA): records how the sampler is built
    and every set of weights pushed to it."""

    def __init__(self, model: str, tokenizer: Any, **kwargs: Any) -> None:
        self.model, self.kwargs = model, kwargs
        self.loads: list[dict[str, torch.Tensor]] = []

    def load_weights(self, weights: Any) -> None:
        self.loads.append(dict(weights))


def test_a_lora_policy_on_vllm_gets_merged_weights_at_once_and_no_copy_here(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the vLLM backend the engine samples: it is built from the model's folder in
    the sampling dtype, with room for the longest teacher prompt and reply, and given the
    policy's weights (a LoRA policy's merged in, by plain names) at once and at every
    sync. Catches a sampler that builds a transformers backend instead, keeps a second
    copy of the policy in this process, builds an xgrammar grammar vLLM does not use,
    refuses an empty prefill, or leaves the engine on the base weights until a sync."""
    monkeypatch.setattr("resd.generation.vllm_engine.VLLMSampler", RecordingEngine)
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "lora={r: 2}", "generation_backend=vllm",
         "generation_dtype=bfloat16", "structured_output=auto", "reflection_prefill=''",
         "reflection_layout=conversation", "vllm_args={enforce_eager: true}",
         "max_teacher_prompt_tokens=100", "max_new_tokens=20", "seed=7"],
    )  # fmt: skip
    model, _ = load_policy(cfg, Parallel(), None)
    sampler = PolicySampler(cfg, model, load_tokenizer(str(tiny_model_dir)), Parallel())
    engine = sampler.backend
    assert isinstance(engine, RecordingEngine)
    assert engine.model == str(tiny_model_dir.resolve())
    assert engine.kwargs["dtype"] == "bfloat16" and engine.kwargs["seed"] == 7
    assert engine.kwargs["max_model_len"] == 120
    assert engine.kwargs["vllm_args"] == {"enforce_eager": True}
    assert sampler.generator is model and sampler.grammar is None and sampler.structured
    assert sampler.prefix_cache is None  # vLLM keeps its own prefix cache
    assert sampler.prefills == {"reflection": "", "curation": ""}
    assert len(engine.loads) == 1
    name = "model.layers.0.self_attn.q_proj.weight"
    assert name in engine.loads[0] and not any("lora_" in n for n in engine.loads[0])
    sampler.sync()
    assert len(engine.loads) == 2
    # without structured output a prefill opens vLLM's replies as any other backend's
    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "generation_backend=vllm",
                             "generation_dtype=bfloat16", "structured_output=off",
                             "reflection_prefill=Lesson"])  # fmt: skip
    sampler = PolicySampler(cfg, model, load_tokenizer(str(tiny_model_dir)), Parallel())
    assert sampler.prefills == {"reflection": "Lesson", "curation": JSON_OPENER}
    with pytest.raises(ConfigError, match=r"^curation_prefill: a prefill cannot be combined"):
        cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "generation_backend=vllm",
                                 "generation_dtype=bfloat16", "curation_prefill=Ops"])  # fmt: skip
        PolicySampler(cfg, model, load_tokenizer(str(tiny_model_dir)), Parallel())


def test_the_transformers_backend_is_built_with_the_generation_settings(
    tiny_model_dir: Path,
) -> None:
    """Each generation setting reaches the transformers sampler: catches one dropped on
    the way (its default would then be used silently)."""
    common = [f"model={tiny_model_dir}", "device=cpu", "generation_dtype=null"]
    model = load_model(str(tiny_model_dir), device="cpu")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = load_config(
        None,
        [*common, "generation_batch_size=3", "autocast=bfloat16", "generation_cache=static",
         "generation_compile=true", "structured_output=on", "curation_prefill=Ops"],
    )  # fmt: skip
    sampler = PolicySampler(cfg, model, tokenizer, Parallel())
    # a grammar continues after a prefill (vLLM's structured output cannot)
    assert sampler.prefills == {"reflection": "", "curation": "Ops"}
    backend = sampler.backend
    assert (backend.batch_size, backend.autocast) == (3, "bfloat16")
    assert (backend.cache_implementation, backend.compile) == ("static", True)
    assert backend.grammar is not None and backend.prefix_cache is None
    cfg = load_config(None, [*common, "reflection_layout=conversation", "structured_output=off"])
    sampler = PolicySampler(cfg, model, tokenizer, Parallel())
    assert sampler.backend.prefix_cache is sampler.prefix_cache is not None
    assert sampler.backend.grammar is None and sampler.backend.cache_implementation is None
    # rollouts' keys and values are kept only for conversation-layout reflections, and
    # only with the dynamic cache (a static one cannot take them)
    for layout, cache in (("prompt", "null"), ("conversation", "static")):
        cfg = load_config(
            None,
            [*common, f"reflection_layout={layout}", f"generation_cache={cache}",
             "structured_output=off"],
        )  # fmt: skip
        assert PolicySampler(cfg, model, tokenizer, Parallel()).prefix_cache is None


def test_rollouts_hold_eos_back_for_min_new_tokens(tiny_model_dir: Path) -> None:
    """`min_new_tokens` keeps EOS out of a rollout's first tokens (equal work per rollout):
    with EOS made the token greedy decoding picks first, every rollout must still run to
    `min_new_tokens`. Catches rollouts sampled without the setting (they end at once)."""
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "generation_dtype=null", "temperature=0",
         "structured_output=off", "max_new_tokens=4", "min_new_tokens=4"],
    )  # fmt: skip
    model = load_model(str(tiny_model_dir), device="cpu")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with torch.no_grad():
        firsts = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    model.generation_config.eos_token_id = firsts
    sampler = PolicySampler(cfg, model, load_tokenizer(str(tiny_model_dir)), Parallel())
    rollouts = sampler.rollouts(prompts, seeds=[1, 2])
    assert [len(r.token_ids) for r in rollouts] == [4, 4]
    assert all(r.token_ids[0] != first for r, first in zip(rollouts, firsts, strict=True))


@pytest.mark.parametrize("setting", ["top_k=1", "min_p=1"])
def test_rollouts_and_replies_sample_with_top_k_and_min_p(tiny_model_dir: Path, setting) -> None:
    """`top_k: 1` (or `min_p: 1`) leaves the top token alone: rollouts and lesson replies
    at temperature 1.5 are then greedy decoding's. Catches the policy dropping the setting
    on its way to the sampler, on either pass (unfiltered, they sample something else)."""
    common = [f"model={tiny_model_dir}", "device=cpu", "generation_dtype=null",
              "structured_output=off", "max_new_tokens=6"]  # fmt: skip
    model = load_model(str(tiny_model_dir), device="cpu")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [[5, 6, 7, 8], [9, 10, 11]]

    def passes(*overrides: str) -> list[list[int]]:
        sampler = PolicySampler(load_config(None, [*common, *overrides]), model, tokenizer,
                                Parallel())  # fmt: skip
        rollouts = sampler.rollouts(prompts, seeds=[1, 2])
        replies = sampler.replies(prompts, "reflection", 6, seeds=[1, 2])
        return [g.token_ids for g in rollouts + replies]

    greedy = passes("temperature=0")
    assert passes("temperature=1.5", setting) == greedy
    assert passes("temperature=1.5") != greedy


def test_a_reply_continues_its_prefill_and_its_seed_fixes_it(tiny_model_dir: Path) -> None:
    """A reflection reply is decoded after its prefill's tokens (the returned text opens
    with the prefill), and drawn with its seed: catches a reply decoded from the bare
    prompt, and one sampled without its seed (it would change from call to call)."""
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "generation_dtype=null", "max_new_tokens=6",
         "structured_output=off", "reflection_prefill=Lesson"],
    )  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir))
    sampler = PolicySampler(
        cfg, load_model(str(tiny_model_dir), device="cpu"), tokenizer, Parallel()
    )
    prompt = [5, 6, 7, 8]
    reply = sampler.replies([prompt], "reflection", 6, seeds=[3])[0]
    assert sampler.replies([prompt], "reflection", 6, seeds=[3])[0].token_ids == reply.token_ids
    prefix = tokenizer("Lesson", add_special_tokens=False)["input_ids"]
    assert sampler.rollouts([prompt + prefix], seeds=[3])[0].token_ids == reply.token_ids
    assert reply.text == "Lesson" + tokenizer.decode(reply.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("lora", ["null", "{r: 2}"])
def test_a_policy_loads_in_the_configured_dtype_with_the_init_kwargs(
    tiny_model_dir: Path, lora: str
) -> None:
    """A full policy and a LoRA policy's base are loaded on separate paths: catches
    either loading in the default float32 or without `model_init_kwargs` (here the
    attention implementation)."""
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "dtype=bfloat16", "autocast=none",
         f"lora={lora}", "model_init_kwargs={attn_implementation: eager}"],
    )  # fmt: skip
    model, _ = load_policy(cfg, Parallel(), None)
    base = model.get_base_model() if lora != "null" else model
    assert base.dtype == torch.bfloat16
    assert base.config._attn_implementation == "eager"


def test_a_sync_drops_the_rollouts_kept_prefixes_even_with_no_copy_to_refresh(
    tiny_model_dir: Path,
) -> None:
    """Conversation-layout reflections reuse the rollouts' keys and values (and count the
    tokens they reuse), which belong to the weights that computed them. A sampler that
    samples from the policy itself has no weights to load at `sync()`, yet must still
    forget those prefixes (and `forget_prefixes()` must, after the reflection phase):
    catches a reflection after an optimizer step that reuses keys and values of the old
    weights, and rollouts that keep none."""
    cfg = load_config(
        None,
        [f"model={tiny_model_dir}", "device=cpu", "dtype=float32", "generation_dtype=null",
         "reflection_layout=conversation", "structured_output=off", "max_new_tokens=3"],
    )  # fmt: skip
    model = load_model(str(tiny_model_dir), device="cpu")
    sampler = PolicySampler(cfg, model, load_tokenizer(str(tiny_model_dir)), Parallel())
    assert sampler.generator is model and sampler.prefix_cache is not None
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    for forget in (sampler.sync, sampler.forget_prefixes):
        rollout = sampler.rollouts(prompts, seeds=[1, 2])[0]
        assert len(sampler.prefix_cache) == 2
        # a reflection that begins with the rollout reuses its keys and values
        conversation = prompts[0] + rollout.token_ids + [12, 13]
        reply = sampler.replies([conversation], "reflection", 2, seeds=[0])[0]
        assert reply.cached_tokens > 0
        forget()
        assert len(sampler.prefix_cache) == 0


def test_a_reply_under_the_grammar_continues_its_prefill_as_one_json_object(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With structured output on and a reflection prefill, the reply is decoded under its
    schema from where the prefill left off: prefill and reply together are one object of
    the schema, and a call without a schema decodes free text; with structured output off
    a schema is ignored. Catches the schema or the prefill not handed to the grammar (it
    would then open a second object after the prefill, or constrain nothing), a grammar
    applied to a call that gave no schema, and a schema handed on with no grammar to hold
    it (`generate` refuses that)."""
    import dataclasses
    import json

    import yaml

    from resd.generation.schemas import reflection_schema

    opener = '{"reasoning":"'
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"reflection_prefill": opener}))
    cfg = load_config(
        path,
        [f"model={tiny_model_dir}", "device=cpu", "generation_dtype=null", "temperature=1.0",
         "structured_output=on"],
    )  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir))
    sampler = PolicySampler(
        cfg, load_model(str(tiny_model_dir), device="cpu"), tokenizer, Parallel()
    )
    assert sampler.structured and sampler.prefills["reflection"] == opener
    schema = reflection_schema(["strat-00001"], 160)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    for reply in sampler.replies(prompts, "reflection", 700, seeds=[0, 1], schema=schema):
        assert reply.text.startswith(opener) and reply.finished
        assert json.loads(reply.text, strict=False).keys() == schema["properties"].keys()
    free = sampler.replies(prompts, "reflection", 8, seeds=[0, 1])
    constrained = sampler.replies(prompts, "reflection", 8, seeds=[0, 1], schema=schema)
    assert [r.token_ids for r in free] != [r.token_ids for r in constrained]
    # structured output off: a schema is ignored (no grammar to hold it), not an error
    cfg = dataclasses.replace(cfg, structured_output="off")
    plain = PolicySampler(cfg, sampler.model, tokenizer, Parallel())
    assert plain.grammar is None and not plain.structured
    ignored = plain.replies(prompts, "reflection", 8, seeds=[0, 1], schema=schema)
    assert [r.token_ids for r in ignored] == [r.token_ids for r in free]
