"""The self-distillation loss against hand-computed values and against TRL's helpers."""

from __future__ import annotations

import math

import pytest
import torch

from resd.envs.base import Score
from resd.training.losses import (
    TAIL_FLOOR,
    aggregate_loss,
    chunked_token_losses,
    group_advantages,
    importance_weight,
    loss_chunk_positions,
    masked_token_mean,
    policy_gradient_loss,
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


def test_alpha_outside_the_unit_interval_is_rejected():
    """α mixes the two distributions; outside [0, 1] the JSD's mixture is not a distribution
    (log(1 − α) of a negative number) and must be refused, not computed as NaN."""
    s = torch.tensor([[S]], dtype=torch.float64)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            self_distillation_loss(s, s.clone(), alpha=alpha, topk=None)


def test_a_token_ruled_out_adds_zero_not_nan():
    """0·log 0 = 0: a token with probability 0 under the distribution the KL is taken over
    (the teacher in forward KL, the student in reverse KL) adds nothing, not NaN."""
    ruled_out = [2.0, 1.0, float("-inf"), 0.5]
    p, q = softmax(S), softmax(ruled_out)
    s = torch.tensor([[S]], dtype=torch.float64)
    t = torch.tensor([[ruled_out]], dtype=torch.float64)
    forward = self_distillation_loss(s, t, alpha=0.0, topk=None, min_ratio=None).item()
    reverse = self_distillation_loss(t, s, alpha=1.0, topk=None, min_ratio=None).item()
    assert forward == pytest.approx(kl(q, p), rel=1e-9)
    assert reverse == pytest.approx(kl(q, p), rel=1e-9)


def test_defaults_are_reverse_kl_on_the_top_100_with_tail_and_floor():
    """The documented defaults: α = 1, the student's top 100 + tail, teacher floored at
    0.2 × the student, no ceiling (a vocabulary wider than 100 so top-k matters)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 150, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 150, generator=g, dtype=torch.float64) * 2
    explicit = self_distillation_loss(
        s, t, alpha=1.0, topk=100, add_tail=True, min_ratio=0.2, max_ratio=None
    )
    assert torch.equal(self_distillation_loss(s, t), explicit)
    assert not torch.allclose(explicit, self_distillation_loss(s, t, topk=101))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize(("min_ratio", "max_ratio"), [(0.2, None), (None, 1.5)])
def test_clipped_teacher_is_a_constant_in_the_gradient(alpha, min_ratio, max_ratio):
    """The clip bounds the teacher by the *detached* student: its gradient is that of the
    divergence from a fixed, hand-clipped teacher; no gradient flows through the bound."""
    p, q = softmax(S), softmax(T)
    lo, hi = min_ratio or 0.0, max_ratio or math.inf
    clipped = torch.tensor(
        [min(max(b, lo * a), hi * a) for a, b in zip(p, q, strict=True)], dtype=torch.float64
    )
    assert not torch.allclose(clipped, torch.tensor(q, dtype=torch.float64))

    ours = torch.tensor([[S]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[T]], dtype=torch.float64)
    loss = self_distillation_loss(
        ours, t, alpha=alpha, topk=None, min_ratio=min_ratio, max_ratio=max_ratio
    )
    loss.sum().backward()
    ref = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(ref, -1)
    if alpha == 1.0:  # KL(student ‖ fixed teacher)
        (logp.exp() * (logp - clipped.log())).sum().backward()
    else:  # KL(fixed teacher ‖ student)
        (clipped * (clipped.log() - logp)).sum().backward()
    torch.testing.assert_close(ours.grad[0, 0], ref.grad, rtol=1e-10, atol=1e-12)


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


def test_sampled_token_gradient_is_minus_the_floored_advantage():
    """The policy-gradient form: d loss / d log π_θ = −(log π_T − log π_θ) with the teacher
    floored at log π_θ + log 0.2, both treated as constants: no gradient to the teacher."""
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-5.0, -1.0]], requires_grad=True)
    sampled_token_loss(student, teacher, min_ratio=0.2).sum().backward()
    floored = -1.0 + math.log(0.2)  # -5 is below the floor of the first token
    assert student.grad.tolist()[0] == pytest.approx([-(floored + 1.0), -(-1.0 + 2.0)])
    assert teacher.grad is None


def test_success_rate_weights_by_hand_for_other_rates_and_exponents():
    """s = 3/4: successes (1 − s) = 1/4, failures s = 3/4, mean 3/8; α = 2, β = 1/2 at
    s = 1/4: successes (3/4)² = 9/16, failures (1/4)^½ = 1/2, mean 33/64. A partial reward
    below 0.5 is a failure; an empty batch gives no weights."""
    w = success_rate_weights(torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])
    w = success_rate_weights(torch.tensor([1.0, 0.0, 0.0, 0.0]), alpha=2.0, beta=0.5)
    assert w.tolist() == pytest.approx([(9 / 16) / (33 / 64)] + [(1 / 2) / (33 / 64)] * 3)
    w = success_rate_weights(torch.tensor([1.0, 0.2, 0.0, 0.0]))
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3])
    assert success_rate_weights(torch.zeros(0)).shape == (0,)
    # all failed: weight 1 whatever the exponent (here s^β underflows to 0: no 0 / 0)
    assert torch.equal(success_rate_weights(torch.zeros(5), beta=80.0), torch.ones(5))


def test_masked_token_mean():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert masked_token_mean(losses, mask).item() == pytest.approx((2 + 3 + 4) / 3)
    assert masked_token_mean(losses, mask, denominator=9).item() == pytest.approx(1.0)


def test_means_of_one_token_one_sequence_and_nothing():
    """One unmasked token: its own loss; one sequence: its token mean; nothing unmasked, or
    no sequences at all: zero, not NaN or a division by zero."""
    losses = torch.tensor([[5.0, 7.0, 3.0]])
    assert masked_token_mean(losses, torch.tensor([[0.0, 1.0, 0.0]])).item() == 7.0
    assert masked_token_mean(losses, torch.zeros(1, 3)).item() == 0.0
    one = aggregate_loss(
        losses, torch.ones(1, 3), mode="seq_mean_token_mean", tokens=3, sequences=1
    )
    assert one.item() == pytest.approx(5.0)
    empty = torch.zeros(0, 3)
    none = aggregate_loss(empty, empty, mode="seq_mean_token_mean", tokens=0, sequences=0)
    assert none.item() == 0.0


def test_group_advantages_by_hand():
    """Reward minus its group's mean over the group's (unbiased) std + 1e-4. Groups are
    `group_size` consecutive rollouts; a group size of 1 makes the batch one group; a lone
    rollout has no spread to scale by (0, not NaN); integer rewards work too."""
    std = 0.5 + 1e-4  # std of {1, 0, 0, 0} and of {1, 1, 0, 1}
    adv = group_advantages(torch.tensor([1, 0, 0, 0, 1, 1, 0, 1]), 4)
    centred = [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25]
    assert adv.tolist() == pytest.approx([c / std for c in centred])
    pair = math.sqrt(0.5) + 1e-4  # std of {1, 0}
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2).tolist() == pytest.approx(
        [0.5 / pair, -0.5 / pair, 0.0, 0.0]
    )
    assert group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 1).tolist() == pytest.approx(
        [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]
    )
    unscaled = group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, scale_std=False)
    assert unscaled.tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert group_advantages(torch.tensor([1.0]), 1).tolist() == [0.0]
    assert group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [0.0] * 4


def test_policy_gradient_clips_the_ratio_asymmetrically_by_hand():
    """PPO: −min(r·A, clip(r, 1 − 0.2, 1 + 0.28)·A). r = 2 with A = 1 is capped at 1.28;
    r = 1/2 with A = −1 is held at 0.8; r = 2 with A = −1 is not clipped (the min keeps
    the larger penalty). A KL coefficient without a reference adds nothing."""
    logp = torch.tensor([[math.log(2.0), math.log(0.5), math.log(2.0)]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    assert policy_gradient_loss(logp, old, adv).tolist()[0] == pytest.approx([-1.28, 0.8, 2.0])
    no_ref = policy_gradient_loss(logp, old, adv, kl_coef=0.1)
    assert no_ref.tolist()[0] == pytest.approx([-1.28, 0.8, 2.0])
    no_coef = policy_gradient_loss(logp, old, adv, ref_logp=old)  # kl_coef defaults to 0
    assert no_coef.tolist()[0] == pytest.approx([-1.28, 0.8, 2.0])


def test_importance_weight_is_a_detached_capped_ratio():
    """min(π_θ / π_old, cap) multiplies the loss as a constant: no gradient flows through it."""
    logp = torch.tensor([[math.log(0.5), math.log(4.0)]], requires_grad=True)
    weight = importance_weight(logp, torch.zeros(1, 2), 2.0)
    assert weight.tolist()[0] == pytest.approx([0.5, 2.0])
    assert not weight.requires_grad


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


def test_loss_from_hidden_states_applies_the_head_and_its_softcap():
    """From hidden states, each model's logits are its head's output, soft-capped as
    c·tanh(logits / c) when the model asks for it (Gemma); the teacher uses its own head if
    it has one, else the student's. A teacher is needed for a loss, a loss function alone
    gives only the student's log-probs."""
    g = torch.Generator().manual_seed(0)
    student_head, teacher_head = (torch.nn.Linear(8, 20, bias=False).double() for _ in "st")
    with torch.no_grad():
        for head in (student_head, teacher_head):
            head.weight.copy_(torch.randn(20, 8, generator=g, dtype=torch.float64) * 5)
    s_h, t_h = (torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in "st")
    ids = torch.randint(0, 20, (2, 5), generator=g)

    def sd(s_logits, t_logits, _ids, _logp):
        return self_distillation_loss(s_logits, t_logits, alpha=1.0, topk=None, min_ratio=None)

    def picked(logits):  # log-softmax, then the sampled token's entry
        return torch.log_softmax(logits, -1).gather(-1, ids[..., None])[..., 0]

    with torch.no_grad():
        for cap, t_head in [(None, None), (3.0, None), (3.0, teacher_head)]:
            s_logits, t_logits = student_head(s_h), (t_head or student_head)(t_h)
            if cap:
                s_logits, t_logits = (
                    cap * torch.tanh(s_logits / cap),
                    cap * torch.tanh(t_logits / cap),
                )
            terms = chunked_token_losses(
                s_h,
                student_head,
                ids,
                chunk_size=2,
                teacher_hidden=t_h,
                teacher_head=t_head,
                token_loss=sd,
                softcap=cap,
            )
            torch.testing.assert_close(terms.logp, picked(s_logits))
            torch.testing.assert_close(terms.teacher_logp, picked(t_logits))
            torch.testing.assert_close(terms.loss, sd(s_logits, t_logits, ids, None))
        alone = chunked_token_losses(s_h, student_head, ids, chunk_size=2, token_loss=sd)
    assert alone.loss is None and alone.teacher_logp is None
    torch.testing.assert_close(alone.logp, picked(student_head(s_h)).detach())
    # the head's gradient arrives even when the hidden states carry none (a frozen body)
    chunked_token_losses(s_h, student_head, ids, chunk_size=2).logp.sum().backward()
    chunked_grad, student_head.weight.grad = student_head.weight.grad, None
    picked(student_head(s_h)).sum().backward()
    torch.testing.assert_close(chunked_grad, student_head.weight.grad)


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


def test_fused_terms_with_more_positions_than_vocabulary(monkeypatch):
    """The hand-written backward walks over positions (rows), not over the vocabulary: with
    more positions than tokens every row still gets its gradient; a chunk budget smaller
    than one row of logits still means one row per chunk, not zero."""
    from resd.training import losses

    monkeypatch.setattr(losses, "CPU_LOSS_CHUNK_LOGITS", 5)  # less than one row of 12
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(4, 10, 12, generator=g, dtype=torch.float64) * 2
    t = s0 + torch.randn(4, 10, 12, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 12, (4, 10), generator=g)
    ref_s = s0.clone().requires_grad_(True)
    ref_loss = self_distillation_loss(ref_s, t, alpha=0.5, topk=3)
    (ref_loss + token_logprobs(ref_s, ids)).sum().backward()
    fused_s = s0.clone().requires_grad_(True)
    terms = topk_distillation_terms(fused_s, t, ids, topk=3, alpha=0.5, min_ratio=0.2)
    (terms.loss + terms.logp).sum().backward()
    torch.testing.assert_close(terms.loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_s.grad, ref_s.grad, rtol=1e-10, atol=1e-12)


def test_fused_terms_with_topk_as_wide_as_the_vocabulary_are_the_full_loss():
    """`topk` ≥ the vocabulary means every token, as in `self_distillation_loss`. The fused
    path gave the right loss at k = V but a NaN gradient (its tail bucket was empty: 0·∞ in
    the backward), and an index error for k > V."""
    g = torch.Generator().manual_seed(2)
    s0 = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    t = s0 + torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (2, 4), generator=g)
    ref_s = s0.clone().requires_grad_(True)
    self_distillation_loss(ref_s, t, alpha=0.5, topk=None, min_ratio=0.2).sum().backward()
    for k in (9, 12):
        fused_s = s0.clone().requires_grad_(True)
        terms = topk_distillation_terms(fused_s, t, ids, topk=k, alpha=0.5, min_ratio=0.2)
        terms.loss.sum().backward()
        ref = self_distillation_loss(s0, t, alpha=0.5, topk=None, min_ratio=0.2)
        torch.testing.assert_close(terms.loss, ref, rtol=1e-12, atol=1e-12)
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


def test_a_reward_of_one_half_is_a_success_for_the_weights_as_everywhere_else() -> None:
    """Bug: success weighting counted a success as reward > 0.5 while the rollout, the
    solution buffer and the teacher's context used >= 0.5, so a reply rewarded exactly 0.5
    (a served reply's feedback, a user scorer's number) was a success that the weights
    down-weighted as a failure."""
    assert Score(0.5, 0.5, "").success and not Score(0.49, 0.5, "").success
    weights = success_rate_weights(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    # s = 1/4: the success gets (1 - s) = 3/4, each failure s = 1/4; mean 3/8 -> 2 and 2/3
    torch.testing.assert_close(weights, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))
