#!/usr/bin/env bash
# Reproduce docs/results/omniglot from a fresh clone: the FiLM model and, with the same budget,
# the Prototypical Network that metafilm contains as a special case (no FiLM prediction, no inner
# loop). Each model has the whole 2-core CPU for its 30 minutes: it trains as two processes
# (torchrun, one thread each), and the models train one after the other. Both keep batch-norm
# running statistics, so each is then tested twice on the same 600 fixed test episodes (seed 1,
# 15 query per class) of 5/20-way 1/5-shot: with running statistics (non-transductive) and with
# the test episode's statistics (transductive). One report compares them with the published
# numbers.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/reproduce_omniglot.sh [RUNS_DIR] [REPORT_DIR]
#
# Run it again after an interruption: finished runs are kept, an interrupted run resumes from its
# last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/omniglot}
report=${2:-docs/results/omniglot}
arms=(film protonet)
mkdir -p "$runs"

train() {
    local resume=()
    [ -f "$runs/$1/config.toml" ] && resume=(--resume)
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        -m metafilm train "configs/results/omniglot-$1.toml" --out "$runs/$1" "${resume[@]}"
}

# Evaluate both models side by side, one thread each, with the batch norm of $1.
evaluate() {
    local pids=() arm
    for arm in "${arms[@]}"; do
        OMP_NUM_THREADS=1 metafilm evaluate "$runs/$arm" --bn-mode "$1" \
            > "$runs/$arm.evaluate-$1.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || { echo "failed: see $runs/*.evaluate-$1.log" >&2; exit 1; }
    done
    for arm in "${arms[@]}"; do cat "$runs/$arm.evaluate-$1.log"; done
}

for arm in "${arms[@]}"; do
    started=$SECONDS
    train "$arm" > "$runs/$arm.train.log" 2>&1 || { echo "failed: see $runs/$arm.train.log" >&2; exit 1; }
    echo "$arm: trained in $((SECONDS - started)) s of wall-clock"
done
evaluate running
evaluate episode
metafilm report "$runs/film" "$runs/protonet" --out "$report" --compare-published
