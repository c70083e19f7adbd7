"""Losses: the self-distillation divergence between student and teacher, and its
batch-level helpers.

Everything here is a pure function of tensors so it can be unit-tested against
hand-computed values and against TRL, and reused by every algorithm configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from resd.envs.base import SUCCESS_REWARD

# Log-probs below this count as this in the tail bucket, so that a vocabulary of −inf
# logits outside the support still gives a finite tail (`tail_logprob`).
TAIL_FLOOR = -1e4


def tail_logprob(logp: torch.Tensor, in_support: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the support, computed without cancellation.

    The obvious log(1 − Σ_topk p) cancels catastrophically in fp32 when the top-k holds
    nearly all the mass (then it is log(0) → −inf, or NaN after rounding past 1). Summing
    the excluded probabilities directly (a logsumexp over the complement) is exact to
    rounding and stays finite; log-probs are floored at −1e4 so that even a vocabulary
    with −inf logits gives a finite tail and finite gradients.
    """
    floored = logp.clamp(min=TAIL_FLOOR)
    return floored.masked_fill(in_support, float("-inf")).logsumexp(dim=-1, keepdim=True)


def _restricted_to_support(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, topk: int | None, add_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Restrict both full-vocabulary distributions to the student's top-k (+ tail)."""
    if topk is None or topk >= student_logp.shape[-1]:
        return student_logp, teacher_logp
    ids = student_logp.detach().topk(topk, dim=-1).indices
    s = student_logp.gather(-1, ids)
    t = teacher_logp.gather(-1, ids)
    if add_tail:
        in_support = torch.zeros_like(student_logp, dtype=torch.bool).scatter_(-1, ids, True)
        s_tail = tail_logprob(student_logp, in_support)
        t_tail = tail_logprob(teacher_logp, in_support)
        return torch.cat([s, s_tail], dim=-1), torch.cat([t, t_tail], dim=-1)
    return s - torch.logsumexp(s, -1, keepdim=True), t - torch.logsumexp(t, -1, keepdim=True)


def _kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last axis, with 0·log0 = 0."""
    p = p_logp.exp()
    return torch.where(p > 0, p * (p_logp - q_logp), torch.zeros_like(p)).sum(-1)


def divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The α-family of the spec: 0 → KL(T‖S), 1 → KL(S‖T), between → generalised JSD."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return _kl(teacher_logp, student_logp)
    if alpha == 1.0:
        return _kl(student_logp, teacher_logp)
    mix = torch.logsumexp(
        torch.stack([student_logp + math.log(1 - alpha), teacher_logp + math.log(alpha)]), dim=0
    )
    return (1 - alpha) * _kl(student_logp, mix) + alpha * _kl(teacher_logp, mix)


def self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 1.0,
    topk: int | None = 100,
    add_tail: bool = True,
    min_ratio: float | None = 0.2,
    max_ratio: float | None = None,
) -> torch.Tensor:
    """Per-token self-distillation loss, shape `[..., T]`, no reduction.

    Both logit tensors are `[..., T, V]` and already aligned: position t holds the
    next-token distribution for response token t. The teacher is treated as a
    constant (its logits are detached). Order of operations follows the released
    code: normalise over the full vocabulary, gather the student's top-k, append the
    tail bucket, clip the teacher's log-probs against the detached student's
    element-wise without renormalising, then take the divergence.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} "
            f"vs {tuple(teacher_logits.shape)}"
        )
    # At least fp32 for the softmax (bf16 logits lose the tail), float64 stays float64.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s_logp = F.log_softmax(student_logits.to(dtype), dim=-1)
    t_logp = F.log_softmax(teacher_logits.detach().to(dtype), dim=-1)
    s, t = _restricted_to_support(s_logp, t_logp, topk, add_tail)
    return support_divergence(s, t, alpha=alpha, min_ratio=min_ratio, max_ratio=max_ratio)


def support_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    alpha: float,
    min_ratio: float | None = None,
    max_ratio: float | None = None,
) -> torch.Tensor:
    """The divergence between two distributions given as log-probs over one support: the
    teacher's clipped against the detached student's, element-wise, without renormalising."""
    if min_ratio is not None:
        teacher = torch.maximum(teacher, student.detach() + math.log(min_ratio))
    if max_ratio is not None:
        teacher = torch.minimum(teacher, student.detach() + math.log(max_ratio))
    return divergence(student, teacher, alpha)


def sampled_token_loss(
    student_logp_tokens: torch.Tensor,
    teacher_logp_tokens: torch.Tensor,
    min_ratio: float | None = None,
) -> torch.Tensor:
    """Policy-gradient form with the teacher's per-token advantage log π_T − log π_θ.

    Cheapest mode: needs only the log-probs of the sampled tokens. Its gradient matches the reverse-KL estimator on the sampled token. The
    teacher floor applies here as in the top-k loss: log π_T ≥ log π_θ + log `min_ratio`,
    so a teacher that rules a token out cannot push its advantage below log `min_ratio`.
    """
    student = student_logp_tokens.detach()
    teacher = teacher_logp_tokens
    if min_ratio is not None:
        teacher = torch.maximum(teacher, student + math.log(min_ratio))
    advantage = (teacher - student).detach()
    return -advantage * student_logp_tokens


def success_rate_weights(
    rewards: torch.Tensor, alpha: float = 1.0, beta: float = 1.0
) -> torch.Tensor:
    """Per-sample weights that up-weight rare successes (optional in RESD; the release
    turns it on for its RESD runs).

    With batch success rate s clamped to [1/B, 1 − 1/B]: successes get (1 − s)^α,
    failures s^β, then the weights are normalised to mean 1. All-fail or all-succeed
    batches get weight 1 everywhere: there is nothing to re-balance.
    """
    success = rewards >= SUCCESS_REWARD
    n = rewards.numel()
    if n == 0 or bool(success.all()) or not bool(success.any()):
        return torch.ones_like(rewards, dtype=torch.float32)
    s = success.float().mean().clamp(1.0 / n, 1.0 - 1.0 / n)
    w = torch.where(success, (1 - s) ** alpha, s**beta).float()
    return w / w.mean()


def aggregate_loss(
    token_loss: torch.Tensor, mask: torch.Tensor, *, mode: str, tokens: int, sequences: int
) -> torch.Tensor:
    """One micro-batch's share of the batch loss; the shares of all micro-batches (and all
    processes) add up to the batch loss, so the result does not depend on how the batch
    is split.

    `token_mean`: Σ loss·mask / `tokens`, the masked tokens of the whole batch, so long
    responses weigh more. `seq_mean_token_mean`: each row's own token mean, summed and
    divided by `sequences`, every sequence of the batch; a row masked out entirely counts
    as zero. This is what the release computes with one sequence per micro-batch.
    """
    if mode == "token_mean":
        return masked_token_mean(token_loss, mask, tokens)
    if mode != "seq_mean_token_mean":
        raise ValueError(f"loss_aggregation: unknown mode {mode!r}")
    per_row = (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_row.sum() / max(sequences, 1)


def masked_token_mean(
    token_loss: torch.Tensor, mask: torch.Tensor, denominator: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Token-mean over unmasked positions; `denominator` lets micro-batches share one."""
    total = (token_loss * mask).sum()
    denom = mask.sum() if denominator is None else denominator
    return total / max(float(denom), 1.0)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_std: bool = True
) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean, optionally over the group std.

    Rollouts come grouped, `group_size` consecutive ones per prompt. A group of one has
    no baseline of its own; then the whole batch is the group (so a mixed objective at
    N = 1 still gets a signal).
    """
    rewards = rewards.float()
    grouped = rewards.view(1, -1) if group_size <= 1 else rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_std and grouped.shape[1] > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def policy_gradient_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token PPO-clipped policy-gradient loss with optional k3 KL to a reference.

    `logp`, `old_logp`, `ref_logp`: `[B, T]` log-probs of the sampled tokens;
    `advantages`: `[B]` or `[B, T]`. Asymmetric clipping (0.2 / 0.28) follows the
    released GRPO settings.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if kl_coef and ref_logp is not None:
        delta = ref_logp - logp
        loss = loss + kl_coef * (torch.exp(delta) - delta - 1)
    return loss


def importance_weight(
    logp: torch.Tensor, old_logp: torch.Tensor, clip: float | None
) -> torch.Tensor:
    """min(π_θ / π_old, clip), detached: the off-policy correction of self-distillation."""
    if clip is None:
        return torch.ones_like(logp)
    return torch.exp((logp - old_logp).detach().clamp(-20, 20)).clamp(max=clip)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log π(token) for the given ids, `[B, T]`, in at least fp32.

    The chosen logit minus the log-normaliser: the same value as gathering from a
    log-softmax, without writing (and keeping for backward) a `[B, T, V]` tensor.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    wide = logits.to(dtype)
    return wide.gather(-1, token_ids[..., None])[..., 0] - torch.logsumexp(wide, dim=-1)


class TokenTerms(NamedTuple):
    """Per-token quantities of one micro-batch, `[B, T]` each."""

    loss: torch.Tensor | None  # the distillation loss (None without a teacher)
    logp: torch.Tensor  # the student's log-prob of each response token (with grad)
    teacher_logp: torch.Tensor | None  # the teacher's, on the same tokens (no grad)


def chunked_token_losses(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module | None,
    token_ids: torch.Tensor,
    *,
    chunk_size: int,
    teacher_hidden: torch.Tensor | list[torch.Tensor] | None = None,
    teacher_head: torch.nn.Module | None = None,
    token_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    | None = None,
    softcap: float | None = None,
    teacher_mix: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
) -> TokenTerms:
    """Per-token distillation loss and sampled-token log-probs, `chunk_size` positions at a time.

    The naive path materialises `[B, T, V]` logits for student and teacher and then
    several fp32 copies of them (log-softmax, top-k masks, the tail's logsumexp); for a
    150k vocabulary at 32 × 1024 tokens that is tens of GiB. Here each chunk of positions
    is computed inside activation checkpointing, so those copies exist for one chunk at a
    time, in the forward pass and again in the backward pass. Two uses:

    - hidden states and the output head (`student_head` given): the logits themselves
      exist for one chunk at a time, at the price of the head's matmul again in backward;
    - logits already computed (`student_head=None`; `teacher_hidden` is then the
      teacher's logits): only the loss's fp32 copies are chunked. On a CPU that is
      faster as well as leaner: a chunk's temporaries are reused from the allocator's
      free lists, where whole-batch ones are fresh pages every time
      (`docs/benchmarks.md`, "The loss in chunks").

    `token_loss(student_logits, teacher_logits, token_ids, student_token_logp)` gives the
    per-token loss of one chunk; it is only called when teacher states are given. Every
    position is computed independently, so the result is the unchunked one.

    `teacher_hidden` may be a list of several models' states (the trust-region teacher's
    base and current model, `Teacher.outputs`): each chunk's are turned into logits
    apart and joined by `teacher_mix` (`Teacher.mix`).
    """
    from torch.utils.checkpoint import checkpoint

    def head(module: torch.nn.Module | None, h: torch.Tensor) -> torch.Tensor:
        if module is None:  # already logits
            return h
        logits = module(h)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def chunk_fn(s_h: torch.Tensor, ids: torch.Tensor, *t_hs: torch.Tensor):
        s_logits = head(student_head, s_h)
        logp = token_logprobs(s_logits, ids)
        if not t_hs or token_loss is None:
            return logp, logp.new_zeros(()), logp.new_zeros(())
        with torch.no_grad():
            t_logits = [head(teacher_head or student_head, t_h) for t_h in t_hs]
            t_logits = teacher_mix(t_logits) if teacher_mix else t_logits[0]
            t_logp = token_logprobs(t_logits, ids)
        return logp, token_loss(s_logits, t_logits, ids, logp), t_logp

    # `split`, not slicing in a loop: the chunks' gradients are joined by one concatenation
    # in backward, instead of each being scattered into a zero tensor of the whole input.
    s_parts = student_hidden.split(chunk_size, dim=1)
    id_parts = token_ids.split(chunk_size, dim=1)
    sources = [teacher_hidden] if isinstance(teacher_hidden, torch.Tensor) else teacher_hidden or []
    t_parts = [()] * len(s_parts)  # per chunk, each source's part of it
    if sources:
        t_parts = list(zip(*(h.split(chunk_size, dim=1) for h in sources), strict=True))
    logps, losses, t_logps = [], [], []
    for s_h, ids, t_hs in zip(s_parts, id_parts, t_parts, strict=True):
        logp, loss, t_logp = checkpoint(chunk_fn, s_h, ids, *t_hs, use_reentrant=False)
        logps.append(logp)
        losses.append(loss)
        t_logps.append(t_logp)
    logp = torch.cat(logps, dim=1)
    if teacher_hidden is None or token_loss is None:
        return TokenTerms(None, logp, None)
    return TokenTerms(torch.cat(losses, dim=1), logp, torch.cat(t_logps, dim=1))


# Logits per chunk when the loss is computed from whole-batch logits. On a CPU about 27
# rows of a 152k vocabulary, whose fp32 copies (16 MiB each) stay under glibc's largest
# mmap threshold (32 MiB), so they are recycled rather than faulted in afresh. On an
# accelerator the caching allocator recycles memory anyway, and fewer, bigger chunks
# mean fewer kernel launches: 256 MiB per fp32 copy.
CPU_LOSS_CHUNK_LOGITS = 2**22
ACCELERATOR_LOSS_CHUNK_LOGITS = 2**26


def chunk_logits(device: torch.device) -> int:
    """How many logits the loss handles at once on `device`."""
    return CPU_LOSS_CHUNK_LOGITS if device.type == "cpu" else ACCELERATOR_LOSS_CHUNK_LOGITS


def loss_chunk_positions(logits: torch.Tensor) -> int:
    """Positions per chunk for `chunked_token_losses` on `[B, T, V]` logits."""
    rows, vocab = logits.shape[0], logits.shape[-1]
    return max(1, chunk_logits(logits.device) // (rows * vocab))


class SupportTerms(NamedTuple):
    """What the top-k loss reads of one model's logits, `[..., k + 1]` and `[...]`."""

    logp: torch.Tensor  # log-probs of the support's k tokens, then of the tail bucket
    token_logp: torch.Tensor  # log-prob of each sampled token
    support: torch.Tensor  # the support's token ids, `[..., k]`


class _SupportLogprobs(torch.autograd.Function):
    """`support_logprobs` with a backward written out, `rows` rows of logits at a time.

    Forward keeps nothing of vocabulary size but the logits it was given; backward
    recomputes each chunk's log-softmax from them. With q the tail's share of each token
    outside the support (zero where the floor clamps), the gradient of the outputs
    (support log-probs g_s, tail g_t, sampled token g_y) with respect to the logits is
    dlogp − softmax · Σ dlogp, where dlogp = g_t·q, plus g_s at the support and g_y at
    the sampled token.
    """

    @staticmethod
    def forward(ctx, logits, tokens, support, topk, rows):
        n = logits.shape[0]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        k = topk if support is None else support.shape[-1]
        out = torch.empty(n, k + 1, dtype=dtype, device=logits.device)
        token_logp = torch.empty(n, dtype=dtype, device=logits.device)
        ids = torch.empty(n, k, dtype=torch.long, device=logits.device)
        for start in range(0, n, rows):
            r = slice(start, start + rows)
            logp = torch.log_softmax(logits[r].to(dtype), dim=-1)
            token_logp[r] = logp.gather(-1, tokens[r, None])[:, 0]
            ids[r] = logp.topk(k, dim=-1).indices if support is None else support[r]
            out[r, :k] = logp.gather(-1, ids[r])
            floored = logp.clamp_(min=TAIL_FLOOR).scatter_(-1, ids[r], float("-inf"))
            out[r, k] = floored.logsumexp(dim=-1)
        ctx.save_for_backward(logits, tokens, ids, out[:, k])
        ctx.rows = rows
        ctx.mark_non_differentiable(ids)
        return out, token_logp, ids

    @staticmethod
    def backward(ctx, grad_out, grad_token, _grad_ids):
        logits, tokens, ids, tail = ctx.saved_tensors
        dtype = torch.promote_types(logits.dtype, torch.float32)
        k = ids.shape[-1]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.rows):
            r = slice(start, start + ctx.rows)
            logp = torch.log_softmax(logits[r].to(dtype), dim=-1)
            share = torch.where(logp >= TAIL_FLOOR, (logp - tail[r, None]).exp(), 0.0)
            dlogp = share.scatter_(-1, ids[r], 0.0).mul_(grad_out[r, k, None])
            dlogp.scatter_add_(-1, ids[r], grad_out[r, :k])
            dlogp.scatter_add_(-1, tokens[r, None], grad_token[r, None])
            total = dlogp.sum(dim=-1, keepdim=True)
            grad[r] = dlogp.sub_(logp.exp_().mul_(total))
        return grad, None, None, None, None


def support_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    topk: int | None = None,
    support: torch.Tensor | None = None,
) -> SupportTerms:
    """Log-probs over a support of k tokens plus the tail bucket, and of the sampled tokens.

    The support is `support` (the student's ids, for the teacher) or else these logits'
    own top `topk`. The same values as `self_distillation_loss`'s first half and
    `token_logprobs` (normalise in at least fp32, gather, tail = floored logsumexp outside
    the support), computed a chunk of rows at a time with a hand-written backward:
    autograd through those steps keeps several fp32 tensors of vocabulary size per
    position, and on a CPU its passes over them cost more than the model's head.
    """
    if (topk is None) == (support is None):
        raise ValueError("support_logprobs: give exactly one of topk and support")
    if topk is not None:  # k ≥ V: the whole vocabulary, as the top V − 1 and a tail of one
        topk = min(topk, logits.shape[-1] - 1)  # (an empty tail's gradient is 0·∞)
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    rows = max(1, chunk_logits(logits.device) // logits.shape[-1])
    out, token_logp, ids = _SupportLogprobs.apply(
        flat, token_ids.reshape(-1),
        None if support is None else support.reshape(-1, support.shape[-1]), topk, rows,
    )  # fmt: skip
    return SupportTerms(out.view(*shape, -1), token_logp.view(shape), ids.view(*shape, -1))


def topk_distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    topk: int,
    alpha: float,
    min_ratio: float | None = None,
    max_ratio: float | None = None,
) -> TokenTerms:
    """`self_distillation_loss` with the tail bucket (the default objective) and both
    models' log-probs of the sampled tokens, from whole-batch logits by `support_logprobs`:
    the same values, 3× faster than autograd through the reference steps on a CPU
    (`docs/benchmarks.md`, "The loss in chunks")."""
    s = support_logprobs(student_logits, token_ids, topk=topk)
    with torch.no_grad():
        t = support_logprobs(teacher_logits.detach(), token_ids, support=s.support)
    loss = support_divergence(s.logp, t.logp, alpha=alpha, min_ratio=min_ratio, max_ratio=max_ratio)
    return TokenTerms(loss, s.token_logp, t.token_logp)
