"""A task model as one standalone ONNX network: FiLM folded into the batch norms, head included.

``export_onnx`` copies the task's backbone, folds each site's deviations into the affine weight
and bias of the batch norm it modulates (``metafilm.film.fold_into_affine``: the same function,
no FiLM left), fixes the batch norms to their running statistics, and appends the head with the
task's prototypes as constants. The network takes float32 images ``[N, C, H, W]`` in [0, 1],
preprocessed as the task's header says, and returns ``logits`` and ``probabilities``
``[N, ways]``; the class names and preprocessing are stored in the file's metadata.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from metafilm.errors import TaskModelError
from metafilm.film import fold_into_affine
from metafilm.task_model import TaskModel

ONNX_OPSET = 18


class FoldedTask(nn.Module):
    """The task's network with nothing task-specific left but constants: images -> (logits,
    probabilities)."""

    def __init__(self, task: TaskModel) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(task.learner.backbone).float().eval()
        with torch.no_grad():
            for site, (dgamma, dbeta) in task.deviations.items():
                norm = self.backbone.norm_of(site)
                if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
                    raise TaskModelError(
                        f"FiLM site {site!r} follows a layer without an affine weight and bias "
                        f"to fold it into: such a task cannot be exported"
                    )
                weight, bias = fold_into_affine(norm.weight, norm.bias, dgamma, dbeta)
                norm.weight.copy_(weight)
                norm.bias.copy_(bias)
        self.head = copy.deepcopy(task.learner.head).float().eval()
        ways = task.ways
        prototypes = task.prototypes
        self.register_buffer("one_each", torch.eye(ways))
        self.register_buffer(
            "prototypes", torch.zeros(0) if prototypes is None else prototypes.float().clone()
        )
        self.uses_prototypes = prototypes is not None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(images)
        prototypes = self.prototypes if self.uses_prototypes else None
        logits = self.head(prototypes, self.one_each, features)
        return logits, logits.softmax(-1)


def export_onnx(task: TaskModel, path: str | os.PathLike[str]) -> Path:
    """Write ``task`` to ``path`` as a standalone ONNX network (see the module docstring)."""
    try:
        import onnx
    except ImportError:
        raise TaskModelError(
            'ONNX export needs the optional dependency onnx: pip install "metafilm[onnx]"'
        ) from None
    network = FoldedTask(task).eval()
    example = torch.zeros(1, *task.image_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # the exporter's side files
        exported = Path(scratch) / "task.onnx"
        with torch.no_grad():
            torch.onnx.export(
                network,
                (example,),
                str(exported),
                input_names=["images"],
                output_names=["logits", "probabilities"],
                dynamic_shapes=({0: torch.export.Dim("images")},),
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
            )
        model = onnx.load(str(exported))  # weights and all, saved below as one file
        channels, size, _ = task.image_shape
        preprocessing = {"channels": channels, "image_size": size, "pixels": "[0, 1]"}
        for key, value in (
            ("class_names", json.dumps(list(task.class_names))),
            ("preprocessing", json.dumps(preprocessing)),
            ("checkpoint_sha256", task.checkpoint_sha256),
        ):
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        whole = Path(scratch) / "whole.onnx"
        onnx.save(model, str(whole), save_as_external_data=False)
        os.replace(whole, path)
    return path
