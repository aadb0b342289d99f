"""Meta-training speed with and without flushing subnormal floats to zero (metafilm.subnormals):
the meta-gradient of one meta-batch of a trained checkpoint's own training tasks, in float32 as it
trains, the two modes alternating in one process.

    PYTHONPATH=. python scripts/bench_subnormals.py runs/bench-mini-outer/best.pt --threads 2 \
        --repeats 3 --json /tmp/bench_subnormals.json

A freshly initialised network shows no difference (its support losses are far from zero); a
trained one can: with a prototype head at 1-shot each support image is its own prototype. Prints
each mode's best time over `--repeats` and their ratio; the thread count and the load average of
the machine before the run are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from metafilm.assemble import fixed_batches, fixed_episodes, load_split
from metafilm.evaluation import load_trained
from metafilm.meta import input_builder, meta_backward
from metafilm.subnormals import flushing_subnormals

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meta import provenance  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    loaded = load_trained(args.checkpoint)
    config = loaded.config
    learner = loaded.learner.float().train()
    classes = load_split(config.data, config.data.train_split, config.data.train_alphabets)
    shape = (config.data.ways, config.data.shots, config.data.query)
    source = fixed_episodes(
        classes,
        config.data.train_split,
        shape,
        seed=config.train.seed,
        episodes=config.outer.meta_batch_size,
        within_alphabet=config.data.within_alphabet,
        what="the run's [data] ways / shots / query",
    )
    (batch,) = fixed_batches(source, input_builder(learner, classes), config.outer.meta_batch_size)
    seconds: dict[str, list[float]] = {"subnormals": [], "flushed": []}
    for repeat in range(args.repeats):
        for mode in seconds:
            learner.zero_grad()
            started = time.perf_counter()
            with flushing_subnormals() if mode == "flushed" else nullcontext():
                meta_backward(learner, batch, config.adapt, film_l2=config.outer.film_l2)
            seconds[mode].append(time.perf_counter() - started)
            print(f"repeat {repeat + 1}: {mode} {seconds[mode][-1]:.2f} s", file=sys.stderr)
    best = {mode: min(times) for mode, times in seconds.items()}
    summary = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": loaded.sha256,
        "tasks": {"shape": shape, "meta_batch_size": config.outer.meta_batch_size},
        "first_order": config.adapt.first_order,
        **provenance(args.threads, load),
        "seconds": seconds,
        "speedup": best["subnormals"] / best["flushed"],
    }
    print(
        f"one meta-batch of {config.outer.meta_batch_size} tasks, {args.threads} thread(s), load "
        f"{load:.2f} before: {best['subnormals']:.2f} s with subnormals, {best['flushed']:.2f} s "
        f"flushed ({summary['speedup']:.2f}x)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
