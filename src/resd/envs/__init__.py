"""Built-in environments and the loader for user environments (`module.path:ClassName`)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from resd.config import did_you_mean
from resd.envs.base import Environment, Item, Score

# Built-ins are imported lazily so that `import resd` stays cheap and one broken
# optional dependency cannot take the others down.
BUILTIN_ENVS: dict[str, str] = {
    "arithmetic": "resd.envs.arithmetic:ArithmeticEnv",
    "manufactoria": "resd.envs.manufactoria:ManufactoriaEnv",
    "ifeval": "resd.envs.ifeval:IFEvalEnv",
    "code": "resd.envs.code:CodeEnv",
    "qa": "resd.envs.qa:QAEnv",
    "house_rules": "resd.envs.house_rules:HouseRulesEnv",
    "dataset": "resd.envs.dataset:DatasetEnv",
}


def resolve_env_class(spec: str) -> type[Environment]:
    """Turn a built-in name or an import path `pkg.module:Class` into a class."""
    target = BUILTIN_ENVS.get(spec, spec)
    if ":" not in target:
        known = ", ".join(sorted(BUILTIN_ENVS))
        raise ValueError(f"env: unknown environment {spec!r}{did_you_mean(spec, BUILTIN_ENVS)}; "
                         f"use one of {known} or 'module:Class'")  # fmt: skip
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"env: cannot import module {module_name!r} for {spec!r}: {exc}") from exc
    try:
        cls = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"env: module {module_name!r} has no attribute {attr!r}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise ValueError(f"env: {spec!r} is not a subclass of resd.envs.Environment")
    return cls


def make_env(spec: str, env_args: dict[str, Any] | None = None) -> Environment:
    cls = resolve_env_class(spec)
    _check_arguments(spec, cls, env_args or {})
    try:
        return cls(**(env_args or {}))
    except TypeError as exc:
        raise ValueError(f"env_args: {exc}") from exc
    except ValueError:
        raise  # ours, and a user's checks: they already say what is wrong
    except Exception as exc:  # a user's constructor failing: one line that names it
        raise ValueError(f"env: {spec} could not be built: {type(exc).__name__}: {exc}") from exc


def _check_arguments(spec: str, cls: type, env_args: dict[str, Any]) -> None:
    """An argument the environment's constructor does not take, named with the ones it
    does: Python's own TypeError names neither the closest nor the rest."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: the constructor will say
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [name for name, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # fmt: skip
    for name in env_args:
        if name not in takes:
            raise ValueError(f"env_args: {spec} takes no argument {name!r}"
                             f"{did_you_mean(name, takes)} (its arguments: "
                             f"{', '.join(takes) or 'none'})")  # fmt: skip


__all__ = ["BUILTIN_ENVS", "Environment", "Item", "Score", "make_env", "resolve_env_class"]
