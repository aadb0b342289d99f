"""Classifier heads on top of (FiLM-modulated) embeddings.

- ``prototype``: a linear layer built from the support prototypes ``c_k`` (Proto-MAML:
  ``W_k = 2 c_k``, ``b_k = -|c_k|^2``, which ranks classes as the negative squared Euclidean
  distance does, ``-|q - c_k|^2`` differing only by ``-|q|^2``, the same for every class), times a
  learned metric scale (TADAM). It has no per-task weights: it is rebuilt from the support
  features of whatever deviations are current, at every inner step and for the query.
- ``cosine``: the same from L2-normalised features, cosine similarity times a learned scale
  (Meta-Baseline); suits pretrained embeddings.
- ``linear``: one head ``[head_ways, feature_dim]`` shared by all tasks and learned in the outer
  loop (CAVIA); only the FiLM deviations adapt to a task.

Both take ``(support_features, support_onehot, query_features)`` and return query logits, so the
meta code treats them alike; ``uses_support`` tells it whether the support features are read (the
linear head takes ``None`` for them). ``logit_magnitude`` (same arguments) bounds the size of the
terms each logit sums: the yardstick of its rounding error (``metafilm.meta.evaluate_exact``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def class_prototypes(features: Tensor, onehot: Tensor) -> Tensor:
    """Mean feature of each class, ``[ways, D]``, from ``features [S, D]``, ``onehot [S, ways]``."""
    return (onehot.transpose(-1, -2) @ features) / onehot.sum(-2).unsqueeze(-1)


def prototype_logits(query_features: Tensor, prototypes: Tensor, scale: Tensor) -> Tensor:
    """``scale * (2 q.c_k - |c_k|^2)``: the Proto-MAML linear layer on ``query_features [Q, D]``."""
    weight = 2 * prototypes
    bias = -prototypes.pow(2).sum(-1)
    return scale * torch.addmm(bias, query_features, weight.transpose(-1, -2))


class PrototypeHead(nn.Module):
    """Prototype head with a metric scale, initialised to ``scale`` and learned unless
    ``learn_scale`` is false."""

    uses_support = True

    def __init__(self, scale: float = 1.0, learn_scale: bool = True) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(
        self, support_features: Tensor, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        prototypes = class_prototypes(support_features, support_onehot)
        return prototype_logits(query_features, prototypes, self.scale)

    def logit_magnitude(
        self, support_features: Tensor, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        """A bound on the size of the terms a logit sums, ``|scale| (2 |q| |c| + |c|^2)`` at the
        largest ``|q|`` and ``|c|``: the scale of its rounding error, however much they cancel."""
        prototypes = class_prototypes(support_features, support_onehot)
        query_norm = query_features.norm(dim=-1).max()
        prototype_norm = prototypes.norm(dim=-1).max()
        return self.scale.abs() * prototype_norm * (2 * query_norm + prototype_norm)


class CosineHead(PrototypeHead):
    """Prototypes of the L2-normalised support features, compared with the query by cosine
    similarity times a learned scale (initialised to ``scale``): Meta-Baseline's classifier
    (Chen et al. 2021) with TADAM's metric scaling. Pretrained classifier embeddings tell classes
    apart by direction more than by distance (SimpleShot, Wang et al. 2019)."""

    def __init__(self, scale: float = 10.0, learn_scale: bool = True) -> None:
        super().__init__(scale, learn_scale)

    def forward(
        self, support_features: Tensor, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        prototypes = class_prototypes(F.normalize(support_features, dim=-1), support_onehot)
        similarity = F.normalize(query_features, dim=-1) @ F.normalize(prototypes, dim=-1).mT
        return self.scale * similarity

    def logit_magnitude(
        self, support_features: Tensor, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        """``|scale|``: a cosine is at most 1."""
        return self.scale.abs()


class LinearHead(nn.Module):
    """A linear classifier shared by every task; tasks must have exactly ``ways`` classes."""

    uses_support = False

    def __init__(self, feature_dim: int, ways: int) -> None:
        super().__init__()
        self.ways = ways
        self.linear = nn.Linear(feature_dim, ways)

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

    def logit_magnitude(
        self, support_features: Tensor | None, support_onehot: Tensor, query_features: Tensor
    ) -> Tensor:
        """``|w| |q| + |b|`` at the largest of each."""
        weight, bias = self.linear.weight, self.linear.bias
        return weight.norm(dim=-1).max() * query_features.norm(dim=-1).max() + bias.abs().max()


def build_head(
    kind: Literal["prototype", "cosine", "linear"],
    feature_dim: int,
    head_ways: int,
    scale: float = 1.0,
    learn_scale: bool = True,
) -> PrototypeHead | CosineHead | LinearHead:
    """The head ``ModelSpec.head`` names (``scale``: a prototype or cosine head's initial metric
    scale, learned unless ``learn_scale`` is false)."""
    if kind == "prototype":
        return PrototypeHead(scale, learn_scale)
    if kind == "cosine":
        return CosineHead(scale, learn_scale)
    if kind == "linear":
        if head_ways < 2:
            raise ValueError(f"head_ways must be at least 2 for a linear head; got {head_ways}")
        return LinearHead(feature_dim, head_ways)
    raise ValueError(f"unknown head {kind!r}; choose 'prototype', 'cosine' or 'linear'")
