"""Task encoder: support features -> task representation -> predicted FiLM deviations.

The representation is the mean of the class prototypes of the *unmodulated* support features
(TADAM): it does not depend on the order or the labelling of the classes. A linear map (default,
as the FiLM authors recommend) or a one-hidden-layer MLP predicts ``dgamma, dbeta`` for every used
site, and each site's prediction is multiplied by two learned scalars, one for gamma and one for
beta (TADAM's post-multipliers). The post-multipliers start at 0, so training starts exactly at
the identity FiLM, and carry their own L2 penalty in the outer loss. ``encoder="none"`` has no
encoder at all: every task starts at identity (CAVIA).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from metafilm.film import Deviations
from metafilm.heads import class_prototypes


def task_representation(features: Tensor, onehot: Tensor) -> Tensor:
    """Mean of the class prototypes, ``[D]``: the TADAM task representation."""
    return class_prototypes(features, onehot).mean(-2)


def deviations_from_flat(flat: Tensor, site_channels: Mapping[str, int]) -> Deviations:
    """Cut a flat vector ``[2 * sum(C)]`` into ``{site: (dgamma [C], dbeta [C])}`` in site order."""
    sizes = [channels for channels in site_channels.values() for _ in range(2)]
    pieces = flat.split(sizes, dim=-1)
    return {site: (pieces[2 * i], pieces[2 * i + 1]) for i, site in enumerate(site_channels)}


class TaskEncoder(nn.Module):
    """Predicts every used site's deviations from a task representation ``[feature_dim]``.

    ``net`` is the predictor (its weights take the encoder weight decay); ``postmult [sites, 2]``
    holds the gamma and beta post-multipliers of each site (their own L2 penalty).
    """

    def __init__(
        self,
        feature_dim: int,
        site_channels: Mapping[str, int],
        kind: Literal["linear", "mlp"] = "linear",
        hidden: int = 256,
    ) -> None:
        super().__init__()
        if not site_channels:
            raise ValueError("the task encoder needs at least one FiLM site to predict")
        self.site_channels = dict(site_channels)
        outputs = 2 * sum(self.site_channels.values())
        if kind == "linear":
            self.net: nn.Module = nn.Linear(feature_dim, outputs)
        elif kind == "mlp":
            if hidden < 1:
                raise ValueError(f"encoder_hidden must be positive for an mlp; got {hidden}")
            self.net = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, outputs)
            )
        else:
            raise ValueError(f"unknown encoder {kind!r}; choose 'linear', 'mlp' or 'none'")
        self.postmult = nn.Parameter(torch.zeros(len(self.site_channels), 2))

    def forward(self, representation: Tensor) -> Deviations:
        raw = deviations_from_flat(self.net(representation), self.site_channels)
        return {
            site: (self.postmult[i, 0] * dgamma, self.postmult[i, 1] * dbeta)
            for i, (site, (dgamma, dbeta)) in enumerate(raw.items())
        }
