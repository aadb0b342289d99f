#!/usr/bin/env bash
# The README's "your own images" path, run on folders built from the real Omniglot data
# (scripts/example_folders.py): train from a folder of class subfolders, label held-out images
# from a support set with 1 to 3 images per class, keep the adapted task, label again from it
# alone, export it to ONNX. Its output is docs/results/own-images/output.txt.
#
#   METAFILM_DATA_ROOT=/path/to/data scripts/own_images_example.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-runs/own-images}
out=docs/results/own-images
mkdir -p "$work" "$out"
[ -d "$work/folders/train" ] || python scripts/example_folders.py "$work/folders" > /dev/null
folders=$work/folders
show() { echo "\$ ${*/#$work/WORK}"; "$@"; echo; }
{
    show metafilm train configs/own-images.toml --out "$work/run" --force \
        --set data.root="$folders/train" --set data.channels=1 --set data.image_size=28 \
        --set data.normalize=false --set model.width=32 --set train.steps=500
    show metafilm predict "$work/run" --support "$folders/support" "$folders/query" \
        --out "$work/predictions.json"
    show metafilm adapt "$work/run" --support "$folders/support" --out "$work/task.safetensors"
    show metafilm predict --task "$work/task.safetensors" "$folders/query"
    show metafilm export "$work/task.safetensors" --onnx "$work/task.onnx"
} 2>/dev/null | sed "s|$work|WORK|g" > "$out/output.txt"
python - "$work/predictions.json" >> "$out/output.txt" <<'PY'
import json, sys
from pathlib import Path
records = json.loads(Path(sys.argv[1]).read_text())
right = sum(Path(r["file"]).parent.name == r["predicted"] for r in records)
print(f"held-out query images labelled correctly: {right} of {len(records)}")
PY
cat "$out/output.txt"
