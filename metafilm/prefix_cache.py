"""A frozen backbone's prefix features kept on disk, so that they are computed once per backbone.

A frozen backbone with running batch norm maps each image through its blocks before the first
FiLM site in a fixed way (`metafilm.meta.input_builder`). Every arm of a study over one
pretrained backbone, and every evaluation of such a run, needs the same features: on a CPU they
cost minutes per split (blocks 1-3 of a Conv-4 over miniImageNet's 38,400 training images). This
file stores them under the cache folder, named and checked by everything they depend on: the
backbone's weights and buffers (the input statistics included), the number of blocks, the images'
bytes, the dtype and the torch version. A file whose key, size or payload digest differs is not
used (`episodes.integrity.read_array_cache`), so a cached result is reused only for the very
backbone and images it was computed from.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from episodes.integrity import CacheError, read_array_cache, write_array_cache

FORMAT_VERSION = 1

_log = logging.getLogger(__name__)


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's state: every parameter and buffer, with its name, dtype and shape."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{list(value.shape)};".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def prefix_key(backbone: nn.Module, end_block: int, images: Tensor, dtype: torch.dtype) -> dict:
    """What the prefix features of ``images`` depend on, as a cache header."""
    return {
        "format": FORMAT_VERSION,
        "backbone_sha256": module_digest(backbone),
        "end_block": end_block,
        "images_sha256": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(),
        "images_shape": list(images.shape),
        "feature_dtype": str(dtype),
        "torch": torch.__version__,
    }


def prefix_store(cache_dir: Path) -> Callable[..., Tensor]:
    """The ``stored`` argument of ``metafilm.meta.input_builder`` that keeps features in
    ``cache_dir``."""
    return partial(cached_prefix, cache_dir)


def cached_prefix(
    cache_dir: Path,
    backbone: nn.Module,
    end_block: int,
    images: Tensor,
    dtype: torch.dtype,
    compute: Callable[[], Tensor],
) -> Tensor:
    """The prefix features of ``images`` from ``cache_dir`` if a file there was computed from this
    very backbone and these images; otherwise ``compute()``, saved there for the next run. Only
    float32 and float64 features are kept."""
    if dtype not in (torch.float32, torch.float64):
        return compute()
    key = prefix_key(backbone, end_block, images, dtype)
    name = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "prefix" / f"{name}.bin"
    try:
        array, _ = read_array_cache(path, key)
        _log.info(f"prefix features of {len(images):,} images read from {path}")
        return torch.from_numpy(np.array(array, copy=False))
    except FileNotFoundError:
        pass
    except CacheError as error:
        _log.warning(f"recomputing the prefix features: {error}")
    started = time.perf_counter()
    _log.info(
        f"computing the features of blocks 1-{end_block} for {len(images):,} images once "
        f"(cached in {path.parent})"
    )
    features = compute()
    _log.info(f"prefix features computed in {time.perf_counter() - started:.0f} s")
    try:
        write_array_cache(path, features.numpy(), key)
    except OSError as error:
        _log.warning(f"the prefix features could not be cached ({error}); continuing without")
    return features
