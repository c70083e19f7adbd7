"""Int8 decoding weights for CPU sampling (`generation_dtype: int8`)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from resd.config import ConfigError, load_config
from resd.generation.int8 import (
    DECODE_ROWS,
    Int8DecodeLinear,
    int8_decoding_available,
    quantize_for_decoding,
    quantize_weight,
    requantize,
)
from resd.models import load_model

pytestmark = pytest.mark.skipif(
    not int8_decoding_available("cpu"), reason="this PyTorch has no weight-only int8 matmul"
)


def test_few_rows_read_the_int8_copy_and_many_rows_or_gradients_the_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8DecodeLinear.wrap(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # shared, not copied
    few, many = torch.randn(2, 3, 64), torch.randn(DECODE_ROWS + 1, 64)
    with torch.no_grad():
        exact = linear(few)
        got = layer(few)
        assert got.shape == exact.shape and got.dtype == exact.dtype
        assert not torch.equal(got, exact)  # it did take the int8 path
        assert (got - exact).abs().max() < 0.03 * exact.abs().max()  # bias included, scales right
        assert torch.equal(layer(many), linear(many))  # a prompt's prefill: the weight itself
    assert torch.equal(layer(few), linear(few))  # training: the weight, so gradients are exact


def test_under_autocast_the_int8_path_returns_what_nn_linear_would():
    """Under bf16 autocast nn.Linear returns bf16, bias included; so must the int8 path, as
    decode steps append its keys and values to the prefill's (made by nn.Linear) in the
    KV cache. Catches the input's fp32 kept, which a static cache refused ("index_copy_():
    self and source expected to have the same dtype")."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8DecodeLinear.wrap(linear)
    x = torch.randn(2, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        exact, got = linear(x), layer(x)
    assert exact.dtype == got.dtype == torch.bfloat16
    assert not torch.equal(got, exact)  # it did take the int8 path
    assert (got.float() - exact.float()).abs().max() < 0.03 * exact.float().abs().max()


def test_a_static_cache_decodes_under_autocast(tiny_model_dir):
    """`generation_dtype: int8` with `generation_cache: static` under bf16 autocast: the
    cache takes the dtype of the prefill's keys and values (bf16: more rows than
    `DECODE_ROWS` go through nn.Linear), and the int8 decode steps' must fit it."""
    from resd.generation.hf import generate
    from resd.models import load_tokenizer

    model = load_model(str(tiny_model_dir)).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir), 64)
    quantize_for_decoding(model)
    prompts = [list(range(5, 5 + DECODE_ROWS))] * 2
    replies = [
        generate(model, tokenizer, prompts, max_new_tokens=5, temperature=0.0,
                 autocast="bfloat16", cache_implementation=cache)
        for cache in (None, "static")
    ]  # fmt: skip
    dynamic, static = ([g.token_ids for g in out] for out in replies)
    assert static == dynamic and all(static)  # the same greedy tokens, whichever cache


def test_requantize_follows_new_weights():
    torch.manual_seed(0)
    layer = Int8DecodeLinear.wrap(nn.Linear(32, 16, bias=False))
    x = torch.randn(1, 32)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(-2.0)
        assert torch.equal(layer(x), before)  # the copy is stale until requantized
        requantize(nn.Sequential(layer))
        torch.testing.assert_close(layer(x), -2.0 * before)


def test_a_model_keeps_its_names_and_ties_and_decodes_close(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).eval()
    reference = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize_for_decoding(model) == linears
    assert [name for name, _ in model.named_parameters()] == names  # weights still load by name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives
    short, long = torch.tensor([[5, 6, 7, 8]]), torch.arange(5, 5 + DECODE_ROWS + 4)[None]
    with torch.no_grad():
        p = torch.log_softmax(reference(short).logits, -1)
        q = torch.log_softmax(model(short).logits, -1)
        assert not torch.equal(p, q)
        assert (p.exp() * (p - q)).sum(-1).max() < 1e-2  # KL per position
        assert torch.equal(model(long).logits, reference(long).logits)  # prefill in fp32


def test_layers_the_kernel_cannot_take_stay_as_they_are():
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 4))  # 12 is not a multiple of 8
    assert quantize_for_decoding(model) == 1
    assert type(model[0]) is nn.Linear and isinstance(model[1], Int8DecodeLinear)


def test_int8_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="int8"):
        load_config(None, ["generation_dtype=int8", "generation_backend=vllm"])


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_training_samples_from_int8_weights_synced_after_every_step(tiny_model_dir, tmp_path, lora):
    from resd.generation.vllm_engine import merged_lora_weights
    from resd.training.trainer import Trainer
    from test_trainer import config

    extra = ["generation_dtype=int8", "autocast=none", "lr=0.05"]
    if lora:
        extra.append("lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}")
    trainer = Trainer(config(tiny_model_dir, tmp_path, *extra))
    generator = trainer.sampler.generator
    assert generator is not trainer.model and not hasattr(generator, "peft_config")
    layer = generator.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, Int8DecodeLinear)
    before = layer.weight_int8.clone()
    metrics = trainer.train_step(trainer.train_items[: trainer.cfg.batch_size])
    assert metrics["rollout_logprob_gap"] > 0  # the sampler is not the policy: corrected
    weights = dict(merged_lora_weights(trainer.model) if lora else trainer.model.named_parameters())
    fresh, _ = quantize_weight(weights["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(before, fresh)  # the step moved q_proj ...
    assert torch.equal(layer.weight_int8, fresh)  # ... and the sampler followed


def test_resd_eval_decodes_with_int8_weights(tiny_model_dir, tmp_path):
    from resd.analysis.eval_cli import load_policy
    from resd.cli import main

    model, _ = load_policy(tiny_model_dir, dtype="int8", device="cpu")
    assert model.dtype == torch.float32
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), Int8DecodeLinear)
    outs = []
    for dtype in ("float32", "int8"):
        out = tmp_path / f"{dtype}.json"
        args = ["eval", "--model", str(tiny_model_dir), "--env", "toy_envs:ParityEnv", "n_test=3",
                "--dtype", dtype, "--max-new-tokens", "8", "--samples", "2", "--out", str(out)]  # fmt: skip
        assert main(args) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[1]["dtype"] == "int8"
    assert len(outs[1]["samples"]) == len(outs[0]["samples"]) == 6


def test_quantize_weight_is_symmetric_per_row_with_the_row_maximum_at_127():
    """Each row's scale is its largest |weight| / 127 and each int8 value the weight over
    that scale, rounded to nearest: a scale of max / 128, or truncation instead of
    rounding, cost up to a whole step of error on every weight. A row of zeros (a pruned
    channel, a padded vocabulary row) stays zero instead of dividing by zero; bf16
    weights give the copy their float32 values give."""
    torch.manual_seed(0)
    weight = torch.randn(5, 32) * torch.tensor([1.0, 100.0, 1e-4, 0.0, 3.0])[:, None]
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (5,)
    rows = weight.abs().amax(dim=1)
    live = rows > 0
    torch.testing.assert_close(scale[live].float(), rows[live] / 127, rtol=1e-2, atol=0)
    exact = weight[live] / (rows[live, None] / 127)
    assert (q[live].float() - exact).abs().max() <= 0.5 + 1e-4
    assert q[live].abs().amax(dim=1).tolist() == [127] * int(live.sum())
    assert torch.equal(q[~live], torch.zeros_like(q[~live])) and torch.isfinite(scale).all()
    layer = Int8DecodeLinear.wrap(nn.Linear(32, 5, bias=False))
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.requantize()
        out = layer(torch.randn(2, 32))
    assert torch.isfinite(out).all() and torch.equal(out[:, 3], torch.zeros(2))
    half = weight.bfloat16()
    for got, want in zip(quantize_weight(half), quantize_weight(half.float()), strict=True):
        assert torch.equal(got, want)


def test_a_batch_of_exactly_decode_rows_rows_reads_the_int8_copy():
    """`DECODE_ROWS` is the largest batch that decodes with int8 weights (the sampler's
    batch of 16 must get them); one row more reads the weight."""
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    layer = Int8DecodeLinear.wrap(linear)
    at, over = torch.randn(DECODE_ROWS, 32), torch.randn(DECODE_ROWS + 1, 32)
    with torch.no_grad():
        assert not torch.equal(layer(at), linear(at))
        assert torch.equal(layer(over), linear(over))


def test_quantizing_adds_nothing_to_the_state_dict_and_keeps_the_heads_contiguous_input(
    tiny_model_dir,
):
    """The int8 copies are not state: a quantized model's state dict has the keys and
    values of the model it came from (saving or loading by name is unchanged). The
    wrapped output head gets its contiguous-input hook back, so a sliced prefill does
    not expand the vocabulary-sized weight per row."""
    model = load_model(str(tiny_model_dir)).eval()
    before = model.state_dict()
    quantize_for_decoding(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert quantize_for_decoding(model) == 0  # nothing is wrapped twice
    assert all(torch.equal(after[name], before[name]) for name in before)
    head = model.get_output_embeddings()
    assert isinstance(head, Int8DecodeLinear)
    seen = []
    head.register_forward_pre_hook(lambda _module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.arange(5, 5 + DECODE_ROWS).repeat(2, 1), logits_to_keep=DECODE_ROWS - 1)
    assert seen == [True]


def test_int8_decoding_is_refused_for_a_model_off_the_cpu():
    """A GPU samples in bf16: `quantize_for_decoding` refuses a model on any other device
    (here the meta device) instead of wrapping layers the kernel cannot run."""
    model = nn.Sequential(nn.Linear(16, 8, device="meta"))
    with pytest.raises(ValueError, match="needs a CPU"):
        quantize_for_decoding(model)
    assert type(model[0]) is nn.Linear
