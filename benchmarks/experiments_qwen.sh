#!/usr/bin/env bash
# The experiments of issues 10 and 12 on the bundled Qwen2.5-Coder-0.5B, as units that each
# finish within a session and leave committable results. Niced, one unit at a time (2 cores).
#
#   make setup-qwen
#   bash benchmarks/experiments_qwen.sh list                      # every unit, done or not
#   nohup bash benchmarks/experiments_qwen.sh next 3 >> runs/experiments_qwen.log 2>&1 &
#   bash benchmarks/experiments_qwen.sh run:headline:sdpo:1       # or units by name
#
# Why units. A session's run directories do not survive it (the fourth session of
# 2026-12-02 found runs/ empty on a new machine), so a run cut by the end of a session is
# lost, and so is every final model not yet evaluated. Each unit therefore trains one
# thing from scratch to its end, runs the IFEval forgetting check of its final model at
# once, and copies its small outputs (comparison.json, metrics, evaluations, playbook,
# benchmark JSON) into docs/results/grid/ and benchmarks/results/, which are committed.
# A unit is done when its outputs are there; `next N` runs the first N units not done, in
# the order below. A training run saves its figures as soon as it finishes, before its
# forgetting check (about an hour more), so a session that ends during the check loses
# only the check: `list` shows such a unit as "trained", and running it again runs the
# check alone while the run's folder is still in runs/ (or trains again if it is not).
# Seeds of one method that ran in different sessions are pooled with `resd merge` (each
# unit's comparison.json holds that unit's run only).
#
# Two exceptions to the forgetting check, decided on 2026-12-03 (twelfth session) before
# any manufactoria unit ran and after GRPO's seeds 1-2 had trained:
# - A run that never updated its model (every LoRA B matrix of its final adapter exactly
#   0, so the adapter adds exactly nothing) *is* the base model; its check would measure
#   base.json again. Its done file records that check instead of a second hour of IFEval.
#   GRPO, which updates only on a success, never had one on house rules. Likewise a final
#   adapter byte for byte equal to one already checked (SDPO+ss with no success computes
#   SDPO exactly) takes that check: seed 1 measured both, with identical figures.
# - The manufactoria arm is the headline's short second task (does any method get off
#   zero?); the forgetting table is house rules'. Its units end with their figures saved.
#
# One code version for the whole grid. Every run of it used code that behaves as commit
# 576d0d4; later changes of behaviour (lessons sized whole, feedback that no longer
# quotes the answer by default) must not enter it. So every unit runs from a worktree
# pinned there (../grid, made here if missing), with this checkout's virtualenv, writing
# into this checkout's runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GRID_COMMIT=576d0d4
GRID=${GRID:-$(dirname "$ROOT")/grid}
PY=${PY:-$ROOT/.venv/bin/python}
RESD=${RESD:-$ROOT/.venv/bin/resd}
SAVE=$ROOT/docs/results/grid          # committed outputs of finished units
BENCH=$ROOT/benchmarks/results

# The order of the remaining work (issue 10 first, as the brief orders the issues). Names:
#   base_ifeval                       the base model's IFEval score (the forgetting baseline)
#   lessons:MODEL:ENV:MODE            a lesson-quality cell (benchmarks/lesson_quality.py)
#   sanity:ALGO:FEEDBACK              a self-distillation sanity cell (benchmarks/sd_sanity.py)
#   run:ARM:ALGO:SEED                 one training run of an arm, then its forgetting check
# Arms: headline (configs/headline_qwen.yaml, house rules), no_attempt (the template
# without the previous attempt, added 2026-12-02 before any run of it), min_ops (the
# curator commits to one operation per reply, added after 12 steps of resd-seed0), and
# manufactoria (configs/headline_qwen_manufactoria.yaml, the short run).
UNITS=(
  base_ifeval
  lessons:qwen2.5-coder-0.5b:manufactoria:off
  lessons:qwen2.5-coder-0.5b:arithmetic:on lessons:qwen2.5-coder-0.5b:arithmetic:off
  lessons:smollm2-135m:arithmetic:on
  lessons:smollm2-135m:manufactoria:on lessons:smollm2-135m:manufactoria:off
  run:headline:resd:1 run:headline:sdpo:1 run:headline:sdpo_ss:1 run:headline:grpo:1
  run:headline:resd:2 run:headline:sdpo:2 run:headline:sdpo_ss:2 run:headline:grpo:2
  run:no_attempt:resd:1 run:no_attempt:resd:2
  run:manufactoria:resd:0 run:manufactoria:sdpo:0 run:manufactoria:sdpo_ss:0 run:manufactoria:grpo:0
  run:min_ops:resd:0 run:min_ops:resd:1 run:min_ops:resd:2
  sanity:sdpo:quote sanity:resd:quote
  # the seed-0 models of 2026-12-02 were lost before their forgetting check; retrained here
  run:headline:resd:0 run:headline:sdpo:0 run:headline:sdpo_ss:0 run:headline:grpo:0
  run:no_attempt:resd:0
  lessons:qwen2.5-coder-0.5b:manufactoria:one lessons:qwen2.5-coder-0.5b:arithmetic:one
  # a fourth seed of the two methods that differ (seventeenth session, queued before any
  # of it ran): with no success SDPO+ss computes SDPO and GRPO never updates (seeds 0-2)
  run:headline:resd:3 run:headline:sdpo:3
  run:headline:resd:4 run:headline:sdpo:4  # a fifth, queued after the fourth had finished
  run:headline:resd:5 run:headline:sdpo:5  # a sixth (eighteenth session), queued before it ran
)
# Finished before units existed, in the first three sessions of 2026-12-02 (their figures
# are in docs/results.md and benchmarks/results/): the headline's seed 0 of all four
# methods and no_attempt's seed 0 (comparison.json in docs/results/headline_qwen*/), the
# sanity cells sdpo:plain, resd:plain and resd:plain without the attempt, sdpo:quote's
# steps 1-30, and the lesson cells smollm2-135m:arithmetic:off and
# qwen2.5-coder-0.5b:manufactoria:on.

IFEVAL=(--config configs/paper/ifeval_forgetting.yaml --samples 1 --max-new-tokens 256
        --max-prompt-tokens 1024 --batch-size 8 --dtype float32)
# CPU budget, the same for every model; float32 because bfloat16 matmuls run at half speed
# on this CPU (no avx512_bf16): a first base run in bfloat16 was stopped after 23 min.

# Precision. The pinned code samples and autocasts in bf16, which an AVX2-only CPU runs
# 6-7x slower than fp32 when prefilling (benchmarks/cpu_precision.py). On such a machine
# every unit runs with these overrides: numerics change, the method does not. Seeds
# pooled across machines then differ in these two keys: `resd merge --ignore-keys
# autocast,generation_dtype`, said so beside the figures.
PRECISION=()
if ! "$PY" -c "import sys, torch; sys.exit(not torch.ops.mkldnn._is_mkldnn_bf16_supported())"; then
  PRECISION=(autocast=none generation_dtype=float32)
fi

setup_grid() {
  [ -d "$GRID" ] || git worktree add --detach "$GRID" "$GRID_COMMIT"
  mkdir -p runs "$GRID/configs/templates" "$SAVE" "$BENCH/forgetting_qwen"
  [ -e "$GRID/runs" ] || ln -s "$ROOT/runs" "$GRID/runs"
  cp configs/templates/teacher_without_attempt.txt "$GRID/configs/templates/"  # data, not code
  export PYTHONPATH=$GRID/src
}

outputs() {  # the file that marks a unit done
  IFS=: read -r kind a b c <<< "$1"
  case $kind:$a in
    base_ifeval:*) echo "$BENCH/forgetting_qwen/base.json" ;;
    lessons:*) echo "$BENCH/lesson_quality_${a}_${b}_${c}.json" ;;
    sanity:*) echo "$BENCH/sd_sanity_${a}_${b}.json" ;;
    run:manufactoria) echo "$SAVE/$a/$b-seed$c/comparison.json" ;;  # no forgetting check
    run:*) echo "$BENCH/forgetting_qwen/$a-$b-seed$c.json" ;;  # after the training's figures
    *) echo "unknown unit $1 (see: $0 list)" >&2; return 2 ;;
  esac
}

saved_dir() {  # where a run unit's training figures are committed (run:ARM:ALGO:SEED)
  local a b c
  IFS=: read -r _ a b c <<< "$1"
  echo "$SAVE/$a/$b-seed$c"
}

arm_args() {  # $1 arm, $2 algorithm: options first, then key=value overrides (argparse wants them last)
  case $1 in
    headline|no_attempt|min_ops) echo --config configs/headline_qwen.yaml ;;
    manufactoria) echo --config configs/headline_qwen_manufactoria.yaml ;;
    *) echo "unknown arm $1" >&2; return 2 ;;
  esac
  if [ "$2" = grpo ]; then  # N = 8; the same samples drawn as the N = 1 methods, evaluated as often
    local steps=6; [ "$1" = manufactoria ] && steps=1
    echo --algorithm-args grpo:rollouts_per_prompt=8 --algorithm-args grpo:steps=$steps \
      --algorithm-args grpo:eval_every=1
  fi
  case $1 in
    no_attempt) echo teacher_template=configs/templates/teacher_without_attempt.txt ;;
    min_ops) echo curation_min_operations=1 ;;
  esac
}

unchanged_or_ifeval() {  # $1 a finished run, $2 its done file: its weights' forgetting check
  if "$PY" - "$1" "$2" "$BENCH/forgetting_qwen" <<'PYTHON'
import glob, hashlib, json, os, sys
from safetensors.torch import load_file
run, out, checks = sys.argv[1:]
adapter = f"{run}/adapter_model.safetensors"
if not os.path.exists(adapter):
    sys.exit(1)  # not a LoRA run: IFEval checks its weights
lora_b = [t for k, t in load_file(adapter).items() if "lora_B" in k]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


if lora_b and not any(bool(t.any()) for t in lora_b):
    record = {"unchanged_from_base": True, "same_as": "base.json",
              "checked": f"all {len(lora_b)} lora_B tensors of adapter_model.safetensors are "
                         "exactly 0, so the adapter adds exactly nothing and the final model "
                         "is the base model"}
else:  # the same weights as a model already checked (SDPO+ss with no success is SDPO)
    mine = digest(adapter)
    for other in sorted(glob.glob("runs/grid/*/*/*/adapter_model.safetensors")):
        arm, unit = other.split("/")[2:4]
        measured = f"{checks}/{arm}-{unit}.json"
        if (other != adapter and os.path.exists(measured)
                and "same_as" not in json.load(open(measured))
                and digest(other) == mine):
            record = {"same_as": os.path.basename(measured),
                      "checked": f"adapter_model.safetensors is byte for byte {other} (sha256 "
                                 f"{mine}), whose check this is; the check is a "
                                 "function of the weights (SDPO and SDPO+ss seed 1: identical "
                                 "adapters, each checked, identical figures)"}
            break
    else:
        sys.exit(1)  # new weights: measure them
json.dump({"model": run, **record}, open(out, "w"), indent=1)
PYTHON
  then echo "[grid] $1: weights already checked, see $2"
  else nice "$RESD" eval "${IFEVAL[@]}" --model "$1" --out "$2"
  fi
}

run_unit() {
  local unit=$1 done_file kind a b c
  done_file=$(outputs "$unit")
  if [ -f "$done_file" ]; then echo "[grid] $unit: done"; return 0; fi
  echo "### $(date -u '+%F %T') $unit (code $GRID_COMMIT)"
  IFS=: read -r kind a b c <<< "$unit"
  (
    cd "$GRID"
    case $kind in
      base_ifeval)
        nice "$RESD" eval "${IFEVAL[@]}" --model qwen2.5-coder-0.5b --out "$done_file" ;;
      lessons)  # the pinned script takes no overrides: they go into its base settings
        nice "$PY" - --models "$a" --envs "$b" --modes "$c" --no-grammar-cost --json "$done_file" \
          "${PRECISION[@]}" <<'PYTHON'
import sys
sys.path.insert(0, "benchmarks")
import lesson_quality
args = [a for a in sys.argv[1:] if "=" not in a or a.startswith("--")]
lesson_quality.BASE.update(dict(a.split("=", 1) for a in sys.argv[1:] if a not in args))
sys.exit(lesson_quality.main(args))
PYTHON
        ;;
      sanity)
        nice "$PY" benchmarks/sd_sanity.py --algorithms "$a" --feedback "$b" --json "$done_file" \
          "${PRECISION[@]}" ;;
      run)
        local out="runs/grid/$a/$b-seed$c" save
        save=$(saved_dir "$unit")
        # shellcheck disable=SC2046  # arm_args is a word list by design
        nice "$RESD" compare --algorithms "$b" --seeds "$c" --out "$out" $(arm_args "$a" "$b") \
          "${PRECISION[@]}"
        local run="$out/$b-seed$c"
        [ -f "$run/summary.json" ] || { echo "[grid] $unit did not finish" >&2; exit 1; }
        # the training's figures first: they do not wait for the check. A unit run again
        # for its check alone finds the run finished and `resd compare` skips it; its new
        # comparison.json records a skip (no time, no return code): the saved one stays.
        if [ ! -f "$save/comparison.json" ] || ! grep -q '"skipped": true' "$out/comparison.json"; then
          mkdir -p "$save"
          for f in metrics.jsonl eval.jsonl summary.json playbook.json compare-config.yaml; do
            [ -f "$run/$f" ] && cp "$run/$f" "$save/"
          done
          cp "$out/comparison.json" "$save/comparison.json"  # marks manufactoria's units done
        fi
        [ "$a" = manufactoria ] || unchanged_or_ifeval "$run" "$done_file" ;;
    esac
  )
}

setup_grid
case ${1:-list} in
  list)
    for u in "${UNITS[@]}"; do
      state=-
      [[ $u == run:* ]] && [ -f "$(saved_dir "$u")/comparison.json" ] && state=trained
      [ -f "$(outputs "$u")" ] && state=done
      printf '%-45s %s\n' "$u" "$state"
    done ;;
  next)
    n=${2:-1}
    for u in "${UNITS[@]}"; do
      [ "$n" -gt 0 ] || break
      [ -f "$(outputs "$u")" ] && continue
      run_unit "$u"; n=$((n - 1))
    done ;;
  *) for u in "$@"; do run_unit "$u"; done ;;
esac
