"""Exact evaluation at float32 speed: float64 decisions, recomputed only where float32 could differ.

Evaluation is float64 so that per-episode accuracies do not depend on the thread count or the CPU
(a change in the order of float32 sums flips near-tied predictions). But a prediction is the
argmax of a task's query logits, and float32 can only change it where the two largest logits of
a query are closer than twice the float32 error of a logit. So :func:`evaluate_exact` runs every
task in float32 and recomputes in float64 only:

- the first ``CALIBRATION_TASKS`` tasks, which measure the float32 error of this model: the
  largest ``|logit32 - logit64|`` relative to the task's largest ``|logit64|`` (floored at float32's
  unit roundoff);
- every later task with a *near tie*: a query whose float32 top-two margin is at most
  ``2 * HEADROOM * error * max|logit32|`` of its task (:func:`near_ties`).

Every other decision is the float64 one, so the accuracies equal plain float64 evaluation's on
any thread count: the error bound is the measured one times ``HEADROOM`` (errors of independent
roundings spread over a few times their typical size; the calibration takes the largest of
thousands of logits). Tests check it on episodes made near-tied on purpose.

The float32 copy of a built-in backbone is channels_last (convolutions and pooling 2-3x faster
on CPU than float64). With batch norm in episode mode its batch statistics are then computed in
two passes (``BatchNorm.two_pass_statistics``): torch's channels_last kernel gives a variance off
by ~1e-4 relative, which would make most tasks near ties.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from episodes.sampler import Episode
from metafilm.backbones import Backbone, BatchNorm
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
    (calibration and near ties), and the calibrated relative ``error`` of a float32 logit."""

    tasks: int = 0
    recomputed: int = 0
    error: float = FLOAT32_ROUNDOFF


def near_ties(logits: Tensor, error: float) -> Tensor:
    """Which tasks of ``logits [tasks, queries, ways]`` have a query whose top-two margin is at
    most ``2 * HEADROOM * error`` times the task's largest ``|logit|``: where a relative error of
    ``HEADROOM * error`` per logit could change a prediction."""
    if logits.shape[-1] < 2:
        return torch.zeros(logits.shape[0], dtype=torch.bool)
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).amin(-1)
    scale = logits.abs().flatten(1).amax(-1)
    return margin <= 2 * HEADROOM * error * scale


def _float32_copy(learner: FiLMLearner) -> FiLMLearner:
    """The learner in float32: a built-in backbone channels_last, its episode batch statistics in
    two passes (module docstring)."""
    fast = copy.deepcopy(learner).float()
    if isinstance(fast.backbone, Backbone):
        fast.backbone.to(memory_format=torch.channels_last)
        for module in fast.backbone.modules():
            if isinstance(module, BatchNorm):
                module.two_pass_statistics = True
    return fast


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
    fast = _float32_copy(learner)
    done = Tiebreak() if tiebreak is None else tiebreak
    accuracies: list[Tensor] = []
    for episode in map(as_episode, episodes):
        fast_episode = replace(
            episode, support_x=episode.support_x.float(), query_x=episode.query_x.float()
        )
        logits = query_logits(fast, fast_episode, adapt, strategy=strategy).double()
        calibrating = torch.arange(episode.tasks) < CALIBRATION_TASKS - done.tasks
        if bool(calibrating.any()):
            which = calibrating.nonzero().squeeze(1)
            exact = query_logits(learner, _tasks(episode, which), adapt, strategy=strategy)
            error = (logits[which] - exact).abs().flatten(1).amax(-1)
            scale = exact.abs().flatten(1).amax(-1).clamp_min(torch.finfo(exact.dtype).tiny)
            done.error = max(done.error, float((error / scale).max()))
            logits[which] = exact
        redo = near_ties(logits, done.error) & ~calibrating
        if bool(redo.any()):
            which = redo.nonzero().squeeze(1)
            logits[which] = query_logits(learner, _tasks(episode, which), adapt, strategy=strategy)
        done.tasks += episode.tasks
        done.recomputed += int(calibrating.sum()) + int(redo.sum())
        accuracies.append(accuracies_of(logits, episode.query_y))
    return torch.cat(accuracies).numpy() if accuracies else np.zeros(0)
