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
