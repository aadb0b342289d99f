#!/usr/bin/env bash
# The FiLM study on miniImageNet (docs/results/miniimagenet-study): which claims of the seed's,
# TADAM's and CAVIA's hold where task adaptation can matter. Conv-4 (64) from one shared
# pretraining, trained 5-way 1-shot, every arm tested at 1 and 5 shots on the same 600 val and 600
# test episodes, so that each arm is compared with another on the very same episodes.
#
#   frozen:  configs/study/miniimagenet-study.toml, one setting changed per arm: the base
#            reseeded twice (run-to-run noise), the metric scale, the task encoder, the inner
#            steps and their order, the FiLM L2 over three orders of magnitude, FiLM at block 3.
#            The backbone is frozen and FiLM acts on its last blocks, so blocks 1-2 (or 1-3) run
#            once per image (cached prefix): an arm costs minutes.
#   linear:  the same with the CAVIA-style linear head, inner steps 0, 1, 5, at CAVIA's inner lr
#            of 1.0 (a shared linear head learns nothing about a task's labels unless the inner
#            step moves FiLM far enough: at the base's 0.1 it stayed at chance for 100 steps).
#   outer:   configs/study/miniimagenet-study-outer.toml, the whole backbone fine-tuned by
#            episodes: task encoder on/off x TADAM's auxiliary co-training off/on x FiLM on block 4
#            or on all four blocks (a full grid).
# Two lanes run side by side, one thread each (frozen | linear, then outer). The shared
# pretraining runs first if its backbone is missing. Then scripts/miniimagenet_study_report.py
# writes the claim-by-claim report.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/miniimagenet_study.sh [RUNS_DIR] [REPORT_DIR]
#
# Run it again after an interruption: finished arms are kept, an interrupted one resumes (the
# pretraining too). RUNS_DIR defaults to docs/results/miniimagenet-study/runs, which keeps in
# version control what the report reads (every arm's config, metrics and per-episode evaluation
# records) and no checkpoint: an arm found there finished and evaluated is reported from its
# records by the sweep, so the study continues across machines. A new machine first repeats the
# pretraining, which is deterministic (its run config and metrics are kept to check it: best val
# 38.33% at step 4200).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-docs/results/miniimagenet-study/runs}
report=${2:-docs/results/miniimagenet-study}
pretrain=$runs/pretrain
mkdir -p "$runs"

if [ ! -f "$pretrain/backbone.pt" ]; then
    resume=()
    [ -f "$pretrain/config.toml" ] && resume=(--resume)
    metafilm pretrain configs/results/miniimagenet-pretrain.toml --out "$pretrain" "${resume[@]}"
fi
backbone=(--set "pretrain.backbone=$pretrain/backbone.pt")

frozen=(
    --grid "train.seed=1,2"
    --grid "model.learn_metric_scale=false"
    --grid "model.encoder=none,mlp"
    --grid "adapt.inner_steps=0,5"
    --grid "adapt.first_order=true"
    --grid "outer.film_l2=0,1e-4,1e-2,1e-1"
    --grid 'model.film_sites=["block3"]'
)
outer=(
    --grid "model.encoder=linear,none"
    --grid "outer.aux_weight=0,1.0"
    --grid 'model.film_sites=["block4"],all'
)
(
    OMP_NUM_THREADS=1 metafilm sweep configs/study/miniimagenet-study.toml --one-at-a-time \
        "${backbone[@]}" "${frozen[@]}" --out "$runs/frozen" > "$runs/frozen.log" 2>&1
) &
lane1=$!
(
    OMP_NUM_THREADS=1 metafilm sweep configs/study/miniimagenet-study.toml --one-at-a-time \
        "${backbone[@]}" --set model.head=linear --set adapt.inner_lr=1.0 \
        --grid "adapt.inner_steps=0,5" --out "$runs/linear" > "$runs/linear.log" 2>&1
    OMP_NUM_THREADS=1 metafilm sweep configs/study/miniimagenet-study-outer.toml \
        "${backbone[@]}" "${outer[@]}" \
        --out "$runs/outer" > "$runs/outer.log" 2>&1
) &
lane2=$!
wait "$lane1" || { echo "failed: see $runs/frozen.log" >&2; exit 1; }
wait "$lane2" || { echo "failed: see $runs/linear.log and $runs/outer.log" >&2; exit 1; }

python scripts/miniimagenet_study_report.py "$runs" "$report"
