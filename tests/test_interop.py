"""Batches in torchmeta's and learn2learn's layouts become the same episodes as native ones."""

from __future__ import annotations

import pytest
import torch

from episodes.sampler import Episode
from metafilm.interop import as_episode, split_task
from metafilm.learner import FiLMLearner
from metafilm.meta import meta_backward
from metafilm.specs import AdaptSpec, ModelSpec

IMAGE, WAYS, SHOTS, QUERY, TASKS = 16, 4, 2, 3, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def native(shots: int = SHOTS, query: int = QUERY, tasks: int = TASKS) -> Episode:
    """A class-major episode with labels 0..ways-1, as `episodes.sampler.gather` makes."""
    g = torch.Generator().manual_seed(0)
    return Episode(
        support_x=torch.rand(tasks, WAYS * shots, 1, IMAGE, IMAGE, generator=g),
        support_y=torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1),
        query_x=torch.rand(tasks, WAYS * query, 1, IMAGE, IMAGE, generator=g),
        query_y=torch.arange(WAYS).repeat_interleave(query).repeat(tasks, 1),
        ways=WAYS,
    )


def assert_same_episode(got: Episode, expected: Episode) -> None:
    assert got.ways == expected.ways
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert got.support_y.dtype == got.query_y.dtype == torch.int64


def torchmeta_batch(episode: Episode, label_of: torch.Tensor, seed: int = 1) -> dict:
    """The episode in torchmeta's layout: the classes' examples interleaved at random (each class
    keeping the order of its own examples), label j written as label_of[j]."""
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for key, x, y in (
        ("train", episode.support_x, episode.support_y),
        ("test", episode.query_x, episode.query_y),
    ):
        orders = []
        for labels in y:
            slots = labels[torch.randperm(len(labels), generator=g)]  # a random class sequence
            order = torch.empty_like(labels)
            for j in range(WAYS):
                order[slots == j] = (labels == j).nonzero().squeeze(1)
            orders.append(order)
        rows, order = torch.arange(len(x)).unsqueeze(1), torch.stack(orders)
        assert not torch.equal(order, torch.arange(y.shape[1]).expand_as(order))
        parts[key] = (x[rows, order], label_of[y[rows, order]])
    return parts


def test_an_episode_passes_through_and_a_task_becomes_a_batch_of_one():
    episode = native()
    assert as_episode(episode) is episode
    one = Episode(
        episode.support_x[1:2],
        episode.support_y[1:2],
        episode.query_x[1:2],
        episode.query_y[1:2],
        WAYS,
    )
    assert_same_episode(as_episode(episode.task(1)), one)


def test_torchmeta_layout_is_sorted_class_major_and_relabelled():
    episode = native()
    monotonic = torch.tensor([3, 10, 11, 40])  # increasing: relabelling recovers 0..ways-1
    assert_same_episode(as_episode(torchmeta_batch(episode, monotonic)), episode)


def _losses(episode: Episode) -> torch.Tensor:
    torch.manual_seed(0)
    spec = ModelSpec(width=8, image_size=IMAGE, encoder="linear", head="prototype")
    adapt = AdaptSpec(inner_steps=1, inner_lr=0.5)
    learner = FiLMLearner(spec, adapt).double()
    with torch.no_grad():
        learner.encoder.postmult.normal_()
    as_double = Episode(
        episode.support_x.double(),
        episode.support_y,
        episode.query_x.double(),
        episode.query_y,
        WAYS,
    )
    return meta_backward(learner, as_double, adapt)["loss"]


def test_torchmeta_layout_gives_the_native_loss_under_any_labelling():
    episode = native()
    permuted = torch.tensor([7, 2, 9, 0])  # not increasing: labels differ, the tasks do not
    converted = as_episode(torchmeta_batch(episode, permuted))
    assert not torch.equal(converted.support_x, episode.support_x)  # classes in another order
    torch.testing.assert_close(_losses(converted), _losses(episode), rtol=1e-10, atol=1e-12)


def learn2learn_task(episode: Episode, t: int, per_class_order: list[str], label_of) -> tuple:
    """Task t as a learn2learn (data, labels) tuple: classes one after the other, each class's
    examples in `per_class_order` ('s' = next support example, 'q' = next query example)."""
    data, labels = [], []
    for j in range(WAYS):
        support = iter(episode.support_x[t][episode.support_y[t] == j])
        query = iter(episode.query_x[t][episode.query_y[t] == j])
        for kind in per_class_order:
            data.append(next(support if kind == "s" else query))
            labels.append(int(label_of[j]))
    return torch.stack(data), torch.tensor(labels)


def test_learn2learn_tasks_split_even_odd_by_default():
    episode = native(shots=2, query=2)
    label_of = torch.tensor([5, 6, 8, 9])
    tasks = [learn2learn_task(episode, t, ["s", "q", "s", "q"], label_of) for t in range(TASKS)]
    assert_same_episode(as_episode(tasks), episode)
    first = as_episode(tasks[0])
    assert first.tasks == 1 and torch.equal(first.query_x[0], episode.query_x[0])


def test_learn2learn_tasks_split_by_counts_or_mask():
    episode = native(shots=SHOTS, query=QUERY)
    order = ["s", "q", "q", "s", "q"]  # within each class: 2 support, 3 query, mixed
    label_of = torch.arange(WAYS)
    data, labels = learn2learn_task(episode, 0, order, label_of)
    mask = torch.tensor([kind == "s" for kind in order] * WAYS)
    by_mask = split_task(data, labels, support_mask=mask)
    assert torch.equal(by_mask.support_x, episode.support_x[0])
    assert torch.equal(by_mask.query_x, episode.query_x[0])

    first_shots = ["s", "s", "q", "q", "q"]
    data, labels = learn2learn_task(episode, 0, first_shots, label_of)
    per_class = len(first_shots)  # round robin over the classes; each keeps its own order
    round_robin = torch.arange(WAYS * per_class).view(WAYS, per_class).T.reshape(-1)
    data, labels = data[round_robin], labels[round_robin]
    task = split_task(data, labels, ways=WAYS, shots=SHOTS, query=QUERY)
    assert torch.equal(task.support_x, episode.support_x[0])
    assert torch.equal(task.query_x, episode.query_x[0])
    batch = as_episode([(data, labels)] * 2, ways=WAYS, shots=SHOTS, query=QUERY)
    assert batch.tasks == 2 and batch.shots == SHOTS and batch.query == QUERY


def test_errors_name_the_problem_and_the_accepted_layouts():
    episode = native()
    with pytest.raises(TypeError, match=r"cannot read a batch of type str; accepted: .*torchmeta"):
        as_episode("batch")
    with pytest.raises(TypeError, match=r"torchmeta's .*got keys \['support', 'query'\]"):
        as_episode({"support": (1, 2), "query": (3, 4)})
    with pytest.raises(ValueError, match="already split into support and query"):
        as_episode(episode, ways=WAYS, shots=SHOTS, query=QUERY)

    batch = torchmeta_batch(episode, torch.arange(WAYS))
    images, labels = batch["train"]
    with pytest.raises(ValueError, match=r"floating point .*x.float\(\) / 255.*uint8"):
        as_episode({**batch, "train": ((images * 255).to(torch.uint8), labels)})
    with pytest.raises(
        ValueError, match=r"targets must be integer class labels shaped \[tasks, N\]"
    ):
        as_episode({**batch, "train": (images, labels.float())})
    unbalanced = labels.clone()
    unbalanced[torch.arange(TASKS), (labels == 1).int().argmax(1)] = 0  # 3 of label 0, 1 of 1
    with pytest.raises(ValueError, match=r"same number of support examples.*\{0: 3, 1: 1, 2: 2"):
        as_episode({**batch, "train": (images, unbalanced)})
    query_images, query_labels = batch["test"]
    with pytest.raises(ValueError, match=r"query labels \[9\] do not occur in the support set"):
        as_episode(
            {**batch, "test": (query_images, torch.where(query_labels == 2, 9, query_labels))}
        )

    data, labels = learn2learn_task(native(2, 2), 0, ["s", "q", "s", "q"], torch.arange(WAYS))
    with pytest.raises(ValueError, match=r"shots \+ query = 5 examples each.*\{0: 4, 1: 4"):
        split_task(data, labels, ways=WAYS, shots=2, query=3)
    with pytest.raises(ValueError, match="ways, shots and query together"):
        split_task(data, labels, shots=2)
    with pytest.raises(ValueError, match=r"support_mask must be a boolean tensor of shape \[16\]"):
        split_task(data, labels, support_mask=torch.ones(16))
    other = learn2learn_task(native(2, 2), 0, ["s", "q", "s", "q"], torch.arange(WAYS))
    with pytest.raises(ValueError, match=r"same \(ways, shots, query, input shape\)"):
        as_episode([(data, labels), (other[0][:-4], other[1][:-4])])
