#!/usr/bin/env bash
# Reproduce docs/results/miniimagenet from a fresh clone on a 2-core CPU: one pretraining of the
# Conv-4 (64 filters) shared by three ways of using it, each model within 2 hours of wall-clock on
# the whole machine, pretraining included:
#   (a) frozen backbone, FiLM on block 4, prefix cached once: a 1-shot and a 5-shot model;
#   (b) the whole backbone fine-tuned by episodes, with FiLM on block 4 (encoder + one inner step);
#   (c) the plain Prototypical Network, fine-tuned by episodes for the same wall-clock as (b).
# Each is then tested on the same 600 fixed test episodes (seed 1, 15 query images per class) of
# 5-way 1- and 5-shot, with running batch-norm statistics (non-transductive); one report pairs
# them on those episodes and compares them with the published numbers.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/miniimagenet_headline.sh [RUNS_DIR] [REPORT_DIR]
#
# Run it again after an interruption: finished stages are kept, an interrupted one resumes from
# its last checkpoint (pretraining included) and ends with the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/miniimagenet}
report=${2:-docs/results/miniimagenet}
mkdir -p "$runs"

resume_flag() { [ -f "$1/config.toml" ] && echo --resume || true; }

timed() {  # timed NAME COMMAND...: run it, log to $runs/NAME.log, print its wall-clock
    local started=$SECONDS
    "${@:2}" > "$runs/$1.log" 2>&1 || { echo "failed: see $runs/$1.log" >&2; exit 1; }
    echo "$1: $((SECONDS - started)) s of wall-clock"
}

if [ ! -f "$runs/pretrain/backbone.pt" ]; then
    timed pretrain metafilm pretrain configs/results/miniimagenet-pretrain.toml \
        --out "$runs/pretrain" $(resume_flag "$runs/pretrain")
fi
backbone=(--set "pretrain.backbone=$runs/pretrain/backbone.pt")

# (a) cheap: one process, the cached prefix makes each step a block-4 pass.
for shots in 1 5; do
    out="$runs/frozen-${shots}shot"
    timed "frozen-${shots}shot" metafilm train configs/results/miniimagenet-frozen.toml \
        --out "$out" "${backbone[@]}" --set "data.shots=$shots" $(resume_flag "$out")
done
# (b) and (c): two processes of one thread each, one task each per step.
for arm in film protonet; do
    out="$runs/$arm"
    timed "$arm" env OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone \
        --nproc_per_node=2 -m metafilm train "configs/results/miniimagenet-$arm.toml" \
        --out "$out" "${backbone[@]}" $(resume_flag "$out")
done

for arm in frozen-1shot frozen-5shot film protonet; do
    timed "evaluate-$arm" metafilm evaluate "$runs/$arm"
    tail -n 2 "$runs/evaluate-$arm.log"
done
metafilm report "$runs/protonet" "$runs/frozen-1shot" "$runs/frozen-5shot" "$runs/film" \
    --out "$report" --compare-published
