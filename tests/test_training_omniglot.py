"""Meta-training on real Omniglot learns: 5-way 1-shot accuracy on fixed Vinyals test episodes.

Conv-4 (32 filters) at 28x28, trained on the Vinyals `train` split for a fixed number of steps and
evaluated on 100 fixed episodes of the `test` split (15 query images per class, batch norm in
episode mode, i.e. transductive, for the outer-loop model; running statistics for the frozen one).
Chance is 20%. One thread: on shared cores OpenMP's waiting threads make two several times slower.
"""

from __future__ import annotations

import pytest
import torch

from episodes.classes import ClassImages
from episodes.sampler import EpisodeSampler, FixedEpisodes, gather
from metafilm.config import PretrainConfig
from metafilm.learner import FiLMLearner
from metafilm.meta import evaluate, input_builder, make_optimizer, meta_step
from metafilm.pretrain import pretrain_backbone
from metafilm.specs import AdaptSpec, ModelSpec, OuterSpec

pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.usefixtures("one_thread")]

WAYS, SHOTS, TRAIN_QUERY, TEST_QUERY, TEST_EPISODES = 5, 1, 5, 15, 100


def _test_accuracy(learner, test, adapt) -> float:
    episodes = FixedEpisodes(test, WAYS, SHOTS, TEST_QUERY, seed=1, episodes=TEST_EPISODES)
    accuracies = evaluate(learner, (gather(test, b) for b in episodes.batches(50)), adapt)
    assert accuracies.shape == (TEST_EPISODES,)
    return float(accuracies.mean())


def _meta_train(learner, classes, adapt, outer, steps) -> list[dict[str, float]]:
    build = input_builder(learner, classes)
    optimizer = make_optimizer(learner, outer)
    sampler = EpisodeSampler(classes, WAYS, SHOTS, TRAIN_QUERY, seed=0)
    return [
        meta_step(
            learner, optimizer, build(sampler.sample(step, outer.meta_batch_size)), adapt, outer
        )
        for step in range(steps)
    ]


def test_outer_loop_meta_training_reaches_high_one_shot_accuracy(omniglot_split):
    train, test = omniglot_split("train"), omniglot_split("test")
    torch.manual_seed(0)
    adapt = AdaptSpec(inner_steps=1, inner_lr=0.5)
    outer = OuterSpec(lr=0.005, meta_batch_size=4)
    learner = FiLMLearner(ModelSpec(width=32), adapt)
    log = _meta_train(learner, train, adapt, outer, steps=120)
    assert sum(m["loss"] for m in log[-10:]) < sum(m["loss"] for m in log[:10]) / 3
    assert log[-1]["film_adapted/block1"] > 0  # the encoder and the inner loop moved off identity
    assert _test_accuracy(learner, test, adapt) >= 0.80


def test_frozen_backbone_after_pretraining_reaches_high_one_shot_accuracy(omniglot_split):
    train, test = omniglot_split("train"), omniglot_split("test")
    classes = 400  # the first 100 training characters, 4 rotations each: keeps pretraining short
    subset = ClassImages(
        train.images[: int(train.offsets[classes])],
        train.offsets[: classes + 1],
        train.names[:classes],
    )
    torch.manual_seed(0)
    model = ModelSpec(width=32, backbone_mode="frozen", bn_mode="running", film_sites=("block4",))
    adapt = AdaptSpec(inner_steps=1, inner_lr=0.5)
    outer = OuterSpec(lr=0.005, meta_batch_size=8)
    learner = FiLMLearner(model, adapt)
    settings = PretrainConfig(steps=300, batch_size=64, lr=0.003)
    pretrain_backbone(learner.backbone, subset, settings, seed=0)
    backbone = {name: t.clone() for name, t in learner.backbone.state_dict().items()}
    log = _meta_train(learner, subset, adapt, outer, steps=150)
    assert log[-1]["film_adapted/block4"] > 0
    for name, tensor in learner.backbone.state_dict().items():
        assert torch.equal(tensor, backbone[name]), name
    assert _test_accuracy(learner, test, adapt) >= 0.80
