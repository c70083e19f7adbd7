"""Instruction following (IFEval) as a RESD environment.

IFEval's checks are exact and cheap, and each failure has a concrete, measurable cause
(a comma, 212 words instead of 300), which is the kind of rich feedback RESD learns
from. Training must never see the evaluation prompts, so the train split is drawn from a
seeded generator of fresh prompts with 1-3 compatible constraints; the test split is
either generated from held-out topics or, with `path=`, the real IFEval records.

The verifiers live in `resd.envs.ifeval_checks` and are re-exported here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resd.envs.base import Environment, Item, Score
from resd.envs.ifeval_checks import (
    INSTRUCTION_IDS,
    LANGUAGE_NAMES,
    InstructionResult,
    check_instruction,
    clean_kwargs,
    describe_instruction,
    detect_language,
    evaluate_instructions,
    explain_instruction,
)

__all__ = [
    "CONFLICTS",
    "INSTRUCTION_IDS",
    "IFEvalEnv",
    "IFEvalRecord",
    "InstructionResult",
    "build_reference",
    "check_instruction",
    "describe_instruction",
    "detect_language",
    "evaluate_instructions",
    "explain_instruction",
    "format_feedback",
    "generate_items",
    "load_ifeval_records",
    "strip_think",
]


# ---------------------------------------------------------------------------- loading


@dataclass
class IFEvalRecord:
    """One evaluation prompt with its instructions; kwargs are cleaned (no None values)."""

    key: str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    messages: list[dict[str, str]]


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        return json.loads(value)
    return value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object: {exc}") from exc
    return rows


def _messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt is either plain text or a chat (possibly serialised as a JSON string)."""
    if isinstance(prompt, str):
        try:
            chat = json.loads(prompt) if prompt.lstrip().startswith("[") else None
        except ValueError:
            chat = None
        if not (isinstance(chat, list) and chat and all(isinstance(m, Mapping) for m in chat)):
            return [{"role": "user", "content": prompt}]
        prompt = chat
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _parse_record(row: Mapping[str, Any], index: int, source: Path) -> IFEvalRecord:
    """Accept the original flat layout and the veRL layout (reward_model.ground_truth)."""
    spec: Any = row
    if "instruction_id_list" not in row:
        reward_model = _maybe_json(row.get("reward_model"))
        truth = _maybe_json(reward_model.get("ground_truth")) if reward_model else None
        if not isinstance(truth, Mapping) or "instruction_id_list" not in truth:
            raise ValueError(
                f"{source}: record {index} has no instruction_id_list (expected IFEval fields "
                "key/prompt/instruction_id_list/kwargs or reward_model.ground_truth)"
            )
        spec = truth
    extra = _maybe_json(row.get("extra_info"))
    key = row.get("key")
    if key is None and isinstance(extra, Mapping):
        key = extra.get("index")
    key = str(index if key is None else key)
    ids = [str(iid) for iid in spec["instruction_id_list"]]
    raw_kwargs = _maybe_json(spec.get("kwargs"))
    raw_kwargs = [None] * len(ids) if raw_kwargs is None else list(raw_kwargs)
    if len(raw_kwargs) != len(ids):
        raise ValueError(
            f"{source}: record {key} has {len(ids)} instruction ids but {len(raw_kwargs)} kwargs"
        )
    kwargs = [clean_kwargs(kw) for kw in raw_kwargs]
    messages = _messages(row.get("prompt", spec.get("prompt", "")))
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = users[-1] if users else str(spec.get("prompt", ""))
    for iid, kw in zip(ids, kwargs, strict=True):
        try:
            describe_instruction(iid, kw)  # validates the id and its kwargs now, not mid-run
        except ValueError as exc:
            raise ValueError(f"{source}: record {key}: {exc}") from exc
    return IFEvalRecord(key, text, ids, kwargs, messages)


def load_ifeval_records(path: str | Path) -> list[IFEvalRecord]:
    """Read IFEval records from .parquet, .jsonl or a .json list.

    kwargs may be dicts padded with None (as in the released data), JSON strings, or a
    JSON string holding the whole list; unknown instruction ids fail here, naming the id.
    """
    source = Path(path)
    return [_parse_record(row, i, source) for i, row in enumerate(_read_rows(source))]


def _record_item(record: IFEvalRecord, source: str) -> Item:
    return Item(
        id=f"ifeval/{record.key}",
        messages=record.messages,
        meta={
            "instruction_id_list": record.instruction_id_list,
            "kwargs": record.kwargs,
            "key": record.key,
            "source": source,
        },
    )


# -------------------------------------------------------------------------- generator
#
# Everything below is written so that the reference builder can satisfy any compatible
# combination: stems and topics hold no commas or all-capital words, the English filler
# avoids the letters q/z/x/j (used for "fewer than" letter counts), the keyword pool
# and the forbidden-word pool, and no sentence starts with a one-letter word.

_TOPICS = (
    "the history of the bicycle",
    "a lighthouse keeper who finds a message in a bottle",
    "why people love rainy days",
    "learning to cook as an adult",
    "the life cycle of a honeybee",
    "a city where nobody sleeps",
    "the first day at a new job",
    "saving money on groceries",
    "the migration of monarch butterflies",
    "a robot that wants to paint",
    "the benefits of walking every day",
    "a lost umbrella",
    "the invention of the printing press",
    "growing tomatoes on a balcony",
    "a friendship between a dog and a crow",
    "how volcanoes form",
    "the joy of public libraries",
    "a chess tournament in a small town",
    "working from home",
    "the ocean at night",
    "a grandmother's secret recipe",
    "why the sky is blue",
    "the rise of electric cars",
    "a mountain village in winter",
    "learning a second language",
    "the first moon landing",
    "a bakery that only opens at midnight",
    "how vaccines train the immune system",
    "living with fewer possessions",
    "a time traveler stuck in a museum",
    "the importance of sleep",
    "the building of the pyramids",
    "a detective who is afraid of the dark",
    "composting at home",
    "an old train station",
    "the science of rainbows",
    "a cat who runs a bookstore",
    "teamwork in sports",
    "the water cycle",
    "a summer music festival",
    "how bridges carry heavy loads",
    "an astronaut writing home",
    "the history of chocolate",
    "a village that lost its clock",
    "protecting coral reefs",
    "a shy student who joins the drama club",
    "the art of making paper",
    "gardening in cities",
    "a storm at sea",
    "the habits of octopuses",
    "a birthday party that goes wrong",
    "the origins of the Olympic Games",
    "a small shop competing with a supermarket",
    "why we dream",
    "the daily life of a medieval knight",
    "a forgotten attic",
    "wind energy",
    "the first snowfall of the year",
    "the last mile of a marathon",
    "the evolution of mobile phones",
    "a pirate who hates the sea",
    "learning to play the piano",
    "the secret life of city pigeons",
    "a road trip across the desert",
)
_STEMS = (
    "Write a short story about {topic}.",
    "Write a blog post about {topic}.",
    "Write a poem about {topic}.",
    "Write a limerick about {topic}.",
    "Write an email to a colleague about {topic}.",
    "Write a letter to a friend describing {topic}.",
    "Write a product pitch inspired by {topic}.",
    "Write a speech for a school assembly about {topic}.",
    "Give advice to a beginner who wants to learn about {topic}.",
    "Explain what most people get wrong about {topic}.",
    "Write a diary entry about {topic}.",
    "Write a rap verse about {topic}.",
    "Write a dialogue between two neighbors discussing {topic}.",
    "Write a travel guide entry inspired by {topic}.",
    "Write a persuasive essay about {topic}.",
    "Write a news report about {topic}.",
    "Describe {topic} to someone living in the year 1800.",
    "Write a riddle about {topic}.",
    "Write a movie plot outline about {topic}.",
    "Write a song chorus about {topic}.",
    "Write a list of tips related to {topic}.",
    "Write a review of an imaginary book about {topic}.",
    "Write a job advertisement connected to {topic}.",
    "Write a social media post about {topic}.",
    "Write a bedtime story about {topic}.",
    "Write an opening statement for a debate about {topic}.",
    "Write the text of a museum plaque about {topic}.",
    "Write a short lesson plan about {topic}.",
    "Write a motivational message about {topic}.",
    "Write a set of frequently asked questions about {topic}.",
    "Tell a curious ten year old about {topic}.",
    "Summarize the most interesting facts about {topic}.",
)
# constrained_response needs a yes/no question rather than a writing task.
_QUESTION_STEMS = (
    "Is it worth reading about {topic}?",
    "Would a film about {topic} be popular?",
    "Do you think children would enjoy a story about {topic}?",
    "Should schools spend a lesson on {topic}?",
    "Is {topic} a good subject for a podcast?",
)


def _split(words: str) -> tuple[str, ...]:
    return tuple(words.split())


_KEYWORDS = _split(
    "adventure balance brilliant courage curious garden harmony journey lantern memory "
    "mountain patience river silver sunrise thunder window whisper wonder compass meadow "
    "orbit pepper rhythm shadow signal timber velvet blossom harbor candle"
)
_FORBIDDEN = _split(
    "very really thing things nice good bad stuff amazing basically literally just great "
    "huge simple easy always never maybe honestly"
)
_CAPS = ("NOTE", "THIS", "READ", "NOW", "ALL", "WELL", "TRUE", "KEY", "CLEAR", "BOLD", "CALM")
_FILLER = (
    "This topic rewards a careful look from more than one side.",
    "The details matter because they shape how the whole story feels.",
    "Most people notice the surface first and the deeper patterns later.",
    "There is often more history behind it than one might guess.",
    "Small choices add up over time and change the final result.",
    "It helps to start with the basics and then build from there.",
    "Different people will see different lessons in the same events.",
    "The most useful ideas tend to be the ones we can test in daily life.",
    "Each part connects to the others in ways that are worth tracing.",
    "Concrete cases make the abstract parts far more vivid.",
    "People have thought about this for a long time and still disagree.",
    "The first step is to pay attention to what is already there.",
    "Over time the pattern becomes easier to see and to describe.",
    "That is one reason the subject still draws so much interest.",
    "Calm and patient work usually beats haste.",
    "There are trade-offs at every stage of the process.",
    "The story ends up being about people more than about facts.",
    "Nothing here has to be perfect for it to be worth the effort.",
    "Some of the best moments come from the parts nobody planned.",
    "Looking back helps us see where the road might lead.",
)
_TITLES = ("notes on the topic", "a closer look", "first thoughts", "the short version")
_END_PHRASES = (
    "Is there anything else I can help with?",
    "Let me know if you have additional questions.",
    "Any other questions?",
    "That is all for now.",
    "Thank you for reading.",
)
_FIRST_WORDS = ("however", "first", "finally", "meanwhile", "today", "imagine", "overall", "still")
_SPLITERS = ("SECTION", "Section", "PARAGRAPH", "Part")
_COMMON_LETTERS = "etaonsrilh"
_RARE_LETTERS = "qzxj"


@dataclass(frozen=True)
class _Bank:
    """Comma-free sentences in one language, for language-constrained references."""

    title: str
    sentences: tuple[str, ...]
    postscript: str


_BANKS: dict[str, _Bank] = {
    "es": _Bank(
        "reflexiones breves",
        (
            "Este tema merece una mirada atenta desde varios lados.",
            "Los detalles importan porque cambian la forma de toda la historia.",
            "La mayoría de las personas ve primero la superficie y después el fondo.",
            "Con el tiempo los pequeños pasos producen un cambio real.",
            "Hay más historia detrás de esto de lo que parece.",
            "Es mejor empezar por lo básico y avanzar poco a poco.",
        ),
        "Gracias por leer hasta el final.",
    ),
    "fr": _Bank(
        "quelques réflexions",
        (
            "Ce sujet mérite un regard attentif sous plusieurs angles.",
            "Les détails comptent parce qu'ils changent toute l'histoire.",
            "La plupart des gens voient d'abord la surface et ensuite le fond.",
            "Avec le temps les petits pas produisent un vrai changement.",
            "Il y a plus d'histoire derrière cela que ce que l'on pense.",
            "Il vaut mieux commencer par les bases et avancer pas à pas.",
        ),
        "Merci pour votre lecture.",
    ),
    "de": _Bank(
        "kurze Gedanken",
        (
            "Dieses Thema verdient einen genauen Blick aus mehreren Richtungen.",
            "Die Details sind wichtig für die ganze Geschichte.",
            "Die meisten Menschen sehen zuerst die Oberfläche und erst später die Tiefe.",
            "Mit der Zeit führen kleine Schritte zu einer echten Veränderung.",
            "Hinter diesem Thema steckt eine lange Geschichte.",
            "Es ist sinnvoll mit den Grundlagen zu beginnen und dann Schritt für Schritt "
            "weiterzugehen.",
        ),
        "Danke für das Lesen.",
    ),
    "it": _Bank(
        "brevi riflessioni",
        (
            "Questo tema merita uno sguardo attento da più lati.",
            "I dettagli contano perché cambiano tutta la storia.",
            "La maggior parte delle persone vede prima la superficie e poi la profondità.",
            "Con il tempo i piccoli passi portano a un cambiamento reale.",
            "C'è una lunga storia dietro questo argomento.",
            "È meglio iniziare dalle basi e procedere un passo alla volta.",
        ),
        "Grazie per la lettura.",
    ),
    "pt": _Bank(
        "breves reflexões",
        (
            "Este tema merece um olhar atento de vários lados.",
            "Os detalhes são importantes porque mudam toda a história.",
            "A maioria das pessoas vê primeiro a superfície e depois o fundo.",
            "Com o tempo os pequenos passos trazem uma mudança real.",
            "Há mais história por trás disso do que parece.",
            "É melhor começar pelo básico e avançar passo a passo.",
        ),
        "Obrigado pela leitura.",
    ),
    "ru": _Bank(
        "краткие мысли",
        (
            "Эта тема заслуживает внимательного взгляда с разных сторон.",
            "Детали очень важны для всей истории.",
            "Большинство людей сначала видят поверхность и только потом глубину.",
            "Со временем маленькие шаги приводят к настоящим переменам.",
            "За этой темой стоит долгая история.",
            "Лучше начать с основ и двигаться шаг за шагом.",
        ),
        "Спасибо за внимание.",
    ),
    "hi": _Bank(
        "कुछ विचार",
        (
            "यह विषय कई नज़रियों से देखने लायक है।",
            "छोटी बातें बहुत मायने रखती हैं क्योंकि वे पूरी कहानी बदल देती हैं।",
            "ज़्यादातर लोग पहले सतह को देखते हैं और बाद में गहराई को।",
            "समय के साथ छोटे कदम बड़ा बदलाव लाते हैं।",
            "इस विषय के पीछे एक लंबा इतिहास है।",
            "बुनियादी बातों से शुरू करना और धीरे धीरे आगे बढ़ना बेहतर है।",
        ),
        "पढ़ने के लिए धन्यवाद।",
    ),
    "ja": _Bank(
        "短い考え",
        (
            "このテーマはいろいろな角度から見る価値があります。",
            "細かい点が物語全体を変えることがあります。",
            "多くの人はまず表面を見てから深い部分に気づきます。",
            "小さな一歩が時間とともに大きな変化になります。",
            "この話題の裏には長い歴史があります。",
            "基本から始めて少しずつ進むのがよいでしょう。",
        ),
        "読んでくれてありがとう。",
    ),
    "ko": _Bank(
        "짧은 생각",
        (
            "이 주제는 여러 방향에서 살펴볼 가치가 있습니다.",
            "작은 부분이 전체 이야기를 바꿀 수 있습니다.",
            "대부분의 사람들은 먼저 겉모습을 보고 나중에 깊이를 봅니다.",
            "시간이 지나면 작은 걸음이 큰 변화를 만듭니다.",
            "이 주제 뒤에는 긴 역사가 있습니다.",
            "기본부터 시작해서 천천히 나아가는 것이 좋습니다.",
        ),
        "읽어 주셔서 감사합니다.",
    ),
    "ar": _Bank(
        "أفكار قصيرة",
        (
            "هذا الموضوع يستحق نظرة متأنية من عدة جوانب.",
            "التفاصيل مهمة لأنها تغير القصة كلها.",
            "معظم الناس يرون السطح أولا ثم يرون العمق.",
            "مع مرور الوقت تصنع الخطوات الصغيرة تغييرا حقيقيا.",
            "هناك تاريخ طويل وراء هذا الموضوع.",
            "من الأفضل أن نبدأ بالأساسيات ثم نتقدم خطوة بخطوة.",
        ),
        "شكرا على القراءة.",
    ),
}
_ENGLISH = _Bank("", _FILLER, "Thanks for reading.")

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
    words = d.words(_KEYWORDS, d.rng.randint(1, 3))
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
    (word,) = d.words(_KEYWORDS, 1)
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
    words = d.words(_FORBIDDEN, d.rng.randint(1, 3))
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
        letter, n = d.rng.choice(_COMMON_LETTERS), d.rng.randrange(5, 35, 5)
    else:
        letter, n = d.rng.choice(_RARE_LETTERS), d.rng.randint(2, 5)
    text = f'In your response, the letter "{letter}" should appear {relation} {n} times.'
    return {"letter": letter, "let_frequency": n, "let_relation": relation}, text


def _sample_language(d: _Draft) -> tuple[dict[str, Any], str]:
    code = d.rng.choice(sorted(_BANKS))
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
    word = d.rng.choice(_FIRST_WORDS)
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
    spliter, n = d.rng.choice(_SPLITERS), d.rng.randint(2, 4)
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
    phrase = d.rng.choice(_END_PHRASES)
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


# -------------------------------------------------------------------- reference builder


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
        self.bank = _BANKS.get(language, _ENGLISH) if language else _ENGLISH
        self.title = self.bank.title or rng.choice(_TITLES)
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
            words = [_CAPS[i % len(_CAPS)] for i in range(capitals["capital_frequency"])]
            extras.append((" ".join(words) + ".", False))
        if "number_placeholders" in spec:
            n = spec["number_placeholders"]["num_placeholders"]
            if self.bank is _ENGLISH:
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
        joiner = "" if self.bank is _BANKS["ja"] else " "
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
    stems = _QUESTION_STEMS if "detectable_format:constrained_response" in ids else _STEMS
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
    topics = [t for i, t in enumerate(_TOPICS) if (i % 5 == 0) == (split == "test")]
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


# ------------------------------------------------------------------------ environment


def strip_think(response: str) -> str:
    """Drop reasoning so only the answer is judged.

    Text after the last </think> is the answer (this also covers chat templates that
    open the block inside the prompt); an unterminated <think> means no answer yet.
    """
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].strip()
    if "<think>" in response:
        return response.split("<think>", 1)[0].strip()
    return response


def format_feedback(
    results: Sequence[InstructionResult], kwargs: Sequence[Mapping[str, Any] | None]
) -> str:
    """One line per violated instruction: what it asks and what was measured."""
    failed = [(r, kw) for r, kw in zip(results, kwargs, strict=True) if not r.ok]
    if not failed:
        return f"All {len(results)} instructions followed."
    lines = [f"Followed {len(results) - len(failed)} of {len(results)} instructions. Violated:"]
    for result, kw in failed:
        what = describe_instruction(result.instruction_id, kw)
        lines.append(f"- {result.instruction_id} ({what}): {result.message}")
    return "\n".join(lines)


class IFEvalEnv(Environment):
    """IFEval-style instruction following with per-instruction feedback.

    reward is 1 only when every instruction passes; score is the fraction passed.
    Train prompts are always generated; test prompts are generated from held-out
    topics, or read from `path` (IFEval records in parquet or JSON lines).
    """

    name = "ifeval"
    description = "IFEval-style verifiable instruction following (25 instruction types)"
    task_hint = (
        "following every explicit instruction in the prompt exactly: length, keywords, "
        "letter case, punctuation, formatting and structure"
    )

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 256,
        n_test: int = 64,
        path: str | None = None,
        strict: bool = True,
        max_constraints: int = 3,
        references: bool = True,
    ) -> None:
        if n_train < 0 or n_test < 0:
            raise ValueError("env_args.n_train and env_args.n_test must be >= 0")
        if not 1 <= max_constraints <= 3:
            raise ValueError(f"env_args.max_constraints: must be 1, 2 or 3, got {max_constraints}")
        self.seed, self.n_train, self.n_test = seed, n_train, n_test
        self.strict, self.max_constraints, self.references = strict, max_constraints, references
        self.path = path
        # Read the file now so that a bad path or record fails at construction time.
        self._test: list[Item] | None = None
        if path is not None:
            records = load_ifeval_records(path)
            self._test = [_record_item(record, Path(path).name) for record in records]
        self._train: list[Item] | None = None

    def train_items(self) -> list[Item]:
        if self._train is None:
            self._train = generate_items(
                self.n_train, self.seed, "train", self.max_constraints, self.references
            )
        return self._train

    def test_items(self) -> list[Item]:
        if self._test is None:
            self._test = generate_items(
                self.n_test, self.seed, "test", self.max_constraints, self.references
            )
        return self._test

    def score(self, item: Item, response: str) -> Score:
        answer = strip_think(response)
        ids = item.meta["instruction_id_list"]
        kwargs = item.meta.get("kwargs") or [None] * len(ids)
        results = evaluate_instructions(ids, kwargs, answer, item.prompt_text, self.strict)
        if not results:
            return Score(1.0, 1.0, "No instructions to check.")
        passed = sum(result.ok for result in results)
        feedback = format_feedback(results, kwargs)
        if not answer.strip():
            feedback = "The response is empty (nothing outside <think>...</think>).\n" + feedback
        return Score(float(passed == len(results)), passed / len(results), feedback)
