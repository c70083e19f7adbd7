"""What the IFEval verifiers measure in raw text: sentences and the language it is in.

Sentence splitting needs no tokenizer model: punctuation, a list of abbreviations and a
few rules (see `split_sentences`).

Language identification uses `langdetect` when it is installed, because that is what the
benchmark itself runs: a response_language or change_case verdict should not hinge on
which detector judged it. langdetect is random by design, so ours has its own factory
with a fixed seed (the same answer for the same text, whatever else in the process does
with langdetect's global factory). It is an optional dependency; without it, and for text
in which it finds nothing to go on (e.g. only a URL), a dependency-free heuristic decides
(Unicode script, then stopword and letter statistics for scripts shared by several
languages). The heuristic is reliable for paragraph-sized text in the languages IFEval
asks for, but it cannot tell apart languages it has no stopword list for (e.g. Catalan
may read as Spanish), and one or two words are not enough evidence: such text falls back
to the script's most common language (English for Latin script). Neither is reliable on
a few words, and langdetect is poor on ALL-CAPS text (upper-case Spanish can read as
English); the benchmark shares those blind spots, and matching it is the point.

The word lists and tables behind both live in ``data/ifeval_text.json``: abbreviations,
language names, which scripts decide the language on their own, the candidate languages
of shared scripts (first one = fallback), stopwords, and letters typical of one language.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections import Counter
from importlib import resources
from typing import Any

__all__ = [
    "LANGUAGE_BACKENDS",
    "LANGUAGE_NAMES",
    "count_sentences",
    "detect_language",
    "language_backend",
    "split_sentences",
]

_DATA_FILE = "data/ifeval_text.json"


def _load() -> dict[str, Any]:
    text = resources.files("resd.envs").joinpath(_DATA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


_DATA = _load()

# ------------------------------------------------------------------- sentence splitting

# Sentence ends: western punctuation followed by whitespace (closing quotes, brackets and
# markdown emphasis may sit in between), or CJK / Devanagari full stops, which need none.
_SENTENCE_END = re.compile(r"(?:[.!?]+|…)[\"'”’)\]*_]*(?=\s|$)|[。！？।॥]+[\"'”’」』)\]]*")
_ABBREVIATIONS: frozenset[str] = frozenset(_DATA["abbreviations"].split())


def _is_abbreviation(text: str, start: int, match: re.Match[str]) -> bool:
    """True when a '.' ends a known abbreviation or an initial rather than a sentence."""
    if match.group().rstrip("\"'”’)]*_") != ".":
        return False
    tokens = text[start : match.start()].split()
    if not tokens:
        return False
    token = tokens[-1].lstrip("(\"'“‘*_").lower()
    return (
        token in _ABBREVIATIONS
        or (len(token) == 1 and token.isalpha())
        or re.fullmatch(r"(?:[a-z]\.)+[a-z]", token) is not None  # e.g, i.e, u.s
    )


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences without a tokenizer model.

    Like the benchmark's own splitter, a line without final punctuation (a heading, a
    title) runs on into the next sentence. Pieces without any letter (list markers
    such as "1.", dividers) are merged into the following sentence instead of counting.
    Deviation: CJK and Devanagari full stops also end sentences, which the benchmark's
    English-only splitter ignores.
    """
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if _is_abbreviation(text, start, match):
            continue
        segment = text[start : match.end()]
        if not any(ch.isalpha() for ch in segment):
            continue
        sentences.append(" ".join(segment.split()))
        start = match.end()
    tail = text[start:]
    if any(ch.isalpha() for ch in tail):
        sentences.append(" ".join(tail.split()))
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


# ------------------------------------------------------------------ language detection

# The languages langdetect knows beyond those in the data file, named so that feedback
# can say what it saw ("Macedonian (mk)") rather than print a bare code.
_LANGDETECT_NAMES = (
    "af Afrikaans, ca Catalan, cs Czech, cy Welsh, da Danish, et Estonian, hr Croatian, "
    "hu Hungarian, lt Lithuanian, lv Latvian, mk Macedonian, no Norwegian, ro Romanian, "
    "sk Slovak, sl Slovenian, so Somali, sq Albanian, tl Tagalog"
)
# ISO 639-1 code -> name: IFEval's languages, then a few it never asks for, which are
# detected so that they are not mistaken for one that it does.
LANGUAGE_NAMES: dict[str, str] = {**_DATA["language_names"], **_DATA["other_language_names"]}
for _code, _name in (pair.split(" ", 1) for pair in _LANGDETECT_NAMES.split(", ")):
    LANGUAGE_NAMES.setdefault(_code, _name)
# Scripts that (for our purposes) identify the language on their own.
_SCRIPT_LANGUAGE: dict[str, str] = dict(_DATA["script_language"])
# Scripts shared by several languages: the first candidate is the fallback.
_SCRIPT_CANDIDATES: dict[str, tuple[str, ...]] = {
    script: tuple(langs) for script, langs in _DATA["script_candidates"].items()
}
_STOPWORDS: dict[str, frozenset[str]] = {
    lang: frozenset(words.split()) for lang, words in _DATA["stopwords"].items()
}
# Letters that (nearly) only one candidate language uses; each counts like a stopword hit.
_MARKER_CHARS: dict[str, str] = dict(_DATA["marker_chars"])


@functools.lru_cache(maxsize=8192)
def _script(ch: str) -> str:
    """Unicode script of a letter, read off its character name (no tables to ship)."""
    words = unicodedata.name(ch, "").split()
    if not words:
        return ""
    word = words[1] if words[0] in ("FULLWIDTH", "HALFWIDTH") and len(words) > 1 else words[0]
    if word == "CJK":
        return "HAN"
    if word.startswith("KATAKANA") or word == "HIRAGANA":
        return "KANA"
    return word


def _tokens(text: str) -> list[str]:
    """Whitespace tokens with punctuation trimmed; keeps combining marks (unlike \\w)."""
    tokens = []
    for raw in text.lower().split():
        token = raw.strip("".join(ch for ch in set(raw) if unicodedata.category(ch)[0] in "PSN"))
        if token:
            tokens.append(token)
    return tokens


def _heuristic_language(text: str) -> str | None:
    """The dependency-free detector: script first, then stopwords and typical letters.

    The dominant script decides outright where it is specific to one language (Kannada,
    Thai, Hangul, ...). Han with some kana (>= 10%) is Japanese, else Chinese. Latin,
    Cyrillic, Arabic and Devanagari text is scored by stopword hits plus letters typical
    of one language; with no evidence at all the script's first candidate wins.
    """
    scripts = Counter(_script(ch) for ch in text if ch.isalpha())
    if not scripts:
        return None
    kana = scripts.pop("KANA", 0)
    han = scripts.pop("HAN", 0)
    if kana + han:
        scripts["CJK"] = kana + han
    script = max(scripts, key=lambda name: scripts[name])
    if script == "CJK":
        # Japanese prose is rarely under a third kana; a stray kana in Chinese is noise.
        return "ja" if kana * 10 >= kana + han else "zh"
    if script in _SCRIPT_LANGUAGE:
        return _SCRIPT_LANGUAGE[script]
    candidates = _SCRIPT_CANDIDATES.get(script)
    if not candidates:
        return None
    tokens = _tokens(text)
    lowered = text.lower()

    def evidence(lang: str) -> float:
        hits = sum(1 for token in tokens if token in _STOPWORDS[lang])
        marks = sum(lowered.count(ch) for ch in _MARKER_CHARS.get(lang, ""))
        return hits + marks

    scores = [(evidence(lang), -rank, lang) for rank, lang in enumerate(candidates)]
    return max(scores)[2]


@functools.lru_cache(maxsize=1)
def _langdetect_factory() -> Any:
    """langdetect's profiles, loaded once (about half a second), or None if not installed.

    A private factory rather than the module-level one that `langdetect.detect` uses, so
    that the seed we set cannot be changed by other code in the process.
    """
    try:
        from langdetect import DetectorFactory
        from langdetect.detector_factory import PROFILES_DIRECTORY
    except ImportError:
        return None
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(0)
    return factory


def _langdetect_language(text: str) -> str | None:
    """langdetect's best guess, or None when it finds no n-grams to go on (or is absent)."""
    factory = _langdetect_factory()
    if factory is None:
        return None
    from langdetect.lang_detect_exception import LangDetectException

    detector = factory.create()
    detector.append(text)
    try:
        code = detector.detect()
    except LangDetectException:
        return None
    # langdetect tells Simplified from Traditional Chinese; IFEval's codes do not.
    return "zh" if code in ("zh-cn", "zh-tw") else code


LANGUAGE_BACKENDS = ("langdetect", "heuristic")


def language_backend() -> str:
    """Which detector `detect_language` uses here: "langdetect" if installed, else
    "heuristic"."""
    return "langdetect" if _langdetect_factory() is not None else "heuristic"


def detect_language(text: str, backend: str | None = None) -> str | None:
    """Best-guess ISO 639-1 code of `text`, or None when it has no letters.

    `backend` is "langdetect" (what the benchmark runs; deterministic here), "heuristic"
    (no dependencies, see `_heuristic_language`) or None for langdetect when it is
    installed. Where langdetect finds nothing to go on, the heuristic answers instead.
    """
    if backend not in (None, *LANGUAGE_BACKENDS):
        raise ValueError(f"backend must be one of {LANGUAGE_BACKENDS} or None, got {backend!r}")
    if not any(ch.isalpha() for ch in text):
        return None
    if backend != "heuristic":
        if backend == "langdetect" and _langdetect_factory() is None:
            raise ImportError(
                "detect_language(backend='langdetect') needs `pip install langdetect`"
            )
        code = _langdetect_language(text)
        if code is not None:
            return code
    return _heuristic_language(text)
