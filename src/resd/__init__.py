"""resd: Reflection-Enhanced Self-Distillation, for models that meet rare success and rich feedback.

    from resd import Trainer, TrainConfig
    trainer = Trainer(TrainConfig(model="Qwen/Qwen3-0.6B", env="arithmetic", steps=40))
    trainer.train()

Names are imported on first use, so `import resd` stays light (no torch) for tools that
only read runs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Trainer": "resd.training.trainer",
    "TrainConfig": "resd.config",
    "load_config": "resd.config",
    "Callback": "resd.training.callbacks",
    "EarlyStopping": "resd.training.callbacks",
    "Environment": "resd.envs.base",
    "Item": "resd.envs.base",
    "Score": "resd.envs.base",
    "DatasetEnv": "resd.envs.dataset",
    "Interrupted": "resd.training.trainer",
    "checkpoint_on_signals": "resd.training.interrupts",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


__version__ = _version()
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'resd' has no attribute {name!r}")
