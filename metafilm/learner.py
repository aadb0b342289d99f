"""The FiLM learner: the parameters of a meta-learner, and no maths.

``FiLMLearner`` holds the backbone, the task encoder (with its post-multipliers), the head and,
with ``learn_inner_lr``, one inner learning rate per deviation entry (Meta-SGD). The maths that use
them are the pure functions of :mod:`metafilm.meta`.

Backbone modes:

- ``outer``: the backbone's weights learn in the outer loop together with everything else.
- ``frozen``: the backbone (typically after :func:`metafilm.pretrain.pretrain_backbone`) never
  changes: its parameters do not require grad, :func:`metafilm.meta.make_optimizer` leaves them
  out, and the backbone stays in eval mode, so batch norm in running mode uses (and never updates)
  its running statistics. Then everything before the first used FiLM site is one fixed function
  of each image, which :func:`metafilm.meta.input_builder` computes once. So it is for an
  outer-trained backbone in eval mode, under test.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metafilm.backbones import Backbone, build_backbone
from metafilm.encoder import TaskEncoder, deviations_from_flat
from metafilm.film import Deviations, resolve_sites
from metafilm.heads import build_head
from metafilm.specs import AdaptSpec, ModelSpec

BACKBONE_MODES = ("outer", "frozen")


class FiLMLearner(nn.Module):
    """Backbone + task encoder + head (+ Meta-SGD learning rates) for ``model`` and ``adapt``.

    ``backbone`` replaces the one ``model`` describes; it must follow the
    :class:`metafilm.backbones.Backbone` contract (``sites``, ``site_channels``, ``block_of``,
    ``feature_dim``, ``bn_mode``, ``forward(x, film, start_block=, vmapped=)``, ``prefix``).
    """

    def __init__(
        self, model: ModelSpec, adapt: AdaptSpec, *, backbone: nn.Module | None = None
    ) -> None:
        super().__init__()
        if model.backbone_mode not in BACKBONE_MODES:
            raise ValueError(
                f"backbone_mode must be one of {BACKBONE_MODES}; got {model.backbone_mode!r}"
            )
        self.model_spec = model
        if backbone is None:
            backbone = build_backbone(model)
        if isinstance(backbone, Backbone):
            # channels_last: on CPU, max-pooling and convolutions run ~1.5x faster per meta-step
            # in that layout (docs/benchmarks.md); the values are the same up to float
            # reordering. A user's network keeps its own layout (torch 2.13's oneDNN crashes in
            # backward on channels_last convolutions of 2 to 6 input channels on one thread).
            backbone = backbone.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.used_sites: tuple[str, ...] = resolve_sites(model.film_sites, self.backbone.sites)
        if not self.used_sites:
            raise ValueError(
                "film_sites selects no FiLM site: the inner loop would have nothing to adapt; "
                f"choose some of {list(self.backbone.sites)} or 'all'"
            )
        self.site_channels = {site: self.backbone.site_channels[site] for site in self.used_sites}
        self.first_used_block = min(self.backbone.block_of(site) for site in self.used_sites)
        self.encoder = (
            None
            if model.encoder == "none"
            else TaskEncoder(
                self.backbone.feature_dim, self.site_channels, model.encoder, model.encoder_hidden
            )
        )
        self.head = build_head(
            model.head,
            self.backbone.feature_dim,
            model.head_ways,
            model.metric_scale,
            model.learn_metric_scale,
        )
        self.inner_lrs = (
            nn.Parameter(torch.full((2 * sum(self.site_channels.values()),), adapt.inner_lr))
            if adapt.learn_inner_lr
            else None
        )
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    @property
    def frozen(self) -> bool:
        return self.model_spec.backbone_mode == "frozen"

    @property
    def caches_prefix(self) -> bool:
        """Whether the blocks before the first used site are now a fixed per-image function that
        is worth computing once: running batch norm, and a backbone that is frozen or, in eval
        mode, not being trained (an outer-trained run under test)."""
        fixed = self.frozen or not self.training
        return fixed and self.backbone.bn_mode == "running" and self.first_used_block > 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        spec = self.model_spec
        return (spec.in_channels, spec.image_size, spec.image_size)

    def train(self, mode: bool = True) -> FiLMLearner:
        """Like ``nn.Module.train``, except that a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def per_param_lr(self, inner_lrs: Tensor | None) -> Deviations | None:
        """The Meta-SGD learning rates as deviations (``None`` without ``learn_inner_lr``)."""
        return None if inner_lrs is None else deviations_from_flat(inner_lrs, self.site_channels)
