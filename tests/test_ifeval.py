"""The IFEval environment: all 25 verifiers, strict vs loose, feedback facts, the loader
on real records, and the seeded prompt generator."""

from __future__ import annotations

import importlib.util
import json
from itertools import combinations
from pathlib import Path

import pytest

from resd.envs import ifeval_text, make_env
from resd.envs.base import Item, Score
from resd.envs.ifeval import (
    CONFLICTS,
    INSTRUCTION_IDS,
    IFEvalEnv,
    build_reference,
    check_instruction,
    detect_language,
    evaluate_instructions,
    explain_instruction,
    generate_items,
    load_ifeval_records,
    strip_think,
)
from resd.envs.ifeval_checks import (
    clean_kwargs,
    count_sentences,
    describe_instruction,
    loose_variants,
    split_sentences,
)
from resd.envs.ifeval_text import LANGUAGE_BACKENDS, language_backend

HAS_LANGDETECT = importlib.util.find_spec("langdetect") is not None
IFEVAL_100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifeval_100.parquet"
needs_data = pytest.mark.skipif(
    not IFEVAL_100.exists(), reason="shared/data/ifeval_100.parquet absent"
)

SPANISH = (
    "Este tema merece una mirada atenta desde varios lados. Los detalles importan porque "
    "cambian la forma de toda la historia."
)

# (instruction id, kwargs, a response that follows it, one that does not, a fact the
# failure message must state)
CASES = [
    ("keywords:existence", {"keywords": ["ocean", "Moon"]}, "The OCEAN mirrors the moon.",
     "The sea is calm.", "missing keywords: 'ocean', 'Moon'"),
    ("keywords:frequency", {"keyword": "war", "frequency": 3, "relation": "at least"},
     "War, war and more war.", "One war only.", "'war' appears 1 time, need at least 3"),
    ("keywords:frequency", {"keyword": "war", "frequency": 2, "relation": "less than"},
     "One war only.", "War and war.", "'war' appears 2 times, need fewer than 2"),
    ("keywords:forbidden_words", {"forbidden_words": ["rock", "stone"]}, "Rocky hills.",
     "A rock and a Rock.", "used forbidden words: 'rock' (2x)"),
    ("keywords:letter_frequency", {"letter": "o", "let_frequency": 3, "let_relation": "less than"},
     "A cat sat.", "Oh no, look!", "letter 'o' appears 4 times, need fewer than 3"),
    ("language:response_language", {"language": "es"}, SPANISH,
     "This answer is written in English and it is not in Spanish.",
     "looks like English (en), need Spanish (es)"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two.", "One. Two! Three? Four.", "4 sentences, need fewer than 3"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}, "a\n***\nb\n***\nc",
     "a\n***\nb", "2 paragraphs separated by ***, need exactly 3"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two", "2 words, need at least 5"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
     "First part.\n\nHowever, the second.", "First part.\n\nBut the second.",
     "paragraph 2 starts with 'but', need 'however'"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name].", "found 1 placeholder"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. Bye.",
     "Hi. Bye.", "no postscript starting with 'P.S.'"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S. Bye.",
     "Hi.\nP.S. Bye.", "no postscript starting with 'P.P.S'"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro\n* a\n* b",
     "* a\n* b\n- c", "found 3 markdown bullet points"),
    ("detectable_format:constrained_response", {}, "My answer is no.", "Yes.",
     "contains none of the options"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* and ** **", "found 1 highlighted section"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", "Section 1\nfoo", "found 1 section header"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', '{"a": 1,}',
     "not valid JSON"),
    ("detectable_format:title", {}, "<<My Title>>\nText.", "<< >> no title.", "no title"),
    ("combination:two_responses", {}, "Answer A.\n******\nAnswer B.",
     "Answer A.\n******\nAnswer A.", "the two responses are identical"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."},
     "write a poem. Roses are red.", "Sure: Write a poem.",
     "does not start with the request repeated word for word"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"Done. Any other questions?"', "Any other questions? Bye.",
     "need it to end with exactly 'Any other questions?'"),
    ("startend:quotation", {}, '  "hello"  ', "hello", "must be wrapped in double quotation"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "NASA and the USA.", "Only NASA here.", "1 all-capital word (e.g. 'NASA'), need at least 2"),
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITALS AND IT IS ENGLISH.",
     "THIS IS mostly CAPITALS.", "found 6 lowercase letters (first near: "),
    ("change_case:english_lowercase", {}, "this is all lowercase and it is english.",
     "this is Not lowercase.", "found 1 capital letter"),
    ("punctuation:no_comma", {}, "No commas here.", "One, two, three.",
     "found 2 commas (first near: 'One, two, three.')"),
]  # fmt: skip


def test_cases_cover_all_25_instruction_ids():
    assert len(INSTRUCTION_IDS) == 25
    assert {case[0] for case in CASES} == set(INSTRUCTION_IDS)


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad", "fact"), CASES)
def test_verifier_accepts_good_and_rejects_bad_with_measured_fact(iid, kwargs, good, bad, fact):
    assert check_instruction(iid, kwargs, good)
    result = explain_instruction(iid, kwargs, bad)
    assert result.ok is False
    assert result.instruction_id == iid
    assert fact in result.message


@pytest.mark.parametrize("iid", INSTRUCTION_IDS)
def test_empty_response_fails_every_instruction(iid):
    kwargs = next(case[1] for case in CASES if case[0] == iid)
    result = explain_instruction(iid, kwargs, "  \n ")
    assert not result.ok
    assert "empty" in result.message


def test_pass_messages_state_the_measurement():
    assert explain_instruction(
        "length_constraints:number_words",
        {"num_words": 300, "relation": "at least"},
        "word " * 312,
    ) == ("length_constraints:number_words", True, "312 words, need at least 300")
    message = explain_instruction("punctuation:no_comma", {}, "x " * 40 + "a, b").message
    assert message.startswith("found 1 comma (first near: '...")


def test_edge_semantics_follow_the_benchmark():
    # A *** divider at the very start or end opens no paragraph; an empty middle one fails.
    assert check_instruction(
        "length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\na\n***\nb\n***"
    )
    empty = explain_instruction(
        "length_constraints:number_paragraphs", {"num_paragraphs": 3}, "a\n***\n***\nb"
    )
    assert not empty.ok and "paragraph 2 between *** dividers is empty" in empty.message
    # Keyword frequency counts substrings; forbidden words only whole words.
    kw = {"keyword": "art", "frequency": 2, "relation": "at least"}
    assert check_instruction("keywords:frequency", kw, "Art is smart.")
    assert check_instruction("keywords:forbidden_words", {"forbidden_words": ["art"]}, "smart")
    # Bold **x** counts as one highlight, not three.
    assert not check_instruction(
        "detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** text"
    )
    # A horizontal rule line starting with '-' counts as a bullet, as in the benchmark.
    assert not check_instruction(
        "detectable_format:number_bullet_lists", {"num_bullets": 1}, "* a\n---"
    )
    # The section splitter is case sensitive.
    kw = {"section_spliter": "SECTION", "num_sections": 1}
    assert not check_instruction("detectable_format:multiple_sections", kw, "Section 1\ntext")
    # Letters and postscript markers are matched case-insensitively.
    kw = {"letter": "A", "let_frequency": 2, "let_relation": "at least"}
    assert check_instruction("keywords:letter_frequency", kw, "a A")
    assert check_instruction(
        "detectable_content:postscript", {"postscript_marker": "P.S."}, "text\np.s. later"
    )


def test_loose_mode_forgives_intro_outro_lines_and_markdown():
    quoted = 'Sure, here it is:\n"the answer"'
    strict = explain_instruction("startend:quotation", {}, quoted)
    loose = explain_instruction("startend:quotation", {}, quoted, strict=False)
    assert not strict.ok and loose.ok and "first line removed" in loose.message

    ending = "Done. Any other questions?\nHope this helps!"
    kw = {"end_phrase": "Any other questions?"}
    assert not check_instruction("startend:end_checker", kw, ending)
    assert check_instruction("startend:end_checker", kw, ending, strict=False)

    bold = "Intro line.\n\n**However** the second."
    kw = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}
    assert not check_instruction("length_constraints:nth_paragraph_first_word", kw, bold)
    result = explain_instruction(
        "length_constraints:nth_paragraph_first_word", kw, bold, strict=False
    )
    assert result.ok and "'*' removed" in result.message

    fenced = 'Here is the JSON:\n{"a": 1}'
    assert not check_instruction("detectable_format:json_format", {}, fenced)
    assert check_instruction("detectable_format:json_format", {}, fenced, strict=False)

    # A comma only in the chatty first line is forgiven; one in the middle is not.
    assert check_instruction(
        "punctuation:no_comma", {}, "Sure, here:\nno commas\nbye", strict=False
    )
    middle = explain_instruction("punctuation:no_comma", {}, "a\nb, c\nd", strict=False)
    assert not middle.ok and middle.message.startswith("found 1 comma")


def test_none_kwargs_json_strings_and_bad_ids():
    padded = {key: None for key in ("num_words", "keywords", "language", "relation")}
    padded.update({"num_words": 2.0, "relation": "At  Least"})
    assert check_instruction("length_constraints:number_words", padded, "two words")
    assert clean_kwargs(json.dumps(padded)) == {"num_words": 2.0, "relation": "At  Least"}
    assert clean_kwargs({"x": float("nan"), "y": None}) == {}
    assert check_instruction("punctuation:no_comma", {k: None for k in "abc"}, "ok")
    assert check_instruction("punctuation:no_comma", None, "ok")
    with pytest.raises(ValueError, match="keywords:nonexistent"):
        check_instruction("keywords:nonexistent", {}, "text")
    with pytest.raises(ValueError, match=r"length_constraints:number_words.*num_words"):
        check_instruction("length_constraints:number_words", {"relation": "at least"}, "x")
    with pytest.raises(ValueError, match="relation"):
        check_instruction(
            "length_constraints:number_words", {"num_words": 3, "relation": "about"}, "x"
        )
    # repeat_prompt falls back to the prompt when the record omits prompt_to_repeat.
    assert check_instruction("combination:repeat_prompt", {}, "Say hi. Hi!", prompt="Say hi.")


def test_evaluate_instructions_pairs_ids_with_kwargs():
    results = evaluate_instructions(
        ["punctuation:no_comma", "keywords:existence"], [None, {"keywords": ["cat"]}], "a, dog"
    )
    assert [(r.instruction_id, r.ok) for r in results] == [
        ("punctuation:no_comma", False),
        ("keywords:existence", False),
    ]
    with pytest.raises(ValueError, match="2 instruction ids but 1 kwargs"):
        evaluate_instructions(["punctuation:no_comma", "startend:quotation"], [{}], "x")


def test_sentence_splitter():
    text = (
        "Dr. Smith met Mr. Jones, e.g. at 3.14 p.m. today! Was it fun? 1. First item.\n"
        "2. Second item\n<<title>>\nThe end... 日本語です。次の文。"
    )
    assert split_sentences(text) == [
        "Dr. Smith met Mr. Jones, e.g. at 3.14 p.m. today!",
        "Was it fun?",
        "1. First item.",
        "2. Second item <<title>> The end...",
        "日本語です。",
        "次の文。",
    ]
    assert count_sentences("no final punctuation") == 1
    assert count_sentences("*** --- 42.") == 0


@pytest.mark.parametrize(
    ("code", "text"),
    [
        ("en", "The weather was nice and we went to the park with the children."),
        ("es", SPANISH),
        ("pt", "Os detalhes são importantes porque mudam toda a história do país."),
        ("fr", "Les détails comptent parce qu'ils changent toute l'histoire de la ville."),
        ("de", "Die meisten Menschen sehen zuerst die Oberfläche und erst später die Tiefe."),
        ("it", "I dettagli contano perché cambiano tutta la storia della città."),
        ("ru", "Большинство людей сначала видят поверхность и только потом глубину."),
        ("uk", "Ця тема заслуговує на уважний погляд з різних боків і це важливо."),
        # langdetect reads the shorter "Тази тема заслужава внимателен поглед и това е
        # много важно за нас." as Macedonian; this one is Bulgarian to both detectors.
        (
            "bg",
            "Тази тема заслужава внимателен поглед от няколко страни. Подробностите са "
            "важни, защото променят цялата история.",
        ),
        ("hi", "यह विषय कई नज़रियों से देखने लायक है और इसका इतिहास लंबा है।"),
        ("mr", "हा विषय अनेक बाजूंनी पाहण्यासारखा आहे आणि तो महत्त्वाचा आहे."),
        ("ne", "यो विषय धेरै कोणबाट हेर्न लायक छ र यो महत्त्वपूर्ण पनि छ।"),
        ("ar", "هذا الموضوع يستحق نظرة متأنية من عدة جوانب."),
        ("fa", "این موضوع ارزش یک نگاه دقیق از چند جهت را دارد."),
        ("ur", "یہ موضوع کئی پہلوؤں سے دیکھنے کے قابل ہے اور اس کی تاریخ لمبی ہے۔"),
        ("ja", "このテーマはいろいろな角度から見る価値があります。"),
        ("zh", "这个题目值得从多个角度仔细研究。"),
        ("ko", "이 주제는 여러 방향에서 살펴볼 가치가 있습니다."),
        ("kn", "ಈ ವಿಷಯವು ಹಲವು ದೃಷ್ಟಿಕೋನಗಳಿಂದ ನೋಡಲು ಯೋಗ್ಯವಾಗಿದೆ."),
        ("pa", "ਇਹ ਵਿਸ਼ਾ ਕਈ ਪਾਸਿਆਂ ਤੋਂ ਦੇਖਣ ਯੋਗ ਹੈ।"),
        ("th", "หัวข้อนี้ควรค่าแก่การมองอย่างละเอียด"),
        ("fi", "Tämä aihe ansaitsee tarkan katseen ja se on myös tärkeä."),
        ("vi", "Chủ đề này đáng được xem xét kỹ từ nhiều phía và rất quan trọng."),
    ],
)
@pytest.mark.parametrize("backend", LANGUAGE_BACKENDS)
def test_language_detection(code, text, backend):
    if backend == "langdetect" and not HAS_LANGDETECT:
        pytest.skip("langdetect is not installed")
    assert detect_language(text, backend=backend) == code


def test_language_detection_edges():
    for backend in ("heuristic", "langdetect") if HAS_LANGDETECT else ("heuristic",):
        assert detect_language("12345 !!!", backend=backend) is None
        assert detect_language("HELLO THERE, THIS IS A TEST OF THE SYSTEM.", backend) == "en"
    # Text in another language fails the English-only case checks on language; with
    # whichever detector is installed.
    result = explain_instruction("change_case:english_lowercase", {}, SPANISH.lower())
    assert not result.ok and "need English" in result.message
    # The heuristic also sees through capitals; langdetect (and so the benchmark) often
    # cannot, e.g. it reads SPANISH.upper() as English.
    assert detect_language(SPANISH.upper(), backend="heuristic") == "es"
    with pytest.raises(ValueError, match="backend"):
        detect_language("text", backend="cld3")


def test_language_backend_is_langdetect_when_installed():
    assert language_backend() == ("langdetect" if HAS_LANGDETECT else "heuristic")
    if not HAS_LANGDETECT:
        with pytest.raises(ImportError, match="pip install langdetect"):
            detect_language("Some English text.", backend="langdetect")


@pytest.mark.skipif(not HAS_LANGDETECT, reason="langdetect is not installed")
def test_langdetect_is_deterministic_and_falls_back_when_it_sees_nothing():
    import langdetect

    # langdetect samples at random; short text is where an unseeded run wavers.
    short = ["hello", "ok then", "Sí", "ciao a tutti", "This is fine."]
    first = [detect_language(text) for text in short]
    saved = langdetect.DetectorFactory.seed
    try:
        langdetect.DetectorFactory.seed = 12345  # someone else's seed must not matter
        for _ in range(3):
            assert [detect_language(text) for text in short] == first
    finally:
        langdetect.DetectorFactory.seed = saved
    # Chinese comes back as "zh", not langdetect's "zh-cn" / "zh-tw".
    assert detect_language("这个题目值得从多个角度仔细研究。") == "zh"
    # Nothing for langdetect in a bare URL: the heuristic answers (Latin script -> en).
    assert detect_language("https://example.com/a-b") == "en"


# ----------------------------------------------------------------------- loader


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


PADDED = {"num_words": None, "relation": None, "keywords": None, "end_phrase": None}
FLAT = [
    {
        "key": 0,
        "prompt": "[Draft] Write without commas.",  # text that merely starts like JSON
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [PADDED, dict(PADDED, num_words=3, relation="at least")],
    },
    {
        "key": 8,
        "prompt": "Quote me.",
        "instruction_id_list": ["startend:quotation"],
        "kwargs": [PADDED],
    },
]


def _check_flat(records) -> None:
    assert [r.key for r in records] == ["0", "8"]
    assert records[0].kwargs == [{}, {"num_words": 3, "relation": "at least"}]
    assert records[0].messages == [{"role": "user", "content": "[Draft] Write without commas."}]
    assert records[1].kwargs == [{}]


def test_loader_reads_parquet_jsonl_and_json_lists(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(FLAT), tmp_path / "data.parquet")
    _check_flat(load_ifeval_records(tmp_path / "data.parquet"))
    _check_flat(load_ifeval_records(_write_jsonl(tmp_path / "data.jsonl", FLAT)))
    (tmp_path / "data.json").write_text(json.dumps(FLAT), encoding="utf-8")
    _check_flat(load_ifeval_records(tmp_path / "data.json"))
    # kwargs as JSON strings: per instruction, or the whole list at once.
    per_item = [dict(row, kwargs=[json.dumps(kw) for kw in row["kwargs"]]) for row in FLAT]
    _check_flat(load_ifeval_records(_write_jsonl(tmp_path / "a.jsonl", per_item)))
    whole = [dict(row, kwargs=json.dumps(row["kwargs"])) for row in FLAT]
    _check_flat(load_ifeval_records(_write_jsonl(tmp_path / "b.jsonl", whole)))


def test_loader_reads_the_verl_layout(tmp_path):
    truth = {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [PADDED]}
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "reward_model": {"ground_truth": json.dumps(truth), "style": "rule"},
        "extra_info": {"index": "42"},
    }
    (record,) = load_ifeval_records(_write_jsonl(tmp_path / "verl.jsonl", [row]))
    assert (record.key, record.prompt, record.kwargs) == ("42", "Hi", [{}])
    assert [m["role"] for m in record.messages] == ["system", "user"]


def test_loader_rejects_unknown_ids_and_mismatched_kwargs(tmp_path):
    row = {"key": 1, "prompt": "p", "instruction_id_list": ["x:y"], "kwargs": [{}]}
    with pytest.raises(ValueError, match=r"record 1.*'x:y'"):
        load_ifeval_records(_write_jsonl(tmp_path / "a.jsonl", [row]))
    row = dict(row, instruction_id_list=["punctuation:no_comma"], kwargs=[{}, {}])
    with pytest.raises(ValueError, match="1 instruction ids but 2 kwargs"):
        load_ifeval_records(_write_jsonl(tmp_path / "b.jsonl", [row]))
    row = {"key": 3, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"]}
    with pytest.raises(ValueError, match=r"record 3.*missing keyword argument.*num_words"):
        load_ifeval_records(_write_jsonl(tmp_path / "c.jsonl", [row]))
    with pytest.raises(ValueError, match="no instruction_id_list"):
        load_ifeval_records(_write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}]))


@needs_data
def test_real_ifeval_records_load_and_score():
    records = load_ifeval_records(IFEVAL_100)
    assert len(records) == 100
    assert all(set(r.instruction_id_list) <= set(INSTRUCTION_IDS) for r in records)
    assert all(None not in kw.values() for r in records for kw in r.kwargs)
    assert {"num_highlights": 3} in records[0].kwargs
    env = IFEvalEnv(path=str(IFEVAL_100), n_train=4)
    test = env.test_items()
    assert len(test) == 100 and len(env.train_items()) == 4
    dummy = "Sure, here is my answer.\nIt has a comma, *one highlight* and P.S. nothing else."
    for item in test:
        for strict in (True, False):
            env.strict = strict
            score = env.score(item, dummy)
            assert isinstance(score, Score)
            n = len(item.meta["instruction_id_list"])
            assert round(score.score * n) == pytest.approx(
                score.score * n
            )  # a fraction of n checks
            assert (score.reward == 1.0) == (score.score == 1.0)
    env.strict = True
    # record 0 asks for 3 highlighted sections among other things; the dummy has one
    first = test[0]
    assert {"num_highlights": 3} in first.meta["kwargs"]
    verdict = env.score(first, dummy)
    assert verdict.reward == 0.0 and "highlight" in verdict.feedback.lower()
    assert (
        env.score(first, dummy.replace("*one highlight*", "*one* *two* *three*")).score
        > verdict.score
    )
    # Generated training prompts never reuse an evaluation prompt.
    real = {item.prompt_text for item in test}
    assert not real & {item.prompt_text for item in generate_items(200, seed=3)}


# ----------------------------------------------------------------- environment


def _item(ids, kwargs, prompt="Do it.") -> Item:
    return Item(
        id="t",
        messages=[{"role": "user", "content": prompt}],
        meta={"instruction_id_list": ids, "kwargs": kwargs},
    )


def test_score_reward_fraction_and_feedback():
    env = IFEvalEnv(n_train=0, n_test=0)
    item = _item(
        ["punctuation:no_comma", "length_constraints:number_words", "keywords:existence"],
        [{}, {"num_words": 300, "relation": "at least"}, {"keywords": ["cat"]}],
    )
    score = env.score(item, "<think>plan, plan</think>\nA cat, a bird, a fish.")
    assert score.reward == 0.0 and score.score == pytest.approx(1 / 3)
    lines = score.feedback.splitlines()
    assert lines[0] == "Followed 1 of 3 instructions. Violated:"
    assert lines[1].startswith("- punctuation:no_comma (do not use any commas): ")
    assert lines[1].endswith("found 2 commas (first near: 'A cat, a bird, a fish.')")
    assert lines[2].endswith("(at least 300 words): 6 words, need at least 300")
    assert len(lines) == 3  # the instruction that passed is not listed
    missing = env.score(item, "a dog. " * 300).feedback
    assert "missing keywords: 'cat'" in missing and "no_comma" not in missing

    ok = env.score(_item(["punctuation:no_comma"], [{}]), "<think>a, b</think>No commas.")
    assert (ok.reward, ok.score, ok.feedback) == (1.0, 1.0, "All 1 instructions followed.")
    empty = env.score(_item(["punctuation:no_comma"], [{}]), "<think>unfinished, thought")
    assert empty.reward == 0.0 and "empty" in empty.feedback


def test_strip_think():
    assert strip_think("<think>a</think>\n\nanswer") == "answer"
    assert strip_think("reasoning</think>answer") == "answer"
    assert strip_think("<think>never closed") == ""
    assert strip_think("  plain  ") == "  plain  "


def test_strict_flag_changes_the_score():
    item = _item(["startend:quotation"], [{}])
    response = 'Here you go:\n"quoted answer"'
    assert IFEvalEnv(n_train=0, n_test=0).score(item, response).reward == 0.0
    assert IFEvalEnv(n_train=0, n_test=0, strict=False).score(item, response).reward == 1.0


def test_generator_is_deterministic_and_splits_topics():
    env_a, env_b = (
        IFEvalEnv(seed=5, n_train=40, n_test=20),
        IFEvalEnv(seed=5, n_train=40, n_test=20),
    )
    prompts = [i.prompt_text for i in env_a.train_items()]
    assert prompts == [i.prompt_text for i in env_b.train_items()]
    assert [i.meta for i in env_a.test_items()] == [i.meta for i in env_b.test_items()]
    assert prompts != [i.prompt_text for i in IFEvalEnv(seed=6, n_train=40).train_items()]
    train_topics = {i.meta["topic"] for i in generate_items(300, seed=1)}
    test_topics = {i.meta["topic"] for i in generate_items(100, seed=1, split="test")}
    assert train_topics and test_topics and not train_topics & test_topics
    assert len(set(prompts)) == len(prompts)
    assert len({i.id for i in env_a.train_items() + env_a.test_items()}) == 60


def test_generated_constraints_are_compatible_and_satisfiable():
    items = generate_items(400, seed=0)
    seen = set()
    for item in items:
        ids, kwargs = item.meta["instruction_id_list"], item.meta["kwargs"]
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        seen.update(ids)
        for a, b in combinations(ids, 2):
            assert b not in CONFLICTS[a], (a, b)
        # The constraints are stated in the prompt with their parameters.
        for kw in kwargs:
            for value in kw.values():
                if isinstance(value, int):
                    assert str(value) in item.prompt_text
        # The template reference satisfies every constraint, so the combination is sound.
        assert IFEvalEnv(n_train=0, n_test=0).score(item, item.reference).reward == 1.0
    assert seen == set(INSTRUCTION_IDS)
    assert {len(i.meta["instruction_id_list"]) for i in items} == {1, 2, 3}
    # Some contradictory pairs the conflict table must rule out.
    assert "change_case:english_capital" in CONFLICTS["change_case:english_lowercase"]
    assert "combination:two_responses" in CONFLICTS["length_constraints:number_paragraphs"]
    assert "detectable_format:json_format" in CONFLICTS["detectable_format:title"]
    assert len(generate_items(50, seed=2, max_constraints=1)[0].meta["instruction_id_list"]) == 1


def test_reference_builder_meets_each_constraint_alone_and_respects_case():
    kwargs = {case[0]: case[1] for case in CASES}
    kwargs["language:response_language"] = {"language": "ja"}
    # The builder meets "fewer than" letter counts only for the rare letters it avoids.
    kwargs["keywords:letter_frequency"] = {
        "letter": "z",
        "let_frequency": 2,
        "let_relation": "less than",
    }
    for iid in INSTRUCTION_IDS:
        reference = build_reference([iid], [kwargs[iid]])
        assert check_instruction(iid, kwargs[iid], reference), (iid, reference)
    combo = ["change_case:english_lowercase", "detectable_format:title", "keywords:existence"]
    text = build_reference(combo, [{}, {}, {"keywords": ["river"]}])
    assert text == text.lower() and "<<" in text and "river" in text


def test_env_registry_and_argument_checks(tmp_path):
    env = make_env("ifeval", {"seed": 1, "n_train": 3, "n_test": 2, "references": False})
    assert isinstance(env, IFEvalEnv) and env.name == "ifeval" and env.description
    assert len(env.train_items()) == 3 and len(env.test_items()) == 2
    assert all(item.reference is None for item in env.train_items())
    assert all(item.messages[0]["role"] == "user" for item in env.train_items())
    with pytest.raises(ValueError, match="max_constraints"):
        IFEvalEnv(max_constraints=4)
    with pytest.raises(ValueError, match=r"env_args.path: no such file: .*missing\.jsonl"):
        IFEvalEnv(path=str(tmp_path / "missing.jsonl"))


# --------------------------------------------- edge semantics and messages (mutation tests)


def test_nth_paragraph_first_word_needs_the_count_and_the_paragraph():
    iid = "length_constraints:nth_paragraph_first_word"
    kw = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"}
    # The right first word does not excuse a wrong paragraph count (a dropped count check).
    three = explain_instruction(iid, kw, "One.\n\nHowever, two.\n\nThree.")
    assert not three.ok
    assert "3 paragraphs separated by blank lines, need exactly 2" in three.message
    # Too few paragraphs: the message says the asked-for one is missing.
    third = {"num_paragraphs": 3, "nth_paragraph": 3, "first_word": "however"}
    result = explain_instruction(iid, third, "One.\n\nHowever, two.")
    assert not result.ok
    assert result.message == (
        "2 paragraphs separated by blank lines, need exactly 3; there is no paragraph 3"
    )


def test_first_word_is_cut_where_the_benchmark_cuts_it():
    iid = "length_constraints:nth_paragraph_first_word"
    kw = {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "however"}
    # Leading quotes are dropped and the word ends at a quote or . , ? !
    assert check_instruction(iid, kw, '"However," she said.')
    assert check_instruction(iid, kw, '\'"However" was the word.')
    # Bug fixed: a colon or semicolon ended the word, so "However:" passed; the benchmark
    # reads the word "however:" and fails it.
    for text in ("However: one thing.", "However; one thing."):
        result = explain_instruction(iid, kw, text)
        assert not result.ok and f"starts with '{text.split()[0].lower()}'" in result.message


def test_postscript_markers_follow_the_benchmark_patterns():
    iid = "detectable_content:postscript"
    # P.S. and P.P.S allow a space after each dot; other markers are matched literally.
    assert check_instruction(iid, {"postscript_marker": "P.S."}, "Hi.\nP. S. Bye.")
    assert check_instruction(iid, {"postscript_marker": "P.P.S"}, "Hi.\nP. P. S. Bye.")
    assert check_instruction(iid, {"postscript_marker": "Note:"}, "Hi.\nnote: bye")
    assert not check_instruction(iid, {"postscript_marker": "Note:"}, "Hi. No note here.")


@pytest.mark.parametrize("fence", ["```json", "```Json", "```JSON", "```"])
def test_json_inside_each_fence_the_benchmark_strips_passes(fence: str):
    assert check_instruction("detectable_format:json_format", {}, f'{fence}\n{{"a": 1}}\n```')


def test_two_responses_dividers_at_the_ends_pass_an_empty_middle_fails():
    iid = "combination:two_responses"
    assert check_instruction(iid, {}, "******\nAnswer A.\n******\nAnswer B.\n******")
    result = explain_instruction(iid, {}, "Answer A.\n******\n******\nAnswer B.")
    assert not result.ok
    assert "response 2 between ****** separators is empty" in result.message


def test_a_one_letter_bold_highlight_counts():
    kw = {"num_highlights": 1}
    assert check_instruction("detectable_format:number_highlighted_sections", kw, "**x** marks it")


def test_quotation_needs_an_opening_and_a_closing_mark():
    assert not check_instruction("startend:quotation", {}, ' " ')
    assert check_instruction("startend:quotation", {}, '""')
    opened = explain_instruction("startend:quotation", {}, '"hello')
    assert not opened.ok
    assert opened.message == (
        "starts with '\"' and ends with 'o'; the whole response must be wrapped in double "
        'quotation marks (")'
    )


def test_letter_frequency_counts_the_character_named_even_a_space():
    kw = {"letter": " ", "let_frequency": 2, "let_relation": "at least"}
    assert check_instruction("keywords:letter_frequency", kw, "a b c")
    assert not check_instruction("keywords:letter_frequency", kw, "abc d")


def test_capital_words_are_counted_as_the_benchmark_tokenizes_them():
    # Bug fixed: "DON'T" was one word and "NASA's" none; the benchmark's NLTK tokens make
    # "DON'T" two capital words ("DO", "N'T"), "DON’T" two ("DON", "T"), "NASA’s" one.
    iid = "change_case:capital_word_frequency"
    kw = {"capital_frequency": 3, "capital_relation": "at least"}
    for text in ("DON'T STOP.", "DON’T STOP.", "I'M HERE.", "NASA's CEO SAID."):
        assert check_instruction(iid, kw, text), text
    for text in ("NASA’s CEO.", "THE U.S.A. today.", "WELL-KNOWN FACT."):
        assert not check_instruction(iid, kw, text), text


def test_failure_messages_quote_what_was_seen():
    repeat = explain_instruction(
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem about cats and the reasons people love them so much."},
        "Write a poem about dogs and the reasons people love them so much, please.",
    )
    assert repeat.message == (
        "does not start with the request repeated word for word: it matches the first 19 "
        "characters, then has 'dogs and the reasons people lo' where the request has "
        "'cats and the reasons people lo'"
    )
    # A response that stops part-way through the request.
    cut = explain_instruction(
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem about cats."},
        "Write a poem",
    )
    assert cut.message.endswith(
        "it matches the first 12 characters, then has '' where the request has 'about cats.'"
    )
    end = explain_instruction(
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "The harbour stays closed until the storm has passed. Is there anything else?",
    )
    assert end.message == (
        "ends with '...torm has passed. Is there anything else?', "
        "need it to end with exactly 'Any other questions?'"
    )
    # The quoted ending is at least 40 characters, longer for a long phrase.
    long_end = explain_instruction(
        "startend:end_checker",
        {"end_phrase": "Is there anything else I can help with?"},
        "We will open the library again in May, once the roof is repaired. Thanks for reading!",
    )
    assert long_end.message.startswith(
        "ends with '...y, once the roof is repaired. Thanks for reading!', need"
    )
    placeholders = "detectable_content:number_placeholders"
    four = explain_instruction(placeholders, {"num_placeholders": 5}, "[a] [b], [c] [d].")
    assert four.message == (
        "found 4 placeholders in [square brackets] ([a], [b], [c]), need at least 5"
    )
    none = explain_instruction(placeholders, {"num_placeholders": 1}, "Dear friend.")
    assert none.message == "found 0 placeholders in [square brackets], need at least 1"
    digits = explain_instruction("language:response_language", {"language": "es"}, "123 456")
    assert digits.message == "response looks like no language (no letters), need Spanish (es)"
    caps = explain_instruction("change_case:english_capital", {}, "123 456")
    assert not caps.ok and caps.message.startswith("no capital letters at all; ")
    capitals = explain_instruction(
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "less than"},
        "ONE TWO ONE THREE FOUR",
    )
    assert capitals.message == (
        "5 all-capital words (e.g. 'ONE', 'TWO', 'THREE'), need fewer than 2"
    )
    upper = "THIS IS ALL IN CAPITALS AND IT IS ENGLISH."
    assert explain_instruction("change_case:english_capital", {}, upper).message == (
        "English, all capital letters"
    )


def test_clean_kwargs_reads_null_rejects_non_mappings_and_unwraps_numpy():
    assert clean_kwargs("null") == {}
    assert clean_kwargs("  ") == {}
    with pytest.raises(ValueError, match="must be a mapping, got list"):
        clean_kwargs('["keywords"]')
    # Parquet records read through pandas hold numpy arrays and scalars.
    np = pytest.importorskip("numpy")
    cleaned = clean_kwargs({"keywords": np.array(["sea", "moon"]), "num_words": np.int64(3)})
    assert cleaned == {"keywords": ["sea", "moon"], "num_words": 3}
    assert type(cleaned["keywords"]) is list and type(cleaned["num_words"]) is int
    assert clean_kwargs({"num_words": np.float64("nan")}) == {}


def test_evaluate_instructions_without_kwargs_checks_every_id():
    results = evaluate_instructions(["punctuation:no_comma", "startend:quotation"], None, "a, b")
    assert [(r.instruction_id, r.ok) for r in results] == [
        ("punctuation:no_comma", False),
        ("startend:quotation", False),
    ]


def test_kwargs_are_coerced_before_checking():
    # A single keyword stored as a string is one keyword, not a list of its letters.
    result = explain_instruction("keywords:existence", {"keywords": "ocean"}, "The sea.")
    assert result.message == "missing keywords: 'ocean'"
    assert not check_instruction("keywords:forbidden_words", {"forbidden_words": "rock"}, "A rock.")
    # Counts stored as floats or digit strings become ints; anything else is an error.
    words = {"num_words": 2.0, "relation": "at least"}
    assert explain_instruction("length_constraints:number_words", words, "a b c").message == (
        "3 words, need at least 2"
    )
    with pytest.raises(ValueError, match="num_words must be an integer, got 'many'"):
        check_instruction(
            "length_constraints:number_words", {"num_words": "many", "relation": "at least"}, "a"
        )
    # Every relation key is normalised and validated, not only `relation`.
    letter = {"letter": "a", "let_frequency": 2, "let_relation": " At  LEAST "}
    assert check_instruction("keywords:letter_frequency", letter, "a banana")
    capital = {"capital_frequency": 2, "capital_relation": "Less Than"}
    assert check_instruction("change_case:capital_word_frequency", capital, "Only NASA here.")
    with pytest.raises(ValueError, match="capital_relation must be one of"):
        check_instruction(
            "change_case:capital_word_frequency",
            {"capital_frequency": 2, "capital_relation": "exactly"},
            "NASA",
        )


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad", "fact"), CASES)
def test_counts_stored_as_digit_strings_are_read_as_numbers(iid, kwargs, good, bad, fact):
    # Every count key is converted: one left a string would compare "3" with an int.
    as_text = {key: str(v) if isinstance(v, int) else v for key, v in kwargs.items()}
    assert check_instruction(iid, as_text, good)
    assert not check_instruction(iid, as_text, bad)


def test_loose_mode_tries_a_cut_line_and_stars_removed_together():
    text = 'Sure:\n*"quoted"*'
    result = explain_instruction("startend:quotation", {}, text, strict=False)
    assert result.ok
    assert result.message.endswith("(with the first line removed and '*' removed)")


def test_sentence_ends_after_a_single_letter_unless_it_is_a_dot():
    # Only '.' can end an initial ("J. Smith"); "A!" and "B?" end their sentences.
    assert count_sentences("I got an A! Then I went home.") == 2
    assert count_sentences("Plan B? Yes.") == 2
    assert count_sentences("We met J. Smith today.") == 1
    assert count_sentences("J. Smith went home.") == 1
    assert count_sentences('The sign said "Dr." and nothing else.') == 1
    # A CJK full stop needs no space after it, and the rest is kept whole.
    assert split_sentences("日本語です。次の文") == ["日本語です。", "次の文"]
    assert split_sentences("One.  Two\nthree") == ["One.", "Two three"]
    # A stray dot on its own line neither counts nor breaks the splitter.
    assert count_sentences("Intro line.\n.\nNext line.") == 2


def test_languages_only_langdetect_knows_are_named():
    described = describe_instruction("language:response_language", {"language": "ca"})
    assert described == "answer only in Catalan (ca)"


def test_heuristic_gives_no_language_for_a_script_it_has_no_table_for():
    # Mongolian has a script name but no entry; Python may give Tangut ideographs no name.
    assert detect_language("ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ", backend="heuristic") is None
    assert detect_language("\U00017000\U00017001", backend="heuristic") is None


def test_heuristic_follows_the_dominant_script():
    # As many kana as kanji is Japanese; a Russian name in English prose stays English.
    assert detect_language("日本です", backend="heuristic") == "ja"
    # Two hanzi with no kana are Chinese; so is Chinese around a shorter Latin word.
    assert detect_language("中文", backend="heuristic") == "zh"
    assert detect_language("我喜欢用Python写程序", backend="heuristic") == "zh"
    # Kana from 10% of the Han and kana letters up is Japanese, just under is Chinese.
    assert detect_language("東京大学研究所日本の", backend="heuristic") == "ja"
    assert detect_language("東京大学研究所日本語の", backend="heuristic") == "zh"
    # Fullwidth letters belong to the script after the FULLWIDTH in their name.
    caps = "ＴＨＥ ＷＥＡＴＨＥＲ ＷＡＳ ＮＩＣＥ ＡＮＤ ＷＥ ＷＥＮＴ ＴＯ ＴＨＥ ＰＡＲＫ"
    assert detect_language(caps, backend="heuristic") == "en"
    assert detect_language("ｶﾀｶﾅ", backend="heuristic") == "ja"  # halfwidth katakana
    # Stopwords are found with the punctuation around them trimmed.
    assert detect_language("Casa: el, la, de.", backend="heuristic") == "es"
    # A letter typical of one language weighs as much as one stopword; ties go to the
    # first candidate (English for Latin script).
    assert detect_language("the łąk", backend="heuristic") == "pl"
    assert detect_language("the łk", backend="heuristic") == "en"
    prose = "The weather was nice and we went to the park with the children, said Жора."
    assert detect_language(prose, backend="heuristic") == "en"


def test_without_langdetect_the_heuristic_answers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ifeval_text, "_langdetect_factory", lambda: None)
    assert language_backend() == "heuristic"
    assert detect_language(SPANISH) == "es"
    with pytest.raises(ImportError, match="pip install langdetect"):
        detect_language(SPANISH, backend="langdetect")


@pytest.mark.skipif(not HAS_LANGDETECT, reason="langdetect is not installed")
@pytest.mark.parametrize("code", ["zh-cn", "zh-tw"])
def test_langdetect_chinese_variants_read_as_zh(monkeypatch: pytest.MonkeyPatch, code: str):
    # IFEval's language codes have one Chinese; langdetect tells two scripts apart.
    class Detector:
        def append(self, text: str) -> None:
            pass

        def detect(self) -> str:
            return code

    class Factory:
        def create(self) -> Detector:
            return Detector()

    monkeypatch.setattr(ifeval_text, "_langdetect_factory", lambda: Factory())
    assert detect_language("漢字", backend="langdetect") == "zh"


# ------------------------------------- boundaries and normalisation (IFEval verifiers)


def test_padded_text_kwargs_are_stripped_as_the_benchmark_strips_them():
    # The benchmark strips the marker, splitter, end phrase and request it is given; a
    # stray space in a record must not turn a followed instruction into a failure.
    assert check_instruction(
        "detectable_content:postscript", {"postscript_marker": " P.S. "}, "Hi.\nP. S. Bye."
    )
    sections = {"section_spliter": " Section ", "num_sections": 2}
    assert check_instruction(
        "detectable_format:multiple_sections", sections, "Section 1\nfoo\nSection 2\nbar"
    )
    assert check_instruction(
        "startend:end_checker", {"end_phrase": " Any other questions? "}, "Any other questions?"
    )
    # The request and the response are both compared without their outer whitespace.
    repeat = {"prompt_to_repeat": "Write a poem.\n"}
    assert check_instruction("combination:repeat_prompt", repeat, "Write a poem. Roses.")
    padded = "\n  Write a poem. Roses."
    assert check_instruction(
        "combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, padded
    )


def test_word_and_language_kwargs_are_matched_in_lower_case():
    # A capitalised first word ("However") or language code ("ES") names the same demand.
    kw = {"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "However"}
    assert check_instruction("length_constraints:nth_paragraph_first_word", kw, "However, yes.")
    assert check_instruction("language:response_language", {"language": "ES"}, SPANISH)
    described = describe_instruction("language:response_language", {"language": "ES"})
    assert described == "answer only in Spanish (es)"


def test_json_fenced_between_blank_lines_passes():
    # Leading and trailing blank lines around a ```json fence are not part of the JSON.
    fenced = '\n```json\n{"a": 1}\n```\n'
    assert check_instruction("detectable_format:json_format", {}, fenced)


def test_blank_paragraphs_are_neither_counted_nor_allowed_between_dividers():
    # A paragraph of spaces between two *** dividers is empty (the benchmark fails it) ...
    result = explain_instruction(
        "length_constraints:number_paragraphs", {"num_paragraphs": 3}, "a\n***\n \n***\nb"
    )
    assert not result.ok and "paragraph 2 between *** dividers is empty" in result.message
    # ... and a blank-line paragraph of spaces is not a paragraph either.
    kw = {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "one"}
    assert check_instruction("length_constraints:nth_paragraph_first_word", kw, "One.\n\n \n\nTwo.")


def test_feedback_windows_and_clips_are_marked_where_text_was_cut():
    # The comma is shown with 25 characters either side, '...' marking each cut end.
    text = (
        "The first part of this reply has no commas at all but here, it does and then it goes on."
    )
    assert explain_instruction("punctuation:no_comma", {}, text).message == (
        "found 1 comma (first near: '...no commas at all but here, it does and then it goe...')"
    )
    # A comma 26 characters in: the one character cut from the start is marked too.
    start = explain_instruction("punctuation:no_comma", {}, "x" * 26 + ", y").message
    assert start == "found 1 comma (first near: '...xxxxxxxxxxxxxxxxxxxxxxxxx, y')"
    # A long request is clipped to 60 characters in the instruction's statement.
    long = "Write a long letter to the editor of the local newspaper about the new bus timetable."
    assert describe_instruction("combination:repeat_prompt", {"prompt_to_repeat": long}) == (
        "first repeat the request word for word: "
        "'Write a long letter to the editor of the local newspaper ...'"
    )
    lower = "this is all lowercase and it is english."
    assert explain_instruction("change_case:english_lowercase", {}, lower).message == (
        "English, all lowercase letters"
    )


def test_a_highlight_of_only_spaces_does_not_count():
    # "* *" wraps nothing but a space: the benchmark strips it and does not count it.
    kw = {"num_highlights": 2}
    assert not check_instruction(
        "detectable_format:number_highlighted_sections", kw, "*one* and * *"
    )


def test_padded_letters_and_quoted_endings_are_read_without_their_whitespace():
    # The benchmark strips the letter it counts and the response before its end check.
    letter = {"letter": " A ", "let_frequency": 4, "let_relation": "at least"}
    assert check_instruction("keywords:letter_frequency", letter, "a banana")
    end = {"end_phrase": "Any other questions?"}
    assert check_instruction("startend:end_checker", end, '  "Done. Any other questions?"\n')


def test_every_instruction_states_its_demand():
    # Feedback names each violated instruction by this statement; an empty one says nothing.
    for iid in INSTRUCTION_IDS:
        kwargs = next(case[1] for case in CASES if case[0] == iid)
        assert describe_instruction(iid, kwargs).strip(), iid


def test_repeat_prompt_without_a_request_or_a_prompt_is_an_error():
    # With nothing to repeat, every response would "start with" the empty request.
    with pytest.raises(ValueError, match=r"missing keyword argument.*prompt_to_repeat"):
        check_instruction("combination:repeat_prompt", {}, "Anything at all.")


def test_evaluate_instructions_is_strict_unless_told_otherwise():
    response = 'Sure, here it is:\n"the answer"'
    (strict,) = evaluate_instructions(["startend:quotation"], None, response)
    (loose,) = evaluate_instructions(["startend:quotation"], None, response, strict=False)
    assert not strict.ok and loose.ok


def test_loose_variants_are_the_benchmarks_eight_responses_with_labels():
    # As in the benchmark, a cut response is stripped; its label names the relaxation.
    assert loose_variants("Intro:\n  *body*  \nBye") == [
        ("", "Intro:\n  *body*  \nBye"),
        ("'*' removed", "Intro:\n  body  \nBye"),
        ("the first line removed", "*body*  \nBye"),
        ("the last line removed", "Intro:\n  *body*"),
        ("the first and last lines removed", "*body*"),
        ("the first line removed and '*' removed", "body  \nBye"),
        ("the last line removed and '*' removed", "Intro:\n  body"),
        ("the first and last lines removed and '*' removed", "body"),
    ]


def test_a_loose_variant_left_blank_is_not_checked():
    # With '*' removed, "* *" is a blank response, which has no bullets; the benchmark
    # skips blank variants, so it must not pass a request for no bullet points.
    kw = {"num_bullets": 0}
    assert not check_instruction("detectable_format:number_bullet_lists", kw, "* *", strict=False)


def test_digits_of_other_scripts_are_no_language():
    # langdetect reads Devanagari and Persian digits as Marathi and Persian; they are no
    # letters, so no language, and an answer made only of them earns no reward.
    for digits in ("१२३ ४५६", "۱۲۳ ۴۵۶ ۷۸۹"):
        assert detect_language(digits) is None
    assert not check_instruction("language:response_language", {"language": "mr"}, "१२३ ४५६")


def test_a_sentence_can_end_in_a_number():
    # Only a single *letter* before '.' is an initial; "to 5." ends its sentence.
    assert split_sentences("I counted to 5. Then I stopped.") == [
        "I counted to 5.",
        "Then I stopped.",
    ]


@pytest.mark.skipif(not HAS_LANGDETECT, reason="langdetect is not installed")
def test_langdetect_verdicts_are_those_of_seed_0_as_in_the_conformance_run():
    # The benchmark comparison seeds langdetect with 0; ours must draw the same samples.
    # On "hello" seeds 0 and 1 disagree (Finnish vs Dutch), so a changed seed shows here.
    import langdetect

    saved = langdetect.DetectorFactory.seed
    try:
        langdetect.DetectorFactory.seed = 0
        for text in ("hello", "ok then", "ciao a tutti"):
            assert detect_language(text) == langdetect.detect(text), text
    finally:
        langdetect.DetectorFactory.seed = saved


def test_heuristic_counts_typical_letters_in_capitals_too():
    # "ŁĄ" weigh for Polish whatever their case, as the stopwords do.
    assert detect_language("THE ŁĄK", backend="heuristic") == "pl"
