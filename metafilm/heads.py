"""Classifier heads on (FiLM-modulated) embeddings: one `Head` subclass each, registered by name.

- ``prototype`` (:class:`PrototypeHead`): a linear layer built from the support prototypes ``c_k``
  (Proto-MAML: ``W_k = 2 c_k``, ``b_k = -|c_k|^2``, which ranks classes as the negative squared
  Euclidean distance does, ``-|q - c_k|^2`` differing only by ``-|q|^2``, the same for every
  class), times a learned metric scale (TADAM). It has no per-task weights: it is rebuilt from the
  support features of whatever deviations are current, at every inner step and for the query.
- ``cosine`` (:class:`CosineHead`): the same from L2-normalised features, cosine similarity times a
  learned scale (Meta-Baseline); suits pretrained embeddings.
- ``linear`` (:class:`LinearHead`): one head ``[head_ways, feature_dim]`` shared by all tasks and
  learned in the outer loop (CAVIA); only the FiLM deviations adapt to a task.

Every head takes ``(support_features, support_onehot, query_features)`` and returns query logits,
so the meta code treats them alike; ``uses_support`` tells it whether the support features are
read (a head that reads none takes ``None`` for them, and the query goes through the network
alone).

A new head is one subclass of :class:`Head` with ``@register_head("name")``: ``ModelSpec.head``
(``model.head`` in a config) then names it and :func:`build_head` builds it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HeadClass = TypeVar("HeadClass", bound="type[Head]")


def class_prototypes(features: Tensor, onehot: Tensor) -> Tensor:
    """Mean feature of each class, ``[ways, D]``, from ``features [S, D]``, ``onehot [S, ways]``."""
    return (onehot.transpose(-1, -2) @ features) / onehot.sum(-2).unsqueeze(-1)


def prototype_logits(query_features: Tensor, prototypes: Tensor, scale: Tensor) -> Tensor:
    """``scale * (2 q.c_k - |c_k|^2)``: the Proto-MAML linear layer on ``query_features [Q, D]``."""
    weight = 2 * prototypes
    bias = -prototypes.pow(2).sum(-1)
    return scale * torch.addmm(bias, query_features, weight.transpose(-1, -2))


class Head(nn.Module, abc.ABC):
    """A classifier head: a task's query logits ``[Q, ways]`` from the support features
    ``[S, D]`` (``None`` if ``uses_support`` is false), their one-hot labels ``[S, ways]`` and the
    query features ``[Q, D]``.

    Example::

        @register_head("nearest")
        class NearestHead(Head):
            # Negative squared distance to the prototypes (Snell et al. 2017), unscaled.

            @classmethod
            def from_settings(cls, feature_dim, ways, scale, learn_scale):
                return cls()

            def forward(self, support_features, support_onehot, query_features):
                prototypes = class_prototypes(support_features, support_onehot)
                return -torch.cdist(query_features, prototypes).pow(2)

    """

    uses_support: bool = True
    """Whether ``forward`` reads the support features."""

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, feature_dim: int, ways: int, scale: float, learn_scale: bool) -> Head:
        """The head for embeddings of ``feature_dim`` and tasks of ``ways`` classes, with the
        initial metric ``scale`` (learned unless ``learn_scale`` is false) where it has one."""

    @abc.abstractmethod
    def forward(
        self, support_features: Tensor | None, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        """The query logits ``[Q, ways]``."""


HEADS: dict[str, type[Head]] = {}
"""Every head a ``ModelSpec.head`` can name, by that name (see :func:`register_head`)."""


def register_head(name: str) -> Callable[[HeadClass], HeadClass]:
    """Class decorator: make a :class:`Head` subclass the head named ``name``."""

    def register(head: HeadClass) -> HeadClass:
        if name in HEADS:
            raise ValueError(f"a head named {name!r} is registered already: {HEADS[name]}")
        HEADS[name] = head
        return head

    return register


@register_head("prototype")
class PrototypeHead(Head):
    """Prototypical Networks' classifier (Snell et al. 2017, "Prototypical Networks for Few-shot
    Learning") as the linear layer of Proto-MAML (Triantafillou et al. 2020), times a metric
    scale (TADAM, Oreshkin et al. 2018) initialised to ``scale`` and learned unless
    ``learn_scale`` is false.

    Example::

        >>> head = PrototypeHead(scale=1.0)
        >>> onehot = F.one_hot(torch.arange(5).repeat(2), 5).float()  # 5-way 2-shot
        >>> head(torch.randn(10, 64), onehot, torch.randn(15, 64)).shape
        torch.Size([15, 5])
    """

    def __init__(self, scale: float = 1.0, learn_scale: bool = True) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    @classmethod
    def from_settings(
        cls, feature_dim: int, ways: int, scale: float, learn_scale: bool
    ) -> PrototypeHead:
        """Any ``feature_dim`` and ``ways``: the head only holds its scale."""
        return cls(scale, learn_scale)

    def forward(
        self, support_features: Tensor, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        prototypes = class_prototypes(support_features, support_onehot)
        return prototype_logits(query_features, prototypes, self.scale)


@register_head("cosine")
class CosineHead(PrototypeHead):
    """Prototypes of the L2-normalised support features, compared with the query by cosine
    similarity times a learned scale (initialised to ``scale``): the cosine classifier of
    Baseline++ (Chen et al. 2019, "A Closer Look at Few-shot Classification") over prototypes, as
    in Meta-Baseline (Chen et al. 2021), with TADAM's metric scaling. Pretrained classifier
    embeddings tell classes apart by direction more than by distance (SimpleShot, Wang et al.
    2019).

    Example::

        >>> head = CosineHead(scale=10.0)
        >>> onehot = F.one_hot(torch.arange(5), 5).float()  # 5-way 1-shot
        >>> logits = head(torch.randn(5, 64), onehot, torch.randn(15, 64))
        >>> bool(logits.abs().max() <= 10.0 + 1e-5)
        True
    """

    def __init__(self, scale: float = 10.0, learn_scale: bool = True) -> None:
        super().__init__(scale, learn_scale)

    def forward(
        self, support_features: Tensor, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        prototypes = class_prototypes(F.normalize(support_features, dim=-1), support_onehot)
        similarity = F.normalize(query_features, dim=-1) @ F.normalize(prototypes, dim=-1).mT
        return self.scale * similarity


@register_head("linear")
class LinearHead(Head):
    """A linear classifier shared by every task and learned in the outer loop, as in CAVIA
    (Zintgraf et al. 2019, "Fast Context Adaptation via Meta-Learning"): only the FiLM deviations
    adapt to a task, so tasks must have exactly ``ways`` classes.

    Example::

        >>> head = LinearHead(feature_dim=64, ways=5)
        >>> onehot = F.one_hot(torch.arange(5), 5).float()
        >>> head(None, onehot, torch.randn(15, 64)).shape  # reads no support features
        torch.Size([15, 5])
    """

    uses_support = False

    def __init__(self, feature_dim: int, ways: int) -> None:
        super().__init__()
        self.ways = ways
        self.linear = nn.Linear(feature_dim, ways)

    @classmethod
    def from_settings(
        cls, feature_dim: int, ways: int, scale: float, learn_scale: bool
    ) -> LinearHead:
        """``ways`` outputs (at least 2); a linear head has no metric scale."""
        if ways < 2:
            raise ValueError(f"head_ways must be at least 2 for a linear head; got {ways}")
        return cls(feature_dim, ways)

    def forward(
        self, support_features: Tensor | None, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        if support_onehot.shape[-1] != self.ways:
            raise ValueError(
                f"the linear head classifies {self.ways} ways; this task has "
                f"{support_onehot.shape[-1]}: set head_ways to the episodes' ways or use "
                "head='prototype'"
            )
        return self.linear(query_features)


def build_head(
    kind: str, feature_dim: int, head_ways: int, scale: float = 1.0, learn_scale: bool = True
) -> Head:
    """The head ``ModelSpec.head`` names, from :data:`HEADS` (``scale``: a prototype or cosine
    head's initial metric scale, learned unless ``learn_scale`` is false)."""
    if kind not in HEADS:
        names = [repr(name) for name in HEADS]
        choices = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(f"unknown head {kind!r}; choose {choices}")
    return HEADS[kind].from_settings(feature_dim, head_ways, scale, learn_scale)
