#!/usr/bin/env bash
# The GPU figures docs/benchmarks.md is still missing, in one run of under 10 minutes, for a
# session lent a GPU (15 minutes of device time in all: run this once, then give it back).
#
#   bash benchmarks/gpu_session.sh          # writes JSON + text under $OUT (or benchmarks/results/gpu)
#
# Prepare what it carries with benchmarks/gpu_prepare.sh, which gives the device call too.
# Needs torch (CUDA), transformers, peft and the resd sources (PYTHONPATH=src); the
# end-to-end step also needs xgrammar (the grammar of reflections) and a real tokenizer
# folder, $GPU_TOKENIZER (default .gpu_carry/qwen-tokenizer: Qwen2.5's tokenizer files,
# which Qwen3 shares). Each part has its own time limit so one slow part cannot eat the
# others' time; the parts run in the order of what is missing (docs/benchmarks.md, "GPU
# benchmark"): the static cache + compile figures (their warm-up outlasted 70 s and 85 s
# in the eighteenth session), the step assembled from parts, then the trainer's own step
# again after the tag-list fix (`--repeats 1`). The loss-memory part ran to its end then
# and is last. At most six files come back (the lent machine returns eight):
# session.txt (device, each part's exit code and seconds), log.txt (every part's output)
# and one JSON per part.
set -u
OUT=${OUT:-benchmarks/results/gpu}
GPU_TOKENIZER=${GPU_TOKENIZER:-.gpu_carry/qwen-tokenizer}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the lent machine has python3 only
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/session.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/session.txt"

part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "===== $name: $*" >> "$OUT/log.txt"
    timeout "$limit" "$@" > "$OUT/$name.part" 2>&1
    local rc=$?
    cat "$OUT/$name.part" >> "$OUT/log.txt"
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/session.txt"
}

part generation_cache 220 "$PY" benchmarks/generation_cache.py --device cuda --new-tokens 128 --repeats 1 --out "$OUT/generation_cache.json"
part gpu_bench 150 "$PY" benchmarks/gpu_bench.py --models qwen3-0.6b,smollm2-135m --out "$OUT/gpu_bench.json"
part gpu_step 170 "$PY" benchmarks/gpu_step.py --tokenizer "$GPU_TOKENIZER" --repeats 1 --out "$OUT/gpu_step.json"
part loss_memory 30 "$PY" benchmarks/loss_memory.py --device cuda --batch 32 --seq 1024 --variants full,fused,chunked --out "$OUT/loss_memory.json"

for name in generation_cache gpu_bench gpu_step loss_memory; do
    echo "== $name"; grep -v "Writing model shards" "$OUT/$name.part" | tail -n 25
    rm -f "$OUT/$name.part"
done
echo "== parts"; cat "$OUT/session.txt"
