"""Evaluation speed at equal exactness: float64 `evaluate` against `evaluate_exact` (float32 with
the near ties recomputed in float64, metafilm.tiebreak) on a checkpoint's own test protocol, the
two alternating in one process on the same episodes; their per-episode accuracies must be equal.

    PYTHONPATH=. python scripts/bench_evaluation.py runs/quickstart/best.pt --ways 20 --shots 1 \
        --episodes 600 --threads 2 --json /tmp/bench_evaluation.json

The arms alternate batch by batch (50 episodes; the first arm alternates too), so that both see
the same phases of the machine, whose speed drifts by tens of percent within minutes; the exact
arm carries its calibration from batch to batch, as one `evaluate_exact` call over all of them
does. Prints each arm's best total over `--repeats`, the speed-up, how many tasks were recomputed
in float64, the thread count and the load average of the machine before the run. Cached prefix
features (a frozen backbone) are computed once, or read from the cache that `metafilm evaluate`
keeps, before either arm is timed.

`--check-headroom` then computes every task's logits in float32 and in float64 (untimed) and
reports the largest float32 error of a logit difference over all tasks, as a multiple of the
largest over the calibration tasks: how much of `metafilm.tiebreak.HEADROOM` this model uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from episodes.integrity import resolve_cache_dir
from episodes.sampler import Episode
from metafilm.assemble import fixed_batches, fixed_episodes, load_split
from metafilm.evaluation import load_trained
from metafilm.learner import FiLMLearner
from metafilm.meta import evaluate, input_builder, query_logits
from metafilm.prefix_cache import prefix_store
from metafilm.specs import AdaptSpec
from metafilm.tiebreak import (
    CALIBRATION_TASKS,
    HEADROOM,
    Tiebreak,
    difference_errors,
    evaluate_exact,
    float32_copy,
    float32_episode,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_meta import provenance  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--ways", type=int, help="default: the run's first eval.ways")
    parser.add_argument("--shots", type=int, help="default: the run's first eval.shots")
    parser.add_argument("--episodes", type=int, help="default: the run's eval.episodes")
    parser.add_argument("--split", help="default: the run's eval.split")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--check-headroom", action="store_true")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    loaded = load_trained(args.checkpoint)
    settings = loaded.config.eval
    ways = args.ways or settings.ways[0]
    shots = args.shots or settings.shots[0]
    split = args.split or settings.split
    classes = load_split(loaded.config.data, split, settings.alphabets)
    source = fixed_episodes(
        classes,
        split,
        (ways, shots, settings.query),
        seed=settings.seed,
        episodes=args.episodes or settings.episodes,
        within_alphabet=settings.within_alphabet,
        what="--ways / --shots",
    )
    started = time.perf_counter()
    build = input_builder(
        loaded.learner,
        classes,
        stored=prefix_store(resolve_cache_dir(loaded.config.data.cache_dir or None)),
    )
    episodes = list(fixed_batches(source, build))
    inputs_s = time.perf_counter() - started
    adapt = loaded.adapt()
    arms = ("float64", "exact")
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    results: dict[str, np.ndarray] = {}

    def run(arm: str, episode: Episode, tiebreak: Tiebreak) -> np.ndarray:
        if arm == "float64":
            return evaluate(loaded.learner, [episode], adapt)
        return evaluate_exact(loaded.learner, [episode], adapt, tiebreak=tiebreak)

    for repeat in range(args.repeats):
        tiebreak = Tiebreak()  # carried over the batches: the counts of the last repeat
        totals = dict.fromkeys(arms, 0.0)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in arms}
        for i, episode in enumerate(episodes):
            for arm in arms[:: -1 if (i + repeat) % 2 else 1]:
                started = time.perf_counter()
                parts[arm].append(run(arm, episode, tiebreak))
                totals[arm] += time.perf_counter() - started
        for arm in arms:
            results[arm] = np.concatenate(parts[arm])
            seconds[arm].append(totals[arm])
        print(
            f"repeat {repeat + 1}: " + ", ".join(f"{a} {totals[a]:.1f} s" for a in arms),
            file=sys.stderr,
        )
    equal = bool(np.array_equal(results["float64"], results["exact"]))
    best = {name: min(times) for name, times in seconds.items()}
    summary = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": loaded.sha256,
        "protocol": {
            "split": split,
            "ways": ways,
            "shots": shots,
            "query": settings.query,
            "episodes": len(source),
            "episode_seed": settings.seed,
        },
        **provenance(args.threads, load),
        "inputs_s": inputs_s,
        "seconds": seconds,
        "speedup": best["float64"] / best["exact"],
        "recomputed_tasks": tiebreak.recomputed,
        "calibrated_error": tiebreak.error,
        "equal_accuracies": equal,
        "mean_accuracy": float(results["float64"].mean()),
    }
    print(
        f"{ways}-way {shots}-shot, {len(source)} {split} episodes, {args.threads} thread(s), load "
        f"{load:.2f} before: float64 {best['float64']:.1f} s, exact {best['exact']:.1f} s "
        f"({summary['speedup']:.2f}x), {tiebreak.recomputed} of {len(source)} tasks recomputed "
        f"in float64, accuracies {'equal' if equal else 'DIFFERENT'} (mean "
        f"{100 * summary['mean_accuracy']:.2f}%)"
    )
    if args.check_headroom:
        summary["headroom_used"] = headroom_used(loaded.learner, episodes, adapt)
        print(
            f"largest float32 error of a logit difference over all tasks: "
            f"{summary['headroom_used']:.2f}x the calibration tasks' largest (HEADROOM {HEADROOM})"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return 0 if equal else 1


def headroom_used(learner: FiLMLearner, episodes: list[Episode], adapt: AdaptSpec) -> float:
    """The largest float32 error of a logit difference over all tasks of ``episodes`` (as
    ``metafilm.tiebreak`` measures it), divided by the largest over the first
    ``CALIBRATION_TASKS``: the part of ``HEADROOM`` this model and protocol use."""
    fast = float32_copy(learner)
    errors = torch.cat(
        [
            difference_errors(
                query_logits(fast, float32_episode(e), adapt).double(),
                query_logits(learner, e, adapt),
            )
            for e in episodes
        ]
    )
    return float(errors.max() / errors[:CALIBRATION_TASKS].max())


if __name__ == "__main__":
    sys.exit(main())
