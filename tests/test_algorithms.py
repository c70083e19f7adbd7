"""Each algorithm's distinguishing behaviour, LoRA, teacher kinds, and TRL's GRPO loss as oracle."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from resd.envs.base import Score
from resd.generation.base import Generation
from resd.generation.hf import chat_prompt_ids
from resd.models import load_model
from resd.training.algorithms import ALGORITHMS
from resd.training.losses import group_advantages, policy_gradient_loss
from resd.training.rollout import GivenRollout
from resd.training.teacher import Teacher
from resd.training.trainer import Trainer
from test_trainer import config, read_jsonl


def step(tiny_model_dir, tmp_path, name: str, *extra: str, steps: int = 1):
    trainer = Trainer(config(tiny_model_dir, tmp_path / name, *extra))
    items = trainer.train_items[: trainer.cfg.batch_size]
    metrics = [trainer.train_step(items) for _ in range(steps)]
    return trainer, metrics[-1], read_jsonl(tmp_path / name / "samples.jsonl")


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_trains_and_shows_the_teacher_what_it_says(tiny_model_dir, tmp_path, name):
    algo = ALGORITHMS[name]
    trainer, m, samples = step(
        tiny_model_dir, tmp_path, name, f"algorithm={name}", "rollouts_per_prompt=2", steps=2
    )
    assert math.isfinite(m["loss"])
    moved = any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), load_model(str(tiny_model_dir)).parameters(), strict=True))  # fmt: skip
    assert moved == (m["grad_norm"] > 0 or trainer.step > 1)  # the optimizer stepped on a gradient
    for s in (s for s in samples if s["teacher_prompt"]):
        prompt = s["teacher_prompt"]
        assert ("<playbook>" in prompt) <= algo.playbook  # the switches decide the context
        assert ("<reflection>" in prompt) <= algo.reflection
        assert ("<previous_trial>" in prompt) == algo.previous_trial
        assert ("<feedback>" in prompt) == (algo.feedback and bool(s["feedback"]))
    if algo.distillation_weight == 0:
        assert m["distilled"] == 0 and m["time_teacher"] == 0.0


def test_sdft_teacher_sees_the_demonstration(tiny_model_dir, tmp_path):
    _, m, samples = step(tiny_model_dir, tmp_path, "sdft", "algorithm=sdft")
    assert m["distilled"] == 4 and m["reflections"] == 0
    for s in samples:
        assert "<successful_trial>\nab\n</successful_trial>" in s["teacher_prompt"]
        assert "<feedback>" not in s["teacher_prompt"] and "<playbook>" not in s["teacher_prompt"]


def test_sdft_without_demonstrations_is_refused_or_warned(tiny_model_dir, tmp_path, caplog):
    """SDFT's teacher reads each item's reference; a dataset without `reference_column`
    has none, and such a run distilled nothing in every step (loss 0, `distilled` 0)
    while looking like it trained. Catches that run starting, and items without a
    reference going unmentioned when only some have one."""
    import logging

    from toy_envs import ParityEnv

    env = ParityEnv(n_train=8)
    for item in env.train_items():
        item.reference = None
    with pytest.raises(ValueError, match=r"^algorithm: sdft distils .* no training item of "
                       r"env 'parity' has one .*env_args.reference_column"):  # fmt: skip
        Trainer(config(tiny_model_dir, tmp_path / "none", "algorithm=sdft"), env=env)
    env.train_items()[3].reference = "ab"
    with caplog.at_level(logging.WARNING, logger="resd.training.trainer"):
        Trainer(config(tiny_model_dir, tmp_path / "some", "algorithm=sdft"), env=env)
    assert "7 of 8 training items of env 'parity' have none" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="resd.training.trainer"):
        Trainer(config(tiny_model_dir, tmp_path / "sdpo", "algorithm=sdpo"), env=env)
    assert "demonstrations" not in caplog.text  # only SDFT reads them


def test_sdpo_with_self_success_keeps_sdpos_successful_sibling(tiny_model_dir, tmp_path):
    """SDPO + self-success is SDPO that also distils its own successes (the method's §7): with
    N = 2 a failure whose sibling succeeded is shown that sibling, and the success its own
    reply. Catches `sdpo_ss` losing SDPO's peer solution (then the failure sees feedback only)."""
    _, m, samples = step(
        tiny_model_dir, tmp_path, "sdpo_ss", "algorithm=sdpo_ss", "rollouts_per_prompt=2",
        "log_samples=8", "max_new_tokens=9",
    )  # fmt: skip
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        groups[s["item"]].append(s)
    mixed = [g for g in groups.values() if {s["reward"] for s in g} == {0.0, 1.0}]
    assert mixed, "the toy task should give a prompt with one success and one failure"
    for group in mixed:
        fail = next(s for s in group if s["reward"] == 0)
        win = next(s for s in group if s["reward"] == 1)
        solution = f"<successful_trial>\n{win['response'].strip()}\n</successful_trial>"
        assert solution in fail["teacher_prompt"] and solution in win["teacher_prompt"]
    assert m["distilled"] == 8 and m["reflections"] == 0


def test_resd_without_the_buffer_shows_a_failure_no_earlier_success(tiny_model_dir, tmp_path):
    """The `resd_no_buffer` ablation (the method's §3, §7): a success is distilled on its own
    reply, but nothing carries it to a later inner step, so no failure sees a successful
    trial. Catches the ablation keeping RESD's solution buffer (then it is RESD itself)."""
    _, m, samples = step(
        tiny_model_dir, tmp_path, "nobuf", "algorithm=resd_no_buffer", "log_samples=8",
        "batch_size=8", steps=2,
    )  # fmt: skip
    solved = {s["item"] for s in samples if s["step"] == 1 and s["reward"] == 1}
    again = [s for s in samples if s["step"] == 2 and s["item"] in solved and s["reward"] == 0]
    assert again, "the toy task should fail at step 2 on a prompt solved at step 1"
    for s in samples:
        assert ("<successful_trial>" in s["teacher_prompt"]) == (s["reward"] == 1)
    assert m["buffer_size"] == 0


def test_resds_teacher_and_buffer_see_the_answer_not_the_reasoning(tiny_model_dir, tmp_path):
    """RESD's teacher is shown the previous trial with its `<think>` block removed (the
    method's §3, step 7: "thinking removed"), and a success enters the solution buffer the
    same way. Given replies stand in for a thinking model's. Catches `Rollout.response`
    keeping the reasoning."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "think", "log_samples=2"))
    items = trainer.train_items[:2]
    replies = [("<think>two letters</think>ab", Score(1.0, 1.0, "")),
               ("<think>three letters</think>abc", Score(0.0, 0.5, "The reply is odd."))]  # fmt: skip
    limit = trainer.cfg.max_prompt_tokens
    given = [
        GivenRollout(item, chat_prompt_ids(trainer.tokenizer, item.messages, limit),
                     Generation(trainer.tokenizer.encode(text), text, True), score)
        for item, (text, score) in zip(items, replies, strict=True)
    ]  # fmt: skip
    trainer.train_step([], given)
    samples = read_jsonl(tmp_path / "think" / "samples.jsonl")
    failed = next(s["teacher_prompt"] for s in samples if s["reward"] == 0)
    assert "<previous_trial>\nabc\n</previous_trial>" in failed and "letters" not in failed
    assert trainer.buffer.solutions[items[0].id] == "ab"


def test_an_algorithm_name_set_after_the_config_is_checked_is_still_refused(
    tiny_model_dir, tmp_path
):
    """A config edited in Python after it was checked (`cfg.algorithm = ...`) reaches
    `Trainer` unchecked: an unknown name must stop it, naming the choices, not train some
    other method or fail later for want of one. Catches `get_algorithm` returning None or a
    default algorithm for a name it does not know."""
    cfg = config(tiny_model_dir, tmp_path / "run")
    cfg.algorithm = "ppo"
    with pytest.raises(ValueError, match="algorithm: unknown 'ppo'; choose from resd, "):
        Trainer(cfg)


def test_grpo_equal_rewards_give_zero_advantage_and_no_update(tiny_model_dir, tmp_path):
    assert torch.equal(group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2), torch.zeros(4))
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, scale_std=False)
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    _trainer, m, _ = step(
        tiny_model_dir, tmp_path, "grpo0", "algorithm=grpo", "env=toy_envs:ConstantEnv",
        "rollouts_per_prompt=4", "weight_decay=0",
    )  # fmt: skip
    assert m["pg_loss"] == 0.0 and m["grad_norm"] == 0.0 and m["time_teacher"] == 0.0
    assert m["distilled"] == 0


def test_grpo_learns_from_mixed_groups_without_a_teacher(tiny_model_dir, tmp_path):
    _trainer, m, _ = step(
        tiny_model_dir, tmp_path, "grpo", "algorithm=grpo", "rollouts_per_prompt=4"
    )
    assert 0 < m["success_rate"] < 1
    assert m["grad_norm"] > 0 and m["sd_loss"] == 0.0 and m["time_teacher"] == 0.0


def test_mixed_objective_combines_both_losses(tiny_model_dir, tmp_path):
    _, pure, _ = step(tiny_model_dir, tmp_path, "pure", "rollouts_per_prompt=2")
    _, mixed, _ = step(
        tiny_model_dir, tmp_path, "mixed", "distillation_weight=0.5", "rollouts_per_prompt=2"
    )
    assert mixed["success_rate"] == pure["success_rate"]  # same seeds, same rollouts
    assert mixed["sd_loss"] == pytest.approx(pure["sd_loss"])
    assert mixed["loss"] == pytest.approx(0.5 * mixed["sd_loss"] + 0.5 * mixed["pg_loss"])
    # the policy-gradient half changes the gradient, even when its loss value is 0
    # (advantages sum to zero in each group, so equal-length replies cancel in value only)
    assert mixed["grad_norm"] != pytest.approx(0.5 * pure["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("mode", ["full", "sampled"])
def test_distillation_modes(tiny_model_dir, tmp_path, mode):
    _, m, samples = step(tiny_model_dir, tmp_path, mode, f"distillation_mode={mode}")
    assert m["sd_loss"] == m["sd_loss"] and m["grad_norm"] > 0
    assert all(len(s["token_losses"]) == len(s["tokens"]) for s in samples if s["distilled"])


def test_several_update_epochs_take_several_optimizer_steps(tiny_model_dir, tmp_path):
    trainer, _m, _ = step(tiny_model_dir, tmp_path, "epochs", "update_epochs=3", "is_clip=2.0")
    states = list(trainer.optimizer.state.values())
    assert states and all(int(s["step"]) == 3 for s in states)


def test_student_playbook_is_shown_only_when_asked(tiny_model_dir, tmp_path):
    hidden = Trainer(config(tiny_model_dir, tmp_path / "hidden"))
    shown = Trainer(config(tiny_model_dir, tmp_path / "shown", "student_playbook=true"))
    item = hidden.train_items[0]
    assert hidden.lessons.student_messages(item) == item.messages
    text = shown.lessons.student_messages(item)[-1]["content"]
    assert text.startswith("Lessons from earlier tasks:") and "Keep replies short." in text
    assert item.messages[-1]["content"] in text and "Lessons" not in item.messages[-1]["content"]


def test_trust_region_teacher_mixes_base_and_current_logits(tiny_model_dir):
    from resd.models import load_model

    model = load_model(str(tiny_model_dir))
    teacher = Teacher(model, "trust_region", mix_weight=0.25)
    ids = torch.tensor([[5, 6, 7, 8]])
    base = model(input_ids=ids).logits.detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    current = model(input_ids=ids).logits.detach()
    mixed = teacher.logits(model, lambda m: m(input_ids=ids).logits)
    torch.testing.assert_close(mixed, 0.75 * base + 0.25 * current, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_ema_update_by_hand_at_rate_0_1(tiny_model_dir, lora):
    """θ_T ← 0.9·θ_T + 0.1·θ: at rate 0.5 `lerp(t, s, r)` and `lerp(t, s, 1 − r)` agree, so
    only an asymmetric rate catches a reversed update."""
    from resd.models import load_model

    student = load_model(str(tiny_model_dir))
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(
            student, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
        )
    teacher = Teacher(student, "ema", 0.1)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in student.named_parameters() if n in names}
    with torch.no_grad():
        for n, p in student.named_parameters():
            if n in names:
                p.add_(1.0)  # the student moves by exactly 1 everywhere
    teacher.update(student)
    now = teacher.adapter if lora else dict(teacher.copy.named_parameters())
    for n in names if lora else names[:3]:
        torch.testing.assert_close(now[n], before[n] + 0.1, atol=1e-6, rtol=0)


def test_lora_ema_teacher_is_a_second_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel

    trainer, _m, _ = step(
        tiny_model_dir, tmp_path, "lora", "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "teacher=ema", "teacher_update_rate=0.5", "save_every=1", "generation_dtype=bfloat16",
    )  # fmt: skip
    teacher = trainer.teacher
    assert teacher.lora and teacher.copy is None  # no second copy of the base weights
    assert teacher.adapter and all("lora_" in name for name in teacher.adapter)
    n_base = sum(p.numel() for p in trainer.model.parameters())
    assert sum(t.numel() for t in teacher.adapter.values()) < 0.2 * n_base
    student = dict(trainer.model.named_parameters())
    assert any(not torch.equal(teacher.adapter[n], student[n]) for n in teacher.adapter)
    # it samples from a plain bf16 copy with the adapter merged in, synced after the step
    from resd.generation.vllm_engine import merged_lora_weights

    assert not hasattr(trainer.sampler.generator, "peft_config")
    sampled = dict(trainer.sampler.generator.named_parameters())
    merged = dict(merged_lora_weights(trainer.model))
    assert sampled.keys() == merged.keys()
    assert all(torch.equal(sampled[n], t.to(torch.bfloat16)) for n, t in merged.items())
    from resd.models import load_model

    base = dict(load_model(str(tiny_model_dir)).named_parameters())
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])  # the adapter moved  # fmt: skip
    # a LoRA run saves a loadable PEFT adapter
    ckpt = trainer.save()
    assert (ckpt / "adapter_config.json").exists()

    loaded = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(ckpt))
    ids = torch.tensor([[5, 6, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how the trainer computes: exactly
        torch.testing.assert_close(
            loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits, rtol=0, atol=0
        )
    # in float32 too, where the policy's frozen weights were kept in autocast's bf16
    # (`cast_frozen_linears`, on a CPU with fast bf16) only up to their rounding
    torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                               rtol=0, atol=2e-3)  # fmt: skip
    # and resumes with the teacher adapter intact
    resumed = Trainer(trainer.cfg, resume=True)
    assert resumed.step == 1
    for n, t in teacher.adapter.items():
        torch.testing.assert_close(resumed.teacher.adapter[n], t)


def test_frozen_linears_kept_in_the_autocast_dtype_compute_exactly_as_before(tiny_model_dir):
    """`cast_frozen_linears` stores a LoRA policy's frozen linear weights in bf16 and
    `keep_adapter_inputs` stops PEFT widening the adapters' inputs to float32. Under bf16
    autocast the logits and the adapter's gradients must be bit-for-bit those of the
    float32 model (autocast rounds those weights and inputs to bf16 anyway); the adapters,
    norms, embeddings and the tied head stay float32; outside autocast the model still
    runs."""
    import copy

    from peft import LoraConfig, get_peft_model

    from resd.training.policy import AutocastLinear, cast_frozen_linears, keep_adapter_inputs

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    plain = get_peft_model(load_model(str(tiny_model_dir)), lora)
    cast = copy.deepcopy(plain)
    assert cast_frozen_linears(cast, torch.bfloat16) > 0
    assert keep_adapter_inputs(cast) > 0
    for name, p in cast.named_parameters():
        frozen_linear = not p.requires_grad and any(
            f".{k}." in name for k in ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "base_layer")
        )  # fmt: skip
        assert p.dtype == (torch.bfloat16 if frozen_linear else torch.float32), name
    assert isinstance(
        cast.get_submodule("base_model.model.model.layers.0.mlp.up_proj"), AutocastLinear
    )
    assert cast.get_output_embeddings().weight is cast.get_input_embeddings().weight  # still tied

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    results = []
    for model in (plain, cast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])
    with torch.no_grad():  # float32, no autocast: the frozen weights widen for the call
        out = cast(input_ids=ids).logits
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, plain(input_ids=ids).logits, rtol=0, atol=2e-3)


@pytest.mark.parametrize("autocast", ["bfloat16", "none"])
def test_trainer_keeps_frozen_linears_in_bf16_only_under_autocast(
    tiny_model_dir, tmp_path, autocast
):
    """Under autocast a LoRA policy's frozen linears are bf16 and a step trains, syncs the
    sampler and keeps the EMA adapter in float32; without autocast nothing is cast (a
    bf16 weight would then change what the float32 model computes)."""
    trainer, metrics, _ = step(
        tiny_model_dir, tmp_path, autocast, "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        f"autocast={autocast}", "generation_dtype=bfloat16",
    )  # fmt: skip
    q_base = trainer.model.get_submodule(
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer"
    )
    expected = torch.bfloat16 if autocast == "bfloat16" else torch.float32
    assert q_base.weight.dtype == expected
    q = trainer.model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert q.cast_input_dtype_enabled == (autocast == "none")  # PEFT's float32 input cast
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)
    assert all(t.dtype == torch.float32 for t in trainer.teacher.adapter.values())
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    from resd.generation.vllm_engine import merged_lora_weights

    sampled = dict(trainer.sampler.generator.named_parameters())
    assert all(
        torch.equal(sampled[n], t.to(torch.bfloat16)) for n, t in merged_lora_weights(trainer.model)
    )


def test_kl_reference_term(tiny_model_dir, tmp_path):
    """After one step the policy has left the reference, so from step 2 on the k3 KL term
    changes the loss and the gradient (at step 1 both are identical: KL and its gradient
    are 0 there, so a one-step test could not fail)."""
    common = (
        "algorithm=grpo",
        "rollouts_per_prompt=4",
        "generation_dtype=float32",
        "autocast=none",
    )
    trainer, with_kl, _ = step(tiny_model_dir, tmp_path, "kl", *common, "kl_coef=0.5", steps=2)
    _, without, _ = step(tiny_model_dir, tmp_path, "nokl", *common, "kl_coef=0", steps=2)
    assert trainer.reference is not None
    assert with_kl["reward"] == without["reward"]  # same rollouts: the first step's KL is zero
    assert with_kl["loss"] > without["loss"]  # k3 KL is non-negative and now positive
    assert with_kl["grad_norm"] != pytest.approx(without["grad_norm"], rel=1e-6)
    assert json.loads(json.dumps(with_kl))  # metrics stay JSON-serialisable


# ---- TRL's GRPO loss as the oracle ---------------------------------------------------------
def trl_grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, low, high, beta):
    """Call TRL's own GRPOTrainer._compute_loss on given log-probs ('bnpo' = token-mean)."""
    identity = SimpleNamespace(
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
        sync_gradients=True,
    )  # fmt: skip
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type="bnpo", epsilon_low=low, epsilon_high=high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=identity, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    batch, width = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2),
        "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp,
    }  # fmt: skip
    grpo_module = pytest.importorskip("trl.trainer.grpo_trainer")  # only the oracle needs trl
    return grpo_module.GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_token_loss_matches_trl(beta):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=g) * 3
    old = logp + 0.4 * torch.randn(4, 6, generator=g)  # ratios on both sides of the clip range
    ref = logp + 0.3 * torch.randn(4, 6, generator=g)
    adv = torch.tensor([1.5, -0.5, 0.0, -1.0])
    mask = (torch.rand(4, 6, generator=g) > 0.2).float()
    ours = policy_gradient_loss(
        logp, old, adv, clip_low=0.2, clip_high=0.28, ref_logp=ref, kl_coef=beta
    )
    ours = (ours * mask).sum() / mask.sum()
    theirs = trl_grpo_loss(logp, old, ref, adv, mask, low=0.2, high=0.28, beta=beta)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "full", "sampled"])
def test_chunked_loss_matches_the_plain_path(tiny_model_dir, tmp_path, mode):
    """Same rollouts, same teacher: chunked and plain paths give the same loss and gradient."""
    results = []
    for chunk in ("null", "3"):
        trainer = Trainer(config(tiny_model_dir, tmp_path / f"{mode}-{chunk}", f"distillation_mode={mode}",
                                 f"loss_chunk_size={chunk}", "topk=7", "teacher=base", "autocast=none"))  # fmt: skip
        m = trainer.train_step(trainer.train_items[:4])
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
        results.append((m, grads))
    (plain, d_plain), (chunked, d_chunked) = results
    assert plain["tokens"] == chunked["tokens"] > 0
    assert chunked["sd_loss"] == pytest.approx(plain["sd_loss"], rel=1e-4, abs=1e-7)
    assert chunked["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-3)
    for n in d_plain:
        torch.testing.assert_close(d_chunked[n], d_plain[n], atol=1e-6, rtol=1e-2)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_precision_follows_the_devices_bf16_kernels(
    tiny_model_dir, tmp_path, monkeypatch, fast
):
    """`auto` samples and autocasts in bf16 only where bf16 is fast; elsewhere the policy
    samples from its own fp32 weights, with no copy (an AVX2 CPU prefilled 6-7x slower in
    bf16: benchmarks/cpu_precision.py). Whether this CPU is fast is `fast_bfloat16`'s
    answer (tested in test_models.py); the other answer is forced, since no single machine
    has both."""
    from resd import models
    from resd.training.policy import sampling_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "_fast_bfloat16", lambda kind: fast)
    trainer, m, _ = step(tiny_model_dir, tmp_path, "auto", "autocast=auto")
    assert trainer.cfg.generation_dtype == "auto" and math.isfinite(m["loss"])
    sampled = next(trainer.sampler.generator.parameters()).dtype
    assert sampled == (torch.bfloat16 if fast else torch.float32)
    assert (trainer.sampler.generator is trainer.model) == (not fast)  # no second copy
    assert sampling_dtype(trainer.cfg, cpu) == ("bfloat16" if fast else "float32")
    assert models.resolve_dtype("auto", cpu) == ("bfloat16" if fast else "float32")
    assert models.resolve_dtype("float16", cpu) == "float16"  # an explicit choice stands
    assert models.autocast_context(cpu, "auto")._enabled == fast
    assert models.autocast_context(cpu, "bfloat16")._enabled  # explicit: on regardless
