import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from metafilm.backbones import Conv4, ResNet12, build_backbone, resnet12_widths
from metafilm.film import identity
from metafilm.specs import ModelSpec

SMALL_WIDTHS = (4, 6, 8, 10)
INPUTS = [(1, 28), (3, 84)]
# (bn_mode, module in train mode?)
BN_SETTINGS = [("episode", True), ("episode", False), ("running", True), ("running", False)]


# --- independent plain networks built from torch.nn layers ------------------------------------


def plain_bn(channels: int, bn_mode: str) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, track_running_stats=bn_mode == "running")


def plain_conv4(in_channels: int, width: int, bn_mode: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [
            nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1, bias=False),
            plain_bn(width, bn_mode),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten())


class PlainResidual(nn.Module):
    def __init__(self, cin: int, cout: int, bn_mode: str):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            plain_bn(cout, bn_mode),
            nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            plain_bn(cout, bn_mode),
            nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            plain_bn(cout, bn_mode),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), plain_bn(cout, bn_mode))
        self.after = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x):
        return self.after(self.main(x) + self.shortcut(x))


def plain_resnet12(in_channels: int, widths, bn_mode: str) -> nn.Sequential:
    channels = (in_channels, *widths)
    blocks = [PlainResidual(channels[i], channels[i + 1], bn_mode) for i in range(4)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def ours_and_plain(kind: str, in_channels: int, image_size: int, bn_mode: str):
    """Our backbone with randomised weights and BN state, the plain twin with the same values, and a
    map from each FiLM site to the plain BN module it follows."""
    if kind == "conv4":
        ours = Conv4(in_channels, 6, image_size, bn_mode)
        plain = plain_conv4(in_channels, 6, bn_mode)
        pairs = [
            (
                ours.blocks[i].conv,
                plain[4 * i],
                ours.blocks[i].bn,
                plain[4 * i + 1],
                f"block{i + 1}",
            )
            for i in range(4)
        ]
    else:
        ours = ResNet12(in_channels, SMALL_WIDTHS, image_size, bn_mode)
        plain = plain_resnet12(in_channels, SMALL_WIDTHS, bn_mode)
        pairs = []
        for b in range(4):
            mine, theirs = ours.blocks[b], plain[b]
            for i, j in ((1, 0), (2, 3), (3, 6)):
                pairs.append(
                    (
                        getattr(mine, f"conv{i}"),
                        theirs.main[j],
                        getattr(mine, f"bn{i}"),
                        theirs.main[j + 1],
                        f"block{b + 1}.bn{i}",
                    )
                )
            pairs.append(
                (mine.shortcut_conv, theirs.shortcut[0], mine.shortcut_bn, theirs.shortcut[1], None)
            )
    ours.double()
    plain.double()
    generator = torch.Generator().manual_seed(7)
    bn_of_site = {}
    with torch.no_grad():
        for conv, plain_conv, bn, plain_bn_module, site in pairs:
            plain_conv.weight.copy_(conv.weight)
            for name in ("weight", "bias"):
                value = 1 + 0.3 * torch.randn(bn.weight.shape, generator=generator)
                getattr(bn, name).copy_(value if name == "weight" else value - 1)
                getattr(plain_bn_module, name).copy_(getattr(bn, name))
            if bn_mode == "running":
                bn.running_mean.copy_(0.2 * torch.randn(bn.running_mean.shape, generator=generator))
                bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=generator))
                plain_bn_module.running_mean.copy_(bn.running_mean)
                plain_bn_module.running_var.copy_(bn.running_var)
            if site is not None:
                bn_of_site[site] = plain_bn_module
    return ours, plain, bn_of_site


def images(n: int, in_channels: int, image_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, in_channels, image_size, image_size, generator=generator).double()


def random_film(net, sites, seed: int = 1, scale: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    return {
        site: tuple(
            scale * torch.randn(net.site_channels[site], generator=generator).double()
            for _ in range(2)
        )
        for site in sites
    }


def set_mode(train: bool, *modules: nn.Module) -> None:
    for module in modules:
        module.train(train)


def running_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for name, b in module.named_buffers() if "running" in name]


# --- equality with the plain network ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
@pytest.mark.parametrize(("bn_mode", "train"), BN_SETTINGS)
def test_without_film_equals_the_plain_network(kind, in_channels, image_size, bn_mode, train):
    ours, plain, _ = ours_and_plain(kind, in_channels, image_size, bn_mode)
    x = images(3, in_channels, image_size)
    zero_film = identity(ours.site_channels, ours.sites, like=x)
    for film in (None, zero_film):
        ours_copy, plain_copy = copy.deepcopy(ours), copy.deepcopy(plain)
        set_mode(train, ours_copy, plain_copy)
        torch.testing.assert_close(ours_copy(x, film), plain_copy(x), rtol=0, atol=1e-6)
        for mine, theirs in zip(
            running_buffers(ours_copy), running_buffers(plain_copy), strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bn_mode", ["episode", "running"])
def test_film_at_zero_is_bit_identical_to_no_film(bn_mode):
    net = ResNet12(1, SMALL_WIDTHS, 28, bn_mode).eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(net(x, identity(net.site_channels, net.sites, like=x)), net(x))


def test_episode_mode_keeps_no_buffers_and_running_mode_does():
    assert list(Conv4(bn_mode="episode").buffers()) == []
    assert len(running_buffers(Conv4(bn_mode="running"))) == 8


# --- FiLM equals the affine change applied by hand ------------------------------------------


def film_hooks(bn_of_site, film):
    def hook_for(dgamma, dbeta):
        def hook(module, inputs, output):
            return output * (1 + dgamma).view(1, -1, 1, 1) + dbeta.view(1, -1, 1, 1)

        return hook

    return [bn_of_site[site].register_forward_hook(hook_for(*film[site])) for site in film]


@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
@pytest.mark.parametrize(("bn_mode", "train"), [("episode", True), ("running", False)])
def test_film_equals_the_affine_change_by_hand(kind, bn_mode, train):
    ours, plain, bn_of_site = ours_and_plain(kind, 1, 28, bn_mode)
    set_mode(train, ours, plain)
    x = images(3, 1, 28)
    for sites in ([ours.sites[0]], [ours.sites[-1]], ours.sites[1::2], ours.sites):
        # large enough that some gammas are negative: max-pool does not commute with those
        film = random_film(ours, sites, scale=1.5)
        handles = film_hooks(bn_of_site, film)
        expected = plain(x)
        for handle in handles:
            handle.remove()
        assert not torch.allclose(expected, plain(x))
        torch.testing.assert_close(ours(x, film), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
def test_pooling_first_is_the_same_function_and_gradient(in_channels, image_size):
    ours, plain, bn_of_site = ours_and_plain("conv4", in_channels, image_size, "episode")
    x = images(5, in_channels, image_size).requires_grad_()
    # large enough that some gammas are negative: there the convolution's sign flips instead
    film = random_film(ours, ours.sites, scale=1.5)
    assert sum(bool((1 + dgamma < 0).any()) for dgamma, _ in film.values()) >= 2
    leaves = [x, *(f.requires_grad_() for pair in film.values() for f in pair)]
    handles = film_hooks(bn_of_site, film)
    expected = plain(x)
    for handle in handles:
        handle.remove()
    for block in ours.blocks:
        block.pool_first = True
    result = ours(x, film)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-10)
    with torch.no_grad():  # without a graph, the statistics overwrite the convolution's output
        torch.testing.assert_close(ours(x, film), expected, rtol=0, atol=1e-10)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3)).double()
    for ours_grad, plain_grad in zip(
        torch.autograd.grad((result * weights).sum(), leaves),
        torch.autograd.grad((expected * weights).sum(), leaves),
        strict=True,
    ):
        torch.testing.assert_close(ours_grad, plain_grad, rtol=1e-8, atol=1e-10)


# --- split at a block boundary ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
@pytest.mark.parametrize(
    ("bn_mode", "train"), [("episode", True), ("episode", False), ("running", False)]
)
def test_forward_from_prefix_equals_the_full_forward(kind, bn_mode, train):
    ours, _, _ = ours_and_plain(kind, 1, 28, bn_mode)
    ours.train(train)
    x = images(5, 1, 28)
    for k in range(ours.num_blocks + 1):
        later_sites = [site for site in ours.sites if ours.block_of(site) >= k]
        film = random_film(ours, later_sites, seed=k)
        features = ours.prefix(x, k)
        assert features.shape == (5, *ours.prefix_shape(k))
        torch.testing.assert_close(
            ours(features, film, start_block=k), ours(x, film), rtol=0, atol=1e-10
        )


def test_running_prefix_is_per_image_in_eval_mode():
    net, _, _ = ours_and_plain("resnet12", 1, 28, "running")
    net.eval()
    x = images(6, 1, 28)
    chunks = torch.cat([net.prefix(x[:2], 2), net.prefix(x[2:], 2)])
    torch.testing.assert_close(chunks, net.prefix(x, 2), rtol=0, atol=1e-12)


def test_block_of_and_site_channels():
    net = ResNet12(3, SMALL_WIDTHS, 84)
    assert net.num_blocks == 4
    assert net.sites[:4] == ("block1.bn1", "block1.bn2", "block1.bn3", "block2.bn1")
    assert len(net.sites) == 12
    assert [net.block_of(s) for s in net.sites] == [b for b in range(4) for _ in range(3)]
    assert net.site_channels["block3.bn2"] == SMALL_WIDTHS[2]
    conv = Conv4(width=32)
    assert conv.sites == ("block1", "block2", "block3", "block4")
    assert conv.block_of("block3") == 2
    assert set(conv.site_channels.values()) == {32}


# --- torch.func ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
def test_functional_call_uses_the_given_parameters(kind):
    net, _, _ = ours_and_plain(kind, 1, 28, "episode")
    x = images(4, 1, 28)
    film = random_film(net, net.sites[:2])
    params = {name: p.detach() * 1.1 for name, p in net.named_parameters()}
    other = copy.deepcopy(net)
    other.load_state_dict(params)
    torch.testing.assert_close(functional_call(net, params, (x, film)), other(x, film))


@pytest.mark.parametrize("kind", ["conv4", "resnet12"])
def test_vmap_over_tasks_equals_a_loop(kind):
    net, _, _ = ours_and_plain(kind, 1, 28, "episode")
    params = dict(net.named_parameters())
    tasks = torch.stack([images(4, 1, 28, seed=t) for t in range(2)])
    films = [random_film(net, net.sites, seed=t) for t in range(2)]
    stacked = {
        site: tuple(torch.stack([f[site][i] for f in films]) for i in range(2))
        for site in net.sites
    }

    def embed(x, film):
        return functional_call(net, params, (x, film))

    batched = vmap(embed)(tasks, stacked)
    looped = torch.stack([embed(tasks[t], films[t]) for t in range(2)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-10)

    def loss(film, x):
        return embed(x, film).pow(2).mean()

    batched_grads = vmap(grad(loss))(stacked, tasks)
    for t in range(2):
        grads = grad(loss)(films[t], tasks[t])
        for site in net.sites:
            for i in range(2):
                torch.testing.assert_close(batched_grads[site][i][t], grads[site][i])


def test_running_mode_under_vmap_raises_in_training_and_works_in_eval():
    net, _, _ = ours_and_plain("conv4", 1, 28, "running")
    tasks = torch.stack([images(4, 1, 28, seed=t) for t in range(2)])
    with pytest.raises(RuntimeError, match="'loop' meta-batch strategy, or bn_mode='episode'"):
        vmap(net)(tasks)
    net.eval()
    torch.testing.assert_close(vmap(net)(tasks), torch.stack([net(t) for t in tasks]))


# --- shapes and construction -----------------------------------------------------------------


@pytest.mark.parametrize("width", [32, 64, 128, 512])
@pytest.mark.parametrize(("in_channels", "image_size", "cells"), [(1, 28, 1), (3, 84, 25)])
def test_conv4_shapes(width, in_channels, image_size, cells):
    net = Conv4(in_channels, width, image_size)
    assert net.feature_dim == width * cells
    with torch.no_grad():
        out = net(torch.rand(2, in_channels, image_size, image_size))
    assert out.shape == (2, net.feature_dim)


@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
@pytest.mark.parametrize("widths", [(64, 160, 320, 640), (64, 128, 256, 512)])
def test_resnet12_shapes(in_channels, image_size, widths):
    net = ResNet12(in_channels, widths, image_size)
    assert net.feature_dim == widths[-1]
    with torch.no_grad():
        out = net(torch.rand(2, in_channels, image_size, image_size))
    assert out.shape == (2, widths[-1])


def test_build_backbone_from_spec():
    conv = build_backbone(ModelSpec(backbone="conv4", width=32, in_channels=3, image_size=84))
    assert isinstance(conv, Conv4)
    assert (conv.feature_dim, conv.bn_mode) == (800, "episode")
    res = build_backbone(ModelSpec(backbone="resnet12", width=64, in_channels=3, image_size=84))
    assert isinstance(res, ResNet12)
    assert res.feature_dim == 640
    assert res.site_channels["block2.bn1"] == 160
    assert resnet12_widths(32) == (32, 80, 160, 320)
    assert build_backbone(ModelSpec(bn_mode="running")).bn_mode == "running"
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_backbone(ModelSpec(backbone="vgg"))  # type: ignore[arg-type]


# --- clear errors -----------------------------------------------------------------------------


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match=r"bn_mode must be one of \('episode', 'running'\)"):
        Conv4(bn_mode="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_size must be at least 16"):
        Conv4(image_size=8)
    with pytest.raises(ValueError, match="four positive widths"):
        ResNet12(widths=(64, 128))


def test_bad_forward_arguments_are_rejected():
    net = ResNet12(1, SMALL_WIDTHS, 28)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"expected images shaped \[N, 1, 28, 28\]"):
        net(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"prefix\(images, 2\) features shaped \[N, 6, 7, 7\]"):
        net(x, start_block=2)
    with pytest.raises(ValueError, match="start_block must be in 0..4"):
        net(x, start_block=5)
    with pytest.raises(ValueError, match=r"unknown FiLM sites \['block1'\]"):
        net(x, {"block1": (torch.zeros(4), torch.zeros(4))})
    early = random_film(net, ["block1.bn2"])
    with pytest.raises(ValueError, match=r"\['block1.bn2'\] lie before start_block=1"):
        net(
            net.prefix(x, 1),
            {k: (g.float(), b.float()) for k, (g, b) in early.items()},
            start_block=1,
        )
    with pytest.raises(ValueError, match=r"dgamma must have shape \[4\]"):
        net(x, {"block1.bn1": (torch.zeros(5), torch.zeros(4))})
    with pytest.raises(ValueError, match="unknown FiLM site 'block9'"):
        net.block_of("block9")
