"""Batch norm over the batch's own statistics with a double backward fast on CPU.

Second-order meta-learning differentiates batch norm's backward pass. Torch's formula for that
(``batchnorm_double_backward``) reduces each per-channel sum over dim 0 first, which on a
channels_last CPU tensor is about 25x slower than one reduction over dims (0, 2, 3): those sums
took 15% of a second-order miniImageNet 5-way 5-shot meta-step (docs/benchmarks.md). Here the
forward and the first backward are torch's own kernels (the same numbers as ``F.batch_norm``),
and the backward of the backward is written out with one reduction per sum.

The formulas, per channel, with ``M`` values per channel, ``c = x - mean``, ``r = 1/std``
(the saved inverse standard deviation), ``S`` a sum over every dim but 1::

    y  = weight * c * r + bias
    gx = weight * r * (gy - S(gy) / M - c * r^2 * S(gy * c) / M)
    gw = r * S(gy * c),    gb = S(gy)

and the backward of ``(gx, gw, gb)`` with incoming gradients ``(ggx, ggw, ggb)`` is what
:func:`_double_backward` computes, with the dependence of ``mean`` and ``r`` on ``x`` included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable


def episode_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)`` (same values and
    first derivatives), twice differentiable with fast sums on CPU. It works under
    ``torch.func.vmap`` (a generated rule, tested); a backbone told that it runs under ``vmap``
    keeps ``F.batch_norm`` (``BatchNorm``'s ``vmapped``)."""
    return _BatchNorm.apply(x, weight, bias, eps)[0]


class _BatchNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, ...]:
        return torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx: FunctionCtx, gy: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw, gb, None


class _BatchNormBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        gy: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        gy, x, weight, mean, invstd, _ = inputs
        ctx.save_for_backward(gy, x, weight, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, ggx: Tensor | None, ggw: Tensor | None, ggb: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        return (*_double_backward(*ctx.saved_tensors, ggx, ggw, ggb), None, None, None)


def _double_backward(
    gy: Tensor,
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    ggx: Tensor | None,
    ggw: Tensor | None,
    ggb: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to ``gy``, ``x`` and ``weight`` of
    ``<ggx, gx> + <ggw, gw> + <ggb, gb>`` (module docstring); a missing incoming gradient is 0."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    m = x.numel() // x.shape[1]
    r, w = invstd.view(shape), weight.view(shape)
    c = x - mean.view(shape)

    def total(t: Tensor) -> Tensor:
        return t.sum(dims, keepdim=True)

    gy_sum, gyc_sum = total(gy), total(gy * c)
    r3 = r**3
    zeros = torch.zeros_like(r)
    # gradient with respect to x: coefficients of c, gy and ggx, and a constant, per channel. The
    # coefficient of gy is also that of c in the gradient with respect to gy (mixed derivatives).
    on_c, on_gy, constant, g_weight, g_gy_constant = zeros, zeros, zeros, zeros, zeros
    if ggx is not None:
        ggx_sum, ggxc_sum, gy_ggx_sum = total(ggx), total(ggx * c), total(gy * ggx)
        coupled = ggx_sum * gy_sum / m - gy_ggx_sum + 3 / m * r * r * gyc_sum * ggxc_sum
        on_c = w * r3 * coupled / m
        on_gy = -w * r3 * ggxc_sum / m
        constant = w * r3 / m * (ggxc_sum * gy_sum + gyc_sum * ggx_sum) / m
        g_weight = r * gy_ggx_sum - r * gy_sum * ggx_sum / m - r3 * gyc_sum * ggxc_sum / m
        g_gy_constant = -w * r * ggx_sum / m
    if ggw is not None:
        ggw = ggw.view(shape)
        on_gy = on_gy + ggw * r
        constant = constant - ggw * r * gy_sum / m
        on_c = on_c - ggw * r3 * gyc_sum / m
    if ggb is not None:
        g_gy_constant = g_gy_constant + ggb.view(shape)
    g_x = torch.addcmul(constant, c, on_c).addcmul_(gy, on_gy)
    g_gy = torch.addcmul(g_gy_constant, c, on_gy)
    if ggx is not None:
        g_x.addcmul_(ggx, -w * r3 * gyc_sum / m)
        g_gy.addcmul_(ggx, w * r)
    return g_gy, g_x, g_weight.view(-1)
