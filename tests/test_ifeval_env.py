"""The IFEval environment module itself (resd.envs.ifeval): the record loader's layouts,
the environment's arguments and scoring, and reasoning stripping. Each test names the
wrong behaviour it catches; the verifiers have their own tests in test_ifeval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resd.envs import ifeval_banks as banks
from resd.envs.base import Item
from resd.envs.ifeval import IFEvalEnv, generate_items, load_ifeval_records, strip_think


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
