"""Backbone pretraining: classification over every class of the training split, resumable.

The usual first stage before meta-training (a frozen backbone, or an outer-trained one that starts
from these weights): a linear classifier on the embedding, cross-entropy with optional label
smoothing, Adam or Nesterov SGD with a constant or cosine learning rate, the photo augmentation of
`[data]`. The classifier is discarded afterwards.

Every draw is a function of the seed and the step alone: epoch `e` visits the images in one
permutation drawn from `(seed, e)`, step `s` takes the next `batch_size` of them, and their
augmentation comes from `(seed, s)`. So `PretrainState` (weights, classifier, optimiser, step) is
all a resumed run needs to end with the same weights, bit for bit, as an uninterrupted one.

With validation, the backbone is judged every `val_every` steps by what it is for: nearest-
prototype few-shot accuracy of its embedding on fixed validation episodes (not its classification
loss), and the best one is kept. Nothing here touches the disk: the caller saves what
`on_checkpoint` hands it (`metafilm.train`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodes.classes import ClassImages, to_pixels
from episodes.photo import PhotoAugmentation, apply_photo, photo_batch_params
from episodes.sampler import FixedEpisodes, IndexEpisode, gather
from metafilm.config import PretrainConfig

_PRETRAIN_DOMAIN = 0x6D665054  # "mfPT": the first word of every pretraining draw
_AUX_DOMAIN = 0x6D664158  # "mfAX": the first word of every auxiliary co-training batch
EMBED_BATCH = 500
"""Images embedded at a time in validation (memory only; results do not depend on it)."""


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Full batches in one pass over `images` (the last partial batch is dropped; at least 1)."""
    return max(1, images // batch_size)


def total_steps(settings: PretrainConfig, images: int) -> int:
    """The length of pretraining in steps: `epochs` passes, else `steps`."""
    if settings.epochs is None:
        return settings.steps
    return settings.epochs * steps_per_epoch(images, settings.batch_size)


def pretrain_lr(settings: PretrainConfig, step: int, total: int) -> float:
    """Learning rate of the update after `step` updates (a function of the step alone)."""
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1 + math.cos(math.pi * step / total))
    return settings.lr


def batch_rows(seed: int, step: int, images: int, batch_size: int) -> np.ndarray:
    """Rows of the images of pretraining step `step`: its slice of its epoch's permutation."""
    per_epoch = steps_per_epoch(images, batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([_PRETRAIN_DOMAIN, seed, epoch]).permutation(images)
    return order[position * batch_size : (position + 1) * batch_size]


def labelled_batch(
    classes: ClassImages,
    rows: np.ndarray,
    key: Sequence[int],
    photo: PhotoAugmentation | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Images `rows` of the split (augmented by the photo draws of `key`) and their class ids."""
    index = torch.from_numpy(rows)
    pixels = to_pixels(classes.images.index_select(0, index), dtype)
    if photo is not None and photo.active:
        pixels = apply_photo(pixels, photo_batch_params(key, len(rows), photo), photo)
    return pixels.contiguous(memory_format=torch.channels_last), classes.class_of()[index]


def auxiliary_batch(
    classes: ClassImages,
    seed: int,
    step: int,
    batch_size: int,
    photo: PhotoAugmentation | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The auxiliary co-training batch of meta-training step `step`: `batch_size` training
    images drawn uniformly from `(seed, step)`, augmented, with their class ids."""
    key = [_AUX_DOMAIN, seed, step]
    rows = np.random.default_rng(key).integers(len(classes.images), size=batch_size)
    return labelled_batch(classes, rows, key, photo, dtype)


def make_classifier(feature_dim: int, num_classes: int, like: Tensor) -> nn.Linear:
    """A zero-initialised linear classifier over the embedding (deterministic start)."""
    classifier = nn.Linear(feature_dim, num_classes).to(device=like.device, dtype=like.dtype)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    return classifier


def _optimizer(settings: PretrainConfig, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=settings.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=settings.weight_decay,
        )
    return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)


def prototype_accuracies(
    backbone: nn.Module, classes: ClassImages, episodes: FixedEpisodes
) -> np.ndarray:
    """Nearest-prototype (squared Euclidean) accuracy of `backbone`'s embedding on every fixed
    episode, in order, in eval mode. With running batch norm each image is embedded once; with
    episode batch norm each task goes through the network on its own (support and query)."""
    was_training = backbone.training
    backbone.eval()
    weight = next(backbone.parameters())
    accuracies: list[Tensor] = []
    try:
        with torch.no_grad():
            embedded = None
            if backbone.bn_mode == "running":
                embedded = torch.cat(
                    [
                        backbone(to_pixels(classes.images[i : i + EMBED_BATCH], weight.dtype))
                        for i in range(0, len(classes.images), EMBED_BATCH)
                    ]
                )
            for start in range(0, len(episodes), EMBED_BATCH):
                tasks = episodes.take(range(start, min(start + EMBED_BATCH, len(episodes))))
                accuracies.append(_nearest_prototype(backbone, classes, tasks, embedded))
    finally:
        backbone.train(was_training)
    return torch.cat(accuracies).double().numpy()


def _nearest_prototype(
    backbone: nn.Module, classes: ClassImages, tasks: IndexEpisode, embedded: Tensor | None
) -> Tensor:
    if embedded is None:
        episode = gather(classes, tasks, dtype=next(backbone.parameters()).dtype)
        per_task = [
            backbone(torch.cat([episode.support_x[t], episode.query_x[t]]))
            for t in range(tasks.tasks)
        ]
        support = torch.stack([f[: tasks.support_idx.shape[1]] for f in per_task])
        query = torch.stack([f[tasks.support_idx.shape[1] :] for f in per_task])
    else:
        support, query = embedded[tasks.support_idx], embedded[tasks.query_idx]
    prototypes = support.view(tasks.tasks, tasks.ways, tasks.shots, -1).mean(2)
    predicted = torch.cdist(query, prototypes).argmin(-1)
    return (predicted == tasks.query_y).double().mean(-1)


@dataclass
class PretrainState:
    """Where pretraining stands: what a checkpoint holds besides the backbone's weights."""

    step: int = 0
    classifier: dict[str, Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    best: float | None = None
    """Best validation accuracy so far (None before the first validation)."""
    best_step: int | None = None
    best_backbone: dict[str, Tensor] | None = None
    """The backbone's state at `best_step`."""
    wall_time: float = 0.0


@dataclass(frozen=True)
class Validation:
    """The fixed few-shot episodes that judge a pretrained backbone."""

    classes: ClassImages
    episodes: FixedEpisodes


def pretrain_backbone(
    backbone: nn.Module,
    classes: ClassImages,
    settings: PretrainConfig,
    *,
    seed: int,
    photo: PhotoAugmentation | None = None,
    validation: Validation | None = None,
    resume: PretrainState | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    on_validation: Callable[[int, np.ndarray], None] | None = None,
    on_step_end: Callable[[PretrainState], None] | None = None,
    on_checkpoint: Callable[[PretrainState], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> PretrainState:
    """Train `backbone` in place to classify every image of `classes` into its class.

    Runs from `resume` (the backbone must already hold its weights) or from step 0 to
    `total_steps`. The backbone's parameters are trained even if they do not require grad (as in
    a frozen learner); their flags and train/eval mode are restored at the end. Callbacks:
    `on_step(step, loss, accuracy)` after every step (`step` counted from 0);
    `on_validation(steps_done, accuracies)` after each validation; `on_step_end(state)` once the
    step (and its validation) is done; `on_checkpoint(state)` every `checkpoint_every` steps and
    at the end. At the end, with validation, the backbone holds the
    best weights seen (`best_backbone`).
    `clock` (seconds, e.g. `time.perf_counter`) adds the elapsed time to `wall_time`.
    """
    if classes.num_classes < 2:
        raise ValueError(f"pretraining needs at least 2 classes; got {classes.num_classes}")
    parameters = list(backbone.parameters())
    flags = [p.requires_grad for p in parameters]
    was_training = backbone.training
    weight = parameters[0]
    classifier = make_classifier(backbone.feature_dim, classes.num_classes, weight)
    optimizer = _optimizer(settings, [*parameters, *classifier.parameters()])
    state = copy.deepcopy(resume) if resume is not None else PretrainState()
    if resume is not None:
        classifier.load_state_dict(resume.classifier)
        optimizer.load_state_dict(resume.optimizer)
    total = total_steps(settings, len(classes.images))
    started = clock() if clock is not None else 0.0

    def snapshot() -> PretrainState:
        state.classifier = classifier.state_dict()
        state.optimizer = optimizer.state_dict()
        if clock is not None:
            nonlocal started
            now = clock()
            state.wall_time += now - started
            started = now
        return state

    try:
        for p in parameters:
            p.requires_grad_(True)
        backbone.train()
        while state.step < total:
            step = state.step
            for group in optimizer.param_groups:
                group["lr"] = pretrain_lr(settings, step, total)
            rows = batch_rows(seed, step, len(classes.images), settings.batch_size)
            images, targets = labelled_batch(
                classes, rows, [_PRETRAIN_DOMAIN, seed, step], photo, weight.dtype
            )
            logits = classifier(backbone(images))
            loss = F.cross_entropy(logits, targets, label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.step += 1
            if on_step is not None:
                accuracy = (logits.argmax(-1) == targets).float().mean()
                on_step(step, float(loss.detach()), float(accuracy))
            last = state.step == total
            due = settings.val_every and (state.step % settings.val_every == 0 or last)
            if validation is not None and due:
                accuracies = prototype_accuracies(backbone, validation.classes, validation.episodes)
                backbone.train()
                if on_validation is not None:
                    on_validation(state.step, accuracies)
                if state.best is None or accuracies.mean() > state.best:
                    state.best, state.best_step = float(accuracies.mean()), state.step
                    state.best_backbone = {k: v.clone() for k, v in backbone.state_dict().items()}
            if on_step_end is not None:
                on_step_end(snapshot())
            if on_checkpoint is not None and (state.step % settings.checkpoint_every == 0 or last):
                on_checkpoint(snapshot())
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
        backbone.train(was_training)
    if state.best_backbone is not None:
        backbone.load_state_dict(state.best_backbone)
    return snapshot()
