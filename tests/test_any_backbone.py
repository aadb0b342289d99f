"""A user's own network as a FiLM backbone (metafilm.any_backbone): a torchvision-style ResNet-18
and a small vision transformer defined here, their sites, FiLM checked against the same networks
with the FiLM folded into their normalisation layers' affine parameters by hand, meta-steps
through FiLMLearner, the loader's errors and the adapted-parameter count."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodes.sampler import Episode
from metafilm.any_backbone import AdaptedParameters, ModuleBackbone, adapted_parameters
from metafilm.film import identity
from metafilm.learner import FiLMLearner
from metafilm.meta import make_optimizer, meta_backward, meta_step, task_loss
from metafilm.network_loader import load_module_backbone
from metafilm.specs import AdaptSpec, ModelSpec, OuterSpec

MODULE = "tests.test_any_backbone"
"""This file as the user's Python module that ``"module:factory"`` names."""
WAYS, SHOTS, QUERY, TASKS = 3, 2, 2, 2
ADAPT = AdaptSpec(inner_steps=1, inner_lr=0.5)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the user's networks ------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-BN, the shortcut (1x1 conv-BN when the shape
    changes), ReLU after the sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet-18 layout with ``fc = Identity``: the embedding is the pooled
    ``8 * width`` channels."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (width, 2 * width, 4 * width, 8 * width)
        inplanes = width
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18() -> ResNet:
    return ResNet()


def narrow_resnet18() -> ResNet:
    return ResNet(width=8)


RESNET18_SITES = (
    "bn1",
    "layer1.0.bn1",
    "layer1.0.bn2",
    "layer1.1.bn1",
    "layer1.1.bn2",
    "layer2.0.bn1",
    "layer2.0.bn2",
    "layer2.0.downsample.1",
    "layer2.1.bn1",
    "layer2.1.bn2",
    "layer3.0.bn1",
    "layer3.0.bn2",
    "layer3.0.downsample.1",
    "layer3.1.bn1",
    "layer3.1.bn2",
    "layer4.0.bn1",
    "layer4.0.bn2",
    "layer4.0.downsample.1",
    "layer4.1.bn1",
    "layer4.1.bn2",
)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, tokens, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (4x4 conv), position embedding, two pre-norm blocks, final LayerNorm, mean
    of the tokens; for 3 x 16 x 16 images."""

    def __init__(self, dim: int = 8, heads: int = 2, patch: int = 4, image_size: int = 16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads) for _ in range(2)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(tokens)).mean(1)


VIT_SITES = ("blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm")


# --- what the loader's errors are tried with ----------------------------------------------------

WIDTH = 64


def not_a_module() -> list[int]:
    return [1, 2]


def needs_width(width: int) -> ResNet:
    return ResNet(width)


# --- helpers -------------------------------------------------------------------------------------


def randomise_norms(net: nn.Module) -> nn.Module:
    """Affine parameters and running statistics away from their initial values, so that FiLM at
    one site and its folding into that site's affine parameters really differ from identity."""
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, nn.BatchNorm2d | nn.LayerNorm):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0.0, 0.2)
        for name, buffer in net.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.2)
    return net


def folded(net: nn.Module, site: str, dgamma: Tensor, dbeta: Tensor) -> nn.Module:
    """A copy of ``net`` whose ``site`` layer has FiLM folded into its affine parameters by hand:
    ``(1 + dgamma) * (weight * n + bias) + dbeta``."""
    twin = copy.deepcopy(net)
    layer = twin.get_submodule(site)
    with torch.no_grad():
        layer.bias.copy_(layer.bias * (1 + dgamma) + dbeta)
        layer.weight.mul_(1 + dgamma)
    return twin


def no_hooks_left(net: nn.Module) -> bool:
    return all(not layer._forward_hooks for layer in net.modules())


def episode(image_size: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERY).repeat(TASKS, 1)
    shape = (3, image_size, image_size)
    return Episode(
        torch.rand(TASKS, WAYS * SHOTS, *shape, generator=g, dtype=dtype),
        support_y,
        torch.rand(TASKS, WAYS * QUERY, *shape, generator=g, dtype=dtype),
        query_y,
        WAYS,
    )


def learner_of(backbone: ModuleBackbone, **model) -> FiLMLearner:
    spec = ModelSpec(
        in_channels=3, image_size=backbone.image_size, head_ways=WAYS, metric_scale=0.05, **model
    )
    return FiLMLearner(spec, ADAPT, backbone=backbone)


# --- ResNet-18 -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    """A ResNet-18's weights (statistics randomised) saved as a state dict, and that state."""
    torch.manual_seed(0)
    state = randomise_norms(resnet18()).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(state, path)
    return path, state


def test_a_resnet18_reloads_its_weights_and_its_20_batch_norms_are_the_sites(resnet18_file):
    path, saved = resnet18_file
    backbone = load_module_backbone(f"{MODULE}:resnet18", path, in_channels=3, image_size=32)
    assert backbone.sites == RESNET18_SITES
    assert {s: backbone.site_channels[s] for s in ("bn1", "layer2.0.bn1", "layer4.1.bn2")} == {
        "bn1": 64,
        "layer2.0.bn1": 128,
        "layer4.1.bn2": 512,
    }
    assert set(backbone.site_dims.values()) == {1}
    assert (backbone.feature_dim, backbone.bn_mode, backbone.num_blocks) == (512, "running", 1)
    loaded = backbone.module.state_dict()
    assert list(loaded) == list(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert backbone.module.training  # the probe's eval mode was undone


def test_film_on_a_resnet18_adapts_under_one_percent_of_its_parameters():
    backbone = load_module_backbone(f"{MODULE}:resnet18", None, in_channels=3, image_size=32)
    # FiLM: 2 x the channels of the 20 batch norms: bn1 64; layer1 4 x 64 = 256; layer2 4 x 128 +
    # downsample 128 = 640; layer3 4 x 256 + 256 = 1280; layer4 4 x 512 + 512 = 2560; in all
    # 4800 channels, 9600 parameters.
    # Backbone (fc = Identity): conv1 3*64*49 = 9408 + bn1 128; layer1 2 x (2 x 64*64*9 + 256) =
    # 147,968; layer2 64*128*9 + 3 x 128*128*9 + 4 x 256 + 64*128 + 256 = 525,568; layer3 (same
    # with 128 -> 256) 2,099,712; layer4 8,393,728: 11,176,512 (torchvision's 11,689,512 less
    # the fc layer's 512*1000 + 1000).
    counted = adapted_parameters(backbone)
    assert counted == AdaptedParameters(film=9600, backbone=11_176_512)
    assert counted.fraction < 0.01
    assert str(counted) == (
        "FiLM adapts 9,600 parameters per task: 0.086% of the backbone's 11,176,512"
    )
    # layer4 alone: 4 x 512 + 512 channels
    assert adapted_parameters(backbone, ("layer4",)).film == 2 * 2560


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("site", ["layer2.0.downsample.1", "layer3.1.bn1"])
def test_resnet_film_is_identity_at_zero_and_equals_the_folded_batch_norm(training, site):
    torch.manual_seed(2)
    net = randomise_norms(narrow_resnet18()).double().train(training)
    backbone = ModuleBackbone(net, in_channels=3, image_size=32)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    zero = identity(backbone.site_channels, backbone.sites, like=x)
    assert torch.equal(backbone(x, zero), net(x))
    channels = backbone.site_channels[site]
    dgamma, dbeta = torch.randn(2, channels, dtype=torch.float64).unbind()
    got = backbone(x, {site: (dgamma, dbeta)})
    want = folded(net, site, dgamma, dbeta)(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got - net(x)).abs().max() > 1e-3
    assert no_hooks_left(net)


def test_a_resnet_meta_step_adapts_film_and_trains_every_backbone_weight():
    torch.manual_seed(3)
    learner = learner_of(ModuleBackbone(narrow_resnet18(), in_channels=3, image_size=32))
    before = {name: p.detach().clone() for name, p in learner.backbone.named_parameters()}
    optimizer = make_optimizer(learner, OuterSpec(lr=1e-2))
    outer = OuterSpec(lr=1e-2, strategy="loop")
    metrics = meta_step(learner, optimizer, episode(32), ADAPT, outer)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    for site in RESNET18_SITES:  # the encoder starts at identity (post-multipliers 0)
        assert metrics[f"film_predicted/{site}"] == 0.0
        assert metrics[f"film_adapted/{site}"] > 1e-3
    unchanged = [n for n, p in learner.backbone.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_a_frozen_resnet_keeps_its_weights_and_statistics_while_the_rest_learns():
    torch.manual_seed(4)
    net = randomise_norms(narrow_resnet18())
    learner = learner_of(ModuleBackbone(net, in_channels=3, image_size=32), backbone_mode="frozen")
    assert not learner.caches_prefix
    state = {k: v.clone() for k, v in net.state_dict().items()}
    scale = learner.head.scale.detach().clone()
    optimizer = make_optimizer(learner, OuterSpec(lr=1e-2))
    meta_step(learner, optimizer, episode(32), ADAPT, OuterSpec(lr=1e-2))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert not net.training
    assert not torch.equal(learner.head.scale, scale)


def test_running_batch_norm_in_training_is_refused_under_vmap_and_frozen_it_runs_there():
    torch.manual_seed(5)
    net = randomise_norms(narrow_resnet18()).double()
    data = episode(32, dtype=torch.float64)
    outer = learner_of(ModuleBackbone(net, in_channels=3, image_size=32)).double()
    with pytest.raises(RuntimeError, match="use the 'loop' meta-batch strategy"):
        meta_backward(outer, data, ADAPT, strategy="vmap")
    frozen = learner_of(
        ModuleBackbone(net, in_channels=3, image_size=32), backbone_mode="frozen"
    ).double()
    with torch.no_grad():
        frozen.encoder.postmult.normal_(0.0, 0.5)
    by_strategy = {}
    for strategy in ("loop", "vmap"):
        frozen.zero_grad()
        metrics = meta_backward(frozen, data, ADAPT, strategy=strategy)
        by_strategy[strategy] = (metrics["loss"], frozen.encoder.postmult.grad.clone())
    torch.testing.assert_close(by_strategy["vmap"], by_strategy["loop"], rtol=1e-8, atol=1e-10)


# --- a small vision transformer ------------------------------------------------------------------


def test_vit_sites_are_its_layer_norms_and_film_acts_on_the_last_dim():
    torch.manual_seed(6)
    net = randomise_norms(TinyViT()).double()
    backbone = ModuleBackbone(net, in_channels=3, image_size=16)
    assert backbone.sites == VIT_SITES
    assert backbone.site_channels == dict.fromkeys(VIT_SITES, 8)
    assert set(backbone.site_dims.values()) == {-1}
    assert (backbone.feature_dim, backbone.bn_mode) == (8, "episode")
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    zero = identity(backbone.site_channels, backbone.sites, like=x)
    assert torch.equal(backbone(x, zero), net(x))
    dgamma, dbeta = torch.randn(2, 8, dtype=torch.float64).unbind()
    got = backbone(x, {"blocks.1.norm1": (dgamma, dbeta)})
    want = folded(net, "blocks.1.norm1", dgamma, dbeta)(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got - net(x)).abs().max() > 1e-3
    assert no_hooks_left(net)


def test_vit_meta_gradients_by_loop_and_vmap_agree_and_a_meta_step_trains_it():
    torch.manual_seed(7)
    learner = learner_of(ModuleBackbone(TinyViT(), in_channels=3, image_size=16)).double()
    with torch.no_grad():  # leave the identity so that the encoder path really matters
        learner.encoder.postmult.normal_(0.0, 0.5)
    data = episode(16, dtype=torch.float64)
    grads = {}
    for strategy in ("loop", "vmap"):  # autograd vs torch.func.grad, second order both
        learner.zero_grad()
        meta_backward(learner, data, ADAPT, strategy=strategy)
        grads[strategy] = [p.grad.clone() for p in learner.parameters()]
    torch.testing.assert_close(grads["vmap"], grads["loop"], rtol=1e-7, atol=1e-10)
    assert all(float(g.abs().max()) > 0 for g in grads["loop"])
    before = [p.detach().clone() for p in learner.parameters()]
    optimizer = make_optimizer(learner, OuterSpec(lr=1e-2))
    metrics = meta_step(learner, optimizer, data, ADAPT, OuterSpec(lr=1e-2, strategy="vmap"))
    assert all(metrics[f"film_adapted/{site}"] > 0 for site in VIT_SITES)
    assert all(not torch.equal(p, b) for p, b in zip(learner.parameters(), before, strict=True))


def test_vit_meta_gradient_through_functional_call_and_func_grad_matches_autograd():
    torch.manual_seed(8)
    learner = learner_of(ModuleBackbone(TinyViT(), in_channels=3, image_size=16)).double()
    with torch.no_grad():
        learner.encoder.postmult.normal_(0.0, 0.5)
    data = episode(16, dtype=torch.float64)
    one = Episode(data.support_x[:1], data.support_y[:1], data.query_x[:1], data.query_y[:1], WAYS)
    params = {name: p.detach() for name, p in learner.named_parameters()}
    buffers = dict(learner.named_buffers())

    def query_loss(values: dict[str, Tensor]) -> Tensor:  # the backbone by functional_call
        return task_loss(values, buffers, learner, one.task(0), ADAPT, differentiate="func")[0]

    by_func = torch.func.grad(query_loss)(params)  # second order: torch.func.grad of func.grad
    learner.zero_grad()
    meta_backward(learner, one, ADAPT, strategy="loop")  # the modules called, autograd
    for name, parameter in learner.named_parameters():
        torch.testing.assert_close(by_func[name], parameter.grad, rtol=1e-7, atol=1e-10)
    assert float(by_func["backbone.module.blocks.0.norm1.weight"].abs().max()) > 0


# --- which layers are sites ----------------------------------------------------------------------


class Mixed(nn.Module):
    """Group norm, a non-affine episode batch norm, an RMS norm over the features, a layer norm
    over three dims (not a site) and a layer norm never called (not a site)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4, affine=False, track_running_stats=False)
        self.ln_chw = nn.LayerNorm((4, 8, 8))
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.rms = nn.RMSNorm(6)
        self.unused = nn.LayerNorm(6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_chw(self.bn(self.gn(self.conv(x))))
        return self.rms(self.fc(h.flatten(1)))


def test_sites_are_the_called_norm_layers_over_one_channel_dim():
    net = Mixed().double()
    backbone = ModuleBackbone(net, in_channels=3, image_size=8)
    assert backbone.site_dims == {"gn": 1, "bn": 1, "rms": -1}
    assert backbone.site_channels == {"gn": 4, "bn": 4, "rms": 6}
    assert (backbone.feature_dim, backbone.bn_mode) == (6, "episode")
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    dgamma, dbeta = torch.randn(2, 4, dtype=torch.float64).unbind()
    # by hand: the non-affine batch norm's output, modulated per channel on dim 1
    normalised = F.batch_norm(net.gn(net.conv(x)), None, None, training=True)
    modulated = normalised * (1 + dgamma).view(1, 4, 1, 1) + dbeta.view(1, 4, 1, 1)
    want = net.rms(net.fc(net.ln_chw(modulated).flatten(1)))
    torch.testing.assert_close(backbone(x, {"bn": (dgamma, dbeta)}), want)


def test_normalize_standardises_each_input_channel_by_the_statistics_set():
    torch.manual_seed(9)
    net = Mixed().double()
    backbone = ModuleBackbone(net, in_channels=3, image_size=8, normalize=True).double()
    backbone.set_input_statistics([0.5, 0.25, 0.0], [2.0, 0.5, 1.0])
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    mean = torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(backbone(x), net((x - mean) / std))
    with pytest.raises(ValueError, match=r"does not normalise its inputs \(normalize=False\)"):
        ModuleBackbone(net, in_channels=3, image_size=8).set_input_statistics([0] * 3, [1] * 3)


def test_wrong_inputs_and_sites_are_refused():
    backbone = ModuleBackbone(Mixed(), in_channels=3, image_size=8)
    with pytest.raises(
        ValueError, match=r"expected images shaped \[N, 3, 8, 8\]; got \(2, 3, 9, 9\)"
    ):
        backbone(torch.rand(2, 3, 9, 9))
    with pytest.raises(ValueError, match=r"unknown FiLM sites \['conv'\]"):
        backbone(torch.rand(2, 3, 8, 8), {"conv": (torch.zeros(4), torch.zeros(4))})
    with pytest.raises(
        ValueError, match=r"one block: the block index must be 0 \(its input\); got 1"
    ):
        backbone(torch.rand(2, 3, 8, 8), start_block=1)
    with pytest.raises(ValueError, match="calls no normalisation layer"):
        ModuleBackbone(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), in_channels=3, image_size=8)
    with pytest.raises(
        ValueError, match=r"one tensor of features \[N, \.\.\.\]; .* returned \(4,\)"
    ):
        ModuleBackbone(
            nn.Sequential(nn.Conv2d(3, 2, 8), nn.BatchNorm2d(2), nn.Flatten(0)),
            in_channels=3,
            image_size=8,
        )


# --- the loader's errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tests.test_any_backbone", "must name a factory as 'package.module:factory'"),
        ("no_such_package_xyz.nets:resnet", "there is no Python module 'no_such_package_xyz'"),
        (f"{MODULE}:resnet50", f"module '{MODULE}' has no 'resnet50'"),
        (f"{MODULE}:WIDTH", "'WIDTH' is a int, not a callable factory"),
        (
            f"{MODULE}:needs_width",
            r"needs_width takes arguments \(width\) and metafilm calls it with none",
        ),
        (f"{MODULE}:not_a_module", r"not_a_module\(\) returned a list, not a torch.nn.Module"),
    ],
)
def test_a_spec_that_names_no_network_is_one_clear_line(spec, message):
    with pytest.raises(ValueError, match=message) as caught:
        load_module_backbone(spec, None, in_channels=3, image_size=32)
    assert str(caught.value).startswith(f"backbone {spec!r}")
    assert "\n" not in str(caught.value)


def test_a_weights_file_that_does_not_fit_is_one_clear_line(tmp_path):
    spec = f"{MODULE}:narrow_resnet18"
    vit, wider, pickled, checkpoint = (tmp_path / f"{n}.pt" for n in ("vit", "w", "p", "c"))
    torch.save(TinyViT().state_dict(), vit)
    torch.save(ResNet(width=9).state_dict(), wider)
    torch.save(narrow_resnet18(), pickled)  # a whole module: code to run when loaded
    torch.save({"epoch": 3, "model": narrow_resnet18().state_dict()}, checkpoint)
    cases = [
        (tmp_path / "absent.pt", "does not exist"),
        (vit, r"missing keys conv1.weight, bn1.weight, bn1.bias and \d+ more, unexpected keys"),
        (wider, r"shapes differ at conv1.weight \(9, 3, 7, 7\) for \(8, 3, 7, 7\)"),
        (pickled, r"cannot be read as tensors \(weights_only=True\).*torch.save\(module"),
        (checkpoint, r"holds no state dict of tensors \(found \['epoch', 'model'\]\)"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            load_module_backbone(spec, path, in_channels=3, image_size=32)
        assert str(path) in str(caught.value)
        assert "\n" not in str(caught.value)


def test_a_configured_resnet_trains_on_a_folder_adapts_and_exports_to_onnx(tmp_path, capsys):
    """`model.backbone = "package.module:factory"` with `model.weights`: a narrow ResNet-18
    loaded from a state dict trains on an image folder, a task adapted from the run is saved and
    exported with FiLM folded into its batch norms, and onnxruntime gives PyTorch's outputs."""
    from PIL import Image

    from metafilm.cli import main
    from metafilm.export import export_onnx
    from metafilm.task_model import TaskModel

    generator = np.random.default_rng(0)
    for k in range(6):
        (tmp_path / "images" / f"class{k}").mkdir(parents=True)
        for i in range(4):
            pixels = generator.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (k + 1)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{k}" / f"{i}.png")
    torch.manual_seed(0)
    weights = tmp_path / "narrow.pt"
    torch.save(randomise_norms(narrow_resnet18()).state_dict(), weights)
    config = tmp_path / "resnet.toml"
    config.write_text(
        f"""
[data]
dataset = "folder"
root = "{tmp_path / "images"}"
cache_dir = "{tmp_path / "cache"}"
image_size = 32
split_fractions = [1.0, 0.0, 0.0]
ways = 3
shots = 1
query = 2
[model]
backbone = "{MODULE}:narrow_resnet18"
weights = "{weights}"
bn_mode = "running"
metric_scale = 0.05
[adapt]
inner_steps = 1
inner_lr = 0.5
[outer]
meta_batch_size = 2
strategy = "loop"
[train]
steps = 2
val_every = 0
checkpoint_every = 2
""",
        encoding="utf-8",
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    support = tmp_path / "images"
    task_file = tmp_path / "task.safetensors"
    assert main(["adapt", str(run), "--support", str(support), "--out", str(task_file)]) == 0
    capsys.readouterr()
    task = TaskModel.load(task_file)
    assert len(task.deviations) == 20 and task.ways == 6
    onnxruntime = pytest.importorskip("onnxruntime")
    network = export_onnx(task, tmp_path / "task.onnx")
    images = torch.from_numpy(generator.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8))
    session = onnxruntime.InferenceSession(str(network))
    _, probabilities = session.run(None, {"images": images.float().div(255).numpy()})
    assert np.allclose(probabilities, task.predict(images).numpy(), atol=1e-4, rtol=0)
