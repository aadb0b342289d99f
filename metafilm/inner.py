"""The inner loop: SGD on a task's FiLM deviations, and nothing else.

This is the one inner loop of the project; the meta-batch code, the MAML-style wrapper and
distributed training all call :func:`inner_loop`. It is a pure function of the starting deviations
and a support-loss closure: the closure decides which network, head and data the deviations act
on, so the loop never sees (and never differentiates) a network weight.

Two ways to take the gradient, equal in value and tested so:

- ``"autograd"``: ``torch.autograd.grad``; the faster one for a per-task Python loop and the one
  that tolerates batch norm updating running buffers inside the support pass.
- ``"func"``: ``torch.func.grad``; works under ``torch.func.vmap``.

Second order keeps the inner gradient in the graph (the meta-gradient differentiates through it);
first order detaches it, so the meta-gradient treats each inner step as a constant shift.

A detached gradient is taken of the objective times ``GRADIENT_SCALE`` and divided back. The
scale is a power of two, so every number is the same wherever the backward pass's values are
normal floats; what it changes is a support loss so near zero that its backward pass runs on
subnormal float32 numbers (below 1.2e-38), which x86 CPUs compute up to 100x slower: with a
prototype head at 1-shot each support image is its own prototype, and margins of hundreds leave
gradients of ``exp(-margin)``. It made some miniImageNet evaluation tasks 6x slower in float32.
Second order keeps the plain gradient: the meta-gradient through a scaled one would be scaled down
by as much.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from metafilm.film import Deviations, l2_to_identity

SupportLoss = Callable[[Deviations], Tensor]
Differentiate = Literal["autograd", "func"]
GRADIENT_SCALE = 2.0**64
"""The factor of a detached inner gradient's objective (module docstring)."""


def inner_loop(
    deviations: Deviations,
    support_loss: SupportLoss,
    *,
    inner_steps: int,
    inner_lr: float,
    first_order: bool,
    film_l2: float = 0.0,
    per_param_lr: Deviations | None = None,
    differentiate: Differentiate = "autograd",
) -> Deviations:
    """Deviations after ``inner_steps`` of SGD on ``support_loss + film_l2 * |deviations|^2``.

    ``per_param_lr`` (same structure as ``deviations``: one learning rate per entry, Meta-SGD)
    replaces ``inner_lr`` when given. ``inner_steps=0`` returns ``deviations`` unchanged. Works
    with or without an enclosing ``torch.no_grad()``: the support gradient is always taken.
    """
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
        raise ValueError(f"inner_steps must be an int >= 0; got {inner_steps!r}")
    if film_l2 < 0:
        raise ValueError(f"film_l2 must be >= 0 (a pull toward identity); got {film_l2}")
    if differentiate not in ("autograd", "func"):
        raise ValueError(f"differentiate must be 'autograd' or 'func'; got {differentiate!r}")
    if per_param_lr is not None and list(per_param_lr) != list(deviations):
        raise ValueError(
            f"per_param_lr must name the same sites as the deviations, in order; got "
            f"{list(per_param_lr)} for {list(deviations)}"
        )

    def objective(candidate: Deviations) -> Tensor:
        loss = support_loss(candidate)
        loss = loss + film_l2 * l2_to_identity(candidate) if film_l2 else loss
        return loss * GRADIENT_SCALE if first_order else loss

    gradient = _autograd_gradient if differentiate == "autograd" else _func_gradient
    for _ in range(inner_steps):
        grads = gradient(objective, deviations, create_graph=not first_order)
        if first_order:
            grads = {
                site: (dg / GRADIENT_SCALE, db / GRADIENT_SCALE) for site, (dg, db) in grads.items()
            }
        deviations = {
            site: tuple(
                value - _learning_rate(per_param_lr, site, which, inner_lr) * grad
                for which, (value, grad) in enumerate(zip(pair, grads[site], strict=True))
            )
            for site, pair in deviations.items()
        }
    return deviations


def _learning_rate(
    per_param_lr: Deviations | None, site: str, which: int, inner_lr: float
) -> Tensor | float:
    return inner_lr if per_param_lr is None else per_param_lr[site][which]


def _autograd_gradient(
    objective: SupportLoss, deviations: Deviations, *, create_graph: bool
) -> Deviations:
    """d objective / d deviations by ``torch.autograd.grad``; detached unless ``create_graph``."""
    with torch.enable_grad():
        inputs = {
            site: tuple(t if t.requires_grad else t.detach().requires_grad_() for t in pair)
            for site, pair in deviations.items()
        }
        flat_inputs = [t for pair in inputs.values() for t in pair]
        flat_grads = torch.autograd.grad(objective(inputs), flat_inputs, create_graph=create_graph)
    return {site: (flat_grads[2 * i], flat_grads[2 * i + 1]) for i, site in enumerate(inputs)}


def _func_gradient(
    objective: SupportLoss, deviations: Deviations, *, create_graph: bool
) -> Deviations:
    """d objective / d deviations by ``torch.func.grad``; detached unless ``create_graph``."""
    grads = torch.func.grad(objective)(deviations)
    if create_graph:
        return grads
    return {site: (dgamma.detach(), dbeta.detach()) for site, (dgamma, dbeta) in grads.items()}
