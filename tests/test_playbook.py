"""The playbook: text round-trip, every operation, both pruning policies, hostile input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resd.training.playbook import SECTIONS, Playbook, section_slug
from resd.training.reflection import parse_operations


def make() -> Playbook:
    pb = Playbook()
    pb.add("strat", "Check the empty tape first.", step=1)
    pb.add("Common Mistakes to Avoid", "Forgetting the [EMPTY] branch.", step=1)
    pb.add("formulas", "Count symbols with a loop of pullers.", step=2)
    return pb


def test_ids_sections_and_format():
    pb = make()
    assert list(pb.entries) == ["strat-00001", "err-00002", "calc-00003"]
    text = pb.render()
    assert (
        "## Strategies & Insights\n[strat-00001] helpful=0 harmful=0 :: Check the empty tape first."
        in text
    )
    assert all(f"## {h}" in text for h in SECTIONS.values())  # all seven sections


def test_text_round_trip():
    pb = make()
    pb.tag("strat-00001", "helpful", step=3)
    pb.tag("strat-00001", "helpful", step=3)
    pb.tag("err-00002", "harmful", step=3)
    back = Playbook.parse(pb.render())

    # compared with the original (ids, sections, text, counters), not with itself
    def fields(book):
        return {e.id: (e.section, e.content, e.helpful, e.harmful) for e in book.entries.values()}

    assert fields(back) == fields(pb) and len(back) == 3
    e = back.entries["strat-00001"]
    assert (e.helpful, e.harmful, e.section) == (2, 0, "strat")
    assert back.next_id == 4  # new ids never collide with parsed ones


def test_json_round_trip_keeps_steps(tmp_path):
    pb = make()
    pb.tag("calc-00003", "harmful", step=7)
    pb.save(tmp_path)
    back = Playbook.load(tmp_path / "playbook.json")
    assert back == pb
    assert back.entries["calc-00003"].last_used_step == 7
    assert Playbook.load(tmp_path / "playbook.md").render() == pb.render()


def test_unknown_section_goes_to_others_and_multiline_is_flattened():
    pb = Playbook()
    entry_id = pb.add("Weird Section!!", "line one\n\n## not a heading\nline   three")
    assert entry_id == "misc-00001"
    assert pb.entries[entry_id].content == "line one ## not a heading line three"
    assert Playbook.parse(pb.render()) == Playbook.parse(pb.render())
    assert section_slug("Problem-Solving Heuristics") == "prob"


def test_add_rejects_empty_and_duplicates():
    pb = make()
    assert pb.add("strat", "   ") is None
    assert pb.add("misc", "check the EMPTY tape first") is None  # same words, other case
    assert len(pb) == 3


def test_update_merge_delete():
    pb = make()
    assert pb.update("strat-00001", "Check the empty tape before anything else.")
    assert pb.entries["strat-00001"].content.startswith("Check the empty tape before")
    assert not pb.update("nope-00009", "x")
    pb.tag("strat-00001", "helpful", 4)
    pb.tag("err-00002", "helpful", 5)
    pb.tag("err-00002", "harmful", 5)
    merged = pb.merge(["strat-00001", "err-00002"], "Handle the empty tape and its branch.", step=6)
    assert merged == "strat-00004"
    assert "strat-00001" not in pb and "err-00002" not in pb
    e = pb.entries[merged]
    assert (e.helpful, e.harmful, e.last_used_step) == (2, 1, 5)
    assert pb.merge(["calc-00003"], "only one") is None
    assert pb.delete("calc-00003") and not pb.delete("calc-00003")


def test_tags_counters_and_unknown_ids(caplog):
    pb = make()
    assert pb.tag("[strat-00001]", "Helpful", step=9)
    assert not pb.tag("ghost-00042", "helpful", step=9)
    assert "unknown" in caplog.text
    assert pb.tag("err-00002", "neutral", step=9)
    e1, e2 = pb.entries["strat-00001"], pb.entries["err-00002"]
    assert (e1.helpful, e1.last_used_step) == (1, 9)
    assert (e2.helpful, e2.harmful, e2.last_used_step) == (0, 0, None)  # neutral changes nothing
    assert not pb.tag("err-00002", "amazing", step=9)


def test_stats():
    pb = make()
    for _ in range(6):
        pb.tag("strat-00001", "helpful", 1)
    pb.tag("err-00002", "harmful", 1)
    assert pb.stats() == {"total": 3, "high_performing": 1, "problematic": 1, "unused": 1}


def test_prune_random():
    pb = make()
    pb.tag("strat-00001", "helpful", 2)
    pb.tag("err-00002", "harmful", 2)
    removed = pb.prune(3, policy="random")
    assert sorted(removed) == ["calc-00003", "err-00002"]  # harmful and unused go
    for i in range(5):
        eid = pb.add("strat", f"lesson {i}", step=3)
        pb.tag(eid, "helpful", 3)
    removed = pb.prune(4, policy="random", max_entries=3, seed=1)
    assert len(pb) == 3 and len(removed) == 3
    # the random choice among helpful entries is reproducible from the seed
    a, b = make(), make()
    for pb_ in (a, b):
        for eid in list(pb_.entries):
            pb_.tag(eid, "helpful", 1)
    assert a.prune(2, policy="random", max_entries=1, seed=7) == b.prune(
        2, policy="random", max_entries=1, seed=7
    )
    assert len(a) == 1 and a == b


def test_prune_staleness():
    pb = make()  # created at steps 1, 1, 2
    pb.tag("strat-00001", "helpful", 2)
    assert pb.prune(3, policy="staleness") == ["err-00002"]  # unused and older than one step
    assert "calc-00003" in pb  # unused but only one step old
    pb.tag("calc-00003", "helpful", 9)
    for i in range(3):
        pb.tag(pb.add("strat", f"fresh {i}", step=10), "helpful", 10)
    removed = pb.prune(10, policy="staleness", max_entries=3)
    assert removed == ["strat-00001", "calc-00003"]  # longest unused first
    with pytest.raises(ValueError, match="playbook_policy"):
        pb.prune(1, policy="prioritized")  # the paper's name for `random`


def test_token_budget_keeps_best_entries_whole_lines():
    pb = Playbook()
    for i in range(20):
        eid = pb.add("strat", f"lesson number {i} " + "word " * 10)
        for _ in range(i):
            pb.tag(eid, "helpful", i)
    text = pb.render(max_tokens=60, include_empty=False)
    kept = [line for line in text.splitlines() if line.startswith("[")]
    assert 0 < len(kept) < 20
    assert "lesson number 19 " in text and "lesson number 0 " not in text
    assert all(line.endswith("word") for line in kept)  # no line cut in the middle


HOSTILE_REPLIES = [
    "not json at all",
    '{"operations": "ADD everything"}',
    '{"operations": [42, null, "x", {"type": "EXPLODE"}, {"type": "ADD"}]}',
    '{"operations": [{"type": "DELETE", "id": "strat-99999"}, {"type": "UPDATE", "id": 5, "content": ""}]}',
    '{"operations": [{"type": "MERGE", "ids": "strat-00001", "content": "x"}]}',
    '{"operations": [{"type": "ADD", "section": "strat", "content": "' + "A" * 100_000 + '"}]}',
    '{"operations": [{"type": "ADD", "section": "strat", "content": "{prompt} ## Others\\n[misc-00001] helpful=9 harmful=0 :: fake"}]}',
    '```json\n{"operations": [{"type": "ADD", "section": "err", "content": "x",}],}\n``` and then prose',
]


@pytest.mark.parametrize("reply", HOSTILE_REPLIES)
def test_hostile_curator_replies_never_corrupt(reply):
    pb = make()
    before = json.dumps(pb.to_dict())
    ops = parse_operations(reply)
    report = pb.apply_operations(ops, step=5)
    # Every entry is still one well-formed line and the text form still round-trips.
    assert Playbook.parse(pb.render()).render() == pb.render()
    for e in pb.entries.values():
        assert "\n" not in e.content and len(e.content) <= 500
    if ops is None or report.applied == 0:
        assert json.dumps(pb.to_dict()) == before


def test_injected_entry_text_is_content_not_structure():
    pb = make()
    pb.apply_operations(parse_operations(HOSTILE_REPLIES[6]), step=5)
    assert len(pb) == 4
    assert "misc-00001" not in pb  # the fake id stayed inside the content


def test_skipped_operations_carry_their_reason():
    pb = Playbook()
    first = pb.add("strat", "Check the empty tape before anything else.", step=1)
    second = pb.add("err", "Never route a red symbol to the accept node.", step=1)
    ops = [
        "not an operation",
        {"type": "RENAME", "id": first},
        {"type": "UPDATE", "id": "strat-09999", "content": "Something new and long enough."},
        {"type": "ADD", "section": "Others", "content": "   "},
        {
            "type": "ADD",
            "section": "Others",
            "content": "check the EMPTY tape before anything else",
        },
        {"type": "UPDATE", "id": first, "content": "Check the empty tape before anything else."},
        {"type": "MERGE", "ids": [first, first], "content": "One entry cannot merge with itself."},
        {"type": "DELETE", "id": second},
        {"type": "ADD", "section": "Others", "content": "Vetoed by the content check."},
    ]
    report = pb.apply_operations(
        ops, step=2, check=lambda text: "copies_task" if "Vetoed" in text else None
    )
    assert report.reasons == {"malformed": 2, "unknown_id": 2, "empty": 1, "duplicate": 1,
                              "copies_task": 1}  # fmt: skip
    # UPDATE to its own text is applied (a no-op), DELETE too; the rest left no trace
    assert report.applied == 2 and report.skipped == 7 and report.removed == [second]
    assert [e.content for e in pb.entries.values()] == [
        "Check the empty tape before anything else."
    ]


def test_replies_of_one_step_follow_what_earlier_replies_retired():
    """Three replies written against one snapshot: the second names the sources the first
    merged away, the third the entry another deleted. The shared `retired` map sends the
    merge to the merged entry and reports the rest as retired, not as unknown ids."""
    pb = Playbook()
    a = pb.add("strat", "Check the empty tape before anything else.", step=1)
    b = pb.add("strat", "Look at the empty tape first of all cases.", step=1)
    c = pb.add("err", "Never route a red symbol to the accept node.", step=1)
    d = pb.add("prob", "Walk the failing test through the program by hand.", step=1)
    retired: dict[str, str | None] = {}
    first = pb.apply_operations(
        [{"type": "MERGE", "ids": [a, b], "content": "Handle the empty tape before all else."},
         {"type": "DELETE", "id": d}], step=2, retired=retired)  # fmt: skip
    merged = first.added[0]
    assert retired == {a: merged, b: merged, d: None}
    second = pb.apply_operations(
        [{"type": "MERGE", "ids": [a, b], "content": "The same merge, proposed again."},
         {"type": "MERGE", "ids": [b, c], "content": "Empty tapes and red symbols both matter."},
         {"type": "UPDATE", "id": a, "content": "A rewrite of an entry already merged away."},
         {"type": "DELETE", "id": d},
         {"type": "DELETE", "id": "strat-09999"}], step=2, retired=retired)  # fmt: skip
    assert second.reasons == {"retired": 3, "unknown_id": 1} and second.applied == 1
    # the second MERGE went to the entry that holds b's lesson now, and took c with it
    assert second.removed == [merged, c]
    assert [e.content for e in pb.entries.values()] == ["Empty tapes and red symbols both matter."]
    # without the map (replies applied as if from separate steps) the same ids are unknown
    alone = Playbook().apply_operations([{"type": "DELETE", "id": d}])
    assert alone.reasons == {"unknown_id": 1}


def test_paraphrases_of_an_entry_are_near_duplicates():
    """Lessons the 0.5B curator wrote in one run (manufactoria, `min1`): rewrites of one
    entry with a word or two changed are skipped at the default 0.6, a lesson that shares
    the tape vocabulary but says something else is kept, and an UPDATE or MERGE is not
    held against the entries it replaces."""
    pb = Playbook()
    base = pb.add("strat", "Check if a tape contains a BBRB sequence and use series of checks to "
                           "ensure that the tape is an Y or R color.")  # fmt: skip
    other = pb.add("err", "Reject a tape at the first red symbol after the blue ones.")
    report = pb.apply_operations([
        {"type": "ADD", "section": "Strategies & Insights", "content": "Check if a tape contains "
         "a BBRB sequence and use series of checks to ensure it is an Y or R color."},
        {"type": "ADD", "section": "Strategies & Insights", "content":
         "To properly, it to use series of checks to ensure that the tape is an Y or R color."},
        {"type": "ADD", "section": "Problem-Solving Heuristics", "content":
         "Check that the tape ends with a blue symbol before sending it to the accept node."},
        {"type": "UPDATE", "id": base, "content": "Check if a tape contains a BBRB sequence and "
         "use a series of checks to ensure the tape is a Y or R color."},
        {"type": "MERGE", "ids": [base, other], "content": "Check if a tape contains a BBRB "
         "sequence and use a series of checks to ensure the tape is a Y or R color."},
    ], similarity=0.6)  # fmt: skip
    assert report.reasons == {"near_duplicate": 2} and report.applied == 3
    assert len(pb) == 2  # the kept heuristic, and the merge of the base with `other`
    # two different short rules in the same words share 0.54: both stay
    pb.add("prob", "Check that the tape ends with B before accepting it.")
    close = pb.apply_operations([{"type": "ADD", "section": "Others", "content":
        "Check that the tape starts with R before rejecting it."}], similarity=0.6)  # fmt: skip
    assert close.applied == 1
    # without a threshold only exact copies are skipped
    loose = Playbook()
    loose.add("strat", "Check if a tape contains a BBRB sequence and use series of checks.")
    assert loose.apply_operations([{"type": "ADD", "section": "Others", "content":
        "Check if a tape contains a BBRB sequence, and use a series of checks."}]).applied == 1  # fmt: skip


def test_allowed_operations_restrict_the_curator():
    pb = Playbook()
    entry = pb.add("strat", "Check the empty tape before anything else.")
    report = pb.apply_operations(
        [
            {"type": "DELETE", "id": entry},
            {"type": "ADD", "section": "Others", "content": "A new lesson to keep."},
        ],
        allowed=("ADD",),
    )
    assert report.reasons == {"not_allowed": 1} and report.applied == 1 and entry in pb


def test_each_section_keeps_its_heading_and_its_entries_through_the_text_form() -> None:
    """Catches a renamed or blanked section slug or heading: the headings are what the
    teacher reads, and an entry filed under a slug that has no heading vanishes from the
    rendered text (and from the playbook a reload makes of it)."""
    pb = Playbook()
    slugs = ["strat", "calc", "code", "err", "prob", "ctx", "misc"]
    for slug in slugs:
        pb.add(slug, f"A lesson filed under {slug}.")
    text = pb.render()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Strategies & Insights",
        "## Formulas & Calculations",
        "## Code Snippets & Templates",
        "## Common Mistakes to Avoid",
        "## Problem-Solving Heuristics",
        "## Context Clues & Indicators",
        "## Others",
    ]
    back = Playbook.parse(text)
    assert {e.id: e.section for e in back.entries.values()} == {
        "strat-00001": "strat",
        "calc-00002": "calc",
        "code-00003": "code",
        "err-00004": "err",
        "prob-00005": "prob",
        "ctx-00006": "ctx",
        "misc-00007": "misc",
    }


def test_a_curators_free_words_pick_the_section() -> None:
    """Catches a blanked slug in the word table: a curator who writes "pitfalls" or
    "key insight" instead of a heading must still land in that section, not in a slug
    with no heading."""
    assert section_slug("Pitfalls") == "err"
    assert section_slug("key insight") == "strat"
    assert section_slug("math") == "calc"
    assert section_slug("code template") == "code"
    assert section_slug("heuristics") == "prob"
    assert section_slug("context clue") == "ctx"
    assert section_slug("COMMON MISTAKES TO AVOID") == "err"
    assert section_slug(None) == "misc" and section_slug("") == "misc"


def test_section_counts_cover_every_section() -> None:
    """Catches a `section_counts` that stops counting: playbook_history.jsonl logs it
    every step, empty sections included."""
    assert make().section_counts() == {
        "strat": 1,
        "calc": 1,
        "code": 0,
        "err": 1,
        "prob": 0,
        "ctx": 0,
        "misc": 0,
    }


def test_a_lesson_is_cut_only_past_500_characters_and_says_so() -> None:
    """Catches an off-by-one at the 500-character bound: a lesson of exactly 500
    characters is kept whole; a longer one is cut to 500 ending in an ellipsis."""
    pb = Playbook()
    exact = pb.add("strat", "x" * 500)
    longer = pb.add("strat", "y" * 501)
    assert pb.entries[exact].content == "x" * 500
    assert pb.entries[longer].content == "y" * 499 + "…"


@pytest.mark.parametrize("policy", ["staleness", "random"])
def test_more_helpful_than_harmful_votes_keep_an_entry(policy: str) -> None:
    """Catches a harmful test that ignores the helpful count: d ≥ h and d > 0 is
    harmful (pruned), so 2 helpful / 1 harmful stays and 1 / 1 goes."""
    pb = Playbook()
    kept = pb.add("strat", "Check the empty tape before anything else.", step=1)
    tied = pb.add("err", "Never route a red symbol to the accept node.", step=1)
    for tag in ("helpful", "helpful", "harmful"):
        pb.tag(kept, tag, 2)
    for tag in ("helpful", "harmful"):
        pb.tag(tied, tag, 2)
    assert pb.prune(2, policy=policy) == [tied]
    assert list(pb.entries) == [kept]


def test_over_budget_staleness_counts_from_the_last_use_not_the_creation() -> None:
    """Catches staleness measured from the creation step when the entry has been used:
    an old entry used at step 9 outlives a newer one last used at step 6."""
    pb = Playbook()
    old = pb.add("strat", "Old but used recently.", step=1)
    new = pb.add("strat", "Newer but used long ago.", step=5)
    pb.tag(old, "helpful", 9)
    pb.tag(new, "helpful", 6)
    assert pb.prune(10, policy="staleness", max_entries=1) == [new]
    assert old in pb


def test_merge_refuses_a_repeated_id_or_empty_text_and_keeps_ids_unique() -> None:
    """Catches a merge that pops the same id twice (KeyError instead of None), merges
    into an empty lesson, or does not advance the id counter (the next ADD would then
    overwrite the merged entry)."""
    pb = make()
    assert pb.merge(["strat-00001", "strat-00001"], "One entry cannot merge with itself.") is None
    assert pb.merge(["strat-00001", "err-00002"], "   ") is None
    assert list(pb.entries) == ["strat-00001", "err-00002", "calc-00003"]
    merged = pb.merge(["strat-00001", "err-00002"], "Handle the empty tape and its branch.")
    assert merged == "strat-00004"
    assert pb.add("strat", "A lesson added after the merge.") == "strat-00005"
    assert pb.entries["strat-00004"].content == "Handle the empty tape and its branch."


def test_update_refuses_empty_text_and_an_update_operation_rewrites_the_entry() -> None:
    """Catches an UPDATE that is counted as applied but leaves the old text, and an
    `update` that blanks an entry when the new text is empty."""
    pb = make()
    assert not pb.update("strat-00001", " \n ")
    assert pb.entries["strat-00001"].content == "Check the empty tape first."
    report = pb.apply_operations(
        [{"type": "UPDATE", "id": "strat-00001", "content": "Check the empty tape before all."}]
    )
    assert report.applied == 1
    assert pb.entries["strat-00001"].content == "Check the empty tape before all."


def test_tag_results_sum_to_the_number_of_tags_applied() -> None:
    """Catches `tag` returning None instead of False: the trainer sums the results into
    `tags_applied`, and a None there raises."""
    pb = make()
    results = [
        pb.tag("strat-00001", "helpful", 3),
        pb.tag("ghost-00042", "helpful", 3),
        pb.tag("err-00002", "amazing", 3),
    ]
    assert results == [True, False, False] and sum(results) == 1


def test_operations_that_are_not_a_list_give_an_empty_report() -> None:
    """Catches `apply_operations` returning None for an unparsed reply: the trainer reads
    `report.applied` after every curator reply."""
    pb = make()
    for ops in (None, "ADD everything", {"type": "ADD", "content": "x"}):
        report = pb.apply_operations(ops)
        assert (report.applied, report.skipped, report.added) == (0, 0, [])
    assert len(pb) == 3


def test_allowed_operation_types_are_case_insensitive() -> None:
    """Catches `allowed` compared as given: `("add",)` must allow ADD, not skip it."""
    report = Playbook().apply_operations(
        [{"type": "ADD", "section": "Others", "content": "A new lesson to keep."}], allowed=("add",)
    )
    assert report.applied == 1 and not report.reasons


def test_playbooks_with_different_entries_are_not_equal() -> None:
    """Catches an `==` that compares only the type (every playbook equal to every
    other) or that raises on a non-playbook."""
    assert make() != Playbook()
    assert make() != "not a playbook"
    changed = make()
    changed.tag("strat-00001", "helpful", 1)
    assert changed != make()


def test_a_seed_file_puts_headless_entries_in_others_and_starts_them_at_step_0() -> None:
    """Catches `parse` losing its default section (entries above the first heading) and
    seed entries created after step 0: an unused seed entry is stale by step 2."""
    text = (
        "[strat-00007] helpful=0 harmful=0 :: Above any heading.\n"
        "## Strategies & Insights\n"
        "[strat-00002] helpful=1 harmful=0 :: Under its heading."
    )
    pb = Playbook.parse(text)
    assert {e.id: e.section for e in pb.entries.values()} == {
        "strat-00007": "misc",
        "strat-00002": "strat",
    }
    assert pb.next_id == 8
    assert pb.prune(2, policy="staleness") == ["strat-00007"]


@pytest.mark.parametrize("name", ["playbook.json", "playbook.md"])
def test_a_playbook_file_that_is_not_text_is_named(tmp_path: Path, name: str) -> None:
    """`playbook_init` naming a binary file failed the run with UnicodeDecodeError's words
    alone (which name no file), after the model had loaded."""
    (tmp_path / name).write_bytes(b"\x80\x81 not text")
    with pytest.raises(ValueError, match=rf"^playbook_init: .*{name} is not UTF-8 text \(byte 0"):
        Playbook.load(tmp_path / name)


def test_save_makes_missing_folders_and_load_takes_a_string_path(tmp_path: Path) -> None:
    """Catches `save` into a folder that does not exist yet or given as a string, and a
    missing `playbook_init` reported without its option name."""
    pb = make()
    folder = tmp_path / "run" / "step_3"
    pb.save(str(folder))
    assert Playbook.load(str(folder / "playbook.json")) == pb
    assert Playbook.load(str(folder / "playbook.md")).render() == pb.render()
    with pytest.raises(FileNotFoundError, match="playbook_init: no such file"):
        Playbook.load(str(tmp_path / "missing.md"))


def test_stats_thresholds_the_curator_is_shown() -> None:
    """Catches off-by-one thresholds in the curator's stats: high-performing is
    helpful > 5 and harmful < 2, problematic harmful ≥ helpful and harmful > 0,
    unused no votes at all."""
    pb = Playbook()
    votes = {"six-one": (6, 1), "five-zero": (5, 0), "six-two": (6, 2), "one-one": (1, 1),
             "two-one": (2, 1), "none": (0, 0)}  # fmt: skip
    for name, (helpful, harmful) in votes.items():
        entry_id = pb.add("strat", f"Lesson {name}.")
        for tag, n in (("helpful", helpful), ("harmful", harmful)):
            for _ in range(n):
                pb.tag(entry_id, tag, 1)
    assert pb.stats() == {"total": 6, "high_performing": 1, "problematic": 1, "unused": 1}


def test_token_budget_counts_each_line_and_its_newline_with_the_given_counter() -> None:
    """Catches a budget that ignores `count_tokens`, forgets the newline each kept line
    costs, or is off by one at the limit: with `len` as counter, two 46-character lines
    need 94 tokens."""
    pb = Playbook()
    for name in "ABC":
        entry_id = pb.add("strat", f"Lesson {name}.")
        pb.tag(entry_id, "helpful", 1)
    assert len(pb.entries["strat-00001"].line()) == 46

    def kept(budget: int) -> int:
        return pb.render(max_tokens=budget, count_tokens=len).count("\n[")

    assert kept(94) == 2 and kept(93) == 1 and kept(46) == 0 and kept(47) == 1


def test_token_budget_ranks_by_net_votes_then_latest_use_then_newest() -> None:
    """Catches a ranking that adds harmful votes to helpful ones or ignores the last
    use: under a one-line budget the kept entry is the best proven, then the most
    recently used, then the newest."""
    pb = Playbook()
    disputed = pb.add("strat", "Disputed lesson.", step=1)
    for tag in ("helpful",) * 3 + ("harmful",) * 3:
        pb.tag(disputed, tag, 1)
    proven = pb.add("strat", "Proven lesson.", step=1)
    pb.tag(proven, "helpful", 1)

    def best(book: Playbook) -> list[str]:
        text = book.render(max_tokens=2, count_tokens=lambda s: 1)  # one line and its newline
        return [line.split("]")[0][1:] for line in text.splitlines() if line.startswith("[")]

    assert best(pb) == [proven]
    recent = pb.add("strat", "Recently used lesson.", step=1)
    pb.tag(recent, "helpful", 5)
    assert best(pb) == [recent]
    fresh = Playbook()
    fresh.add("strat", "Old unused lesson.", step=1)
    assert best(fresh) == ["strat-00001"]
    fresh.add("strat", "New unused lesson.", step=4)
    assert best(fresh) == ["strat-00002"]
    voted = fresh.add("strat", "Lesson with one vote each way.", step=1)
    fresh.tag(voted, "helpful", 2)
    fresh.tag(voted, "harmful", 2)
    assert best(fresh) == [voted]  # used at step 2 beats never used


def test_random_over_budget_victims_follow_the_seed_not_the_staleness() -> None:
    """Catches the random policy falling back to staleness order over budget: which
    helpful entry goes depends on the seed, not on which was used last."""
    victims = []
    for seed in (0, 1):
        pb = Playbook()
        stale = pb.add("strat", "Stale lesson.", step=1)
        fresh = pb.add("strat", "Fresh lesson.", step=1)
        pb.tag(stale, "helpful", 1)
        pb.tag(fresh, "helpful", 9)
        victims += pb.prune(10, policy="random", max_entries=1, seed=seed)
    assert victims == ["strat-00002", "strat-00001"]


def test_near_duplicate_threshold_is_inclusive() -> None:
    """Catches `>` for `>=`: a lesson whose word overlap equals `similarity` (3 of 5
    words = 0.6) is a near duplicate."""
    pb = Playbook()
    pb.add("strat", "Check the red tape.")
    report = pb.apply_operations(
        [{"type": "ADD", "section": "strat", "content": "Check the blue tape."}], similarity=0.6
    )
    assert report.reasons == {"near_duplicate": 1}


def test_operations_honour_sections_aliases_and_report_new_ids() -> None:
    """Catches an ADD or MERGE that ignores its section, a report that lists no new id,
    and the key spellings small curators use (`op`, `bullet_id`, `source_ids`)."""
    pb = make()
    report = pb.apply_operations(
        [
            {"type": "ADD", "section": "err", "content": "Never skip the carry."},
            {"op": "DELETE", "bullet_id": "calc-00003"},
            {"type": "MERGE", "source_ids": ["strat-00001", "err-00002"], "section": "prob",
             "content": "Handle the empty tape and its branch."},
        ]
    )  # fmt: skip
    assert report.applied == 3 and report.added == ["err-00004", "prob-00005"]
    assert report.removed == ["calc-00003", "strat-00001", "err-00002"]
    assert list(pb.entries) == ["err-00004", "prob-00005"]


def test_malformed_add_and_merge_operations_are_skipped_not_applied() -> None:
    """Catches an ADD without content stored as the lesson "None", a MERGE without an
    id list that raises, an ADD carrying stray `ids` that escapes the duplicate check,
    and a MERGE of a retired and an unknown id reported as unknown."""
    pb = make()
    retired: dict[str, str | None] = {"strat-00009": None}
    report = pb.apply_operations(
        [
            {"type": "ADD", "section": "strat"},
            {"type": "MERGE", "content": "A merge that names nothing."},
            {"type": "ADD", "ids": ["strat-00001"], "content": "Check the empty tape first."},
        ],
        retired=retired,
    )
    assert report.reasons == {"empty": 1, "unknown_id": 1, "duplicate": 1}
    mixed = [{"type": "MERGE", "ids": ["strat-00009", "ghost-00042"], "content": "Gone."}]
    assert pb.apply_operations(mixed, retired=retired).reasons == {"retired": 1}
    assert report.applied == 0 and len(pb) == 3


def test_json_keeps_the_id_counter_past_deleted_entries(tmp_path: Path) -> None:
    """Catches `next_id` lost in the JSON form: after the newest entry is deleted, a
    resumed run must not hand its id out again."""
    pb = make()
    pb.delete("calc-00003")
    pb.save(tmp_path)
    back = Playbook.load(tmp_path / "playbook.json")
    assert back.add("calc", "A lesson added after resuming.") == "calc-00004"
    assert Playbook.from_dict({}).add("strat", "First lesson.") == "strat-00001"


def test_a_seed_file_with_a_repeated_id_keeps_the_first_line() -> None:
    """Catches `parse` letting a later line with the same id replace the first."""
    pb = Playbook.parse(
        "## Others\n[misc-00001] helpful=2 harmful=0 :: First.\n"
        "[misc-00001] helpful=0 harmful=5 :: Second."
    )
    assert [(e.content, e.helpful, e.harmful) for e in pb.entries.values()] == [("First.", 2, 0)]


def test_a_corrupt_playbook_json_is_refused_by_name(tmp_path: Path) -> None:
    """Catches `load` returning None for a playbook.json that does not parse."""
    bad = tmp_path / "playbook.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"playbook_init: .* is not a saved playbook\.json"):
        Playbook.load(bad)
