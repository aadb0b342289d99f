"""Batches in the layouts of other meta-learning libraries, as metafilm episodes.

:func:`as_episode` accepts, and returns an :class:`episodes.sampler.Episode` for:

- an ``Episode`` (returned as it is) or a single ``Task`` (a meta-batch of one);
- the torchmeta layout: a mapping ``{"train": (inputs, targets), "test": (inputs, targets)}``
  with a leading task dimension, ``inputs [tasks, N, ...]``, ``targets [tasks, N]`` ("train" is
  the support set, "test" the query set);
- a learn2learn task tuple ``(data [N, ...], labels [N])``: one task's examples, split into
  support and query by :func:`split_task`, or a list of such tuples (a meta-batch).

Labels may be any integers: each task is relabelled ``0..ways-1`` in increasing order of its
support labels, and its examples are put in metafilm's class-major order (support example
``j * shots + k`` is the ``k``-th example of label ``j``, keeping the order within a class). Every
class of a task needs the same number of support examples and the same number of query examples;
all tasks of a meta-batch need the same ways, shots, query and input shape. Inputs keep their
dtype and values (no rescaling).

Splitting a learn2learn task (:func:`split_task`), one of:

- by default, even positions are support and odd positions query: the convention of
  learn2learn's MAML examples, which draw ``2 * shots`` examples per class and adapt on the even
  ones;
- ``ways, shots, query``: within each class, in order of appearance, the first ``shots``
  examples are support and the next ``query`` are query (each class must have exactly
  ``shots + query``);
- ``support_mask``: a boolean ``[N]``, true for support examples; the rest are query.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from episodes.sampler import Episode, Task

ACCEPTED_LAYOUTS = (
    "an episodes.sampler.Episode or Task; "
    'a torchmeta batch {"train": (inputs [tasks, N, ...], targets [tasks, N]), '
    '"test": (inputs, targets)}; '
    "a learn2learn task tuple (data [N, ...], labels [N]); or a list of such task tuples"
)


def as_episode(
    batch: Any,
    *,
    ways: int | None = None,
    shots: int | None = None,
    query: int | None = None,
    support_mask: Tensor | None = None,
) -> Episode:
    """``batch`` in any layout of the module docstring as an ``Episode``.

    ``ways, shots, query`` or ``support_mask`` choose how learn2learn task tuples are split (see
    :func:`split_task`); they are refused for layouts that are already split.
    """
    split = {"ways": ways, "shots": shots, "query": query, "support_mask": support_mask}
    is_task_tuple = _is_task_tuple(batch)
    is_task_list = (
        isinstance(batch, Sequence)
        and not isinstance(batch, str)
        and not is_task_tuple
        and len(batch) > 0
        and all(_is_task_tuple(task) for task in batch)
    )
    if not (is_task_tuple or is_task_list) and any(v is not None for v in split.values()):
        raise ValueError(
            "ways, shots, query and support_mask split learn2learn task tuples; this batch is "
            f"a {type(batch).__name__}, which is already split into support and query"
        )
    if isinstance(batch, Episode):
        return batch
    if isinstance(batch, Task):
        return _stack([batch])
    if isinstance(batch, Mapping):
        return _from_torchmeta(batch)
    if is_task_tuple:
        return _stack([split_task(*batch, **split)])
    if is_task_list:
        return _stack([split_task(*task, **split) for task in batch])
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}; accepted: {ACCEPTED_LAYOUTS}"
    )


def split_task(
    data: Tensor,
    labels: Tensor,
    *,
    ways: int | None = None,
    shots: int | None = None,
    query: int | None = None,
    support_mask: Tensor | None = None,
) -> Task:
    """One learn2learn task ``(data [N, ...], labels [N])`` as a support/query ``Task``.

    The split is even/odd positions by default, ``ways, shots, query`` (first ``shots`` of each
    class support, next ``query`` query) or ``support_mask`` (true = support); see the module
    docstring.
    """
    _check_examples("data", data, "labels", labels, task_dim=False)
    counts_given = [v is not None for v in (ways, shots, query)]
    if any(counts_given) and not all(counts_given):
        raise ValueError("give ways, shots and query together (or none of them)")
    if all(counts_given) and support_mask is not None:
        raise ValueError("give either ways/shots/query or support_mask, not both")
    if support_mask is not None:
        mask = torch.as_tensor(support_mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != (len(labels),):
            raise ValueError(
                f"support_mask must be a boolean tensor of shape [{len(labels)}] (true = support); "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        mask = mask.to(labels.device)
    elif all(counts_given):
        mask = _first_shots_mask(labels, ways, shots, query)
    else:
        mask = torch.arange(len(labels), device=labels.device) % 2 == 0
    return _relabelled(data[mask], labels[mask], data[~mask], labels[~mask])


def _is_task_tuple(batch: Any) -> bool:
    return (
        isinstance(batch, tuple | list)
        and len(batch) == 2
        and all(isinstance(part, Tensor) for part in batch)
        and batch[1].dim() == 1
    )


def _first_shots_mask(labels: Tensor, ways: int, shots: int, query: int) -> Tensor:
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) != ways or bool((counts != shots + query).any()):
        found = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        raise ValueError(
            f"expected {ways} classes of shots + query = {shots + query} examples each; "
            f"the task has examples per label {found}"
        )
    # rank of each example within its class, in order of appearance
    same_class_before = (labels.unsqueeze(0) == labels.unsqueeze(1)).tril(-1).sum(1)
    return same_class_before < shots


def _from_torchmeta(batch: Mapping[Any, Any]) -> Episode:
    if set(batch) != {"train", "test"} or not all(
        isinstance(batch[key], tuple | list) and len(batch[key]) == 2 for key in ("train", "test")
    ):
        raise TypeError(
            f"a mapping batch must be torchmeta's {{'train': (inputs, targets), 'test': (inputs, "
            f"targets)}}; got keys {list(batch)}. Accepted: {ACCEPTED_LAYOUTS}"
        )
    (support_x, support_y), (query_x, query_y) = batch["train"], batch["test"]
    _check_examples('batch["train"] inputs', support_x, "targets", support_y, task_dim=True)
    _check_examples('batch["test"] inputs', query_x, "targets", query_y, task_dim=True)
    if len(support_x) != len(query_x):
        raise ValueError(
            f'batch["train"] has {len(support_x)} tasks and batch["test"] {len(query_x)}; '
            "they must hold the same tasks"
        )
    return _stack(
        [
            _relabelled(support_x[t], support_y[t], query_x[t], query_y[t])
            for t in range(len(support_x))
        ]
    )


def _check_examples(
    inputs_name: str, inputs: Tensor, labels_name: str, labels: Tensor, *, task_dim: bool
) -> None:
    layout = "[tasks, N]" if task_dim else "[N]"
    if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{inputs_name} and {labels_name} must be tensors")
    integer = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    if labels.dim() != (2 if task_dim else 1) or not integer:
        raise ValueError(
            f"{labels_name} must be integer class labels shaped {layout}; got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if tuple(inputs.shape[: labels.dim()]) != tuple(labels.shape) or inputs.dim() <= labels.dim():
        raise ValueError(
            f"{inputs_name} must be shaped {layout[:-1]}, ...] to match {labels_name} "
            f"{tuple(labels.shape)}; got {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise ValueError(
            f"{inputs_name} must be floating point (metafilm episodes hold float images, e.g. "
            f"x.float() / 255 for uint8 pixels); got {inputs.dtype}"
        )


def _relabelled(support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Task:
    """A task with labels ``0..ways-1`` (in increasing order of the given labels) in class-major
    order; checks that every class has as many support (and query) examples as the others."""
    classes, support_labels = torch.unique(support_y.long(), return_inverse=True)
    ways = len(classes)
    if ways < 2:
        raise ValueError(f"a task needs at least 2 classes in its support set; got {ways}")
    if len(query_y) == 0:
        raise ValueError("a task needs at least one query example")
    query_y = query_y.long()
    position = torch.searchsorted(classes, query_y).clamp(max=ways - 1)
    unknown = query_y[classes[position] != query_y]
    if len(unknown):
        raise ValueError(
            f"query labels {sorted(set(unknown.tolist()))} do not occur in the support set "
            f"(labels {classes.tolist()})"
        )
    for name, labels, size in (
        ("support", support_labels, len(support_y)),
        ("query", position, len(query_y)),
    ):
        counts = torch.bincount(labels, minlength=ways)
        if bool((counts != size // ways).any()) or size % ways:
            per_label = dict(zip(classes.tolist(), counts.tolist(), strict=True))
            raise ValueError(
                f"every class needs the same number of {name} examples; got examples per label "
                f"{per_label}"
            )
    support_order = torch.argsort(support_labels, stable=True)
    query_order = torch.argsort(position, stable=True)
    return Task(
        support_x=support_x[support_order],
        support_y=support_labels[support_order],
        query_x=query_x[query_order],
        query_y=position[query_order],
        ways=ways,
    )


def _stack(tasks: list[Task]) -> Episode:
    first = tasks[0]
    for i, task in enumerate(tasks):
        shape = (task.ways, task.shots, task.query, tuple(task.support_x.shape[1:]))
        expected = (first.ways, first.shots, first.query, tuple(first.support_x.shape[1:]))
        if shape != expected or tuple(task.query_x.shape[1:]) != expected[3]:
            raise ValueError(
                "all tasks of a meta-batch need the same (ways, shots, query, input shape); "
                f"task 0 has {expected}, task {i} has {shape}"
            )
    return Episode(
        support_x=torch.stack([task.support_x for task in tasks]),
        support_y=torch.stack([task.support_y for task in tasks]),
        query_x=torch.stack([task.query_x for task in tasks]),
        query_y=torch.stack([task.query_y for task in tasks]),
        ways=first.ways,
    )
