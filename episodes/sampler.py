"""Seeded few-shot episodes: draw indices first, then gather images (or cached features).

Every task is a pure function of a short integer key, so a run is reproducible on any machine
and with any number of processes:

- training (`EpisodeSampler`): task `j` of step `s` comes from `(seed, s, j)`; resuming needs only
  the step counter, and distributed ranks can each draw a disjoint `task_slice` of one meta-batch;
- evaluation (`FixedEpisodes`): episode `i` comes from `(seed, i)`, whatever was drawn before.

The two use different derivation domains, so a training seed never reproduces evaluation episodes.

Layout of one task (class-major): support example `j * shots + k` is the `k`-th support image of
label `j`, query example `j * query + k` the `k`-th query image of label `j`. Label `j` stands for
class `classes[:, j]`; the classes of a task are drawn in random order, so labels are a random
permutation of class identity. Support and query images of a class are distinct images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
import torch

from episodes.classes import ClassImages, alphabet_of, to_pixels
from episodes.distort import apply_affines, draw_affines
from episodes.photo import PHOTO_PARAMS, PhotoAugmentation, apply_photo, draw_photo

_TRAIN_DOMAIN = 0x6D665452  # "mfTR": first word of every training task key
_EVAL_DOMAIN = 0x6D664556  # "mfEV": first word of every evaluation episode key
_KEY_WORD_LIMIT = 2**32  # key entries stay single 32-bit words so distinct keys never alias


@dataclass(frozen=True)
class IndexEpisode:
    """A meta-batch of tasks as row indices into `ClassImages.images` (or any per-image table).

    `support_idx [tasks, ways*shots]`, `query_idx [tasks, ways*query]` and the labels `support_y`,
    `query_y` (0..ways-1, same shapes) are int64 in the class-major layout of this module.
    `classes [tasks, ways]` holds the class id of each label; `rotations [tasks, ways]` the
    counter-clockwise quarter turns `gather` applies to every image of that label (zeros when
    rotation augmentation is off). `affines [tasks, ways, shots + query, 2, 3]` (None when affine
    augmentation is off) holds the distortion `gather` applies after the turn to each image of a
    label: its support images first, then its query images (see :mod:`episodes.distort`).
    `photo [tasks, ways, shots + query, PHOTO_PARAMS]` (None when photo augmentation is off)
    holds the crop, flip and colour jitter parameters `gather` applies after the affine map, laid
    out like `affines`, and `photo_augmentation` the settings they were drawn with (which
    `apply_photo` needs: the crop padding); see :mod:`episodes.photo`.
    """

    support_idx: torch.Tensor
    support_y: torch.Tensor
    query_idx: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor
    rotations: torch.Tensor
    affines: torch.Tensor | None = None
    photo: torch.Tensor | None = None
    photo_augmentation: PhotoAugmentation | None = None

    @property
    def tasks(self) -> int:
        return self.classes.shape[0]

    @property
    def ways(self) -> int:
        return self.classes.shape[1]

    @property
    def shots(self) -> int:
        return self.support_idx.shape[1] // self.ways

    @property
    def query(self) -> int:
        return self.query_idx.shape[1] // self.ways


@dataclass(frozen=True)
class Task:
    """One task: `support_x [ways*shots, C, H, W]` float32 in [0, 1], `support_y [ways*shots]`,
    `query_x [ways*query, C, H, W]`, `query_y [ways*query]` (int64 labels 0..ways-1)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int

    @property
    def shots(self) -> int:
        return self.support_y.shape[-1] // self.ways

    @property
    def query(self) -> int:
        return self.query_y.shape[-1] // self.ways


@dataclass(frozen=True)
class Episode:
    """A meta-batch of tasks as tensors: `support_x [tasks, ways*shots, C, H, W]` float32 in
    [0, 1], `support_y [tasks, ways*shots]`, `query_x [tasks, ways*query, C, H, W]`,
    `query_y [tasks, ways*query]` (int64 labels 0..ways-1, class-major layout)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def shots(self) -> int:
        return self.support_y.shape[-1] // self.ways

    @property
    def query(self) -> int:
        return self.query_y.shape[-1] // self.ways

    def task(self, i: int) -> Task:
        """Task `i` of the meta-batch, without the leading tasks dimension (views, no copy)."""
        return Task(
            self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], self.ways
        )

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Episode:
        """The same episode with every tensor on `device`."""
        return Episode(
            self.support_x.to(device, non_blocking=non_blocking),
            self.support_y.to(device, non_blocking=non_blocking),
            self.query_x.to(device, non_blocking=non_blocking),
            self.query_y.to(device, non_blocking=non_blocking),
            self.ways,
        )


def gather(
    classes: ClassImages, index_episode: IndexEpisode, dtype: torch.dtype = torch.float32
) -> Episode:
    """Turn index episodes into `dtype` images in [0, 1], applying the per-label rotations, then
    the per-image affine distortions, then the per-image crops, flips and colour jitter.

    Support and query rows of all tasks are fetched with one `index_select` into one buffer and
    converted with one division, so both halves are contiguous views of that buffer.
    """
    ep = index_episode
    flat_idx = torch.cat([ep.support_idx.reshape(-1), ep.query_idx.reshape(-1)])
    images = classes.images.index_select(0, flat_idx)
    if bool(ep.rotations.any()):
        _require_square(classes, "rotating images in gather")
        per_image = torch.cat(
            [
                ep.rotations.repeat_interleave(ep.shots, dim=1).reshape(-1),
                ep.rotations.repeat_interleave(ep.query, dim=1).reshape(-1),
            ]
        )
        for quarter_turns in (1, 2, 3):
            rows = (per_image == quarter_turns).nonzero().squeeze(1)
            images[rows] = torch.rot90(images[rows], quarter_turns, dims=(2, 3))
    pixels = to_pixels(images, dtype)
    if ep.affines is not None:
        pixels = apply_affines(pixels, _per_image(ep.affines, ep.shots))
    if ep.photo is not None:
        if ep.photo_augmentation is None:
            raise ValueError(
                "an IndexEpisode with photo parameters needs its photo_augmentation to apply them"
            )
        pixels = apply_photo(pixels, _per_image(ep.photo, ep.shots), ep.photo_augmentation)
    n_support = ep.support_idx.numel()
    image_shape = pixels.shape[1:]
    return Episode(
        support_x=pixels[:n_support].view(ep.tasks, -1, *image_shape),
        support_y=ep.support_y,
        query_x=pixels[n_support:].view(ep.tasks, -1, *image_shape),
        query_y=ep.query_y,
        ways=ep.ways,
    )


def _per_image(per_slot: torch.Tensor, shots: int) -> torch.Tensor:
    """Per-slot parameters `[tasks, ways, shots + query, ...]` in the order of the images of
    `gather`'s buffer: every task's support images (class-major), then every task's query
    images, one row each."""
    item_shape = per_slot.shape[3:]
    return torch.cat(
        [
            per_slot[:, :, :shots].reshape(-1, *item_shape),
            per_slot[:, :, shots:].reshape(-1, *item_shape),
        ]
    )


@dataclass(frozen=True)
class _Draw:
    """What drawing tasks needs to know of a split: validated sizes, no images."""

    ways: int
    shots: int
    query: int
    offsets: np.ndarray  # int64 [num_classes]: first row of each class
    sizes: np.ndarray  # int64 [num_classes]: images per class
    equal_sizes: bool
    augment_rotations: bool
    augment_affine: bool
    alphabets: tuple[np.ndarray, ...] | None  # class ids per eligible alphabet; None: any class
    photo: PhotoAugmentation | None = None  # None: no photo augmentation (never an inactive one)

    def tasks(self, keys: Sequence[Sequence[int]]) -> IndexEpisode:
        """One task per key; each task's draws come from `numpy.random.default_rng(key)` only.

        Per task: the classes (random order, so labels are shuffled; within-alphabet tasks first
        draw one eligible alphabet uniformly, then classes of it alone), one uniform key per
        image of each class (argsorted: a uniform random ordering of the class's images, whose
        first `shots` go to support and next `query` to query), then the rotations, the affine
        distortions and last the photo parameters when augmenting (so turning any of them off
        leaves every other draw as it was).
        """
        n_tasks, ways, per_class = len(keys), self.ways, self.shots + self.query
        width = int(self.sizes.max())
        chosen = np.empty((n_tasks, ways), dtype=np.int64)
        image_keys = np.empty((n_tasks, ways, width), dtype=np.float64)
        rotations = np.zeros((n_tasks, ways), dtype=np.int64)
        affines = np.empty((n_tasks, ways, per_class, 2, 3), dtype=np.float32)
        photo = np.empty((n_tasks, ways, per_class, PHOTO_PARAMS), dtype=np.float32)
        for t, key in enumerate(keys):
            rng = np.random.default_rng(key)
            if self.alphabets is None:
                chosen[t] = rng.choice(len(self.sizes), size=ways, replace=False)
            else:
                alphabet = self.alphabets[rng.integers(len(self.alphabets))]
                chosen[t] = rng.choice(alphabet, size=ways, replace=False)
            rng.random(out=image_keys[t])
            if self.augment_rotations:
                rotations[t] = rng.integers(0, 4, size=ways)
            if self.augment_affine:
                affines[t] = draw_affines(rng, ways * per_class).reshape(ways, per_class, 2, 3)
            if self.photo is not None:
                photo[t] = draw_photo(rng, ways * per_class, self.photo).reshape(
                    ways, per_class, PHOTO_PARAMS
                )
        if not self.equal_sizes:  # rows past a class's end sort last and are never taken
            image_keys[np.arange(width) >= self.sizes[chosen][..., None]] = 2.0
        positions = np.argsort(image_keys, axis=2)[..., :per_class]
        rows = torch.from_numpy(self.offsets[chosen][..., None] + positions)
        labels = torch.arange(ways)
        return IndexEpisode(
            support_idx=rows[..., : self.shots].reshape(n_tasks, -1),
            support_y=labels.repeat_interleave(self.shots).repeat(n_tasks, 1),
            query_idx=rows[..., self.shots :].reshape(n_tasks, -1),
            query_y=labels.repeat_interleave(self.query).repeat(n_tasks, 1),
            classes=torch.from_numpy(chosen),
            rotations=torch.from_numpy(rotations),
            affines=torch.from_numpy(affines) if self.augment_affine else None,
            photo=torch.from_numpy(photo) if self.photo is not None else None,
            photo_augmentation=self.photo,
        )


def _require_square(classes: ClassImages, purpose: str) -> None:
    height, width = classes.images.shape[-2:]
    if height != width:
        raise ValueError(
            f"{purpose} needs square images, got {height}x{width}; "
            f"resize the images or turn rotation augmentation off"
        )


def _require_photo_images(classes: ClassImages, photo: PhotoAugmentation) -> None:
    channels, height, width = classes.images.shape[1:]
    if channels not in (1, 3):
        raise ValueError(f"photo augmentation needs 1 or 3 channels, got {channels}")
    if photo.crop_padding >= min(height, width):
        raise ValueError(
            f"photo crop_padding={photo.crop_padding} must be smaller than the image sides "
            f"({height}x{width}) for reflection padding"
        )


def _require_key_word(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < _KEY_WORD_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return int(value)


def _require_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _alphabets_with(classes: ClassImages, ways: int) -> tuple[np.ndarray, ...]:
    """Class ids of each alphabet (the first part of an `Alphabet/characterNN[/rotDDD]` class
    name) that has at least `ways` classes, for within-alphabet tasks."""
    if not all("/" in name for name in classes.names):
        raise ValueError(
            "within_alphabet needs class names 'Alphabet/characterNN' (Omniglot); this split's "
            f"classes are named like {classes.names[0]!r}"
        )
    members: dict[str, list[int]] = {}
    for class_id, name in enumerate(classes.names):
        members.setdefault(alphabet_of(name), []).append(class_id)
    eligible = tuple(np.array(ids, dtype=np.int64) for ids in members.values() if len(ids) >= ways)
    if not eligible:
        largest = max(len(ids) for ids in members.values())
        raise ValueError(
            f"within_alphabet: no alphabet of this split has ways={ways} classes (the largest has "
            f"{largest}); use ways <= {largest}"
        )
    return eligible


def _draw_for(
    classes: ClassImages,
    ways: int,
    shots: int,
    query: int,
    augment_rotations: bool,
    within_alphabet: bool,
    augment_affine: bool,
    photo: PhotoAugmentation | None = None,
) -> _Draw:
    """Validate an episode shape against a split and keep the sizes needed to draw from it."""
    ways = _require_positive("ways", ways)
    shots = _require_positive("shots", shots)
    query = _require_positive("query", query)
    if ways < 2:
        raise ValueError(f"ways must be at least 2, got {ways}: a task needs classes to tell apart")
    if ways > classes.num_classes:
        raise ValueError(
            f"ways={ways} exceeds the {classes.num_classes} classes of this split; "
            f"use ways <= {classes.num_classes} or a larger split"
        )
    sizes = classes.class_sizes.numpy().astype(np.int64)
    smallest = int(sizes.argmin())
    if shots + query > sizes[smallest]:
        raise ValueError(
            f"shots + query = {shots} + {query} = {shots + query} exceeds the {sizes[smallest]} "
            f"images of the smallest class ({classes.names[smallest]!r}); support and query "
            f"images must be distinct, so lower shots or query"
        )
    if augment_rotations:
        _require_square(classes, "augment_rotations")
    if photo is not None and not isinstance(photo, PhotoAugmentation):
        raise TypeError(f"photo must be a PhotoAugmentation or None, got {type(photo).__name__}")
    if photo is not None and photo.active:
        _require_photo_images(classes, photo)
    else:
        photo = None
    return _Draw(
        ways=ways,
        shots=shots,
        query=query,
        offsets=classes.offsets[:-1].numpy().astype(np.int64),
        sizes=sizes,
        equal_sizes=bool((sizes == sizes[0]).all()),
        augment_rotations=augment_rotations,
        augment_affine=augment_affine,
        alphabets=_alphabets_with(classes, ways) if within_alphabet else None,
        photo=photo,
    )


class _EpisodeSource:
    """The episode shape shared by training and evaluation sources."""

    _draw: _Draw

    @property
    def ways(self) -> int:
        return self._draw.ways

    @property
    def shots(self) -> int:
        return self._draw.shots

    @property
    def query(self) -> int:
        return self._draw.query


class EpisodeSampler(_EpisodeSource):
    """Endless training tasks: task `j` of step `step` is a function of `(seed, step, j)` only.

    `augment_rotations=True` turns every sampled class by a random multiple of 90 degrees (the
    same turn for all its images in the task); with it off, the same seed draws the same classes
    and images as with it on. On splits that already hold rotated copies of a class (Omniglot's
    Vinyals split) an augmented class can look like another class of the split.
    `within_alphabet=True` draws every task's classes from one Omniglot alphabet (Lake et al.'s
    within-alphabet tasks, harder than classes from the whole split). `augment_affine=True`
    distorts every image by its own random affine map (:mod:`episodes.distort`). `photo` crops,
    flips and colour-jitters every image by its own random parameters (:mod:`episodes.photo`;
    None or an inactive `PhotoAugmentation` turns it off, and leaves every other draw as it was).
    """

    def __init__(
        self,
        classes: ClassImages,
        ways: int,
        shots: int,
        query: int,
        *,
        seed: int,
        augment_rotations: bool = False,
        within_alphabet: bool = False,
        augment_affine: bool = False,
        photo: PhotoAugmentation | None = None,
    ) -> None:
        self._draw = _draw_for(
            classes, ways, shots, query, augment_rotations, within_alphabet, augment_affine, photo
        )
        self.seed = _require_key_word("seed", seed)

    def sample(
        self, step: int, meta_batch_size: int, *, task_slice: slice = slice(None)
    ) -> IndexEpisode:
        """Tasks `task_slice` of the meta-batch of `step` (all of them by default).

        A distributed rank passes its own slice; the tasks it gets are exactly those rows of the
        full meta-batch.
        """
        step = _require_key_word("step", step)
        meta_batch_size = _require_positive("meta_batch_size", meta_batch_size)
        if not isinstance(task_slice, slice):
            raise TypeError(f"task_slice must be a slice, got {type(task_slice).__name__}")
        task_ids = range(meta_batch_size)[task_slice]
        if len(task_ids) == 0:
            raise ValueError(
                f"task_slice {task_slice} selects no task of a meta-batch of {meta_batch_size}"
            )
        return self._draw.tasks([[_TRAIN_DOMAIN, self.seed, step, j] for j in task_ids])


class FixedEpisodes(_EpisodeSource):
    """A fixed evaluation set of `episodes` tasks; episode `i` is a function of `(seed, i)` only.

    `within_alphabet=True` draws each episode's classes from one Omniglot alphabet.
    """

    def __init__(
        self,
        classes: ClassImages,
        ways: int,
        shots: int,
        query: int,
        *,
        seed: int,
        episodes: int,
        within_alphabet: bool = False,
    ) -> None:
        self._draw = _draw_for(
            classes,
            ways,
            shots,
            query,
            augment_rotations=False,
            within_alphabet=within_alphabet,
            augment_affine=False,
        )
        self.seed = _require_key_word("seed", seed)
        self.episodes = _require_positive("episodes", episodes)
        if self.episodes > _KEY_WORD_LIMIT:
            raise ValueError(f"episodes must be at most 2**32, got {episodes}")

    def __len__(self) -> int:
        return self.episodes

    def __getitem__(self, i: int) -> IndexEpisode:
        """Episode `i` as a batch of one task (negative `i` counts from the end)."""
        if isinstance(i, bool) or not isinstance(i, Integral):
            raise TypeError(f"episode index must be an int, got {type(i).__name__}")
        if not -self.episodes <= i < self.episodes:
            raise IndexError(f"episode {i} out of range for {self.episodes} episodes")
        return self.take([i % self.episodes])

    def __iter__(self) -> Iterator[IndexEpisode]:
        return self.batches(1)

    def take(self, indices: Sequence[int]) -> IndexEpisode:
        """Episodes `indices` (each in 0..len-1), one task each, in the order given."""
        if len(indices) == 0:
            raise ValueError("take needs at least one episode index")
        for i in indices:
            if not 0 <= i < self.episodes:
                raise IndexError(f"episode {i} out of range for {self.episodes} episodes")
        return self._draw.tasks([[_EVAL_DOMAIN, self.seed, int(i)] for i in indices])

    def batches(self, size: int) -> Iterator[IndexEpisode]:
        """All episodes in order, `size` tasks per batch (the last batch may be smaller)."""
        size = _require_positive("size", size)
        for start in range(0, self.episodes, size):
            yield self.take(range(start, min(start + size, self.episodes)))
