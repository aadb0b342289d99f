"""Backbones with named FiLM sites and an explicit batch-norm mode.

A backbone is a stack of blocks. Each block declares the FiLM *sites* it contains (a site sits right
after a batch norm, before the nonlinearity) and takes a deviations dict ``{site: (dgamma, dbeta)}``
(see :mod:`metafilm.film`). Sites absent from the dict are skipped outright, so a network without
FiLM is exactly the plain backbone. ``prefix`` and ``forward(..., start_block=k)`` split the network
at a block boundary, so that a frozen backbone can compute the FiLM-free blocks once.

Batch norm is never silently one thing or the other (``bn_mode``):

- ``"episode"``: always normalise with the statistics of the batch being processed, in train and
  eval mode alike (transductive, as MAML and CAVIA); no running statistics are kept.
- ``"running"``: batch statistics in ``train()`` mode, updating running buffers; the running
  statistics in ``eval()`` mode.

Convolutions have no bias: before a batch norm it is cancelled by the mean subtraction (or absorbed
into the batch norm's own bias).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafilm.batchnorm import episode_batch_norm
from metafilm.film import fold_into_affine, modulate
from metafilm.specs import BatchNormMode, ModelSpec

BN_MODES: tuple[str, ...] = ("episode", "running")
RUNNING_BUFFERS: tuple[str, ...] = ("running_mean", "running_var")
"""The buffers a ``"running"`` batch norm adds to the state dict (an ``"episode"`` one has none)."""
LEAKY_SLOPE = 0.1
INPUT_MEAN, INPUT_STD = "input_mean", "input_std"
"""The buffers of a backbone that standardises its inputs (``normalize=True``)."""

Film = Mapping[str, tuple[Tensor, Tensor]]


def _check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}; got {bn_mode!r}")


class BatchNorm(nn.Module):
    """Batch norm over dim 1 with learnable affine weight and bias, in an explicit ``bn_mode``.

    Written with torch's batch-norm kernels so that it works under
    ``torch.func.functional_call``; in episode mode also under ``vmap``. Episode mode outside
    ``vmap`` goes through :func:`metafilm.batchnorm.episode_batch_norm`: the same kernels, and a
    second-order backward about 25x faster in its sums on channels_last CPU tensors.
    """

    def __init__(
        self, channels: int, bn_mode: BatchNormMode, *, momentum: float = 0.1, eps: float = 1e-5
    ) -> None:
        super().__init__()
        _check_bn_mode(bn_mode)
        self.bn_mode = bn_mode
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.two_pass_statistics = False
        """Episode statistics in two passes (the mean, then the mean squared deviation) instead of
        torch's kernel, whose float32 channels_last variance is off by ~1e-4 relative (~1e-6 in
        two passes); slower, so only where float32 must stay close to float64
        (:mod:`metafilm.tiebreak`)."""
        if bn_mode == "running":
            mean, var = RUNNING_BUFFERS
            self.register_buffer(mean, torch.zeros(channels))
            self.register_buffer(var, torch.ones(channels))

    def forward(
        self, x: Tensor, film: tuple[Tensor, Tensor] | None = None, *, vmapped: bool = False
    ) -> Tensor:
        """Normalise ``x``; ``film = (dgamma, dbeta)`` modulates the result.

        FiLM is folded into the affine weight and bias (the same function, ~10% faster per task
        on CPU), except when the caller runs this under ``torch.func.vmap`` and says so
        (``vmapped``, as :mod:`metafilm.meta` does): there batch norm with per-task affine
        parameters gives second-order gradients off by ~1% (checked against a loop and finite
        differences), so FiLM is applied after the layer instead.
        """
        if film is not None and vmapped:
            return modulate(self(x, vmapped=True), *film)
        weight, bias = self.affine(film)
        if self.bn_mode == "episode" and self.two_pass_statistics:
            mean, var = self.batch_statistics(x)
            scale = weight.view_as(mean) * torch.rsqrt(var + self.eps)
            return torch.addcmul(bias.view_as(mean) - mean * scale, x, scale)
        if self.bn_mode == "episode" and vmapped:
            return F.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        if self.bn_mode == "episode":
            return episode_batch_norm(x, weight, bias, self.eps)
        try:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                weight,
                bias,
                training=self.training,
                momentum=self.momentum,
                eps=self.eps,
            )
        except RuntimeError as error:  # vmap refuses in-place updates of unbatched statistics
            if not (self.training and "batched" in str(error)):
                raise
            raise RuntimeError(
                "batch norm in 'running' mode updates its running statistics in training and "
                "cannot do so under vmap: use the 'loop' meta-batch strategy, or bn_mode='episode'"
            ) from error

    def affine(self, film: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """The affine weight and bias ``[C]`` with FiLM ``(dgamma, dbeta)`` folded in."""
        if film is None:
            return self.weight, self.bias
        return fold_into_affine(self.weight, self.bias, *film)

    @staticmethod
    def batch_statistics(
        x: Tensor, mean: Tensor | None = None, *, overwrite: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Per-channel mean and (biased) variance of ``x`` over all dims but 1, shaped
        ``[1, C, 1, ...]``, in two passes: as precise in float32 channels_last as in NCHW. A
        caller that knows the mean more cheaply passes it; one that needs ``x`` no more (and
        no gradient through it) lets it be ``overwrite``n: no temporary as large as ``x``."""
        dims = [0, *range(2, x.dim())]
        if mean is None:
            mean = x.mean(dims, keepdim=True)
        deviations = x.sub_(mean) if overwrite else x - mean
        return mean, deviations.square_().mean(dims, keepdim=True)


class Conv4Block(nn.Module):
    """conv3x3 (padding 1) - BN - [FiLM] - ReLU - max-pool 2, with one FiLM site."""

    def __init__(self, in_channels: int, out_channels: int, site: str, bn_mode: BatchNormMode):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.sites = (site,)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn = BatchNorm(out_channels, bn_mode)
        self.pool_first = False
        """Max-pool before batch norm's affine map and the ReLU in episode mode (not under vmap):
        the same function with a quarter of the elementwise work (:meth:`_pooled_first`), at
        float32 roundings that differ from the default order's; set where speed matters more
        than bit-equality with training (:mod:`metafilm.tiebreak`)."""

    def norm_of(self, site: str) -> BatchNorm:
        """The batch norm whose output ``site`` modulates."""
        return self.bn

    def forward(self, x: Tensor, film: Film, vmapped: bool = False) -> Tensor:
        site_film = film.get(self.sites[0])
        if self.pool_first and self.bn.bn_mode == "episode" and not vmapped:
            return self._pooled_first(x, site_film)
        h = self.bn(self.conv(x), site_film, vmapped=vmapped)
        return F.max_pool2d(F.relu(h), 2)

    def _pooled_first(self, x: Tensor, film: tuple[Tensor, Tensor] | None) -> Tensor:
        """``forward`` as pool, then normalise, then ReLU. Max-pooling commutes with ReLU and
        with a per-channel affine map of positive weight; a channel whose (FiLM-folded) weight is
        negative has its convolution negated instead, which negates its batch mean and keeps its
        variance, so normalising it with the weight's absolute value is the same map."""
        weight, bias = self.bn.affine(film)
        sign = torch.where(weight < 0, -1.0, 1.0).to(weight.dtype)
        kernel = self.conv.weight * sign.view(-1, 1, 1, 1)
        h = F.conv2d(x, kernel, padding=self.conv.padding)
        mean = None
        if self.in_channels < self.out_channels:  # the convolution is linear: mean of one image
            mean = F.conv2d(x.sum(0, keepdim=True), kernel, padding=self.conv.padding)
            mean = mean.mean((0, 2, 3), keepdim=True) / len(x)
        pooled = F.max_pool2d(h, 2)
        mean, var = self.bn.batch_statistics(h, mean, overwrite=not h.requires_grad)
        scale = weight.abs().view_as(mean) * torch.rsqrt(var + self.bn.eps)
        shift = bias.view_as(mean) - mean * scale
        return torch.addcmul(shift, pooled, scale).relu_()


class ResNet12Block(nn.Module):
    """Three conv3x3-BN-[FiLM] layers (leaky ReLU 0.1 between them), a 1x1 conv-BN shortcut, the
    residual sum, leaky ReLU and max-pool 2. FiLM sites ``{name}.bn1..bn3`` follow each batch norm
    of the main path; at ``bn3`` FiLM acts before the residual addition."""

    def __init__(self, in_channels: int, out_channels: int, name: str, bn_mode: BatchNormMode):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.sites = tuple(f"{name}.bn{i}" for i in (1, 2, 3))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = BatchNorm(out_channels, bn_mode)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(out_channels, bn_mode)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn3 = BatchNorm(out_channels, bn_mode)
        self.shortcut_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_bn = BatchNorm(out_channels, bn_mode)

    def norm_of(self, site: str) -> BatchNorm:
        """The batch norm whose output ``site`` modulates."""
        return getattr(self, site.rpartition(".")[2])

    def forward(self, x: Tensor, film: Film, vmapped: bool = False) -> Tensor:
        site1, site2, site3 = self.sites
        h = F.leaky_relu(self.bn1(self.conv1(x), film.get(site1), vmapped=vmapped), LEAKY_SLOPE)
        h = F.leaky_relu(self.bn2(self.conv2(h), film.get(site2), vmapped=vmapped), LEAKY_SLOPE)
        h = self.bn3(self.conv3(h), film.get(site3), vmapped=vmapped)
        h = h + self.shortcut_bn(self.shortcut_conv(x), vmapped=vmapped)
        return F.max_pool2d(F.leaky_relu(h, LEAKY_SLOPE), 2)


class InputStandardisation(nn.Module):
    """Per-channel standardisation of input images by buffers that travel with the weights
    (``normalize=True``): shared by the built-in backbones and a wrapped user's network."""

    def _init_standardisation(self, in_channels: int, normalize: bool) -> None:
        self.normalize = normalize
        if normalize:
            self.register_buffer(INPUT_MEAN, torch.zeros(in_channels))
            self.register_buffer(INPUT_STD, torch.ones(in_channels))

    def set_input_statistics(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Set the per-channel mean and std that ``normalize`` standardises inputs with."""
        if not self.normalize:
            raise ValueError("this backbone does not normalise its inputs (normalize=False)")
        with torch.no_grad():
            self.input_mean.copy_(torch.as_tensor(mean, dtype=self.input_mean.dtype))
            self.input_std.copy_(torch.as_tensor(std, dtype=self.input_std.dtype))

    def standardise(self, x: Tensor) -> Tensor:
        if not self.normalize:
            return x
        return (x - self.input_mean.view(1, -1, 1, 1)) / self.input_std.view(1, -1, 1, 1)


class Backbone(InputStandardisation, abc.ABC):
    """A stack of blocks, each halving the spatial size, with named FiLM sites.

    Blocks are indexed from 0 (``block_of``, ``prefix``, ``start_block``); site names count from 1
    (``"block1"`` is in block 0).
    """

    def __init__(
        self,
        blocks: Sequence[Conv4Block | ResNet12Block],
        *,
        in_channels: int,
        image_size: int,
        feature_dim: int,
        bn_mode: BatchNormMode,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        _check_bn_mode(bn_mode)
        min_size = 2 ** len(blocks)
        if image_size < min_size:
            raise ValueError(
                f"image_size must be at least {min_size} for {len(blocks)} blocks that each halve "
                f"the image; got {image_size}"
            )
        self.blocks = nn.ModuleList(blocks)
        self.in_channels = in_channels
        self.image_size = image_size
        self.feature_dim = feature_dim
        self.bn_mode = bn_mode
        self.sites: tuple[str, ...] = tuple(site for block in blocks for site in block.sites)
        self.site_channels: dict[str, int] = {
            site: block.out_channels for block in blocks for site in block.sites
        }
        self._site_block = {
            site: index for index, block in enumerate(blocks) for site in block.sites
        }
        self._init_standardisation(in_channels, normalize)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_of(self, site: str) -> int:
        """Index (from 0) of the block containing ``site``."""
        if site not in self._site_block:
            raise ValueError(f"unknown FiLM site {site!r}; this backbone has {list(self.sites)}")
        return self._site_block[site]

    def norm_of(self, site: str) -> BatchNorm:
        """The batch norm whose output FiLM ``site`` modulates: FiLM folds into its affine
        weight and bias (``metafilm.film.fold_into_affine``)."""
        return self.blocks[self.block_of(site)].norm_of(site)

    def prefix_shape(self, end_block: int) -> tuple[int, int, int]:
        """Per-image shape ``(C, H, W)`` of ``prefix(x, end_block)``: the input of block
        ``end_block`` (the backbone input for 0)."""
        self._check_block_index(end_block, "end_block")
        channels = self.in_channels if end_block == 0 else self.blocks[end_block - 1].out_channels
        size = self.image_size // 2**end_block
        return (channels, size, size)

    def prefix(self, x: Tensor, end_block: int) -> Tensor:
        """Output of blocks ``0..end_block-1`` without FiLM, shaped ``[N, *prefix_shape]``.

        What a frozen backbone can compute once when the first FiLM site used is in block
        ``end_block``; per image only in running mode (episode BN depends on the whole batch).
        """
        self._check_input(x, 0)
        self._check_block_index(end_block, "end_block")
        if end_block > 0:
            x = self.standardise(x)
        for block in self.blocks[:end_block]:
            x = block(x, {})
        return x

    def forward(
        self,
        x: Tensor,
        film: Film | None = None,
        *,
        start_block: int = 0,
        vmapped: bool = False,
    ) -> Tensor:
        """Embedding ``[N, feature_dim]`` of ``x`` with FiLM ``{site: (dgamma, dbeta)}``.

        Runs blocks ``start_block..`` on ``x``, which for ``start_block > 0`` is
        ``prefix(images, start_block)``. Sites missing from ``film`` are identity. Pass
        ``vmapped=True`` when calling it under ``torch.func.vmap`` with per-task FiLM (see
        :class:`BatchNorm`).
        """
        film = {} if film is None else film
        self._check_block_index(start_block, "start_block")
        self._check_input(x, start_block)
        self._check_film(film, start_block)
        if start_block == 0:
            x = self.standardise(x)
        for block in self.blocks[start_block:]:
            x = block(x, film, vmapped)
        return self.embed(x)

    @abc.abstractmethod
    def embed(self, h: Tensor) -> Tensor:
        """Last block's output ``[N, C, H, W]`` -> embedding ``[N, feature_dim]``."""

    def _check_block_index(self, index: int, name: str) -> None:
        if not 0 <= index <= self.num_blocks:
            raise ValueError(f"{name} must be in 0..{self.num_blocks}; got {index}")

    def _check_input(self, x: Tensor, start_block: int) -> None:
        expected = self.prefix_shape(start_block)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            what = "images" if start_block == 0 else f"prefix(images, {start_block}) features"
            raise ValueError(
                f"expected {what} shaped [N, {', '.join(map(str, expected))}]; got {tuple(x.shape)}"
            )

    def _check_film(self, film: Film, start_block: int) -> None:
        unknown = [site for site in film if site not in self._site_block]
        if unknown:
            raise ValueError(f"unknown FiLM sites {unknown}; this backbone has {list(self.sites)}")
        skipped = [site for site in film if self._site_block[site] < start_block]
        if skipped:
            raise ValueError(
                f"FiLM sites {skipped} lie before start_block={start_block} and would be ignored; "
                "start from an earlier block or drop them"
            )


class Conv4(Backbone):
    """Four conv3x3-BN-[FiLM]-ReLU-maxpool blocks of ``width`` channels; sites ``block1..block4``.

    The embedding is the flattened last feature map: ``width`` for 28x28 inputs (1x1 map),
    ``25 * width`` for 84x84 (5x5 map).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        image_size: int = 28,
        bn_mode: BatchNormMode = "episode",
        normalize: bool = False,
    ) -> None:
        if width < 1 or in_channels < 1:
            raise ValueError(
                f"Conv4 needs positive in_channels and width; got {in_channels} and {width}"
            )
        channels = (in_channels, width, width, width, width)
        blocks = [
            Conv4Block(channels[i], channels[i + 1], f"block{i + 1}", bn_mode) for i in range(4)
        ]
        final_size = image_size // 2**4
        super().__init__(
            blocks,
            in_channels=in_channels,
            image_size=image_size,
            feature_dim=width * final_size**2,
            bn_mode=bn_mode,
            normalize=normalize,
        )

    def embed(self, h: Tensor) -> Tensor:
        return h.flatten(1)


class ResNet12(Backbone):
    """The TADAM / MetaOptNet ResNet-12: four residual blocks of ``widths`` channels.

    Sites ``block{b}.bn{1,2,3}``. The embedding is the global average of the last feature map, so
    ``feature_dim = widths[-1]`` for any input size (TADAM used widths 64-128-256-512).
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        bn_mode: BatchNormMode = "episode",
        normalize: bool = False,
    ) -> None:
        widths = tuple(widths)
        if len(widths) != 4 or min(widths) < 1 or in_channels < 1:
            raise ValueError(
                f"ResNet12 needs positive in_channels and four positive widths; got in_channels="
                f"{in_channels}, widths={widths}"
            )
        channels = (in_channels, *widths)
        blocks = [
            ResNet12Block(channels[i], channels[i + 1], f"block{i + 1}", bn_mode) for i in range(4)
        ]
        super().__init__(
            blocks,
            in_channels=in_channels,
            image_size=image_size,
            feature_dim=widths[-1],
            bn_mode=bn_mode,
            normalize=normalize,
        )

    def embed(self, h: Tensor) -> Tensor:
        return h.mean(dim=(2, 3))


def resnet12_widths(width: int) -> tuple[int, int, int, int]:
    """ResNet-12 block widths scaled from the first: ``width * (1, 2.5, 5, 10)`` (64 gives the
    MetaOptNet 64-160-320-640)."""
    return (width, round(2.5 * width), 5 * width, 10 * width)


def build_backbone(spec: ModelSpec) -> Backbone:
    """The backbone a ``ModelSpec`` names. For ResNet-12, ``width`` is the first block's width and
    the others follow ``resnet12_widths``; build ``ResNet12`` directly for other widths."""
    if spec.backbone == "conv4":
        return Conv4(spec.in_channels, spec.width, spec.image_size, spec.bn_mode, spec.normalize)
    if spec.backbone == "resnet12":
        widths = resnet12_widths(spec.width)
        return ResNet12(spec.in_channels, widths, spec.image_size, spec.bn_mode, spec.normalize)
    raise ValueError(
        f"unknown backbone {spec.backbone!r}; choose 'conv4' or 'resnet12', or build a user's "
        "network with metafilm.network_loader.load_module_backbone and pass it as backbone="
    )
