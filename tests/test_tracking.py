"""Tracker: TensorBoard event files, the numeric filter, wandb's offline default, config."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from resd.config import ConfigError, load_config
from resd.training.tracking import Tracker, numeric_items, wandb_api_key_configured, wandb_mode


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(log_dir) -> dict[str, list[tuple[int, str]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]
    }


def wandb_records(run_dir) -> list:
    """The records of the one offline run under `run_dir`: W&B's transaction log is a
    7-byte header, then LevelDB-style blocks of 32 KiB holding records that each carry a
    7-byte header (crc, length, type; 1 full, 2 first, 3 middle, 4 last part)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, part, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the padding at a block's end
            pos += left
            continue
        part, pos = part + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(part))
            part = b""
    return records


def test_numeric_items_keeps_numbers_only():
    row = {"loss": 0.5, "steps": 3, "ok": True, "note": "x", "none": None, "list": [1],
           "nan": float("nan"), "nested": {"a": 1, "b": "no"}}  # fmt: skip
    assert dict(numeric_items(row, "train")) == {
        "train/loss": 0.5, "train/steps": 3.0, "train/ok": 1.0, "train/nested/a": 1.0,
    }  # fmt: skip
    assert dict(numeric_items({"x": 1})) == {"x": 1.0}


def test_numeric_items_are_floats_so_a_flag_plots_as_0_or_1():
    """Every value is a float: a flag reaches both back ends as 0/1, not as wandb's JSON
    true/false (the values were once passed on as given without a test failing)."""
    values = list(numeric_items({"finished": True, "items": 3, "nested": {"ok": False}}))
    assert [(tag, type(value), value) for tag, value in values] == [
        ("finished", float, 1.0), ("items", float, 3.0), ("nested/ok", float, 0.0),
    ]  # fmt: skip


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    config = {"lr": 1e-6, "env_args": {"n": 2}}
    with Tracker(tmp_path, ["tensorboard"], config) as tracker:
        for step in (1, 2):
            tracker.log(
                {"step": step, "loss": 1.0 / step, "feedback": "text"}, step, prefix="train"
            )
        tracker.log({"step": 2, "case_mean@k": 0.25}, 2, prefix="eval")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 0.5)]
    assert scalars["eval/case_mean@k"] == [(2, 0.25)]
    assert "train/step" not in scalars and "train/feedback" not in scalars
    tracker.close()  # closing twice is harmless


def test_tensorboard_resume_hides_the_steps_that_are_redone(tmp_path):
    pytest.importorskip("tensorboard")
    with Tracker(tmp_path, ["tensorboard"], {}) as tracker:
        for step in (1, 2, 3):
            tracker.log({"loss": float(step)}, step, prefix="train")
    # killed after step 3, resumed from the checkpoint of step 1: steps 2, 3 are redone
    with Tracker(tmp_path, ["tensorboard"], {}, resume_step=1) as tracker:
        for step in (2, 3):
            tracker.log({"loss": 10.0 * step}, step, prefix="train")
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_tensorboard_shows_the_config_once_as_a_code_block(tmp_path):
    """The text tab: the config as indented JSON in a Markdown code block (a Path shown as
    its string, not a TypeError), written at step 0 by the first run and not again by a
    resumed one."""
    pytest.importorskip("tensorboard")
    config = {"lr": 1e-6, "output_dir": Path("runs/x"), "env_args": {"n": 2}}
    with Tracker(tmp_path, ["tensorboard"], config):
        pass
    with Tracker(tmp_path, ["tensorboard"], {"lr": 2.0}, resume_step=1):
        pass
    shown = {"lr": 1e-6, "output_dir": "runs/x", "env_args": {"n": 2}}
    text = "```\n" + json.dumps(shown, indent=1) + "\n```"
    assert read_texts(tmp_path / "tensorboard") == {"config/text_summary": [(0, text)]}


def test_no_trackers_touch_no_files(tmp_path):
    tracker = Tracker(tmp_path / "run", [], {"lr": 1})
    tracker.log({"loss": 1.0}, 1)
    tracker.close()
    assert not (tmp_path / "run").exists() and not tracker.enabled


def test_unknown_tracker_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="report_to"):
        Tracker(tmp_path, ["mlflow"], {})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install resd\[logging\]"):
        Tracker(tmp_path, ["tensorboard"], {})


def test_wandb_mode_defaults_to_offline_without_a_key(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "absent")}
    assert wandb_mode(no_netrc) == "offline"
    assert wandb_mode({**no_netrc, "WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode({**no_netrc, "WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password k\n")
    netrc.chmod(0o600)
    assert wandb_mode({"NETRC": str(netrc)}) == "online"


def test_wandb_mode_is_offline_when_the_netrc_cannot_be_read(tmp_path, monkeypatch):
    """A malformed netrc, or a NETRC that names a folder, is no API key: offline, no crash.
    Without NETRC the key is looked for in ~/.netrc; without an argument the process
    environment is read."""
    bad = tmp_path / "netrc"
    bad.write_text("garbage\n")
    assert wandb_api_key_configured({"NETRC": str(bad)}) is False
    assert wandb_mode({"NETRC": str(bad)}) == "offline"
    assert wandb_api_key_configured({"NETRC": str(tmp_path)}) is False
    assert wandb_mode({"NETRC": str(tmp_path)}) == "offline"
    # where `wandb login` stores the key: ~/.netrc, when NETRC is not set
    home = tmp_path / "home"
    home.mkdir()
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    assert wandb_api_key_configured({}) is True
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_api_key_configured() is True and wandb_mode() == "online"


def test_wandb_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    with Tracker(tmp_path, ["wandb"], {"lr": 1e-6}) as tracker:
        tracker.log({"loss": 0.5}, 1, prefix="train")
        assert wandb.run.project == "resd"  # the default project
    assert (tmp_path / "wandb").is_dir() and (tmp_path / "wandb-id.txt").exists()


def test_report_to_config_field():
    assert load_config(None, []).report_to == []
    assert load_config(None, ["report_to=tensorboard"]).report_to == ["tensorboard"]
    assert load_config(None, ["report_to=[wandb, tensorboard]"]).report_to == [
        "wandb",
        "tensorboard",
    ]
    assert load_config(None, ["report_to=tensorboard,wandb"]).report_to == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"^report_to: unknown tracker 'mlflow'"):
        load_config(None, ["report_to=mlflow"])
    with pytest.raises(ConfigError, match=r"^report_to:"):
        load_config(None, ["report_to=3"])


def test_wandb_run_is_named_and_resumed_by_its_run_directory(tmp_path, monkeypatch, caplog):
    """No WANDB_MODE and no API key: the run is logged offline (and says so) instead of
    asking for a login; it carries the run directory's name, its stable id, the config and
    the project from WANDB_PROJECT; a row's numbers arrive with the step as
    `trainer/step`; a resumed run continues the same wandb run, another run directory
    starts another."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    caplog.set_level(logging.INFO, logger="resd.training.tracking")
    run_dir, config = tmp_path / "runs" / "run-7", {"lr": 1e-6, "env_args": {"n": 2}}
    with Tracker(run_dir, ["wandb"], config) as tracker:
        run = wandb.run
        run_id = (run_dir / "wandb-id.txt").read_text()
        assert (run.id, run.name, run.project, run.offline) == (run_id, "run-7", "my-project", True)
        assert dict(run.config) == config and run.settings.resume is None
        assert Path(run.dir).is_relative_to(run_dir / "wandb")
        tracker.log({"step": 3, "loss": 0.5, "nested": {"a": 2}, "note": "x"}, 3, "train")
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        assert summary == {"train/loss": 0.5, "train/nested/a": 2, "trainer/step": 3}
    assert wandb.run is None  # finished on exit
    tracker.close()  # closing twice is harmless
    assert "no API key configured, logging offline" in caplog.text
    # the charts' x axis is trainer/step for every metric, in the log that `wandb sync` uploads
    wandb.teardown()  # the log is written in the background: wait for it
    metrics = {(r.metric.name or r.metric.glob_name, r.metric.step_metric)
               for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "metric"}  # fmt: skip
    assert metrics == {("trainer/step", ""), ("*", "trainer/step")}
    caplog.clear()
    monkeypatch.setenv("WANDB_MODE", "offline")  # asked for: not worth a message
    (run_dir / "wandb-id.txt").write_text(run_id + "\n")  # as an editor saves it
    with Tracker(run_dir, ["wandb"], config, resume_step=3):
        assert (wandb.run.id, wandb.run.settings.resume) == (run_id, "allow")
    assert "no API key" not in caplog.text
    with Tracker(tmp_path / "runs" / "run-8", ["wandb"], config):
        assert wandb.run.id != run_id  # another run directory, another wandb run
