"""Heads, the task encoder and the learner's structure, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from episodes.sampler import Task
from metafilm.backbones import Conv4
from metafilm.encoder import TaskEncoder, deviations_from_flat, task_representation
from metafilm.heads import LinearHead, build_head, class_prototypes, prototype_logits
from metafilm.learner import FiLMLearner
from metafilm.meta import task_loss
from metafilm.specs import AdaptSpec, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(seed=0, n=12, dim=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64)


def test_prototypes_are_class_means_and_logits_rank_by_scaled_squared_distance():
    support, query = _features(0, 6), _features(1, 5)
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    onehot = F.one_hot(labels, 3).double()
    prototypes = class_prototypes(support, onehot)
    expected = torch.stack([support[labels == k].mean(0) for k in range(3)])
    torch.testing.assert_close(prototypes, expected, rtol=1e-12, atol=1e-12)
    scale = torch.tensor(0.7, dtype=torch.float64)
    logits = prototype_logits(query, prototypes, scale)
    distances = torch.cdist(query, expected).pow(2)
    # the Proto-MAML layer equals -scale * distance up to -scale |q|^2, the same for every class
    torch.testing.assert_close(
        logits,
        -scale * distances + scale * query.pow(2).sum(-1, keepdim=True),
        rtol=1e-10,
        atol=1e-10,
    )
    torch.testing.assert_close(
        logits.log_softmax(-1), (-scale * distances).log_softmax(-1), rtol=1e-10, atol=1e-10
    )


def test_linear_head_refuses_tasks_of_another_width_and_unknown_heads_are_refused():
    head = LinearHead(7, 5)
    with pytest.raises(ValueError, match="head_ways"):
        head(None, torch.zeros(3, 3), _features().float())
    with pytest.raises(ValueError, match="unknown head"):
        build_head("euclidean", 7, 5)


def test_task_representation_ignores_the_order_and_labelling_of_classes():
    features = _features(0, 6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    relabelled = torch.tensor([2, 2, 0, 0, 1, 1])
    a = task_representation(features, F.one_hot(labels, 3).double())
    b = task_representation(features.flip(0), F.one_hot(relabelled.flip(0), 3).double())
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, features.mean(0), rtol=1e-12, atol=1e-12)  # balanced classes


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_encoder_predicts_exact_zeros_until_its_post_multipliers_move(kind):
    sites = {"s1": 3, "s2": 4}
    encoder = TaskEncoder(7, sites, kind, hidden=5).double()
    representation = _features(0, 1)[0]
    deviations = encoder(representation)
    assert list(deviations) == ["s1", "s2"]
    for site, (dgamma, dbeta) in deviations.items():
        assert torch.equal(dgamma, torch.zeros(sites[site], dtype=torch.float64))
        assert torch.equal(dbeta, torch.zeros(sites[site], dtype=torch.float64))
    with torch.no_grad():
        encoder.postmult.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    raw = encoder.net(representation)
    deviations = encoder(representation)
    expected = {"s1": (1 * raw[0:3], 2 * raw[3:6]), "s2": (3 * raw[6:10], 4 * raw[10:14])}
    for site, pair in expected.items():
        for got, want in zip(deviations[site], pair, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_flat_vectors_cut_into_sites_in_order():
    cut = deviations_from_flat(torch.arange(10.0), {"a": 2, "b": 3})
    assert [t.tolist() for pair in cut.values() for t in pair] == [
        [0, 1],
        [2, 3],
        [4, 5, 6],
        [7, 8, 9],
    ]


def test_zero_deviations_through_the_learner_reproduce_the_plain_backbone():
    torch.manual_seed(0)
    learner = FiLMLearner(ModelSpec(), AdaptSpec(inner_steps=0))
    g = torch.Generator().manual_seed(1)
    support_x = torch.rand(5, 1, 28, 28, generator=g)
    query_x = torch.rand(10, 1, 28, 28, generator=g)
    support_y, query_y = torch.arange(5), torch.arange(5).repeat(2)
    plain = learner.backbone(support_x)
    onehot = F.one_hot(support_y, 5).float()
    predicted = learner.encoder(task_representation(plain, onehot))
    assert all(bool((t == 0).all()) for pair in predicted.values() for t in pair)
    torch.testing.assert_close(learner.backbone(support_x, predicted), plain, rtol=0, atol=1e-6)
    # the whole task through the learner equals prototypes of the plain backbone's features
    task = Task(support_x, support_y, query_x, query_y, 5)
    loss, metrics = task_loss(dict(learner.named_parameters()), {}, learner, task, AdaptSpec(0))
    features = learner.backbone(torch.cat([support_x, query_x]))
    distances = torch.cdist(features[5:].double(), features[:5].double()).pow(2)
    expected = F.cross_entropy(-learner.head.scale.double() * distances, query_y)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_learner_structure_sites_and_frozen_mode():
    backbone = Conv4(1, 4, 16, "running")
    spec = ModelSpec(
        image_size=16,
        width=4,
        film_sites=("block3", "block4"),
        bn_mode="running",
        backbone_mode="frozen",
        encoder="none",
    )
    learner = FiLMLearner(spec, AdaptSpec(learn_inner_lr=True, inner_lr=0.2), backbone=backbone)
    assert learner.used_sites == ("block3", "block4")
    assert learner.first_used_block == 2 and learner.caches_prefix
    assert learner.encoder is None
    assert learner.inner_lrs.shape == (16,) and torch.all(learner.inner_lrs == 0.2)
    assert not any(p.requires_grad for p in learner.backbone.parameters())
    learner.train()
    assert learner.training and not learner.backbone.training
    with pytest.raises(ValueError, match="film_sites selects no FiLM site"):
        FiLMLearner(ModelSpec(film_sites=()), AdaptSpec())
    with pytest.raises(ValueError, match="backbone_mode"):
        FiLMLearner(ModelSpec(backbone_mode="thawed"), AdaptSpec())
    with pytest.raises(ValueError, match="unknown encoder"):
        TaskEncoder(4, {"a": 2}, "transformer")


def test_cosine_head_is_scaled_cosine_similarity_to_normalised_prototypes() -> None:
    torch.manual_seed(0)
    support, query = torch.randn(6, 5), torch.randn(4, 5)
    onehot = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    head = build_head("cosine", 5, 3, scale=7.0)
    s, q = support.double().numpy(), query.double().numpy()
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    prototypes = np.stack([s[2 * k : 2 * k + 2].mean(0) for k in range(3)])
    prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
    expected = 7.0 * (q / np.linalg.norm(q, axis=1, keepdims=True)) @ prototypes.T
    np.testing.assert_allclose(head(support, onehot, query).detach().numpy(), expected, rtol=1e-5)
    assert head.uses_support and head.scale.item() == 7.0
