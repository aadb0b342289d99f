"""An adapted task, kept: the FiLM deviations, prototypes and class names of one support set.

``adapt_task`` runs a trained model's own encoder and inner loop on a support set (any number of
images per class) and returns a :class:`TaskModel`; ``TaskModel.predict`` labels new images with
it. ``save`` writes one safetensors file: the task's tensors plus a JSON header (class names,
preprocessing, head, and the sha256 of the training checkpoint whose backbone it modulates).
Loading it runs no code, and it holds kilobytes: the backbone checkpoint is shared, found again
by its recorded path and checked by its digest.

Batch norm: a task model uses the running statistics its backbone kept in training, so each
image's prediction depends on that image alone (non-transductive). A model trained with
per-episode statistics (``model.bn_mode = "episode"``) has none and is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from episodes.classes import to_pixels
from episodes.folder import RESIZE_RULE
from metafilm.checkpoint import checkpoint_sha256
from metafilm.errors import TaskModelError
from metafilm.evaluation import load_trained
from metafilm.film import Deviations
from metafilm.heads import class_prototypes
from metafilm.learner import FiLMLearner
from metafilm.meta import adapt_to_support
from metafilm.specs import AdaptSpec

TASK_FORMAT = "metafilm-task"
TASK_VERSION = 1
BATCH_NORM = "running statistics of training (each image alone, non-transductive)"
"""What a task model normalises with: stated by ``metafilm predict``."""
_PROTOTYPES = "prototypes"


@dataclass(frozen=True)
class TaskModel:
    """One adapted task over a trained learner (float32, eval mode).

    ``prototypes`` ``[ways, D]`` are the class means of the adapted support features (``None``
    for a linear head, whose weights are the learner's); ``class_names[k]`` names output ``k``.
    """

    learner: FiLMLearner
    deviations: Deviations
    prototypes: Tensor | None
    class_names: tuple[str, ...]
    checkpoint: Path
    checkpoint_sha256: str

    @property
    def ways(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(channels, size, size)`` of the images ``predict`` takes."""
        return self.learner.image_shape

    def logits(self, images: Tensor) -> Tensor:
        """Class logits ``[N, ways]`` of uint8 images ``[N, C, H, W]`` (or floats in [0, 1])."""
        if tuple(images.shape[1:]) != self.image_shape or images.dim() != 4:
            raise TaskModelError(
                f"images must be shaped [N, {', '.join(map(str, self.image_shape))}]; got "
                f"{tuple(images.shape)} (read files with episodes.folder.load_images)"
            )
        pixels = to_pixels(images) if images.dtype == torch.uint8 else images.float()
        self.learner.eval()
        with torch.no_grad():
            features = self.learner.backbone(pixels, self.deviations)
            one_each = torch.eye(self.ways, dtype=features.dtype)  # prototypes as a support set
            return self.learner.head(self.prototypes, one_each, features)

    def predict(self, images: Tensor) -> Tensor:
        """Class probabilities ``[N, ways]`` (softmax of :meth:`logits`)."""
        return self.logits(images).softmax(-1)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the task to ``path`` (a ``.safetensors`` file): tensors and a JSON header."""
        tensors = {}
        for site, (dgamma, dbeta) in self.deviations.items():
            tensors[f"film.{site}.dgamma"] = dgamma.contiguous()
            tensors[f"film.{site}.dbeta"] = dbeta.contiguous()
        if self.prototypes is not None:
            tensors[_PROTOTYPES] = self.prototypes.contiguous()
        channels, size, _ = self.image_shape
        header = {
            "format": TASK_FORMAT,
            "version": TASK_VERSION,
            "class_names": list(self.class_names),
            "sites": list(self.deviations),
            "head": self.learner.model_spec.head,
            "preprocessing": {"channels": channels, "image_size": size, "resize": RESIZE_RULE},
            "batch_norm": BATCH_NORM,
            "checkpoint": str(self.checkpoint.resolve()),
            "checkpoint_sha256": self.checkpoint_sha256,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, str(temporary), metadata={"metafilm": json.dumps(header)})
        os.replace(temporary, path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None
    ) -> TaskModel:
        """Read a task written by :meth:`save`, over ``checkpoint`` (default: the recorded one),
        which must be the very checkpoint it was adapted from (same sha256)."""
        path = Path(path)
        header, tensors = _read(path)
        source = Path(checkpoint if checkpoint is not None else header["checkpoint"])
        if not source.is_file():
            raise TaskModelError(
                f"{path} was adapted from the checkpoint {source}, which is not there: pass the "
                f"checkpoint's new path (--checkpoint)"
            )
        if checkpoint_sha256(source) != header["checkpoint_sha256"]:
            raise TaskModelError(
                f"{source} is not the checkpoint {path} was adapted from (sha256 "
                f"{header['checkpoint_sha256'][:12]}...): adapt the task again on this one"
            )
        learner = load_trained(source).learner.float()
        deviations = {
            site: (tensors[f"film.{site}.dgamma"], tensors[f"film.{site}.dbeta"])
            for site in header["sites"]
        }
        return cls(
            learner,
            deviations,
            tensors.get(_PROTOTYPES),
            tuple(header["class_names"]),
            source,
            header["checkpoint_sha256"],
        )


def adapt_task(
    learner: FiLMLearner,
    adapt: AdaptSpec,
    support: dict[str, Tensor],
    *,
    checkpoint: Path,
    checkpoint_sha256: str,
) -> TaskModel:
    """Adapt ``learner`` (float32, trained from ``checkpoint``) to ``support``: class name ->
    uint8 images ``[n, C, H, W]``, at least one per class, any number each."""
    if learner.backbone.bn_mode != "running":
        raise TaskModelError(
            "this model normalises with each episode's batch statistics (model.bn_mode = "
            '"episode"), so its predictions depend on the images beside them: a task model needs '
            'the running statistics of a model trained with model.bn_mode = "running"'
        )
    if len(support) < 2:
        raise TaskModelError(f"a support set needs at least 2 classes; got {len(support)}")
    head = learner.model_spec.head
    if head == "linear" and len(support) != learner.model_spec.head_ways:
        raise TaskModelError(
            f"this model's linear head has {learner.model_spec.head_ways} outputs; the support "
            f"set has {len(support)} classes"
        )
    names = tuple(support)
    images = to_pixels(torch.cat([support[name] for name in names]))
    labels = torch.cat(
        [torch.full((len(support[name]),), k, dtype=torch.int64) for k, name in enumerate(names)]
    )
    deviations = adapt_to_support(learner, images, labels, len(names), adapt)
    prototypes = None
    if learner.head.uses_support:
        learner.eval()
        with torch.no_grad():
            features = learner.backbone(images, deviations)
        onehot = (labels.unsqueeze(-1) == torch.arange(len(names))).to(features.dtype)
        prototypes = class_prototypes(features, onehot)
    return TaskModel(learner, deviations, prototypes, names, checkpoint, checkpoint_sha256)


def adapt_checkpoint(checkpoint: Path, support: dict[str, Tensor]) -> TaskModel:
    """Adapt the learner of a training checkpoint to ``support`` (as :func:`adapt_task`) with the
    run's own encoder and test-time inner loop (its [eval] inner steps)."""
    trained = load_trained(checkpoint)
    return adapt_task(
        trained.learner.float(),
        trained.adapt(),
        support,
        checkpoint=checkpoint,
        checkpoint_sha256=trained.sha256,
    )


def _read(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """The header and tensors of a task file, refused unless it is one."""
    if not path.is_file():
        raise TaskModelError(f"no task model at {path}: write one with metafilm adapt")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        header = json.loads(metadata["metafilm"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise TaskModelError(
            f"{path} is not a metafilm task model ({error}); write one with metafilm adapt"
        ) from None
    if header.get("format") != TASK_FORMAT or header.get("version") != TASK_VERSION:
        raise TaskModelError(
            f"{path} is a {header.get('format')!r} file of version {header.get('version')!r}, not "
            f"a {TASK_FORMAT} of version {TASK_VERSION}"
        )
    return header, tensors
