"""`pip install resd` without extras: the optional packages (plots, trackers, grammar
engine, vLLM, DeepSpeed, GGUF, trl) are hidden from a fresh interpreter, which must still
import resd, train, evaluate and say clearly which extra a feature needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_trainer import config

OPTIONAL = [
    "matplotlib",
    "tensorboard",
    "wandb",
    "xgrammar",
    "vllm",
    "deepspeed",
    "trl",
    "gguf",
    "fastapi",
    "uvicorn",
    "sqlalchemy",
    "openai",
]

SCRIPT = textwrap.dedent(
    """
    import json, sys

    for name in {hidden}:  # `import name` now fails; importlib.util.find_spec(name) is None
        sys.modules[name] = None
    import resd
    from resd.config import build_config, read_yaml_mapping
    from resd.training.trainer import Trainer

    result = {{"version": resd.__version__}}
    cfg = build_config(read_yaml_mapping({config!r}))
    summary = Trainer(cfg).train()
    result["steps"] = summary["steps"]
    try:
        resd.models.materialize_bundled("smollm2-135m")
    except ModuleNotFoundError as exc:
        result["bundled_error"] = str(exc)
    from resd.cli import main
    result["report_exit"] = main(["report", cfg.output_dir])
    result["imported"] = sorted(m for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in {hidden})
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.slow
def test_core_install_trains_without_optional_packages(tiny_model_dir, tmp_path):
    cfg = config(
        tiny_model_dir, tmp_path / "run", "steps=1", "max_new_tokens=8", "structured_output=auto"
    )
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    script = SCRIPT.format(hidden=OPTIONAL, config=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent, env={**os.environ, "RESD_CACHE": str(tmp_path / "cache")})  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["steps"] == 1 and result["imported"] == []
    assert "pip install 'resd[demo]'" in result["bundled_error"]
    # plots need matplotlib: one clear error naming the extra, the run itself untouched
    assert result["report_exit"] == 2 and "resd[report]" in done.stderr
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def _module_names(body: list) -> set[str]:
    """Names a module's top level binds, through its `if` and `try` blocks."""
    import ast

    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.If):
            names |= _module_names(node.body) | _module_names(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                names |= _module_names(block)
    return names


def test_every_name_a_module_exports_is_defined_there() -> None:
    """`from resd.<module> import *` takes the names in `__all__`: one the module does not
    define (a function renamed, a name misspelt) makes the star import raise, and one
    listed twice is a slip. Read from the source, so modules of extras not installed
    here are checked too. Catches a name in `__all__` that no longer exists."""
    import ast

    checked = 0
    for path in sorted((Path(__file__).resolve().parents[1] / "src" / "resd").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        exported = [
            node.value
            for statement in tree.body
            if isinstance(statement, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in statement.targets)
            for node in ast.walk(statement.value)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
        if not exported:
            continue
        checked += 1
        missing = sorted(set(exported) - _module_names(tree.body))
        assert missing == [], f"{path.name}: __all__ names what it does not define: {missing}"
        assert len(exported) == len(set(exported)), f"{path.name}: a name listed twice in __all__"
    assert checked >= 20  # the walk found the package's modules
