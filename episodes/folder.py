"""A folder of class subfolders as a dataset: a user's own images, decoded once and cached.

Layout: every folder under ``root`` that holds image files directly is a class, named by its path
relative to ``root`` (``birds/sparrow``: nested paths are class names). An image is any file whose
suffix Pillow registers (``.jpg``, ``.png``, ``.webp``, ...); other files and hidden files or
folders (a leading dot) are skipped and counted. Each image is turned upright by its EXIF
orientation, converted to the configured channels (``L`` for 1, ``RGB`` for 3), its shorter side
resized to ``image_size`` (Lanczos), and centre-cropped to ``image_size`` square
(:data:`RESIZE_RULE`).

Splits divide the classes, never the images of a class: from class lists (a folder holding
``train.txt``, ``val.txt``, ``test.txt``, one class name per line) or, without them, a seeded
random fraction of the classes (``fractions`` of train / val / test). ``"all"`` is every class.

The decoded split is cached as a verified array cache (``episodes.integrity``) under
``<cache_dir>/folders/``, keyed by the folder, the listing of its images (path, size and
modification time of each file) and the decoding settings: adding, removing, replacing or touching
an image makes a new key, so the cache never serves stale pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from episodes.classes import ClassImages
from episodes.integrity import CacheError, read_array_cache, resolve_cache_dir, write_array_cache

SPLITS = ("train", "val", "test", "all")
RESIZE_RULE = "exif-upright, shorter side to image_size (lanczos), centre crop"
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_SUFFIXES = frozenset(
    suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN
)
"""The file suffixes Pillow can open: what counts as an image."""
_MODES = {1: "L", 3: "RGB"}
_CACHE_FORMAT = {"format": "metafilm-image-folder", "version": 1}
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderListing:
    """The classes of an image folder: ``classes`` maps a class name to its image paths (sorted),
    in sorted class order; ``skipped`` counts the non-image and hidden files passed over."""

    root: Path
    classes: dict[str, list[Path]]
    skipped: int


def list_folder(root: str | os.PathLike[str]) -> FolderListing:
    """The classes under ``root`` (see the module docstring); an error names an absent or empty
    folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    classes: dict[str, list[Path]] = {}
    skipped = 0
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        images = []
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                skipped += 1
            else:
                images.append(Path(folder) / name)
        if images and Path(folder) == root:
            raise ValueError(
                f"{root} holds images directly (e.g. {sorted(images)[0].name}); put each class's "
                f"images in its own subfolder, {root}/<class name>/"
            )
        if images:
            classes[Path(folder).relative_to(root).as_posix()] = sorted(images)
    if not classes:
        raise ValueError(
            f"no images under {root} ({skipped} non-image or hidden files skipped): put one "
            f"subfolder of images per class there"
        )
    return FolderListing(root, dict(sorted(classes.items())), skipped)


def read_class_list(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file, one per line; blank lines and ``#`` comments ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def split_classes(
    names: Sequence[str],
    split: str,
    *,
    class_lists: str | os.PathLike[str] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[str]:
    """The class names of ``split`` among ``names`` (sorted): from ``<class_lists>/<split>.txt``
    if given, else a seeded shuffle of ``names`` cut at ``fractions`` (train, val, test)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of an image folder: use one of {SPLITS}")
    if split == "all":
        return sorted(names)
    if class_lists is not None:
        path = Path(class_lists) / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no class list {path} (one class name per line)")
        chosen = read_class_list(path)
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ValueError(
                f"{path} names {len(unknown)} class(es) with no images, e.g. {unknown[0]!r}; "
                f"class names are folder paths relative to the image folder"
            )
        return sorted(set(chosen))
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1; got {fractions}"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [sorted(names)[i] for i in order]
    ends = np.round(np.cumsum(fractions) * len(names)).astype(int)
    start, end = {"train": (0, ends[0]), "val": (ends[0], ends[1]), "test": (ends[1], len(names))}[
        split
    ]
    return sorted(shuffled[start:end])


def load_image(path: str | os.PathLike[str], image_size: int, channels: int) -> np.ndarray:
    """One image file as uint8 ``[channels, image_size, image_size]`` by :data:`RESIZE_RULE`."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert(_MODES[channels])
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read the image {path}: {error}; remove or replace it") from None
    width, height = image.size
    scale = image_size / min(width, height)
    resized = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def load_images(paths: Sequence[Path], image_size: int, channels: int) -> torch.Tensor:
    """Image files as one uint8 ``[N, channels, image_size, image_size]`` tensor."""
    array = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        array[i] = load_image(path, image_size, channels)
    return torch.from_numpy(array)


def load_folder(
    root: str | os.PathLike[str],
    split: str = "all",
    *,
    image_size: int = 84,
    channels: int = 3,
    class_lists: str | os.PathLike[str] | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClassImages:
    """One split of an image folder as uint8 ``[N, channels, image_size, image_size]``, classes
    sorted by name, decoded once and cached (see the module docstring)."""
    listing = list_folder(root)
    names = split_classes(
        list(listing.classes), split, class_lists=class_lists, fractions=fractions, seed=seed
    )
    if not names:
        raise ValueError(
            f"the {split!r} split of {listing.root} has no classes (of {len(listing.classes)}): "
            f"give it a class list or a larger fraction"
        )
    paths = [listing.classes[name] for name in names]
    settings = {
        **_CACHE_FORMAT,
        "root": str(listing.root.resolve()),
        "listing_sha256": _listing_digest(listing.root, names, paths),
        "image_size": image_size,
        "channels": channels,
        "resize": RESIZE_RULE,
    }
    cache = (
        resolve_cache_dir(cache_dir)
        / "folders"
        / f"{settings['listing_sha256'][:16]}-{image_size}px-{channels}c.cache"
    )
    sizes = [len(files) for files in paths]
    offsets = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
    try:
        cached, _ = read_array_cache(cache, settings)
        if cached.shape == (sum(sizes), channels, image_size, image_size):
            return ClassImages(torch.from_numpy(cached), offsets, tuple(names))
        warnings.warn(f"{cache} holds {cached.shape} images; rebuilding it", stacklevel=2)
    except FileNotFoundError:
        pass
    except CacheError as error:
        warnings.warn(f"{error}; rebuilding it", stacklevel=2)
    megabytes = sum(sizes) * channels * image_size**2 / 1e6
    _log.info(
        f"decoding {sum(sizes):,} images of {len(names)} classes under {listing.root} into the "
        f"cache {cache} ({megabytes:,.1f} MB; once, until the folder changes)"
    )
    images = load_images([path for files in paths for path in files], image_size, channels)
    write_array_cache(cache, images.numpy(), settings)
    return ClassImages(images, offsets, tuple(names))


def _listing_digest(root: Path, names: Sequence[str], paths: Sequence[Sequence[Path]]) -> str:
    """sha256 of every image's class, relative path, size and modification time."""
    entries = []
    for name, files in zip(names, paths, strict=True):
        for path in files:
            stat = path.stat()
            entries.append(
                [name, path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns]
            )
    return hashlib.sha256(json.dumps(entries).encode("utf-8")).hexdigest()
