"""The page `resd serve` shows at `/` (`resd.serve.page`), rendered from a real SQLite store:
what each completion, its feedback, the learner and the accuracy curve look like to the
operator, and that text from requests, replies, feedback and the learner is shown as text
(escaped), never as markup."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

pytest.importorskip("sqlalchemy", reason="needs the serve extra: pip install 'resd[serve]'")

from resd.serve.page import render_page
from resd.serve.store import Store

INJECTED = "<script>alert('x')</script>"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(str(tmp_path / "resd.db"))
    yield db
    db.close()


def completion(store: Store, completion_id: str, messages: list[dict[str, str]], response: str,
               *, version: str = "v1", tokens: int = 3, finish: str = "stop") -> None:  # fmt: skip
    store.record_interaction(
        completion_id=completion_id, model_version=version, model_name="tiny", messages=messages,
        params={}, response=response, prompt_token_ids=[1, 2], response_token_ids=list(range(tokens)),
        response_logprobs=None, finish_reason=finish,
    )  # fmt: skip


def page(store: Store, learner_status: dict[str, Any] | None = None, **kwargs: Any) -> str:
    """The page as the server renders it (`resd.serve.app`): the store's counts, versions
    and latest completions, and the learner's status."""
    options = {"model_name": "tiny", "version": "v1", "refresh_s": 0, **kwargs}
    return render_page(counts=store.counts(), versions=store.versions(), recent=store.recent(50),
                       learner_status=learner_status, **options)  # fmt: skip


def svg_numbers(html: str, tag: str, attribute: str) -> list[float]:
    return [float(v) for v in re.findall(rf'<{tag} [^>]*?{attribute}="([-0-9.]+)"', html)]


def test_a_completion_shows_its_last_user_message_reply_and_feedback(store: Store) -> None:
    """Each completion is one row: time and id, the version that answered, the *last* user
    message (not the first, not the system prompt), the reply, how it finished, and every
    feedback row with its numbers, its text clipped at 300 characters and the learner step
    that used it. Everything a user or the model wrote is escaped."""
    store.add_version("v1", parent=None, step=0)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"first question {INJECTED}"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "Second & <last> question"},
    ]
    completion(store, "chatcmpl-a", messages, "The answer is <b>9</b>", tokens=3)
    store.record_feedback("chatcmpl-a", source="user", reward=1.0, score=None,
                          feedback="<img src=x onerror=alert(1)> thanks")  # fmt: skip
    graded, _ = store.record_feedback("chatcmpl-a", source="grader", reward=0.0, score=0.25,
                                      feedback="x" * 400)  # fmt: skip
    store.mark_consumed([graded["id"]], step=2)
    html = page(store)

    assert "<script" not in html and "<img" not in html and "<b>9</b>" not in html
    assert '<td class="text">Second &amp; &lt;last&gt; question</td>' in html
    assert "first question" not in html and "You are terse." not in html
    assert '<td class="text">The answer is &lt;b&gt;9&lt;/b&gt;</td>' in html
    assert "<td>stop, 3 tokens</td>" in html and '<span class="badge">v1</span></td>' in html
    created = store.recent(1)[0]["created_at"]
    assert f"<td>{created}<br><code>chatcmpl-a</code></td>" in html
    assert "<li><b>user</b> reward=1: &lt;img src=x onerror=alert(1)&gt; thanks</li>" in html
    assert f"<li><b>grader</b> reward=0, score=0.25: {'x' * 300} … · used at step 2</li>" in html
    assert "Recent completions (1)" in html
    head = "".join(
        f"<th>{h}</th>" for h in ("time / id", "version", "user", "reply", "finish", "feedback")
    )
    assert (
        f'<section id="recent"><h2>Recent completions (1)</h2><table><thead><tr>{head}</tr>' in html
    )


def test_completions_without_feedback_or_a_user_message_and_long_texts(store: Store) -> None:
    """A completion with no feedback says "none"; one whose request ends with an assistant
    prefill shows the user's message before it, one that holds no user message shows its
    last message, and one without messages an empty cell; a message or reply
    longer than 600 characters is clipped with an ellipsis; the newest completion is first."""
    store.add_version("v1", parent=None, step=0)
    no_user = [{"role": "system", "content": "a system prompt"},
               {"role": "assistant", "content": "an assistant's start"}]  # fmt: skip
    completion(store, "chatcmpl-old", no_user, "r" * 601, finish="length", tokens=7)
    completion(store, "chatcmpl-new", [{"role": "user", "content": "q" * 700}], "r" * 600)
    completion(store, "chatcmpl-empty", [], "")
    prefill = [{"role": "user", "content": "the question"}, {"role": "assistant", "content": "So"}]
    completion(store, "chatcmpl-prefill", prefill, "the rest")
    html = page(store)
    assert html.index("chatcmpl-empty") < html.index("chatcmpl-new") < html.index("chatcmpl-old")
    assert '<td class="text">the question</td><td class="text">the rest</td>' in html
    assert '<td class="text">an assistant&#x27;s start</td>' in html
    assert "a system prompt" not in html
    assert f'<td class="text">{"q" * 600} …</td>' in html
    assert f'<td class="text">{"r" * 600}</td>' in html  # exactly 600: not clipped
    assert f'<td class="text">{"r" * 600} …</td>' in html  # 601: clipped
    assert '<td class="text"></td><td class="text"></td>' in html  # no messages, empty reply
    assert "<td>length, 7 tokens</td>" in html
    assert html.count('<td><span class="empty">none</span></td>') == 4
    assert "Recent completions (4)" in html and "No completions yet." not in html


def test_an_empty_server_without_a_learner(store: Store) -> None:
    """Before any request: zero counts, placeholders instead of empty tables, a page that
    says how to start a learner, and a refresh tag only when refreshing is asked for."""
    html = page(store, refresh_s=7)
    assert '<meta http-equiv="refresh" content="7">' in html
    assert "http-equiv" not in page(store, refresh_s=0)
    assert '<meta http-equiv="refresh" content="1">' in page(store, refresh_s=1)
    defaults = render_page(model_name="tiny", version="v1", counts={}, versions=[], recent=[],
                           learner_status=None)  # fmt: skip
    assert '<meta http-equiv="refresh" content="10">' in defaults  # every 10 s unless told
    assert '<p class="counts"><span>interactions: <b>0</b></span><span>feedback: <b>0</b>' in html
    # each placeholder is the whole of its section, nothing written beside it
    assert (
        '<h2>Recent completions (0)</h2><p class="empty">No completions yet.</p></section>' in html
    )
    assert (
        '<section id="accuracy"><h2>Accuracy</h2><p class="empty">No accuracy measured yet.' in html
    )
    assert "<svg" not in html
    learner = '<section id="learner"><h2>Learner</h2><p class="empty">no learner (start with'
    assert learner in html
    assert "Playbook history" not in html and "Learner steps" not in html


def test_the_header_counts_and_model_versions(store: Store) -> None:
    """The model's name and served version (escaped, also in the title), the store's
    counts, the sections' links and the versions table with the newest version first."""
    store.add_version("v1", parent=None, step=0, note="the <base> model")
    store.add_version("v2", parent="v1", step=3, accuracy=0.75, note="after step 3")
    completion(store, "chatcmpl-a", [{"role": "user", "content": "hi"}], "hello")
    html = page(store, model_name="tiny & <co>", version="v2")
    assert "<title>resd serve: tiny &amp; &lt;co&gt;</title>" in html
    assert (
        '<p>Model <b>tiny &amp; &lt;co&gt;</b>, serving version <span class="badge">v2</span>'
        in html
    )
    assert (
        "<span>interactions: <b>1</b></span>" in html and "<span>versions: <b>2</b></span>" in html
    )
    with_learner = page(store, {"playbook_markdown": ""}, version="v2")
    for anchor in ("accuracy", "playbook", "steps", "recent", "versions"):
        assert f'<a href="#{anchor}">{anchor}</a>' in with_learner
        assert f'<section id="{anchor}">' in with_learner  # each link leads to its section
    assert "Model versions (2)" in html
    head = "".join(f"<th>{h}</th>" for h in ("id", "created", "parent", "step", "accuracy", "note"))
    assert (
        f'<section id="versions"><h2>Model versions (2)</h2><table><thead><tr>{head}</tr>' in html
    )
    rows = re.findall(r"<tr><td>(v\d)</td><td>[^<]+</td><td>([^<]*)</td><td>(\d+)</td>"
                      r"<td>([^<]*)</td><td>([^<]*)</td></tr>", html)  # fmt: skip
    assert rows == [
        ("v2", "v1", "3", "0.75", "after step 3"),
        ("v1", "", "0", "", "the &lt;base&gt; model"),
    ]


def test_every_link_of_the_page_leads_to_a_section_of_it(store: Store) -> None:
    """Without a learner the playbook and steps sections do not exist (one "learner"
    section says how to start one): the bug was links to #playbook and #steps that led
    nowhere, and none to the section that was there."""
    for status in (None, {"playbook_markdown": "- be brief"}):
        html = page(store, status)
        links = re.findall(r'<a href="#([^"]+)">', html)
        sections = re.findall(r'<section id="([^"]+)">', html)
        assert links and set(links) <= set(sections), (status, links, sections)
    assert '<a href="#learner">learner</a>' in page(store, None)


def test_the_learner_sections(store: Store) -> None:
    """The learner's scalar fields as a table (not the playbook, not lists), the playbook
    as text, its history newest first (each entry labelled by step and version and showing
    its text, or its JSON), and its steps newest first with the union of their fields."""
    status = {
        "running": True, "error": "<b>boom</b>", "step": 2, "playbook_markdown": "## rules\n- <i>be brief</i>",
        "playbook_history": [{"step": 1, "playbook_markdown": "first lesson"},
                             {"step": 2, "version": "v2", "diff": "+ second <lesson>"},
                             "a bare <entry>", {"other": 1}, {"step": 5, "markdown": "as markdown"},
                             {"step": 6, "playbook": "as playbook"}, {"step": 7, "text": "as text"},
                             {"step": 8, "changes": "as changes"},
                             {"step": 9, "added": [], "at": datetime(2026, 1, 2, tzinfo=timezone.utc)}],
        "steps": [{"step": 1, "served": "v1", "accuracy": 0.25},
                  {"step": 2, "served": "v2", "accuracy": 0.5, "rows": 4}, "not a step"],
    }  # fmt: skip
    html = page(store, status)
    assert "<tr><td>running</td><td>True</td></tr>" in html
    assert "<tr><td>error</td><td>&lt;b&gt;boom&lt;/b&gt;</td></tr>" in html
    assert "<tr><td>step</td><td>2</td></tr>" in html
    assert html.count("be brief") == 1 and "<td>playbook_history</td>" not in html
    assert "<pre>## rules\n- &lt;i&gt;be brief&lt;/i&gt;</pre>" in html
    fields = (
        '<section id="playbook"><h2>Playbook</h2><table><thead><tr><th>field</th><th>value</th>'
    )
    assert fields in html and '<section id="history"><h2>Playbook history (9)</h2>' in html
    entries = re.findall(
        r"<details><summary>([^<]*)</summary><pre>(.*?)</pre></details>", html, re.S
    )
    at = "&quot;at&quot;: &quot;2026-01-02 00:00:00+00:00&quot;"
    assert entries == [
        # a value JSON cannot hold is shown as text, not a page that fails to render
        ("step 9", f"{{\n &quot;step&quot;: 9,\n &quot;added&quot;: [],\n {at}\n}}"),
        ("step 8", "as changes"),
        ("step 7", "as text"),
        ("step 6", "as playbook"),
        ("step 5", "as markdown"),
        ("entry 4", "{\n &quot;other&quot;: 1\n}"),
        ("entry 3", "a bare &lt;entry&gt;"),
        ("step 2, version v2", "+ second &lt;lesson&gt;"),
        ("step 1", "first lesson"),
    ]
    assert "Learner steps (2)" in html
    steps = html[html.index('<section id="steps">') :]
    assert "<tr><th>step</th><th>served</th><th>accuracy</th><th>rows</th></tr>" in steps
    assert steps.index("<tr><td>2</td><td>v2</td><td>0.5</td><td>4</td></tr>") < steps.index(
        "<tr><td>1</td><td>v1</td><td>0.25</td><td></td></tr>"
    )


def test_a_learner_with_nothing_yet(store: Store) -> None:
    """A learner that has not stepped: an empty playbook, no history, no steps, each said
    in words (a playbook of whitespace is empty too); no field table without fields."""
    html = page(store, {"playbook_markdown": "  \n", "playbook_history": [], "steps": []})
    assert '<h2>Playbook</h2><p class="empty">The playbook is empty.</p></section>' in html
    assert "<pre>" not in html  # each placeholder below is the whole of its section
    assert '<h2>Playbook history (0)</h2><p class="empty">No changes yet.</p></section>' in html
    assert '<h2>Learner steps (0)</h2><p class="empty">No learner steps yet.</p></section>' in html
    assert "<th>field</th>" not in html and "no learner" not in html


def test_the_accuracy_curve(store: Store) -> None:
    """The curve is drawn from the learner's accuracies, in step order, on a 0..1 axis in
    a 640×240 chart with margins 48/16 (left/right) and 12/32 (top/bottom); malformed
    entries are skipped; each point names its step and value."""
    points = [{"step": 2, "accuracy": 0.5}, {"step": 0, "accuracy": 0.1}, {"step": "?", "accuracy": 1},
              {"accuracy": 0.3}, {"step": 1, "accuracy": 0.25}]  # fmt: skip
    html = page(store, {"accuracy": points})
    # x: 48 + step / 2 * 576; y: 12 + (1 - accuracy) * 196
    assert (
        '<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="48.0,188.4 336.0,159.0 624.0,110.0"/>'
        in html
    )
    assert svg_numbers(html, "circle", "cx") == [48.0, 336.0, 624.0]
    assert "<title>step 0: 0.1</title>" in html and "<title>step 2: 0.5</title>" in html
    # five grid lines, 0 to 1, labelled; the x axis labels the first, middle and last step
    assert svg_numbers(html, "line", "y1") == [208.0, 159.0, 110.0, 61.0, 12.0]
    labels = re.findall(
        r'<text x="([0-9.]+)" y="([0-9.]+)" text-anchor="(?:end|middle)">([^<]*)</text>', html
    )
    assert labels == [
        ("42", "212.0", "0"), ("42", "163.0", "0.25"), ("42", "114.0", "0.5"), ("42", "65.0", "0.75"),
        ("42", "16.0", "1"), ("48.0", "224", "0"), ("336.0", "224", "1"), ("624.0", "224", "2"),
        ("336.0", "236", "learner step"),
    ]  # fmt: skip
    assert (
        svg_numbers(html, "line", "x1") == [48.0] * 5
        and svg_numbers(html, "line", "x2") == [624.0] * 5
    )
    svg = ElementTree.fromstring(re.search(r"<svg .*?</svg>", html).group(0))  # well-formed
    assert len(svg.findall("{http://www.w3.org/2000/svg}circle")) == 3
    assert [e.tail for e in svg.iter() if (e.tail or "").strip()] == []  # no stray text drawn
    five = page(store, {"accuracy": [{"step": s, "accuracy": 0.5} for s in range(5)]})
    assert re.findall(r'y="224" text-anchor="middle">([^<]*)<', five) == ["0", "2", "4"]


def test_the_curve_without_a_learner_comes_from_the_versions(store: Store) -> None:
    """Without a learner (or one that measured nothing), the accuracies recorded on model
    versions are drawn; values outside 0..1 widen the axis; a single step is centred."""
    store.add_version("v1", parent=None, step=0)
    store.add_version("v2", parent="v1", step=4, accuracy=1.5)
    html = page(store)
    assert svg_numbers(html, "circle", "cx") == [336.0] and svg_numbers(html, "circle", "cy") == [
        12.0
    ]
    assert "<title>step 4: 1.5</title>" in html
    assert svg_numbers(html, "line", "y1")[0] == 208.0  # the axis runs 0 .. 1.5
    assert re.findall(r'text-anchor="end">([^<]*)<', html) == ["0", "0.375", "0.75", "1.125", "1.5"]
    store.add_version("v3", parent="v2", step=6, accuracy=-0.5)
    html = page(store, {"accuracy": [], "running": True})
    assert svg_numbers(html, "circle", "cy") == [12.0, 208.0]  # -0.5 .. 1.5
    assert re.findall(r'text-anchor="end">([^<]*)<', html) == ["-0.5", "0", "0.5", "1", "1.5"]
