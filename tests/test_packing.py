"""Rows packed into one row (`training.packing`): the logits, hidden states and
gradients of each row run alone, and packing only where it is allowed and pays."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from resd.models import load_model
from resd.training.packing import Packing, common_prefix, pack
from resd.training.update import response_hidden, response_logits, right_aligned_mask

PROMPT = list(range(5, 25))  # 20 shared tokens
SEQS = [
    [*PROMPT, 40, 41, 42, 43, 44, 45],
    [*PROMPT, 50, 51],
    [*PROMPT, 40, 41, 60, 61, 62],  # shares two reply tokens with the first row
    [*PROMPT, 40, 41, 42, 43, 44, 45],  # the same as the first row
]
REPLY_LENGTHS = [6, 2, 5, 6]


@pytest.fixture(scope="module", params=["resd_packed_sdpa", "eager"])
def model(request, tiny_model_dir):
    """The tiny Llama with larger random weights (a position or mask bug must show), in
    float64 (its rounding stays far below what a packing bug changes), under each
    attention implementation that packing supports."""
    model = load_model(str(tiny_model_dir))
    model.set_attn_implementation(request.param)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.double().eval()


def packing_for(model) -> Packing:
    packing = Packing.for_model(model)
    assert packing is not None and packing.pays([len(s) for s in SEQS], common_prefix(SEQS))
    return packing


def test_common_prefix():
    assert common_prefix(SEQS) == 20
    assert common_prefix([SEQS[0], SEQS[2]]) == 22
    assert common_prefix([SEQS[0], SEQS[3]]) == 26  # identical rows
    assert common_prefix([[1, 2], [3, 2]]) == 0


def assert_near(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Equal to float32's rounding, relative to the values' size: the model is float64, but
    its norms (and eager attention's softmax) round to float32 inside, and a packed row
    sums and normalises over other lengths than a row alone. A real packing bug (a wrong
    position, a row seeing another, a lost gradient term) is an error of order one."""
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()),
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


def alone(model, row: int, hidden: bool = False) -> torch.Tensor:
    """Row `row` run by itself, unpadded: the outputs that predict its reply."""
    seq, r = SEQS[row], REPLY_LENGTHS[row]
    out = model(input_ids=torch.tensor([seq]), output_hidden_states=hidden)
    values = out.hidden_states[-1] if hidden else out.logits
    return values[0, len(seq) - r - 1 : -1]


def test_packed_logits_equal_each_row_alone(model):
    """Catches a wrong position restart, a row seeing another row's tokens, or a window
    index off by one (each changes the logits of some reply position)."""
    width = max(REPLY_LENGTHS)
    with torch.no_grad():
        packed = response_logits(model, SEQS, width, pad_id=1, packing=packing_for(model))
        assert packed.shape == (len(SEQS), width, model.config.vocab_size)
        for row, r in enumerate(REPLY_LENGTHS):
            assert_near(packed[row, width - r :], alone(model, row), f"row {row}")


def test_scoring_forwards_keep_no_kv_cache(model):
    """Nothing decodes after a scoring forward, packed or padded, for logits or hidden
    states. Catches one that built a KV cache only to drop it (and that, under activation
    recomputation, made transformers warn it was turning the cache off)."""
    asked: list[object] = []
    hook = model.register_forward_pre_hook(
        lambda _module, _args, kwargs: asked.append(kwargs.get("use_cache")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            for packing in (packing_for(model), None):
                response_logits(model, SEQS, 6, pad_id=1, packing=packing)
                response_hidden(model, SEQS, 6, pad_id=1, packing=packing)
    finally:
        hook.remove()
    assert asked == [False] * 4


def test_packed_hidden_states_equal_each_row_alone(model):
    width = max(REPLY_LENGTHS)
    with torch.no_grad():
        packed = response_hidden(model, SEQS, width, pad_id=1, packing=packing_for(model))
        for row, r in enumerate(REPLY_LENGTHS):
            assert_near(packed[row, width - r :], alone(model, row, hidden=True), f"row {row}")


def test_packed_gradients_equal_the_rows_alone(model):
    """The shared prefix is computed once: its gradient must gather every row's share
    (a detached or single-row prefix would lose the other rows' terms)."""
    width = max(REPLY_LENGTHS)
    valid = right_aligned_mask(REPLY_LENGTHS, width, torch.device("cpu")).double()
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(len(SEQS), width, model.config.vocab_size, generator=gen).double()

    model.zero_grad(set_to_none=True)
    logits = response_logits(model, SEQS, width, pad_id=1, packing=packing_for(model))
    ((logits.log_softmax(-1) * weights).sum(-1) * valid).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for row, r in enumerate(REPLY_LENGTHS):
        (alone(model, row).log_softmax(-1) * weights[row, width - r :]).sum().backward()
    for name, param in model.named_parameters():
        assert_near(packed[name], param.grad, name)
    model.zero_grad(set_to_none=True)


def test_a_short_row_window_reaches_before_its_start():
    """A row shorter than the window (no shared prefix here) takes padding positions of
    its own: every window index is a real packed position of that row, or the prefix."""
    seqs = [[7, 8, 9, 10, 11, 12], [20, 21]]
    packed = pack(seqs, width=5, prefix=0, device=torch.device("cpu"))
    assert packed.input_ids.tolist() == [[7, 8, 9, 10, 11, 12, 20, 21]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]]
    assert packed.window.tolist() == [0, 1, 2, 3, 4, 6, 6, 6, 6, 6]
    allowed = packed.attention_mask[0, 0]
    assert not allowed[6, :6].any() and allowed[7, 6:].all()  # row 1 sees only itself
    assert allowed[5, :6].all() and not allowed[4, 5]  # causal within row 0


def test_packing_is_chosen_per_model_and_batch(tiny_model_dir):
    """Kernels without 4-D masks and sliding windows keep the plain forward; batches that
    share nothing and are not padded do not pack, since attention over the packed row costs
    more."""
    model = load_model(str(tiny_model_dir))
    assert Packing.for_model(model, enabled=False) is None
    model.config._attn_implementation = "flash_attention_2"  # no 4-D mask; the flag alone
    assert Packing.for_model(model) is None
    model.set_attn_implementation("eager")
    assert Packing.for_model(model).additive_mask
    packing = Packing.for_model(model)
    assert packing.pays([26, 22, 25, 26], prefix=20)
    assert not packing.pays([300, 300], prefix=0)  # no prefix, no padding: only more attention
    assert packing.plan([[1, 2, 3]], 2, torch.device("cpu")) is None  # one row

    sliding = LlamaConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    sliding.sliding_window = 24
    sliding.layer_types = ["sliding_attention", "full_attention"]
    sliding._attn_implementation = "sdpa"
    windowed = Packing.for_model(type("M", (), {"config": sliding})())
    assert windowed.window_limit == 24
    assert windowed.pays([20, 12], prefix=10)  # 22 packed positions fit the window
    assert not windowed.pays([26, 22, 25, 26], prefix=20)  # 39 do not


@pytest.mark.parametrize(
    "algorithm", ["algorithm=sdpo", "algorithm=resd", "algorithm=grpo kl_coef=0.1"]
)
def test_training_with_packed_rows_gives_the_same_update(
    tiny_model_dir, tmp_path, monkeypatch, algorithm
):
    """One update on K = 4 rollouts per prompt (micro-batches of one prompt's group), with
    and without packing: the same losses and gradient norm. Catches packing wired into one
    forward (student, teacher, reference) with another window or width than the loss
    reads. (Weights after the step are not compared: Adam turns a rounding-sized gradient
    on an unused embedding row into a step of the learning rate's size.)"""
    from resd.training.trainer import Trainer
    from test_trainer import config, read_jsonl

    packed_calls = []
    plan = Packing.plan

    def counting_plan(self, *args, **kwargs):
        result = plan(self, *args, **kwargs)
        packed_calls.append(result is not None)
        return result

    monkeypatch.setattr(Packing, "plan", counting_plan)

    def first_update(pack: bool) -> dict[str, float]:
        out = tmp_path / f"pack-{pack}"
        Trainer(config(tiny_model_dir, out, "steps=1", "inner_updates=1", "rollouts_per_prompt=4",
                       "micro_batch_size=4", "batch_size=2", "autocast=none", *algorithm.split(),
                       f"pack_rows={str(pack).lower()}")).train()  # fmt: skip
        return read_jsonl(out / "metrics.jsonl")[0]

    plain = first_update(False)
    assert not packed_calls  # pack_rows=false never plans
    packed = first_update(True)
    assert any(packed_calls)  # the groups did run packed
    assert plain["grad_norm"] > 0
    for key in ("loss", "sd_loss", "pg_loss", "grad_norm", "teacher_advantage"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key


def linear_weights_per_layer(config: LlamaConfig) -> int:
    """The multiply-adds per token of one decoder layer's linear layers: their weights."""
    from transformers import LlamaForCausalLM

    layer = LlamaForCausalLM(config).model.layers[0]
    return sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))


def config_of(**fields) -> object:
    """A model whose config holds exactly `fields` (an older or non-Llama config)."""
    return type("Model", (), {"config": type("Config", (), fields)()})()


def test_the_cost_of_a_token_is_a_layers_linear_weights():
    """`token_cost` counts a layer's linear multiply-adds and `pair_cost` its attention's
    per query-key pair, from the config: grouped key/value heads, a head size that is not
    hidden / heads, the MLP's width; where a config leaves these out, the defaults those
    keys have (key/value heads = heads, head size = hidden / heads, MLP 4 × hidden); and the
    text config of a model that wraps one. Catches a wrong term, which moves the line
    between packing and the plain forward."""
    small = {"num_hidden_layers": 1, "vocab_size": 16, "hidden_size": 32, "num_attention_heads": 4}
    grouped = LlamaConfig(**small, num_key_value_heads=2, head_dim=16, intermediate_size=48)
    grouped._attn_implementation = "sdpa"
    packing = Packing.for_model(type("Model", (), {"config": grouped})())
    assert packing.token_cost == linear_weights_per_layer(grouped) == 10752
    assert packing.pair_cost == 2 * 4 * 16  # scores and weighted values, per head dimension

    wrapped = config_of(_attn_implementation="sdpa", get_text_config=lambda self: grouped)
    assert Packing.for_model(wrapped) == packing  # a vision-language model: its text model

    bare = Packing.for_model(config_of(_attn_implementation="eager", **small))
    default = LlamaConfig(**small, intermediate_size=4 * 32)  # 4 key/value heads, head size 8
    assert bare.token_cost == linear_weights_per_layer(default)
    assert (bare.pair_cost, bare.additive_mask, bare.window_limit) == (2 * 32, True, None)

    assert Packing.for_model(type("NoConfig", (), {})()) is None
    assert Packing.for_model(config_of(_attn_implementation="sdpa", hidden_size=32)) is None
    assert Packing.for_model(config_of(_attn_implementation="sdpa", num_attention_heads=4)) is None


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({"sliding_window": 4096}, 4096),  # Mistral: every layer slides, no switch
        ({"sliding_window": 4096, "use_sliding_window": False}, None),  # Qwen2 off
        ({"sliding_window": 4096, "use_sliding_window": True}, 4096),
        ({"sliding_window": 4096, "layer_types": ["full_attention"] * 2}, None),
        ({"sliding_window": None, "layer_types": ["sliding_attention"]}, 0),  # size unknown
        ({}, None),
    ],
)
def test_sliding_windows_are_found_in_each_config_style(fields, limit):
    """Catches a config style whose sliding layers are missed (a packed row longer than
    the window would see more than the model does) or a full-attention model held back."""
    model = config_of(_attn_implementation="sdpa", hidden_size=32, num_attention_heads=4, **fields)
    packing = Packing.for_model(model)
    assert packing.window_limit == limit
    assert packing.pays([30, 30], prefix=29) == (limit is None or limit >= 31)


def test_packing_pays_by_the_multiply_adds_of_both_forwards():
    """The plain forward computes B rows of the longest length L (B·L·token + B·L²·pair),
    the packed one N positions (N·token + N²·pair); packing must be strictly cheaper, and a
    packed row may be exactly as long as a sliding window. Catches a wrong term or bound."""
    linear_only = Packing(token_cost=1.0, pair_cost=0.0, additive_mask=False, window_limit=None)
    assert linear_only.pays([10, 1], prefix=0)  # 11 positions against 2 × 10 padded
    assert not linear_only.pays([2, 2], prefix=0)  # 4 against 4: nothing gained
    attention_only = Packing(token_cost=0.0, pair_cost=1.0, additive_mask=False, window_limit=None)
    assert not attention_only.pays([10, 10], prefix=0)  # 20² = 400 against 2 × 10² = 200
    assert attention_only.pays([10, 10], prefix=6)  # 14² = 196 against 200
    assert attention_only.pays([10, 9], prefix=6)  # 13² = 169 against 2 × 10² (not 2 × 9²)
    both = Packing(token_cost=10.0, pair_cost=1.0, additive_mask=False, window_limit=None)
    assert both.pays([10, 10, 10], prefix=8)  # 14·10 + 196 = 336 against 300 + 300
    assert not both.pays([10, 10, 10], prefix=5)  # 20·10 + 400 = 600 against 600
    windowed = Packing(token_cost=1.0, pair_cost=0.0, additive_mask=False, window_limit=11)
    assert windowed.pays([10, 1], prefix=0)  # 11 positions: the window's length
    assert not windowed.pays([10, 2], prefix=0)  # 12: past it


def test_a_batch_packs_only_where_it_pays_and_every_row_has_tokens():
    packing = Packing(token_cost=1.0, pair_cost=0.0, additive_mask=False, window_limit=None)
    cpu = torch.device("cpu")
    assert common_prefix([[1, 2, 3], [1, 2]]) == 2  # a row that is another's prefix
    assert common_prefix([[1, 2], [1, 2, 3]]) == 2
    packed = packing.plan([[1, 2, 3, 4], [1, 2, 5]], width=2, device=cpu)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5]] and packed.rows == 2
    assert packing.plan([[1, 2], [3, 4]], width=1, device=cpu) is None  # nothing saved
    assert packing.plan([[], [1, 2, 3]], width=1, device=cpu) is None  # a row without tokens
