"""Time sampling + gathering one meta-batch against one Conv-4 forward+backward over it.

Run on cached Omniglot trainval, for example:
    python scripts/bench_sampler.py --data-root "$METAFILM_DATA_ROOT" \
        --cache-dir "$METAFILM_CACHE_DIR"
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from episodes.omniglot import load_omniglot
from episodes.sampler import Episode, EpisodeSampler, gather


def conv4(filters: int = 64) -> nn.Sequential:
    """Conv-4: four blocks of conv3x3-BN-ReLU-maxpool, then flatten."""
    blocks = []
    channels = 1
    for _ in range(4):
        blocks += [
            nn.Conv2d(channels, filters, 3, padding=1),
            nn.BatchNorm2d(filters),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = filters
    return nn.Sequential(*blocks, nn.Flatten())


def median_seconds(run: Callable[[int], object], repeats: int) -> float:
    """Median wall time of `run(r)` for r in 0..repeats-1."""
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        run(r)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(model: nn.Module, batch: Episode, tasks: int) -> None:
    """One forward+backward of the first `tasks` tasks' support and query images, task by task."""
    model.zero_grad(set_to_none=True)
    for t in range(tasks):
        task = batch.task(t)
        features = model(torch.cat([task.support_x, task.query_x]))
        features.square().mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("METAFILM_DATA_ROOT"))
    parser.add_argument("--cache-dir", default=os.environ.get("METAFILM_CACHE_DIR"))
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--query", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="timed sampling repeats")
    parser.add_argument("--model-repeats", type=int, default=1, help="timed Conv-4 repeats")
    args = parser.parse_args()
    if args.data_root is None:
        parser.error("give --data-root or set METAFILM_DATA_ROOT")

    classes = load_omniglot(args.data_root, "trainval", cache_dir=args.cache_dir)
    sampler = EpisodeSampler(classes, args.ways, args.shots, args.query, seed=0)
    size = args.meta_batch_size

    index_episodes = [sampler.sample(step, size) for step in range(args.repeats)]  # warm-up
    gather(classes, index_episodes[0])
    sample_s = median_seconds(lambda step: sampler.sample(step, size), args.repeats)
    gather_s = median_seconds(lambda step: gather(classes, index_episodes[step]), args.repeats)
    both_s = median_seconds(lambda step: gather(classes, sampler.sample(step, size)), args.repeats)

    batch = gather(classes, index_episodes[0])
    model = conv4()
    forward_backward(model, batch, tasks=1)  # warm-up
    model_s = median_seconds(lambda _: forward_backward(model, batch, size), args.model_repeats)

    images = batch.support_x.shape[0] * (batch.support_x.shape[1] + batch.query_x.shape[1])
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(
        f"torch {torch.__version__}; threads {torch.get_num_threads()}, "
        f"interop {torch.get_num_interop_threads()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; MALLOC_* {malloc_env or 'unset'}"
    )
    print(
        f"split trainval: {classes.num_classes} classes, {len(classes.images)} images "
        f"{tuple(classes.images.shape[1:])}"
    )
    print(
        f"meta-batch: {size} tasks of {args.ways}-way {args.shots}-shot {args.query}-query "
        f"= {images} images"
    )
    print(f"sample (indices)          {sample_s * 1e3:9.2f} ms  (median of {args.repeats})")
    print(f"gather (images)           {gather_s * 1e3:9.2f} ms")
    print(f"sample + gather           {both_s * 1e3:9.2f} ms")
    print(
        f"Conv-4 forward+backward   {model_s * 1e3:9.2f} ms  (median of {args.model_repeats}, "
        f"{size} per-task batches)"
    )
    print(f"ratio sample+gather / Conv-4 step: {both_s / model_s:.4f}")


if __name__ == "__main__":
    main()
