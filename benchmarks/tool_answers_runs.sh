#!/usr/bin/env bash
# Every run of the tool-answers probe (benchmarks/tool_answers.py, docs/results.md section 4)
# after its first session, as units run one at a time, niced (2 cores), each leaving its
# small outputs in docs/results/tool_answers/, which is committed:
#
#   bash benchmarks/tool_answers_runs.sh list          # every unit, done or not
#   nohup bash benchmarks/tool_answers_runs.sh next 3 >> runs/tool_answers/units.log 2>&1 &
#   bash benchmarks/tool_answers_runs.sh train:resd-no-attempt:0    # or units by name
#
# While units run, change this file only by writing a new one and renaming it over this
# one: bash reads a script as it goes, so an edit in place reaches the running loop.
#
# Units, in the order they were decided (thirty-fifth session, before any of them ran):
#   train:ARM:SEED   12 steps of configs/tool_answers_qwen.yaml with the arm's settings and
#                    the training seed SEED (the conversations stay env seed 0's).
#                    Arms: sdpo and resd (the first session's runs, seed 0 done there),
#                    resd-no-attempt (the teacher's template without the previous attempt,
#                    configs/templates/teacher_without_attempt.txt: in section 1 that slot
#                    was what kept RESD from learning).
#   long:RUN         the final model of a run (or `base`), evaluated again greedy on the same
#                    24 test conversations with replies up to 128 tokens instead of 48: are
#                    the facts in SDPO's explanations, only cut off?
# Added after resd-no-attempt's seed 0 had run (5/24 answered, against SDPO's 1/24): a third
# seed of the two arms that moved (train:sdpo:2, train:resd-no-attempt:2), so that the
# difference, if it holds, rests on three. Every final model of seeds 1 and 2 also gets
# its long evaluation (added once seed 0's had shown what the 48-token cap hid).
# Added in the thirty-sixth session, before either ran: which of RESD-without-the-attempt's
# two extra slots does the work? Its teacher saw, beside SDPO's feedback, a reflection and,
# for 13-37 of 96 prompts, a remembered successful attempt (7-16 of them failed rollouts'
# prompts, counted later: the 13-37 included the successes' own). Two arms, seed 0 each, take one
# away: resd-no-attempt-no-success (configs/templates/teacher_without_attempt_or_success.txt)
# and resd-no-attempt-no-reflection (teacher_without_attempt_or_reflection.txt; reflections
# are still written, for the curator). One seed each: they can show a slot that matters
# a lot, not decide a small difference.
# Added at the end of the thirty-sixth session, once both had run (without the successful
# attempt it learned, without the reflection it did not, one seed each): seeds 1 and 2 of
# both arms, so that the difference, if it holds, rests on three.
set -euo pipefail
cd "$(dirname "$0")/.."
RESD=${RESD:-$PWD/.venv/bin/resd}
RUNS=runs/tool_answers
SAVE=docs/results/tool_answers
export PYTHONPATH=$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}

UNITS=(
  train:resd-no-attempt:0
  long:base long:sdpo long:resd long:resd-no-attempt
  train:sdpo:1 train:resd-no-attempt:1 train:resd:1
  long:sdpo-seed1 long:resd-no-attempt-seed1 long:resd-seed1
  train:sdpo:2 train:resd-no-attempt:2
  long:sdpo-seed2 long:resd-no-attempt-seed2
  train:resd-no-attempt-no-success:0 long:resd-no-attempt-no-success
  train:resd-no-attempt-no-reflection:0 long:resd-no-attempt-no-reflection
  train:resd-no-attempt-no-reflection:1 long:resd-no-attempt-no-reflection-seed1
  train:resd-no-attempt-no-success:1 long:resd-no-attempt-no-success-seed1
  train:resd-no-attempt-no-reflection:2 long:resd-no-attempt-no-reflection-seed2
  train:resd-no-attempt-no-success:2 long:resd-no-attempt-no-success-seed2
)

name() {  # a training unit's run folder: seed 0 keeps the first session's names
  local arm=$1 seed=$2
  if [[ $seed == 0 ]]; then echo "$arm"; else echo "$arm-seed$seed"; fi
}

done_file() {
  case $1 in
    train:*) IFS=: read -r _ arm seed <<<"$1"; echo "$SAVE/$(name "$arm" "$seed")/eval-step-000012.jsonl" ;;
    long:*) echo "$SAVE/long/${1#long:}.json" ;;
  esac
}

save() {  # a finished run's small outputs, into the committed folder
  local dir=$1 f
  mkdir -p "$SAVE/$dir"
  for f in "$RUNS/$dir"/{config.yaml,eval.jsonl,metrics.jsonl,samples.jsonl,playbook.md,playbook_history.jsonl} \
           "$RUNS/$dir"/eval-step-*.jsonl; do
    if [[ -f $f ]]; then cp "$f" "$SAVE/$dir/"; fi
  done
}

run_unit() {
  local unit=$1
  case $unit in
    train:*)
      IFS=: read -r _ arm seed <<<"$unit"
      local dir algo extra=()
      dir=$(name "$arm" "$seed")
      case $arm in
        sdpo) algo=sdpo ;;
        resd) algo=resd ;;
        resd-no-attempt) algo=resd; extra=(teacher_template=configs/templates/teacher_without_attempt.txt) ;;
        resd-no-attempt-no-success) algo=resd; extra=(teacher_template=configs/templates/teacher_without_attempt_or_success.txt) ;;
        resd-no-attempt-no-reflection) algo=resd; extra=(teacher_template=configs/templates/teacher_without_attempt_or_reflection.txt) ;;
        *) echo "unknown arm: $arm" >&2; return 2 ;;
      esac
      rm -rf "${RUNS:?}/$dir"
      nice -n 5 "$RESD" train --config configs/tool_answers_qwen.yaml algorithm=$algo seed="$seed" \
        "${extra[@]}" output_dir="$RUNS/$dir" > "$RUNS/$dir.log" 2>&1
      save "$dir"
      ;;
    long:*)
      local run=${unit#long:} model
      if [[ $run == base ]]; then model=qwen2.5-coder-0.5b; else model=$RUNS/$run; fi
      if [[ $run != base && ! -f $model/adapter_model.safetensors ]]; then
        echo "$unit: no final model in $model (train it first)" >&2; return 2
      fi
      mkdir -p "$SAVE/long"
      nice -n 5 "$RESD" eval --model "$model" --env tool_answers:ToolAnswersEnv --samples 1 \
        --temperature 0 --max-new-tokens 128 --batch-size 8 --seed 0 \
        --out "$SAVE/long/$run.json" seed=0 n_train=48 n_test=24
      ;;
    *) echo "unknown unit: $unit (see: $0 list)" >&2; return 2 ;;
  esac
}

case ${1:-list} in
  list)
    for unit in "${UNITS[@]}"; do
      if [[ -f $(done_file "$unit") ]]; then echo "done  $unit"; else echo "todo  $unit"; fi
    done
    ;;
  next)
    left=${2:-1}
    for unit in "${UNITS[@]}"; do
      [[ $left -gt 0 ]] || break
      [[ -f $(done_file "$unit") ]] && continue
      echo "== $(date -u +%FT%TZ) $unit"
      run_unit "$unit"
      left=$((left - 1))
    done
    ;;
  save) save "$2" ;;  # a run started by hand with a unit's command
  *)
    for unit in "$@"; do echo "== $(date -u +%FT%TZ) $unit"; run_unit "$unit"; done ;;
esac
