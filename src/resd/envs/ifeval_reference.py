"""Template references for generated IFEval prompts.

A reference is template prose, correct but not fluent. It exists for two reasons: it
proves that a generated combination of constraints can be satisfied (the prompt
generator, `resd.envs.ifeval_prompts`, drops any combination whose reference fails its
own checks), and it gives `resd env-check` and SDFT-style demonstrations a known-good
answer. The sentences come from the banks in `resd.envs.ifeval_banks`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resd.envs import ifeval_banks as banks
from resd.envs.ifeval_checks import check_instruction

__all__ = ["build_reference"]


@dataclass
class _Body:
    """One response of a reference: prose units (paragraphs or sections) and bullets.

    A unit is a list of (sentence, may_highlight); only plain filler may be highlighted,
    so that wrapping it in *...* cannot break a keyword, a first word or a count.
    """

    units: list[list[tuple[str, bool]]]
    bullets: list[str]
    cursor: int


class _Reference:
    """Builds a response that satisfies a set of compatible constraints.

    The text is template prose, correct but not fluent: it proves each generated
    combination is satisfiable (the generator redraws any it cannot satisfy) and gives
    `resd env-check` a known-good answer. "At least" constraints are met by adding filler
    sentences until their checks pass; "less than" ones by starting from the minimum.
    """

    def __init__(self, spec: dict[str, dict[str, Any]], rng: random.Random) -> None:
        self.spec = spec
        language = spec.get("response_language", {}).get("language")
        self.bank = banks.BANKS.get(language, banks.ENGLISH) if language else banks.ENGLISH
        self.title = self.bank.title or rng.choice(banks.TITLES)
        start = rng.randrange(len(self.bank.sentences))
        count = 2 if "two_responses" in spec else 1
        # The second response starts half-way through the sentence bank so the two differ.
        offset = len(self.bank.sentences) // 2
        self.bodies = [self._layout(start + which * offset) for which in range(count)]

    def _filler(self, cursor: int) -> str:
        return self.bank.sentences[cursor % len(self.bank.sentences)]

    def _extras(self) -> list[tuple[str, bool]]:
        """Sentences that carry keywords, capitals, placeholders or the yes/no answer."""
        spec, extras = self.spec, []
        if "constrained_response" in spec:
            extras.append(("My answer is yes.", False))
        if "existence" in spec:
            words = " and ".join(spec["existence"]["keywords"])
            extras.append((f"Think of {words} for a moment.", False))
        frequency = spec.get("frequency")
        if frequency and frequency["relation"] == "at least":
            repeated = " and ".join([frequency["keyword"]] * frequency["frequency"])
            extras.append((f"We keep coming back to {repeated}.", False))
        capitals = spec.get("capital_word_frequency")
        if capitals and capitals["capital_relation"] == "at least":
            words = [banks.CAPS[i % len(banks.CAPS)] for i in range(capitals["capital_frequency"])]
            extras.append((" ".join(words) + ".", False))
        if "number_placeholders" in spec:
            n = spec["number_placeholders"]["num_placeholders"]
            if self.bank is banks.ENGLISH:
                slots = " and ".join(f"[detail {i + 1}]" for i in range(n))
                extras.append((f"Fill in {slots} before sending.", False))
            else:
                extras.append((" ".join(f"[{i + 1}]" for i in range(n)), False))
        return extras

    def _layout(self, cursor: int) -> _Body:
        spec = self.spec
        n_units = 1
        for key in ("number_paragraphs", "nth_paragraph_first_word"):
            if key in spec:
                n_units = spec[key]["num_paragraphs"]
        if "multiple_sections" in spec:
            n_units = spec["multiple_sections"]["num_sections"]
        nth = spec.get("nth_paragraph_first_word")
        units: list[list[tuple[str, bool]]] = []
        for index in range(n_units):
            sentence, cursor = self._filler(cursor), cursor + 1
            if nth and index == nth["nth_paragraph"] - 1:
                first = nth["first_word"].capitalize()
                units.append([(f"{first} {sentence[0].lower()}{sentence[1:]}", False)])
            else:
                units.append([(sentence, True)])
        if "constrained_response" in spec:
            units[0] = self._extras()  # the yes/no sentence must come first
        else:
            units[0].extend(self._extras())
        bullets = []
        for _ in range(spec.get("number_bullet_lists", {}).get("num_bullets", 0)):
            bullets.append(self._filler(cursor))
            cursor += 1
        return _Body(units, bullets, cursor)

    def grow(self) -> None:
        for body in self.bodies:
            body.units[body.cursor % len(body.units)].append((self._filler(body.cursor), True))
            body.cursor += 1

    def _render_body(self, body: _Body, highlights: int) -> str:
        spec = self.spec
        joiner = "" if self.bank is banks.BANKS["ja"] else " "
        rendered: list[str] = []
        for unit in body.units:
            sentences = []
            for sentence, may_highlight in unit:
                if may_highlight and highlights > 0:
                    sentence, highlights = f"*{sentence}*", highlights - 1
                sentences.append(sentence)
            rendered.append(joiner.join(sentences))
        if body.bullets:
            rendered[-1] += "\n\n" + "\n".join(f"* {line}" for line in body.bullets)
        if "number_paragraphs" in spec:
            text = "\n\n***\n\n".join(rendered)
        elif "multiple_sections" in spec:
            spliter = spec["multiple_sections"]["section_spliter"]
            text = "\n\n".join(f"{spliter} {i + 1}\n{part}" for i, part in enumerate(rendered))
        else:
            text = "\n\n".join(rendered)
        # With nth_paragraph_first_word every blank line opens a paragraph, so the title
        # and the postscript attach to the last paragraph with a single newline.
        nth = "nth_paragraph_first_word" in spec
        if "title" in spec:
            text = f"{text}\n<<{self.title}>>" if nth else f"<<{self.title}>>\n{text}"
        if "postscript" in spec:
            marker = spec["postscript"]["postscript_marker"]
            text += ("\n" if nth else "\n\n") + f"{marker} {self.bank.postscript}"
        if "end_checker" in spec:
            text += " " + spec["end_checker"]["end_phrase"]
        return text

    def render(self) -> str:
        spec = self.spec
        highlights = spec.get("number_highlighted_sections", {}).get("num_highlights", 0)
        text = "\n******\n".join(self._render_body(body, highlights) for body in self.bodies)
        if "repeat_prompt" in spec:
            text = f"{spec['repeat_prompt']['prompt_to_repeat']}\n{text}"
        if "english_lowercase" in spec:
            text = text.lower()
        if "english_capital" in spec:
            text = text.upper()
        if "json_format" in spec:
            text = json.dumps({"response": text}, ensure_ascii=False)
        if "quotation" in spec:
            text = f'"{text}"'
        return text


_GROWTH_IDS = (
    "length_constraints:number_words",
    "length_constraints:number_sentences",
    "keywords:letter_frequency",
    "detectable_format:number_highlighted_sections",
)


def build_reference(
    instruction_ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]], seed: int = 0
) -> str:
    """A template response meant to satisfy the given (compatible) instructions.

    Callers must verify it: incompatible or unusual combinations can still fail, which
    is how the generator detects and redraws them.
    """
    spec = {iid.split(":", 1)[1]: dict(kw) for iid, kw in zip(instruction_ids, kwargs, strict=True)}
    builder = _Reference(spec, random.Random(seed))
    growth = [
        (iid, kw) for iid, kw in zip(instruction_ids, kwargs, strict=True) if iid in _GROWTH_IDS
    ]
    text = builder.render()
    for _ in range(200):
        if all(check_instruction(iid, kw, text) for iid, kw in growth):
            break
        builder.grow()
        text = builder.render()
    return text
