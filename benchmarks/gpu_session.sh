#!/usr/bin/env bash
# Every GPU figure docs/benchmarks.md is missing, in one run of under 5 minutes, for a
# session lent a GPU (15 minutes of device time in all: run this once, then give it back).
#
#   bash benchmarks/gpu_session.sh          # writes JSON + text under $OUT (or benchmarks/results/gpu)
#
# Needs only torch (CUDA), transformers and the resd sources (PYTHONPATH=src); each part
# has its own time limit so one slow part cannot eat the others' time. The table of
# timings is printed last.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" >> "$OUT/parts.txt"
}

part gpu_bench 170 python benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json"
part loss_memory 50 python benchmarks/loss_memory.py --device cuda --batch 32 --seq 1024 --out "$OUT/loss_memory.json"
part generation_cache 70 python benchmarks/generation_cache.py --device cuda --new-tokens 256 --out "$OUT/generation_cache.json"

for name in gpu_bench loss_memory generation_cache; do
    echo "== $name"; tail -n 25 "$OUT/$name.txt"
done
echo "== parts"; cat "$OUT/parts.txt"
