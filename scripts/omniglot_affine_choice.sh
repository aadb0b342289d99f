#!/usr/bin/env bash
# Whether affine augmentation (data.augment_affine) should join the headline Omniglot settings,
# decided on val: the headline Prototypical Network (configs/results/omniglot-protonet.toml) with
# and without it, trained on the train split alone for half a headline run (2350 steps, the
# learning rate halved every 650 as in the full run's proportions), then scored on the same 600
# val episodes of 20-way 1-shot (seed 1, 15 query per class, running batch-norm statistics). The
# test split is not touched.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/omniglot_affine_choice.sh [RUNS_DIR] [REPORT_DIR]
#
# The two arms train at once, one thread each (about 30 minutes on a 2-core CPU, then 3 of
# evaluation); the numbers depend on the steps, not on how the machine is shared. The report
# (and its printout) gives the augmented arm minus the plain one on the same episodes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/omniglot-affine-choice}
report=${2:-docs/results/omniglot/affine-choice}
mkdir -p "$runs"

# arm NAME [--set ...]: train on train alone, then test the last checkpoint on val.
arm() {
    local name=$1
    shift
    local resume=()
    [ -f "$runs/$name/config.toml" ] && resume=(--resume)
    OMP_NUM_THREADS=1 metafilm train configs/results/omniglot-protonet.toml --out "$runs/$name" \
        --set data.train_split=train --set train.steps=2350 --set outer.lr_decay_every=650 \
        --set train.log_every=50 --set train.checkpoint_every=200 "$@" "${resume[@]}" \
        > "$runs/$name.train.log" 2>&1
    OMP_NUM_THREADS=1 metafilm evaluate "$runs/$name" --split val --ways 20 --shots 1 \
        > "$runs/$name.evaluate.log" 2>&1
}

arm plain &
plain=$!
arm affine --set data.augment_affine=true &
affine=$!
wait "$plain" && wait "$affine" || { echo "failed: see $runs/*.log" >&2; exit 1; }
cat "$runs"/*.evaluate.log
metafilm report "$runs/plain" "$runs/affine" --out "$report"
