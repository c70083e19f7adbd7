#!/usr/bin/env bash
# The experiments of issue 12 on the bundled Qwen2.5-Coder-0.5B, in the order they are run.
# Every step resumes: run the script again (in a later session too) and it skips what is
# finished and continues what was cut short. Niced, one job at a time (2 cores).
#
#   make setup-qwen && nohup bash benchmarks/experiments_qwen.sh > runs/experiments_qwen.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RESD=${RESD:-.venv/bin/resd}

headline() {  # $1: comma-separated seeds
  nice "$RESD" compare --config configs/headline_qwen.yaml --algorithms resd,sdpo,sdpo_ss,grpo \
    --seeds "$1" --algorithm-args grpo:rollouts_per_prompt=8 \
    --algorithm-args grpo:steps=6 --algorithm-args grpo:eval_every=1 \
    --out runs/headline_qwen
}

headline 0                                     # the headline, first seed of every method
nice "$PY" benchmarks/sd_sanity.py --algorithms sdpo --feedback plain   # the sanity check
nice "$PY" benchmarks/sd_sanity.py --algorithms sdpo --feedback quote
headline 0,1,2                                 # the other seeds
nice "$PY" benchmarks/sd_sanity.py --algorithms resd --feedback quote,plain
