"""Validation metrics, as the paper reports them: per-task and per-test-case accuracy,
mean@k and best@k.

per-task accuracy   : the reward (all tests pass) of a sample;
per-test-case acc.  : the partial score (fraction of tests passed) of a sample;
mean@k / best@k     : over k samples per item, the mean / the best, averaged over items.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from resd.envs.base import Environment, Item, NotAScoreError, Score
from resd.envs.scorers import ScorerTimeout
from resd.generation.hf import chat_prompt_ids
from resd.rundir import REWARD_PREFIX

log = logging.getLogger(__name__)


def aggregate(outcomes: Sequence[Sequence[Score]]) -> dict[str, float]:
    """Pure metric arithmetic over `outcomes[item][sample]`."""
    if not outcomes or any(len(o) == 0 for o in outcomes):
        raise ValueError("aggregate: need at least one sample for every item")
    n = len(outcomes)
    k = len(outcomes[0])

    def over_items(fn: Callable[[Sequence[Score]], float]) -> float:
        return sum(fn(o) for o in outcomes) / n

    return {
        "task_mean@k": over_items(lambda o: sum(s.reward for s in o) / len(o)),
        "task_best@k": over_items(lambda o: max(s.reward for s in o)),
        "case_mean@k": over_items(lambda o: sum(s.score for s in o) / len(o)),
        "case_best@k": over_items(lambda o: max(s.score for s in o)),
        "k": float(k),
        "items": float(n),
        **reward_means(s.parts.items() for o in outcomes for s in o),
    }


def reward_means(parts: Iterable[Iterable[tuple[str, float]]]) -> dict[str, float]:
    """Each reward function's mean over the replies whose `parts` (`Score.parts` items) are
    given, as `rewards/<name>` (TRL's `rewards/<name>/mean`), where a list of them scores
    the replies (a dataset's `scorer`): which of them a run improves, or gives up, is hidden
    in the one combined score. Empty for an environment that scores in one piece."""
    values: dict[str, list[float]] = {}
    for reply in parts:
        for name, value in reply:
            values.setdefault(name, []).append(value)
    return {f"{REWARD_PREFIX}{name}": sum(v) / len(v) for name, v in values.items()}


def safe_score(env: Environment, item: Item, response: str) -> Score:
    """An environment that raises must not kill a training run: count it as a failure.

    Except a scorer that ran past its time limit: it would cost the whole limit, and leave
    a thread behind, on every reply after this one, so the run stops with its message.
    And a `score` that returns something other than a `Score` (a float, a tuple), or one
    whose feedback is not text: that is the environment's bug on every reply, so it stops
    the run with what to return.
    """
    try:
        result = env.score(item, response)
    except ScorerTimeout:
        raise
    except Exception as exc:
        log.warning("environment raised while scoring %s: %r", item.id, exc)
        return Score(0.0, 0.0, f"The checker failed on this response: {type(exc).__name__}: {exc}")
    # A bug in the environment, not a failed reply: stop, saying what to return.
    name = f"env: {type(env).__name__}.score"
    if not isinstance(result, Score):
        raise NotAScoreError(
            f"{name} returned {type(result).__name__} ({result!r:.60}), not a Score: return "
            f"resd.envs.Score(reward=..., score=..., feedback='what went wrong'); the "
            f"feedback is what the teacher reads"
        )
    if not isinstance(result.feedback, str):
        raise NotAScoreError(f"{name} returned a Score whose feedback is "
                             f"{type(result.feedback).__name__}, not text (use \"\" for no "
                             f"feedback)")  # fmt: skip
    return result


def evaluate(
    sampler,
    tokenizer,
    env: Environment,
    items: Sequence[Item],
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_prompt_tokens: int,
    top_k: int = 0,
    min_p: float = 0.0,
    prompt_messages: Callable[[Item], list[dict[str, str]]] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Sample k answers per item and score them; returns metrics and per-sample records.

    `sampler` is any generation backend (`resd.generation.hf.TransformersSampler`, vLLM).
    """
    build = prompt_messages or (lambda item: item.messages)
    prompts = [chat_prompt_ids(tokenizer, build(item), max_prompt_tokens) for item in items]
    flat = [p for p in prompts for _ in range(samples)]
    gens = sampler.generate(flat, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, min_p=min_p)  # fmt: skip
    outcomes: list[list[Score]] = []
    records: list[dict] = []
    for i, item in enumerate(items):
        scores = []
        for j in range(samples):
            gen = gens[i * samples + j]
            s = safe_score(env, item, gen.text)
            scores.append(s)
            records.append(
                {
                    "item": item.id,
                    "sample": j,
                    "response": gen.text,
                    "reward": s.reward,
                    "score": s.score,
                    **({"parts": s.parts} if s.parts else {}),
                }
            )
        outcomes.append(scores)
    return aggregate(outcomes), records
