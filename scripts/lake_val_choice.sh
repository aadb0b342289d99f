#!/usr/bin/env bash
# Choose the model for Lake et al.'s one-shot challenge on val alone: score each trained run on
# the same 600 fixed within-alphabet 20-way 1-shot episodes (seed 1) of its held-out background
# alphabets (the validation alphabets of configs/results/omniglot-lake.toml; every Lake config
# holds out the same ones), with batch-norm running statistics, and print each run's paired
# difference from the first.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/lake_val_choice.sh RUN [RUN ...]
#
# The first run is the base of the comparison. Each run needs best.pt (it validated in training).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 BASE_RUN OTHER_RUN [...]" >&2; exit 2; }
read -r -a alphabets <<< "$(python -c 'from metafilm import load_config
print(*load_config("configs/results/omniglot-lake.toml").data.val_alphabets)')"

pids=()
for run in "$@"; do
    OMP_NUM_THREADS=1 metafilm evaluate "$run" --checkpoint best --split background \
        --alphabets "${alphabets[@]}" --within-alphabet --ways 20 --shots 1 --query 15 \
        --episodes 600 --seed 1 --bn-mode running > "$run.lake-val.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid" || { echo "failed: see RUN.lake-val.log" >&2; exit 1; }
done
for run in "$@"; do cat "$run.lake-val.log"; done

python - "$@" <<'PY'
import sys
from pathlib import Path

from metafilm.report import format_percent, paired_differences
from metafilm.rundir import read_run

base, *others = map(Path, sys.argv[1:])
for run in others:
    for label, summary in paired_differences(read_run(run), read_run(base)).items():
        if "within alphabet" in label:
            print(f"{run} minus {base}, {label}: {format_percent(summary['mean'], summary['ci95'])}")
PY
