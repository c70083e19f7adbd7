"""The IFEval environment module itself (resd.envs.ifeval): the record loader's layouts,
the environment's arguments and scoring, and reasoning stripping. Each test names the
wrong behaviour it catches; the verifiers have their own tests in test_ifeval.py."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from resd.envs import ifeval_banks as banks
from resd.envs.base import Item
from resd.envs.ifeval import (
    CONFLICTS,
    INSTRUCTION_IDS,
    LANGUAGE_NAMES,
    IFEvalEnv,
    build_reference,
    check_instruction,
    generate_items,
    load_ifeval_records,
    strip_think,
)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_chat_stored_as_a_json_string_is_read_as_messages(tmp_path: Path) -> None:
    """A prompt column holding a serialised chat must become that chat, not one user
    message whose text is the JSON (the model would be shown raw JSON)."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    for text in (json.dumps(chat), "\n  " + json.dumps(chat)):  # leading whitespace too
        row = {"key": 5, "prompt": text, "instruction_id_list": ["punctuation:no_comma"]}
        (record,) = load_ifeval_records(_write_jsonl(tmp_path / "chat.jsonl", [row]))
        assert record.messages == chat
        assert record.prompt == "Hi"


@pytest.mark.parametrize("n_train, n_test", [(-1, 4), (4, -1)])
def test_negative_split_sizes_are_rejected(n_train: int, n_test: int) -> None:
    """A negative n_train or n_test is a configuration error, caught at construction."""
    with pytest.raises(ValueError, match=r"n_train and env_args\.n_test must be >= 0"):
        IFEvalEnv(n_train=n_train, n_test=n_test)


def test_an_item_without_instructions_scores_full_marks() -> None:
    """With no instruction ids there is nothing to violate: reward 1, not a division by zero."""
    item = Item(
        id="t", messages=[{"role": "user", "content": "Hi"}], meta={"instruction_id_list": []}
    )
    score = IFEvalEnv(n_train=0, n_test=0).score(item, "anything")
    assert (score.reward, score.score, score.feedback) == (1.0, 1.0, "No instructions to check.")


def test_an_empty_answer_is_named_first_in_the_feedback() -> None:
    """A reply that is all reasoning gets feedback saying the answer is empty, before the
    per-instruction lines (else the teacher sees only verifier failures on '')."""
    item = Item(
        id="t",
        messages=[{"role": "user", "content": "Hi"}],
        meta={"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    )
    env = IFEvalEnv(n_train=0, n_test=0)
    lines = env.score(item, "<think>still thinking").feedback.splitlines()
    assert lines[0] == "The response is empty (nothing outside <think>...</think>)."
    assert env.score(item, " \n ").feedback.startswith("The response is empty")
    assert not env.score(item, "No commas here.").feedback.startswith("The response is empty")


def test_every_name_the_module_exports_exists() -> None:
    """`from resd.envs.ifeval import *` must work: each name in __all__ (including the
    re-exported verifier and generator helpers) is defined in the module."""
    import resd.envs.ifeval as ifeval

    namespace: dict[str, object] = {}
    exec("from resd.envs.ifeval import *", namespace)
    assert all(getattr(ifeval, name, None) is not None for name in ifeval.__all__)
    assert {"CONFLICTS", "generate_items", "check_instruction", "strip_think"} <= set(namespace)


def test_record_keys_come_from_key_then_extra_info_index_then_position(tmp_path: Path) -> None:
    """The `key` column wins over veRL's extra_info.index; a record with neither is keyed
    by its position, and a plain-text extra_info (not JSON) is ignored, not parsed."""
    truth = json.dumps({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    rows = [
        {
            "key": 7,
            "prompt": "a",
            "reward_model": {"ground_truth": truth},
            "extra_info": {"index": 3},
        },
        {"prompt": "b", "reward_model": {"ground_truth": truth}, "extra_info": "split: test"},
        {"prompt": "c", "reward_model": {"ground_truth": truth}, "extra_info": {"index": 9}},
    ]
    records = load_ifeval_records(_write_jsonl(tmp_path / "keys.jsonl", rows))
    assert [r.key for r in records] == ["7", "1", "9"]
    env = IFEvalEnv(path=str(tmp_path / "keys.jsonl"))
    assert [item.id for item in env.test_items()] == ["ifeval/7", "ifeval/1", "ifeval/9"]
    # Each item says which record of which file it came from.
    first = env.test_items()[0]
    assert (first.meta["key"], first.meta["source"]) == ("7", "keys.jsonl")


def test_a_verl_ground_truth_without_instruction_ids_is_reported(tmp_path: Path) -> None:
    """A reward_model.ground_truth mapping lacking instruction_id_list fails with the
    loader's explanation, not a bare KeyError from deep inside."""
    row = {"prompt": "p", "reward_model": {"ground_truth": {"kwargs": [{}]}}}
    with pytest.raises(ValueError, match="record 0 has no instruction_id_list"):
        load_ifeval_records(_write_jsonl(tmp_path / "verl.jsonl", [row]))


def test_text_before_an_unclosed_think_block_is_trimmed() -> None:
    """The answer written before an unterminated <think> is judged without the whitespace
    that separated it from the block, and the last </think> ends the reasoning."""
    assert strip_think("Draft answer.\n\n<think>more thoughts") == "Draft answer."
    assert strip_think("<think>a</think>b</think>\n final ") == "final"


def test_defaults_are_256_train_and_64_test_prompts_with_references_from_seed_0() -> None:
    """An `env: ifeval` run with no env_args gets the documented split sizes, template
    references for SDFT, and the same prompts as seed 0."""
    env = IFEvalEnv()
    train, test = env.train_items(), env.test_items()
    assert (len(train), len(test)) == (256, 64)
    assert all(item.reference for item in train)
    seeded = IFEvalEnv(seed=0, n_train=256, n_test=64)
    assert [i.prompt_text for i in train] == [i.prompt_text for i in seeded.train_items()]
    assert [i.prompt_text for i in test] == [i.prompt_text for i in seeded.test_items()]


def test_an_item_without_kwargs_is_scored_with_default_arguments() -> None:
    """Items whose meta has no `kwargs` (instructions that take none) are scored, and
    their feedback written, as if every instruction had empty arguments."""
    item = Item(
        id="t",
        messages=[{"role": "user", "content": "Hi"}],
        meta={"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"]},
    )
    score = IFEvalEnv(n_train=0, n_test=0).score(item, "yes, all lower case")
    assert (score.reward, score.score) == (0.0, 0.5)
    assert score.feedback.splitlines()[0] == "Followed 1 of 2 instructions. Violated:"


@pytest.mark.parametrize("prompt", ["[]", "[1, 2]", '["a", "b"]'])
def test_a_prompt_that_is_a_json_list_but_not_a_chat_stays_text(
    tmp_path: Path, prompt: str
) -> None:
    """Only a non-empty list of messages is a chat; any other JSON list is the user's text."""
    row = {"key": 1, "prompt": prompt, "instruction_id_list": ["punctuation:no_comma"]}
    (record,) = load_ifeval_records(_write_jsonl(tmp_path / "p.jsonl", [row]))
    assert record.messages == [{"role": "user", "content": prompt}]
    assert record.prompt == prompt


def test_kwargs_as_json_text_with_leading_whitespace_are_parsed(tmp_path: Path) -> None:
    """A kwargs column serialised with a leading newline or space is still JSON, read as
    arguments rather than rejected as a string."""
    row = {
        "key": 2,
        "prompt": "Write at least 3 words.",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": '\n [{"num_words": 3, "relation": "at least"}]',
    }
    (record,) = load_ifeval_records(_write_jsonl(tmp_path / "k.jsonl", [row]))
    assert record.kwargs == [{"num_words": 3, "relation": "at least"}]


def test_max_constraints_accepts_1_to_3_only() -> None:
    """max_constraints=1 is valid (one constraint per prompt); 0 is rejected."""
    items = IFEvalEnv(n_train=20, n_test=0, max_constraints=1).train_items()
    assert {len(item.meta["instruction_id_list"]) for item in items} == {1}
    with pytest.raises(ValueError, match="max_constraints"):
        IFEvalEnv(max_constraints=0)


def test_the_prompt_is_the_last_user_turn_or_the_ground_truth_prompt(tmp_path: Path) -> None:
    """In a multi-turn chat the instructions are in the last user message; a veRL row with
    no prompt column takes the prompt stored beside the ground truth."""
    chat = [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Now write without commas."},
    ]
    truth = {"instruction_id_list": ["punctuation:no_comma"], "prompt": "From the truth."}
    flat = {"key": 1, "prompt": chat, "instruction_id_list": ["punctuation:no_comma"]}
    verl = {"key": 2, "reward_model": {"ground_truth": truth}}
    (first,) = load_ifeval_records(_write_jsonl(tmp_path / "flat.jsonl", [flat]))
    (second,) = load_ifeval_records(_write_jsonl(tmp_path / "verl.jsonl", [verl]))
    assert (first.prompt, first.messages) == ("Now write without commas.", chat)
    assert second.prompt == "From the truth."
    assert second.messages == [{"role": "user", "content": "From the truth."}]


def _listed(words: list[str]) -> str:
    """English listing as a prompt should state it: "a", "b" and "c"."""
    quoted = [f'"{word}"' for word in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def test_generated_prompts_list_every_required_and_forbidden_word() -> None:
    """A generated prompt names every keyword its verifier will demand (or forbid), as an
    English list, with "keyword" in the singular for one word; a prompt that dropped or
    garbled one would ask for less than the check enforces."""
    seen = 0
    for item in generate_items(300, seed=0):
        for iid, kw in zip(item.meta["instruction_id_list"], item.meta["kwargs"], strict=True):
            words = kw.get("keywords") or kw.get("forbidden_words")
            if not words:
                continue
            seen += 1
            assert _listed(words) in item.prompt_text, (iid, item.prompt_text)
            if iid == "keywords:existence" and len(words) == 1:
                assert "keywords" not in item.prompt_text
    assert seen > 50


def test_the_generated_test_split_uses_every_fifth_topic() -> None:
    """The held-out topics are exactly TOPICS[0::5], as documented; the train split never
    draws one of them."""
    test_topics = {item.meta["topic"] for item in generate_items(200, seed=1, split="test")}
    train_topics = {item.meta["topic"] for item in generate_items(200, seed=1)}
    assert test_topics <= set(banks.TOPICS[::5]) and len(test_topics) > 1
    assert not train_topics & set(banks.TOPICS[::5])


# ------------------------------------------------ template references (mutation tests)

# Arguments at the demanding end of what the generator draws, both relations of each
# count. A reference that cannot meet one silently removes that combination from the
# generated prompts (the generator redraws it), so only a direct check notices.
_HARD_KWARGS: dict[str, list[dict[str, Any]]] = {
    "keywords:existence": [{"keywords": ["adventure", "balance", "brilliant"]}],
    "keywords:frequency": [
        {"keyword": "courage", "frequency": 5, "relation": "at least"},
        {"keyword": "courage", "frequency": 2, "relation": "less than"},
    ],
    "keywords:forbidden_words": [{"forbidden_words": ["very", "really", "thing"]}],
    "keywords:letter_frequency": [
        {"letter": "e", "let_frequency": 30, "let_relation": "at least"},
        {"letter": "q", "let_frequency": 2, "let_relation": "less than"},
    ],
    "language:response_language": [{"language": "ja"}, {"language": "fr"}],
    "length_constraints:number_sentences": [
        {"num_sentences": 12, "relation": "at least"},
        {"num_sentences": 8, "relation": "less than"},
    ],
    "length_constraints:number_paragraphs": [{"num_paragraphs": 5}],
    "length_constraints:number_words": [
        {"num_words": 300, "relation": "at least"},
        {"num_words": 80, "relation": "less than"},
    ],
    "length_constraints:nth_paragraph_first_word": [
        {"num_paragraphs": 4, "nth_paragraph": 1, "first_word": "however"},
        {"num_paragraphs": 4, "nth_paragraph": 4, "first_word": "finally"},
    ],
    "detectable_content:number_placeholders": [{"num_placeholders": 4}],
    "detectable_content:postscript": [
        {"postscript_marker": "P.S."},
        {"postscript_marker": "P.P.S"},
    ],
    "detectable_format:number_bullet_lists": [{"num_bullets": 6}],
    "detectable_format:constrained_response": [{}],
    "detectable_format:number_highlighted_sections": [{"num_highlights": 4}],
    "detectable_format:multiple_sections": [{"section_spliter": "Section", "num_sections": 4}],
    "detectable_format:json_format": [{}],
    "detectable_format:title": [{}],
    "combination:two_responses": [{}],
    "combination:repeat_prompt": [{"prompt_to_repeat": "Write a short story about rivers."}],
    "startend:end_checker": [{"end_phrase": "Is there anything else I can help with?"}],
    "startend:quotation": [{}],
    "change_case:capital_word_frequency": [
        {"capital_frequency": 8, "capital_relation": "at least"},
        {"capital_frequency": 3, "capital_relation": "less than"},
    ],
    "change_case:english_capital": [{}],
    "change_case:english_lowercase": [{}],
    "punctuation:no_comma": [{}],
}


@pytest.mark.parametrize("first", INSTRUCTION_IDS)
def test_every_compatible_pair_of_instructions_has_a_reference_meeting_both(first: str) -> None:
    """For each instruction alone and with each partner the conflict table allows, the
    template reference meets every check, at demanding counts. Catches a reference that
    stops growing for "at least" words, sentences or letters, or that puts the title or
    postscript where it breaks a paragraph count."""
    assert set(_HARD_KWARGS) == set(INSTRUCTION_IDS)
    later = INSTRUCTION_IDS[INSTRUCTION_IDS.index(first) + 1 :]
    combos = [[first]] + [[first, other] for other in later if other not in CONFLICTS[first]]
    for ids in combos:
        for kwargs in _argument_sets(ids):
            text = build_reference(ids, kwargs)
            for iid, kw in zip(ids, kwargs, strict=True):
                assert check_instruction(iid, kw, text), (ids, kwargs, iid, text)


def _argument_sets(ids: list[str]) -> list[list[dict[str, Any]]]:
    sets: list[list[dict[str, Any]]] = [[]]
    for iid in ids:
        sets = [[*prefix, kw] for prefix in sets for kw in _HARD_KWARGS[iid]]
    return sets


def test_a_grown_reference_spreads_fresh_sentences_over_its_paragraphs() -> None:
    """Sentences added to reach a word count go round the paragraphs in turn and never
    repeat while the bank has unused ones; bullet points are different sentences too. A
    reference that stuck to one sentence or one paragraph still passes the counts but is
    a poor demonstration."""
    ids = [
        "length_constraints:number_paragraphs",
        "length_constraints:number_words",
        "detectable_format:number_bullet_lists",
    ]
    kwargs = [{"num_paragraphs": 4}, {"num_words": 150, "relation": "at least"}, {"num_bullets": 3}]
    text = build_reference(ids, kwargs)
    assert all(check_instruction(i, kw, text) for i, kw in zip(ids, kwargs, strict=True))
    paragraphs = text.split("\n\n***\n\n")
    prose, bullets = paragraphs[-1].split("\n\n")
    paragraphs[-1] = prose
    sentences = [s.strip() + "." for p in paragraphs for s in p.split(".") if s.strip()]
    bullet_lines = [line.removeprefix("* ") for line in bullets.splitlines()]
    assert len(bullet_lines) == 3
    everything = sentences + bullet_lines
    assert len(everything) == len(set(everything)), text
    counts = [len([s for s in p.split(".") if s.strip()]) for p in paragraphs]
    assert max(counts) - min(counts) <= 1, counts


def test_a_yes_no_reference_gives_the_answer_first() -> None:
    """A constrained-response reference is the answer sentence itself, and any keyword
    sentence follows it, so the demonstration answers the question before anything else."""
    assert build_reference(["detectable_format:constrained_response"], [{}]) == "My answer is yes."
    ids = ["detectable_format:constrained_response", "keywords:existence"]
    text = build_reference(ids, [{}, {"keywords": ["garden"]}])
    assert text.startswith("My answer is yes. ") and "garden" in text


def test_only_the_named_paragraph_starts_with_the_word_and_the_title_goes_last() -> None:
    """With nth_paragraph_first_word the other paragraphs keep their own first words, and
    the title and postscript attach to the last paragraph: as a first line the title would
    become paragraph 1's first word, and a postscript after a blank line a paragraph of
    its own."""
    ids = [
        "length_constraints:nth_paragraph_first_word",
        "detectable_format:title",
        "detectable_content:postscript",
    ]
    for nth in (1, 2):
        kw = {"num_paragraphs": 3, "nth_paragraph": nth, "first_word": "however"}
        kwargs = [kw, {}, {"postscript_marker": "P.S."}]
        text = build_reference(ids, kwargs)
        assert all(check_instruction(i, k, text) for i, k in zip(ids, kwargs, strict=True))
        paragraphs = text.split("\n\n")
        starts = [p.split()[0].lower() == "however" for p in paragraphs]
        assert starts == [index == nth - 1 for index in range(3)], text
        # The word is put before a whole bank sentence, whose first letter is lowered.
        first, rest = paragraphs[nth - 1].splitlines()[0].split(" ", 1)
        assert first == "However" and rest[0].islower(), text
        assert rest[0].upper() + rest[1:] in banks.ENGLISH.sentences, text
        assert paragraphs[-1].splitlines()[-2].startswith("<<"), text
    # Without it, the title is the first line, as a reader expects.
    plain = build_reference(["detectable_format:title"], [{}])
    assert plain.startswith("<<") and plain.splitlines()[0].endswith(">>")


def test_a_reference_in_another_language_keeps_its_title_and_placeholders_in_it() -> None:
    """A French reference takes the French bank's title and bare numbered placeholders,
    not an English title or the English "Fill in [detail 1]" sentence; an English one
    says what to fill in."""
    ids = [
        "language:response_language",
        "detectable_format:title",
        "detectable_content:number_placeholders",
        "detectable_format:number_highlighted_sections",
    ]
    kwargs = [{"language": "fr"}, {}, {"num_placeholders": 2}, {"num_highlights": 2}]
    text = build_reference(ids, kwargs)
    assert all(check_instruction(i, kw, text) for i, kw in zip(ids, kwargs, strict=True))
    assert text.startswith(f"<<{banks.BANKS['fr'].title}>>\n")
    # Numbered from 1, one space apart, and never inside a highlight.
    assert " [1] [2] " in text and "detail" not in text and "Fill in" not in text
    english = build_reference([ids[2]], [{"num_placeholders": 2}])
    assert english.endswith(" Fill in [detail 1] and [detail 2] before sending.")


def test_two_responses_share_no_sentence() -> None:
    """The second response starts half-way through the sentence bank, so the two answers
    are different texts, not the same sentences shifted by one."""
    ids = ["combination:two_responses", "length_constraints:number_sentences"]
    text = build_reference(ids, [{}, {"num_sentences": 12, "relation": "at least"}])
    first, second = (set(part.split(". ")) for part in text.split("\n******\n"))
    assert len(first) >= 5 and len(second) >= 5
    assert not first & second, text


def test_keyword_answer_and_capital_sentences_are_never_highlighted() -> None:
    """Highlights wrap plain filler only, so *...* never touches the sentence that carries
    the keywords, the repeated word or the capital words, and the capital words are
    different ones."""
    ids = [
        "keywords:existence",
        "keywords:frequency",
        "change_case:capital_word_frequency",
        "detectable_content:number_placeholders",
        "detectable_format:number_highlighted_sections",
    ]
    kwargs = [
        {"keywords": ["garden", "balance"]},
        {"keyword": "courage", "frequency": 2, "relation": "at least"},
        {"capital_frequency": 3, "capital_relation": "at least"},
        {"num_placeholders": 2},
        {"num_highlights": 3},
    ]
    text = build_reference(ids, kwargs)
    assert all(check_instruction(i, kw, text) for i, kw in zip(ids, kwargs, strict=True))
    assert " Think of garden and balance for a moment. " in text
    assert " We keep coming back to courage and courage. " in text
    assert f" {' '.join(banks.CAPS[:3])}. " in text
    assert " Fill in [detail 1] and [detail 2] before sending." in text
    assert text.count("*") == 6
    # Only as many sentences are highlighted as asked for, however many there are.
    ids = ["detectable_format:number_highlighted_sections", "length_constraints:number_sentences"]
    text = build_reference(
        ids, [{"num_highlights": 1}, {"num_sentences": 6, "relation": "at least"}]
    )
    assert text.count("*") == 2 and text.startswith("*")


def test_end_phrase_postscript_and_json_are_attached_cleanly() -> None:
    """The end phrase follows the last sentence after a space, the postscript stands after
    a blank line, and a JSON reference is the object {"response": text}; glued words
    ("moment.Is") or an unnamed key would make a poor demonstration."""
    phrase = "Is there anything else I can help with?"
    ended = build_reference(["startend:end_checker"], [{"end_phrase": phrase}])
    assert ended.endswith(f". {phrase}") and ended.count(phrase) == 1
    signed = build_reference(["detectable_content:postscript"], [{"postscript_marker": "P.S."}])
    assert signed.endswith(".\n\nP.S. Thanks for reading.")
    wrapped = build_reference(["detectable_format:json_format"], [{}])
    assert list(json.loads(wrapped)) == ["response"]
    assert json.loads(wrapped)["response"] == build_reference([], [])


def test_sections_are_numbered_from_1_and_separated_by_blank_lines() -> None:
    """Each section opens with "<spliter> <n>" on its own line, numbered 1, 2, 3, with a
    blank line before the next one, as the prompt's example shows."""
    kw = {"section_spliter": "Section", "num_sections": 3}
    text = build_reference(["detectable_format:multiple_sections"], [kw])
    parts = text.split("\n\n")
    assert [part.splitlines()[0] for part in parts] == ["Section 1", "Section 2", "Section 3"]
    assert all(part.splitlines()[1] in banks.ENGLISH.sentences for part in parts)


# ------------------------------------------------ generated prompts (mutation tests)


def _telltale(iid: str, kw: dict[str, Any]) -> str:
    """Text every wording of an instruction contains, with its arguments. Keyword lists
    are checked by test_generated_prompts_list_every_required_and_forbidden_word."""
    if iid in ("keywords:existence", "keywords:forbidden_words"):
        return ""
    # Instructions that end in a multi-line example start on a line of their own.
    bullets = f"\nYour answer must contain exactly {kw.get('num_bullets')} bullet points"
    sections = f"\nYour response must have {kw.get('num_sections')} sections"
    return {
        "keywords:frequency": f'"{kw.get("keyword")}"',
        "keywords:letter_frequency": f'the letter "{kw.get("letter")}" should appear',
        "language:response_language": f"in {LANGUAGE_NAMES.get(kw.get('language', ''))}",
        "length_constraints:number_sentences": f"{kw.get('num_sentences')} sentences",
        "length_constraints:number_paragraphs": "separated with the markdown divider: ***",
        "length_constraints:number_words": f"{kw.get('num_words')} words",
        "length_constraints:nth_paragraph_first_word": f"with the word {kw.get('first_word')}.",
        "detectable_content:number_placeholders": "placeholders represented by square brackets",
        "detectable_content:postscript": f"postscript starting with {kw.get('postscript_marker')}",
        "detectable_format:number_bullet_lists": bullets,
        "detectable_format:constrained_response": '"My answer is yes.", "My answer is no."',
        "detectable_format:number_highlighted_sections": "sections in your answer with markdown",
        "detectable_format:multiple_sections": sections,
        "detectable_format:json_format": "wrapped in JSON format",
        "detectable_format:title": "wrapped in double angular brackets",
        "combination:two_responses": "separated by 6 asterisk symbols: ******",
        "combination:repeat_prompt": f'First repeat the request "{kw.get("prompt_to_repeat")}"',
        "startend:end_checker": f'exact phrase "{kw.get("end_phrase")}"',
        "startend:quotation": "with double quotation marks",
        "change_case:capital_word_frequency": "words with all capital letters should appear",
        "change_case:english_capital": "in all capital letters",
        "change_case:english_lowercase": "in all lowercase letters",
        "punctuation:no_comma": " commas",
    }[iid]


@cache
def _generated() -> tuple[Item, ...]:
    """300 generated training items, built once for the tests below."""
    return tuple(generate_items(300, seed=4))


def test_every_generated_prompt_states_each_of_its_instructions() -> None:
    """Each instruction of a generated item is written into its prompt once, with its
    arguments; a wording lost or emptied would leave a check the prompt never asked for.
    Items are keyed "<split>-<seed>-<index>"."""
    items = _generated()
    assert {i for item in items for i in item.meta["instruction_id_list"]} == set(INSTRUCTION_IDS)
    multi_line = {"detectable_format:number_bullet_lists", "detectable_format:multiple_sections"}
    for index, item in enumerate(items):
        assert item.meta["key"] == f"train-4-{index}"
        # Only an instruction with a multi-line example adds lines, each instruction once.
        ids = set(item.meta["instruction_id_list"])
        assert ("\n" in item.prompt_text) == bool(ids & multi_line), item.prompt_text
        first_line = item.prompt_text.splitlines()[0]
        for iid, kw in zip(item.meta["instruction_id_list"], item.meta["kwargs"], strict=True):
            assert _telltale(iid, kw) in item.prompt_text, (iid, kw, item.prompt_text)
            # One-line instructions follow the task on its line; examples come after.
            if iid not in multi_line:
                assert _telltale(iid, kw) in first_line, (iid, item.prompt_text)
            # A count of 0 would make the instruction trivial ("at least 0") or impossible.
            assert all(v >= 1 for v in kw.values() if isinstance(v, int)), (iid, kw)
        # Whole words and sentences: no gap left by an empty word, no doubled stop.
        assert "  " not in item.prompt_text and ".." not in item.prompt_text, item.prompt_text


def test_generated_items_are_distinct_solvable_and_varied() -> None:
    """No prompt is generated twice, every kept item's reference meets all its checks,
    each item says it was generated, and the references do not all open alike (each gets
    its own seed)."""
    items = _generated()
    assert len({item.prompt_text for item in items}) == len(items)
    for item in items:
        ids, kwargs = item.meta["instruction_id_list"], item.meta["kwargs"]
        assert all(
            check_instruction(i, kw, item.reference) for i, kw in zip(ids, kwargs, strict=True)
        )
        assert item.meta["source"] == "generated"
    openings = {_first_filler(item.reference) for item in items}
    assert len(openings) > 10, openings


def _first_filler(reference: str) -> str | None:
    """The English bank sentence a reference uses first (its seeded starting point)."""
    low = reference.lower()
    found = [(low.find(s.lower()), s) for s in banks.ENGLISH.sentences if s.lower() in low]
    return min(found)[1] if found else None


def _stem(item: Item) -> str:
    """The task sentence a generated prompt starts with (a stem filled with its topic)."""
    stems = [*banks.STEMS, *banks.QUESTION_STEMS]
    filled = [s.format(topic=item.meta["topic"]) for s in stems]
    (stem,) = [f for f in filled if item.prompt_text.startswith(f)]
    return stem


def test_yes_no_prompts_ask_a_question_and_no_other_prompt_does() -> None:
    """A constrained (yes/no/maybe) answer is asked of a yes/no question, and every other
    prompt is a writing task; "Write a poem ... Answer with My answer is yes" is nonsense.
    The words a prompt requires or forbids are all different and never occur in that stem,
    so repeating the request cannot break them."""
    questions = {s.format(topic=t) for s in banks.QUESTION_STEMS for t in banks.TOPICS}
    asked = 0
    for item in _generated():
        ids, kwargs = item.meta["instruction_id_list"], item.meta["kwargs"]
        stem = _stem(item)
        yes_no = "detectable_format:constrained_response" in ids
        asked += yes_no
        assert (stem in questions) == yes_no, item.prompt_text
        assert item.prompt_text[len(stem) : len(stem) + 1] in ("", " ", "\n"), item.prompt_text
        words = []
        for kw in kwargs:
            words += [*kw.get("keywords", []), *kw.get("forbidden_words", [])]
            words += [kw["keyword"]] if "keyword" in kw else []
        assert not [w for w in words if w in stem.lower()], item.prompt_text
        # Each word serves one instruction ("include X" never meets "X at most once").
        assert len(set(words)) == len(words), item.prompt_text
    assert asked > 5


def test_letter_counts_ask_at_least_of_common_letters_and_less_than_of_rare_ones() -> None:
    """Letter counts of "at least N" name a common letter and "less than N" a rare one,
    as the banks are built for; the other way round asks for 30 q's or under 5 e's."""
    seen = set()
    for item in _generated():
        for iid, kw in zip(item.meta["instruction_id_list"], item.meta["kwargs"], strict=True):
            if iid == "keywords:letter_frequency":
                pool = (
                    banks.COMMON_LETTERS if kw["let_relation"] == "at least" else banks.RARE_LETTERS
                )
                assert kw["letter"] in pool, kw
                seen.add(kw["let_relation"])
    assert seen == {"at least", "less than"}


def test_generate_items_checks_its_split_and_constraint_count() -> None:
    """Only "train" and "test" splits exist and 1-3 constraints per prompt; anything else
    is refused rather than quietly generating. The seed defaults to 0."""
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        generate_items(1, split="validation")
    for bad in (0, 4):
        with pytest.raises(ValueError, match="max_constraints must be 1, 2 or 3"):
            generate_items(1, max_constraints=bad)
    assert [i.prompt_text for i in generate_items(3)] == [
        i.prompt_text for i in generate_items(3, seed=0)
    ]


def test_a_yes_no_answer_conflicts_with_everything_but_its_partners() -> None:
    """The constrained response ("My answer is yes.") combines only with instructions
    that leave that sentence intact; every other instruction is in its conflict set, and
    the relation is symmetric. A postscript and an end phrase conflict too."""
    constrained = "detectable_format:constrained_response"
    partners = {
        "punctuation:no_comma",
        "startend:quotation",
        "detectable_format:title",
        "detectable_content:postscript",
        "keywords:forbidden_words",
        "keywords:existence",
    }
    assert CONFLICTS[constrained] == set(INSTRUCTION_IDS) - partners - {constrained}
    assert all(constrained in CONFLICTS[other] for other in CONFLICTS[constrained])
    # Both of these claim the very end of the response, so they cannot be asked together.
    assert "detectable_content:postscript" in CONFLICTS["startend:end_checker"]


# One pair per rule of the conflict table, with why the two cannot be asked together.
_CONTRADICTIONS = [
    ("change_case:english_lowercase", "change_case:english_capital"),  # opposite cases
    ("change_case:english_capital", "change_case:capital_word_frequency"),  # every word counts
    ("change_case:capital_word_frequency", "language:response_language"),  # English capitals
    ("language:response_language", "keywords:existence"),  # English keywords
    ("detectable_format:json_format", "detectable_format:title"),  # text outside the JSON
    ("combination:two_responses", "length_constraints:number_paragraphs"),  # *** in ******
    ("combination:repeat_prompt", "startend:quotation"),  # both claim the first character
    ("length_constraints:number_paragraphs", "detectable_format:multiple_sections"),  # splits
    ("length_constraints:nth_paragraph_first_word", "detectable_format:number_bullet_lists"),
    ("length_constraints:number_sentences", "length_constraints:number_words"),  # 2 lengths
    ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"),
    ("startend:end_checker", "detectable_content:postscript"),  # both claim the end
]


@pytest.mark.parametrize("a, b", _CONTRADICTIONS)
def test_contradictory_or_indistinguishable_instructions_are_never_combined(a: str, b: str) -> None:
    """Each rule of the conflict table holds both ways: a generated prompt never asks for
    two instructions that contradict each other or that the checks cannot tell apart (a
    bullet "* item" reads as a highlight; a blank line in a bullet list opens a paragraph)."""
    assert b in CONFLICTS[a] and a in CONFLICTS[b]
