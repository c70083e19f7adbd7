"""Word banks for the generated IFEval prompts and their template references.

The banks live in ``data/ifeval_banks.json``: topics and task stems for the prompts, word
pools for the keyword constraints, and per-language sentence banks for the references.
They were chosen so that the reference builder can satisfy any compatible combination of
constraints: topics and stems hold no commas and no all-capital words; no bank sentence
holds a comma; the English filler contains none of the keywords or forbidden words, uses
the "rare" letters (those that "fewer than N" letter counts ask about) once in the whole
bank, and has no sentence that starts with a one-letter word. Editing the file can break
that; the generator checks every reference and redraws a combination it cannot satisfy,
so a bad edit shows up as fewer usable combinations, `resd env-check ifeval` failing or
the generator giving up, never as wrong rewards. Order matters too: the generated test
split takes every fifth topic, and the seeded draws index into these lists, so inserting
or reordering entries changes every generated item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

_DATA_FILE = "data/ifeval_banks.json"


@dataclass(frozen=True)
class Bank:
    """Comma-free sentences in one language, for language-constrained references.

    `title` is empty for English, whose references draw a title from `TITLES` instead.
    """

    title: str
    sentences: tuple[str, ...]
    postscript: str


def _bank(record: dict[str, Any]) -> Bank:
    return Bank(record["title"], tuple(record["sentences"]), record["postscript"])


def _load() -> dict[str, Any]:
    text = resources.files("resd.envs").joinpath(_DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


_DATA = _load()

TOPICS: tuple[str, ...] = tuple(_DATA["topics"])
STEMS: tuple[str, ...] = tuple(_DATA["stems"])
# constrained_response needs a yes/no question rather than a writing task.
QUESTION_STEMS: tuple[str, ...] = tuple(_DATA["question_stems"])
KEYWORDS: tuple[str, ...] = tuple(_DATA["keywords"])
FORBIDDEN: tuple[str, ...] = tuple(_DATA["forbidden_words"])
CAPS: tuple[str, ...] = tuple(_DATA["capital_words"])
TITLES: tuple[str, ...] = tuple(_DATA["titles"])
END_PHRASES: tuple[str, ...] = tuple(_DATA["end_phrases"])
FIRST_WORDS: tuple[str, ...] = tuple(_DATA["first_words"])
SPLITERS: tuple[str, ...] = tuple(_DATA["section_spliters"])
COMMON_LETTERS: str = _DATA["common_letters"]
RARE_LETTERS: str = _DATA["rare_letters"]

# The reference builder tells banks apart by identity (`bank is ENGLISH`), so each bank is
# built exactly once, here.
ENGLISH: Bank = _bank(_DATA["english"])
BANKS: dict[str, Bank] = {code: _bank(record) for code, record in _DATA["languages"].items()}
