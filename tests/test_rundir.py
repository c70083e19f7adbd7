"""The run folder's files (`resd.rundir`): JSON-lines logs read while a run writes them or
after it was killed, cut back when it resumes, the samples a run drew, and output paths
checked before a command computes what it would write there."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from resd import rundir
from resd.rundir import (
    append_jsonl,
    check_out_file,
    cumulative_samples,
    read_jsonl,
    samples_per_step,
    truncate_jsonl,
)


def test_a_log_reads_back_what_was_appended_and_skips_what_a_kill_cut(tmp_path: Path, caplog):
    """Rows come back in order; a blank line, a half-written last line and a line that is
    JSON but no row are skipped, the broken one with a warning that names its line; bytes
    that are not UTF-8 do not fail the reader. Catches a reader that stops at the first bad
    line or returns non-dict values as rows."""
    log = tmp_path / "runs" / "new" / "metrics.jsonl"
    assert read_jsonl(log) == []
    append_jsonl(log, {"step": 1, "loss": 0.5})  # creates the folders
    append_jsonl(log, {"step": 2, "note": "naïve"})
    with log.open("ab") as f:
        f.write(b'\n[1, 2]\n7\n{"step": 3, "note": "\xff"}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="resd.rundir"):
        rows = read_jsonl(log)
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 2, "note": "naïve"},
                    {"step": 3, "note": "\ufffd"}]  # fmt: skip
    assert f"{log}:7: not valid JSON" in caplog.text
    assert len(caplog.records) == 1  # the blank line is no warning
    assert log.read_text(errors="replace").splitlines()[:2] == [
        json.dumps({"step": 1, "loss": 0.5}),
        json.dumps({"step": 2, "note": "naïve"}),
    ]


def test_truncating_a_log_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path):
    """A resume from step 2 redoes steps 3 and on: their rows go, rows of steps up to 2
    (and rows without a step, counted as step 0) stay in order, a line cut by the kill goes,
    and every kept row ends its line, so the resumed run appends whole lines after it;
    -1 drops every row. Catches an off-by-one at the checkpoint's step."""
    log = tmp_path / "eval.jsonl"
    truncate_jsonl(log, 2)  # no log yet: nothing to do, nothing created
    assert not log.exists()
    rows = [{"step": 0, "acc": 0.1}, {"step": 1}, {"step": 2, "acc": 0.3}, {"note": "x"},
            {"step": 3}, {"step": 2, "late": True}]  # fmt: skip
    for row in rows:
        append_jsonl(log, row)
    with log.open("a") as f:
        f.write('{"step": 2, "cut')
    truncate_jsonl(log, 2)
    assert read_jsonl(log) == [rows[0], rows[1], rows[2], rows[3], rows[5]]
    assert log.read_text().endswith("}\n")
    append_jsonl(log, {"step": 3})
    assert read_jsonl(log)[-1] == {"step": 3}
    truncate_jsonl(log, 0)
    assert read_jsonl(log) == [rows[0], rows[3]]
    truncate_jsonl(log, -1)
    assert log.read_text() == ""
    assert [p.name for p in tmp_path.iterdir()] == ["eval.jsonl"]  # no temporary left


def test_truncating_keeps_a_line_of_another_shape_as_found(tmp_path: Path):
    """A line that is JSON but no row (`[1, 2]`, `7`: an edit, another tool's append) made
    every resume fail with "'list' object has no attribute 'get'" (`fuzz_combinations.py
    corrupt`). Readers skip it; truncating keeps it where it was, and drops our rows."""
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n[1, 2]\n7\n{"step": 3}\n')
    truncate_jsonl(log, 2)
    assert log.read_text() == '{"step": 1}\n[1, 2]\n7\n'
    assert read_jsonl(log) == [{"step": 1}]


def test_truncating_a_log_with_bytes_that_are_not_text_drops_them(tmp_path: Path):
    """A log overwritten with bytes that are not UTF-8 (a damaged disk, a binary copied
    over it) failed every resume with "'utf-8' codec can't decode byte 0xa3", naming no
    file (`fuzz_combinations.py serve`, a learning server's eval.jsonl). They are no row:
    dropped, as a line cut by a kill is, and the rows around them kept."""
    log = tmp_path / "eval.jsonl"
    log.write_bytes(b'{"step": 0}\n\xa3\x80\xff garbage\n{"step": 1}\n{"step": 5}\n')
    truncate_jsonl(log, 2)
    assert log.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_a_kill_while_truncating_leaves_the_log_whole(tmp_path: Path, monkeypatch):
    """The cut log is written beside the old one and then renamed over it: a resume killed
    halfway through writing loses no row. Catches a log rewritten in place."""
    log = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        append_jsonl(log, {"step": step})
    before = log.read_text()
    write_text = Path.write_text

    def killed_midway(self: Path, data: str, *args, **kwargs) -> int:
        write_text(self, data[:5], *args, **kwargs)
        raise KeyboardInterrupt  # the kill

    monkeypatch.setattr(Path, "write_text", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        truncate_jsonl(log, 1)
    assert log.read_text() == before


def test_samples_per_step_is_batch_times_rollouts(tmp_path: Path):
    """The config's counts, or the trainer's defaults (8 prompts, 1 rollout) where a key is
    missing or null."""
    assert samples_per_step({"batch_size": 4, "rollouts_per_prompt": 8}) == 32
    assert samples_per_step({"batch_size": 3}) == 3
    assert samples_per_step({"rollouts_per_prompt": 4, "batch_size": None}) == 32


def test_samples_drawn_follow_the_steps_in_order():
    """Rows are summed in step order whatever order they come in; a float count (a
    tracker's export) counts as its value, a count that is no number as the config's."""
    metrics = [{"step": 3, "rollouts": 5.0}, {"step": 1}, {"step": 2, "rollouts": "n/a"}]
    config = {"batch_size": 2, "rollouts_per_prompt": 3}
    assert cumulative_samples(metrics, config) == {0: 0, 1: 6, 2: 12, 3: 17}
    assert cumulative_samples([], config) == {0: 0}


def test_an_output_file_is_checked_before_anything_is_computed(tmp_path: Path):
    """A path in folders still to be made is fine (nothing is created); a directory, a path
    under a file, a folder that may not be written in, or a file that may not be
    overwritten is refused with the caller's name first."""
    check_out_file(tmp_path / "a" / "b" / "eval.json", "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f.json").write_text("{}")
    check_out_file(tmp_path / "f.json", "out")  # an existing file is overwritten
    with pytest.raises(ValueError, match=r"^out: .* is a directory"):
        check_out_file(tmp_path, "out")
    under_file = re.escape(f"{tmp_path / 'f.json'} is not a directory")
    with pytest.raises(ValueError, match=rf"^report: cannot write .*: {under_file}"):
        check_out_file(tmp_path / "f.json" / "sub" / "r.html", "report")


def test_an_output_file_where_writing_is_denied_is_refused(tmp_path: Path, monkeypatch):
    """Permissions as `os.access` reports them (faked here: tests may run as root, whom
    nothing is denied): the nearest existing folder needs write and search rights, an
    existing file write rights."""
    locked, readonly = tmp_path / "locked", tmp_path / "readonly.json"
    locked.mkdir()
    readonly.write_text("{}")
    denied = {(locked, os.W_OK | os.X_OK), (readonly, os.W_OK)}
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: (Path(path), mode) not in denied)
    with pytest.raises(ValueError, match=re.escape(f"out: cannot write in {locked} (permission")):
        check_out_file(locked / "new" / "eval.json", "out")
    with pytest.raises(ValueError, match=re.escape(f"out: cannot overwrite {readonly} (perm")):
        check_out_file(readonly, "out")
    check_out_file(tmp_path / "other.json", "out")


# ---- one writer per folder ------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from resd.rundir import hold_folder
assert hold_folder(Path(sys.argv[1]), "output_dir") is not None
print("held", flush=True)
time.sleep(600)
"""


def hold_elsewhere(folder: Path):
    """A second process that holds `folder` until it is killed."""
    import subprocess
    import sys

    src = str(Path(rundir.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=env,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_folder_another_process_writes_is_refused_until_that_process_ends(tmp_path: Path):
    """Two processes wrote one run folder and nothing said so. Catches a lock that is not
    taken, one that a killed holder leaves behind (a lock file would), and one that this
    process's second holder (a Trainer built again to resume) is refused by: within a
    process the folder is held until its last holder lets go."""
    folder = tmp_path / "run"
    folder.mkdir()
    other = hold_elsewhere(folder)
    try:
        with pytest.raises(FileExistsError, match=re.escape(
            f"output_dir: another process is writing to {folder} (a run, `resd compare`, "
            "`resd continual` or `resd serve --learn` still going); wait for it to end, or choose "
            "another output_dir")):  # fmt: skip
            rundir.hold_folder(folder, "output_dir")
    finally:
        other.kill()  # SIGKILL: the kernel lets go of its lock
        other.wait()
    first = rundir.hold_folder(folder, "output_dir")
    second = rundir.hold_folder(folder, "output_dir")  # this process again: shared
    assert first is not None and second is not None
    first()
    first()  # letting go twice counts once
    with pytest.raises(FileExistsError):  # `second` still holds it for this process
        _held_by_child(folder)
    second()
    assert _held_by_child(folder) is None
    assert rundir.hold_folder(tmp_path / "missing", "output_dir") is None  # nothing to hold
    assert sorted(p.name for p in folder.iterdir()) == []  # no lock file


def _held_by_child(folder: Path) -> None:
    """Whether a new process can take `folder`: None if it could, else its refusal raised."""
    import subprocess
    import sys

    src = str(Path(rundir.__file__).resolve().parents[1])
    code = ("import sys; from pathlib import Path; from resd.rundir import hold_folder\n"
            "try:\n    hold_folder(Path(sys.argv[1]), 'output_dir')\n"
            "except FileExistsError:\n    sys.exit(3)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(folder)], env=env, check=False)
    if done.returncode == 3:
        raise FileExistsError(folder)
    assert done.returncode == 0
