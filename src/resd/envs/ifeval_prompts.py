"""Seeded generator of fresh IFEval-style prompts, each with 1-3 compatible constraints.

Training must never see the evaluation prompts, so training prompts are drawn here: a
task stem about a topic, followed by one phrasing of each chosen instruction, with
keyword arguments sampled to match. A combination is kept only if the template reference
(`resd.envs.ifeval_reference`) satisfies it, so every generated item is known to be
solvable. Topics, stems and word pools come from `resd.envs.ifeval_banks`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from resd.envs import ifeval_banks as banks
from resd.envs.base import Item
from resd.envs.ifeval_checks import INSTRUCTION_IDS, LANGUAGE_NAMES, check_instruction
from resd.envs.ifeval_reference import build_reference

__all__ = ["CONFLICTS", "generate_items"]


# --------------------------------------------------------------------------- conflicts

# Pairs that contradict each other or that the checks cannot tell apart (e.g. *** inside
# "******"), by the part of the id after the colon; the relation is made symmetric below.
_CONFLICT_TEXT = {
    "english_lowercase": "english_capital capital_word_frequency postscript multiple_sections "
    "repeat_prompt response_language",
    "english_capital": "capital_word_frequency multiple_sections repeat_prompt response_language "
    "json_format",
    "capital_word_frequency": "repeat_prompt response_language json_format",
    "response_language": "existence frequency letter_frequency repeat_prompt end_checker "
    "nth_paragraph_first_word number_words json_format",
    "json_format": "two_responses repeat_prompt end_checker quotation title postscript "
    "multiple_sections number_paragraphs nth_paragraph_first_word number_bullet_lists "
    "number_highlighted_sections number_sentences",
    "two_responses": "repeat_prompt number_paragraphs nth_paragraph_first_word "
    "multiple_sections end_checker quotation postscript number_bullet_lists",
    "repeat_prompt": "quotation nth_paragraph_first_word",
    "number_paragraphs": "nth_paragraph_first_word multiple_sections number_sentences",
    "nth_paragraph_first_word": "multiple_sections number_sentences number_bullet_lists",
    "number_sentences": "number_words number_bullet_lists",
    "number_bullet_lists": "number_highlighted_sections",
    "end_checker": "postscript",
}
# A yes/no answer only combines with constraints that leave that one sentence intact.
_CONSTRAINED_PARTNERS = "no_comma quotation title postscript forbidden_words existence"


def _build_conflicts() -> dict[str, frozenset[str]]:
    full = {iid.split(":", 1)[1]: iid for iid in INSTRUCTION_IDS}
    pairs: set[tuple[str, str]] = set()
    for short, others in _CONFLICT_TEXT.items():
        pairs.update((full[short], full[other]) for other in others.split())
    constrained = full["constrained_response"]
    partners = {full[name] for name in _CONSTRAINED_PARTNERS.split()}
    pairs.update((constrained, iid) for iid in INSTRUCTION_IDS if iid not in partners)
    conflicts: dict[str, set[str]] = {iid: set() for iid in INSTRUCTION_IDS}
    for a, b in pairs:
        if a != b:
            conflicts[a].add(b)
            conflicts[b].add(a)
    return {iid: frozenset(others) for iid, others in conflicts.items()}


CONFLICTS: dict[str, frozenset[str]] = _build_conflicts()


# ------------------------------------------------------------------- constraint samplers


@dataclass
class _Draft:
    """What a constraint sampler may need: the rng, the task stem and the words in use."""

    rng: random.Random
    stem: str
    taken: set[str]

    def words(self, pool: Sequence[str], count: int) -> list[str]:
        """Fresh words, never already used and never inside the stem (so a repeated
        prompt cannot force a forbidden word, and keyword counts stay controllable)."""
        free = [w for w in pool if w not in self.taken and w not in self.stem.lower()]
        chosen = self.rng.sample(free, count)
        self.taken.update(chosen)
        return chosen


def _and(words: Sequence[str]) -> str:
    quoted = [f'"{word}"' for word in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _relation(rng: random.Random) -> str:
    return rng.choice(("at least", "less than"))


def _sample_existence(d: _Draft) -> tuple[dict[str, Any], str]:
    words = d.words(banks.KEYWORDS, d.rng.randint(1, 3))
    noun = "keyword" if len(words) == 1 else "keywords"
    text = d.rng.choice(
        (
            f"Include the {noun} {{w}} in the response.",
            f"Make sure your answer uses the {noun} {{w}}.",
            "Your response must mention {w}.",
        )
    )
    return {"keywords": words}, text.format(w=_and(words))


def _sample_frequency(d: _Draft) -> tuple[dict[str, Any], str]:
    (word,) = d.words(banks.KEYWORDS, 1)
    relation = _relation(d.rng)
    n = d.rng.randint(2, 5) if relation == "at least" else d.rng.randint(2, 4)
    text = d.rng.choice(
        (
            'The word "{w}" should appear {r} {n} times in your response.',
            'Use the word "{w}" {r} {n} times.',
        )
    )
    return {"keyword": word, "frequency": n, "relation": relation}, text.format(
        w=word, r=relation, n=n
    )


def _sample_forbidden(d: _Draft) -> tuple[dict[str, Any], str]:
    words = d.words(banks.FORBIDDEN, d.rng.randint(1, 3))
    text = d.rng.choice(
        (
            "Do not include the words {w} in the response.",
            "Avoid the words {w} entirely.",
        )
    )
    return {"forbidden_words": words}, text.format(w=_and(words))


def _sample_letter(d: _Draft) -> tuple[dict[str, Any], str]:
    relation = _relation(d.rng)
    if relation == "at least":
        letter, n = d.rng.choice(banks.COMMON_LETTERS), d.rng.randrange(5, 35, 5)
    else:
        letter, n = d.rng.choice(banks.RARE_LETTERS), d.rng.randint(2, 5)
    text = f'In your response, the letter "{letter}" should appear {relation} {n} times.'
    return {"letter": letter, "let_frequency": n, "let_relation": relation}, text


def _sample_language(d: _Draft) -> tuple[dict[str, Any], str]:
    code = d.rng.choice(sorted(banks.BANKS))
    name = LANGUAGE_NAMES[code]
    text = d.rng.choice(
        (
            f"Your ENTIRE response should be in {name}; no other language is allowed.",
            f"Respond only in {name}.",
        )
    )
    return {"language": code}, text


def _sample_sentences(d: _Draft) -> tuple[dict[str, Any], str]:
    relation = _relation(d.rng)
    n = d.rng.randint(3, 12) if relation == "at least" else d.rng.randint(5, 12)
    text = f"Your response should contain {relation} {n} sentences."
    return {"num_sentences": n, "relation": relation}, text


def _sample_paragraphs(d: _Draft) -> tuple[dict[str, Any], str]:
    n = d.rng.randint(2, 5)
    text = (
        f"There should be {n} paragraphs. Paragraphs are separated with the markdown divider: ***"
    )
    return {"num_paragraphs": n}, text


def _sample_words(d: _Draft) -> tuple[dict[str, Any], str]:
    relation = _relation(d.rng)
    if relation == "at least":
        n = d.rng.choice((50, 80, 100, 150, 200, 250, 300))
    else:
        n = d.rng.choice((80, 100, 150, 200, 300))
    text = d.rng.choice((f"Answer with {relation} {n} words.", f"Use {relation} {n} words."))
    return {"num_words": n, "relation": relation}, text


def _sample_nth_paragraph(d: _Draft) -> tuple[dict[str, Any], str]:
    n = d.rng.randint(2, 4)
    nth = d.rng.randint(1, n)
    word = d.rng.choice(banks.FIRST_WORDS)
    text = (
        f"There should be {n} paragraphs. Paragraphs and only paragraphs are separated from "
        f"each other by a blank line (two newlines). Paragraph {nth} must start with the "
        f"word {word}."
    )
    return {"num_paragraphs": n, "nth_paragraph": nth, "first_word": word}, text


def _sample_placeholders(d: _Draft) -> tuple[dict[str, Any], str]:
    n = d.rng.randint(1, 4)
    text = (
        f"The response must contain at least {n} placeholders represented by square "
        "brackets, such as [address]."
    )
    return {"num_placeholders": n}, text


def _sample_postscript(d: _Draft) -> tuple[dict[str, Any], str]:
    marker = d.rng.choice(("P.S.", "P.P.S"))
    stop = "" if marker.endswith(".") else "."
    text = f"At the end of your response, please add a postscript starting with {marker}{stop}"
    return {"postscript_marker": marker}, text


def _sample_bullets(d: _Draft) -> tuple[dict[str, Any], str]:
    n = d.rng.randint(2, 6)
    text = (
        f"Your answer must contain exactly {n} bullet points. Use markdown bullet points "
        "such as:\n* This is point 1.\n* This is point 2"
    )
    return {"num_bullets": n}, text


def _sample_constrained(d: _Draft) -> tuple[dict[str, Any], str]:
    text = (
        'Answer with one of the following options: "My answer is yes.", "My answer is no.", '
        '"My answer is maybe."'
    )
    return {}, text


def _sample_highlights(d: _Draft) -> tuple[dict[str, Any], str]:
    n = d.rng.randint(1, 4)
    text = (
        f"Highlight at least {n} sections in your answer with markdown, i.e. *highlighted section*."
    )
    return {"num_highlights": n}, text


def _sample_sections(d: _Draft) -> tuple[dict[str, Any], str]:
    spliter, n = d.rng.choice(banks.SPLITERS), d.rng.randint(2, 4)
    text = (
        f"Your response must have {n} sections. Mark the beginning of each section with "
        f"{spliter} X, such as:\n{spliter} 1\n[content of section 1]\n{spliter} 2\n"
        "[content of section 2]"
    )
    return {"section_spliter": spliter, "num_sections": n}, text


def _sample_json(d: _Draft) -> tuple[dict[str, Any], str]:
    return (
        {},
        "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
    )


def _sample_title(d: _Draft) -> tuple[dict[str, Any], str]:
    text = (
        "Your answer must contain a title, wrapped in double angular brackets, such as "
        "<<poem of joy>>."
    )
    return {}, text


def _sample_two_responses(d: _Draft) -> tuple[dict[str, Any], str]:
    text = (
        "Give two different responses. Responses and only responses should be separated by "
        "6 asterisk symbols: ******."
    )
    return {}, text


def _sample_repeat(d: _Draft) -> tuple[dict[str, Any], str]:
    text = (
        f'First repeat the request "{d.stem}" word for word without change, then give your '
        "answer. Do not say anything before repeating the request."
    )
    return {"prompt_to_repeat": d.stem}, text


def _sample_end(d: _Draft) -> tuple[dict[str, Any], str]:
    phrase = d.rng.choice(banks.END_PHRASES)
    text = (
        f'Finish your response with this exact phrase "{phrase}". No other words should follow it.'
    )
    return {"end_phrase": phrase}, text


def _sample_quotation(d: _Draft) -> tuple[dict[str, Any], str]:
    return {}, "Wrap your entire response with double quotation marks."


def _sample_capital_words(d: _Draft) -> tuple[dict[str, Any], str]:
    relation = _relation(d.rng)
    n = d.rng.randint(2, 8) if relation == "at least" else d.rng.randint(3, 8)
    text = f"In your response, words with all capital letters should appear {relation} {n} times."
    return {"capital_frequency": n, "capital_relation": relation}, text


def _sample_capital(d: _Draft) -> tuple[dict[str, Any], str]:
    return {}, "Your entire response should be in English, and in all capital letters."


def _sample_lowercase(d: _Draft) -> tuple[dict[str, Any], str]:
    text = (
        "Your entire response should be in English, and in all lowercase letters. No capital "
        "letters are allowed."
    )
    return {}, text


def _sample_no_comma(d: _Draft) -> tuple[dict[str, Any], str]:
    return {}, d.rng.choice(
        (
            "In your entire response, refrain from the use of any commas.",
            "Do not use any commas in your response.",
        )
    )


_SAMPLERS: dict[str, Callable[[_Draft], tuple[dict[str, Any], str]]] = {
    "keywords:existence": _sample_existence,
    "keywords:frequency": _sample_frequency,
    "keywords:forbidden_words": _sample_forbidden,
    "keywords:letter_frequency": _sample_letter,
    "language:response_language": _sample_language,
    "length_constraints:number_sentences": _sample_sentences,
    "length_constraints:number_paragraphs": _sample_paragraphs,
    "length_constraints:number_words": _sample_words,
    "length_constraints:nth_paragraph_first_word": _sample_nth_paragraph,
    "detectable_content:number_placeholders": _sample_placeholders,
    "detectable_content:postscript": _sample_postscript,
    "detectable_format:number_bullet_lists": _sample_bullets,
    "detectable_format:constrained_response": _sample_constrained,
    "detectable_format:number_highlighted_sections": _sample_highlights,
    "detectable_format:multiple_sections": _sample_sections,
    "detectable_format:json_format": _sample_json,
    "detectable_format:title": _sample_title,
    "combination:two_responses": _sample_two_responses,
    "combination:repeat_prompt": _sample_repeat,
    "startend:end_checker": _sample_end,
    "startend:quotation": _sample_quotation,
    "change_case:capital_word_frequency": _sample_capital_words,
    "change_case:english_capital": _sample_capital,
    "change_case:english_lowercase": _sample_lowercase,
    "punctuation:no_comma": _sample_no_comma,
}


# ---------------------------------------------------------------------------- sampling


def _pick_ids(rng: random.Random, max_constraints: int) -> list[str]:
    count = min(max_constraints, rng.choices((1, 2, 3), weights=(3, 4, 3))[0])
    chosen = [rng.choice(INSTRUCTION_IDS)]
    while len(chosen) < count:
        options = [
            iid for iid in INSTRUCTION_IDS if iid not in chosen and not CONFLICTS[iid] & set(chosen)
        ]
        if not options:
            break
        chosen.append(rng.choice(options))
    return chosen


def _draw(
    rng: random.Random, topics: Sequence[str], max_constraints: int
) -> tuple[str, list[str], list[dict[str, Any]], str]:
    ids = _pick_ids(rng, max_constraints)
    topic = rng.choice(topics)
    stems = banks.QUESTION_STEMS if "detectable_format:constrained_response" in ids else banks.STEMS
    stem = rng.choice(stems).format(topic=topic)
    draft = _Draft(rng, stem, set())
    kwargs, phrases = [], []
    for iid in ids:
        kw, phrase = _SAMPLERS[iid](draft)
        kwargs.append(kw)
        phrases.append(phrase)
    # Instructions that end in a multi-line example go last, each on its own line, so
    # the next instruction cannot run on into the example.
    inline = [phrase for phrase in phrases if "\n" not in phrase]
    blocks = [phrase for phrase in phrases if "\n" in phrase]
    prompt = "\n".join([" ".join([stem, *inline]), *blocks])
    return prompt, ids, kwargs, topic


def generate_items(
    n: int,
    seed: int = 0,
    split: str = "train",
    max_constraints: int = 3,
    with_reference: bool = True,
) -> list[Item]:
    """Fresh IFEval-style prompts with 1..max_constraints compatible constraints.

    Deterministic in (seed, split). The "test" split uses every fifth topic and the
    "train" split the others, so a generated test set also measures transfer to unseen
    topics. Each combination is kept only if a template reference satisfies it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= max_constraints <= 3:
        raise ValueError(f"max_constraints must be 1, 2 or 3, got {max_constraints}")
    topics = [t for i, t in enumerate(banks.TOPICS) if (i % 5 == 0) == (split == "test")]
    rng = random.Random(f"resd-ifeval-{split}-{seed}")
    items: list[Item] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 100:
            raise RuntimeError("ifeval generator: too many unsatisfiable draws (a bug)")
        prompt, ids, kwargs, topic = _draw(rng, topics, max_constraints)
        if prompt in seen:
            continue
        reference = build_reference(ids, kwargs, seed=rng.randrange(2**31))
        if not all(check_instruction(i, kw, reference) for i, kw in zip(ids, kwargs, strict=True)):
            continue
        seen.add(prompt)
        items.append(
            Item(
                id=f"ifeval/{split}/{seed}/{len(items)}",
                messages=[{"role": "user", "content": prompt}],
                meta={
                    "instruction_id_list": ids,
                    "kwargs": kwargs,
                    "key": f"{split}-{seed}-{len(items)}",
                    "source": "generated",
                    "topic": topic,
                },
                reference=reference if with_reference else None,
            )
        )
    return items
