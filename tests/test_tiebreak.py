"""Exact evaluation at float32 speed (metafilm.tiebreak): on episodes made near-tied on purpose,
plain float32 evaluation decides some tasks differently from float64, and evaluate_exact gives the
float64 accuracies exactly, recomputing little on ordinary episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from episodes.sampler import Episode
from metafilm.backbones import BatchNorm
from metafilm.learner import FiLMLearner
from metafilm.meta import evaluate
from metafilm.specs import AdaptSpec, ModelSpec
from metafilm.tiebreak import (
    CALIBRATION_TASKS,
    Tiebreak,
    difference_errors,
    evaluate_exact,
    near_ties,
)

IMAGE, WAYS, SHOTS, QUERY = 28, 5, 1, 6
NUDGES = (1e-9, 1e-7, 3e-7, 1e-6, 3e-6)
"""Relative pixel differences between two classes' support images: ties float32 cannot resolve
(1e-9 rounds away) and ties within a few float32 roundings."""

pytestmark = pytest.mark.usefixtures("one_thread")


def _learner(bn_mode: str, head: str = "prototype") -> FiLMLearner:
    torch.manual_seed(0)
    spec = ModelSpec(
        in_channels=1, image_size=IMAGE, width=16, bn_mode=bn_mode, head=head, film_sites="all"
    )
    learner = FiLMLearner(spec, AdaptSpec(inner_steps=1, inner_lr=0.1))
    if bn_mode == "running":  # statistics a trained network would have, not the identity
        with torch.no_grad():
            for name, buffer in learner.backbone.named_buffers():
                if name.endswith("running_mean"):
                    buffer.normal_(0, 0.1)
                elif name.endswith("running_var"):
                    buffer.uniform_(0.05, 0.2)
    return learner.double().eval()


def _episodes(tasks: int, tied_from: int, seed: int = 0) -> list[Episode]:
    """One episode of ``tasks`` random tasks; from task ``tied_from`` on, class 1's support image
    is class 0's nudged by one of NUDGES, so that every query is nearly tied between the two."""
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(tasks, WAYS * SHOTS, 1, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    query_x = torch.rand(tasks, WAYS * QUERY, 1, IMAGE, IMAGE, generator=g, dtype=torch.float64)
    for t in range(tied_from, tasks):
        nudge = NUDGES[(t - tied_from) % len(NUDGES)]
        noise = torch.randn(1, IMAGE, IMAGE, generator=g, dtype=torch.float64)
        support_x[t, 1] = support_x[t, 0] * (1 + nudge * noise)
        query_x[t, :QUERY] = support_x[t, 0]  # class 0's queries: its support image itself
        query_x[t, QUERY : 2 * QUERY] = support_x[t, 1]
    labels = torch.arange(WAYS)
    return [
        Episode(
            support_x=support_x,
            support_y=labels.repeat_interleave(SHOTS).expand(tasks, -1),
            query_x=query_x,
            query_y=labels.repeat_interleave(QUERY).expand(tasks, -1),
            ways=WAYS,
        )
    ]


@pytest.mark.parametrize(("bn_mode", "head"), [("episode", "prototype"), ("running", "cosine")])
def test_near_tied_tasks_get_the_float64_decisions_that_float32_misses(bn_mode, head):
    learner = _learner(bn_mode, head)
    adapt = AdaptSpec(inner_steps=1, inner_lr=0.1)
    episodes = _episodes(tasks=40, tied_from=CALIBRATION_TASKS)
    float64 = evaluate(learner, episodes, adapt)
    float32 = evaluate(_learner(bn_mode, head).float(), [_as_float32(e) for e in episodes], adapt)
    assert (float32 != float64).sum() >= 3  # the episodes do test something
    done = Tiebreak()
    exact = evaluate_exact(learner, episodes, adapt, tiebreak=done)
    np.testing.assert_array_equal(exact, float64)
    assert done.tasks == 40
    assert done.recomputed >= int((float32 != float64).sum())


def _as_float32(episode: Episode) -> Episode:
    return Episode(
        support_x=episode.support_x.float(),
        support_y=episode.support_y,
        query_x=episode.query_x.float(),
        query_y=episode.query_y,
        ways=episode.ways,
    )


@pytest.mark.parametrize("bn_mode", ["episode", "running"])
def test_ordinary_episodes_are_decided_in_float32(bn_mode):
    learner = _learner(bn_mode)
    adapt = AdaptSpec(inner_steps=1, inner_lr=0.1)
    episodes = _episodes(tasks=40, tied_from=40, seed=1)
    done = Tiebreak()
    exact = evaluate_exact(learner, episodes, adapt, tiebreak=done)
    np.testing.assert_array_equal(exact, evaluate(learner, episodes, adapt))
    assert CALIBRATION_TASKS <= done.recomputed < 40 // 2
    assert 2.0**-24 <= done.error < 1e-4


def test_a_near_tie_is_a_margin_within_the_float32_error_of_the_largest_logit():
    logits = torch.tensor(
        [
            [[10.0, 9.9, 0.0], [1.0, 0.0, 0.0]],  # margins 0.1 and 1: far at error 1e-3
            [[10.0, 9.9, 0.0], [1.0, 1.0 - 1e-3, 0.0]],  # 1e-3 <= 8 * 1e-4 * 10
            [[-5.0, -5.0, -20.0], [3.0, 0.0, 0.0]],  # an exact tie
        ],
        dtype=torch.float64,
    )
    assert near_ties(logits, 1e-4).tolist() == [False, True, True]
    assert near_ties(logits, 1e-7).tolist() == [False, False, True]


def test_the_calibrated_error_is_that_of_differences_from_the_float32_prediction():
    exact = torch.tensor([[[4.0, 1.0, -2.0], [0.5, 3.0, 1.0]]], dtype=torch.float64)
    fast = exact + torch.tensor([[[1e-3, 1e-3, 1e-3], [0.0, 2e-3, -1e-3]]], dtype=torch.float64)
    # a shift common to a query's logits is no error; query 2: differences from class 1 are off
    # by 2e-3 and 3e-3; the task's largest |logit| is 4
    assert float(difference_errors(fast, exact)[0]) == pytest.approx(3e-3 / 4, rel=1e-12)


def test_a_float32_learner_is_refused():
    with pytest.raises(ValueError, match=r"learner\.double\(\)"):
        evaluate_exact(_learner("episode").float(), [], AdaptSpec())


def test_two_pass_statistics_are_batch_norm_and_precise_in_channels_last():
    torch.manual_seed(0)
    x = (torch.randn(80, 16, 21, 21, dtype=torch.float64) * 2 + 3).requires_grad_()
    film = (0.1 * torch.randn(16, dtype=torch.float64), 0.1 * torch.randn(16, dtype=torch.float64))
    bn = BatchNorm(16, "episode").double()
    reference = bn(x, film)
    bn.two_pass_statistics = True
    two_pass = bn(x, film)
    torch.testing.assert_close(two_pass, reference, rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(two_pass.square().sum(), x)
    (gx_reference,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(gx, gx_reference, rtol=1e-9, atol=1e-9)

    fast = x.detach().float().contiguous(memory_format=torch.channels_last)
    film32 = tuple(f.float() for f in film)
    bn.float()
    errors = {}
    for two_pass_statistics in (False, True):
        bn.two_pass_statistics = two_pass_statistics
        error = (bn(fast, film32).double() - reference).abs().max()
        errors[two_pass_statistics] = float(error.detach())
    assert errors[True] < 1e-5 < errors[False]  # torch's channels_last kernel: ~1e-4
