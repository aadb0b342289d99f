#!/usr/bin/env bash
# The FiLM study's inner-step question with more support signal (docs/results/film-study): at
# 1-shot a prototype head's support loss is near zero, since each support image is its own
# prototype, so the inner loop had nothing to fit. Here the same base arm
# (configs/study/film-study.toml, all 33 train alphabets) trains and is tested 20-way 5-shot,
# and each arm changes one setting of it:
#   adapt.inner_steps=0   amortised only (the task encoder's prediction, no inner step)
#   adapt.inner_steps=3   three inner steps instead of one
#   model.encoder=none    gradient only (deviations start at identity, one inner step)
#   train.seed=1          the base retrained, for the run-to-run spread
# Every arm is scored on the same 600 val and 600 test episodes of 20-way 5-shot and compared
# with the base on them (paired).
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/film_study_5shot.sh [RUNS_DIR] [REPORT_DIR]
#
# One sweep on the whole 2-core CPU (two threads); run it again after an interruption: finished
# arms are kept, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/film-study}
report=${2:-docs/results/film-study}
mkdir -p "$runs"
OMP_NUM_THREADS=2 metafilm sweep configs/study/film-study.toml --one-at-a-time \
    --set data.shots=5 --set 'eval.shots=[5]' \
    --grid "adapt.inner_steps=0,1,3" --grid "model.encoder=linear,none" \
    --grid "train.seed=0,1" --out "$runs/5shot" > "$runs/5shot.log" 2>&1 ||
    { echo "failed: see $runs/5shot.log" >&2; exit 1; }

mkdir -p "$report/5shot"
cp -r "$runs/5shot"/{sweep.md,sweep.json,sweep_accuracy.png,report} "$report/5shot/"
echo "study written to $report/5shot/sweep.md"
