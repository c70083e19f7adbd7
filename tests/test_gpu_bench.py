"""The GPU benchmark script runs end to end on the CPU in its smoke mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_gpu_bench_smoke_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_bench.json"
    assert module.main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert result["device"] == "cpu" and row["model"] == "tiny"
    for key in (
        "gen_tok_s_b2",
        "gen_tok_s_b4",
        "teacher_tok_s",
        "time_update",
        "time_step",
        "train_tflops",
    ):
        assert row[key] > 0, key
    assert row["time_step"] >= row["time_update"] + row["time_teacher"]
