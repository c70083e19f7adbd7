"""Tracker: TensorBoard event files, the numeric filter, wandb's offline default, config."""

from __future__ import annotations

import sys

import pytest

from resd.config import ConfigError, load_config
from resd.training.tracking import Tracker, numeric_items, wandb_mode


def read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_numeric_items_keeps_numbers_only():
    row = {"loss": 0.5, "steps": 3, "ok": True, "note": "x", "none": None, "list": [1],
           "nan": float("nan"), "nested": {"a": 1, "b": "no"}}  # fmt: skip
    assert dict(numeric_items(row, "train")) == {
        "train/loss": 0.5, "train/steps": 3.0, "train/ok": 1.0, "train/nested/a": 1.0,
    }  # fmt: skip
    assert dict(numeric_items({"x": 1})) == {"x": 1.0}


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


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Tracker(tmp_path, ["wandb"], {"lr": 1e-6}) as tracker:
        tracker.log({"loss": 0.5}, 1, prefix="train")
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
