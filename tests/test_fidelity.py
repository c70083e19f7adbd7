"""The release's behaviours as options: each test fails on the behaviour we had before.

Loss averaging, playbook visibility, curator operations, the reflection hand-off, the
teacher's feedback rule, the solution buffer, rollout correction, the teacher floor in
the sampled mode and the pruning schedule. Hand-computed values wherever a number is
claimed.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from resd.training.losses import aggregate_loss, importance_weight, sampled_token_loss
from resd.training.playbook import Playbook, prune_due
from resd.training.reflection import curation_messages
from resd.training.teacher_context import SolutionBuffer
from resd.training.trainer import Trainer
from test_trainer import config, read_jsonl

ENTRY = re.compile(r"^\[[a-z]+-\d{5}\] helpful=\d+ harmful=\d+ :: .+$")

# ---- 1. loss averaging -----------------------------------------------------------------------


def test_aggregation_by_hand():
    a, b, c, d = 1.0, 2.0, 4.0, 6.0
    loss = torch.tensor([[0.0, 0.0, a], [b, c, d], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # row 3: not distilled
    token = aggregate_loss(loss, mask, mode="token_mean", tokens=4, sequences=3)
    seq = aggregate_loss(loss, mask, mode="seq_mean_token_mean", tokens=4, sequences=3)
    assert float(token) == pytest.approx((a + b + c + d) / 4)
    assert float(seq) == pytest.approx((a + (b + c + d) / 3 + 0.0) / 3)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_shares_add_up_to_the_batch_loss(mode):
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(6, 5, generator=gen)
    lengths = [1, 5, 3, 2, 4, 5]
    mask = torch.tensor([[float(c >= 5 - n) for c in range(5)] for n in lengths])
    mask[2] = 0.0  # a row outside the loss
    whole = aggregate_loss(loss, mask, mode=mode, tokens=int(mask.sum()), sequences=6)
    for size in (1, 2, 4):
        parts = sum(
            aggregate_loss(
                loss[i : i + size],
                mask[i : i + size],
                mode=mode,
                tokens=int(mask.sum()),
                sequences=6,
            )
            for i in range(0, 6, size)
        )
        assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def _run(tiny_model_dir, path, *extra, steps=1):
    trainer = Trainer(config(tiny_model_dir, path, "steps=1", "max_new_tokens=16", *extra))
    items = trainer.train_items[: trainer.cfg.batch_size]
    metrics = [trainer.train_step(items) for _ in range(steps)][-1]
    return trainer, metrics


def test_sequence_mean_is_the_same_at_any_micro_batch_size(tiny_model_dir, tmp_path):
    # SDPO skips its successes: rows outside the loss, which the sequence mean still counts
    common = ("algorithm=sdpo", "generation_dtype=float32", "autocast=none")
    runs = {
        size: _run(tiny_model_dir, tmp_path / f"m{size}", "loss_aggregation=seq_mean_token_mean",
                   f"micro_batch_size={size}", *common)
        for size in (1, 4)
    }  # fmt: skip
    (t1, m1), (t4, m4) = runs[1], runs[4]
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-4) and m1["loss"] > 0  # padding: fp noise
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-3)
    # the gradients themselves (AdamW's first step is sign-like, so weights would amplify noise)
    for (name, p1), p4 in zip(t1.model.named_parameters(), t4.model.parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p4.grad, atol=1e-7, rtol=1e-3, msg=name)
    # by hand from the logged token losses (rounded to 1e-5 in the log, hence rel=2e-2):
    # the mean of per-row means over all 4 rows ...
    rows = [
        s["token_losses"] for s in read_jsonl(tmp_path / "m4" / "samples.jsonl") if s["distilled"]
    ]
    assert 0 < len(rows) < m4["rollouts"], "the comparison needs rows outside the loss"
    assert m4["loss"] == pytest.approx(
        sum(sum(r) / len(r) for r in rows) / m4["rollouts"], rel=2e-2
    )
    # ... which is not the token mean, over the distilled tokens alone
    _, token = _run(tiny_model_dir, tmp_path / "tok", "micro_batch_size=4", *common)
    assert token["loss"] == pytest.approx(sum(map(sum, rows)) / sum(map(len, rows)), rel=2e-2)
    assert token["loss"] != pytest.approx(m4["loss"], rel=0.2)


# ---- 2. playbook visibility -------------------------------------------------------------------


def _long_playbook(path, n=60):
    pb = Playbook()
    for i in range(n):
        pb.add(
            "strat",
            f"Lesson number {i}: check the length of the reply and the final line before sending.",
        )
    pb.save(path)
    return path / "playbook.json"


def _playbook_block(prompt: str, tag: str = "playbook") -> list[str]:
    body = prompt.split(f"<{tag}>\n", 1)[1].split(f"\n</{tag}>", 1)[0]
    return [line for line in body.splitlines() if line.strip() and not line.startswith("## ")]


def test_budgets_drop_whole_entries_and_count_them(tiny_model_dir, tmp_path):
    seed = _long_playbook(tmp_path / "pb")
    _, m = _run(tiny_model_dir, tmp_path / "small", f"playbook_init={seed}", "teacher_playbook_tokens=300",
                "reflection_playbook_tokens=100", "curation_playbook_tokens=null", "playbook_prune_every=100")  # fmt: skip
    samples = read_jsonl(tmp_path / "small" / "samples.jsonl")
    lines = _playbook_block(samples[0]["teacher_prompt"])
    assert 0 < len(lines) < 60 and all(ENTRY.match(line) for line in lines)  # whole lines only
    assert m["playbook_omitted_teacher"] == m["playbook_size"] - len(lines)
    assert m["playbook_omitted_curation"] == 0  # null: the whole playbook
    if m["reflections"]:
        assert m["playbook_omitted_reflection"] > m["playbook_omitted_teacher"]


def test_a_playbook_longer_than_the_old_character_cut_is_shown_whole(tiny_model_dir, tmp_path):
    seed = _long_playbook(tmp_path / "pb", n=80)  # ~8,000 characters: past the old 6,000 cut
    _, m = _run(tiny_model_dir, tmp_path / "all", f"playbook_init={seed}", "teacher_playbook_tokens=null",
                "max_teacher_prompt_tokens=60000", "playbook_prune_every=100")  # fmt: skip
    lines = _playbook_block(read_jsonl(tmp_path / "all" / "samples.jsonl")[0]["teacher_prompt"])
    assert len(lines) == m["playbook_size"] >= 80 and all(ENTRY.match(line) for line in lines)
    assert m["playbook_omitted_teacher"] == 0


# ---- 3. the curator ---------------------------------------------------------------------------


def test_add_only_curator_is_told_so_and_other_operations_are_skipped(tiny_model_dir, tmp_path):
    stats = {"total": 1, "high_performing": 0, "problematic": 0, "unused": 1}
    add_only = curation_messages(stats, "r", "p", "t", operations=("ADD",))[0]["content"]
    assert '"type": "ADD"' in add_only and "DELETE" not in add_only and "MERGE" not in add_only
    assert "DELETE" in curation_messages(stats, "r", "p", "t")[0]["content"]
    reply = ('{"operations": [{"type": "DELETE", "id": "strat-00001"}, {"type": "ADD", "section": "Others",'
             ' "content": "Count the characters of a reply before sending it."}]}')  # fmt: skip
    _, m = _run(tiny_model_dir, tmp_path / "add", "curation_ops=add", f"curation_prefill={json.dumps(reply)}",
                "env=toy_envs:ConstantEnv")  # fmt: skip
    assert m["ops_skipped_not_allowed"] >= 1 and m["ops_applied"] >= 1
    assert m["playbook_size"] == 2  # the seed entry survived; one lesson added


def test_the_curator_opener_no_longer_forces_an_operation(tiny_model_dir, tmp_path):
    trainer = Trainer(config(tiny_model_dir, tmp_path / "o", "structured_output=off", "curation_prefill=null",
                             "reflection_prefill=null"))  # fmt: skip
    assert (
        trainer.sampler.prefills["curation"] == '{\n  "reasoning": "'
    )  # the release's reasoning-first reply


# ---- 4. the reflection hand-off ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["drop", "raw"])
def test_an_unparsed_reflection_is_dropped_or_handed_on(tiny_model_dir, tmp_path, mode):
    garbage = "<think>scratch</think>The attempt failed because the reply was too long"
    _, m = _run(tiny_model_dir, tmp_path / mode, f"unparsed_reflection={mode}",
                f"reflection_prefill={json.dumps(garbage)}", "env=toy_envs:ConstantEnv")  # fmt: skip
    samples = read_jsonl(tmp_path / mode / "samples.jsonl")
    assert m["reflections"] == 4 and m["reflection_parse_failures"] == 4
    if mode == "drop":
        assert m["reflections_raw"] == 0
        assert all("<reflection>" not in s["teacher_prompt"] for s in samples)
    else:
        assert m["reflections_raw"] == 4 and m["curations"] == 4
        for s in samples:
            block = s["teacher_prompt"].split("<reflection>\n", 1)[1]
            assert block.startswith("The attempt failed because the reply was too long")
            assert "scratch" not in block  # thinking stripped


# ---- 5. the teacher's feedback when a solution exists -----------------------------------------


@pytest.mark.parametrize("keep_feedback", [True, False])
def test_feedback_beside_a_solution_follows_the_option(keep_feedback):
    """The teacher's context is a pure function of the algorithm's switches and the
    rollout: no model is needed to test what the teacher is shown."""
    from resd.envs.base import Item, Score
    from resd.generation import Generation
    from resd.training.algorithms import ALGORITHMS
    from resd.training.rollout import Rollout
    from resd.training.teacher_context import teacher_context

    item = Item("x/1", [{"role": "user", "content": "Reply."}])
    buffer = SolutionBuffer()
    buffer.add(item.id, "a reply that once worked")
    failed = Rollout(
        item, [1], Generation([5, 6], "xy z", True), Score(0.0, 0.5, "The reply is odd.")
    )
    ctx = teacher_context(ALGORITHMS["resd"], failed, playbook="", buffer=buffer, peers={},
                          feedback_with_solution=keep_feedback)  # fmt: skip
    assert ctx.solution == "a reply that once worked" and ctx.previous_trial == "xy z"
    assert (ctx.feedback == "The reply is odd.") is keep_feedback
    assert ctx.distill  # the solution alone is new context
    # SDPO has no buffer: its teacher sees the feedback only, and no previous attempt
    sdpo = teacher_context(ALGORITHMS["sdpo"], failed, playbook="[p]", buffer=buffer, peers={},
                           feedback_with_solution=keep_feedback)  # fmt: skip
    assert (sdpo.solution, sdpo.feedback, sdpo.previous_trial, sdpo.playbook) == (
        "",
        "The reply is odd.",
        "",
        "",
    )


# ---- 6. the solution buffer -------------------------------------------------------------------


def test_solution_buffer_keeps_the_first_or_the_latest():
    first, latest = SolutionBuffer(), SolutionBuffer(keep="latest")
    for buf in (first, latest):
        assert buf.add("x", "one") and not buf.add("x", "   ")
        buf.add("x", "two")
    assert (first.get("x"), latest.get("x")) == ("one", "two")
    with pytest.raises(ValueError, match="solution_buffer_keep"):
        SolutionBuffer(keep="best")


# ---- 7. rollout correction --------------------------------------------------------------------


def test_the_sampler_records_the_log_prob_of_each_sampled_token(tiny_model_dir):
    from resd.generation.hf import chat_prompt_ids, generate
    from resd.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():  # larger weights: a peaked distribution, so a wrong index shows
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "x y"}])
    (gen,) = generate(model, tok, [prompt], max_new_tokens=8, temperature=0.7, top_p=0.9, seeds=[3],
                      autocast="none", return_logprobs=True)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + gen.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(
        -1, torch.tensor(gen.token_ids)[:, None]
    )
    assert gen.logprobs == pytest.approx(
        expected[:, 0].tolist(), abs=1e-4
    )  # temperature 1, not 0.7
    (plain,) = generate(
        model, tok, [prompt], max_new_tokens=8, temperature=0.7, seeds=[3], autocast="none"
    )
    assert plain.logprobs is None


def test_rollout_correction_weight_by_hand():
    trainer_logp = torch.tensor([[-1.0, -2.0, -0.5]])
    sampler_logp = torch.tensor([[-1.5, -1.0, -2.0]])
    weight = importance_weight(trainer_logp, sampler_logp, 2.0)
    assert weight.tolist()[0] == pytest.approx([math.exp(0.5), math.exp(-1.0), 2.0])
    assert torch.equal(importance_weight(trainer_logp, sampler_logp, None), torch.ones(1, 3))


def test_the_logprob_gap_is_logged_and_the_cap_reweights(tiny_model_dir, tmp_path):
    _, same = _run(tiny_model_dir, tmp_path / "same", "generation_dtype=float32", "autocast=none")
    _, bf16 = _run(tiny_model_dir, tmp_path / "bf16", "generation_dtype=bfloat16", "autocast=none")
    assert same["rollout_logprob_gap"] < 2e-5  # the sampler is the policy itself
    assert bf16["rollout_logprob_gap"] > 10 * max(
        same["rollout_logprob_gap"], 1e-5
    )  # a bf16 copy is not
    _, capped = _run(tiny_model_dir, tmp_path / "cap", "generation_dtype=bfloat16", "autocast=none",
                     "rollout_is_cap=0.01")  # fmt: skip
    assert capped["loss"] < 0.05 * bf16["loss"]  # every token weight is at most 0.01


# ---- 8. the teacher floor in the sampled mode -------------------------------------------------


def test_sampled_mode_floors_the_teacher_by_hand():
    student = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-5.0, -1.0]])
    loss = sampled_token_loss(student, teacher, min_ratio=0.2)
    floored = max(-5.0, -1.0 + math.log(0.2))  # the teacher may not fall below 0.2 × student
    assert loss.tolist()[0] == pytest.approx([-(floored + 1.0) * -1.0, -(-1.0 + 2.0) * -2.0])
    unfloored = sampled_token_loss(student, teacher)
    assert unfloored.tolist()[0][0] == pytest.approx(-(-5.0 + 1.0) * -1.0)


# ---- 9. the pruning schedule ------------------------------------------------------------------


def test_pruning_fires_after_every_f_context_updates():
    assert [s for s in range(1, 14) if prune_due(s, 4)] == [5, 9, 13]
    assert [s for s in range(1, 6) if prune_due(s, 1)] == [2, 3, 4, 5]
