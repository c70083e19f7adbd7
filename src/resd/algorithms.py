"""Algorithms as configurations of the one trainer.

Each algorithm is a set of switches read by `trainer.Trainer`; there is one training
loop. The switches say what the teacher is shown and which samples are distilled.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    description: str
    reflection: bool  # the student reflects on its failures; the teacher sees the reflection
    playbook: bool  # curate a global playbook; the teacher sees it
    solution_buffer: bool  # remember the first success per prompt, show it on later tries
    feedback: bool = True  # the teacher sees the environment's feedback
    distill_successes: bool = True  # successful rollouts are distilled too (own success as context)
    peer_solution: bool = False  # with N > 1, show a successful sibling rollout (SDPO)
    previous_trial: bool = True  # the teacher sees the attempt it is scoring (RESD); SDPO does not


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in [
        Algorithm("resd", "RESD: reflection + global playbook + solution buffer", True, True, True),
        Algorithm(
            "resd_no_reflection", "RESD ablation: curate from raw feedback", False, True, True
        ),
        Algorithm(
            "resd_no_playbook",
            "RESD ablation: no playbook in the teacher context",
            True,
            False,
            True,
        ),
        Algorithm(
            "resd_no_buffer",
            "RESD ablation: no solution buffer across inner iterations",
            True,
            True,
            False,
        ),
        Algorithm(
            "sdpo",
            "SDPO: feedback (+ successful peer when N > 1); skips self-successful samples",
            False,
            False,
            False,
            distill_successes=False,
            peer_solution=True,
            previous_trial=False,
        ),
        Algorithm(
            "sdpo_ss",
            "SDPO + self-success: also distils on its own successes",
            False,
            False,
            False,
            peer_solution=True,
            previous_trial=False,
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
