"""A user's own ``nn.Module`` as a metafilm backbone, with FiLM at its normalisation layers.

:class:`ModuleBackbone` wraps any network that maps an image batch ``[N, C, H, W]`` to features
(flattened to ``[N, D]``) so that it follows the contract of :class:`metafilm.backbones.Backbone`
that :class:`metafilm.learner.FiLMLearner` and :mod:`metafilm.meta` rely on:

- **Sites**: every normalisation layer the forward calls (batch norm, ``nn.GroupNorm``, and
  ``nn.LayerNorm`` / ``nn.RMSNorm`` over one trailing dimension), with or without affine
  parameters: after a non-affine layer FiLM is the only per-channel affine map, as in the FiLM
  paper. Sites are named by module path (``"layer1.0.bn2"``, ``"blocks.1.norm1"``) in the order of
  ``named_modules()``; a layer defined but never called, or a layer normalising several trailing
  dimensions (no channel axis to modulate), is not a site.
- **FiLM** ``h * (1 + dgamma) + dbeta`` (:func:`metafilm.film.modulate`; zero deviations give the
  plain module bit for bit) acts on each site layer's output: on dim 1 after batch and group norm
  (``[N, C, ...]``), on the last dim after layer norm (``[N, tokens, C]``), at every call of the
  layer. It is applied by forward hooks that exist only during one forward, so the module keeps no
  state of ours, works under ``torch.func.functional_call``, ``torch.func.grad`` (second order
  included) and ``vmap``, and is called exactly as it is otherwise (one forward at a time: the
  hooks of two concurrent forwards would mix).
- **One block**: every site is in block 0 and ``prefix(x, 0)`` is the input, so a frozen
  ``ModuleBackbone`` caches no prefix features.
- **bn_mode** is read from the module: ``"running"`` when any batch norm tracks running
  statistics (batch statistics in ``train()``, updating them; the running ones in ``eval()``),
  ``"episode"`` otherwise (batch statistics always; also a network without batch norm). A batch
  norm that updates running statistics cannot run under ``vmap``: train such a module with the
  ``loop`` strategy (a frozen backbone is in eval mode and runs under ``vmap`` too).
- **feature_dim** comes from one no-grad forward of two zero images at construction, in eval mode
  (so that no running statistics move), which also finds the layers the forward calls.

:func:`metafilm.network_loader.load_module_backbone` builds one from ``"package.module:factory"``
and a state-dict file; :func:`adapted_parameters` counts what FiLM adapts per task against the
backbone's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metafilm.backbones import Film, InputStandardisation
from metafilm.film import modulate, resolve_sites
from metafilm.specs import BatchNormMode

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CHANNEL_FIRST_NORMS = (*BATCH_NORMS, nn.GroupNorm)
"""Normalisation layers whose output has its channels on dim 1."""
CHANNEL_LAST_NORMS = (nn.LayerNorm, nn.RMSNorm)
"""Normalisation layers whose output has its channels on the last dim (one normalised dim)."""
Hook = Callable[[nn.Module, Any, Any], Any]


class ModuleBackbone(InputStandardisation):
    """``module`` (images ``[N, in_channels, image_size, image_size]`` in) as a FiLM backbone.

    See the module docstring for the sites, bn_mode and FiLM; ``site_dims`` holds the dim of each
    site layer's output that FiLM modulates (1, or -1 for the last). ``normalize`` standardises
    each input channel by buffers set with :meth:`set_input_statistics`, as the built-in backbones
    do.
    """

    num_blocks = 1

    def __init__(
        self, module: nn.Module, *, in_channels: int, image_size: int, normalize: bool = False
    ) -> None:
        super().__init__()
        if in_channels < 1 or image_size < 1:
            raise ValueError(
                f"in_channels and image_size must be positive; got {in_channels} and {image_size}"
            )
        self.module = module
        self.in_channels = in_channels
        self.image_size = image_size
        self._init_standardisation(in_channels, normalize)
        self.site_dims, self.feature_dim = _probe(module, self.prefix_shape(0))
        if not self.site_dims:
            raise ValueError(
                f"{type(module).__name__} calls no normalisation layer (batch norm, GroupNorm, "
                "LayerNorm or RMSNorm over one dim) in its forward: FiLM has no site to act at"
            )
        self.sites: tuple[str, ...] = tuple(self.site_dims)
        self.site_channels: dict[str, int] = {
            site: _channels(module.get_submodule(site)) for site in self.sites
        }
        self.bn_mode: BatchNormMode = (
            "running"
            if any(isinstance(m, BATCH_NORMS) and m.track_running_stats for m in module.modules())
            else "episode"
        )

    def norm_of(self, site: str) -> nn.Module:
        """The normalisation layer whose output FiLM ``site`` modulates."""
        self.block_of(site)
        return self.module.get_submodule(site)

    def block_of(self, site: str) -> int:
        """0: every site is in the one block."""
        if site not in self.site_channels:
            raise ValueError(f"unknown FiLM site {site!r}; this backbone has {list(self.sites)}")
        return 0

    def prefix_shape(self, end_block: int) -> tuple[int, int, int]:
        """The image shape ``(C, H, W)``: ``end_block`` must be 0 (the input of the one block)."""
        _check_end_block(end_block)
        return (self.in_channels, self.image_size, self.image_size)

    def prefix(self, x: Tensor, end_block: int) -> Tensor:
        """The images ``x`` themselves: nothing precedes the one block (``end_block`` is 0)."""
        self._check_input(x, end_block)
        return x

    def forward(
        self,
        x: Tensor,
        film: Film | None = None,
        *,
        start_block: int = 0,
        vmapped: bool = False,
    ) -> Tensor:
        """Features ``[N, feature_dim]`` of images ``x`` with FiLM ``{site: (dgamma, dbeta)}``;
        sites missing from ``film`` are identity. ``start_block`` must be 0; ``vmapped`` says that
        the caller runs this under ``vmap`` (``metafilm.meta`` knows when it does)."""
        film = {} if film is None else film
        self._check_input(x, start_block)
        unknown = [site for site in film if site not in self.site_channels]
        if unknown:
            raise ValueError(f"unknown FiLM sites {unknown}; this backbone has {list(self.sites)}")
        if vmapped and _updates_running_statistics(self.module):
            raise RuntimeError(
                "this module's batch norm updates its running statistics in training and cannot "
                "do so under vmap: use the 'loop' meta-batch strategy, a frozen backbone, or "
                "batch norms with track_running_stats=False"
            )
        x = self.standardise(x)
        hooks = {site: partial(_film_hook, self.site_dims[site], *film[site]) for site in film}
        with _forward_hooks(self.module, hooks):
            return self.module(x).flatten(1)

    def _check_input(self, x: Tensor, start_block: int) -> None:
        expected = self.prefix_shape(start_block)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images shaped [N, {', '.join(map(str, expected))}]; got {tuple(x.shape)}"
            )


def _check_end_block(index: int) -> None:
    if index != 0:
        raise ValueError(
            f"a wrapped module is one block: the block index must be 0 (its input); got {index}"
        )


def _candidate_sites(module: nn.Module) -> dict[str, int]:
    """Every normalisation layer of ``module`` that FiLM can follow, by path: the dim it
    modulates (1 or -1)."""
    sites: dict[str, int] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, CHANNEL_FIRST_NORMS):
            sites[name] = 1
        elif isinstance(layer, CHANNEL_LAST_NORMS) and len(layer.normalized_shape) == 1:
            sites[name] = -1
    return sites


def _channels(layer: nn.Module) -> int:
    """The channel count of a site layer's output."""
    if isinstance(layer, BATCH_NORMS):
        return layer.num_features
    if isinstance(layer, nn.GroupNorm):
        return layer.num_channels
    return layer.normalized_shape[-1]


def _probe(module: nn.Module, image_shape: tuple[int, int, int]) -> tuple[dict[str, int], int]:
    """The candidate sites that ``module``'s forward calls (:func:`_candidate_sites`), and its
    feature size: one no-grad forward of two zero images in eval mode, every module's mode
    restored after."""
    reference = next(chain(module.parameters(), module.buffers()), None)
    like = {} if reference is None else {"dtype": reference.dtype, "device": reference.device}
    called: set[str] = set()

    def record(name: str, layer: nn.Module, inputs: Any, output: Any) -> None:
        called.add(name)

    candidates = _candidate_sites(module)
    modes = {layer: layer.training for layer in module.modules()}
    module.eval()
    try:
        hooks = {name: partial(record, name) for name in candidates}
        with torch.no_grad(), _forward_hooks(module, hooks):
            output = module(torch.zeros(2, *image_shape, **like))
    finally:
        for layer, training in modes.items():
            layer.training = training
    if not isinstance(output, Tensor) or output.dim() < 2 or output.shape[0] != 2:
        found = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"{type(module).__name__} must map images [N, {', '.join(map(str, image_shape))}] to "
            f"one tensor of features [N, ...]; for N = 2 it returned {found}"
        )
    return {name: dim for name, dim in candidates.items() if name in called}, output[0].numel()


@contextmanager
def _forward_hooks(module: nn.Module, hooks: Mapping[str, Hook]) -> Iterator[None]:
    """``hooks`` (by submodule path) registered as forward hooks for the ``with`` block only."""
    handles = [module.get_submodule(name).register_forward_hook(h) for name, h in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _film_hook(
    dim: int, dgamma: Tensor, dbeta: Tensor, layer: nn.Module, inputs: Any, h: Tensor
) -> Tensor:
    """FiLM on dim ``dim`` (1 or -1) of a site layer's output ``h``."""
    if dim == 1:
        return modulate(h, dgamma, dbeta)
    return modulate(h.movedim(-1, 1), dgamma, dbeta).movedim(1, -1)


def _updates_running_statistics(module: nn.Module) -> bool:
    return any(
        isinstance(m, BATCH_NORMS) and m.track_running_stats and m.training
        for m in module.modules()
    )


@dataclass(frozen=True)
class AdaptedParameters:
    """How many numbers FiLM adapts per task (``film``: 2 per channel of each used site) against
    the backbone's parameter count (``backbone``)."""

    film: int
    backbone: int

    @property
    def fraction(self) -> float:
        """``film / backbone`` (infinite for a backbone without parameters)."""
        return self.film / self.backbone if self.backbone else math.inf

    def __str__(self) -> str:
        return (
            f"FiLM adapts {self.film:,} parameters per task: {self.fraction:.3%} of the "
            f"backbone's {self.backbone:,}"
        )


def adapted_parameters(
    backbone: nn.Module, sites: Sequence[str] | Literal["all"] = "all"
) -> AdaptedParameters:
    """The FiLM parameters of ``sites`` (``film_sites`` names or block prefixes, or ``"all"``) of
    any metafilm backbone, against its parameter count; for a learner pass
    ``learner.backbone, learner.used_sites``."""
    used = resolve_sites(sites, backbone.sites)
    return AdaptedParameters(
        film=2 * sum(backbone.site_channels[site] for site in used),
        backbone=sum(parameter.numel() for parameter in backbone.parameters()),
    )
