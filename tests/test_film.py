import math

import pytest
import torch

from metafilm.film import deviation_size, identity, l2_to_identity, modulate, resolve_sites

RESNET_SITES = tuple(f"block{b}.bn{i}" for b in range(1, 5) for i in (1, 2, 3))


def test_identity_is_zeros_with_the_dtype_of_like():
    channels = {"a": 3, "b": 5, "c": 2}
    deviations = identity(channels, ["b", "a"], like=torch.ones(1, dtype=torch.float64))
    assert list(deviations) == ["b", "a"]
    for site, (dgamma, dbeta) in deviations.items():
        for value in (dgamma, dbeta):
            assert value.shape == (channels[site],)
            assert value.dtype == torch.float64
            assert not value.any()
    assert identity(channels, ["c"])["c"][0].dtype == torch.get_default_dtype()


def test_identity_rejects_an_unknown_site():
    with pytest.raises(ValueError, match=r"unknown FiLM site 'z'.*\['a'\]"):
        identity({"a": 3}, ["z"])


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 7), (4, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_modulate_is_exactly_h_at_zero(shape):
    h = torch.randn(shape) * torch.logspace(-20, 20, shape[-1])
    zero = torch.zeros(3)
    assert torch.equal(modulate(h, zero, zero), h)


@pytest.mark.parametrize("shape", [(4, 3), (4, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_modulate_scales_and_shifts_each_channel(shape):
    h = torch.randn(shape, dtype=torch.float64)
    dgamma = torch.randn(3, dtype=torch.float64)
    dbeta = torch.randn(3, dtype=torch.float64)
    out = modulate(h, dgamma, dbeta)
    for c in range(3):
        expected = h[:, c] * (1.0 + dgamma[c].item()) + dbeta[c].item()
        torch.testing.assert_close(out[:, c], expected, rtol=0, atol=1e-12)


def test_modulate_rejects_mismatched_channels():
    with pytest.raises(ValueError, match=r"dgamma must have shape \[3\].*got \(4,\)"):
        modulate(torch.zeros(2, 3, 4, 4), torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[N, C, \.\.\.\]"):
        modulate(torch.zeros(3), torch.zeros(3), torch.zeros(3))


def test_l2_to_identity_matches_a_hand_sum():
    torch.manual_seed(0)
    deviations = {
        "a": (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)),
        "b": (torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)),
    }
    by_hand = sum(
        float(v) ** 2 for pair in deviations.values() for tensor in pair for v in tensor.tolist()
    )
    assert l2_to_identity(deviations).item() == pytest.approx(by_hand, rel=1e-12)
    assert l2_to_identity({}).item() == 0.0


def test_l2_to_identity_gradient_is_twice_the_deviation():
    dgamma = torch.randn(4, requires_grad=True)
    dbeta = torch.randn(4, requires_grad=True)
    grad_gamma, grad_beta = torch.autograd.grad(
        l2_to_identity({"s": (dgamma, dbeta)}), (dgamma, dbeta)
    )
    torch.testing.assert_close(grad_gamma, 2 * dgamma.detach())
    torch.testing.assert_close(grad_beta, 2 * dbeta.detach())


def test_deviation_size_is_the_detached_rms_of_gamma_and_beta_together():
    dgamma = torch.tensor([3.0, -4.0], requires_grad=True)
    dbeta = torch.tensor([1.0, 1.0])
    size = deviation_size(dgamma, dbeta)
    assert size.item() == pytest.approx(math.sqrt((9 + 16 + 1 + 1) / 4))
    assert not size.requires_grad
    per_task = deviation_size(torch.stack([dgamma, 2 * dgamma]), torch.stack([dbeta, 2 * dbeta]))
    assert per_task.tolist() == pytest.approx([size.item(), 2 * size.item()])


def test_resolve_sites_all_exact_and_empty():
    assert resolve_sites("all", RESNET_SITES) == RESNET_SITES
    assert resolve_sites(["block2.bn3"], RESNET_SITES) == ("block2.bn3",)
    assert resolve_sites((), RESNET_SITES) == ()


def test_resolve_sites_prefix_order_and_duplicates():
    selected = resolve_sites(["block3.bn1", "block1", "block1.bn2", "block3.bn1"], RESNET_SITES)
    assert selected == ("block1.bn1", "block1.bn2", "block1.bn3", "block3.bn1")


def test_resolve_sites_prefix_stops_at_a_dot():
    available = ("block1", "block10.bn1")
    assert resolve_sites(["block1"], available) == ("block1",)


def test_resolve_sites_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(ValueError, match=r"unknown FiLM site 'block5'.*'block1.bn1'"):
        resolve_sites(["block5"], RESNET_SITES)
    with pytest.raises(ValueError, match="unknown FiLM site 'block1.bn'"):
        resolve_sites(["block1.bn"], RESNET_SITES)


def test_resolve_sites_rejects_a_bare_string():
    with pytest.raises(ValueError, match=r"\('block1',\)"):
        resolve_sites("block1", RESNET_SITES)
