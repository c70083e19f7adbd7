"""The `resd` command beyond `train`'s runs: `--help-config`, `envs`, `env-check`'s report
of the references that fail and of its samples, `--samples`, Ctrl-C and the exit codes.

The environments here are this module's own (`test_cli:Name`, as a user names theirs)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers.utils import logging as hf_logging

from resd.cli import _print_summary, main
from resd.config import TrainConfig, load_config
from resd.envs.base import Environment, Item, Score

# (reward, score) each reference answer gets; item i's reference is "ref<i>".
REFERENCE_SCORES = [(1.0, 1.0), (0.0, 1.0), (1.0, 0.5), (1.0, 1.0), *[(0.0, 0.0)] * 11]
LONG = "x" * 700  # longer than anything `env-check` shows of a prompt or a feedback


class GradedEnv(Environment):
    """Items whose reference answers score as REFERENCE_SCORES says; the feedback quotes
    the reply and runs past what `env-check` shows of it."""

    name = "graded"
    description = "test-only: references scored as the test says"

    def __init__(self) -> None:
        items = [
            Item(
                f"graded/{i}",
                [{"role": "user", "content": f"Task {i}: {LONG}"}],
                reference=f"ref{i}",
            )
            for i in range(len(REFERENCE_SCORES))
        ]
        self._train, self._test = (
            items[:12],
            [*items[12:], Item("graded/noref", "A task without a reference.")],
        )

    def train_items(self) -> list[Item]:
        return self._train

    def test_items(self) -> list[Item]:
        return self._test

    def score(self, item: Item, response: str) -> Score:
        reward, score = (0.0, 0.0)
        if response.startswith("ref"):
            reward, score = REFERENCE_SCORES[int(response[3:])]
        return Score(reward, score, f"You said {response!r}. {LONG}")


class InterruptedEnv(GradedEnv):
    """Ctrl-C pressed while the environment loads (its data, say)."""

    def __init__(self) -> None:
        raise KeyboardInterrupt


class LateInterruptedEnv(GradedEnv):
    """Ctrl-C pressed while a class is defined (a module imported late): Python 3.11 reports
    the KeyboardInterrupt as the cause of a RuntimeError ("Error calling __set_name__")."""

    def __init__(self) -> None:
        class Interrupts:
            def __set_name__(self, owner: type, name: str) -> None:
                raise KeyboardInterrupt

        try:
            type("Late", (), {"field": Interrupts()})  # 3.11 raises the RuntimeError itself
        except KeyboardInterrupt as exc:  # 3.12+ lets it through: wrap it as a library would
            raise RuntimeError("interrupted while importing") from exc


def assert_every_default_in_order(out: str, tmp_path: Path) -> None:
    """`out` is a YAML config of every key in the dataclass's order, and it reads back to
    the defaults."""
    assert list(yaml.safe_load(out)) == [f.name for f in dataclasses.fields(TrainConfig)]
    (tmp_path / "all.yaml").write_text(out)
    assert load_config(tmp_path / "all.yaml") == TrainConfig()  # every default, read back


def test_help_config_is_a_commented_yaml_of_every_default(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`resd train --help-config` prints every key with its default as a config file, each
    key with the comments its field has in the source. Catches a key left out or out of
    order, a default taken from the wrong place (the factory of a key with a plain
    default), output that a config cannot be read back from, a comment lost, repeated or
    put beside the wrong key, and a failing exit code; it needs no --config and starts
    no run."""
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert_every_default_in_order(out, tmp_path)
    lines = out.splitlines()
    assert "model: smollm2-135m  # HF id, local folder, or a bundled alias" in lines
    assert "lr: 1.0e-06" in lines and "steps: null  # cap on optimizer steps; null = every" in out
    assert "env_args: {}" in lines and "report_to: []" in lines  # the factories' defaults
    autocast = lines.index("autocast: auto")  # its two comment lines are right above it
    assert lines[autocast - 2].startswith("# bf16 autocast for forwards")
    assert lines[autocast - 1] == "# off to disable; YAML reads a bare off as false)"
    assert len(set(lines)) == len(lines)  # each comment once, above its own key only


def test_help_config_without_the_source_still_lists_every_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An install without config.py's source (a zipped one) has no comments to show.
    Catches the help failing there, or printing the keys out of order."""
    import resd.config

    monkeypatch.setattr(resd.config, "__file__", str(tmp_path / "absent" / "config.py"))
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "#" not in out
    assert_every_default_in_order(out, tmp_path)


def test_output_into_a_closed_pipe_ends_quietly() -> None:
    """`resd train --help-config | head -3` closes the pipe before resd is done writing.
    Catches the BrokenPipeError traceback that then ended the command: it exits as a
    program killed by SIGPIPE would, with nothing on stderr."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write
    try:
        done = subprocess.run([sys.executable, "-m", "resd", "train", "--help-config"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_envs_names_an_environment_that_cannot_be_loaded(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches `resd envs` failing, or showing the previous environment's description, when
    one built-in cannot be imported (an optional package missing): the rest are listed."""
    monkeypatch.setitem(sys.modules, "resd.envs.ifeval", None)  # its import now fails
    assert main(["envs"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "(unavailable: env: cannot import module 'resd.envs.ifeval'" in rows["ifeval"]
    assert "unavailable" not in rows["arithmetic"] and "unavailable" not in rows["code"]


def test_version_prints_the_installed_packages(capsys: pytest.CaptureFixture[str]) -> None:
    """`resd --version` was an argparse error (a sub-command is required)."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    assert capsys.readouterr().out == f"resd {version('resd')}\n"


def test_envs_with_a_name_shows_the_arguments_it_takes(capsys: pytest.CaptureFixture[str]) -> None:
    """`resd envs NAME` lists the environment's env_args with their types and defaults,
    then its own docstrings (not one it inherits, nor a dataclass's made-up signature).
    Catches an argument left out or shown with another default, and a user's
    environment (module:Class) refused."""
    assert main(["envs", "arithmetic"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("arithmetic: One-line integer arithmetic")
    assert out[2:6] == ["env_args (name: type = default):", "  seed: int = 0",
                        "  n_train: int = 256", "  n_test: int = 64"]  # fmt: skip
    assert "  ops: str = '+-*'" in out and any("`quote_answer=True` repeats" in x for x in out)
    assert main(["envs", "house_rules"]) == 0  # a dataclass: its signature is not a docstring
    out = capsys.readouterr().out
    assert "  rules: list[str] | None = None" in out and "HouseRulesEnv(" not in out
    assert "Initialize self" not in out  # object.__init__'s
    assert main(["envs", "test_cli:GradedEnv"]) == 0
    assert capsys.readouterr().out.startswith("test_cli:GradedEnv: ")
    assert main(["envs", "arithmatic"]) == 2
    assert "did you mean 'arithmetic'" in capsys.readouterr().err


def test_envs_spells_the_types_of_an_environment_written_without_future_annotations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's own example (no `from __future__ import annotations`) holds the
    classes themselves, which `resd envs` printed as `path: <class 'str'> = ...`."""
    (tmp_path / "plain_env.py").write_text(
        "import typing\nfrom resd.envs import Environment\n\n"
        "class Plain(Environment):\n"
        "    def __init__(self, path: str = 'x.tsv', n: int | None = None,\n"
        "                 tags: list[str] | None = None, k: typing.Optional[float] = None):\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["envs", "plain_env:Plain"]) == 0
    assert capsys.readouterr().out.splitlines()[3:7] == [
        "  path: str = 'x.tsv'", "  n: int | None = None", "  tags: list[str] | None = None",
        "  k: Optional[float] = None",
    ]  # fmt: skip


def test_env_check_reports_each_reference_below_full_marks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Catches `env-check` passing a reference whose reward or score (either one) is below
    1.0, a wrong count of those that pass, more or fewer than the first ten failures shown,
    or their feedback cut at other than 200 characters; any failure exits 1."""
    assert main(["env-check", "test_cli:GradedEnv", "--samples", "0"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0] == "test_cli:GradedEnv: 12 train / 4 test items; 15 reference answers, 2 score 1.0"
    )
    fails = [line for line in out if line.startswith("  FAIL ")]
    assert [line.split()[1] for line in fails] == [f"graded/{i}:" for i in (1, 2, *range(4, 12))]
    assert fails[0].startswith("  FAIL graded/1: reward=0.0 score=1.0 feedback=")
    assert fails[1].startswith("  FAIL graded/2: reward=1.0 score=0.5 feedback=")
    feedback = f"You said 'ref1'. {LONG}"[:200]
    assert fails[0].endswith(f"feedback={feedback!r}")


def test_env_check_says_when_it_had_no_reference_to_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset whose answer column holds the gold values has no reference answers unless
    `reference_column` names one: env-check then scored nothing and printed "0 reference
    answers, 0 score 1.0" with exit 0, read as a scorer that works. Catches that silence,
    and the hint shown where references exist (then they are scored)."""
    rows = [{"question": f"{a} times 3?", "answer": str(3 * a)} for a in range(1, 9)]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["env-check", "--samples", "0", "dataset", f"path={path}", "prompt_column=question",
              "answer_column=answer", "scorer=exact_match"]  # fmt: skip
    assert main(common) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("0 reference answers, 0 score 1.0")
    assert out[1] == ("  no item has a reference answer: the scorer was not tried on a right one "
                      "(a dataset's come from env_args.reference_column: a column of correct "
                      "responses)")  # fmt: skip
    assert main([*common, "reference_column=answer"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("8 reference answers, 8 score 1.0")
    assert main(["env-check", "arithmetic", "--samples", "0"]) == 0  # it has references
    assert "no item has a reference" not in capsys.readouterr().out


class FloatEnv(GradedEnv):
    """A `score` that returns a number, as a TRL reward function does."""

    def score(self, item: Item, response: str) -> float:  # type: ignore[override]
        return float(response.startswith("ref"))


def test_a_score_that_returns_a_number_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`env-check`, made to check an environment, showed a traceback (`'float' object has
    no attribute 'reward'`) for a `score` that returns a number; `resd train` found it
    after the model had loaded, at the first rollout. Both now say what to return, and the
    trainer (its dry run here) before it reads the model: the model named does not exist,
    and the error is the environment's."""
    said = "resd: error: env: FloatEnv.score returned float (1.0), not a Score: return "
    assert main(["env-check", "test_cli:FloatEnv", "--samples", "0"]) == 2
    assert capsys.readouterr().err.startswith(said)
    argv = ["train", "--dry-run", "env=test_cli:FloatEnv", f"model={tmp_path / 'none'}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(said)


class OneIdEnv(GradedEnv):
    """Two different tasks under one id, as a data file with a repeated key column makes."""

    def __init__(self) -> None:
        super().__init__()
        self._train = [Item("graded/0", [{"role": "user", "content": "Task 0"}]),
                       Item("graded/0", [{"role": "user", "content": "Task 1"}])]  # fmt: skip


class RepeatsEnv(GradedEnv):
    """The same tasks again in the stream, as `benchmarks/sd_sanity.py` repeats its items."""

    def __init__(self) -> None:
        super().__init__()
        self._train = self._train * 2


def test_one_id_on_two_different_items_is_refused_and_a_repeated_item_is_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two different items with one id shared a solution buffer, a history of lessons and
    a row of per-item evaluation without a word. Catches env-check and the trainer (its
    dry run, before the model is read) letting them through, and a check so strict that
    it refuses the same item listed twice."""
    said = ("resd: error: env: training item id 'graded/0' names two different items "
            "(prompts 'Task 0' and 'Task 1'); ids must be unique")  # fmt: skip
    assert main(["env-check", "test_cli:OneIdEnv", "--samples", "0"]) == 2
    assert capsys.readouterr().err.strip() == said
    assert main(["train", "--dry-run", "env=test_cli:OneIdEnv", f"model={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == said
    assert main(["env-check", "test_cli:RepeatsEnv", "--samples", "0"]) == 1  # GradedEnv's FAILs
    assert capsys.readouterr().out.startswith("test_cli:RepeatsEnv: 24 train / 4 test items")


class SharedTestIdEnv(GradedEnv):
    """Two different test items under one id."""

    def __init__(self) -> None:
        super().__init__()
        self._test = [Item("graded/t", "Test 0"), Item("graded/t", "Test 1")]


class NoTestsEnv(GradedEnv):
    def __init__(self) -> None:
        super().__init__()
        self._test = []


def test_test_items_are_checked_before_a_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per-item evaluation is keyed by id: two different test items under one id were
    merged into one row. And `resd eval` of an environment without test items loaded the
    model first. Both are now said before any model is read (the model named here does
    not exist, and the error is the environment's), by `resd eval` and the trainer."""
    said = ("resd: error: env: test item id 'graded/t' names two different items "
            "(prompts 'Test 0' and 'Test 1'); ids must be unique")  # fmt: skip
    missing = str(tmp_path / "none")
    assert main(["eval", "--model", missing, "--env", "test_cli:SharedTestIdEnv"]) == 2
    assert capsys.readouterr().err.strip() == said
    assert main(["train", "--dry-run", "env=test_cli:SharedTestIdEnv", f"model={missing}"]) == 2
    assert capsys.readouterr().err.strip() == said
    assert main(["eval", "--model", missing, "--env", "test_cli:NoTestsEnv"]) == 2
    assert capsys.readouterr().err.strip() == "resd: error: env: NoTestsEnv has no test items"


def test_an_item_takes_a_prompt_string_and_refuses_what_is_not_a_chat() -> None:
    """`Item(id, "a prompt")` failed later, in the trainer or env-check, with `'str' object
    has no attribute 'get'`; a message without a role rendered as an empty prompt. A
    string is now one user turn, and anything else that is not a chat is refused with the
    item's id."""
    assert Item("a", "What is 2+2?").messages == [{"role": "user", "content": "What is 2+2?"}]
    assert Item("a", "What is 2+2?").prompt_text == "What is 2+2?"
    with pytest.raises(ValueError, match=r"^Item 'b': message 0 is not a chat message"):
        Item("b", [{"content": "no role"}])
    with pytest.raises(ValueError, match=r"^Item 'c': message 1 is not a chat message"):
        Item("c", [{"role": "user", "content": "hi"}, "a second turn as a string"])
    with pytest.raises(ValueError, match=r"^Item 'd': messages must be a list .* got dict"):
        Item("d", {"role": "user", "content": "one message, not a list"})


def test_an_items_content_is_text_and_its_reference_text_or_none() -> None:
    """A message whose content was None reached the chat template, which wrote the word
    "None" as the prompt; a list of content parts failed inside the tokenizer ("text
    input must be of type `str`"); a list as the reference reached SDFT's demonstration.
    Each is now refused where the item is made, with its id."""
    for content, kind in ((None, "NoneType"), ([{"type": "text", "text": "hi"}], "list")):
        with pytest.raises(ValueError, match=rf"^Item 'x': message 0's content must be text, "
                                             rf"got {kind}"):  # fmt: skip
            Item("x", [{"role": "user", "content": content}])
    with pytest.raises(ValueError, match=r"^Item 'y': reference must be text or None, got list"):
        Item("y", "a prompt", reference=["an answer"])  # type: ignore[arg-type]
    assert Item("z", "a prompt", reference=None).reference is None


class ReturnsNothing(GradedEnv):
    def train_items(self):  # a forgotten return
        self._train.sort(key=lambda item: item.id)


class ReturnsPrompts(GradedEnv):
    def train_items(self):
        return ["What is 2 + 2?", "What is 3 + 3?"]


class ReturnsAnEmptyItem(GradedEnv):
    def test_items(self):
        return [Item("graded/empty", [])]


@pytest.mark.parametrize(("env", "said"), [
    ("ReturnsNothing", r"ReturnsNothing\.train_items\(\) returned NoneType, not a list of resd\.Item"),
    ("ReturnsPrompts", r"ReturnsPrompts\.train_items\(\): item 0 is str \('What is 2 \+ 2\?'\), "
                       r"not a resd\.Item\(id=\.\.\., messages="),
    ("ReturnsAnEmptyItem", r"ReturnsAnEmptyItem\.test_items\(\): item 'graded/empty' has no "
                           r"messages: give it the prompt as messages="),
])  # fmt: skip
def test_items_that_are_not_items_are_refused_naming_the_method(
    env: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An environment's `train_items` that forgot its return failed as "TypeError:
    'NoneType' object is not iterable", one returning prompt strings as "AttributeError:
    'str' object has no attribute 'id'", and an item without messages inside the
    tokenizer's chat template ("Cannot apply chat template to an empty conversation"),
    each a traceback. Now one line naming the environment's method, from `resd train`
    before the model loads (the model named here does not exist) and from env-check."""
    missing = str(tmp_path / "none")
    assert main(["train", "--dry-run", f"env=test_cli:{env}", f"model={missing}"]) == 2
    assert re.fullmatch(rf"resd: error: env: {said}.*", capsys.readouterr().err.strip())
    assert main(["env-check", f"test_cli:{env}"]) == 2
    assert re.fullmatch(rf"resd: error: env: {said}.*", capsys.readouterr().err.strip())


def test_an_items_numbers_are_text_and_its_id_is_never_empty() -> None:
    """An int id keyed the solution buffer, which a checkpoint stores in JSON: the resumed
    run's keys came back as strings, and its lookups by the int missed every solution. A
    numeric reference or answer reached a chat (SDFT's demonstration) as a number. Catches
    either kept as a number, and an id that is None or empty let through."""
    item = Item(7, "2 * 21?", reference=42, answer=42.0)  # type: ignore[arg-type]
    assert (item.id, item.reference, item.answer) == ("7", "42", "42.0")
    assert json.loads(json.dumps({item.id: "a solution"})).get(item.id) == "a solution"
    for bad in (None, "", True):
        with pytest.raises(ValueError, match=r"^Item: id must be a non-empty string"):
            Item(bad, "a prompt")  # type: ignore[arg-type]


def test_env_check_takes_env_args_as_resd_train_writes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resd env-check dataset env_args.path=...`, copied from a `resd train` line, was
    refused ("dataset takes no argument 'env_args'"); the prefix is now the same argument."""
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"q": f"{a}+1?", "a": str(a + 1)}) + "\n"
                            for a in range(5)))  # fmt: skip
    argv = ["env-check", "--samples", "0", "dataset", f"env_args.path={path}",
            "env_args.prompt_column=q", "reference_column=a", "answer_column=a"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("5 reference answers, 5 score 1.0")


def test_env_check_shows_the_first_items_with_feedback_on_a_non_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Catches `env-check` showing more or fewer items than `--samples` (3 by default, 0
    allowed), cutting a prompt or a feedback at other than 600 characters, or showing the
    feedback on some other reply than a non-answer."""
    main(["env-check", "test_cli:GradedEnv", "--samples", "2"])
    out = capsys.readouterr().out
    blocks = out.split("\n--- ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["graded/0", "graded/1"]
    prompt, feedback = blocks[0].splitlines()[1:3]
    assert prompt == f"Task 0: {LONG}"[:600]
    assert feedback == "[feedback on a non-answer] " + f"You said 'I am not sure.'. {LONG}"[:600]
    main(["env-check", "test_cli:GradedEnv"])
    assert capsys.readouterr().out.count("\n--- ") == 3
    main(["env-check", "test_cli:GradedEnv", "--samples", "0"])
    assert "\n--- " not in capsys.readouterr().out


def test_key_value_words_may_follow_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse gives a `*` positional only the words before the first flag: `resd
    env-check arithmetic --samples 0 n_train=5` was refused ("unrecognized arguments"),
    as were `resd eval ... --samples 1 n_test=3` and `resd train --config F --resume
    lr=1` for a word after the flag. Catches those refused or dropped, the order of
    overrides lost (the later one wins), and a word that is no key=value, an unknown flag,
    or key=value for a command without overrides getting through."""
    from resd.cli import parse_args

    assert main(["env-check", "arithmetic", "--samples", "0", "n_train=5"]) == 0
    assert capsys.readouterr().out.startswith("arithmetic: 5 train / ")
    args = parse_args(["train", "n_train=1", "--resume", "steps=2", "--config", "x", "steps=3"])
    assert (args.overrides, args.resume, args.config) == (["n_train=1", "steps=2", "steps=3"],
                                                          True, "x")  # fmt: skip
    args = parse_args(["eval", "--model", "m", "--env", "arithmetic", "--samples", "1", "n_test=3"])
    assert args.env_args == ["n_test=3"] and args.samples == 1
    for refused in (["env-check", "arithmetic", "--samples", "0", "oops"],
                    ["env-check", "arithmetic", "--sampels", "0"],
                    ["report", "runs/x", "lr=1"]):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            parse_args(refused)
        assert exited.value.code == 2
        assert "unrecognized arguments: " in capsys.readouterr().err


def test_env_check_takes_its_environment_as_resd_eval_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`resd eval --env NAME` is how a user has just named the environment, so `resd
    env-check --env NAME` works too, with key=value words before or after it. Catches the
    flag refused ("unrecognized arguments: --env", with the top-level usage), a key=value
    taken for the name when the flag names it, and none or two names getting through."""
    from resd.cli import parse_args

    for words in (["--env", "arithmetic", "n_train=5", "seed=1"],
                  ["n_train=5", "--env", "arithmetic", "seed=1"],
                  ["arithmetic", "n_train=5", "seed=1"]):  # fmt: skip
        args = parse_args(["env-check", *words])
        assert (args.env, args.overrides) == ("arithmetic", ["n_train=5", "seed=1"]), words
    assert main(["env-check", "--env", "arithmetic", "n_train=5", "--samples", "0"]) == 0
    assert capsys.readouterr().out.startswith("arithmetic: 5 train / ")
    # a blank name ("$ENV" unset) went on as no name, to a TypeError traceback
    for refused in (["env-check"], ["env-check", "arithmetic", "--env", "qa"],
                    ["env-check", ""], ["env-check", "--env", " "]):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            parse_args(refused)
        assert exited.value.code == 2
        assert "env-check: name one environment" in capsys.readouterr().err


def test_samples_must_be_a_whole_number(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `--samples abc` taken as 0, or failing with a traceback instead of argparse's
    usage error (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        main(["env-check", "arithmetic", "--samples", "abc"])
    assert exited.value.code == 2
    assert "--samples: expected a whole number >= 0, got 'abc'" in capsys.readouterr().err


def test_ctrl_c_ends_a_command_with_a_line_and_exit_code_130(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Catches Ctrl-C (KeyboardInterrupt) escaping as a traceback, a wrong exit code (130 is
    the shell's for SIGINT) or the message printed to stdout instead of stderr."""
    assert main(["env-check", "test_cli:InterruptedEnv"]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("\nresd: interrupted (`resd train ... --resume` continues")


def test_ctrl_c_wrapped_in_another_exception_still_ends_with_exit_code_130(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Catches a Ctrl-C that lands inside a late import (the first checkpoint imports
    torch.distributed's) ending the run with a traceback and exit 1: Python wraps it in a
    RuntimeError. An error with no Ctrl-C behind it is still an error."""
    assert main(["env-check", "test_cli:LateInterruptedEnv"]) == 130
    assert capsys.readouterr().err.startswith("\nresd: interrupted")
    assert main(["env-check", "test_cli:BrokenEnv"]) == 2
    assert "could not be built: RuntimeError: boom" in capsys.readouterr().err


class BrokenEnv(GradedEnv):
    def __init__(self) -> None:
        raise RuntimeError("boom")


class MissingDataEnv(GradedEnv):
    """The README's own-task example with its data file missing."""

    def __init__(self, path: str = "no-such-capitals.tsv") -> None:
        Path(path).read_text()


def test_a_user_environment_missing_its_data_file_is_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user's environment that opens a missing file raises a bare FileNotFoundError.
    Catches the one line that then said only "[Errno 2] No such file or directory" without
    naming the environment that looked for it."""
    assert main(["env-check", "test_cli:MissingDataEnv"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resd: error: env: test_cli:MissingDataEnv could not be built: ")
    assert "FileNotFoundError" in err and "no-such-capitals.tsv" in err


def test_the_progress_bar_of_transformers_is_off_unless_verbose() -> None:
    """Catches `resd` leaving transformers' download/loading progress bars on (they break up
    our own progress bar), or turning them off under `-v` as well."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        assert main(["envs"]) == 0
        assert not hf_logging.is_progress_bar_enabled()
        hf_logging.enable_progress_bar()
        assert main(["-v", "envs"]) == 0
        assert hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `resd` without a subcommand failing with a traceback (no function to run) or
    an error that does not say what is missing."""
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: the following arguments are required: command\n"
    )


def test_verbose_shows_info_logs(tmp_path: Path) -> None:
    """Catches `-v` not lowering the log level to INFO (or swapping the levels, INFO by
    default and WARNING under -v): an environment's INFO line shows under `resd -v`. A
    process of its own: under pytest the root logger has handlers already, and
    `logging.basicConfig` does nothing there. Started as `python -m resd.cli`, the way
    `resd compare` starts each of its runs, it catches that entry point doing nothing."""
    (tmp_path / "chatty_env.py").write_text(
        "import logging\nfrom resd.envs.arithmetic import ArithmeticEnv\n\n"
        "class Chatty(ArithmeticEnv):\n    def __init__(self, **kw):\n"
        "        logging.getLogger('chatty').info('loading the items')\n"
        "        super().__init__(**kw)\n"
    )
    command = [sys.executable, "-m", "resd.cli", "-v", "env-check", "chatty_env:Chatty", "n_train=1",
               "n_test=1", "--samples", "0"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "INFO chatty: loading the items" in done.stderr


def test_the_summary_a_run_ends_with(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches `resd train`'s closing summary leaving out a metric, its before/after values,
    k and the item count, or the playbook's path, and showing a table for a run that made
    no evaluation (an environment without test items): the trainer sets both or neither."""
    before = {"task_mean@k": 0.25, "task_best@k": 0.5, "case_mean@k": 0.375, "case_best@k": 0.625,
              "k": 4.0, "items": 8.0}  # fmt: skip
    after = {**{key: value + 0.125 for key, value in before.items()}, "k": 4.0, "items": 8.0}
    _print_summary({"run_dir": "runs/x", "steps": 40, "eval_before": before, "eval_after": after})
    assert capsys.readouterr().out.splitlines() == [
        "",
        "run directory: runs/x  (40 steps)",
        "metric           before    after",
        "task_mean@k       0.250    0.375",
        "task_best@k       0.500    0.625",
        "case_mean@k       0.375    0.500",
        "case_best@k       0.625    0.750",
        "(k = 4 samples per item, 8 test items)",
        "playbook: runs/x/playbook.md",
    ]
    _print_summary({"run_dir": "runs/x", "steps": 40})
    assert capsys.readouterr().out.splitlines() == [
        "",
        "run directory: runs/x  (40 steps)",
        "playbook: runs/x/playbook.md",
    ]
    _print_summary({"run_dir": "runs/x", "steps": 1})
    assert "run directory: runs/x  (1 step)" in capsys.readouterr().out.splitlines()
    _print_summary({"run_dir": "runs/x", "steps": 6, "stopped_early": "case_mean@k reached 1"})
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "stopped early: case_mean@k reached 1", "playbook: runs/x/playbook.md"]  # fmt: skip


@pytest.mark.parametrize(
    "command",
    ["train", "envs", "env-check", "eval", "compare", "merge", "continual", "report", "serve"],
)
def test_every_subcommand_is_offered(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a subcommand left unregistered (`resd report` was, under a mutant, and no
    test noticed: the report's own tests build a parser of their own)."""
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: resd {command} ")


def test_a_dry_run_prints_the_trainers_schedule_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resd train --dry-run` builds what the trainer would (config, environment, model
    config, tokenizer), prints the run's schedule and stops: no folder is made. The steps,
    evaluations and checkpoints it names are those a run takes (a run's logs here are
    the check), and the state of output_dir says what `--resume` would do. Catches a
    schedule of its own arithmetic drifting from the trainer's, a dry run that writes, and
    a bad model passing it."""
    from resd.training.trainer import Trainer
    from test_trainer import config, read_jsonl

    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, "steps=3", "eval_every=2", "save_every=2")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not out.exists()
    assert lines[0] == f"model       {tiny_model_dir} (LlamaForCausalLM)"
    assert lines[2] == "env         toy_envs:ParityEnv: 16 training items, 4 test items"
    assert lines[3] == ("steps       3 optimizer steps on 2 batches of 4 prompts, 2 a batch "
                        "(`steps: 3` ends it; 1 epoch would give 4 batches)")  # fmt: skip
    assert lines[6] == "evaluation  4 test items × 2 samples at steps 0, 2, 3"
    assert lines[7] == "checkpoints at steps 2, 3, the last 2 kept"
    assert lines[8] == f"output_dir  {out} (new)"
    out.mkdir()
    (out / "README.md").write_text("a project's own")  # as the trainer, refused: it would go
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.endswith(
        f"{out} (holds README.md, which a run would overwrite: refused)\n"
    )
    (out / "README.md").unlink()
    Trainer(cfg).train()  # what a run does: the same steps, evaluations and checkpoints
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [0, 2, 3]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert len(read_jsonl(out / "metrics.jsonl")) == 3
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.endswith(f"{out} (holds a run: refused unless --resume)\n")
    assert main(["train", "--config", str(path), "--dry-run", "--resume", "steps=5"]) == 0
    assert capsys.readouterr().out.endswith(f"{out} (resumes from checkpoint-3)\n")
    assert main(["train", "--config", str(path), "--dry-run", f"model={tmp_path / 'none'}"]) == 2
    assert f"model: no such folder '{tmp_path / 'none'}'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # a folder without a model: the config cannot be read
    assert main(["train", "--config", str(path), "--dry-run", f"model={tmp_path / 'empty'}"]) == 2
    assert f"model: the folder '{tmp_path / 'empty'}' holds no model" in capsys.readouterr().err
    # LoRA: its settings, and its target modules against the model's skeleton (no weights)
    # are what the run would refuse after loading the model; a file where the folder goes
    for lora, message in (("{r: 0}", "lora.r: expected a whole number >= 1, got 0"),
                          ("{target_modules: [qkv]}", "lora: Target modules {'qkv'} not found")):  # fmt: skip
        assert main(["train", "--config", str(path), "--dry-run", f"lora={lora}"]) == 2
        assert message in capsys.readouterr().err
    assert (
        main(["train", "--config", str(path), "--dry-run", "lora={target_modules: [q_proj]}"]) == 0
    )
    assert capsys.readouterr().out.startswith(
        f"model       {tiny_model_dir} (LlamaForCausalLM), LoRA"
    )
    (tmp_path / "afile").write_text("")
    below = tmp_path / "afile" / "run"
    assert main(["train", "--config", str(path), "--dry-run", f"output_dir={below}"]) == 0
    assert capsys.readouterr().out.endswith(f"(refused: {tmp_path / 'afile'} is a file, not a "
                                            f"folder, so {below} cannot be made)\n")  # fmt: skip


def test_the_dry_runs_list_of_steps() -> None:
    """Every `every` steps and at the last one (which may fall on a multiple), with step 0
    for evaluations; a long list shortened to its first five and its last. Catches a last
    step listed twice, a step 0 where none is, and a list cut without its end."""
    from resd.training.plan import _steps_at

    assert _steps_at(3, 7, None) == "3, 6, 7"
    assert _steps_at(2, 6, 0) == "0, 2, 4, 6"
    assert _steps_at(0, 7, None) == "7" and _steps_at(0, 7, 0) == "0, 7"
    assert _steps_at(2, 20, 0) == "0, 2, 4, 6, 8, ..., 20"
    assert _steps_at(1, 6, None) == "1, 2, 3, 4, 5, 6"  # six fit whole


@pytest.mark.parametrize(
    ("argv", "option"),
    [(["train", "--config", ""], "--config"),
     (["compare", "--algorithms", "sdpo", "--out", ""], "--out"),
     (["compare", "--algorithms", "sdpo", "--out", "o", "--config", " "], "--config"),
     (["continual", "--config", ""], "--config"),
     (["merge", "a.json", "", "--out", "m"], "sources"),
     (["merge", "a.json", "--out", ""], "--out"),
     (["report", ""], "path"),
     (["report", "runs/x", "--out", ""], "--out")],
)  # fmt: skip
def test_an_empty_path_is_refused_before_anything_is_written(
    argv, option, tmp_path, monkeypatch, capsys
):
    """`Path("")` is the working directory: `resd compare --out ""` (an unset shell
    variable) trained its runs among the user's files, `resd report ""` reported on them,
    and `resd train --config ""` trained with the defaults."""
    import resd.analysis.compare

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resd.analysis.compare, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"argument {option}: must not be empty" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("words", "setting"),
    [(["--config", "{bad}"], "config"),
     (["chat_template={bad}"], "chat_template"),
     (["env=qa", "env_args.path={bad}"], "env_args.path"),
     (["env=ifeval", "env_args.path={bad}"], "env_args.path")],
)  # fmt: skip
def test_a_file_that_is_not_text_is_named_with_its_setting(
    words, setting, tiny_model_dir, tmp_path, capsys
):
    """A binary file (or text in another encoding) given for a config, a chat template or
    an environment's data raised Python's UnicodeDecodeError, printed as "'utf-8' codec
    can't decode byte 0x80 in position 1": no file, no setting."""
    bad = tmp_path / "data.json"
    bad.write_bytes(b"\x10\x80\xff not text")
    words = [w.format(bad=bad) for w in words]
    assert main(["train", "--dry-run", f"model={tiny_model_dir}", *words]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"resd: error: {setting}: {bad} is not UTF-8 text (byte 1 cannot be read: "
        "invalid start byte)\n"
    ), err
