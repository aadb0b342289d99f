"""FiLM as deviations from the identity.

A task's FiLM state is a *deviations* dict ``{site: (dgamma, dbeta)}``, each of shape ``[C]`` (the
channels at that site), meaning ``gamma = 1 + dgamma`` and ``beta = dbeta``. Storing deviations
rather than ``(gamma, beta)`` makes zero the identity, so the inner loop, the encoder's output and
the L2 pull toward identity all start from and regularise toward the same point. These are pure
functions over tensors: they work under ``torch.func.grad`` and ``vmap``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

Deviations = dict[str, tuple[Tensor, Tensor]]


def identity(
    site_channels: Mapping[str, int], sites: Iterable[str], *, like: Tensor | None = None
) -> Deviations:
    """Zero deviations for ``sites`` (the identity FiLM), with the dtype and device of ``like``."""
    dtype = None if like is None else like.dtype
    device = None if like is None else like.device
    deviations: Deviations = {}
    for site in sites:
        if site not in site_channels:
            raise ValueError(
                f"unknown FiLM site {site!r}; the backbone declares {sorted(site_channels)}"
            )
        channels = site_channels[site]
        deviations[site] = (
            torch.zeros(channels, dtype=dtype, device=device),
            torch.zeros(channels, dtype=dtype, device=device),
        )
    return deviations


def modulate(h: Tensor, dgamma: Tensor, dbeta: Tensor) -> Tensor:
    """``h * (1 + dgamma) + dbeta`` per channel on dim 1 of ``h`` ([N, C, ...]).

    Computed as ``(h + dbeta) + h * dgamma`` so that zero deviations return ``h`` bit for bit.
    """
    if h.dim() < 2:
        raise ValueError(f"FiLM needs activations shaped [N, C, ...]; got shape {tuple(h.shape)}")
    channels = h.shape[1]
    _check_channels(channels, dgamma, dbeta)
    per_channel = (channels,) + (1,) * (h.dim() - 2)
    return torch.addcmul(h + dbeta.reshape(per_channel), h, dgamma.reshape(per_channel))


def fold_into_affine(
    weight: Tensor, bias: Tensor, dgamma: Tensor, dbeta: Tensor
) -> tuple[Tensor, Tensor]:
    """The affine weight and bias of a normalisation layer with FiLM folded in.

    FiLM right after a per-channel affine layer is itself per-channel affine:
    ``(1 + dgamma) * (weight * n + bias) + dbeta``. Folding it into the layer's ``[C]``-sized
    parameters saves two full-size passes over the activations in each direction; zero deviations
    give back ``weight`` and ``bias`` bit for bit.
    """
    _check_channels(weight.shape[-1], dgamma, dbeta)
    gamma = 1 + dgamma
    return weight * gamma, bias * gamma + dbeta


def _check_channels(channels: int, dgamma: Tensor, dbeta: Tensor) -> None:
    for name, value in (("dgamma", dgamma), ("dbeta", dbeta)):
        if tuple(value.shape) != (channels,):
            raise ValueError(
                f"FiLM {name} must have shape [{channels}] (the channels of this site); "
                f"got {tuple(value.shape)}"
            )


def l2_to_identity(deviations: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
    """Sum over sites of ``|dgamma|^2 + |dbeta|^2``: the squared distance from identity FiLM."""
    terms = [dgamma.pow(2).sum() + dbeta.pow(2).sum() for dgamma, dbeta in deviations.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def deviation_size(dgamma: Tensor, dbeta: Tensor) -> Tensor:
    """Root-mean-square of a site's deviations, gamma and beta entries together (detached), for
    diagnostics: RMS rather than L2 so that sites with different channel counts compare.

    The mean runs over the last dimension, so a stack of tasks ``[T, C]`` gives one size per task.
    """
    return torch.cat([dgamma, dbeta], -1).detach().pow(2).mean(-1).sqrt()


def resolve_sites(
    requested: Sequence[str] | Literal["all"], available: Sequence[str]
) -> tuple[str, ...]:
    """The FiLM sites a ``film_sites`` setting selects, in network order, without duplicates.

    Each requested name is either an exact site (``"block1.bn2"``) or a block prefix (``"block1"``
    selects every site ``"block1.*"``); ``"all"`` selects every site and an empty selection means no
    FiLM.
    """
    if isinstance(requested, str):
        if requested == "all":
            return tuple(available)
        raise ValueError(
            f"film_sites must be 'all' or a sequence of site names; got the string {requested!r} "
            f"(write ({requested!r},) for a single site)"
        )
    selected: set[str] = set()
    for name in requested:
        matches = {site for site in available if site == name or site.startswith(name + ".")}
        if not matches:
            raise ValueError(
                f"unknown FiLM site {name!r}; valid sites (or their block prefixes) are "
                f"{list(available)}"
            )
        selected |= matches
    return tuple(site for site in available if site in selected)
