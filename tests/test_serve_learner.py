"""The serving learner: off-policy steps on given rollouts, the guard, the hot swap and
exactly-once consumption of stored feedback, with the real trainer, store and holder."""

from __future__ import annotations

import pytest
import torch

from resd.analysis.evaluation import safe_score
from resd.generation.hf import chat_prompt_ids
from resd.training.rollout import GivenRollout, row_seed
from resd.training.trainer import Trainer
from test_trainer import config


def test_given_rollouts_train_exactly_like_sampled_ones(tiny_model_dir, tmp_path):
    """The off-policy entry is the on-policy step with its sampling moved outside: given
    the very replies the step would have sampled, the step ends in the same place."""
    sampled = Trainer(config(tiny_model_dir, tmp_path / "a", "rollout_is_cap=2.0"))
    given_to = Trainer(config(tiny_model_dir, tmp_path / "b", "rollout_is_cap=2.0"))
    items = sampled.train_items[: sampled.cfg.batch_size]
    on_policy = sampled.train_step(items)

    cfg = given_to.cfg
    given_to._seed(cfg.seed * 1_000_003 + 1)  # what train_step does first at step 1
    prompts = [
        chat_prompt_ids(given_to.tokenizer, it.messages, cfg.max_prompt_tokens) for it in items
    ]
    gens = given_to.sampler.rollouts(
        prompts, [row_seed(cfg.seed, 1, "rollout", g) for g in range(len(items))]
    )
    given = [GivenRollout(it, p, gen, safe_score(given_to.env, it, gen.text))
             for it, p, gen in zip(items, prompts, gens, strict=True)]  # fmt: skip
    off_policy = given_to.train_step([], given)

    for key in (
        "loss",
        "reward",
        "score",
        "distilled",
        "reflections",
        "playbook_size",
        "grad_norm",
    ):
        assert off_policy[key] == pytest.approx(on_policy[key], rel=1e-6, abs=1e-9), key
    for (name, a), b in zip(
        sampled.model.state_dict().items(), given_to.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # fmt: skip
    assert sampled.playbook.render() == given_to.playbook.render()
