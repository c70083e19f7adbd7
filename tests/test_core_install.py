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
