"""The core's meta-step with metafilm.batchnorm against the same step with torch's batch norm.

At each shape of scripts/bench_meta.py, the core arm ``film-all`` (defaults: second order,
FiLM on all blocks, episode batch norm) takes meta-steps on the same tasks, alternating step by
step between ``metafilm.batchnorm.episode_batch_norm`` (the library's) and
``F.batch_norm`` (torch's, whose double backward sums channels_last tensors over dim 0 first),
which this script swaps into ``metafilm.backbones`` for its own process. Prints the median time
of each and the median of the per-round ratios. From the repository root:

    PYTHONPATH=. python scripts/bench_batchnorm.py --rounds 8 --json /tmp/bench_batchnorm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import metafilm.backbones

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meta import (  # noqa: E402
    SHAPES,
    build_arm,
    index_episodes,
    load_classes,
    provenance,
)


def torch_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Episode batch norm as torch computes it, derivatives of every order included."""
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


NORMS = {"metafilm": metafilm.backbones.episode_batch_norm, "torch": torch_batch_norm}


def measure(shape_name: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per meta-step of each batch norm, ``rounds`` timed steps each after one untimed,
    alternating (round ``r`` starts with the other one than round ``r - 1``)."""
    shape = SHAPES[shape_name]
    classes = load_classes(None, shape, 200, 20)
    step, build = build_arm("film-all", classes, shape, None)
    episodes = [build(e) for e in index_episodes(shape, classes, 2 * (rounds + 1))]
    seconds: dict[str, list[float]] = {name: [] for name in NORMS}
    for r in range(rounds + 1):
        for k, name in enumerate(list(NORMS)[:: -1 if r % 2 else 1]):
            metafilm.backbones.episode_batch_norm = NORMS[name]
            started = time.perf_counter()
            step(episodes[2 * r + k])
            if r > 0:
                seconds[name].append(time.perf_counter() - started)
    metafilm.backbones.episode_batch_norm = NORMS["metafilm"]
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    results = {}
    for shape_name in args.shapes.split(","):
        seconds = measure(shape_name, args.rounds)
        ratios = [t / m for t, m in zip(seconds["torch"], seconds["metafilm"], strict=True)]
        results[shape_name] = {"seconds": seconds, "speedup": statistics.median(ratios)}
        print(
            f"{shape_name}: metafilm.batchnorm {statistics.median(seconds['metafilm']):.3f} s, "
            f"torch's {statistics.median(seconds['torch']):.3f} s per meta-step, "
            f"{results[shape_name]['speedup']:.2f}x (median of {args.rounds} rounds)"
        )
    if args.json is not None:
        summary = {
            **provenance(args.threads, load),
            "shapes": results,
        }
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
