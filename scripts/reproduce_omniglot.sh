#!/usr/bin/env bash
# Reproduce docs/results/omniglot from a fresh clone: the FiLM model and, with the same budget,
# the Prototypical Network that metafilm contains as a special case (no FiLM prediction, no inner
# loop). Both train side by side, one thread each, on a 2-core CPU; each is then tested on the
# same 600 fixed test episodes (seed 1, 15 query per class) of 5/20-way 1/5-shot, and one report
# compares them with the published numbers.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/reproduce_omniglot.sh [RUNS_DIR] [REPORT_DIR]
#
# Run it again after an interruption: finished runs are kept, an interrupted one resumes from
# its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/omniglot}
report=${2:-docs/results/omniglot}
arms=(film protonet)
mkdir -p "$runs"

# Start one background command per arm, one thread each; fail if any of them fails.
each_arm() {
    local pids=() arm
    for arm in "${arms[@]}"; do
        OMP_NUM_THREADS=1 "$@" "$arm" > "$runs/$arm.$1.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || { echo "failed: see $runs/*.$1.log" >&2; exit 1; }
    done
}

train() {
    local resume=()
    [ -f "$runs/$1/config.toml" ] && resume=(--resume)
    metafilm train "configs/results/omniglot-$1.toml" --out "$runs/$1" "${resume[@]}"
}

evaluate() {
    metafilm evaluate "$runs/$1"
}

started=$SECONDS
each_arm train
echo "trained in $((SECONDS - started)) s of wall-clock (both models side by side)"
each_arm evaluate
for arm in "${arms[@]}"; do cat "$runs/$arm.evaluate.log"; done
metafilm report "$runs/film" "$runs/protonet" --out "$report" --compare-published
