"""The one container every loader returns and every sampler reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def to_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images as floats in [0, 1]: the one conversion every reader of the images uses."""
    return images.to(dtype).div_(255)


def channel_statistics(images: torch.Tensor, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of each channel of uint8 `[N, C, H, W]` images, as pixels in
    [0, 1] (the input normalisation of natural images), summed in float64 a chunk at a time."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        pixels = to_pixels(images[start : start + chunk], torch.float64)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.pow(2).sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()


def alphabet_of(class_name: str) -> str:
    """The Omniglot alphabet of a class named `Alphabet/characterNN[/rotDDD]`."""
    return class_name.split("/", 1)[0]


@dataclass(frozen=True)
class ClassImages:
    """Images of a split grouped by class, stored contiguously class after class.

    `images` is uint8 `[N, C, H, W]`; class `c` owns rows `offsets[c]:offsets[c + 1]`.
    `names[c]` identifies the class (for Omniglot `Alphabet/characterNN/rotDDD`).
    """

    images: torch.Tensor
    offsets: torch.Tensor
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ClassImages.images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.offsets.dim() != 1 or len(self.offsets) != len(self.names) + 1:
            raise ValueError(
                f"ClassImages.offsets must have one entry per class plus one "
                f"({len(self.names) + 1}), got shape {tuple(self.offsets.shape)}"
            )
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self.images):
            raise ValueError("ClassImages.offsets must start at 0 and end at len(images)")
        if bool((self.offsets[1:] <= self.offsets[:-1]).any()):
            raise ValueError("ClassImages: every class needs at least one image")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def class_sizes(self) -> torch.Tensor:
        """Number of images of each class, int64 `[num_classes]`."""
        return self.offsets[1:] - self.offsets[:-1]

    def class_of(self) -> torch.Tensor:
        """Class index of every image, int64 `[N]`."""
        return torch.repeat_interleave(torch.arange(self.num_classes), self.class_sizes)

    @classmethod
    def from_arrays(cls, per_class: list[torch.Tensor], names: list[str]) -> ClassImages:
        """Stack per-class uint8 `[n_c, C, H, W]` tensors into one container."""
        sizes = torch.tensor([len(x) for x in per_class], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        return cls(torch.cat(per_class).contiguous(), offsets, tuple(names))
