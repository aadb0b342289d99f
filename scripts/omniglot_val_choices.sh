#!/usr/bin/env bash
# The validation round that chose the headline Omniglot settings (docs/results/omniglot/README.md):
# four short arms at equal time, each 1/6 of a headline model's 30 minutes as measured with two
# processes (steps set from each arm's speed), scored on the same 600 val episodes of 20-way
# 1-shot (seed 1, 15 query per class, episode batch norm), and compared with the 20-way
# Prototypical Network episode by episode. The test split is not touched.
#
#   - protonet-20way:    Prototypical Network, 20-way 1-shot training, meta-batch 4
#   - protonet-60way:    the same, 60-way, meta-batch 2
#   - film-20way-inner1: FiLM (linear encoder), one second-order inner step, 20-way, meta-batch 4
#   - film-20way-inner0: the same without the inner step (amortised only)
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/omniglot_val_choices.sh [RUNS_DIR] [REPORT_DIR]
#
# The arms train all at once, one thread each (about 20 minutes on a 2-core CPU, then 10 of
# evaluation); the numbers depend on the steps, not on how the machine is shared.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/omniglot-val-choices}
report=${2:-docs/results/omniglot/val-choices}
mkdir -p "$runs"

# arm NAME CONFIG STEPS [--set ...]: train at 1/4-spaced halvings of the lr, then test on val.
arm() {
    local name=$1 config=$2 steps=$3
    shift 3
    OMP_NUM_THREADS=1 metafilm train "configs/results/omniglot-$config.toml" --out "$runs/$name" \
        --force --set model.bn_mode=episode --set train.val_every=0 --set train.log_every=50 \
        --set train.checkpoint_every=200 --set train.steps="$steps" \
        --set outer.lr_decay_every=$((steps / 4)) "$@" > "$runs/$name.train.log" 2>&1
    OMP_NUM_THREADS=1 metafilm evaluate "$runs/$name" --split val --ways 20 --shots 1 \
        > "$runs/$name.evaluate.log" 2>&1
}

twenty=(--set data.ways=20 --set outer.meta_batch_size=4)
arm protonet-20way protonet 1430 "${twenty[@]}" &
arm protonet-60way protonet 850 --set data.ways=60 --set outer.meta_batch_size=2 &
arm film-20way-inner1 film 880 "${twenty[@]}" --set adapt.inner_steps=1 &
arm film-20way-inner0 film 1320 "${twenty[@]}" --set adapt.inner_steps=0 &
wait
cat "$runs"/*.evaluate.log

names=(protonet-20way protonet-60way film-20way-inner1 film-20way-inner0)
# The report (and its printout) gives each arm minus protonet-20way on the same episodes.
metafilm report "${names[@]/#/$runs/}" --out "$report"
