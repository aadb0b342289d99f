"""Random crops, flips and colour jitter of natural training images (miniImageNet, 84x84 RGB).

Few-shot models on miniImageNet overfit their 64 training classes; the usual remedy (MetaOptNet's
episodes, RFS's pretraining) is a random crop out of the padded image, a horizontal flip and a
colour jitter of every training image. Here every draw comes from a `numpy.random.Generator`, so
that an augmented training task stays a function of its key (exact resume, disjoint distributed
slices), and the pixels are changed afterwards by operations vectorised over the whole batch.

Per image, :func:`draw_photo` draws :data:`PHOTO_PARAMS` numbers ``(dy, dx, flip, brightness,
contrast, saturation)``; :func:`apply_photo` then

1. crops the original size at offset ``(dy, dx)`` (each in ``0..2 * crop_padding``) out of the
   image reflect-padded by ``crop_padding`` pixels on each side (``dy = dx = crop_padding`` is
   the centred crop, the identity);
2. flips it left to right when ``flip`` is 1;
3. scales brightness, contrast and saturation by their factors, in that fixed order, with
   torchvision's ``ColorJitter`` formulas, each result clamped to [0, 1]: brightness ``b x``;
   contrast ``c x + (1 - c) m`` with ``m`` the mean over the image of its grayscale
   ``0.299 R + 0.587 G + 0.114 B``; saturation ``s x + (1 - s) g`` with ``g`` the grayscale of
   each pixel (identity for single-channel images). torchvision weighs red by 0.2989 instead;
   the weights here sum to 1, so a gray pixel stays gray.

Identity parameters give back the input bit-exactly. Speed, 128 images of 3x84x84 float32 with
every component on, one thread (2-core Intel Xeon, torch 2.13.0+cpu)::

    nice -n 15 python -c "import torch, timeit; from episodes.photo import *; \\
    torch.set_num_threads(1); a = PhotoAugmentation(8, True, 0.4); \\
    x = torch.rand(128, 3, 84, 84); p = photo_batch_params([0], 128, a); \\
    print(min(timeit.repeat(lambda: apply_photo(x, p, a), number=20, repeat=5)) / 20)"

gives 9 to 12 ms per batch (best of 5 x 20 calls, with a training run on the other core):
about 3 ms for the crop and flip (one gather) and 5 ms for the jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch

PHOTO_PARAMS = 6
"""Numbers per image: dy, dx (crop offsets in 0..2*padding), flip (0/1), brightness, contrast
and saturation factors."""

_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class PhotoAugmentation:
    """Which photometric and geometric distortions to draw; the defaults turn all of them off.

    `crop_padding`: a random crop of the original size out of the image reflect-padded by this
    many pixels on each side (0: off). `flip`: a horizontal flip with probability 1/2.
    `jitter`: brightness, contrast and saturation factors each uniform in
    [1 - jitter, 1 + jitter] (0: off; at most 1, so that no factor is negative).
    """

    crop_padding: int = 0
    flip: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        padding = self.crop_padding
        if isinstance(padding, bool) or not isinstance(padding, Integral):
            raise TypeError(f"crop_padding must be an int, got {type(padding).__name__}")
        if padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {padding}")
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {type(self.flip).__name__}")
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, Real):
            raise TypeError(f"jitter must be a number, got {type(jitter).__name__}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {jitter}")

    @property
    def active(self) -> bool:
        """Whether any component is on."""
        return self.crop_padding > 0 or self.flip or self.jitter > 0


def draw_photo(rng: np.random.Generator, count: int, augmentation: PhotoAugmentation) -> np.ndarray:
    """Parameters of ``count`` images as float32 ``[count, PHOTO_PARAMS]``.

    The draws, in this order, each for all ``count`` images at once and only when its component
    is on: ``rng.integers(0, 2 * crop_padding + 1, (2, count))`` for dy and dx,
    ``rng.integers(0, 2, count)`` for the flips, ``rng.uniform(1 - jitter, 1 + jitter,
    (3, count))`` for the brightness, contrast and saturation factors. The columns of a
    component that is off hold its identity (dy = dx = crop_padding, flip 0, factors 1) and take
    nothing from ``rng``, so turning a component off leaves the other draws as they were.
    """
    if isinstance(count, bool) or not isinstance(count, Integral) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    padding = augmentation.crop_padding
    params = np.empty((count, PHOTO_PARAMS), dtype=np.float32)
    params[:, 0:2] = padding
    params[:, 2] = 0
    params[:, 3:6] = 1
    if padding > 0:
        params[:, 0:2] = rng.integers(0, 2 * padding + 1, (2, count)).T
    if augmentation.flip:
        params[:, 2] = rng.integers(0, 2, count)
    if augmentation.jitter > 0:
        jitter = augmentation.jitter
        params[:, 3:6] = rng.uniform(1 - jitter, 1 + jitter, (3, count)).T
    return params


def photo_batch_params(
    key: Sequence[int], count: int, augmentation: PhotoAugmentation
) -> torch.Tensor:
    """Parameters of a mini-batch of ``count`` single images (pretraining), float32
    ``[count, PHOTO_PARAMS]``, drawn by :func:`draw_photo` from
    ``numpy.random.default_rng(key)`` alone: the same key gives the same batch."""
    return torch.from_numpy(draw_photo(np.random.default_rng(key), count, augmentation))


def apply_photo(
    pixels: torch.Tensor, params: torch.Tensor, augmentation: PhotoAugmentation
) -> torch.Tensor:
    """Distort ``pixels [N, C, H, W]`` (floats in [0, 1]) image by image with ``params
    [N, PHOTO_PARAMS]`` (see the module docstring); same shape and dtype, in [0, 1].

    Components that ``augmentation`` turns off are skipped, and their columns must hold the
    identity. The input is not modified.
    """
    if pixels.dim() != 4 or not pixels.is_floating_point():
        raise ValueError(
            f"pixels must be floats [N, C, H, W], got {pixels.dtype} {tuple(pixels.shape)}"
        )
    n, channels, height, width = pixels.shape
    if tuple(params.shape) != (n, PHOTO_PARAMS):
        raise ValueError(
            f"photo params must be [{n}, {PHOTO_PARAMS}] for {n} images, got {tuple(params.shape)}"
        )
    if channels not in (1, 3):
        raise ValueError(f"photo augmentation needs 1 or 3 channels, got {channels}")
    padding = augmentation.crop_padding
    params = params.detach().to("cpu", torch.float64)
    offsets, flips, factors = params[:, 0:2], params[:, 2], params[:, 3:6]
    _check_params(offsets, flips, factors, augmentation)
    if padding > 0 or augmentation.flip:
        out = _crop_and_flip(pixels, offsets.long(), flips.bool(), padding)
        if augmentation.jitter > 0:  # in place on the new buffer: one allocation fewer
            out = _jitter(out, factors.to(pixels.device, pixels.dtype), in_place=True)
        return out
    if augmentation.jitter > 0:
        return _jitter(pixels, factors.to(pixels.device, pixels.dtype), in_place=False)
    return pixels.clone()


def _check_params(
    offsets: torch.Tensor,
    flips: torch.Tensor,
    factors: torch.Tensor,
    augmentation: PhotoAugmentation,
) -> None:
    padding = augmentation.crop_padding
    if bool((offsets != offsets.round()).any()) or bool(
        ((offsets < 0) | (offsets > 2 * padding)).any()
    ):
        raise ValueError(
            f"photo crop offsets must be integers in 0..{2 * padding} for crop_padding="
            f"{padding}, got {offsets.unique().tolist()}"
        )
    if bool(((flips != 0) & (flips != 1)).any()) or (not augmentation.flip and bool(flips.any())):
        allowed = "0 or 1" if augmentation.flip else "0 (flip is off)"
        raise ValueError(f"photo flips must be {allowed}, got {flips.unique().tolist()}")
    jitter = augmentation.jitter
    if bool(((factors < 1 - jitter - 1e-6) | (factors > 1 + jitter + 1e-6)).any()):
        raise ValueError(
            f"photo jitter factors must be in [{1 - jitter}, {1 + jitter}] for jitter={jitter}, "
            f"got {factors.min().item()}..{factors.max().item()}"
        )


def _crop_and_flip(
    pixels: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int
) -> torch.Tensor:
    """One gather from the unpadded images: output pixel ``(h, w)`` reads row ``dy - padding +
    h`` and column ``dx - padding + w`` (``dx - padding + W - 1 - w`` when flipped), each
    reflected back into the image as ``numpy.pad(mode='reflect')`` pads it."""
    n, channels, height, width = pixels.shape
    if padding >= min(height, width):
        raise ValueError(
            f"crop_padding={padding} must be smaller than the image sides for reflection "
            f"padding, got {height}x{width} images"
        )
    device = pixels.device
    offsets, flips = offsets.to(device) - padding, flips.to(device)
    rows = _reflect(offsets[:, 0, None] + torch.arange(height, device=device), height)
    columns = torch.arange(width, device=device).expand(n, width)
    columns = torch.where(flips[:, None], width - 1 - columns, columns) + offsets[:, 1, None]
    columns = _reflect(columns, width)
    flat = (rows[:, :, None] * width + columns[:, None, :]).reshape(n, 1, -1)
    source = pixels.reshape(n, channels, -1)
    return source.gather(2, flat.expand(n, channels, -1)).view(n, channels, height, width)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices in ``-size < index < 2 * size - 1`` mirrored into ``0..size-1`` about the edge
    pixels (``-1 -> 1``, ``size -> size - 2``)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _jitter(pixels: torch.Tensor, factors: torch.Tensor, *, in_place: bool) -> torch.Tensor:
    """Brightness, contrast, then saturation, each ``ratio * x + (1 - ratio) * other`` clamped
    to [0, 1] (torchvision's ``_blend``), on one buffer: ``pixels`` itself when ``in_place``."""
    brightness, contrast, saturation = (factors[:, i, None, None, None] for i in range(3))
    out = pixels.mul_(brightness) if in_place else torch.mul(pixels, brightness)
    out.clamp_(0, 1)
    # the mean of the grayscale is the grayscale of the channel means
    weights = out.new_tensor(_GRAY if out.shape[1] == 3 else (1.0,))
    mean = (out.mean(dim=(2, 3)) @ weights)[:, None, None, None]
    out.mul_(contrast).add_((1 - contrast) * mean).clamp_(0, 1)
    if out.shape[1] == 3:
        red, green, blue = out.unbind(1)
        gray = red.mul(_GRAY[0]).add_(green, alpha=_GRAY[1]).add_(blue, alpha=_GRAY[2])
        out.mul_(saturation).add_(gray.unsqueeze(1).mul_(1 - saturation)).clamp_(0, 1)
    return out
