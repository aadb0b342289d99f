#!/usr/bin/env bash
# The FiLM study (docs/results/film-study): one ablation sweep around configs/study/film-study.toml
# per setting, each arm changing one setting of the base arm, at the same number of steps. The
# base arm retrained with two other seeds shows how much an arm varies from run to run.
#   full:          20-way 1-shot, trained on all 33 alphabets of the Vinyals train split;
#   few-alphabets: the same, trained on 4 of them only (Latin, Greek, Cyrillic, Korean: 492
#                  classes with rotations), where overfitting can show.
# Both settings run side by side, one thread each, on a 2-core CPU; each writes its own sweep.md
# (val and test accuracy, train-val gap, deviation sizes per arm) and plot.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/film_study.sh [RUNS_DIR] [REPORT_DIR]
#
# Run it again after an interruption: finished arms are kept, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/film-study}
report=${2:-docs/results/film-study}
config=configs/study/film-study.toml
grid=(
    --grid "outer.film_l2=0,1e-4,1e-3,1e-2,1e-1"
    --grid "model.encoder=linear,mlp,none"
    --grid "adapt.inner_steps=0,1,3"
    --grid "adapt.inner_lr=0.1,1.0,10"
    --grid 'model.film_sites=["block1"],["block4"],all'
    --grid "model.backbone_mode=outer,frozen"
    --grid "model.bn_mode=episode,running"
    --grid "train.seed=0,1,2"
)
mkdir -p "$runs"
OMP_NUM_THREADS=1 metafilm sweep "$config" --one-at-a-time "${grid[@]}" \
    --out "$runs/full" > "$runs/full.log" 2>&1 &
full=$!
OMP_NUM_THREADS=1 metafilm sweep "$config" --one-at-a-time "${grid[@]}" \
    --set 'data.train_alphabets=["Latin","Greek","Cyrillic","Korean"]' \
    --out "$runs/few-alphabets" > "$runs/few-alphabets.log" 2>&1 &
few=$!
wait "$full" || { echo "failed: see $runs/full.log" >&2; exit 1; }
wait "$few" || { echo "failed: see $runs/few-alphabets.log" >&2; exit 1; }

# The comparisons and reports go to REPORT_DIR; the checkpoints stay in RUNS_DIR.
for setting in full few-alphabets; do
    mkdir -p "$report/$setting"
    cp -r "$runs/$setting"/{sweep.md,sweep.json,sweep_accuracy.png,report} "$report/$setting/"
done
echo "study written to $report/full/sweep.md and $report/few-alphabets/sweep.md"
