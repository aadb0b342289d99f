"""metafilm.batchnorm: the same values and derivatives as torch's batch norm, to second order."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metafilm.batchnorm import episode_batch_norm

EPS = 1e-5
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def torch_batch_norm(x, weight, bias):
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)


def inputs(dtype, layout, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, 7, 7, generator=generator, dtype=dtype) * 3 + 1
    weight = torch.randn(5, generator=generator, dtype=dtype)
    bias = torch.randn(5, generator=generator, dtype=dtype)
    x = x.contiguous(memory_format=layout)
    return [t.requires_grad_() for t in (x, weight, bias)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_first_derivatives_are_torchs_bit_for_bit(dtype, layout):
    x, weight, bias = inputs(dtype, layout)
    ours, theirs = episode_batch_norm(x, weight, bias, EPS), torch_batch_norm(x, weight, bias)
    assert torch.equal(ours, theirs)
    upstream = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for mine, reference in zip(
        torch.autograd.grad((ours * upstream).sum(), (x, weight, bias)),
        torch.autograd.grad((theirs * upstream).sum(), (x, weight, bias)),
        strict=True,
    ):
        assert torch.equal(mine, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("incoming", [(0,), (1,), (2,), (0, 1, 2)])
def test_second_derivatives_equal_torchs_formula(layout, incoming):
    """Every combination of incoming gradients on (gx, gweight, gbias), with respect to the
    input, the weight and the upstream gradient."""
    x, weight, bias = inputs(torch.float64, layout)
    generator = torch.Generator().manual_seed(2)
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64).requires_grad_()
    probes = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (x, weight)]
    probes.append(torch.randn(bias.shape, generator=generator, dtype=torch.float64))
    results = []
    for norm in (episode_batch_norm, lambda *a: torch_batch_norm(*a[:3])):
        first = torch.autograd.grad(
            (norm(x, weight, bias, EPS) * upstream).sum(), (x, weight, bias), create_graph=True
        )
        objective = sum((first[i] * probes[i]).sum() for i in incoming)
        results.append(torch.autograd.grad(objective, (x, weight, upstream), allow_unused=True))
    for mine, reference in zip(*results, strict=True):
        if reference is None:  # e.g. gbias = sum(upstream) does not depend on x or weight
            assert mine is None or not mine.abs().any()
            continue
        assert not reference.abs().max() < 1e-6  # a case with something to compare
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)


def test_gradgradcheck():
    generator = torch.Generator().manual_seed(6)
    x, weight, bias = (
        torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
        for shape in ((3, 2, 3, 3), (2,), (2,))
    )
    assert torch.autograd.gradgradcheck(lambda *a: episode_batch_norm(*a, EPS), (x, weight, bias))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_under_vmap_second_order_equals_a_loop():
    tasks = torch.stack([inputs(torch.float64, torch.contiguous_format, s)[0] for s in (3, 4)])
    tasks = tasks.detach()
    _, weight, bias = (t.detach() for t in inputs(torch.float64, torch.contiguous_format))
    probe = torch.randn(
        weight.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )

    def second_order(norm):
        def loss(w, x):
            return norm(x, w, bias).pow(3).mean()

        return grad(lambda w, x: (grad(loss)(w, x) * probe).sum())

    batched = vmap(second_order(lambda *a: episode_batch_norm(*a, EPS)), in_dims=(None, 0))
    batched_grads = batched(weight, tasks)
    for t in range(2):
        reference = second_order(torch_batch_norm)(weight, tasks[t])
        assert reference.abs().max() > 1e-6
        torch.testing.assert_close(batched_grads[t], reference, rtol=1e-10, atol=1e-12)
