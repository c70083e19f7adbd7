"""The self-distillation loss against hand-computed values and against TRL's helpers."""

from __future__ import annotations

import math

import pytest
import torch

from resd.training.losses import (
    TAIL_FLOOR,
    chunked_token_losses,
    loss_chunk_positions,
    masked_token_mean,
    sampled_token_loss,
    self_distillation_loss,
    success_rate_weights,
    support_logprobs,
    tail_logprob,
    token_logprobs,
    topk_distillation_terms,
)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


S = [0.0, 1.0, 2.0, -1.0]
T = [2.0, 1.0, 0.0, 0.5]


def loss(alpha, **kw):
    s = torch.tensor([[S]], dtype=torch.float64)
    t = torch.tensor([[T]], dtype=torch.float64)
    return self_distillation_loss(s, t, alpha=alpha, **kw).item()


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5, 0.25])
def test_full_vocabulary_matches_hand_computation(alpha):
    p, q = softmax(S), softmax(T)
    if alpha == 0.0:
        expected = kl(q, p)  # forward KL(teacher || student)
    elif alpha == 1.0:
        expected = kl(p, q)  # reverse KL(student || teacher)
    else:
        m = [(1 - alpha) * a + alpha * b for a, b in zip(p, q, strict=True)]
        expected = (1 - alpha) * kl(p, m) + alpha * kl(q, m)
    assert loss(alpha, topk=None, min_ratio=None) == pytest.approx(expected, rel=1e-9)


def test_forward_and_reverse_differ():
    assert loss(0.0, topk=None, min_ratio=None) != pytest.approx(
        loss(1.0, topk=None, min_ratio=None)
    )


def test_topk_with_tail_bucket():
    p, q = softmax(S), softmax(T)
    top = sorted(range(4), key=lambda i: -p[i])[:2]  # student's top-2: ids 2, 1
    ps = [p[i] for i in top] + [1 - sum(p[i] for i in top)]
    qs = [q[i] for i in top] + [1 - sum(q[i] for i in top)]
    assert loss(1.0, topk=2, add_tail=True, min_ratio=None) == pytest.approx(kl(ps, qs), rel=1e-9)
    assert loss(0.0, topk=2, add_tail=True, min_ratio=None) == pytest.approx(kl(qs, ps), rel=1e-9)


def test_topk_without_tail_renormalises():
    p, q = softmax(S), softmax(T)
    top = [2, 1]
    ps = [p[i] / sum(p[j] for j in top) for i in top]
    qs = [q[i] / sum(q[j] for j in top) for i in top]
    assert loss(1.0, topk=2, add_tail=False, min_ratio=None) == pytest.approx(kl(ps, qs), rel=1e-9)


def test_min_ratio_floors_teacher_without_renormalising():
    p, q = softmax(S), softmax(T)
    q_clipped = [max(b, 0.2 * a) for a, b in zip(p, q, strict=True)]
    assert q_clipped != q  # the example must actually clip something
    assert loss(1.0, topk=None, min_ratio=0.2) == pytest.approx(kl(p, q_clipped), rel=1e-9)


def test_max_ratio_caps_teacher():
    p, q = softmax(S), softmax(T)
    q_capped = [min(b, 1.5 * a) for a, b in zip(p, q, strict=True)]
    assert q_capped != q
    assert loss(1.0, topk=None, min_ratio=None, max_ratio=1.5) == pytest.approx(
        kl(p, q_capped), rel=1e-9
    )


def test_identical_distributions_give_zero():
    x = torch.randn(2, 5, 50)
    for alpha in (0.0, 0.5, 1.0):
        out = self_distillation_loss(x, x.clone(), alpha=alpha, topk=10)
        assert out.shape == (2, 5)
        assert torch.allclose(out, torch.zeros_like(out), atol=1e-6)


def test_never_nan_when_topk_holds_all_mass():
    s = torch.full((1, 3, 32), -1e4)
    s[..., 0] = 1e4  # the top-1 token holds all the probability
    t = torch.randn(1, 3, 32)
    s.requires_grad_(True)
    for alpha in (0.0, 0.5, 1.0):
        out = self_distillation_loss(s, t, alpha=alpha, topk=1, add_tail=True)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(s.grad).all()
        s.grad = None


def test_tail_is_accurate_where_naive_fp32_cancels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 128, generator=g) * 3, torch.randn(4, 128, generator=g) * 3
    exact = self_distillation_loss(s.double(), t.double(), alpha=0.0, topk=100, min_ratio=None)
    fp32 = self_distillation_loss(s, t, alpha=0.0, topk=100, min_ratio=None)
    torch.testing.assert_close(fp32.double(), exact, atol=1e-5, rtol=1e-5)


def test_minus_inf_logits_stay_finite():
    s = torch.randn(1, 2, 16, requires_grad=True)
    t = torch.randn(1, 2, 16)
    t[..., 8:] = float("-inf")  # a teacher that masks half the vocabulary
    out = self_distillation_loss(s, t, alpha=0.5, topk=4)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()


def test_bf16_inputs_and_gradient_flows_only_to_student():
    s = torch.randn(2, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    out = self_distillation_loss(s, t, alpha=1.0, topk=8)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert s.grad is not None and t.grad is None


def test_success_rate_weights():
    w = success_rate_weights(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert w.mean().item() == pytest.approx(1.0)
    assert w[0] > w[1]  # the rare success is up-weighted
    assert w[0] / w[1] == pytest.approx((1 - 0.25) / 0.25)
    assert torch.equal(success_rate_weights(torch.zeros(4)), torch.ones(4))
    assert torch.equal(success_rate_weights(torch.ones(3)), torch.ones(3))


def test_masked_token_mean():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert masked_token_mean(losses, mask).item() == pytest.approx((2 + 3 + 4) / 3)
    assert masked_token_mean(losses, mask, denominator=9).item() == pytest.approx(1.0)


def test_default_path_topk_tail_and_floor_by_hand():
    """The trainer's defaults: the student's top-2 + tail bucket, the teacher floored at
    0.2 × the student after the tail is appended, not renormalised, reverse KL."""
    p, q = softmax(S), softmax(T)
    top = sorted(range(4), key=lambda i: -p[i])[:2]
    ps = [p[i] for i in top] + [1 - sum(p[i] for i in top)]
    qs = [q[i] for i in top] + [1 - sum(q[i] for i in top)]
    floored = [max(b, 0.2 * a) for a, b in zip(ps, qs, strict=True)]
    assert floored != qs  # the example must actually floor something
    expected = sum(a * math.log(a / b) for a, b in zip(ps, floored, strict=True))
    assert loss(1.0, topk=2, add_tail=True, min_ratio=0.2) == pytest.approx(expected, rel=1e-9)


# ---- TRL as an oracle (test-only dependency) -------------------------------------------
@pytest.fixture
def trl_sdpo():
    """Only the oracle tests need trl; the hand-computed ones above run without it."""
    return pytest.importorskip("trl.experimental.sdpo.loss_utils")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("topk", [1, 5, 100])
def test_topk_matches_trl(trl_sdpo, alpha, add_tail, topk):
    # Moderate logits: where the tail is tiny, TRL's log(1 - sum) loses digits in fp32
    # (see test_tail_is_accurate_where_naive_fp32_cancels) and the oracle is the one off.
    g = torch.Generator().manual_seed(topk * 10 + int(alpha * 10) + add_tail)
    s = torch.randn(3, 7, 128, generator=g)
    t = torch.randn(3, 7, 128, generator=g)
    ours = self_distillation_loss(s, t, alpha=alpha, topk=topk, add_tail=add_tail, min_ratio=None)
    theirs = trl_sdpo.compute_topk_self_distillation_loss(
        s, t, distillation_topk=topk, distillation_alpha=alpha, distillation_add_tail=add_tail
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_full_vocabulary_matches_trl(trl_sdpo, alpha):
    s, t = torch.randn(2, 5, 64) * 2, torch.randn(2, 5, 64) * 2
    ours = self_distillation_loss(s, t, alpha=alpha, topk=None, min_ratio=None)
    theirs = trl_sdpo.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sampled_token_matches_trl(trl_sdpo):
    s, t = torch.randn(2, 6, 40), torch.randn(2, 6, 40)
    ids = torch.randint(0, 40, (2, 6))
    s_tok = torch.log_softmax(s, -1).gather(-1, ids[..., None])[..., 0]
    t_tok = torch.log_softmax(t, -1).gather(-1, ids[..., None])[..., 0]
    theirs = trl_sdpo.compute_sampled_token_self_distillation_loss(
        s, t, ids, distillation_alpha=1.0
    )
    torch.testing.assert_close(sampled_token_loss(s_tok, t_tok), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
def test_loss_from_logits_in_chunks_is_the_whole_batch_loss(chunk):
    """The trainer's full-logits path computes the loss a few positions at a time: the
    per-token loss, both models' token log-probs and the student's gradient are what the
    whole tensor gives, whether or not the chunk divides the length (a misaligned chunk,
    a teacher chunk paired with the wrong student chunk, or a gradient lost at the split
    would each differ here)."""
    g = torch.Generator().manual_seed(chunk)
    s0 = (torch.randn(3, 7, 96, generator=g) * 3).bfloat16()
    t = (s0.float() + torch.randn(3, 7, 96, generator=g)).bfloat16()
    ids = torch.randint(0, 96, (3, 7), generator=g)
    weights = torch.rand(3, 7, generator=g)

    def sd(s_logits, t_logits, _ids, _logp):
        return self_distillation_loss(s_logits, t_logits, alpha=0.5, topk=10)

    whole = s0.clone().requires_grad_(True)
    loss, logp = sd(whole, t, ids, None), token_logprobs(whole, ids)
    ((loss + logp) * weights).sum().backward()
    parts = s0.clone().requires_grad_(True)
    terms = chunked_token_losses(parts, None, ids, chunk_size=chunk, teacher_hidden=t,
                                 token_loss=sd)  # fmt: skip
    ((terms.loss + terms.logp) * weights).sum().backward()
    torch.testing.assert_close(terms.loss, loss)
    torch.testing.assert_close(terms.logp, logp)
    torch.testing.assert_close(terms.teacher_logp, token_logprobs(t, ids))
    torch.testing.assert_close(parts.grad, whole.grad)
    # without a teacher: the student's log-probs alone
    alone = chunked_token_losses(s0, None, ids, chunk_size=chunk)
    assert alone.loss is None and alone.teacher_logp is None
    torch.testing.assert_close(alone.logp, logp.detach())


def test_loss_chunks_are_sized_by_logits_not_positions():
    """Wide vocabularies get few positions per chunk, small ones many; never zero. A CPU
    gets chunks that fit its allocator's free lists, an accelerator 16× bigger ones."""

    def logits(*shape, device="cpu"):  # the shape, without the memory
        return torch.empty(1, 1, 1, device=device).expand(*shape)

    assert loss_chunk_positions(logits(4, 128, 151936)) == 6
    assert loss_chunk_positions(logits(1, 4096, 256)) == 16384
    assert loss_chunk_positions(logits(64, 8, 2**22)) == 1
    assert loss_chunk_positions(logits(4, 128, 151936, device="meta")) == 110


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_topk_terms_are_the_reference_loss_and_its_gradient(alpha, monkeypatch):
    """`topk_distillation_terms` (the trainer's default path) against `self_distillation_loss`
    and `token_logprobs` in float64: loss, both models' token log-probs and the student's
    gradient. Chunks of 2 rows over 15 positions, so a chunk boundary mistake, a gradient
    term left out of the hand-written backward (support, tail, sampled token, the
    normaliser) or a teacher gathered at other ids would each show."""
    from resd.training import losses

    monkeypatch.setattr(losses, "CPU_LOSS_CHUNK_LOGITS", 2 * 50)  # 2 rows of 50 per chunk
    g = torch.Generator().manual_seed(int(alpha * 10))
    s0 = torch.randn(3, 5, 50, generator=g, dtype=torch.float64) * 3
    t = s0 + torch.randn(3, 5, 50, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (3, 5), generator=g)
    ids[0, 0] = s0[0, 0].argmax()  # a sampled token inside the support too
    weights = torch.rand(3, 5, generator=g, dtype=torch.float64)
    kw = {"alpha": alpha, "min_ratio": 0.2, "max_ratio": 5.0}

    ref_s = s0.clone().requires_grad_(True)
    ref_loss = self_distillation_loss(ref_s, t, topk=6, **kw)
    ref_logp = token_logprobs(ref_s, ids)
    ((ref_loss + 0.7 * ref_logp) * weights).sum().backward()
    fused_s = s0.clone().requires_grad_(True)
    terms = topk_distillation_terms(fused_s, t, ids, topk=6, **kw)
    ((terms.loss + 0.7 * terms.logp) * weights).sum().backward()
    torch.testing.assert_close(terms.loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.logp, ref_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.teacher_logp, token_logprobs(t, ids), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_s.grad, ref_s.grad, rtol=1e-10, atol=1e-12)


def test_support_logprobs_gradient_and_its_floor():
    """The hand-written backward passes `gradcheck`, also where the floor clamps most of
    the tail (a peaked row); with −inf logits outside the support the tail is finite and
    so is the gradient, as in `tail_logprob`; bf16 logits give float32 results."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=g, dtype=torch.float64)
    # every token of that row but one just below the floor (distinct: top-k has no ties)
    x[1, 2] = TAIL_FLOOR - 1.0 - 1e-3 * torch.arange(40, dtype=torch.float64)
    x[1, 2, 5] = 0.0
    x.requires_grad_(True)
    ids = torch.randint(0, 40, (2, 3), generator=g)
    support = torch.randint(0, 40, (2, 3, 4), generator=g)

    def own(x):
        terms = support_logprobs(x, ids, topk=5)
        return terms.logp, terms.token_logp

    def given(x):
        terms = support_logprobs(x, ids, support=support)
        return terms.logp, terms.token_logp

    assert torch.autograd.gradcheck(own, (x,))
    assert torch.autograd.gradcheck(given, (x,))
    reference = tail_logprob(torch.log_softmax(x.detach(), -1),
                             torch.zeros_like(x, dtype=torch.bool).scatter_(
                                 -1, support_logprobs(x.detach(), ids, topk=5).support, True))  # fmt: skip
    torch.testing.assert_close(support_logprobs(x.detach(), ids, topk=5).logp[..., -1:], reference)

    masked = torch.randn(1, 2, 16, generator=g)
    masked[..., 8:] = float("-inf")
    masked.requires_grad_(True)
    terms = support_logprobs(masked, torch.tensor([[0, 1]]), topk=4)
    (terms.logp.sum() + terms.token_logp.sum()).backward()
    assert torch.isfinite(terms.logp).all() and torch.isfinite(masked.grad).all()

    half = support_logprobs(
        torch.randn(2, 8, 32).bfloat16(), torch.zeros(2, 8, dtype=torch.long), topk=3
    )
    assert half.logp.dtype == torch.float32 and half.logp.shape == (2, 8, 4)
    assert half.support.shape == (2, 8, 3)
    with pytest.raises(ValueError, match="exactly one of topk and support"):
        support_logprobs(x, ids)
