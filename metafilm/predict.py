"""Labelling image files with a task model: support and query files in, a table and JSON or CSV
out (what ``metafilm adapt`` and ``metafilm predict`` do with files)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from episodes.folder import IMAGE_SUFFIXES, list_folder, load_images
from metafilm.errors import TaskModelError
from metafilm.task_model import TaskModel

BATCH = 64
"""Query images per forward pass."""


@dataclass(frozen=True)
class Prediction:
    """One file's class probabilities, in the task's class order."""

    file: Path
    probabilities: tuple[float, ...]

    def ranked(self, class_names: Sequence[str]) -> list[tuple[str, float]]:
        """(class, probability), most probable first."""
        return sorted(zip(class_names, self.probabilities, strict=True), key=lambda pair: -pair[1])


def read_support(
    folder: str | os.PathLike[str], image_size: int, channels: int
) -> dict[str, torch.Tensor]:
    """A support set from a folder of class subfolders (``episodes.folder`` layout, any number of
    images per class): class name -> uint8 images ``[n, channels, image_size, image_size]``."""
    listing = list_folder(folder)
    return {
        name: load_images(paths, image_size, channels) for name, paths in listing.classes.items()
    }


def query_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The image files meant by ``paths``: each a file, or a folder searched recursively (hidden
    and non-image files skipped), in the given order, each folder's files sorted."""
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_file():
            files.append(given)
        elif given.is_dir():
            found = [
                path
                for path in sorted(given.rglob("*"))
                if path.is_file()
                and path.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in path.relative_to(given).parts)
            ]
            if not found:
                raise TaskModelError(f"no image files under {given}")
            files.extend(found)
        else:
            raise TaskModelError(f"{given} does not exist: give image files or folders of them")
    if not files:
        raise TaskModelError("no query images given: name image files or folders")
    return files


def predict_files(
    task: TaskModel,
    files: Sequence[Path],
    *,
    on_batch: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """The task's class probabilities for each file, ``BATCH`` images at a time; ``on_batch``
    is told how many files are done after each batch."""
    channels, size, _ = task.image_shape
    predictions: list[Prediction] = []
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        probabilities = task.predict(load_images(chunk, size, channels))
        predictions += [
            Prediction(file, tuple(map(float, row)))
            for file, row in zip(chunk, probabilities, strict=True)
        ]
        if on_batch is not None:
            on_batch(len(predictions))
    return predictions


def prediction_table(
    predictions: Sequence[Prediction], class_names: Sequence[str], runners_up: int = 2
) -> str:
    """A plain-text table: file, predicted class, its probability, the runners-up."""
    rows = [("file", "predicted", "probability", "runners-up")]
    for prediction in predictions:
        ranked = prediction.ranked(class_names)
        others = ", ".join(f"{name} {p:.3f}" for name, p in ranked[1 : 1 + runners_up])
        rows.append((str(prediction.file), ranked[0][0], f"{ranked[0][1]:.3f}", others))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    )


def write_predictions(
    predictions: Sequence[Prediction], class_names: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Every class probability per file, as JSON (a list of objects with ``file``,
    ``predicted``, ``probability`` and ``probabilities``, class -> probability) or CSV (``file``,
    ``predicted``, then one column per class), by the suffix of ``path``."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        records = [
            {
                "file": str(p.file),
                "predicted": p.ranked(class_names)[0][0],
                "probability": p.ranked(class_names)[0][1],
                "probabilities": dict(zip(class_names, p.probabilities, strict=True)),
            }
            for p in predictions
        ]
        text = json.dumps(records, indent=1) + "\n"
    elif path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["file", "predicted", *class_names])
        for p in predictions:
            writer.writerow([str(p.file), p.ranked(class_names)[0][0], *p.probabilities])
        text = buffer.getvalue()
    else:
        raise TaskModelError(f"--out {path}: write predictions to a .json or a .csv file")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
