"""Meta-training speed and peak memory: the FiLM core and FiLMMAML against MAML and plain training.

Workload, at each of ``--shapes``: Conv-4 (64 filters), 15 query images per class, one
second-order inner step, an Adam outer step in every arm; ``omniglot-5w1s`` is 28x28x1 images,
5-way 1-shot, meta-batch 32; ``miniimagenet-5w1s`` and ``miniimagenet-5w5s`` are 84x84x3 images,
5-way 1- and 5-shot, meta-batch 4. Speed: every arm is built in one fresh process per shape and
the arms take meta-steps in turn on the same tasks, so that they share the machine's load (it is
shared and noisy); ``--repeats`` such processes. Memory: each arm alone in a fresh process
(``--repeats`` times), peak resident memory above the baseline. From the repository root:

    PYTHONPATH=. python scripts/bench_meta.py --learn2learn /path/to/learn2learn-0.2.0 \
        --json /tmp/bench_meta.json

``--learn2learn`` names a source tree of learn2learn as a user fetches it (``pip download
learn2learn==0.2.0 --no-deps`` and unpack, or a git clone): its own ``MAML`` (``clone()`` /
``adapt()``) is then an arm and the reference of the ratios; it is never imported as a package
(its ``__init__`` needs compiled parts and torchvision), only the three files ``MAML`` is made of.
Without it the reference is the hand-written MAML (``maml``).

Images are random uint8 (speed does not depend on them) unless ``--data-root`` (default
``METAFILM_DATA_ROOT``) points at Omniglot, whose "background" split is then used at the
Omniglot shape.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import metafilm
from episodes.classes import ClassImages
from episodes.omniglot import load_omniglot
from episodes.sampler import Episode, EpisodeSampler, IndexEpisode, gather
from metafilm import (
    AdaptSpec,
    FiLMLearner,
    FiLMMAML,
    ModelSpec,
    OuterSpec,
    build_backbone,
    input_builder,
    make_optimizer,
    meta_step,
)

QUERY, WIDTH = 15, 64
MAML_INNER_LR = 0.4
"""MAML's Omniglot inner learning rate; the value does not change the cost."""


@dataclass(frozen=True)
class Shape:
    """A workload: images of ``channels`` x ``size`` x ``size``, ``ways``-way ``shots``-shot
    tasks, ``meta_batch_size`` of them per meta-step."""

    size: int
    channels: int
    ways: int
    shots: int
    meta_batch_size: int


SHAPES = {
    "omniglot-5w1s": Shape(28, 1, 5, 1, 32),
    "miniimagenet-5w1s": Shape(84, 3, 5, 1, 4),
    "miniimagenet-5w5s": Shape(84, 3, 5, 5, 4),
}


@dataclass(frozen=True)
class Arm:
    """One contender: a peer written by hand (``peer``) or the FiLM core with these settings."""

    description: str
    model: dict[str, object] = field(default_factory=dict)
    outer: dict[str, object] = field(default_factory=dict)
    peer: (
        Literal["plain", "maml", "l2l-maml", "filmmaml", "filmmaml-cl", "filmmaml-hooked"] | None
    ) = None
    channels_last: bool = False


FROZEN_RUNNING = {"backbone_mode": "frozen", "bn_mode": "running"}
ARMS: dict[str, Arm] = {
    "plain": Arm("(1) plain fwd+bwd on each task's images, linear head", peer="plain"),
    "plain-cl": Arm(
        "(1) plain fwd+bwd on each task's images, linear head, channels_last weights",
        peer="plain",
        channels_last=True,
    ),
    "maml": Arm("(2) full-parameter MAML, second order (autograd.grad idiom)", peer="maml"),
    "maml-cl": Arm("(2) the same, channels_last weights", peer="maml", channels_last=True),
    "l2l-maml": Arm(
        "(2) learn2learn's own MAML (clone/adapt, second order), from --learn2learn",
        peer="l2l-maml",
    ),
    "filmmaml": Arm(
        "(5) metafilm.FiLMMAML on the network of (2), FiLM folded into its 4 batch norms",
        peer="filmmaml",
    ),
    "filmmaml-cl": Arm(
        "(5) the same, FiLMMAML(..., channels_last=True): it puts the network in that layout",
        peer="filmmaml-cl",
    ),
    "filmmaml-hooked": Arm(
        "(5) the same, FiLM by hooks on the batch norms' outputs (FiLMMAML before folding)",
        peer="filmmaml-hooked",
    ),
    "film-all": Arm("(3) core, outer backbone, FiLM on all 4 blocks", {"film_sites": "all"}),
    "film-block1": Arm("(3) core, outer backbone, FiLM on block1", {"film_sites": ("block1",)}),
    "film-all-noenc": Arm(
        "(3) core, outer backbone, FiLM on all blocks, encoder none",
        {"film_sites": "all", "encoder": "none"},
    ),
    "film-all-cl": Arm(
        "(3) core, outer backbone, FiLM on all blocks, channels_last backbone",
        {"film_sites": "all"},
        channels_last=True,
    ),
    "frozen-block4-cached": Arm(
        "(4) core, frozen backbone, FiLM on block4, cached prefix (strategy auto: vmap)",
        {"film_sites": ("block4",), **FROZEN_RUNNING},
    ),
    "frozen-block4-cached-loop": Arm(
        "(4) the same, strategy loop",
        {"film_sites": ("block4",), **FROZEN_RUNNING},
        {"strategy": "loop"},
    ),
    "frozen-block1": Arm(
        "(4) core, frozen backbone, FiLM on block1 (nothing to cache)",
        {"film_sites": ("block1",), **FROZEN_RUNNING},
    ),
}


def load_lazy_imports() -> None:
    """Construct a throwaway optimiser: the first one imports ``torch._dynamo`` (seconds, ~70 MiB),
    which belongs to the imports, not to whichever arm comes first."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PEER_BN_SITES = ("1", "5", "9", "13")
"""The batch norms of ``peer_network``, by name."""


def peer_network(shape: Shape) -> nn.Sequential:
    """Conv-4 + linear classifier as a MAML user writes it: conv3x3-BN-ReLU-maxpool blocks with
    batch statistics only (no running buffers, as in transductive MAML)."""
    layers: list[nn.Module] = []
    channels, size = shape.channels, shape.size
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, WIDTH, 3, padding=1),
            nn.BatchNorm2d(WIDTH, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = WIDTH, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(WIDTH * size * size, shape.ways))


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


def clone_adapt_step(maml: nn.Module, optimizer: torch.optim.Optimizer, episode: Episode) -> None:
    """learn2learn's idiom (its MAML, or FiLMMAML): per task ``clone()``, one second-order
    ``adapt`` on the support loss, the query loss back-propagated at once, then Adam."""
    optimizer.zero_grad(set_to_none=True)
    for i in range(episode.tasks):
        task = episode.task(i)
        learner = maml.clone()
        learner.adapt(F.cross_entropy(learner(task.support_x), task.support_y))
        (F.cross_entropy(learner(task.query_x), task.query_y) / episode.tasks).backward()
    optimizer.step()


def learn2learn_maml(source: Path) -> type[nn.Module]:
    """learn2learn's ``MAML`` class from its source tree ``source`` (the folder holding
    ``learn2learn/``), loaded from the three files it is made of under their own module names,
    without running the package's ``__init__``."""
    root = source / "learn2learn"
    for package in ("learn2learn", "learn2learn.algorithms"):
        module = types.ModuleType(package)
        module.__path__ = [str(root / package.partition(".")[2])]
        sys.modules.setdefault(package, module)
    for name, file in (
        ("learn2learn.utils", "utils/__init__.py"),
        ("learn2learn.algorithms.base_learner", "algorithms/base_learner.py"),
        ("learn2learn.algorithms.maml", "algorithms/maml.py"),
    ):
        spec = importlib.util.spec_from_file_location(name, root / file)
        if spec is None or spec.loader is None or not (root / file).is_file():
            raise SystemExit(f"bench_meta: --learn2learn {source} has no learn2learn/{file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules["learn2learn.algorithms.maml"].MAML


def load_classes(data_root: str | None, shape: Shape, classes: int, per_class: int) -> ClassImages:
    """Omniglot "background" under ``data_root`` (Omniglot's shape only), or random uint8 images
    of ``classes`` classes."""
    if data_root and shape.channels == 1:
        return load_omniglot(data_root, "background", image_size=shape.size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0,
        256,
        (classes * per_class, shape.channels, shape.size, shape.size),
        dtype=torch.uint8,
        generator=generator,
    )
    offsets = torch.arange(0, classes * per_class + 1, per_class)
    return ClassImages(images, offsets, tuple(f"class{c}" for c in range(classes)))


Step = Callable[[Episode], object]
Build = Callable[[IndexEpisode], Episode]


def build_arm(
    name: str, classes: ClassImages, shape: Shape, learn2learn: Path | None
) -> tuple[Step, Build]:
    """The arm's training step and its input builder (index episode -> episode)."""
    torch.manual_seed(0)
    arm = ARMS[name]
    layout = torch.channels_last if arm.channels_last else torch.contiguous_format
    if arm.peer is not None:
        model = peer_network(shape).to(memory_format=layout)
        if arm.peer == "l2l-maml":
            if learn2learn is None:
                raise SystemExit("bench_meta: the l2l-maml arm needs --learn2learn SOURCE")
            model = learn2learn_maml(learn2learn)(model, lr=MAML_INNER_LR)
        elif arm.peer.startswith("filmmaml"):
            channels_last = arm.peer == "filmmaml-cl"
            model = FiLMMAML(model, MAML_INNER_LR, PEER_BN_SITES, channels_last=channels_last)
            if arm.peer == "filmmaml-hooked":
                model.folded_sites = ()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        steps = {"plain": plain_step, "maml": maml_step}
        peer_step = steps.get(arm.peer, clone_adapt_step)
        return partial(peer_step, model, optimizer), partial(gather, classes)
    adapt = AdaptSpec(inner_steps=1, first_order=False)
    outer = OuterSpec(meta_batch_size=shape.meta_batch_size, **arm.outer)
    spec = ModelSpec(
        head_ways=shape.ways, in_channels=shape.channels, image_size=shape.size, **arm.model
    )
    backbone = build_backbone(spec).to(memory_format=layout)
    learner = FiLMLearner(spec, adapt, backbone=backbone)
    optimizer = make_optimizer(learner, outer)
    build = input_builder(learner, classes)
    return partial(meta_step, learner, optimizer, adapt=adapt, outer=outer), build


def index_episodes(shape: Shape, classes: ClassImages, count: int) -> list[IndexEpisode]:
    """``count`` meta-batches of task indices, the same for every arm."""
    sampler = EpisodeSampler(classes, shape.ways, shape.shots, QUERY, seed=0)
    return [sampler.sample(step, shape.meta_batch_size) for step in range(count)]


def worker_inputs(args: argparse.Namespace) -> tuple[Shape, ClassImages]:
    shape = SHAPES[args.shapes]
    return shape, load_classes(args.data_root, shape, args.classes, args.per_class)


def speed_worker(args: argparse.Namespace) -> dict[str, object]:
    """All arms in this process, stepping in turn (round ``r`` starts with arm ``r``), so that
    every arm sees the same load; per arm the wall time of each timed step."""
    load_lazy_imports()
    shape, classes = worker_inputs(args)
    names = args.arms.split(",")
    arms, setup_s = {}, {}
    for name in names:
        start = time.perf_counter()
        arms[name] = build_arm(name, classes, shape, args.learn2learn)
        setup_s[name] = time.perf_counter() - start
    episodes = index_episodes(shape, classes, args.warmup + args.steps)
    step_s: dict[str, list[float]] = {name: [] for name in names}
    for i, index_episode in enumerate(episodes):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            step, build = arms[name]
            start = time.perf_counter()
            step(build(index_episode))
            if i >= args.warmup:
                step_s[name].append(time.perf_counter() - start)
    return {"step_s": step_s, "setup_s": setup_s}


def memory_worker(args: argparse.Namespace) -> dict[str, object]:
    """One arm alone in this process: peak resident memory above the baseline after imports,
    data and task indices, once set up and after ``warmup`` steps and one more."""
    load_lazy_imports()
    shape, classes = worker_inputs(args)
    episodes = index_episodes(shape, classes, args.warmup + 1)
    baseline_mib = peak_rss_mib()
    step, build = build_arm(args.arms, classes, shape, args.learn2learn)
    setup_mib = peak_rss_mib() - baseline_mib
    for index_episode in episodes:
        step(build(index_episode))
    return {"peak_mib": peak_rss_mib() - baseline_mib, "setup_mib": setup_mib}


def run_worker(kind: str, arms: str, shape: str, args: argparse.Namespace) -> dict[str, object]:
    """Run a ``kind`` worker ("speed" or "memory") on ``arms`` at ``shape`` in a fresh
    interpreter."""
    command = [
        sys.executable, os.path.abspath(__file__), "--worker", kind, "--arms", arms,
        "--shapes", shape, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--threads", str(args.threads), "--classes", str(args.classes),
        "--per-class", str(args.per_class), "--data-root", args.data_root or "",
        *(["--learn2learn", str(args.learn2learn)] if args.learn2learn else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker for {arms} at {shape} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_of(names: list[str]) -> str | None:
    """The MAML that ratios are taken against: learn2learn's own when it ran, else ours."""
    return next((name for name in ("l2l-maml", "maml") if name in names), None)


def summarise(
    speed: list[dict], memory: dict[str, list[dict]], meta_batch_size: int
) -> dict[str, dict[str, float]]:
    """Per arm: median tasks/s over every timed step, the median over steps of its speed relative
    to the reference MAML (:func:`reference_of`) and to plain training (in channels_last when that
    arm ran: the practical limit) *in the same round* (steps that ran side by side), and the
    median over processes of its peak memory."""
    names = list(speed[0]["step_s"])
    rounds = [
        {name: meta_batch_size / run["step_s"][name][i] for name in names}
        for run in speed
        for i in range(len(run["step_s"][names[0]]))
    ]
    plain = next((name for name in ("plain-cl", "plain") if name in names), None)
    references = {"vs_maml": reference_of(names), "vs_plain": plain}
    summary = {}
    for name in names:
        row = {
            "tasks_per_s": statistics.median(r[name] for r in rounds),
            "setup_s": statistics.median(run["setup_s"][name] for run in speed),
        }
        for key, reference in references.items():
            if reference is not None:
                row[key] = statistics.median(r[name] / r[reference] for r in rounds)
        for key in ("peak_mib", "setup_mib"):
            if memory.get(name):
                row[key] = statistics.median(run[key] for run in memory[name])
        summary[name] = row
    return summary


def table(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per arm and shape, tasks/s with the ratio to the reference MAML, and peak memory, as one
    Markdown table (the shapes side by side)."""
    shapes = list(summaries)
    names = list(summaries[shapes[0]])
    reference = reference_of(names)

    def cell(row: dict[str, float], key: str, text: str) -> str:
        return text.format(row[key]) if key in row else "-"

    lines = [
        f"| arm | what | {' | '.join(f'{shape}: tasks/s, × {reference}' for shape in shapes)} "
        f"| {' | '.join(f'{shape}: × plain' for shape in shapes)} "
        f"| {' | '.join(f'{shape}: peak MiB' for shape in shapes)} |",
        "|---|---|" + "---:|" * (3 * len(shapes)),
    ]
    for name in names:
        rows = [summaries[shape][name] for shape in shapes]
        speed = [f"{row['tasks_per_s']:.2f}, {cell(row, 'vs_maml', '{:.2f}')}×" for row in rows]
        plain = [cell(row, "vs_plain", "{:.2f}") for row in rows]
        memory = [cell(row, "peak_mib", "{:.0f}") for row in rows]
        cells = " | ".join([*speed, *plain, *memory])
        lines.append(f"| {name} | {ARMS[name].description} | {cells} |")
    return "\n".join(lines)


def code_version() -> str:
    """The git commit of this checkout, marked when the library's sources differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "metafilm", "episodes")
    return f"{commit} (metafilm/ or episodes/ modified)" if dirty else commit


def processor() -> str:
    """The CPU's model name and the vector instructions torch's kernels use on it: timings and
    their ratios differ between CPUs (an AVX2 and an AVX-512/AMX machine rank arms differently),
    and so do float32 results."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
    except OSError:
        names = []
    if names:
        model = names[0]
    return f"{model}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def provenance(threads: int, load_before: object) -> dict[str, object]:
    """What every benchmark's JSON records beside its figures: the code, the processor, torch,
    the thread count and the load average before the run."""
    return {
        "code": code_version(),
        "processor": processor(),
        "torch": torch.__version__,
        "threads": threads,
        "load_average_before": load_before,
    }


def environment(
    args: argparse.Namespace, allocator: dict[str, int], load_before: tuple[float, ...]
) -> dict[str, object]:
    """What the figures depend on besides the code: machine, torch, threads, allocator, load."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "processor": processor(),
        "code": code_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "allocator (metafilm.tune_allocator)": allocator,
        "METAFILM_TUNE_ALLOCATOR": os.environ.get("METAFILM_TUNE_ALLOCATOR", "(unset: tuned)"),
        "malloc env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_"))},
        "load average before": load_before,
        "load average at end": os.getloadavg(),
        "data": args.data_root or f"random uint8, {args.classes} classes x {args.per_class}",
        "steps x repeats (timed), warmup": f"{args.steps} x {args.repeats}, {args.warmup}",
        "shapes": {name: vars(SHAPES[name]) for name in args.shapes.split(",")},
        "learn2learn": str(args.learn2learn) if args.learn2learn else "(not given: hand-written)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arms",
        default="plain-cl,maml,film-all,frozen-block4-cached,filmmaml,filmmaml-cl",
        help=f"comma-separated of {list(ARMS)} (l2l-maml comes with --learn2learn)",
    )
    parser.add_argument("--steps", type=int, default=4, help="timed meta-steps per arm per repeat")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-steps per arm first")
    parser.add_argument(
        "--repeats", type=int, default=2, help="fresh processes timing all arms / measuring each"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--shapes", default=",".join(SHAPES), help=f"comma-separated of {list(SHAPES)}"
    )
    parser.add_argument(
        "--learn2learn",
        type=Path,
        metavar="SOURCE",
        help="a learn2learn source tree (the folder holding learn2learn/): adds its MAML as the "
        "reference arm l2l-maml",
    )
    parser.add_argument("--classes", type=int, default=200, help="random classes (no data root)")
    parser.add_argument("--per-class", type=int, default=20, help="random images per class")
    parser.add_argument("--data-root", default=os.environ.get("METAFILM_DATA_ROOT"))
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure each arm's peak memory in a process of its own",
    )
    parser.add_argument("--json", metavar="OUT", help="write every measurement here")
    parser.add_argument("--worker", choices=("speed", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker = speed_worker if args.worker == "speed" else memory_worker
        print(json.dumps(worker(args)))
        return
    names = [name.strip() for name in args.arms.split(",") if name.strip()]
    if args.learn2learn and "l2l-maml" not in names:
        names.insert(0, "l2l-maml")
    if not args.learn2learn and "l2l-maml" in names:
        names.remove("l2l-maml")
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    shapes = [shape.strip() for shape in args.shapes.split(",") if shape.strip()]
    if set(shapes) - set(SHAPES):
        parser.error(
            f"unknown shapes {sorted(set(shapes) - set(SHAPES))}; choose from {list(SHAPES)}"
        )
    if args.learn2learn:
        learn2learn_maml(args.learn2learn)  # a wrong folder fails now, not in every worker
    load_before = os.getloadavg()
    summaries, measurements = {}, {}
    for shape in shapes:
        speed = []
        for repeat in range(args.repeats):
            speed.append(run_worker("speed", ",".join(names), shape, args))
            print(f"{shape}: speed repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        memory: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for repeat in range(args.repeats if args.memory else 0):
            for name in names:
                memory[name].append(run_worker("memory", name, shape, args))
            print(f"{shape}: memory repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        summaries[shape] = summarise(speed, memory, SHAPES[shape].meta_batch_size)
        measurements[shape] = {"speed": speed, "memory": memory}
    env = environment(args, metafilm.ALLOCATOR, load_before)
    print(table(summaries))
    print()
    print(json.dumps(env, indent=1))
    if args.json:
        with open(args.json, "w") as out:
            report = {"environment": env, "summary": summaries, "measurements": measurements}
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
