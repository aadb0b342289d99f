"""Image folders as a user would have them, built from the real Omniglot data: the example of
the README's "your own images" path and of tests/test_own_images.py.

Writes under OUT:

- ``train/<alphabet>/<character>/NN.png``: 40 background characters, 20 images each, saved at
  28, 40 and 57 pixels in turn (the loader resizes them), beside a notes file and a hidden file
  that the loader skips;
- ``support/<alphabet>-<character>/``: 5 characters of the evaluation alphabets (never seen in
  training) with 1, 2 or 3 labelled images each;
- ``query/<alphabet>-<character>/``: 5 other images of each of those characters.

    python scripts/example_folders.py OUT [--data-root DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from episodes.classes import ClassImages
from episodes.omniglot import load_omniglot

SIZES = (28, 40, 57)
"""The side lengths the PNGs are written at, in turn."""


def _write_class(classes: ClassImages, name: str, target: Path, images: range) -> None:
    start = int(classes.offsets[classes.names.index(name)])
    target.mkdir(parents=True, exist_ok=True)
    for i in images:
        size = SIZES[i % len(SIZES)]
        pixels = classes.images[start + i, 0].numpy()
        image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
        image.save(target / f"{i:02d}.png")


def write_example_folders(
    out: Path, data_root: Path | None = None, cache_dir: Path | None = None
) -> dict[str, Path]:
    """Write the three folders under ``out``; returns their paths by name."""
    background = load_omniglot(data_root, "background", cache_dir=cache_dir)
    upright = [name for name in background.names if name.endswith("rot000")]
    train = out / "train"
    for name in upright[::12][:40]:
        alphabet, character = name.split("/")[:2]
        _write_class(background, name, train / alphabet / character, range(20))
    (train / "notes.txt").write_text("not an image: skipped\n", encoding="utf-8")
    (train / ".DS_Store").write_bytes(b"\0")
    evaluation = load_omniglot(data_root, "evaluation", cache_dir=cache_dir)
    held_out = [name for name in evaluation.names if name.endswith("rot000")][::40][:5]
    for k, name in enumerate(held_out):
        label = "-".join(name.split("/")[:2])
        _write_class(evaluation, name, out / "support" / label, range(1 + k % 3))
        _write_class(evaluation, name, out / "query" / label, range(3, 8))
    return {"train": train, "support": out / "support", "query": out / "query"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-root", type=Path, help="default: METAFILM_DATA_ROOT")
    args = parser.parse_args()
    for name, path in write_example_folders(args.out, args.data_root).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
