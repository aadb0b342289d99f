"""Time the Omniglot cache: cold build (decode both zips into a fresh cache) and warm loads.

Run from the repository root (or after `pip install -e .`):

    METAFILM_DATA_ROOT=/path/to/data python -m scripts.bench_omniglot_cache [--repeats 5]

Cold: each zip decoded into a new temporary cache dir (deleted afterwards). Warm: every split
loaded from that cache, best and median of `--repeats` loads (zip digests and cache integrity are
checked on every load, as in normal use).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from episodes.omniglot import SPLITS, load_omniglot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="data root (default: $METAFILM_DATA_ROOT)")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    with tempfile.TemporaryDirectory(prefix="metafilm-bench-") as cache_dir:
        print(f"image_size={args.image_size}, fresh cache dir {cache_dir}")
        print("cold build (decode a zip into the cache):")
        cold_total = 0.0
        for split in ("background", "evaluation"):
            start = time.perf_counter()
            classes = load_omniglot(
                args.root, split, image_size=args.image_size, cache_dir=cache_dir
            )
            seconds = time.perf_counter() - start
            cold_total += seconds
            print(f"  {split:<11} {len(classes.images):>6} images  {seconds:7.2f} s")
        print(f"  {'both zips':<11} {'':>13}  {cold_total:7.2f} s")
        for path in sorted(Path(cache_dir).rglob("*.cache")):
            print(f"  cache file {path.name}: {path.stat().st_size / 2**20:.1f} MiB")

        print(f"warm load (from the cache; best / median of {args.repeats}):")
        for split in SPLITS:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                classes = load_omniglot(
                    args.root, split, image_size=args.image_size, cache_dir=cache_dir
                )
                times.append(time.perf_counter() - start)
            print(
                f"  {split:<11} {classes.num_classes:>5} classes {len(classes.images):>6} images"
                f"  {min(times):6.3f} s / {statistics.median(times):6.3f} s"
            )


if __name__ == "__main__":
    main()
