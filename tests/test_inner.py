"""The inner loop against closed forms: SGD on a quadratic support loss, first vs second order."""

from __future__ import annotations

import pytest
import torch

from metafilm.inner import inner_loop

SITES = {"a": 3, "b": 2}


def _deviations(seed: int, dtype=torch.float64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        site: (torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype))
        for site, c in SITES.items()
    }


def _flat(deviations) -> torch.Tensor:
    return torch.cat([t for pair in deviations.values() for t in pair])


def _quadratic(target):
    """support loss 0.5 |d - target|^2 over every entry."""
    return lambda d: 0.5 * (_flat(d) - _flat(target)).pow(2).sum()


@pytest.mark.parametrize("differentiate", ["autograd", "func"])
def test_steps_follow_the_closed_form_with_the_pull_to_identity(differentiate):
    start, target = _deviations(0), _deviations(1)
    lr, film_l2, steps = 0.3, 0.2, 3
    out = inner_loop(
        start,
        _quadratic(target),
        inner_steps=steps,
        inner_lr=lr,
        first_order=False,
        film_l2=film_l2,
        differentiate=differentiate,
    )
    # gradient of 0.5|d - t|^2 + film_l2 |d|^2 is (d - t) + 2 film_l2 d
    d, t = _flat(start), _flat(target)
    for _ in range(steps):
        d = d - lr * ((d - t) + 2 * film_l2 * d)
    assert list(out) == list(SITES)
    torch.testing.assert_close(_flat(out), d, rtol=1e-12, atol=1e-12)


def test_zero_steps_return_the_starting_deviations():
    start = _deviations(0)
    out = inner_loop(
        start, _quadratic(_deviations(1)), inner_steps=0, inner_lr=1.0, first_order=False
    )
    assert all(out[s][i] is start[s][i] for s in SITES for i in (0, 1))


@pytest.mark.parametrize("differentiate", ["autograd", "func"])
def test_second_order_differentiates_through_the_inner_gradient_and_first_order_does_not(
    differentiate,
):
    # support loss 0.5 |d - w|^2 with an outer parameter w, query loss 0.5 |d1 - q|^2.
    # d1 = d0 - lr (d0 - w): second order dQ/dw = lr (d1 - q); first order treats the step as a
    # constant, so w gets no gradient at all (d0 does not depend on w).
    lr = 0.4
    start, query = _deviations(0), _flat(_deviations(2))
    w = _flat(_deviations(1)).requires_grad_()
    target = {"a": (w[0:3], w[3:6]), "b": (w[6:8], w[8:10])}
    grads = {}
    for first_order in (False, True):
        out = inner_loop(
            start,
            _quadratic(target),
            inner_steps=1,
            inner_lr=lr,
            first_order=first_order,
            differentiate=differentiate,
        )
        loss = 0.5 * (_flat(out) - query).pow(2).sum()
        grads[first_order] = torch.autograd.grad(loss, w)[0] if loss.requires_grad else None
    d1 = _flat(start) - lr * (_flat(start) - w.detach())
    torch.testing.assert_close(grads[False], lr * (d1 - query), rtol=1e-12, atol=1e-12)
    assert grads[True] is None  # the query loss does not depend on w at all


@pytest.mark.parametrize("differentiate", ["autograd", "func"])
def test_first_order_still_passes_the_gradient_to_the_starting_point(differentiate):
    # d1 = d0 - lr (d0 - t), the step held constant: dQ/dd0 = d1 - q (second order: (1 - lr) times)
    lr = 0.25
    d0 = _flat(_deviations(0)).requires_grad_()
    start = {"a": (d0[0:3], d0[3:6]), "b": (d0[6:8], d0[8:10])}
    target, query = _deviations(1), _flat(_deviations(2))
    out = {}
    for first_order in (True, False):
        adapted = inner_loop(
            start,
            _quadratic(target),
            inner_steps=1,
            inner_lr=lr,
            first_order=first_order,
            differentiate=differentiate,
        )
        loss = 0.5 * (_flat(adapted) - query).pow(2).sum()
        (out[first_order],) = torch.autograd.grad(loss, d0)
    d1 = d0.detach() - lr * (d0.detach() - _flat(target))
    torch.testing.assert_close(out[True], d1 - query, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[False], (1 - lr) * (d1 - query), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_per_parameter_learning_rates_scale_each_entry_and_receive_gradients(first_order):
    start, target, query = _deviations(0), _deviations(1), _flat(_deviations(2))
    lrs_flat = torch.linspace(0.1, 1.0, 10, dtype=torch.float64).requires_grad_()
    lrs = {"a": (lrs_flat[0:3], lrs_flat[3:6]), "b": (lrs_flat[6:8], lrs_flat[8:10])}
    out = inner_loop(
        start,
        _quadratic(target),
        inner_steps=1,
        inner_lr=123.0,
        first_order=first_order,
        per_param_lr=lrs,
    )
    d0, t = _flat(start), _flat(target)
    d1 = d0 - lrs_flat.detach() * (d0 - t)
    torch.testing.assert_close(_flat(out), d1, rtol=1e-12, atol=1e-12)
    loss = 0.5 * (_flat(out) - query).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, lrs_flat)
    # dQ/dlr_i = (d1 - q)_i * (-(d0 - t)_i)
    torch.testing.assert_close(grad, -(d1 - query) * (d0 - t), rtol=1e-12, atol=1e-12)


def test_autograd_and_func_agree_and_work_under_vmap_and_no_grad():
    tasks = 4
    g = torch.Generator().manual_seed(3)
    w = torch.randn(tasks, 10, generator=g, dtype=torch.float64)
    start = _deviations(0)

    def support_loss(target_flat):
        # a non-quadratic loss so that the curvature matters
        return lambda d: (_flat(d) * target_flat).sin().sum() + _flat(d).pow(4).sum()

    def run(target_flat, differentiate):
        out = inner_loop(
            start,
            support_loss(target_flat),
            inner_steps=2,
            inner_lr=0.1,
            first_order=False,
            differentiate=differentiate,
        )
        return _flat(out)

    looped = torch.stack([run(w[i], "autograd") for i in range(tasks)])
    vmapped = torch.func.vmap(lambda target: run(target, "func"))(w)
    torch.testing.assert_close(vmapped, looped, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(run(w[0], "autograd"), looped[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(run(w[0], "func"), looped[0], rtol=1e-12, atol=1e-12)


def test_bad_settings_are_refused_with_a_clear_message():
    start, loss = _deviations(0), _quadratic(_deviations(1))
    with pytest.raises(ValueError, match="inner_steps"):
        inner_loop(start, loss, inner_steps=-1, inner_lr=0.1, first_order=False)
    with pytest.raises(ValueError, match="film_l2"):
        inner_loop(start, loss, inner_steps=1, inner_lr=0.1, first_order=False, film_l2=-1.0)
    with pytest.raises(ValueError, match="differentiate"):
        inner_loop(start, loss, inner_steps=1, inner_lr=0.1, first_order=False, differentiate="jax")
    with pytest.raises(ValueError, match="per_param_lr"):
        inner_loop(
            start,
            loss,
            inner_steps=1,
            inner_lr=0.1,
            first_order=False,
            per_param_lr={"a": start["a"]},
        )


def _cross_entropy(dtype: torch.dtype, margin: float):
    """A FiLM-like support loss: features modulated by site "a", a fixed linear head, and
    ``margin`` added to each right class's logit (a large one: a loss near zero)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.arange(64) % 5
    bonus = margin * torch.nn.functional.one_hot(labels, 5).to(dtype)

    def loss(d):
        dgamma, dbeta = d["a"]
        logits = 1e-3 * ((x * (1 + dgamma) + dbeta) @ weight) + bonus
        return torch.nn.functional.cross_entropy(logits, labels)

    return loss


def _zero_start(dtype: torch.dtype):
    return {"a": (torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype))}


@pytest.mark.parametrize("differentiate", ["autograd", "func"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_detached_gradient_is_the_plain_gradient_bit_for_bit(differentiate, dtype):
    loss = _cross_entropy(dtype, margin=2.0)
    out = inner_loop(
        _zero_start(dtype),
        loss,
        inner_steps=1,
        inner_lr=0.5,
        first_order=True,
        differentiate=differentiate,
    )
    start = {"a": tuple(t.requires_grad_() for t in _zero_start(dtype)["a"])}
    grads = torch.autograd.grad(loss(start), start["a"])
    for value, grad in zip(out["a"], grads, strict=True):
        assert torch.equal(value, -0.5 * grad)


@pytest.mark.parametrize("differentiate", ["autograd", "func"])
def test_a_detached_gradient_stays_accurate_where_the_backward_would_be_subnormal(differentiate):
    # margin 88: the wrong classes' probabilities are ~e^-88, and the backward pass's values fall
    # below float32's smallest normal number (1.2e-38) unless the objective is scaled up first
    def step(dtype: torch.dtype) -> torch.Tensor:
        out = inner_loop(
            _zero_start(dtype),
            _cross_entropy(dtype, margin=88.0),
            inner_steps=1,
            inner_lr=1.0,
            first_order=True,
            differentiate=differentiate,
        )
        return out["a"][0].double()

    exact, fast = step(torch.float64), step(torch.float32)
    start = {"a": tuple(t.requires_grad_() for t in _zero_start(torch.float32)["a"])}
    plain = -torch.autograd.grad(_cross_entropy(torch.float32, 88.0)(start), start["a"])[0]
    assert (plain.double() - exact).abs().max() > 3e-3 * exact.abs().max()  # the case is hard
    assert (fast - exact).abs().max() < 1e-3 * exact.abs().max()
