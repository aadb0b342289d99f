"""Meta-training speed and peak memory: the FiLM core vs full-parameter MAML and plain training.

Workload: Conv-4 (64 filters), 28x28x1 images, 5-way 1-shot, 15 query per class, meta-batch of 32
tasks, one second-order inner step, an Adam outer step in every arm. Each arm runs in a fresh
subprocess (isolated allocator state, its own peak memory), the arms alternate within each repeat,
and the figures are medians over repeats. Run from the repository root:

    PYTHONPATH=. python scripts/bench_meta.py --repeats 3 --json /tmp/bench_meta.json

Images are random uint8 (speed does not depend on them) unless ``--data-root`` (default
``METAFILM_DATA_ROOT``) points at Omniglot, whose "background" split is then used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metafilm
from episodes.classes import ClassImages
from episodes.omniglot import load_omniglot
from episodes.sampler import Episode, EpisodeSampler, IndexEpisode, gather
from metafilm import AdaptSpec, FiLMLearner, ModelSpec, OuterSpec
from metafilm.meta import input_builder, make_optimizer, meta_step

WAYS, SHOTS, QUERY, IMAGE_SIZE, WIDTH = 5, 1, 15, 28, 64
MAML_INNER_LR = 0.4
"""MAML's Omniglot inner learning rate; the value does not change the cost."""


@dataclass(frozen=True)
class Arm:
    """One contender: what it is, and the settings of the FiLM core it uses (``None`` for peers)."""

    description: str
    model: dict[str, object] = field(default_factory=dict)
    outer: dict[str, object] = field(default_factory=dict)
    core: bool = True


ARMS: dict[str, Arm] = {
    "plain": Arm("(1) plain fwd+bwd, 80 images per task, linear head", core=False),
    "maml": Arm("(2) full-parameter MAML, second order (autograd.grad idiom)", core=False),
    "film-all": Arm("(3) core, outer backbone, FiLM on all 4 blocks", {"film_sites": "all"}),
    "film-block1": Arm("(3) core, outer backbone, FiLM on block1", {"film_sites": ("block1",)}),
    "film-all-noenc": Arm(
        "(3) core, outer backbone, FiLM on all blocks, no encoder",
        {"film_sites": "all", "encoder": "none"},
    ),
    "frozen-block4-cached": Arm(
        "(4) core, frozen backbone, FiLM on block4, cached prefix",
        {"film_sites": ("block4",), "backbone_mode": "frozen", "bn_mode": "running"},
    ),
    "frozen-block4-cached-vmap": Arm(
        "(4) core, frozen backbone, FiLM on block4, cached prefix, tasks under vmap",
        {"film_sites": ("block4",), "backbone_mode": "frozen", "bn_mode": "running"},
        {"strategy": "vmap"},
    ),
    "frozen-block1": Arm(
        "(4) core, frozen backbone, FiLM on block1 (nothing cached)",
        {"film_sites": ("block1",), "backbone_mode": "frozen", "bn_mode": "running"},
    ),
}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer_network() -> nn.Sequential:
    """Conv-4 + linear classifier as a MAML user writes it: conv3x3-BN-ReLU-maxpool blocks with
    batch statistics only (no running buffers, as in transductive MAML)."""
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, WIDTH, 3, padding=1),
            nn.BatchNorm2d(WIDTH, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = WIDTH
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(WIDTH, WAYS))


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, episode: Episode) -> None:
    """Cross-entropy forward+backward on each task's 80 images (support and query), then Adam."""
    optimizer.zero_grad(set_to_none=True)
    for i in range(episode.tasks):
        task = episode.task(i)
        x = torch.cat([task.support_x, task.query_x])
        y = torch.cat([task.support_y, task.query_y])
        (F.cross_entropy(model(x), y) / episode.tasks).backward()
    optimizer.step()


def maml_step(model: nn.Module, optimizer: torch.optim.Optimizer, episode: Episode) -> None:
    """Second-order MAML on every parameter: per task, the support gradient with
    ``create_graph=True``, fast weights through ``functional_call``, the query loss back-propagated
    at once (gradients accumulate over the tasks), then Adam."""
    optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    for i in range(episode.tasks):
        task = episode.task(i)
        support_loss = F.cross_entropy(
            functional_call(model, params, task.support_x), task.support_y
        )
        grads = torch.autograd.grad(support_loss, list(params.values()), create_graph=True)
        fast = {
            name: p - MAML_INNER_LR * g for (name, p), g in zip(params.items(), grads, strict=True)
        }
        query_loss = F.cross_entropy(functional_call(model, fast, task.query_x), task.query_y)
        (query_loss / episode.tasks).backward()
    optimizer.step()


def load_classes(data_root: str | None, classes: int, per_class: int) -> ClassImages:
    """Omniglot "background" under ``data_root``, or random uint8 images of ``classes`` classes."""
    if data_root:
        return load_omniglot(data_root, "background", image_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0,
        256,
        (classes * per_class, 1, IMAGE_SIZE, IMAGE_SIZE),
        dtype=torch.uint8,
        generator=generator,
    )
    offsets = torch.arange(0, classes * per_class + 1, per_class)
    return ClassImages(images, offsets, tuple(f"class{c}" for c in range(classes)))


def build_arm(
    name: str, classes: ClassImages
) -> tuple[Callable[[Episode], object], Callable[[IndexEpisode], Episode]]:
    """The arm's training step and its input builder (index episode -> episode)."""
    arm = ARMS[name]
    if not arm.core:
        model = peer_network()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        step = plain_step if name == "plain" else maml_step
        return (lambda episode: step(model, optimizer, episode)), (lambda ep: gather(classes, ep))
    adapt = AdaptSpec(inner_steps=1, first_order=False)
    outer = OuterSpec(meta_batch_size=32, **arm.outer)
    learner = FiLMLearner(ModelSpec(head_ways=WAYS, **arm.model), adapt)
    optimizer = make_optimizer(learner, outer)
    build = input_builder(learner, classes)
    return (lambda episode: meta_step(learner, optimizer, episode, adapt, outer)), build


def worker(args: argparse.Namespace) -> dict[str, object]:
    """Time one arm in this process; return its figures."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = load_classes(args.data_root, args.classes, args.per_class)
    sampler = EpisodeSampler(classes, WAYS, SHOTS, QUERY, seed=0)
    index_episodes = [
        sampler.sample(step, args.meta_batch_size) for step in range(args.warmup + args.steps)
    ]
    baseline_mib = peak_rss_mib()
    setup_start = time.perf_counter()
    step, build = build_arm(args.worker, classes)
    setup_s = time.perf_counter() - setup_start
    times = []
    for i, index_episode in enumerate(index_episodes):
        start = time.perf_counter()
        step(build(index_episode))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "arm": args.worker,
        "tasks_per_s": args.meta_batch_size / statistics.median(times),
        "step_s": times,
        "peak_mib": peak_rss_mib() - baseline_mib,
        "baseline_mib": baseline_mib,
        "setup_s": setup_s,
        "threads": torch.get_num_threads(),
        "allocator": metafilm.ALLOCATOR,
    }


def run_worker(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Run ``worker`` for arm ``name`` in a fresh interpreter."""
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", name,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--meta-batch-size", str(args.meta_batch_size), "--classes", str(args.classes),
        "--per-class", str(args.per_class), "--data-root", args.data_root or "",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"arm {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, list[dict[str, object]]]) -> str:
    """Markdown table: medians over repeats; ratios are per-repeat ratios (arms run side by side
    in the same repeat), then their median."""

    def ratio(name: str, reference: str) -> str:
        if reference not in results:
            return "-"
        pairs = zip(results[name], results[reference], strict=True)
        return f"{statistics.median(a['tasks_per_s'] / b['tasks_per_s'] for a, b in pairs):.2f}"

    lines = [
        "| arm | what | tasks/s | × MAML (2) | × plain (1) | peak MiB | setup s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        speed = statistics.median(run["tasks_per_s"] for run in runs)
        peak = statistics.median(run["peak_mib"] for run in runs)
        setup = statistics.median(run["setup_s"] for run in runs)
        lines.append(
            f"| {name} | {ARMS[name].description} | {speed:.2f} | {ratio(name, 'maml')} | "
            f"{ratio(name, 'plain')} | {peak:.0f} | {setup:.2f} |"
        )
    return "\n".join(lines)


def environment(results: dict[str, list[dict[str, object]]], args: argparse.Namespace) -> dict:
    """What the figures depend on besides the code: machine, torch, threads, allocator."""
    first = next(iter(results.values()))[0]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": first["threads"],
        "allocator_tune": first["allocator"],
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_"))},
        "METAFILM_TUNE_ALLOCATOR": os.environ.get("METAFILM_TUNE_ALLOCATOR", "(unset: on)"),
        "load_average": os.getloadavg(),
        "data": args.data_root or f"random uint8, {args.classes} classes x {args.per_class}",
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "meta_batch_size": args.meta_batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated of {list(ARMS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed meta-steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every arm, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=200, help="random classes (no data root)")
    parser.add_argument("--per-class", type=int, default=20, help="random images per class")
    parser.add_argument("--data-root", default=os.environ.get("METAFILM_DATA_ROOT"))
    parser.add_argument("--json", metavar="OUT", help="write every measurement here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    names = [name.strip() for name in args.arms.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    results: dict[str, list[dict[str, object]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            result = run_worker(name, args)
            results[name].append(result)
            print(
                f"repeat {repeat} {name}: {result['tasks_per_s']:.2f} tasks/s, "
                f"peak +{result['peak_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    env = environment(results, args)
    print(table(results))
    print()
    print(json.dumps(env, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"environment": env, "runs": results}, out, indent=1)


if __name__ == "__main__":
    main()
