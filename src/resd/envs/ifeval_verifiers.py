"""The 25 IFEval verifiers, each reporting the fact it measured, and their registry.

A verifier takes the response and the instruction's (normalised) keyword arguments and
returns `(ok, message)`, where the message states what was measured ("found 2 commas
(first near: '...')", "212 words, need at least 300"): the benchmark only says pass or
fail, RESD needs the why. Pass/fail follows the benchmark's published definitions so that
scores stay comparable; where we differ on purpose (here and in `resd.envs.ifeval_text`),
a comment says "Deviation".

`SPECS` maps each instruction id to its verifier, its required keyword arguments and a
one-line statement of the demand. Callers go through `resd.envs.ifeval_checks`, which
validates the keyword arguments first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from resd.envs.ifeval_text import LANGUAGE_NAMES, count_sentences, detect_language

__all__ = ["RELATIONS", "SPECS", "Kwargs", "Spec", "quoted"]

Kwargs = dict[str, Any]

# --------------------------------------------------------------------------- helpers

RELATIONS: dict[str, tuple[Callable[[int, int], bool], str]] = {
    "less than": (lambda value, bound: value < bound, "fewer than"),
    "at least": (lambda value, bound: value >= bound, "at least"),
}


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"


def _near(text: str, index: int, width: int = 25) -> str:
    """A one-line window around `index`, so feedback can point at the offending spot."""
    start, end = max(0, index - width), min(len(text), index + width)
    snippet = " ".join(text[start:end].split())
    return ("..." if start > 0 else "") + snippet + ("..." if end < len(text) else "")


def _clip(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def quoted(words: Iterable[str]) -> str:
    return ", ".join(f"'{word}'" for word in words)


def _compare(value: int, relation: str, bound: int) -> bool:
    return RELATIONS[relation][0](value, bound)


def _need(relation: str, bound: int) -> str:
    return f"need {RELATIONS[relation][1]} {bound}"


def _language_name(code: str | None) -> str:
    if code is None:
        return "no language (no letters)"
    return f"{LANGUAGE_NAMES.get(code, code)} ({code})"


# ----------------------------------------------------------------------------- checks


def _keywords_existence(text: str, kw: Kwargs) -> tuple[bool, str]:
    keywords = kw["keywords"]
    missing = [word for word in keywords if not re.search(re.escape(word), text, re.IGNORECASE)]
    if missing:
        return False, f"missing keywords: {quoted(missing)}"
    return True, f"all keywords present: {quoted(keywords)}"


def _keywords_frequency(text: str, kw: Kwargs) -> tuple[bool, str]:
    keyword, relation, bound = kw["keyword"], kw["relation"], kw["frequency"]
    count = len(re.findall(re.escape(keyword), text, re.IGNORECASE))
    ok = _compare(count, relation, bound)
    return ok, f"'{keyword}' appears {_plural(count, 'time')}, {_need(relation, bound)}"


def _forbidden_words(text: str, kw: Kwargs) -> tuple[bool, str]:
    used = []
    for word in kw["forbidden_words"]:
        count = len(re.findall(rf"\b{re.escape(word)}\b", text, re.IGNORECASE))
        if count:
            used.append(f"'{word}' ({count}x)")
    if used:
        return False, f"used forbidden words: {', '.join(used)}"
    return True, f"none of the forbidden words used: {quoted(kw['forbidden_words'])}"


def _letter_frequency(text: str, kw: Kwargs) -> tuple[bool, str]:
    letter = str(kw["letter"]).strip().lower() or str(kw["letter"])
    relation, bound = kw["let_relation"], kw["let_frequency"]
    count = text.lower().count(letter)
    ok = _compare(count, relation, bound)
    return ok, f"letter '{letter}' appears {_plural(count, 'time')}, {_need(relation, bound)}"


def _response_language(text: str, kw: Kwargs) -> tuple[bool, str]:
    # Deviation: text without letters fails here; the benchmark passes it when its
    # detector raises, which would reward an answer made only of digits and symbols.
    want = str(kw["language"]).lower()
    got = detect_language(text)
    if got == want:
        return True, f"response is in {_language_name(got)}"
    return False, f"response looks like {_language_name(got)}, need {_language_name(want)}"


def _number_sentences(text: str, kw: Kwargs) -> tuple[bool, str]:
    relation, bound = kw["relation"], kw["num_sentences"]
    count = count_sentences(text)
    ok = _compare(count, relation, bound)
    return ok, f"{_plural(count, 'sentence')}, {_need(relation, bound)}"


def _number_paragraphs(text: str, kw: Kwargs) -> tuple[bool, str]:
    want = kw["num_paragraphs"]
    parts = re.split(r"\s?\*\s?\*\s?\*\s?", text)
    count = len(parts)
    for index, part in enumerate(parts):
        if not part.strip():
            if index in (0, len(parts) - 1):
                count -= 1  # a divider at the very start or end does not open a paragraph
            else:
                return False, f"paragraph {index + 1} between *** dividers is empty"
    message = f"{_plural(count, 'paragraph')} separated by ***, need exactly {want}"
    return count == want, message


def _number_words(text: str, kw: Kwargs) -> tuple[bool, str]:
    relation, bound = kw["relation"], kw["num_words"]
    count = len(re.findall(r"\w+", text))
    return _compare(count, relation, bound), f"{_plural(count, 'word')}, {_need(relation, bound)}"


def _first_word(paragraph: str) -> str:
    words = paragraph.split()
    if not words:
        return ""
    # As in the benchmark: leading single, then double quotes are dropped, and the word ends
    # at the first . , ? ! ' or " (so "Summary:" is the word "summary:").
    word = words[0].lstrip("'").lstrip('"')
    out = []
    for ch in word:
        if ch in ".,?!'\"":
            break
        out.append(ch.lower())
    return "".join(out)


def _nth_paragraph_first_word(text: str, kw: Kwargs) -> tuple[bool, str]:
    # Deviation: `nth_paragraph` indexes the non-empty paragraphs; the benchmark indexes
    # the raw split, so a stray extra blank line there shifts every later paragraph.
    want_count, nth = kw["num_paragraphs"], kw["nth_paragraph"]
    want_word = str(kw["first_word"]).lower()
    paragraphs = [part for part in re.split(r"\n\n", text) if part.strip()]
    problems = []
    if len(paragraphs) != want_count:
        problems.append(
            f"{_plural(len(paragraphs), 'paragraph')} separated by blank lines, "
            f"need exactly {want_count}"
        )
    if nth > len(paragraphs):
        problems.append(f"there is no paragraph {nth}")
    else:
        got = _first_word(paragraphs[nth - 1])
        if got != want_word:
            problems.append(f"paragraph {nth} starts with '{got}', need '{want_word}'")
    if problems:
        return False, "; ".join(problems)
    return True, f"{want_count} paragraphs; paragraph {nth} starts with '{want_word}'"


def _number_placeholders(text: str, kw: Kwargs) -> tuple[bool, str]:
    want = kw["num_placeholders"]
    found = re.findall(r"\[.*?\]", text)
    examples = f" ({', '.join(found[:3])})" if found else ""
    message = f"found {_plural(len(found), 'placeholder')} in [square brackets]{examples}, "
    return len(found) >= want, message + f"need at least {want}"


def _postscript(text: str, kw: Kwargs) -> tuple[bool, str]:
    marker = str(kw["postscript_marker"]).strip()
    lowered = text.lower()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    if re.findall(pattern, lowered, flags=re.MULTILINE):
        return True, f"postscript starting with '{marker}' found"
    return False, f"no postscript starting with '{marker}' found"


def _number_bullet_lists(text: str, kw: Kwargs) -> tuple[bool, str]:
    want = kw["num_bullets"]
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    count = len(stars) + len(dashes)
    message = f"found {_plural(count, 'markdown bullet point')} ('* ' or '- ' lines), "
    return count == want, message + f"need exactly {want}"


_CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(text: str, kw: Kwargs) -> tuple[bool, str]:
    stripped = text.strip()
    for option in _CONSTRAINED_OPTIONS:
        if option in stripped:
            return True, f"contains the option '{option}'"
    return False, f"contains none of the options {quoted(_CONSTRAINED_OPTIONS)}"


def _number_highlighted_sections(text: str, kw: Kwargs) -> tuple[bool, str]:
    want = kw["num_highlights"]
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    count = len(single) + len(double)
    message = f"found {_plural(count, 'highlighted section')} (*like this*), need at least {want}"
    return count >= want, message


def _multiple_sections(text: str, kw: Kwargs) -> tuple[bool, str]:
    spliter, want = str(kw["section_spliter"]).strip(), kw["num_sections"]
    sections = re.split(r"\s?" + re.escape(spliter) + r"\s?\d+\s?", text)
    count = len(sections) - 1
    message = f"found {_plural(count, 'section header')} like '{spliter} 1', need at least {want}"
    return count >= want, message


def _json_format(text: str, kw: Kwargs) -> tuple[bool, str]:
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    body = body.removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError as exc:
        return False, f"not valid JSON: {exc}"
    return True, "the whole response parses as JSON"


def _title(text: str, kw: Kwargs) -> tuple[bool, str]:
    for title in re.findall(r"<<[^\n]+>>", text):
        if title.lstrip("<").rstrip(">").strip():
            return True, f"title found: {title}"
    return False, "no title wrapped in double angular brackets, e.g. <<title>>"


def _two_responses(text: str, kw: Kwargs) -> tuple[bool, str]:
    parts = text.split("******")
    responses = []
    for index, part in enumerate(parts):
        if part.strip():
            responses.append(part)
        elif index not in (0, len(parts) - 1):
            return False, f"response {index + 1} between ****** separators is empty"
    if len(responses) != 2:
        return False, f"found {_plural(len(responses), 'response')} separated by ******, need 2"
    if responses[0].strip() == responses[1].strip():
        return False, "the two responses are identical"
    return True, "two different responses separated by ******"


def _repeat_prompt(text: str, kw: Kwargs) -> tuple[bool, str]:
    request = str(kw["prompt_to_repeat"]).strip()
    got = text.strip()
    if got.lower().startswith(request.lower()):
        return True, "starts with the request repeated word for word"
    same = 0
    for a, b in zip(got.lower(), request.lower(), strict=False):
        if a != b:
            break
        same += 1
    return False, (
        f"does not start with the request repeated word for word: it matches the first "
        f"{_plural(same, 'character')}, then has '{_clip(got[same : same + 30], 30)}' "
        f"where the request has '{_clip(request[same : same + 30], 30)}'"
    )


def _end_checker(text: str, kw: Kwargs) -> tuple[bool, str]:
    phrase = str(kw["end_phrase"]).strip()
    tail = text.strip().strip('"')
    if tail.lower().endswith(phrase.lower()):
        return True, f"ends with '{phrase}'"
    ending = " ".join(tail[-max(40, len(phrase) + 10) :].split())
    return False, f"ends with '...{ending}', need it to end with exactly '{phrase}'"


def _quotation(text: str, kw: Kwargs) -> tuple[bool, str]:
    stripped = text.strip()
    if len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"':
        return True, "wrapped in double quotation marks"
    return False, (
        f"starts with {stripped[:1]!r} and ends with {stripped[-1:]!r}; the whole response "
        'must be wrapped in double quotation marks (")'
    )


# The benchmark counts NLTK's word tokens, which split off a clitic ("n't", "'s", "'ll", ...)
# and a curly apostrophe: "DON'T" is two capital words, "NASA's" and "NASA’s" are one.
_CLITIC = re.compile(r"(?i)(?<=\w)(?=n't\b|'(?:s|m|d|ll|re|ve)\b)")


def _capital_word_frequency(text: str, kw: Kwargs) -> tuple[bool, str]:
    relation, bound = kw["capital_relation"], kw["capital_frequency"]
    words = re.findall(r"\w+(?:['.-]\w+)*", _CLITIC.sub(" ", text))
    capitals = [word for word in words if word.isupper()]
    examples = f" (e.g. {quoted(list(dict.fromkeys(capitals))[:3])})" if capitals else ""
    message = f"{_plural(len(capitals), 'all-capital word')}{examples}, {_need(relation, bound)}"
    return _compare(len(capitals), relation, bound), message


def _case_check(text: str, want_upper: bool) -> tuple[bool, str]:
    wrong = [i for i, ch in enumerate(text) if (ch.islower() if want_upper else ch.isupper())]
    case = "capital" if want_upper else "lowercase"
    problems = []
    if wrong:
        kind = "lowercase" if want_upper else "capital"
        problems.append(
            f"found {_plural(len(wrong), kind + ' letter')} (first near: '{_near(text, wrong[0])}')"
        )
    elif not any(ch.isupper() or ch.islower() for ch in text):
        problems.append(f"no {case} letters at all")
    language = detect_language(text)
    if language != "en":
        problems.append(f"response looks like {_language_name(language)}, need English")
    if problems:
        return False, "; ".join(problems)
    return True, f"English, all {case} letters"


def _english_capital(text: str, kw: Kwargs) -> tuple[bool, str]:
    return _case_check(text, want_upper=True)


def _english_lowercase(text: str, kw: Kwargs) -> tuple[bool, str]:
    return _case_check(text, want_upper=False)


def _no_comma(text: str, kw: Kwargs) -> tuple[bool, str]:
    positions = [match.start() for match in re.finditer(",", text)]
    if not positions:
        return True, "no commas"
    return (
        False,
        f"found {_plural(len(positions), 'comma')} (first near: '{_near(text, positions[0])}')",
    )


# --------------------------------------------------------------------------- registry


def _rel(relation: str) -> str:
    return RELATIONS[relation][1]


@dataclass(frozen=True)
class Spec:
    """How to check one instruction, which keyword arguments it needs, how to state it."""

    check: Callable[[str, Kwargs], tuple[bool, str]]
    required: tuple[str, ...]
    describe: Callable[[Kwargs], str]


SPECS: dict[str, Spec] = {
    "keywords:existence": Spec(
        _keywords_existence,
        ("keywords",),
        lambda kw: f"include the keywords {quoted(kw['keywords'])}",
    ),
    "keywords:frequency": Spec(
        _keywords_frequency,
        ("keyword", "frequency", "relation"),
        lambda kw: f"use '{kw['keyword']}' {_rel(kw['relation'])} {kw['frequency']} times",
    ),
    "keywords:forbidden_words": Spec(
        _forbidden_words,
        ("forbidden_words",),
        lambda kw: f"do not use the words {quoted(kw['forbidden_words'])}",
    ),
    "keywords:letter_frequency": Spec(
        _letter_frequency,
        ("letter", "let_frequency", "let_relation"),
        lambda kw: (
            f"letter '{kw['letter']}' {_rel(kw['let_relation'])} {kw['let_frequency']} times"
        ),
    ),
    "language:response_language": Spec(
        _response_language,
        ("language",),
        lambda kw: f"answer only in {_language_name(str(kw['language']).lower())}",
    ),
    "length_constraints:number_sentences": Spec(
        _number_sentences,
        ("num_sentences", "relation"),
        lambda kw: f"{_rel(kw['relation'])} {kw['num_sentences']} sentences",
    ),
    "length_constraints:number_paragraphs": Spec(
        _number_paragraphs,
        ("num_paragraphs",),
        lambda kw: f"exactly {kw['num_paragraphs']} paragraphs separated by the divider ***",
    ),
    "length_constraints:number_words": Spec(
        _number_words,
        ("num_words", "relation"),
        lambda kw: f"{_rel(kw['relation'])} {kw['num_words']} words",
    ),
    "length_constraints:nth_paragraph_first_word": Spec(
        _nth_paragraph_first_word,
        ("num_paragraphs", "nth_paragraph", "first_word"),
        lambda kw: (
            f"exactly {kw['num_paragraphs']} paragraphs separated by blank lines; paragraph "
            f"{kw['nth_paragraph']} starts with '{kw['first_word']}'"
        ),
    ),
    "detectable_content:number_placeholders": Spec(
        _number_placeholders,
        ("num_placeholders",),
        lambda kw: f"at least {kw['num_placeholders']} placeholders like [address]",
    ),
    "detectable_content:postscript": Spec(
        _postscript,
        ("postscript_marker",),
        lambda kw: f"end with a postscript starting with {kw['postscript_marker']}",
    ),
    "detectable_format:number_bullet_lists": Spec(
        _number_bullet_lists,
        ("num_bullets",),
        lambda kw: f"exactly {kw['num_bullets']} markdown bullet points",
    ),
    "detectable_format:constrained_response": Spec(
        _constrained_response,
        (),
        lambda kw: f"answer with one of {quoted(_CONSTRAINED_OPTIONS)}",
    ),
    "detectable_format:number_highlighted_sections": Spec(
        _number_highlighted_sections,
        ("num_highlights",),
        lambda kw: f"highlight at least {kw['num_highlights']} sections with markdown *like this*",
    ),
    "detectable_format:multiple_sections": Spec(
        _multiple_sections,
        ("section_spliter", "num_sections"),
        lambda kw: f"{kw['num_sections']} sections, each starting with '{kw['section_spliter']} X'",
    ),
    "detectable_format:json_format": Spec(
        _json_format, (), lambda kw: "wrap the entire output in JSON"
    ),
    "detectable_format:title": Spec(
        _title, (), lambda kw: "include a title wrapped in double angular brackets, <<title>>"
    ),
    "combination:two_responses": Spec(
        _two_responses, (), lambda kw: "give two different responses separated by ******"
    ),
    "combination:repeat_prompt": Spec(
        _repeat_prompt,
        ("prompt_to_repeat",),
        lambda kw: f"first repeat the request word for word: '{_clip(kw['prompt_to_repeat'])}'",
    ),
    "startend:end_checker": Spec(
        _end_checker,
        ("end_phrase",),
        lambda kw: f"end with the exact phrase '{kw['end_phrase']}'",
    ),
    "startend:quotation": Spec(
        _quotation, (), lambda kw: "wrap the entire response in double quotation marks"
    ),
    "change_case:capital_word_frequency": Spec(
        _capital_word_frequency,
        ("capital_frequency", "capital_relation"),
        lambda kw: (
            f"all-capital words {_rel(kw['capital_relation'])} {kw['capital_frequency']} times"
        ),
    ),
    "change_case:english_capital": Spec(
        _english_capital, (), lambda kw: "English, all capital letters"
    ),
    "change_case:english_lowercase": Spec(
        _english_lowercase, (), lambda kw: "English, all lowercase letters"
    ),
    "punctuation:no_comma": Spec(_no_comma, (), lambda kw: "do not use any commas"),
}
