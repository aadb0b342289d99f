"""Pretraining a backbone by ordinary classification over all training classes.

The usual first stage before meta-training with a frozen backbone: a linear classifier on the
embedding, Adam, random mini-batches of the whole split. Deterministic given the seed (the batches
come from a private generator and the classifier starts at zero); nothing touches the disk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from episodes.classes import ClassImages, to_pixels


def pretrain_backbone(
    backbone: nn.Module,
    classes: ClassImages,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float, float], None] | None = None,
) -> None:
    """Train ``backbone`` in place to classify every image of ``classes`` into its class.

    The classifier is discarded afterwards. The backbone's parameters are trained even if they do
    not require grad (as in a frozen learner); their ``requires_grad`` flags and the backbone's
    train/eval mode are restored at the end. ``on_step(step, loss, accuracy)`` reports each step.
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if classes.num_classes < 2:
        raise ValueError(f"pretraining needs at least 2 classes; got {classes.num_classes}")
    parameters = list(backbone.parameters())
    flags = [p.requires_grad for p in parameters]
    was_training = backbone.training
    weight = next(iter(parameters))
    classifier = nn.Linear(backbone.feature_dim, classes.num_classes)
    classifier.to(device=weight.device, dtype=weight.dtype)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    labels = classes.class_of()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([*parameters, *classifier.parameters()], lr=lr)
    try:
        for p in parameters:
            p.requires_grad_(True)
        backbone.train()
        for step in range(steps):
            rows = torch.randint(len(classes.images), (batch_size,), generator=generator)
            images = to_pixels(classes.images[rows].to(weight.device), weight.dtype)
            targets = labels[rows].to(weight.device)
            logits = classifier(backbone(images))
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                accuracy = (logits.argmax(-1) == targets).float().mean()
                on_step(step, float(loss.detach()), float(accuracy))
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
        backbone.train(was_training)
