"""Ending a run early: `Trainer.stop` from a callback, and the `EarlyStopping` callback
(`early_stopping` in a config), on the tiny model."""

from __future__ import annotations

import json

import pytest

from resd.config import ConfigError, load_config
from resd.training.callbacks import Callback, EarlyStopping
from resd.training.trainer import Trainer
from test_trainer import config, read_jsonl


class StopAt(Callback):
    """Asks to stop once the run has taken `step` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics):
        if metrics["step"] == self.step:
            trainer.stop(f"asked at step {self.step}")


def test_a_stopped_run_ends_as_a_finished_one_does_and_resumes(tiny_model_dir, tmp_path):
    """`Trainer.stop` in a step's callback ends a 6-step run after that step: with the
    checkpoint, the final evaluation, the saved model and a summary that says why, as at
    the end of the stream; `--resume` then runs the remaining steps. Catches the stop
    ignored, the run left without a checkpoint at its last step (resume would redo steps)
    or without its final evaluation, and the summary silent about it."""
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, "steps=6", "save_every=4")
    summary = Trainer(cfg, callbacks=[StopAt(3)]).train()
    assert summary["steps"] == 3 and summary["stopped_early"] == "asked at step 3"
    assert json.loads((out / "summary.json").read_text())["stopped_early"] == "asked at step 3"
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [0, 3]
    assert (out / "checkpoint-3").is_dir() and (out / "model.safetensors").is_file()
    assert summary["eval_after"] == read_jsonl(out / "eval.jsonl")[-1]
    resumed = Trainer(cfg, resume=True).train()
    assert resumed["steps"] == 6 and resumed["stopped_early"] is None
    assert [row["step"] for row in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_early_stopping_counts_evaluations_without_a_gain(tiny_model_dir, tmp_path):
    """transformers' rule on hand-made evaluation rows: a gain counts only above
    `min_delta`; `patience` rows in a row without one stop the run; `target` stops it at
    once. The count lives in the trainer's checkpointed state, so a resumed run goes on
    from it. Catches an off-by-one in the count, a gain of min_delta or less taken as
    one, the count not reset by a real gain, and `target` needing a strict excess."""
    trainer = Trainer(config(tiny_model_dir, tmp_path / "run", "eval_every=1"))
    stopper = EarlyStopping(metric="case_mean@k", patience=2, min_delta=0.25)
    # best 0.5; 0.75 is a gain of min_delta exactly: none; 0.875 is one; then two without
    values = [0.5, 0.75, 0.875, 0.875, 1.0]
    for step, value in enumerate(values):
        assert trainer.stop_reason is None, step
        stopper.on_evaluate(trainer, {"step": step, "case_mean@k": value})
        stopper.on_evaluate(trainer, None)  # another rank's call: it has no row, and no say
    assert trainer.stop_reason == ("case_mean@k has not improved on 0.875 for 2 evaluations "
                                   "(step 4)")  # fmt: skip
    assert trainer.extra_state["early_stopping"] == {"best": 0.875, "waited": 2}
    trainer.save()
    resumed = Trainer(config(tiny_model_dir, tmp_path / "run", "eval_every=1"), resume=True)
    assert resumed.extra_state["early_stopping"] == {"best": 0.875, "waited": 2}

    trainer.stop_reason = None
    target = EarlyStopping(metric="task_best@k", patience=None, target=0.75)
    target.on_evaluate(trainer, {"step": 5, "task_best@k": 0.7})
    assert trainer.stop_reason is None
    target.on_evaluate(trainer, {"step": 6, "task_best@k": 0.75})
    assert trainer.stop_reason == "task_best@k reached 0.75 (target 0.75) at step 6"

    trainer.stop_reason, trainer.extra_state = None, {}  # one evaluation: no plural
    for step in (7, 8):
        EarlyStopping(patience=1).on_evaluate(trainer, {"step": step, "case_mean@k": 0.5})
    assert trainer.stop_reason == "case_mean@k has not improved on 0.5 for 1 evaluation (step 8)"


def test_early_stopping_from_the_config_can_end_a_run_at_its_first_evaluation(
    tiny_model_dir, tmp_path
):
    """A config's `early_stopping` adds the callback: with a target the base model already
    meets, the run ends at the evaluation before training, without a step, and still
    leaves its model and summary. Catches the config key not reaching the trainer, and a
    stop asked before the first step being ignored until after it."""
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, out, "eval_every=2",
                 "early_stopping={target: 0.0, patience: null}")  # fmt: skip
    summary = Trainer(cfg).train()
    assert summary["steps"] == 0 and summary["stopped_early"].startswith("case_mean@k reached")
    assert not (out / "metrics.jsonl").exists() or read_jsonl(out / "metrics.jsonl") == []
    assert [row["step"] for row in read_jsonl(out / "eval.jsonl")] == [0]
    assert (out / "model.safetensors").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("{patience: 2}", "needs eval_every > 0"),
        ("{metric: accuracy}", "metric: 'accuracy' is not an evaluation metric"),
        ("{patience: 0}", "patience: a number of evaluations >= 1"),
        ("{patience: 1.5}", "patience: a number of evaluations >= 1"),
        ("{min_delta: -0.1}", "min_delta: must be >= 0"),
        ("{target: high}", "target: a number"),
        ("{patience: null}", "nothing would ever stop the run"),
        ("{patiense: 2}", "unknown key 'patiense'"),
        ("{metric: rewards/}", "metric: 'rewards/' is not an evaluation metric"),
    ],
)
def test_bad_early_stopping_settings_are_refused_when_the_config_is_read(settings, message):
    """Each mistake is named when the config is read, not at the first evaluation hours in."""
    overrides = [f"early_stopping={settings}"]
    if "eval_every" not in message:
        overrides.append("eval_every=1")
    with pytest.raises(ConfigError, match=rf"^early_stopping: .*{message}"):
        load_config(None, overrides)


def test_early_stopping_watches_one_reward_function_and_names_a_missing_one(
    tiny_model_dir, tmp_path
):
    """With a list of reward functions an evaluation has each one's mean as
    `rewards/<name>`, and `early_stopping.metric` may be one of them: their names are
    known only once a reply is scored, so the config accepts any, and an evaluation that
    lacks it stops the run with the metrics it has. Catches the prefix refused when the
    config is read, another metric watched in its place, and a bare KeyError."""
    assert load_config(None, ["eval_every=1", "early_stopping={metric: rewards/fmt}"])
    trainer = Trainer(config(tiny_model_dir, tmp_path / "run", "eval_every=1"))
    stopper = EarlyStopping(metric="rewards/fmt", patience=1)
    row = {"step": 0, "case_mean@k": 0.5, "rewards/fmt": 0.25, "rewards/len": 1.0, "k": 2.0}
    stopper.on_evaluate(trainer, row)
    stopper.on_evaluate(trainer, {**row, "step": 1, "case_mean@k": 0.9, "rewards/fmt": 0.25})
    assert trainer.stop_reason == "rewards/fmt has not improved on 0.25 for 1 evaluation (step 1)"
    with pytest.raises(
        ValueError,
        match=r"^early_stopping.metric: the evaluation has no metric "
        r"'rewards/fnt' \(it has case_mean@k, rewards/fmt, rewards/len\)$",
    ):
        EarlyStopping(metric="rewards/fnt").on_evaluate(trainer, row)


def test_a_trainer_refuses_a_config_or_callbacks_of_the_wrong_kind_before_any_load(tmp_path):
    """`Trainer({"model": ...})` or `Trainer("cfg.yaml")` failed with "'dict' object has no
    attribute 'early_stopping'"; `callbacks=MyCallback` (the class), a lone callback or an
    object without the hooks (another library's callback) failed at the first hook, after
    the model had loaded. Each is now a TypeError saying what to pass, before anything
    loads (the model named here does not exist). So is an environment's name passed as
    `env=`, where an Environment object goes."""
    from resd import Callback, Trainer
    from resd.config import TrainConfig

    for given, kind in (({"model": "x"}, "dict"), ("cfg.yaml", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"^Trainer: cfg must be a resd\.TrainConfig, got "
                                            rf"{kind} \(from a YAML file: resd\.load_config"):  # fmt: skip
            Trainer(given)
    cfg = TrainConfig(model=str(tmp_path / "no-such-model"), output_dir=str(tmp_path / "run"))

    class Printer(Callback):
        def on_step_end(self, trainer, metrics):
            print(metrics)

    class TheirCallback:  # another library's: other hook names
        def on_log(self, args, state, control, logs=None):
            pass

    for callbacks, said in (
        (Printer, r"a list of resd\.Callback objects, got Printer \(pass \[Printer\(\)\]"),
        (Printer(), r"a list of resd\.Callback objects, got Printer"),
        ([Printer], r"item 0 is the class Printer, not an object of it: pass Printer\(\)"),
        ([Printer(), TheirCallback()], r"item 1 \(TheirCallback\) has no on_train_begin\(\); "
                                       r"subclass resd\.Callback"),
    ):  # fmt: skip
        with pytest.raises(TypeError, match=rf"^callbacks: {said}"):
            Trainer(cfg, callbacks=callbacks)
    with pytest.raises(TypeError, match=r"^env: expected an Environment or a datasets\.Dataset, "
                                        r"got the string 'arithmetic'; an environment by name "
                                        r"goes in the config: TrainConfig\(env='arithmetic', "):  # fmt: skip
        Trainer(cfg, env="arithmetic")
    with pytest.raises(ValueError, match=r"^model: no such folder"):  # a list of them is fine
        Trainer(cfg, callbacks=(Printer(), Callback()))
    assert not (tmp_path / "run").exists()
