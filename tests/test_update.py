"""The update half of a step and the teachers, against numbers computed by hand.

The policy here is a bigram table: log π(y_t | y_<t) = log_softmax(table[y_{t-1}])[y_t],
so every log-prob, loss, metric and gradient the step produces can be written out
from the equations of docs/resd-method.md without running the code under test. Each
step takes milliseconds. (One test uses a tiny random Gemma 2 instead: its output layer
soft-caps the logits, which a bigram table has no way to show.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from resd.config import load_config
from resd.envs.base import Item, Score
from resd.generation.base import Generation
from resd.parallel.base import Parallel
from resd.training.rollout import Outcome, PhaseTimer, Rollout
from resd.training.teacher import Teacher
from resd.training.update import Update

VOCAB = 5


class Bigram(nn.Module):
    """A causal LM whose next-token logits depend only on the current token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.head = nn.Identity()  # stands in for the output layer `Teacher.head` returns
        self.forwards = 0

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool = True,  # as a transformers model takes it; it has no cache
    ) -> SimpleNamespace:
        self.forwards += 1
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def tables() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, VOCAB, generator=g), torch.randn(VOCAB, VOCAB, generator=g)


def logps(table: torch.Tensor, context: list[int], reply: list[int]) -> torch.Tensor:
    """log π of each reply token after `context`, by hand."""
    seq = context + reply
    prev = torch.tensor(seq[len(context) - 1 : -1])
    return torch.log_softmax(table[prev], -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]


def rollout(
    index: int,
    prompt: list[int],
    reply: list[int],
    *,
    teacher_ids: list[int],
    distill: bool,
    logprobs: list[float] | None = None,
) -> Rollout:
    return Rollout(
        item=Item(id=f"item-{index}", messages=[]), prompt_ids=prompt,
        gen=Generation(reply, "", True, logprobs=logprobs), score=Score(0.0, 0.0, ""),
        index=index, teacher_ids=teacher_ids, distill=distill,
    )  # fmt: skip


# Two distilled rows whose teacher sees context token 4, one row outside the distillation.
Row = tuple[list[int], list[int], list[int], bool]  # prompt, reply, teacher context, distill
ROWS: list[Row] = [([1], [2, 3], [4], True), ([1], [3], [4], True), ([2], [1, 4, 2], [2], False)]


def rollouts(logprobs: dict[int, list[float]] | None = None) -> list[Rollout]:
    return [
        rollout(i, p, y, teacher_ids=t, distill=d, logprobs=(logprobs or {}).get(i))
        for i, (p, y, t, d) in enumerate(ROWS)
    ]


def make_update(
    *overrides: str,
    lam: float,
    lr: float = 0.0,
    teacher_kind: str = "base",
    after_step: Callable[[], None] = lambda: None,
    parallel: Parallel | None = None,
    with_reference: bool = False,
) -> tuple[Update, Bigram, Teacher]:
    student_table, teacher_table = tables()
    student = Bigram(student_table)
    teacher = Teacher(student, teacher_kind)
    if teacher.copy is not None:
        with torch.no_grad():
            teacher.copy.table.copy_(teacher_table)
    cfg = load_config(None, [
        "warmup_steps=0", "max_grad_norm=0", "distillation_mode=sampled", "min_ratio=null",
        "rollout_is_cap=null", "pack_rows=false", "autocast=none", "rollouts_per_prompt=3",
        "pg_scale_std=false", "micro_batch_size=2", f"lr={lr}", *overrides,
    ])  # fmt: skip
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    reference = Teacher(student, "base") if with_reference else None
    if reference is not None:  # the reference holds the teacher's table
        with torch.no_grad():
            reference.copy.table.copy_(teacher_table)
    update = Update(cfg, student, optimizer, teacher, reference, parallel or Parallel(), 0, lam,
                    after_step=after_step, total_steps=4)  # fmt: skip
    return update, student, teacher


def full_sd_loss(model: torch.nn.Module, teacher: Teacher, chunk: str) -> float:
    """One zero-rate step of full-vocabulary distillation of a real (tiny) model on
    `rollouts()`, with `loss_chunk_size` = `chunk` ("null": the model's own logits)."""
    cfg = load_config(None, [
        "warmup_steps=0", "max_grad_norm=0", "distillation_mode=full", "alpha=1.0",
        "pack_rows=false", "autocast=none", "rollouts_per_prompt=3", "micro_batch_size=2",
        "lr=0", f"loss_chunk_size={chunk}",
    ])  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    update = Update(cfg, model, optimizer, teacher, None, Parallel(), 0, 1.0,
                    after_step=lambda: None, total_steps=4)  # fmt: skip
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    return update(rollouts(), outcomes, PhaseTimer(), step=1)["sd_loss"]


def sd_terms(
    student_table: torch.Tensor, teacher_table: torch.Tensor, rows: list[Row] = ROWS
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per distilled row: (student log-probs, teacher log-probs) of its reply tokens."""
    return [(logps(student_table, p, y), logps(teacher_table, t, y)) for p, y, t, d in rows if d]


def sampled_losses(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sampled-mode token loss: −(log π_T − log π_θ)·log π_θ, the advantage held fixed."""
    return -(t - s).detach() * s


@pytest.mark.parametrize("size", [2, 3])
def test_mixed_step_loss_gradient_and_metrics_by_hand(size: int) -> None:
    """(1 − λ)·PG + λ·SD at λ = 0.25, token means over the whole batch split in two
    micro-batches, or in one where only the row mask keeps the undistilled third row out
    of the SD loss. Catches a swapped λ (at λ = 0.5 it would not show), a PG share
    divided by the SD token count, a dropped distill flag or row mask (or the mask
    divided by it), a token loss not scaled by the global denominators, the teacher's
    advantage of the wrong sign or over the wrong tokens, token losses logged from the
    wrong slice of the window, advantages taken from the score instead of the reward, and
    a teacher forward for a micro-batch with nothing to distil or an old-log-prob forward
    at a single pass."""
    lam = 0.25
    update, student, teacher = make_update(f"micro_batch_size={size}", lam=lam)
    rows = rollouts()
    scores = [0.5, 0.9, 0.0]  # partial credit: `pg_reward=reward` must not use it
    rewards = [0.0, 1.0, 0.0]
    outcomes = [Outcome(f"item-{i}", rewards[i], scores[i]) for i in range(3)]
    out = update(rows, outcomes, PhaseTimer(), step=1)

    student_table, teacher_table = tables()
    table = student_table.clone().requires_grad_(True)
    terms = sd_terms(table, teacher_table)
    sd = sum(sampled_losses(s, t).sum() for s, t in terms) / 3  # 3 distilled tokens
    advantages = [-1 / 3, 2 / 3, -1 / 3]  # reward − group mean (no std scaling)
    # ratio π_θ/π_old = 1 at the first pass: each token's PG loss is −A·ratio, whose value
    # is −A and whose gradient is −A·∇log π
    pg_logps = [logps(table, p, y) for p, y, _, _ in ROWS]
    pg = (
        sum(
            -a * torch.exp(lp - lp.detach()).sum()
            for a, lp in zip(advantages, pg_logps, strict=True)
        )
        / 6
    )
    expected = (1 - lam) * pg + lam * sd
    expected.backward()

    assert out["sd_loss"] == pytest.approx(sd.item(), rel=1e-5)
    assert out["pg_loss"] == pytest.approx(pg.item(), rel=1e-5)
    assert out["pg_loss"] == pytest.approx(-(-2 / 3 + 2 / 3 - 1) / 6, rel=1e-5)  # 1/6
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["tokens"] == 3
    torch.testing.assert_close(student.table.grad, table.grad, rtol=1e-5, atol=1e-7)
    assert out["grad_norm"] == pytest.approx(float(table.grad.norm()), rel=1e-5)
    advantage = sum((t - s).sum().item() for s, t in terms) / 3
    assert out["teacher_advantage"] == pytest.approx(advantage, rel=1e-5)
    for row, (s, t) in zip(rows, terms, strict=False):  # the distilled rows come first
        assert row.token_losses == pytest.approx(sampled_losses(s, t).tolist(), rel=1e-5)
    assert rows[2].token_losses == []
    assert teacher.copy.forwards == 1  # at size 2 the second micro-batch distils nothing
    assert student.forwards == 4 - size  # one per micro-batch: no old log-probs at one pass


@pytest.mark.parametrize("size", [1, 2])
def test_sequence_mean_divides_by_every_rollout_of_the_batch(size: int) -> None:
    """seq_mean_token_mean: each distilled row's own token mean, summed and divided by all
    3 rollouts (the undistilled one counts as zero) at any micro-batch size. Catches a
    divisor of the micro-batch's rows or of the distilled rows only."""
    update, _, _ = make_update(
        "loss_aggregation=seq_mean_token_mean", f"micro_batch_size={size}", lam=1.0
    )
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    student_table, teacher_table = tables()
    terms = sd_terms(student_table, teacher_table)
    expected = sum(sampled_losses(s, t).mean() for s, t in terms) / 3
    assert out["sd_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_rollout_correction_and_the_logprob_gap_by_hand() -> None:
    """The sampler's log-probs (row 0 only; row 1 gave none, so weight 1) weigh each
    distilled token by min(π_θ / π_sampler, cap) and give the logged gap
    mean |log π_θ − log π_sampler| over the tokens that have one. Catches a gap of the
    wrong sign, summed without its absolute value, averaged over the wrong tokens, and a
    correction dropped, inverted or applied where the sampler gave nothing, in either
    loss."""
    student_table, teacher_table = tables()
    s0 = logps(student_table, [1], [2, 3])
    sampler = [float(s0[0]) - 0.5, float(s0[1]) + 0.25]  # ratios e^0.5 → capped at 1.5, e^-0.25
    update, _, _ = make_update("rollout_is_cap=1.5", lam=0.5)
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    out = update(rollouts({0: sampler}), outcomes, PhaseTimer(), step=1)
    (sa, ta), (sb, tb) = sd_terms(student_table, teacher_table)
    weights = torch.tensor([1.5, torch.exp(torch.tensor(-0.25)).item()])
    expected = ((sampled_losses(sa, ta) * weights).sum() + sampled_losses(sb, tb).sum()) / 3
    assert out["sd_loss"] == pytest.approx(expected.item(), rel=1e-5)
    # the policy gradient's tokens carry the same weights: −A per token, times its weight
    pg = (weights.sum().item() / 3 - 2 / 3 + 3 / 3) / 6  # A = −1/3, 2/3, −1/3
    assert out["pg_loss"] == pytest.approx(pg, rel=1e-5)
    assert out["rollout_logprob_gap"] == pytest.approx((0.5 + 0.25) / 2, rel=1e-5)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_a_pure_objective_computes_nothing_of_the_other(lam: float) -> None:
    """λ = 1 is self-distillation alone: the PG loss is 0 although the advantages are not;
    λ = 0 is GRPO alone: no teacher forward, no distilled token, SD loss 0. Catches the
    row flags' bounds on λ (`>=`/`<=` for `>`/`<`)."""
    update, _, teacher = make_update(lam=lam)
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    if lam == 1.0:
        assert out["pg_loss"] == 0.0 and out["sd_loss"] != 0.0 and out["tokens"] == 3
    else:
        assert out["sd_loss"] == 0.0 and out["tokens"] == 0 and out["teacher_advantage"] == 0.0
        assert teacher.copy.forwards == 0 and out["pg_loss"] == pytest.approx(1 / 6, rel=1e-5)


def test_full_mode_distils_over_the_whole_vocabulary() -> None:
    """`distillation_mode=full` is KL(π_θ ‖ π_T) over all 5 tokens at α = 1, whatever
    `topk` (2 here) and `add_tail` say. Catches the top-k path taken for the full mode."""
    update, _, _ = make_update("distillation_mode=full", "topk=2", "alpha=1.0", lam=1.0)
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    student_table, teacher_table = tables()
    total = 0.0
    for prompt, reply, context, distill in ROWS:
        if distill:
            for s_prev, t_prev in zip(
                prompt[-1:] + reply[:-1], context[-1:] + reply[:-1], strict=True
            ):
                s = torch.log_softmax(student_table[s_prev], -1)
                t = torch.log_softmax(teacher_table[t_prev], -1)
                total += float((s.exp() * (s - t)).sum())
    assert out["sd_loss"] == pytest.approx(total / 3, rel=1e-5)


def test_a_topk_wider_than_the_vocabulary_distils_over_all_of_it() -> None:
    """Top-k with the tail at k = 8 over a vocabulary of 5: every token is in the top k
    and the tail is empty, so the loss is full mode's. Catches the top-k path taken with
    a k the logits do not have."""
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    losses = []
    for mode in (["distillation_mode=topk", "topk=8", "add_tail=true"], ["distillation_mode=full"]):
        update, _, _ = make_update(*mode, "alpha=1.0", lam=1.0)
        losses.append(update(rollouts(), outcomes, PhaseTimer(), step=1)["sd_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[1] > 0


def test_two_epochs_step_at_the_scheduled_rate_with_fresh_gradients() -> None:
    """Two optimizer passes over one batch, plain SGD, warm-up of 2 steps at lr 0.5: step 1
    runs at 0.25 (the optimizer was built at 0.5). The second pass weighs each token by
    min(π_θ / π_old, 2) against the log-probs from before the first, starts from zeroed
    gradients, and the logged teacher advantage is the first pass's. `after_step` runs
    after each optimizer step. Catches the rate not set, an off-by-one in the schedule,
    a missing step or `after_step`, gradients accumulated across passes, old log-probs
    taken at the wrong width or not at all, and metrics from the second pass."""
    calls: list[int] = []
    update, student, _ = make_update(
        "update_epochs=2", "is_clip=2.0", "warmup_steps=2",
        lam=1.0, lr=0.5, after_step=lambda: calls.append(1),
    )  # fmt: skip
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)

    start, teacher_table = tables()
    table = start.clone().requires_grad_(True)
    first = sd_terms(table, teacher_table)
    sum(sampled_losses(s, t).sum() for s, t in first).div(3).backward()
    moved = (start - 0.25 * table.grad).requires_grad_(True)
    second = sd_terms(moved, teacher_table)
    weighted = [
        sampled_losses(s, t) * torch.exp(s - s0).detach().clamp(max=2.0)
        for (s, t), (s0, _) in zip(second, first, strict=True)
    ]
    loss = sum(w.sum() for w in weighted) / 3
    loss.backward()

    assert calls == [1, 1]
    torch.testing.assert_close(student.table.grad, moved.grad, rtol=1e-5, atol=1e-7)
    expected = moved.detach() - 0.25 * moved.grad
    torch.testing.assert_close(student.table.detach(), expected, rtol=1e-5, atol=1e-6)
    assert out["sd_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert out["grad_norm"] == pytest.approx(moved.grad.norm().item(), rel=1e-5)
    advantage = sum((t - s).sum().item() for s, t in first) / 3
    assert out["teacher_advantage"] == pytest.approx(advantage, rel=1e-5)
    assert update.lr(1) == pytest.approx(0.25) and update.lr(2) == pytest.approx(0.5)


def test_success_weighting_scales_each_distilled_row_by_its_rollouts_weight() -> None:
    """`success_weighting`: one success in three (s = 1/3) weighs the success by 1 − s and
    the failures by s, normalised to mean 1 (1.5 and 0.75 here), each distilled row's
    tokens by its own rollout's weight. Catches the weights not computed from the
    batch's rewards or applied to the wrong rows."""
    update, _, _ = make_update("success_weighting=true", lam=1.0)
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    (sa, ta), (sb, tb) = sd_terms(*tables())
    expected = (0.75 * sampled_losses(sa, ta).sum() + 1.5 * sampled_losses(sb, tb).sum()) / 3
    assert out["sd_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_a_batch_without_a_reply_token_takes_no_step() -> None:
    """Every reply empty (a generation that ended at once): there is no token to learn
    from, so no forward, no optimizer step and no `after_step`, and the metrics are zero.
    Catches the early return dropped (a step taken on an empty batch)."""
    calls: list[int] = []
    update, student, _ = make_update(lam=0.5, lr=0.5, after_step=lambda: calls.append(1))
    empty = [rollout(i, [1], [], teacher_ids=[4], distill=True) for i in range(3)]
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    out = update(empty, outcomes, PhaseTimer(), step=1)
    assert calls == [] and student.forwards == 0 and student.table.grad is None
    assert out == {"loss": 0.0, "sd_loss": 0.0, "pg_loss": 0.0, "tokens": 0, "grad_norm": 0.0,
                   "rollout_logprob_gap": 0.0, "teacher_advantage": 0.0}  # fmt: skip


def test_the_kl_term_to_a_reference_model_by_hand() -> None:
    """`kl_coef` adds k3 = e^δ − δ − 1, δ = log π_ref − log π_θ, to each policy-gradient
    token, the reference scoring the student's own prompt and reply. Catches the
    reference's log-probs not computed (no KL term) or taken from the wrong sequences."""
    update, _, _ = make_update("kl_coef=0.5", lam=0.0, with_reference=True)
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    student_table, reference_table = tables()
    k3 = 0.0
    for prompt, reply, _, _ in ROWS:
        delta = logps(reference_table, prompt, reply) - logps(student_table, prompt, reply)
        k3 += float((torch.exp(delta) - delta - 1).sum())
    assert k3 > 0.01
    assert out["pg_loss"] == pytest.approx(1 / 6 + 0.5 * k3 / 6, rel=1e-5)  # −A: 1/6


class Lockstep(Parallel):
    """This process as one rank of a sharded group (fsdp, ZeRO) whose busiest rank has one
    micro-batch more: forward and backward are collective there, so every rank runs as
    many, padding where it has none of its own."""

    lockstep = True

    def max(self, value: int) -> int:
        return value + 1


def test_a_rank_with_fewer_micro_batches_pads_and_its_update_is_unchanged() -> None:
    """In lockstep a rank runs one padding micro-batch for each the busiest rank has more,
    and a teacher forward for every micro-batch, distilled rows or not; the padding
    changes no loss, metric or gradient. Catches the padding left out, counted wrong or
    run outside lockstep, and a teacher forward skipped in lockstep."""
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    plain, plain_student, plain_teacher = make_update(lam=0.25)
    expected = plain(rollouts(), outcomes, PhaseTimer(), step=1)
    update, student, teacher = make_update(lam=0.25, parallel=Lockstep())
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    assert out == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(student.table.grad, plain_student.table.grad, rtol=0, atol=0)
    # 3 rows in micro-batches of 2, and one of padding
    assert (plain_student.forwards, plain_teacher.copy.forwards) == (2, 1)
    assert (student.forwards, teacher.copy.forwards) == (3, 3)
    # with nothing to distil anywhere in the batch, no rank runs the teacher
    update, _, teacher = make_update(lam=0.0, parallel=Lockstep())
    update(rollouts(), outcomes, PhaseTimer(), step=1)
    assert teacher.copy.forwards == 0


# ---- the teachers ---------------------------------------------------------------------------


def bigram_logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor([[0, 1, 2, 3, 4]])).logits


def test_rates_at_the_ends_of_their_range_are_accepted_and_act_as_said() -> None:
    """`teacher_update_rate` and `trust_region_weight` are in [0, 1], ends included: rate 1
    makes the EMA teacher the student after a step, rate 0 keeps it where it started,
    weight 0 / 1 is the base / current model. Catches a strict bound (a valid setting
    refused) and a range check that lets values outside [0, 1] or unknown kinds through."""
    start, moved = tables()
    student = Bigram(start)
    follows, frozen = Teacher(student, "ema", update_rate=1.0), Teacher(student, "ema", 0.0)
    base_side = Teacher(student, "trust_region", mix_weight=0.0)
    current_side = Teacher(student, "trust_region", mix_weight=1.0)
    with torch.no_grad():
        student.table.copy_(moved)
    follows.update(student)
    frozen.update(student)
    torch.testing.assert_close(follows.copy.table, moved, rtol=0, atol=0)
    torch.testing.assert_close(frozen.copy.table, start, rtol=0, atol=0)
    torch.testing.assert_close(base_side.logits(student, bigram_logits), start[None])
    torch.testing.assert_close(current_side.logits(student, bigram_logits), moved[None])
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="teacher_update_rate"):
            Teacher(student, "ema", update_rate=bad)
        with pytest.raises(ValueError, match="trust_region_weight"):
            Teacher(student, "trust_region", mix_weight=bad)
    with pytest.raises(ValueError, match="expected one of"):
        Teacher(student, "mentor")


def test_each_teacher_kind_scores_with_its_own_weights() -> None:
    """After the student moved and one EMA update at r = 0.25: `ema` scores with
    0.75·θ_start + 0.25·θ_now (its copy, not the student), `base` with θ_start, `live`
    with θ_now, and `trust_region` (w = 0.25) mixes base and current logits. Catches a
    teacher that runs the student, a reversed rate, a base teacher that follows updates,
    and a mixing weight applied to the wrong side."""
    start, moved = tables()
    student = Bigram(start)
    teachers = {kind: Teacher(student, kind, 0.25, 0.25) for kind in ("ema", "base", "live", "trust_region")}  # fmt: skip
    with torch.no_grad():
        student.table.copy_(moved)
    for teacher in teachers.values():
        teacher.update(student)
    expected = {
        "ema": 0.75 * start + 0.25 * moved,
        "base": start,
        "live": moved,
        "trust_region": 0.75 * start + 0.25 * moved,  # logits mixed, here the same numbers
    }
    for kind, teacher in teachers.items():
        got = teacher.logits(student, bigram_logits)
        torch.testing.assert_close(got, expected[kind][None], rtol=1e-6, atol=1e-6, msg=kind)
    torch.testing.assert_close(student.table.detach(), moved, rtol=0, atol=0)  # untouched
    assert teachers["ema"].head(student) is teachers["ema"].copy.head  # the copy's own layer
    assert teachers["live"].head(student) is student.head


def test_a_teacher_copy_is_frozen_and_in_eval_mode() -> None:
    """The teacher's copy takes no gradient and runs in eval mode (no dropout in the
    targets). Catches a copy whose parameters still require grad or stay in train mode."""
    student = Bigram(tables()[0])
    student.train()
    for kind in ("ema", "base", "trust_region"):
        copy = Teacher(student, kind).copy
        assert copy is not None and not copy.training, kind
        assert not any(p.requires_grad for p in copy.parameters()), kind
    assert Teacher(student, "live").copy is None  # the live teacher is the student itself


def test_lora_teachers_swap_in_their_adapter_or_disable_it(tiny_model_dir: Path) -> None:
    """With LoRA there is no copy: the `ema` teacher swaps its own adapter tensors (a
    detached snapshot, rate 0 here) in for the forward and puts the student's back; the
    `base` teacher runs with the adapter disabled. Catches an EMA snapshot that is still
    tied to the autograd graph, a swap that is not undone or not made, and the two
    kinds' paths exchanged."""
    from peft import LoraConfig, get_peft_model

    from resd.models import load_model

    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    student = get_peft_model(load_model(str(tiny_model_dir)), lora)
    ids = torch.tensor([[5, 6, 7, 8]])

    def forward(model: nn.Module) -> torch.Tensor:
        return model(input_ids=ids).logits

    with torch.no_grad():
        before = forward(student)
        with student.disable_adapter():
            plain = forward(student)
    ema, base = Teacher(student, "ema", 0.0), Teacher(student, "base")
    assert ema.adapter and not any(t.requires_grad for t in ema.adapter.values())
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.5)
        now = forward(student)
    assert not torch.allclose(now, before, atol=1e-3)  # the adapter matters
    assert not torch.allclose(plain, before, atol=1e-3)
    torch.testing.assert_close(ema.logits(student, forward), before)
    torch.testing.assert_close(base.logits(student, forward), plain)
    with torch.no_grad():
        torch.testing.assert_close(forward(student), now, rtol=0, atol=0)  # adapter restored


class TiedPair(nn.Module):
    """An embedding and an output layer that share one weight, as tied LMs do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 3)
        self.head = nn.Linear(3, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.Parameter(torch.ones(3))


def test_loading_a_teacher_copy_accepts_one_name_of_tied_weights_and_refuses_misfits(
    tmp_path: Path,
) -> None:
    """A checkpoint of the teacher's copy may store tied weights under one name: that
    loads (both names then hold it); a file missing a real tensor or holding an unknown
    one is refused by name; no file leaves the copy as it is. Catches the fit check
    inverted (a good file refused, a bad one taken) and tied weights counted as
    missing."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = Teacher(TiedPair(), "ema")
    saved = {"embed.weight": torch.randn(VOCAB, 3), "norm": torch.full((3,), 2.0)}
    save_file(saved, str(tmp_path / "one_name.safetensors"))
    teacher.load(tmp_path / "one_name.safetensors")
    torch.testing.assert_close(teacher.copy.head.weight, saved["embed.weight"], rtol=0, atol=0)
    torch.testing.assert_close(teacher.copy.norm, saved["norm"], rtol=0, atol=0)

    teacher.load(tmp_path / "absent.safetensors")  # nothing saved yet: unchanged
    torch.testing.assert_close(teacher.copy.norm, saved["norm"], rtol=0, atol=0)
    save_file({"embed.weight": saved["embed.weight"]}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="missing \\['norm'\\]"):
        teacher.load(tmp_path / "short.safetensors")
    save_file({**saved, "extra": torch.zeros(1)}, str(tmp_path / "long.safetensors"))
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        teacher.load(tmp_path / "long.safetensors")


@pytest.mark.parametrize(
    "settings",
    [
        ["distillation_mode=full", "min_ratio=0.5", "max_ratio=1.1"],
        ["distillation_mode=topk", "topk=2", "add_tail=false", "max_ratio=1.1"],
        ["distillation_mode=topk", "topk=2", "add_tail=true", "min_ratio=0.5", "max_ratio=1.1"],
    ],
)
def test_the_update_hands_every_distillation_setting_to_the_loss(settings: list[str]) -> None:
    """The logit-level modes distil what `self_distillation_loss` (tested on its own in
    test_losses.py) computes from the same logits with the run's settings: α, the support
    (top-k, with or without the tail bucket) and the ratio clip. Catches a setting the
    update does not pass on (the clip's upper bound binds on these tables), and top-k
    without the tail taken down the path that adds it."""
    from resd.training.losses import self_distillation_loss

    update, _, _ = make_update(*settings, "alpha=0.5", lam=1.0)
    cfg = update.cfg
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    student_table, teacher_table = tables()

    def expected(max_ratio: float | None) -> float:
        total = 0.0
        for prompt, reply, context, distill in ROWS:
            if distill:
                s = student_table[torch.tensor(prompt[-1:] + reply[:-1])]
                t = teacher_table[torch.tensor(context[-1:] + reply[:-1])]
                total += float(self_distillation_loss(
                    s, t, alpha=cfg.alpha, add_tail=cfg.add_tail, min_ratio=cfg.min_ratio,
                    topk=cfg.topk if cfg.distillation_mode == "topk" else None, max_ratio=max_ratio,
                ).sum())  # fmt: skip
        return total / 3

    assert out["sd_loss"] == pytest.approx(expected(cfg.max_ratio), rel=1e-5)
    assert expected(cfg.max_ratio) != pytest.approx(expected(None), rel=1e-3)  # it binds


@pytest.mark.parametrize(
    ("bound", "values", "other"),
    [
        ("pg_clip_high", ("0.0", "100.0"), "pg_clip_low=1.0"),
        ("pg_clip_low", ("0.0", "1.0"), "pg_clip_high=100.0"),
    ],
)
def test_the_policy_gradients_ratio_clip_uses_the_configured_bounds(
    bound: str, values: tuple[str, str], other: str
) -> None:
    """On a second pass over a batch the PPO ratio has moved from 1: a positive
    advantage's ratio is capped at 1 + `pg_clip_high`, a negative one's floored at
    1 − `pg_clip_low` (at 0 a bound binds; at 100, or a floor of 1, it never does), so the
    second pass's loss depends on each bound. Catches a bound not passed on (every run
    would clip at the default 0.2)."""
    outcomes = [
        Outcome("item-0", 1.0, 1.0),
        Outcome("item-1", 0.0, 0.0),
        Outcome("item-2", 0.5, 0.5),
    ]
    losses = []
    for value in values:
        update, _, _ = make_update("update_epochs=2", f"{bound}={value}", other, lam=0.0, lr=2.0)
        losses.append(update(rollouts(), outcomes, PhaseTimer(), step=1)["pg_loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3), losses


def soft_capped_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny Gemma 2, seeded: it soft-caps its logits at c = 0.5 inside its forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        final_logit_softcapping=0.5, attn_implementation="eager",
    )  # fmt: skip
    return Gemma2ForCausalLM(config).to(dtype)


def test_the_chunked_head_soft_caps_logits_as_the_models_own_forward_does() -> None:
    """Gemma 2 soft-caps its logits (tanh(z / c)·c) inside its forward. With
    `loss_chunk_size` the update applies the output layer itself, chunk by chunk, so it
    must apply the model's cap too: the loss is then the one computed from the model's
    own logits. Catches the cap left out (3 % off at c = 0.5 on this model)."""
    losses = []
    for chunk in ("null", "4"):
        model = soft_capped_model()
        losses.append(full_sd_loss(model, Teacher(model, "base"), chunk))
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_trust_region_teacher_mixes_logits_after_the_soft_cap(dtype: torch.dtype) -> None:
    """The trust-region teacher's logits are (1 − w)·base + w·current. With
    `loss_chunk_size` its two models give hidden states, which must be mixed as logits,
    after the output layer and Gemma 2's soft cap (not linear): the loss is then the one
    from the two models' own logits. Catches the hidden states mixed before the head (0.15 %
    off here), and, in bf16 weights without autocast, mixed in fp32 and handed to a bf16
    output layer ("expected m1 and m2 to have the same dtype")."""
    losses = []
    for chunk in ("null", "4"):
        model = soft_capped_model(dtype)
        teacher = Teacher(model, "trust_region", mix_weight=0.5)  # its base: the weights now
        with torch.no_grad():  # the student moves away from the base
            for param in model.model.layers.parameters():
                param.add_(torch.randn_like(param), alpha=0.5)
        losses.append(full_sd_loss(model, teacher, chunk))
    assert losses[0] > 0
    assert losses[1] == pytest.approx(losses[0], rel=1e-4 if dtype == torch.float32 else 2e-2)


def test_the_polynomial_schedule_ends_at_transformers_lr_end() -> None:
    """`polynomial` is transformers' schedule for an optimizer at the run's rate: it decays
    linearly from `lr` to its `lr_end` (1e-7) over the run, so at lr = 1e-6 each step runs
    at (lr − 1e-7)·(1 − t/5) + 1e-7 (4 steps, decays ending one step after the last).
    Catches the multiplier taken from an optimizer at another rate (it was built at 1.0,
    which decayed to lr·1e-7 instead: 2e-7 in place of 2.8e-7 at the last step here)."""
    update, _, _ = make_update("lr_scheduler_type=polynomial", lam=1.0, lr=1e-6)
    expected = [(1e-6 - 1e-7) * (1 - t / 5) + 1e-7 for t in range(1, 5)]
    assert [update.lr(t) for t in range(1, 5)] == pytest.approx(expected, rel=1e-6)


def test_the_sampled_mode_floors_the_teachers_log_probs_at_min_ratio() -> None:
    """`distillation_mode=sampled` with `min_ratio` m: the teacher's log-prob of each token
    is raised to at least log π_θ + log m before the advantage is taken, as in the logit
    modes. Catches `min_ratio` not handed to the sampled loss (the floor binds here)."""
    update, _, _ = make_update("min_ratio=0.9", lam=1.0)
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(3)]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    terms = sd_terms(*tables())
    floored = [(s, torch.maximum(t, s + torch.log(torch.tensor(0.9)))) for s, t in terms]
    expected = sum(sampled_losses(s, t).sum() for s, t in floored) / 3
    unfloored = sum(sampled_losses(s, t).sum() for s, t in terms) / 3
    assert out["sd_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() != pytest.approx(unfloored.item(), rel=1e-3)  # the floor binds


def test_without_the_samplers_log_probs_the_logged_gap_is_zero() -> None:
    """A sampler that returned no log-probs leaves no token to measure the trainer's
    log-prob gap on: the metric is 0, not a made-up value. Catches another default."""
    update, _, _ = make_update(lam=0.5)
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    assert out["rollout_logprob_gap"] == 0.0 and out["sd_loss"] != 0.0


def test_in_lockstep_pure_distillation_runs_no_reference_forward() -> None:
    """At λ = 1 there is no policy-gradient token anywhere in the batch, so even a rank in
    lockstep skips the reference model (its KL term belongs to the policy gradient), and
    the loss is the plain run's. Catches the lockstep rank running the PG side, and the
    reference's forward with it, on a batch without PG tokens."""
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    plain, _, _ = make_update("kl_coef=0.5", lam=1.0, with_reference=True)
    expected = plain(rollouts(), outcomes, PhaseTimer(), step=1)
    update, _, _ = make_update("kl_coef=0.5", lam=1.0, with_reference=True, parallel=Lockstep())
    out = update(rollouts(), outcomes, PhaseTimer(), step=1)
    assert update.reference.copy.forwards == 0
    assert out == pytest.approx(expected, rel=1e-6)


class Twin(Parallel):
    """This process as one of two ranks that hold the same three rollouts (the global batch
    is six): every sum over ranks is twice this rank's value."""

    def sum(self, value: float) -> float:
        return 2 * value


def test_a_rank_of_two_reports_the_whole_batchs_losses() -> None:
    """Each rank's loss is its share of the batch loss (half, here), and the logged losses
    are the shares summed over the ranks: the one-process values of the same rows, with
    the token count of the whole batch. Catches the losses logged as this rank's share."""
    outcomes = [Outcome(f"item-{i}", r, r) for i, r in enumerate([0.0, 1.0, 0.0])]
    plain, _, _ = make_update(lam=0.25)
    expected = plain(rollouts({0: [-1.0, -2.0]}), outcomes, PhaseTimer(), step=1)
    update, _, _ = make_update(lam=0.25, parallel=Twin())
    out = update(rollouts({0: [-1.0, -2.0]}), outcomes * 2, PhaseTimer(), step=1)
    for key in ("loss", "sd_loss", "pg_loss", "rollout_logprob_gap", "teacher_advantage"):
        assert out[key] == pytest.approx(expected[key], rel=1e-6), key
    assert (out["tokens"], expected["tokens"]) == (6, 3)


def test_left_padded_rows_get_the_logits_of_their_own_unpadded_forward() -> None:
    """`response_logits` left-pads rows of different lengths into one batch; each row's
    window must be the logits the model gives that row alone. On a model with learned
    absolute position embeddings (a tiny random GPT-2) that needs every row's positions
    to start at 0 at its first real token. Catches positions counted from 1 (or across
    the padding), which rotary models (Llama, Qwen) cannot show."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from resd.training.update import response_logits

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()  # eval: no dropout
    rows = [[1, 2, 3, 4, 5], [6, 7, 8]]
    with torch.no_grad():
        got = response_logits(model, rows, 2, 0)
        for row, ids in enumerate(rows):
            own = model(input_ids=torch.tensor([ids])).logits[0, -3:-1]
            torch.testing.assert_close(got[row], own, rtol=1e-5, atol=1e-5)


def test_the_chunked_head_scores_the_teacher_with_the_teachers_own_output_layer() -> None:
    """With `loss_chunk_size` the update turns hidden states into logits itself: the
    student's with the student's output layer, the teacher's with the teacher's. After
    the student moved (its output layer here), a base teacher still has the starting
    one, and the loss must be the one from both models' own logits. Catches the
    teacher's hidden states put through the student's output layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    losses = []
    for chunk in ("null", "4"):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        teacher = Teacher(model, "base")
        with torch.no_grad():  # the student has moved since the teacher was copied
            model.lm_head.weight.mul_(-2.0)
        losses.append(full_sd_loss(model, teacher, chunk))
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_a_topk_as_wide_as_the_vocabulary_distils_over_all_of_it_at_any_batch_size() -> None:
    """Top-k with the tail at k = 5, the whole vocabulary: the tail is empty, so the loss
    is full mode's, in a micro-batch of 6 distilled rows with a 6-token reply (more rows
    and more positions than k). Catches the fast top-k path taking k as given when it
    reaches the vocabulary: with an empty tail its gradient is NaN and the step stops."""
    rows = [
        rollout(i, p, [2, 3, 4, 1, 2, 3] if i == 0 else y, teacher_ids=t, distill=True)
        for i, (p, y, t, _) in enumerate(ROWS * 2)
    ]
    outcomes = [Outcome(f"item-{i}", 0.0, 0.0) for i in range(6)]
    losses = []
    for mode in (["distillation_mode=topk", "topk=5", "add_tail=true"], ["distillation_mode=full"]):
        update, _, _ = make_update(*mode, "alpha=1.0", "micro_batch_size=6", lam=1.0)
        losses.append(update(rows, outcomes, PhaseTimer(), step=1)["sd_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[1] > 0
