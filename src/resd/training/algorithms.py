"""Algorithms as configurations of the one trainer.

Each algorithm is a set of switches read by `trainer.Trainer`; there is one training
loop. The switches say what the teacher is shown, which samples are distilled, and how
the self-distillation loss is mixed with a reward-driven policy-gradient loss.

| algorithm            | teacher sees                                   | distils successes | objective |
|----------------------|------------------------------------------------|-------------------|-----------|
| resd                 | playbook, attempt, feedback, reflection, B(x)  | yes               | SD        |
| resd_no_reflection   | playbook (curated from feedback), attempt, fb  | yes               | SD        |
| resd_no_playbook     | attempt, feedback, reflection, B(x)            | yes               | SD        |
| resd_no_buffer       | as resd, successful trial only if its own      | yes               | SD        |
| sdpo                 | feedback, successful peer (N > 1)              | no                | SD        |
| sdpo_ss              | feedback, successful peer, own success         | yes               | SD        |
| sdft                 | a reference demonstration from the environment | yes               | SD        |
| grpo                 | (no teacher)                                   | —                 | PG        |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    description: str
    reflection: bool = False  # the student reflects on failures; the teacher sees the reflection
    playbook: bool = False  # curate a global playbook; the teacher sees it
    solution_buffer: bool = False  # remember the first success per prompt for later tries
    feedback: bool = True  # the teacher sees the environment's feedback
    distill_successes: bool = True  # successful rollouts are distilled (own success as context)
    peer_solution: bool = False  # with N > 1, show a successful sibling rollout (SDPO)
    previous_trial: bool = False  # the teacher sees the attempt it is scoring
    demonstration: bool = False  # the teacher sees the environment's reference answer (SDFT)
    distillation_weight: float = 1.0  # λ: loss = (1 − λ)·policy gradient + λ·self-distillation


_RESD = {"reflection": True, "playbook": True, "solution_buffer": True, "previous_trial": True}

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm("resd", "RESD: reflection + global playbook + solution buffer", **_RESD),
        Algorithm(
            "resd_no_reflection",
            "RESD ablation: no reflection; the playbook is curated from raw feedback",
            **{**_RESD, "reflection": False},
        ),
        Algorithm(
            "resd_no_playbook",
            "RESD ablation: no playbook in any prompt",
            **{**_RESD, "playbook": False},
        ),
        Algorithm(
            "resd_no_buffer",
            "RESD ablation: no solution buffer across inner iterations",
            **{**_RESD, "solution_buffer": False},
        ),
        Algorithm(
            "sdpo",
            "SDPO: feedback (+ successful peer when N > 1); skips self-successful samples",
            distill_successes=False,
            peer_solution=True,
        ),
        Algorithm(
            "sdpo_ss",
            "SDPO + self-success: also distils on its own successes",
            peer_solution=True,
        ),
        Algorithm(
            "sdft",
            "SDFT: the teacher sees a reference demonstration (use alpha=1, teacher_update_rate=0.01)",
            feedback=False,
            demonstration=True,
        ),
        Algorithm(
            "grpo",
            "GRPO: N rollouts per prompt, group-normalised advantages, clipped ratio",
            feedback=False,
            distill_successes=False,
            distillation_weight=0.0,
        ),
    ]
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"algorithm: unknown {name!r}; choose from {', '.join(ALGORITHMS)}"
        ) from None
