"""The lesson pipeline one phase at a time: reflect, tag, curate, remember, teacher prompts.

A scripted sampler stands in for the policy, so each test says exactly which reply each
lesson call gets and checks what `Lessons` does with it: the counts in the step's
metrics, the tags and operations applied to the playbook, the teacher's prompts. No model
is run; the tiny tokenizer of `conftest.py` counts tokens and renders chat prompts.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from resd.envs.base import Item, Score
from resd.generation.base import Generation
from resd.generation.schemas import reflection_schema
from resd.parallel.base import Parallel
from resd.training.algorithms import ALGORITHMS
from resd.training.lessons import Lessons, PlaybookChanges, PlaybookView
from resd.training.playbook import Playbook
from resd.training.reflector import LocalReflector, RemoteReflector, check_reflector
from resd.training.rollout import Rollout, row_seed
from test_trainer import config

HELPFUL_TAG = '{"bullet_tags": [{"id": "strat-00001", "tag": "helpful"}]}'
HARMFUL_TAG = '{"bullet_tags": [{"id": "strat-00001", "tag": "harmful"}]}'
LESSON = "Count the characters of a reply before sending it."


def reflection(insight: str = "count the characters", tags: str = "helpful") -> str:
    return json.dumps({"error_identification": "odd length", "key_insight": insight,
                       "bullet_tags": [{"id": "strat-00001", "tag": tags}]})  # fmt: skip


def add(content: str = LESSON, section: str = "Common Mistakes to Avoid") -> str:
    return json.dumps({"operations": [{"type": "ADD", "section": section, "content": content}]})


class ScriptedSampler:
    """The policy's lesson calls, answered from a script: per kind, one reply per row (a
    text or a `Generation`), in the order the rows are asked for."""

    structured = False

    def __init__(self, script: dict[str, list[str | Generation]]) -> None:
        self.script = {kind: list(replies) for kind, replies in script.items()}
        self.calls: list[dict[str, Any]] = []
        self.forgotten = 0

    def replies(self, prompts, kind, max_new_tokens, seeds, schema=None) -> list[Generation]:
        self.calls.append({"kind": kind, "prompts": prompts, "seeds": seeds,
                           "max_new_tokens": max_new_tokens, "schema": schema})  # fmt: skip
        out = []
        for _ in prompts:
            reply = self.script[kind].pop(0)
            out.append(Generation([7] * 3, reply, True) if isinstance(reply, str) else reply)
        return out

    def forget_prefixes(self) -> None:
        self.forgotten += 1

    def asked(self, kind: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["kind"] == kind]


def make_lessons(
    tiny_model_dir: Path, tmp_path: Path, *extra: str, script=None, algorithm: str = "resd"
) -> tuple[Lessons, ScriptedSampler]:
    from transformers import AutoTokenizer

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = config(tiny_model_dir, tmp_path / "run", f"algorithm={algorithm}", *extra)
    sampler = ScriptedSampler(script or {})
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return Lessons(cfg, ALGORITHMS[algorithm], tokenizer, sampler, Parallel()), sampler


def rollout(index: int, *, reward: float = 0.0, score: float | None = None, feedback: str = "",
            item: str | None = None, text: str = "abc", answer: str | None = None,
            system: str | None = None) -> Rollout:  # fmt: skip
    item_id = item or f"task/{index}"
    messages = [{"role": "user", "content": f"Task {item_id}: reply with an even length."}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    score = reward if score is None else score
    return Rollout(Item(item_id, messages, answer=answer), [5, 6], Generation([8, 9], text, True),
                   Score(reward, score, feedback), index=index)  # fmt: skip


def reflect(lessons: Lessons, rollouts: list[Rollout], step: int = 1):
    counts, changes = Counter(), PlaybookChanges()
    outcomes = [r.outcome() for r in sorted(rollouts, key=lambda r: r.index)]
    lessons.reflect(rollouts, outcomes, step, counts, changes)
    return counts, changes


# ---- reflect and tag --------------------------------------------------------------------------
def test_each_reflection_reply_is_counted_parsed_and_its_tags_applied(tiny_model_dir, tmp_path):
    """Every counter of a reflection reply, and each tag it carries, lands once: a reply
    that does not parse is counted and dropped, its regex-read tags still count."""
    replies = [
        Generation([1, 2, 3], reflection(), True, cached_tokens=1, fields_cut=1),
        Generation([1] * 4, "no JSON here, but [strat-00001] harmful", False),
        Generation([1] * 2, '"key_insight": "count first",\n"bullet_tags": [', True),
    ]
    tag = Generation([1] * 6, HELPFUL_TAG, True, cached_tokens=2, fields_cut=1)
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path,
                                    script={"reflection": replies, "tag": [tag]})  # fmt: skip
    rollouts = [
        rollout(0, feedback="odd"),
        rollout(1, reward=1.0),
        rollout(2),
        rollout(3, score=0.5),
    ]
    counts, changes = reflect(lessons, rollouts, step=3)
    assert counts == Counter({
        "reflections": 3, "reflection_tokens": 9, "reflection_cached_tokens": 1,
        "reflection_cache_hits": 1, "reflection_truncated": 1, "reflection_fields_cut": 1,
        "reflection_parse_failures": 1, "reflections_parsed": 1, "reflection_loose_parses": 1,
        "tag_replies": 1, "tag_tokens": 6, "tag_cached_tokens": 2, "tag_fields_cut": 1,
    })  # fmt: skip
    r0, r1, r2, r3 = rollouts
    assert r0.reflection.as_text() == "Error: odd length\nKey insight: count the characters"
    assert r2.reflection is None and r2.reflection_reply.startswith("no JSON here")
    assert r3.reflection.loose and r3.reflection.as_text() == "Key insight: count first"
    assert r1.reflection is None and r1.reflection_reply == ""  # successes are only tagged
    # r0 helpful, r2 harmful (read from the raw reply), r1's tag helpful: three tags
    assert changes.applied["tags_applied"] == 3
    entry = lessons.playbook.entries["strat-00001"]
    assert (entry.helpful, entry.harmful, entry.last_used_step) == (2 + 2, 1, 3)
    # each row asks with its own seed, under the kind that picks its prefill
    assert [c["kind"] for c in sampler.calls] == ["reflection", "tag"]
    assert sampler.asked("reflection")[0]["seeds"] == [
        row_seed(lessons.cfg.seed, 3, "reflect", i) for i in (0, 2, 3)
    ]
    assert sampler.asked("tag")[0]["seeds"] == [row_seed(lessons.cfg.seed, 3, "tag", 1)]
    assert sampler.forgotten == 1
    # the reflector is shown the playbook, and (two calls) is not asked for operations
    shown = lessons.tokenizer.decode(sampler.asked("reflection")[0]["prompts"][0])
    assert "[strat-00001] helpful=2 harmful=0 :: Keep replies short." in shown
    assert "## The attempt\nabc" in shown and "## What the checker reported\nodd" in shown
    assert '"operations"' not in shown


def test_reflection_is_capped_to_the_first_failures_in_global_order(tiny_model_dir, tmp_path):
    """`max_reflections_per_step` keeps the failures of lowest global index, wherever
    they sit in this process's list; partial credit is a failure."""
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "max_reflections_per_step=2",
                              script={"reflection": [reflection()] * 2, "tag": [HELPFUL_TAG]})  # fmt: skip
    rollouts = [rollout(4), rollout(1, reward=1.0), rollout(3, score=0.5), rollout(0), rollout(2)]
    counts, _ = reflect(lessons, rollouts)
    assert counts["reflections"] == 2
    assert sorted(r.index for r in rollouts if r.reflection is not None) == [0, 2]


def test_a_capped_reflection_takes_each_tasks_first_failure_before_any_second(
    tiny_model_dir, tmp_path
):
    """With several rollouts per prompt, the cap goes round the tasks: each task's first
    failure (in global order) before any task's second. Catches the cap that took the
    lowest indices, so with 4 rollouts per prompt a step's reflections (and lessons) all
    came from its first task."""
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "max_reflections_per_step=3",
                              script={"reflection": [reflection()] * 3, "tag": [HELPFUL_TAG] * 4})  # fmt: skip
    tasks = ["a", "a", "a", "a", "b", "b", "b", "b", "c", "c"]
    rewards = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    rollouts = [
        rollout(g, item=t, reward=w) for g, (t, w) in enumerate(zip(tasks, rewards, strict=True))
    ]
    counts, _ = reflect(lessons, rollouts)
    assert counts["reflections"] == 3
    assert sorted(r.index for r in rollouts if r.reflection is not None) == [0, 1, 6]


def test_nothing_is_asked_when_nothing_failed_or_nothing_is_in_the_playbook(
    tiny_model_dir, tmp_path
):
    """No reflection call without a failure, no tagging call without a success or an
    empty playbook: the reflector is asked only for rows that have something to say."""
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path, "curation_playbook_tokens=1",
                                    script={"tag": [HELPFUL_TAG], "reflection": [reflection()]})  # fmt: skip
    counts, changes = reflect(lessons, [rollout(0, reward=1.0)])
    lessons.curate([rollout(0, reward=1.0)], 1, counts, changes)
    assert [c["kind"] for c in sampler.calls] == ["tag"] and counts["reflections"] == 0
    # no curator was shown the playbook, so none was shown it cut (playbook_omitted_curation)
    assert lessons.omitted.get("curation", 0) == 0
    reflect(lessons, [rollout(0)])  # a failure and no success: nothing to tag
    assert [c["kind"] for c in sampler.calls] == ["tag", "reflection"]
    sampler.calls.clear()
    lessons.playbook = Playbook()
    sampler.script["reflection"] = [reflection()]
    counts, changes = reflect(lessons, [rollout(0, reward=1.0), rollout(1)])
    assert [c["kind"] for c in sampler.calls] == ["reflection"]
    assert counts["tag_replies"] == 0 and changes.applied["tags_applied"] == 0


def test_a_tagging_reply_that_does_not_parse_is_counted_and_changes_nothing(
    tiny_model_dir, tmp_path
):
    lessons, _ = make_lessons(tiny_model_dir, tmp_path,
                              script={"tag": ["I agree with everything.", HARMFUL_TAG]})  # fmt: skip
    counts, changes = reflect(lessons, [rollout(0, reward=1.0), rollout(1, reward=1.0)])
    assert counts["tag_parse_failures"] == 1 and counts["tag_replies"] == 2
    assert changes.applied["tags_applied"] == 1
    assert lessons.playbook.entries["strat-00001"].harmful == 1


def test_unparsed_reflection_raw_hands_the_reply_on_without_its_thinking(tiny_model_dir, tmp_path):
    """`unparsed_reflection: raw` passes an unparsable reply on as the reflection (less
    its thinking); one that is only thinking is still dropped. `drop` drops both."""
    replies = ["<think>hmm</think>Count   the letters\nfirst.", "<think>only this</think>"]
    for mode, expected in (("raw", "Count the letters first."), ("drop", None)):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / mode, f"unparsed_reflection={mode}",
                                  script={"reflection": list(replies)})  # fmt: skip
        rollouts = [rollout(0), rollout(1)]
        counts, _ = reflect(lessons, rollouts)
        got = rollouts[0].reflection.as_text() if rollouts[0].reflection else None
        assert got == expected and rollouts[1].reflection is None
        assert (
            counts["reflections_raw"] == (mode == "raw")
            and counts["reflection_parse_failures"] == 2
        )


def test_without_reflection_or_playbook_the_phases_stay_silent(tiny_model_dir, tmp_path):
    """SDPO neither reflects nor tags nor curates; RESD without a playbook reflects but
    neither tags nor curates, and its reflector is shown no playbook."""
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path / "sdpo", algorithm="sdpo")
    rollouts = [rollout(0, feedback="odd"), rollout(1, reward=1.0)]
    counts, changes = reflect(lessons, rollouts)
    lessons.curate(rollouts, 1, counts, changes)
    assert sampler.calls == [] and counts == Counter() and changes == PlaybookChanges()
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path / "nopb", algorithm="resd_no_playbook",
                                    script={"reflection": [reflection()]})  # fmt: skip
    counts, changes = reflect(lessons, rollouts)
    lessons.curate(rollouts, 1, counts, changes)
    assert [c["kind"] for c in sampler.calls] == ["reflection"]
    shown = lessons.tokenizer.decode(sampler.calls[0]["prompts"][0])
    assert "Keep replies short." not in shown  # no playbook: the reflector is not shown it
    assert (
        changes.applied["tags_applied"] == 0
        and lessons.playbook.entries["strat-00001"].helpful == 2
    )


# ---- what each reader is shown -----------------------------------------------------------------
def test_a_reader_over_its_budget_is_shown_the_best_entries_and_the_rest_counted(
    tiny_model_dir, tmp_path
):
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "teacher_playbook_tokens=70")
    weak = lessons.playbook.add("Others", "A second, untested lesson about replies.")
    full = lessons.view("reflection")  # 2048 tokens: everything
    assert full.ids == ["strat-00001", weak] and full.omitted == 0 and weak in full.text
    cut = lessons.view("teacher")
    assert cut.ids == ["strat-00001"] and cut.omitted == 1 and weak not in cut.text
    assert lessons.omitted == {"reflection": 0, "teacher": 1}
    lessons.playbook.entries[weak].helpful = 9  # now the better one: a new view, not the cached one
    assert lessons.view("teacher").ids == [weak]
    lessons.playbook = Playbook()
    assert lessons.view("teacher") == PlaybookView("", [], 0)


def test_student_playbook_goes_before_the_last_user_turn_only(tiny_model_dir, tmp_path):
    """`student_playbook`: the lessons open the last user message; the item's own messages
    are left as they were, and an empty playbook, one whose entries all exceed the teacher's
    budget, or an algorithm without one adds nothing."""
    item = Item("chat", [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "second"}])  # fmt: skip
    lessons, _ = make_lessons(tiny_model_dir, tmp_path / "resd", "student_playbook=true")
    shown = lessons.student_messages(item)
    assert [m["content"] for m in shown[:2]] == ["first", "ok"]
    assert shown[2]["content"].startswith("Lessons from earlier tasks:\n## Strategies")
    assert shown[2]["content"].endswith("Keep replies short.\n\nsecond")
    assert item.messages[2]["content"] == "second"
    lessons.cfg.teacher_playbook_tokens = 1  # no entry fits: no empty "Lessons" header either
    assert lessons.student_messages(item) == item.messages
    lessons.cfg.teacher_playbook_tokens = None
    lessons.playbook = Playbook()
    assert lessons.student_messages(item) == item.messages
    sdpo, _ = make_lessons(
        tiny_model_dir, tmp_path / "sdpo", "student_playbook=true", algorithm="sdpo"
    )
    assert sdpo.student_messages(item) == item.messages


def test_structured_replies_are_asked_under_each_calls_schema(tiny_model_dir, tmp_path):
    """With a grammar, reflection, tagging and curation each get their own schema; the
    single-call reflection's holds the operations, with `curation_min_operations`."""
    for calls in ("two", "one"):
        lessons, sampler = make_lessons(tiny_model_dir, tmp_path / calls, f"lesson_calls={calls}",
                                        "curation_min_operations=1", "curation_ops=add", script={
            "reflection": [reflection()], "tag": [HELPFUL_TAG], "curation": [add()]})  # fmt: skip
        sampler.structured = True
        lessons.reflector.structured = True
        curate(lessons, [rollout(0), rollout(1, reward=1.0)])
        kinds = {c["kind"]: c["schema"] for c in sampler.calls}
        assert set(kinds) == (
            {"reflection", "tag", "curation"} if calls == "two" else {"reflection", "tag"}
        )
        assert "operations" not in kinds["tag"]["properties"]
        ops = kinds["curation" if calls == "two" else "reflection"]["properties"]["operations"]
        assert ops["minItems"] == 1 and "DELETE" not in json.dumps(ops)
        assert ("operations" in kinds["reflection"]["properties"]) == (calls == "one")
    lessons, sampler = make_lessons(
        tiny_model_dir, tmp_path / "free", script={"reflection": [reflection()]}
    )
    reflect(lessons, [rollout(0)])  # no grammar: no schema
    assert lessons._schema(reflection_schema, 10, PlaybookView()) is None


def test_the_conversation_layout_begins_each_prompt_with_the_rollouts_own_tokens(
    tiny_model_dir, tmp_path
):
    """`reflection_layout: conversation`: the reflection and tagging prompts begin with the
    rollout's prompt and reply tokens as they were sampled (here "hehe" as four letters,
    which re-tokenizes as two tokens), so the sampler's prefix cache matches them. The
    prompt layout quotes the task and the attempt in a fresh prompt instead.
    Catches: heads not passed (the reply re-tokenized: the cache misses), the layout ignored,
    the task left out of the quoted prompt."""
    from resd.generation.hf import chat_prompt_ids

    for layout in ("conversation", "prompt"):
        lessons, sampler = make_lessons(tiny_model_dir, tmp_path / layout,
                                        f"reflection_layout={layout}",
                                        script={"reflection": [reflection()], "tag": [HELPFUL_TAG]})  # fmt: skip
        tokenizer = lessons.tokenizer
        rollouts = [rollout(0, feedback="odd"), rollout(1, reward=1.0)]
        for r in rollouts:
            r.prompt_ids = chat_prompt_ids(tokenizer, r.item.messages)
            r.gen = Generation([*tokenizer.convert_tokens_to_ids(list("hehe")), 3], "hehe", True)
        assert tokenizer("hehe", add_special_tokens=False)["input_ids"] != r.gen.content_ids
        counts, _ = reflect(lessons, rollouts)
        assert counts["reflections"] == 1 and counts["tag_replies"] == 1
        for kind, r in (("reflection", rollouts[0]), ("tag", rollouts[1])):
            (prompt,) = sampler.asked(kind)[0]["prompts"]
            head = [*r.prompt_ids, *r.gen.content_ids]
            text = tokenizer.decode(prompt)
            assert (prompt[: len(head)] == head) == (layout == "conversation"), kind
            assert f"Task {r.item.id}: reply with an even length." in text and "hehe" in text
            assert text.count("Task task/") == 1  # the task is shown once, either way


# ---- curate -----------------------------------------------------------------------------------
def curate(lessons: Lessons, rollouts: list[Rollout], step: int = 1):
    counts, changes = reflect(lessons, rollouts, step)
    lessons.curate(rollouts, step, counts, changes)
    return counts, changes


def test_curation_counts_each_reply_and_applies_its_operations(tiny_model_dir, tmp_path):
    """One curator call per reflection; the replies' operations go in, each skip is
    counted by its reason, and a reply that applied something counts as effective."""
    curations = [
        Generation([1] * 5, add(), True, fields_cut=2),
        Generation([1] * 3, "nothing to add", False),
        Generation([1] * 4, add("short"), True),
    ]
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path, script={
        "reflection": [reflection()] * 3, "curation": curations})  # fmt: skip
    rollouts = [rollout(0, feedback="odd"), rollout(1), rollout(2)]
    counts, changes = curate(lessons, rollouts, step=2)
    assert {k: v for k, v in counts.items() if "curation" in k} == {
        "curations": 3, "curations_parsed": 2, "curation_parse_failures": 1,
        "curation_tokens": 12, "curation_truncated": 1, "curation_fields_cut": 2,
    }  # fmt: skip
    assert changes.applied["ops_applied"] == 1 and changes.applied["curations_effective"] == 1
    assert changes.applied["ops_skipped"] == 1 and changes.applied["ops_skipped_too_short"] == 1
    assert (
        changes.added == ["err-00002"] and lessons.playbook.entries["err-00002"].content == LESSON
    )
    assert [r.curation_reply for r in rollouts] == [c.text for c in curations]
    (call,) = sampler.asked("curation")
    assert call["seeds"] == [row_seed(lessons.cfg.seed, 2, "curate", i) for i in range(3)]
    assert call["max_new_tokens"] == lessons.cfg.curation_max_new_tokens


def test_curator_is_shown_the_reflection_the_task_and_the_playbook(tiny_model_dir, tmp_path):
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path, "curation_ops=add", script={
        "reflection": [reflection("look at the length")], "curation": [add()]})  # fmt: skip
    curate(lessons, [rollout(0, feedback="odd")])
    (prompt,) = sampler.asked("curation")[0]["prompts"]
    text = lessons.tokenizer.decode(prompt)
    assert "Key insight: look at the length" in text and "Task task/0: reply" in text
    assert "Keep replies short." in text and "total entries: 1" in text
    assert '"type": "ADD"' in text and '"type": "DELETE"' not in text  # curation_ops: add


def test_curation_ops_add_skips_the_other_operations(tiny_model_dir, tmp_path):
    delete = json.dumps({"operations": [{"type": "DELETE", "id": "strat-00001"}]})
    for ops, kept in (("add", True), ("all", False)):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / ops, f"curation_ops={ops}",
                                  script={"reflection": [reflection()], "curation": [delete]})  # fmt: skip
        _, changes = curate(lessons, [rollout(0)])
        assert ("strat-00001" in lessons.playbook) == kept
        assert changes.applied["ops_skipped_not_allowed"] == kept


def test_a_later_reply_sees_what_an_earlier_one_retired(tiny_model_dir, tmp_path):
    """All curators of a step read one snapshot; their operations apply in global order, so
    an UPDATE of an entry an earlier reply deleted is skipped as `retired`."""
    delete = json.dumps({"operations": [{"type": "DELETE", "id": "strat-00001"}]})
    update = json.dumps(
        {"operations": [{"type": "UPDATE", "id": "strat-00001", "content": LESSON}]}
    )
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, script={
        "reflection": [reflection()] * 2, "curation": [delete, update]})  # fmt: skip
    _, changes = curate(lessons, [rollout(0), rollout(1)])
    assert "strat-00001" not in lessons.playbook and len(lessons.playbook) == 0
    assert changes.applied["ops_skipped_retired"] == 1 and changes.applied["ops_applied"] == 1


def test_a_lesson_that_gives_away_the_answer_is_skipped(tiny_model_dir, tmp_path):
    """The curator's lessons are checked against the rollout they came from: its task's
    answer, its feedback."""
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, script={
        "reflection": [reflection()] * 2,
        "curation": [add("The final answer to this kind of task is 7349."),
                     add("The reply has 3 characters, an odd number; it needs an even number.")],
    })  # fmt: skip
    rollouts = [rollout(0, answer="7349"),
                rollout(1, feedback="The reply has 3 characters, an odd number; it needs an even number.")]  # fmt: skip
    _, changes = curate(lessons, rollouts)
    assert changes.applied["ops_skipped_leaks_answer"] == 1
    assert changes.applied["ops_skipped_copies_feedback"] == 1
    assert len(lessons.playbook) == 1


def test_the_playbook_is_pruned_only_when_over_its_budget(tiny_model_dir, tmp_path):
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "playbook_max_entries=2", script={
        "reflection": [reflection()] * 2,
        "curation": [add(), add("Write an even number of letters by adding a final period.")],
    })  # fmt: skip
    _, changes = curate(lessons, [rollout(0)], step=1)
    assert len(lessons.playbook) == 2 and changes.removed == []  # at the budget: kept
    _, changes = curate(lessons, [rollout(0)], step=2)
    assert len(lessons.playbook) == 2 and len(changes.removed) == 1


def test_a_playbook_at_its_budget_keeps_even_a_harmful_entry(tiny_model_dir, tmp_path):
    """The over-budget prune runs only over the budget: at exactly `playbook_max_entries` a
    harmful entry waits for the every-F prune. Catches `>` read as `>=` (a full playbook
    pruned on every step)."""
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "playbook_max_entries=2",
                              script={"reflection": [reflection()], "curation": [add()]})  # fmt: skip
    lessons.playbook.entries["strat-00001"].harmful = 5
    _, changes = curate(lessons, [rollout(0)], step=3)
    assert len(lessons.playbook) == 2 and changes.removed == []
    assert lessons.playbook.entries["strat-00001"].category == "harmful"


def test_pruning_follows_the_playbook_policy_and_draws_from_the_runs_seed(tiny_model_dir, tmp_path):
    """`playbook_policy` reaches both prunes: every F updates, `random` drops even a fresh
    unused entry that `staleness` keeps one more step; over the budget, `random` picks the
    helpful entries to drop from the run's seed, so two seeds drop different ones and one
    seed drops the same. Catches the policy or the seed not passed to `Playbook.prune`."""
    for policy in ("staleness", "random"):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / policy, "playbook_prune_every=1",
                                  f"playbook_policy={policy}")  # fmt: skip
        fresh = lessons.playbook.add("Others", "A fresh lesson about the length of replies.", 2)
        changes = PlaybookChanges()
        lessons.prune(2, changes)
        assert changes.removed == ([fresh] if policy == "random" else [])
    dropped = {}
    for run, seed in (("a", 1), ("b", 2), ("c", 1)):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / run, "playbook_policy=random",
                                  "playbook_max_entries=4", f"seed={seed}")  # fmt: skip
        for n in range(8):
            lessons.playbook.add("Others", f"Lesson number {n}: check the length of replies.")
        for entry in lessons.playbook.entries.values():
            entry.helpful = 1
        changes = PlaybookChanges()
        lessons.curate([], 3, Counter(), changes)
        assert len(lessons.playbook) == 4 and len(changes.removed) == 5
        dropped[run] = changes.removed
    assert dropped["a"] == dropped["c"] and dropped["a"] != dropped["b"]


def test_an_algorithm_without_a_playbook_never_prunes_one(tiny_model_dir, tmp_path):
    """SDPO loads no lessons into any prompt, so the every-F prune leaves `playbook_init`
    alone and reports no removals. Catches the prune's `algo.playbook` check dropped."""
    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "playbook_prune_every=1",
                              "playbook_policy=random", algorithm="sdpo")  # fmt: skip
    lessons.playbook.add("Others", "A fresh lesson about the length of replies.", 2)
    changes = PlaybookChanges()
    lessons.prune(2, changes)
    assert changes.removed == [] and len(lessons.playbook) == 2


def test_a_near_duplicate_lesson_is_skipped_unless_similarity_is_off(tiny_model_dir, tmp_path):
    """`playbook_similarity` (0.6 by default) skips a lesson that rewords one already in
    the playbook; `null` lets it in. Catches the setting not reaching the playbook."""
    reworded = "Count the characters of the reply before you send it."
    for similarity, added in (("0.6", 1), ("null", 2)):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / similarity,
                                  f"playbook_similarity={similarity}", script={
            "reflection": [reflection()] * 2, "curation": [add(), add(reworded)]})  # fmt: skip
        _, changes = curate(lessons, [rollout(0), rollout(1)])
        assert len(changes.added) == added
        assert changes.applied["ops_skipped_near_duplicate"] == 2 - added


def test_without_reflection_the_curator_reads_the_failures_feedback(tiny_model_dir, tmp_path):
    """The no-reflection ablation curates from each failure's feedback; a failure with
    no feedback, and a success, give the curator nothing."""
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path, algorithm="resd_no_reflection",
                                    script={"curation": [add()], "tag": [HELPFUL_TAG]})  # fmt: skip
    rollouts = [rollout(0, feedback="too long by one"), rollout(1),
                rollout(2, reward=1.0, feedback="fine")]  # fmt: skip
    counts, changes = curate(lessons, rollouts)
    (call,) = sampler.asked("curation")
    assert len(call["prompts"]) == 1
    assert "Feedback on a failed attempt: too long by one" in lessons.tokenizer.decode(
        call["prompts"][0]
    )
    assert counts["curations"] == 1 and changes.added == ["err-00002"]


def test_single_call_lessons_skip_the_curator(tiny_model_dir, tmp_path):
    """`lesson_calls: one`: the operations come with the reflection; no curator is asked,
    and a reflection reply without operations is a curation parse failure."""
    one = json.loads(reflection())
    one["operations"] = json.loads(add())["operations"]
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path, "lesson_calls=one",
                                    script={"reflection": [json.dumps(one), reflection()]})  # fmt: skip
    rollouts = [rollout(0), rollout(1)]
    counts, changes = curate(lessons, rollouts)
    assert [c["kind"] for c in sampler.calls] == ["reflection"]
    assert '"operations"' in lessons.tokenizer.decode(sampler.calls[0]["prompts"][0])
    assert changes.added == ["err-00002"] and counts["curations"] == 2
    assert counts["curation_parse_failures"] == 1 and rollouts[0].curation_reply == json.dumps(one)


def test_single_call_needs_both_a_reflection_and_a_playbook(tiny_model_dir, tmp_path):
    """`lesson_calls: one` folds curation into the reflection only where both exist:
    without reflection the curator still writes lessons from the feedback, and without a
    playbook the reflector is not asked for operations that nothing would apply.
    Catches `single_call` dropping either condition."""
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path / "norefl", "lesson_calls=one",
                                    algorithm="resd_no_reflection", script={"curation": [add()]})  # fmt: skip
    _, changes = curate(lessons, [rollout(0, feedback="too long by one")])
    assert [c["kind"] for c in sampler.calls] == ["curation"] and changes.added == ["err-00002"]
    lessons, sampler = make_lessons(tiny_model_dir, tmp_path / "nopb", "lesson_calls=one",
                                    algorithm="resd_no_playbook", script={"reflection": [reflection()]})  # fmt: skip
    counts, _ = curate(lessons, [rollout(0, feedback="odd")])
    assert [c["kind"] for c in sampler.calls] == ["reflection"] and counts["curations"] == 0
    assert '"operations"' not in lessons.tokenizer.decode(sampler.calls[0]["prompts"][0])


# ---- solutions and the teacher ------------------------------------------------------------------
def test_the_first_success_per_item_is_remembered_and_returned(tiny_model_dir, tmp_path):
    """By global order, not this process's list order; only RESD keeps a buffer."""
    rollouts = [rollout(2, reward=1.0, item="a", text="second"), rollout(0, reward=1.0, item="a", text="first"),
                rollout(1, item="b", text="failed"), rollout(3, reward=1.0, item="c", text="c!")]  # fmt: skip
    lessons, _ = make_lessons(tiny_model_dir, tmp_path / "resd")
    assert lessons.remember_solutions(rollouts) == {"a": "first", "c": "c!"}
    assert lessons.buffer.get("a") == "first" and lessons.buffer.get("b") is None
    sdpo, _ = make_lessons(tiny_model_dir, tmp_path / "sdpo", algorithm="sdpo")
    assert sdpo.remember_solutions(rollouts) == {"a": "first", "c": "c!"}
    assert len(sdpo.buffer) == 0


def test_solution_buffer_keep_latest_replaces_an_items_solution_with_its_newest(
    tiny_model_dir, tmp_path
):
    """`solution_buffer_keep: latest` (the release's buffer) holds each item's newest
    success; the default `first` keeps the first for good. Catches the setting not reaching
    the buffer (every run kept the first)."""
    for keep, expected in (("latest", "newer"), ("first", "older")):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / keep, f"solution_buffer_keep={keep}")
        lessons.remember_solutions([rollout(0, reward=1.0, item="a", text="older")])
        assert lessons.remember_solutions([rollout(0, reward=1.0, item="a", text="newer")]) == {
            "a": "newer"
        }
        assert lessons.buffer.get("a") == expected


def test_teacher_prompts_hold_the_playbook_and_keep_the_system_message(tiny_model_dir, tmp_path):
    lessons, _ = make_lessons(tiny_model_dir, tmp_path)
    failed = rollout(0, feedback="odd length", system="You are terse.")
    won = rollout(1, reward=1.0)
    lessons.teacher_prompts([failed, won], {})
    assert failed.distill and won.distill  # RESD distils successes too
    assert "Keep replies short." in failed.teacher_prompt and "odd length" in failed.teacher_prompt
    text = lessons.tokenizer.decode(failed.teacher_ids)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert f"<|im_start|>user\n{failed.teacher_prompt}<|im_end|>" in text
    assert "## Others" not in failed.teacher_prompt  # sections without lessons are left out
    assert "system" not in lessons.tokenizer.decode(won.teacher_ids)
    sdpo, _ = make_lessons(
        tiny_model_dir, tmp_path / "sdpo", "rollouts_per_prompt=2", algorithm="sdpo"
    )
    peer = rollout(2, item="task/0", feedback="odd length")
    sdpo.teacher_prompts([peer], {"task/0": "abcd"})
    assert "Keep replies short." not in peer.teacher_prompt and "abcd" in peer.teacher_prompt


def test_the_teacher_reads_the_conversation_the_student_read(tiny_model_dir, tmp_path):
    """A task that is a longer conversation (a served chat; a tool's call and its result)
    keeps its earlier turns in the teacher's context, with the teacher's prompt in place
    of the last user message only. Catches the teacher shown the last user message alone,
    without the question the conversation began with."""
    lessons, _ = make_lessons(tiny_model_dir, tmp_path)
    failed = rollout(0, feedback="you called it again", system="Tools: get_weather.")
    failed.item.messages[1:] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '<tool_call>{"name": "get_weather"}</tool_call>'},
        {"role": "user", "content": "<tool_response>sunny</tool_response>"},
    ]
    lessons.teacher_prompts([failed], {})
    text = lessons.tokenizer.decode(failed.teacher_ids)
    turns = ["<|im_start|>system\nTools: get_weather.<|im_end|>",
             "<|im_start|>user\nWeather in Paris?<|im_end|>",
             '<|im_start|>assistant\n<tool_call>{"name": "get_weather"}</tool_call><|im_end|>',
             f"<|im_start|>user\n{failed.teacher_prompt}<|im_end|>"]  # fmt: skip
    assert text.startswith("\n".join(turns)), text
    assert "<prompt>\n<tool_response>sunny</tool_response>" in failed.teacher_prompt
    assert "Weather in Paris?" not in failed.teacher_prompt  # a turn of its own, not the task
    assert failed.item.history == failed.item.messages[:3]
    assert (
        rollout(1).item.history == [] and rollout(2, system="s").item.history[0]["content"] == "s"
    )


def test_the_teacher_is_shown_the_task_the_attempt_its_reflection_and_a_solution(
    tiny_model_dir, tmp_path
):
    """RESD's teacher prompt holds every slot of the failed rollout, each in its own block:
    the task, the attempt, the feedback, the reflection and the buffered success; with
    `teacher_feedback_with_solution: false` the feedback gives way to the solution.
    Catches a slot not passed to the template, and the setting not reaching the context."""
    for with_feedback in (True, False):
        lessons, _ = make_lessons(tiny_model_dir, tmp_path / str(with_feedback),
                                  f"teacher_feedback_with_solution={str(with_feedback).lower()}",
                                  script={"reflection": [reflection()], "tag": [HELPFUL_TAG]})  # fmt: skip
        lessons.remember_solutions([rollout(5, reward=1.0, item="task/0", text="abcd")])
        failed = rollout(0, feedback="odd length")
        reflect(lessons, [failed])
        lessons.teacher_prompts([failed], {})
        shown = failed.teacher_prompt
        for slot, text in (("prompt", "Task task/0: reply with an even length."),
                           ("previous_trial", "abc"),
                           ("reflection", "Error: odd length\nKey insight: count the characters"),
                           ("successful_trial", "abcd")):  # fmt: skip
            assert f"<{slot}>\n{text}" in shown, slot
        assert ("<feedback>\nodd length" in shown) == with_feedback


# ---- the reflector settings --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"base_url": "http://h/v1", "model": "m"}, None),
        ({"base_url": "http://h/v1", "model": "m", "max_concurrency": 1}, None),
        (
            dict(
                base_url="https://h/v1",
                model="m",
                timeout=0.5,
                max_concurrency=2.0,
                temperature=0,
                api_key_env="K",
            ),
            None,
        ),
        ({"base_url": "http://h/v1", "model": "m", "url": "x"}, "unknown key 'url'"),
        ({"model": "m"}, "needs base_url"),
        ({"base_url": "http://h/v1", "model": ""}, "needs model"),
        ({}, "needs base_url and model"),
        ({"base_url": "ftp://h", "model": "m"}, "base_url: expected an http(s):// URL"),
        ({"base_url": "http://h/v1", "model": "m", "timeout": 0}, "timeout: expected"),
        ({"base_url": "http://h/v1", "model": "m", "timeout": True}, "timeout: expected"),
        ({"base_url": "http://h/v1", "model": "m", "timeout": "10"}, "timeout: expected"),
        (
            {"base_url": "http://h/v1", "model": "m", "max_concurrency": 0},
            "max_concurrency: expected",
        ),
        (
            {"base_url": "http://h/v1", "model": "m", "max_concurrency": 1.5},
            "max_concurrency: expected",
        ),
        ({"base_url": "http://h/v1", "model": "m", "temperature": -0.1}, "temperature: expected"),
    ],
)
def test_check_reflector_names_what_is_wrong(value: dict, problem: str | None) -> None:
    got = check_reflector(value)
    assert got == problem if problem is None else got.startswith(problem)


@pytest.mark.parametrize("endless", [float("inf"), float("nan")])
@pytest.mark.parametrize("key", ["max_concurrency", "timeout", "temperature"])
def test_an_endless_number_is_refused_by_name_not_a_crash(endless: float, key: str) -> None:
    """`max_concurrency: .inf` (or .nan) in YAML raised OverflowError (ValueError) from
    `int()` while the config was read, a traceback instead of the setting's name; an
    endless timeout or temperature was accepted and sent to the server."""
    got = check_reflector({"base_url": "http://h/v1", "model": "m", key: endless})
    assert got is not None and got.startswith(f"{key}: expected")


class ChatServer:
    """A real OpenAI-compatible chat-completions endpoint on a local port that records the
    JSON body of each request, so the tests read what actually went over the wire."""

    def __init__(self, finish: str = "stop", cached: int | None = 4) -> None:
        self.requests: list[dict[str, Any]] = []
        self.finish, self.cached = finish, cached
        self.barrier: threading.Barrier | None = None
        self.nulls = False  # send null for the reply's text and its cached-token count
        self.in_flight, self.most_in_flight, self.lock = 0, 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_reply(server.answer(body))

            def send_reply(self, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append(body)
            number = len(self.requests)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.barrier is not None:
            self.barrier.wait()  # every row of the batch is in flight at once
        else:
            time.sleep(0.02)  # long enough for a second worker to overlap
        with self.lock:
            self.in_flight -= 1
        reply: dict[str, Any] = {
            "id": f"c{number}", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": self.finish,
                         "message": {"role": "assistant", "content": f"reply {number}"}}],
        }  # fmt: skip
        if self.cached is not None:  # servers without a prefix cache send no details
            reply["usage"] = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                              "prompt_tokens_details": {"cached_tokens": self.cached}}  # fmt: skip
        if self.nulls:
            reply["choices"][0]["message"]["content"] = None
            reply.setdefault(
                "usage", {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
            )
            reply["usage"]["prompt_tokens_details"] = {"cached_tokens": None}
        return reply

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def chat_server() -> Any:
    servers: list[ChatServer] = []

    def start(**kwargs: Any) -> ChatServer:
        servers.append(ChatServer(**kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def remote(tiny_model_dir: Path, settings: dict, server: ChatServer, **kw: Any) -> RemoteReflector:
    from transformers import AutoTokenizer

    pytest.importorskip("openai")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    return RemoteReflector({"base_url": server.url, "model": "m", **settings}, tokenizer,
                           **{"structured_output": "auto", "temperature": 0.7, **kw})  # fmt: skip


def test_remote_reflector_sends_each_row_with_its_seed_budget_and_schema(
    tiny_model_dir, chat_server
):
    server = chat_server()
    reflector = remote(tiny_model_dir, {"max_concurrency": 1}, server)
    assert reflector.structured and reflector.temperature == 0.7 and reflector.workers == 1
    chats = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    schema = {"type": "object"}
    gens = reflector.replies(chats, "tag", 33, [5, 2**31 + 6], schema)
    assert [g.text for g in gens] == ["reply 1", "reply 2"]
    assert all(g.finished and g.cached_tokens == 4 and g.token_ids for g in gens)
    first, second = server.requests
    assert first["messages"] == chats[0] and first["max_tokens"] == 33 and first["model"] == "m"
    assert (first["seed"], second["seed"], first["temperature"]) == (5, 6, 0.7)
    assert first["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "resd_tag", "schema": schema, "strict": True},
    }
    reflector.replies(chats[:1], "tag", 33, [1], None)  # no schema: free text
    assert "response_format" not in server.requests[-1]


def test_remote_reflector_settings_and_a_reply_cut_short(tiny_model_dir, monkeypatch, chat_server):
    monkeypatch.setenv("RESD_TEST_KEY", "secret")
    server = chat_server(finish="length", cached=None)
    reflector = remote(tiny_model_dir, {"temperature": 0.0, "api_key_env": "RESD_TEST_KEY",
                                        "timeout": 7}, server, structured_output="off")  # fmt: skip
    assert not reflector.structured and reflector.temperature == 0.0 and reflector.workers == 8
    assert reflector.client.timeout == 7 and reflector.client.api_key == "secret"
    assert reflector.client.max_retries == 2  # a dropped request is retried, twice
    assert remote(tiny_model_dir, {}, server).client.timeout == 120
    (gen,) = reflector.replies([[{"role": "user", "content": "a"}]], "reflection", 9, [3], None)
    assert not gen.finished and gen.cached_tokens == 0
    assert server.requests[0]["temperature"] == 0.0


def test_a_reflector_setting_left_null_takes_its_default(tiny_model_dir, chat_server):
    """`timeout:`, `temperature:` or `max_concurrency:` left empty in YAML (null) passes
    check_reflector as unset, so it takes its default; the reflector raised TypeError from
    float(None) when the run built its lessons. The bug this test was written for."""
    settings = {"timeout": None, "temperature": None, "max_concurrency": None, "api_key_env": None}
    assert check_reflector({"base_url": "http://h/v1", "model": "m", **settings}) is None
    reflector = remote(tiny_model_dir, settings, chat_server())
    assert (reflector.client.timeout, reflector.temperature, reflector.workers) == (120, 0.7, 8)


def test_remote_reflector_sends_a_batch_concurrently(tiny_model_dir, chat_server):
    """`max_concurrency` requests are in flight together, so a batching server decodes
    them together: here each request waits for the other three (it would time out if sent
    one by one)."""
    server = chat_server()
    server.barrier = threading.Barrier(4, timeout=10)
    reflector = remote(tiny_model_dir, {"max_concurrency": 4}, server)
    gens = reflector.replies([[{"role": "user", "content": str(i)}] for i in range(4)], "tag", 5,
                             [1, 2, 3, 4], None)  # fmt: skip
    assert len(gens) == 4 and len(server.requests) == 4
    # and never more than `max_concurrency`: a server allowed one request gets one
    one_at_a_time = chat_server()
    reflector = remote(tiny_model_dir, {"max_concurrency": 1}, one_at_a_time)
    reflector.replies([[{"role": "user", "content": str(i)}] for i in range(3)], "tag", 5,
                      [1, 2, 3], None)  # fmt: skip
    assert one_at_a_time.most_in_flight == 1


def test_local_reflector_prompts_begin_with_each_rows_head(tiny_model_dir, tmp_path):
    """The conversation layout hands each row's rollout tokens to the chat builder; the
    prompt layout hands none."""
    seen = []
    sampler = ScriptedSampler({"reflection": ["x"] * 4})
    local = LocalReflector(sampler, lambda chat, head: seen.append(head) or [1, 2])
    local.replies([[{"role": "user", "content": "a"}]] * 2, "reflection", 4, [1, 2], None,
                  heads=[[3], [4]])  # fmt: skip
    assert seen == [[3], [4]] and sampler.calls[0]["prompts"] == [[1, 2], [1, 2]]
    local.replies([[{"role": "user", "content": "a"}]] * 2, "reflection", 4, [1, 2], None)
    assert seen[2:] == [None, None]


def test_remote_reflector_reads_a_null_reply_and_cached_count_as_empty_and_zero(
    tiny_model_dir, chat_server
):
    """OpenAI-compatible servers may send `content: null` (an empty or refused reply) and
    `cached_tokens: null`; the row reads as an empty reply (a parse failure the step
    counts), not a crash of the whole step. Catches `content or ""` and `or 0` dropped."""
    server = chat_server()
    server.nulls = True
    reflector = remote(tiny_model_dir, {}, server)
    (gen,) = reflector.replies([[{"role": "user", "content": "a"}]], "reflection", 9, [3], None)
    assert (gen.text, gen.token_ids, gen.cached_tokens, gen.finished) == ("", [], 0, True)


def test_a_remote_reflector_without_the_openai_package_names_what_to_install(
    tiny_model_dir, monkeypatch
):
    """Without `openai` installed, asking for a `reflector:` server says which extra to
    install instead of failing later with a NameError. Catches the re-raise dropped."""
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'resd\[serve\]'"):
        RemoteReflector({"base_url": "http://127.0.0.1:9/v1", "model": "m"}, None,
                        structured_output="auto", temperature=0.0)  # fmt: skip


def test_a_tokenizer_that_adds_a_bos_token_does_not_have_it_counted(
    tiny_model_dir, tmp_path, chat_server
):
    """Llama-style tokenizers put a BOS token before any text they encode by default. A
    playbook entry's cost under a reader's budget, and the tokens of a remote reply (the
    step's token metrics), are the text's own tokens: the BOS is not counted. Catches
    `add_special_tokens=False` dropped (a budget that fits the playbook exactly would lose
    an entry; every remote reply would count one token too many)."""
    from tokenizers.processors import TemplateProcessing

    lessons, _ = make_lessons(tiny_model_dir, tmp_path, "teacher_playbook_tokens=1")
    tokenizer = lessons.tokenizer
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert tokenizer("abc")["input_ids"][0] == bos  # a BOS by default, as Llama's tokenizers
    entry = lessons.playbook.entries["strat-00001"]
    lessons.cfg.teacher_playbook_tokens = (
        len(tokenizer(entry.line(), add_special_tokens=False)["input_ids"]) + 1
    )  # the entry's line and its newline: exactly the budget
    assert lessons.view("teacher").ids == ["strat-00001"]
    server = chat_server()
    reflector = remote(tiny_model_dir, {}, server)
    reflector.tokenizer = tokenizer
    (gen,) = reflector.replies([[{"role": "user", "content": "a"}]], "tag", 9, [3], None)
    assert gen.token_ids == tokenizer("reply 1", add_special_tokens=False)["input_ids"]
    assert bos not in gen.token_ids
