"""Exact evaluation at float32 speed: float64 decisions, recomputed only where float32 could differ.

Evaluation is float64 so that per-episode accuracies do not depend on the thread count or the CPU
(a change in the order of float32 sums flips near-tied predictions). But a prediction is the
argmax of a query's logits, and the float32 argmax ``t`` is float64's too when every float32
difference ``logit[j] - logit[t]`` (at most minus the query's top-two margin) is off from its
float64 value by less than that margin. So :func:`evaluate_exact` runs every task in float32 and
recomputes in float64 only:

- the first ``CALIBRATION_TASKS`` tasks, which measure the float32 error of this model: the
  largest error of a difference ``logit[j] - logit[t]``, relative to the task's largest
  ``|logit|`` (floored at float32's unit roundoff); every later recomputed task adds its own
  measurement, so the error only grows;
- every later task with a *near tie*: a query whose float32 top-two margin is at most
  ``HEADROOM * error * max|logit|`` of its task (:func:`near_ties`).

Every other decision is the float64 one, so the accuracies equal plain float64 evaluation's on
any thread count: the error bound is the measured one times ``HEADROOM`` (on the quickstart
model's 600 test episodes the largest error of any task was 1.3-1.4x the first 8 tasks' largest:
``scripts/bench_evaluation.py --check-headroom``, docs/benchmarks.md). Tests check it on episodes
made near-tied on purpose.

The float32 copy of a built-in backbone is channels_last (convolutions and pooling 2-3x faster
on CPU than float64), its Conv-4 blocks max-pool before normalising (``Conv4Block.pool_first``,
a quarter of the elementwise work) and its episode batch statistics are computed in two passes
(``BatchNorm.batch_statistics``): torch's channels_last kernel gives a variance off by ~1e-4
relative, which would make most tasks near ties.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from episodes.sampler import Episode
from metafilm.backbones import Backbone, BatchNorm, Conv4Block
from metafilm.interop import as_episode
from metafilm.learner import FiLMLearner
from metafilm.meta import Strategy, accuracies_of, query_logits
from metafilm.specs import AdaptSpec

CALIBRATION_TASKS = 8
HEADROOM = 8.0
FLOAT32_ROUNDOFF = 2.0**-24


@dataclass
class Tiebreak:
    """What an :func:`evaluate_exact` call did: ``tasks`` evaluated, ``recomputed`` in float64
    (calibration and near ties), and the calibrated relative ``error`` of a float32 logit
    difference."""

    tasks: int = 0
    recomputed: int = 0
    error: float = FLOAT32_ROUNDOFF


def near_ties(logits: Tensor, error: float) -> Tensor:
    """Which tasks of ``logits [tasks, queries, ways]`` have a query whose top-two margin is at
    most ``HEADROOM * error`` times the task's largest ``|logit|``: where a relative error of
    ``HEADROOM * error`` in a logit difference could change a prediction."""
    if logits.shape[-1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).amin(-1)
    scale = logits.abs().flatten(1).amax(-1)
    return margin <= HEADROOM * error * scale


def difference_errors(fast: Tensor, exact: Tensor) -> Tensor:
    """Per task of ``[tasks, queries, ways]`` logits: the largest error of a ``fast`` difference
    ``logit[j] - logit[t]`` (``t`` the ``fast`` prediction) against ``exact``'s, relative to the
    task's largest ``|exact|`` logit."""
    top = fast.argmax(-1, keepdim=True)
    error = (fast - fast.gather(-1, top)) - (exact - exact.gather(-1, top))
    scale = exact.abs().flatten(1).amax(-1).clamp_min(torch.finfo(exact.dtype).tiny)
    return error.abs().flatten(1).amax(-1) / scale


def float32_copy(learner: FiLMLearner) -> FiLMLearner:
    """The learner in float32: a built-in backbone channels_last, its Conv-4 blocks pooling
    first, its episode batch statistics in two passes (module docstring)."""
    fast = copy.deepcopy(learner).float()
    if isinstance(fast.backbone, Backbone):
        fast.backbone.to(memory_format=torch.channels_last)
        for module in fast.backbone.modules():
            if isinstance(module, BatchNorm):
                module.two_pass_statistics = True
            if isinstance(module, Conv4Block):
                module.pool_first = True
    return fast


def float32_episode(episode: Episode) -> Episode:
    """``episode`` with its images in float32, for :func:`float32_copy`."""
    return replace(episode, support_x=episode.support_x.float(), query_x=episode.query_x.float())


def _tasks(episode: Episode, which: Tensor) -> Episode:
    """The tasks ``which`` (indices) of ``episode``."""
    return replace(
        episode,
        support_x=episode.support_x[which],
        support_y=episode.support_y[which],
        query_x=episode.query_x[which],
        query_y=episode.query_y[which],
    )


def evaluate_exact(
    learner: FiLMLearner,
    episodes: Iterable[Episode],
    adapt: AdaptSpec,
    *,
    strategy: Strategy = "auto",
    tiebreak: Tiebreak | None = None,
) -> np.ndarray:
    """The accuracies :func:`metafilm.meta.evaluate` gives for the float64 ``learner``, computed
    in float32 where that provably decides the same (module docstring). ``tiebreak``, if given,
    is filled with what was recomputed."""
    if next(learner.parameters()).dtype != torch.float64:
        raise ValueError("evaluate_exact reproduces a float64 learner: call learner.double()")
    fast = float32_copy(learner)
    done = Tiebreak() if tiebreak is None else tiebreak
    accuracies: list[Tensor] = []
    for episode in map(as_episode, episodes):
        logits = query_logits(fast, float32_episode(episode), adapt, strategy=strategy).double()
        calibrating = torch.arange(episode.tasks) < CALIBRATION_TASKS - done.tasks
        if bool(calibrating.any()):
            _recompute(learner, episode, calibrating, logits, adapt, strategy, done)
        redo = near_ties(logits, done.error) & ~calibrating
        if bool(redo.any()):
            _recompute(learner, episode, redo, logits, adapt, strategy, done)
        done.tasks += episode.tasks
        accuracies.append(accuracies_of(logits, episode.query_y))
    return torch.cat(accuracies).numpy() if accuracies else np.zeros(0)


def _recompute(
    learner: FiLMLearner,
    episode: Episode,
    which: Tensor,
    logits: Tensor,
    adapt: AdaptSpec,
    strategy: Strategy,
    done: Tiebreak,
) -> None:
    """Overwrite the tasks ``which`` (a mask) of ``logits`` with the float64 ``learner``'s; their
    float32 errors raise ``done.error``."""
    tasks = which.nonzero().squeeze(1)
    exact = query_logits(learner, _tasks(episode, tasks), adapt, strategy=strategy)
    done.error = max(done.error, float(difference_errors(logits[tasks], exact).max()))
    done.recomputed += len(tasks)
    logits[tasks] = exact
