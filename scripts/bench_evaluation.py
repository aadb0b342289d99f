"""Exact evaluation in float32: how far float32 logits lie from float64's, and what it saves.

For each training checkpoint given, on its own test protocol (its [eval] section, first ways and
shots, ``--episodes`` seeded test episodes), this measures:

- the largest ``|logit32 - logit64|`` over every query and class of a task, relative to the
  head's ``logit_magnitude``: the quantity that ``metafilm.meta.FLOAT32_LOGIT_ERROR`` bounds;
- how many tasks ``evaluate_exact`` computes again in float64 (their closest decision is within
  twice that bound of a tie), and whether its accuracies equal float64's, episode by episode;
- the time of the float64 evaluation and of ``evaluate_exact``, measured in turn in one process.

From the repository root, with ``METAFILM_DATA_ROOT`` set:

    PYTHONPATH=. python scripts/bench_evaluation.py runs/quickstart/best.pt --episodes 600
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from episodes.sampler import FixedEpisodes
from metafilm.assemble import fixed_batches, load_split
from metafilm.evaluation import _load
from metafilm.meta import FLOAT32_LOGIT_ERROR, evaluate, evaluate_exact, input_builder


def logit_errors(learner, batches, adapt) -> list[float]:
    """Per task: the largest float32-float64 logit difference over the head's logit magnitude."""
    fast = copy.deepcopy(learner).float()
    errors = []
    for episode in batches:
        for i in range(episode.tasks):
            task = episode.task(i)
            logits = []
            for model, dtype in ((learner, torch.float64), (fast, torch.float32)):
                seen: list[tuple] = []
                hook = model.head.register_forward_hook(
                    lambda module, inputs, out, seen=seen: seen.append((inputs, out))
                )
                one = type(episode)(
                    task.support_x[None].to(dtype),
                    task.support_y[None],
                    task.query_x[None].to(dtype),
                    task.query_y[None],
                    episode.ways,
                )
                evaluate(model, [one], adapt, strategy="loop")
                hook.remove()
                logits.append(seen[-1])  # the last call: the query logits
            (inputs, exact), (_, approximate) = logits
            with torch.no_grad():
                magnitude = learner.head.logit_magnitude(*inputs)
            errors.append(float((approximate.double() - exact).abs().max() / magnitude))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for checkpoint in args.checkpoints:
        loaded = _load(checkpoint, {"episodes": args.episodes}, None)
        config, settings = loaded.config, loaded.config.eval
        classes = load_split(config.data, settings.split, settings.alphabets)
        build = input_builder(loaded.learner, classes)
        ways, shots = settings.ways[0], settings.shots[0]
        source = FixedEpisodes(
            classes, ways, shots, settings.query, seed=settings.seed, episodes=args.episodes
        )
        batches = list(fixed_batches(source, build))
        adapt = loaded.adapt()
        errors = logit_errors(loaded.learner, batches, adapt)
        started = time.perf_counter()
        exact = evaluate(loaded.learner, batches, adapt)
        float64_s = time.perf_counter() - started
        started = time.perf_counter()
        fast, recomputed = evaluate_exact(loaded.learner, batches, adapt)
        mixed_s = time.perf_counter() - started
        result = {
            "checkpoint": str(checkpoint),
            "protocol": f"{ways}-way {shots}-shot, {settings.query} query, {settings.split}",
            "episodes": args.episodes,
            "largest_relative_logit_error": max(errors),
            "relative_logit_error_percentiles_50_99": np.percentile(errors, [50, 99]).tolist(),
            "bound": FLOAT32_LOGIT_ERROR,
            "headroom": FLOAT32_LOGIT_ERROR / max(errors),
            "recomputed_tasks": recomputed,
            "equal_to_float64": bool(np.array_equal(fast, exact)),
            "float64_s": round(float64_s, 2),
            "evaluate_exact_s": round(mixed_s, 2),
            "speedup": round(float64_s / mixed_s, 2),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(result))
        results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
