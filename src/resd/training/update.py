"""The update half of a step: token losses, micro-batches, the optimizer step.

(1 − λ)·policy-gradient + λ·self-distillation, where self-distillation covers the
rollouts the lesson half marked `distill` and the policy gradient (GRPO, or a mixed
objective) covers every rollout with a group-normalised advantage. Each micro-batch's
loss is its share of the batch loss (`losses.aggregate_loss`), scaled by counts over the
whole global batch, so the update is the same at any micro-batch size and number of
processes. What follows the optimizer step (the EMA teacher, the sampler's weights) is
passed in as `after_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from resd.config import TrainConfig
from resd.generation.hf import left_pad
from resd.models import autocast_context
from resd.parallel import Parallel
from resd.training.losses import (
    TokenTerms,
    aggregate_loss,
    chunked_token_losses,
    group_advantages,
    importance_weight,
    loss_chunk_positions,
    policy_gradient_loss,
    sampled_token_loss,
    self_distillation_loss,
    success_rate_weights,
    token_logprobs,
    topk_distillation_terms,
)
from resd.training.packing import PackedRows, Packing
from resd.training.rollout import Outcome, PhaseTimer, Rollout, padding_rollout
from resd.training.teacher import Teacher


def _forward_inputs(
    sequences: list[list[int]],
    width: int,
    pad_id: int,
    device: torch.device,
    packing: Packing | None,
) -> tuple[dict[str, torch.Tensor], PackedRows | None]:
    """The model's inputs for `sequences`: one packed row where `packing` pays for it,
    else the rows left-padded (with the packed row, its window of outputs). A scoring
    forward keeps no KV cache: nothing decodes after it (and under activation
    recomputation transformers would turn the cache off with a warning)."""
    packed = packing.plan(sequences, width, device) if packing is not None else None
    if packed is not None:
        ids, mask, positions = packed.input_ids, packed.attention_mask, packed.position_ids
    else:
        ids, mask = left_pad(sequences, pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "use_cache": False,
    }
    return inputs, packed


def response_logits(
    model, sequences: list[list[int]], width: int, pad_id: int, packing: Packing | None = None
) -> torch.Tensor:
    """Next-token logits `[B, width, V]` for the last `width` tokens of each sequence.

    Sequences are left-padded, so every response ends in the last column and a
    response of length r occupies the last r positions of the returned window. With
    `packing`, rows that pay for it run as one packed row (`training.packing`) and the
    logits come back in the same layout.
    """
    inputs, packed = _forward_inputs(
        sequences, width, pad_id, next(model.parameters()).device, packing
    )
    if packed is not None:
        logits = model(**inputs, logits_to_keep=packed.window).logits
        return logits.view(packed.rows, packed.width, -1)
    return model(**inputs, logits_to_keep=width + 1).logits[:, :-1]


def response_hidden(
    model, sequences: list[list[int]], width: int, pad_id: int, packing: Packing | None = None
) -> torch.Tensor:
    """Final hidden states `[B, width, H]` that predict the last `width` tokens (no output head).

    They are caught on their way out of the decoder during the whole model's forward
    (asked for one position of logits only), rather than by calling the decoder alone:
    under FSDP only the root module's forward gathers the embedding and final norm.
    """
    inputs, packed = _forward_inputs(
        sequences, width, pad_id, next(model.parameters()).device, packing
    )
    caught: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(
        lambda _module, _args, out: caught.append(out.last_hidden_state)
    )
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    if packed is not None:
        return caught[-1][0, packed.window].view(packed.rows, packed.width, -1)
    return caught[-1][:, -width - 1 : -1]


def right_aligned_mask(lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    cols = torch.arange(width, device=device)
    return (cols[None, :] >= width - torch.tensor(lengths, device=device)[:, None]).float()


def right_aligned(rows: list[list[float]], width: int, device: torch.device) -> torch.Tensor:
    """Per-token values `[B, width]` in the layout of the response window (zeros before)."""
    out = torch.zeros(len(rows), width)
    for row, values in enumerate(rows):
        if values:
            out[row, width - len(values) :] = torch.tensor(values)
    return out.to(device)


@dataclass(frozen=True)
class BatchTotals:
    """Counts over the whole global batch (all processes) that scale each micro-batch's loss."""

    sd_tokens: int  # tokens of self-distilled rows
    pg_tokens: int  # tokens of policy-gradient rows
    sequences: int  # rollouts in the batch, distilled or not


class Update:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        teacher: Teacher,
        reference: Teacher | None,
        parallel: Parallel,
        pad_id: int | None,
        distillation_weight: float,
        after_step: Callable[[], None],
        total_steps: int,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.teacher, self.reference = (
            cfg,
            model,
            optimizer,
            teacher,
            reference,
        )
        self.parallel, self.pad_id, self.distillation_weight = parallel, pad_id, distillation_weight
        self.after_step = after_step
        self.total_steps = total_steps
        self._schedule: Callable[[int], float] | None = None
        self.device = next(model.parameters()).device
        # Rows that share a prompt run as one packed row where that is cheaper.
        self.packing = Packing.for_model(model, cfg.pack_rows)

    @property
    def policy(self) -> nn.Module:
        """The policy as called for training forwards (the DeepSpeed engine, if any)."""
        return self.parallel.policy(self.model)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (1-based) under `lr_scheduler_type`.

        A pure function of the step, so a resumed run needs no scheduler state: the
        multiplier comes from `transformers.get_scheduler`'s own schedule, evaluated at the
        1-based step (warm-up reaches the full rate at step `warmup_steps`, as the paper's
        10 warm-up steps do), with decays ending one step after the last.
        """
        if self._schedule is None:
            from transformers import get_scheduler

            # at the run's rate: `polynomial`'s multiplier depends on it (it ends at lr_end)
            dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.cfg.lr)
            self._schedule = get_scheduler(
                self.cfg.lr_scheduler_type, dummy, num_warmup_steps=self.cfg.warmup_step_count(self.total_steps),
                num_training_steps=self.total_steps + 1,
            ).lr_lambdas[0]  # fmt: skip
        return self.cfg.lr * float(self._schedule(step))

    def __call__(
        self, rollouts: list[Rollout], outcomes: list[Outcome], timer: PhaseTimer, step: int
    ) -> dict[str, float]:
        """Optimizer step(s) on (1 − λ)·policy-gradient + λ·self-distillation.

        Self-distillation covers the rollouts marked `distill`; the policy gradient (GRPO,
        or a mixed objective) covers all rollouts with group-normalised advantages.
        `outcomes` (item id, reward, score) covers the whole global batch, so batch-level
        quantities (success-rate weights, advantages, token and sequence counts) are the
        same on every rank and the same as in a one-process run.
        """
        cfg, lam = self.cfg, self.distillation_weight
        for r in rollouts:
            r.sd_row = lam > 0 and r.distill and bool(r.gen.token_ids)
            r.pg_row = lam < 1 and bool(r.gen.token_ids)
        rows = [r for r in rollouts if r.sd_row or r.pg_row]
        totals = BatchTotals(
            sd_tokens=int(self.parallel.sum(sum(len(r.gen.token_ids) for r in rows if r.sd_row))),
            pg_tokens=int(self.parallel.sum(sum(len(r.gen.token_ids) for r in rows if r.pg_row))),
            sequences=len(outcomes),
        )
        out = {"loss": 0.0, "sd_loss": 0.0, "pg_loss": 0.0, "tokens": totals.sd_tokens, "grad_norm": 0.0,
               "rollout_logprob_gap": 0.0, "teacher_advantage": 0.0}  # fmt: skip
        if totals.sd_tokens + totals.pg_tokens == 0:
            return out
        rewards = torch.tensor([o.reward for o in outcomes])
        weights = (
            success_rate_weights(rewards, cfg.success_weight_alpha, cfg.success_weight_beta)
            if cfg.success_weighting
            else torch.ones(len(outcomes))
        )
        values = torch.tensor(
            [o.reward if cfg.pg_reward == "reward" else o.score for o in outcomes]
        )
        advantages = group_advantages(values, cfg.rollouts_per_prompt, cfg.pg_scale_std)
        for r in rollouts:
            r.weight, r.advantage = float(weights[r.index]), float(advantages[r.index])
        size = cfg.micro_batch_size
        micro_batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        if self.parallel.lockstep:  # forward/backward are collective: every rank runs as many
            missing = self.parallel.max(len(micro_batches)) - len(micro_batches)
            micro_batches += [[padding_rollout(self.pad_id)] for _ in range(missing)]
        old_logps = self._old_logprobs(micro_batches, timer) if cfg.update_epochs > 1 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Σ |log π_trainer − log π_sampler| and its tokens; Σ (log π_T − log π_θ) over
        # distilled tokens and their count (the teacher's advantage)
        gap = torch.zeros(4, dtype=torch.float64)
        for epoch in range(cfg.update_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            losses = {"sd_loss": 0.0, "pg_loss": 0.0}
            for index, micro in enumerate(micro_batches):
                old = old_logps[index] if old_logps is not None else None
                sd, pg = self._micro_batch_loss(
                    micro, totals, old, timer, gap if epoch == 0 else None
                )
                with timer("update"):
                    self.parallel.backward((1 - lam) * pg + lam * sd)
                losses["sd_loss"] += sd.item()
                losses["pg_loss"] += pg.item()
            with timer("update"):
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr(step)
                grad_norm = self.parallel.step(self.optimizer, params, cfg.max_grad_norm)
                for frozen in (self.teacher.copy, self.reference and self.reference.copy):
                    self.parallel.reshard(frozen)
                self.after_step()  # the EMA teacher follows, the sampler gets the new weights
        losses = {k: self.parallel.sum(v) for k, v in losses.items()}
        gap_sum, gap_tokens, adv_sum, adv_tokens = (self.parallel.sum(float(x)) for x in gap)
        out.update(
            losses,
            grad_norm=grad_norm,
            loss=(1 - lam) * losses["pg_loss"] + lam * losses["sd_loss"],
            rollout_logprob_gap=gap_sum / gap_tokens if gap_tokens else 0.0,
            teacher_advantage=adv_sum / adv_tokens if adv_tokens else 0.0,
        )
        return out

    def _micro_batch_loss(
        self,
        micro: list[Rollout],
        totals: BatchTotals,
        old_logp: torch.Tensor | None,
        timer: PhaseTimer,
        gap: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of the batch's SD and PG losses (see `aggregate_loss`).

        `gap`, on the first pass over the batch, accumulates the log-prob mismatch between
        the sampler that drew the tokens and the trainer, and token losses are recorded
        for the samples log.
        """
        cfg = self.cfg
        lengths = [len(r.gen.token_ids) for r in micro]
        width = max(lengths)
        mask = right_aligned_mask(lengths, width, self.device)
        token_ids = left_pad([r.gen.token_ids for r in micro], 0, self.device)[0]
        zero = torch.zeros((), device=self.device)
        is_sd = torch.tensor([r.sd_row for r in micro], device=self.device, dtype=torch.float32)
        is_pg = torch.tensor([r.pg_row for r in micro], device=self.device, dtype=torch.float32)

        # In lockstep a rank runs every forward the others run, even on rows it masks out.
        want_sd = bool(totals.sd_tokens) and (self.parallel.lockstep or bool(is_sd.any()))
        want_pg = bool(totals.pg_tokens) and (self.parallel.lockstep or bool(is_pg.any()))
        teacher_seqs = [r.teacher_ids + r.gen.token_ids for r in micro]
        student_seqs = [r.prompt_ids + r.gen.token_ids for r in micro]
        sd_loss = pg_loss = zero
        terms = self._token_losses(
            student_seqs, teacher_seqs if want_sd else None, token_ids, width, timer
        )
        tok, logp = terms.loss, terms.logp
        with timer("update"):
            old = logp.detach() if old_logp is None else old_logp
            # The sampler's log-probs; NaN where it gave none (those tokens get weight 1).
            sampled = [
                r.gen.logprobs or [math.nan] * n for r, n in zip(micro, lengths, strict=True)
            ]
            sampler_logp = right_aligned(sampled, width, self.device)
            known = mask * ~sampler_logp.isnan()
            sampler_logp = torch.where(known.bool(), sampler_logp, logp.detach())
            if gap is not None:
                gap[0] += float(((logp.detach() - sampler_logp).abs() * known).sum())
                gap[1] += float(known.sum())
                if terms.teacher_logp is not None:  # the teacher's advantage on distilled tokens
                    distilled = mask * is_sd[:, None]
                    gap[2] += float(((terms.teacher_logp - logp.detach()) * distilled).sum())
                    gap[3] += float(distilled.sum())
            correction = importance_weight(logp, sampler_logp, cfg.rollout_is_cap)

            def aggregate(
                token_loss: torch.Tensor, rows: torch.Tensor, tokens: int
            ) -> torch.Tensor:
                return aggregate_loss(token_loss, mask * rows[:, None], mode=cfg.loss_aggregation,
                                      tokens=tokens, sequences=totals.sequences)  # fmt: skip

            if tok is not None:
                tok = tok * importance_weight(logp, old, cfg.is_clip) * correction
                w = torch.tensor([r.weight for r in micro], device=self.device)
                sd_loss = aggregate(tok * w[:, None], is_sd, totals.sd_tokens)
                if gap is not None:
                    for row, r in enumerate(micro):
                        if r.sd_row:
                            r.token_losses = (
                                tok[row, width - lengths[row] :].detach().float().tolist()
                            )
            if want_pg:
                adv = torch.tensor([r.advantage for r in micro], device=self.device)
                ref = None
                if self.reference is not None:
                    with torch.no_grad(), autocast_context(self.device, cfg.autocast):
                        ref_logits = self.reference.logits(
                            self.model,
                            lambda m: response_logits(
                                self.parallel.policy(m),
                                student_seqs,
                                width,
                                self.pad_id,
                                self.packing,
                            ),
                        )
                    ref = chunked_token_losses(
                        ref_logits, None, token_ids, chunk_size=loss_chunk_positions(ref_logits)
                    ).logp
                tok = policy_gradient_loss(logp, old, adv, clip_low=cfg.pg_clip_low, clip_high=cfg.pg_clip_high,
                                           ref_logp=ref, kl_coef=cfg.kl_coef)  # fmt: skip
                pg_loss = aggregate(tok * correction, is_pg, totals.pg_tokens)
        return sd_loss, pg_loss

    def _token_losses(
        self,
        student_seqs: list[list[int]],
        teacher_seqs: list[list[int]] | None,
        token_ids: torch.Tensor,
        width: int,
        timer: PhaseTimer,
    ) -> TokenTerms:
        """Per-token distillation loss (None without teacher sequences), the student's
        log-probs of the response tokens, and the teacher's.

        Two paths with the same result: full logits for both models, or hidden states
        with the output head applied chunk by chunk (`loss_chunk_size`), which keeps peak
        memory flat in the vocabulary size. From full logits the default objective (top-k
        with the tail) goes through `support_logprobs`' hand-written backward, any other
        a few positions at a time under checkpointing.
        """
        cfg = self.cfg

        def sd_token_loss(s_logits, t_logits, ids, s_logp):
            if cfg.distillation_mode == "sampled":
                return sampled_token_loss(
                    s_logp, token_logprobs(t_logits, ids), min_ratio=cfg.min_ratio
                )
            topk = None if cfg.distillation_mode == "full" else cfg.topk
            return self_distillation_loss(s_logits, t_logits, alpha=cfg.alpha, topk=topk, add_tail=cfg.add_tail,
                                          min_ratio=cfg.min_ratio, max_ratio=cfg.max_ratio)  # fmt: skip

        # The teacher's side: final hidden states for the chunked head, else full logits
        # (the trust-region teacher's two models' apart, joined as logits by `Teacher.mix`).
        forward = response_hidden if cfg.loss_chunk_size else response_logits
        teacher_out = None
        if teacher_seqs is not None:
            with timer("teacher"), autocast_context(self.device, cfg.autocast):
                teacher_out = self.teacher.outputs(
                    self.model,
                    lambda m: forward(
                        self.parallel.policy(m), teacher_seqs, width, self.pad_id, self.packing
                    ),
                )
        if cfg.loss_chunk_size:
            with timer("update"), autocast_context(self.device, cfg.autocast):
                s_hidden = response_hidden(
                    self.policy, student_seqs, width, self.pad_id, self.packing
                )
                softcap = getattr(self.model.config, "final_logit_softcapping", None)
                return chunked_token_losses(
                    s_hidden, self.model.get_output_embeddings(), token_ids, chunk_size=cfg.loss_chunk_size,
                    teacher_hidden=teacher_out, teacher_head=self.teacher.head(self.model),
                    token_loss=sd_token_loss, softcap=softcap, teacher_mix=self.teacher.mix,
                )  # fmt: skip
        teacher_logits = self.teacher.mix(teacher_out) if teacher_out is not None else None
        del teacher_out  # the trust-region teacher's two logits, not held through the update
        with timer("update"):
            with autocast_context(self.device, cfg.autocast):
                s_logits = response_logits(
                    self.policy, student_seqs, width, self.pad_id, self.packing
                )
            topk = cfg.topk if cfg.distillation_mode == "topk" and cfg.add_tail else None
            if teacher_logits is not None and topk:  # k ≥ V: every token (support_logprobs)
                return topk_distillation_terms(
                    s_logits, teacher_logits, token_ids, topk=topk, alpha=cfg.alpha,
                    min_ratio=cfg.min_ratio, max_ratio=cfg.max_ratio,
                )  # fmt: skip
            return chunked_token_losses(
                s_logits, None, token_ids, chunk_size=loss_chunk_positions(s_logits),
                teacher_hidden=teacher_logits, token_loss=sd_token_loss,
            )  # fmt: skip

    def _old_logprobs(
        self, micro_batches: list[list[Rollout]], timer: PhaseTimer
    ) -> list[torch.Tensor]:
        """Log-probs of the rollout policy, needed once several updates reuse one batch.

        Forwards without a backward: under FSDP they leave the root's parameters (the
        embeddings, the final norm, a tied head) gathered, and the next forward's backward
        then gave those no gradient at all, so they never trained. Resharding them here
        makes that forward gather them afresh."""
        result = []
        with torch.no_grad():
            for micro in micro_batches:
                lengths = [len(r.gen.token_ids) for r in micro]
                token_ids = left_pad([r.gen.token_ids for r in micro], 0, self.device)[0]
                seqs = [r.prompt_ids + r.gen.token_ids for r in micro]
                result.append(
                    self._token_losses(seqs, None, token_ids, max(lengths), PhaseTimer()).logp
                )
        self.parallel.reshard(self.model)
        return result
