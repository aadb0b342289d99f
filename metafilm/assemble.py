"""What a config assembles before any maths runs: its data splits, their episodes, its learner.

Shared by the trainer (`metafilm.train`) and the evaluation (`metafilm.evaluation`), so that both
load a split, draw episodes and build a learner the same way, and both turn what a user's files
or settings get wrong into a `DataError` or a `ConfigError` before any work starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from episodes.classes import ClassImages
from episodes.folder import load_folder
from episodes.integrity import CacheError, ChecksumError
from episodes.miniimagenet import load_miniimagenet
from episodes.omniglot import load_omniglot
from episodes.photo import PhotoAugmentation
from episodes.sampler import Episode, EpisodeSampler, FixedEpisodes
from metafilm.any_backbone import ModuleBackbone
from metafilm.config import DataConfig, RunConfig, episodes_fitting
from metafilm.errors import ConfigError, DataError
from metafilm.learner import FiLMLearner
from metafilm.network_loader import load_module_backbone
from metafilm.specs import ModelSpec

EVAL_BATCH = 50
"""Fixed episodes gathered per batch in evaluation (memory only; results do not depend on it)."""
AUGMENTATIONS = (
    "augment_rotations",
    "augment_affine",
    "augment_crop_padding",
    "augment_flip",
    "augment_jitter",
)
"""The `[data]` settings that change training images as they are drawn."""
EPISODE_SETTINGS = "data.ways / data.shots / data.query"
"""The settings that shape training and validation episodes (named when a split is too small)."""


class Progress(Protocol):
    """Where training and evaluation report their progress (the CLI's progress bar)."""

    def start(self, phase: str, done: int, total: int, unit: str | None = None) -> None:
        """Begin ``phase``, ``done`` of ``total`` in ``unit`` (default: the display's own)."""

    def update(self, done: int, metrics: Mapping[str, float]) -> None: ...

    def note(self, text: str) -> None:
        """A status of work inside the current step (the validation episodes done so far)."""

    def close(self) -> None: ...


def image_progress(progress: Progress | None, phase: str) -> Callable[[int, int], None] | None:
    """The ``on_images(done, total)`` of :func:`metafilm.meta.input_builder` shown on `progress`
    as `phase`, counted in images: started at 0, closed at `total`."""
    if progress is None:
        return None

    def on_images(done: int, total: int) -> None:
        if done == 0:
            progress.start(phase, 0, total, unit="image")
        progress.update(done, {})
        if done == total:
            progress.close()

    return on_images


def load_split(
    data: DataConfig, split: str, alphabets: tuple[str, ...] | None = None
) -> ClassImages:
    """One split of the configured dataset (for Omniglot, only `alphabets` of it if given); any
    problem with the files is a `DataError`."""
    root = data.root or None
    cache_dir = data.cache_dir or None
    try:
        if data.dataset == "omniglot":
            return load_omniglot(
                root, split, image_size=data.image_size, cache_dir=cache_dir, alphabets=alphabets
            )
        if data.dataset == "folder":
            return load_folder(
                data.root,
                split,
                image_size=data.image_size,
                channels=data.channels,
                class_lists=data.class_lists or None,
                fractions=data.split_fractions,
                seed=data.split_seed,
                cache_dir=cache_dir,
            )
        return load_miniimagenet(
            root, split, format=data.format, image_size=data.image_size, cache_dir=cache_dir
        )
    except (FileNotFoundError, ValueError, ChecksumError, CacheError) as error:
        raise DataError(f"cannot load {data.dataset} split {split!r}: {error}") from None


def build_learner(config: RunConfig) -> FiLMLearner:
    """The learner a config describes; settings the model rejects become a `ConfigError`."""
    try:
        learner = FiLMLearner(config.model, config.adapt, backbone=_network_backbone(config.model))
    except ValueError as error:
        raise ConfigError(f"[model] / [adapt] settings rejected: {error}") from None
    augmenting = [f"data.{name}" for name in AUGMENTATIONS if getattr(config.data, name)]
    if augmenting and learner.caches_prefix:
        raise ConfigError(
            f"{' and '.join(augmenting)} change training images, but a frozen backbone with "
            "running batch norm and no FiLM site in block 1 computes its first blocks once per "
            "image: turn the augmentation off (pretrain with it by 'metafilm pretrain' and pass "
            "pretrain.backbone), or use FiLM in block 1 or bn_mode 'episode'"
        )
    return learner


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and Python generators (model initialisation)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def photo_augmentation(data: DataConfig) -> PhotoAugmentation:
    """The photo augmentation of training images that `[data]` describes."""
    return PhotoAugmentation(data.augment_crop_padding, data.augment_flip, data.augment_jitter)


def fixed_episodes(
    classes: ClassImages,
    split: str,
    shape: tuple[int, int, int],
    *,
    seed: int,
    episodes: int,
    within_alphabet: bool,
    what: str,
) -> FixedEpisodes:
    """The fixed episodes of `split` (episode i a function of `(seed, i)`) for validation or a
    test, of `shape` (ways, shots, query); a shape the split cannot fill is a `ConfigError`
    naming the settings `what`."""
    return episodes_fitting(
        what,
        split,
        lambda: FixedEpisodes(
            classes, *shape, seed=seed, episodes=episodes, within_alphabet=within_alphabet
        ),
    )


def fixed_batches(
    source: FixedEpisodes,
    build: Callable[[Any], Episode],
    size: int = EVAL_BATCH,
    episodes: range | None = None,
) -> Iterator[Episode]:
    """The fixed episodes (all, or those numbered in `episodes`) as model inputs, `size` tasks at
    a time."""
    numbers = range(len(source)) if episodes is None else episodes
    return (build(source.take(numbers[i : i + size])) for i in range(0, len(numbers), size))


@dataclass(frozen=True)
class TrainingData:
    """The loaded training data: the split, its sampler, and the fixed validation episodes."""

    train_classes: ClassImages
    sampler: EpisodeSampler
    val_classes: ClassImages | None
    validation: FixedEpisodes | None


def load_training_data(config: RunConfig) -> TrainingData:
    """Load the splits and check the episode shapes against them (before any work)."""
    data, settings = config.data, config.train
    train_classes = load_split(data, data.train_split, data.train_alphabets)
    sampler = episodes_fitting(
        EPISODE_SETTINGS,
        data.train_split,
        lambda: EpisodeSampler(
            train_classes,
            data.ways,
            data.shots,
            data.query,
            seed=settings.seed,
            augment_rotations=data.augment_rotations,
            within_alphabet=data.within_alphabet,
            augment_affine=data.augment_affine,
            photo=photo_augmentation(data),
        ),
    )
    pretrain_validates = config.pretrain.enabled and config.pretrain.val_every > 0
    if not settings.val_every and not pretrain_validates:
        return TrainingData(train_classes, sampler, None, None)
    val_classes = load_split(data, data.val_split, data.val_alphabets)
    validation = fixed_episodes(
        val_classes,
        data.val_split,
        (data.ways, data.shots, data.query),
        seed=settings.val_seed,
        episodes=settings.val_episodes,
        within_alphabet=data.within_alphabet,
        what=EPISODE_SETTINGS,
    )
    return TrainingData(train_classes, sampler, val_classes, validation)


def _network_backbone(model: ModelSpec) -> ModuleBackbone | None:
    """The user's network ``model.backbone = "package.module:factory"`` names (None for a
    built-in backbone), whose batch-norm mode must be the one ``model`` states."""
    if ":" not in model.backbone:
        return None
    backbone = load_module_backbone(
        model.backbone,
        model.weights or None,
        in_channels=model.in_channels,
        image_size=model.image_size,
        normalize=model.normalize,
    )
    if backbone.bn_mode != model.bn_mode:
        kept = "kept" if backbone.bn_mode == "running" else "not kept"
        raise ValueError(
            f"{model.backbone}'s batch norms are in {backbone.bn_mode!r} mode (running statistics "
            f'{kept}): set model.bn_mode = "{backbone.bn_mode}"'
        )
    return backbone
