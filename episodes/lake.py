"""Lake et al. (2015) one-shot classification runs as a fixed evaluation set.

20 runs, each a 20-way within-alphabet one-shot task on evaluation-alphabet characters: one
training image per class and 20 test items with their true classes. Images are decoded exactly
like the main Omniglot loader (`episodes.omniglot.decode_glyph`: greyscale, BILINEAR resize,
ink 255 on 0). The protocol of the paper: learn from the 30 background alphabets only and report
the error rate over the 400 test items.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from episodes.classes import to_pixels
from episodes.integrity import KnownVersion, resolve_data_root, verify_file
from episodes.omniglot import check_image_size, decode_glyph
from episodes.sampler import Episode

LAKE_RUNS_URL = (
    "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
)
LAKE_RUNS_VERSION = KnownVersion(
    "Lake et al. one-shot runs",
    352_787,
    {"sha256": "437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325"},
)

_RUN = re.compile(r"run\d+")
_LABEL_LINE = re.compile(r"(run\d+/test/item\d+\.png)\s+(run\d+/training/class\d+\.png)")


@dataclass(frozen=True)
class LakeRuns:
    """The runs as uint8 tensors, ink 255 on 0.

    `support_images [runs, ways, 1, H, W]`: image `j` of a run is its class `j` (classKK.png in
    file order); `query_images [runs, items, 1, H, W]`: the test items in file order;
    `query_labels [runs, items]` int64: the true class (0..ways-1) of each item, from
    class_labels.txt.
    """

    support_images: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor

    @property
    def runs(self) -> int:
        return self.support_images.shape[0]

    @property
    def ways(self) -> int:
        return self.support_images.shape[1]

    @property
    def support_labels(self) -> torch.Tensor:
        """int64 `[runs, ways]`: 0..ways-1 in class order."""
        return torch.arange(self.ways).expand(self.runs, self.ways)

    def episode(self, dtype: torch.dtype = torch.float32) -> Episode:
        """All runs as one `Episode` (tasks = runs, 1 shot, `dtype` pixels in [0, 1]).

        Query items are reordered to the class-major layout of `Episode` (stably sorted by label;
        each class has one test item, so `query_y` is 0..ways-1 in every run).
        """
        order = torch.sort(self.query_labels, dim=1, stable=True).indices
        query_x = torch.take_along_dim(self.query_images, order[:, :, None, None, None], dim=1)
        return Episode(
            support_x=to_pixels(self.support_images, dtype),
            support_y=self.support_labels.clone(),
            query_x=to_pixels(query_x, dtype),
            query_y=torch.take_along_dim(self.query_labels, order, dim=1),
            ways=self.ways,
        )


def load_lake_runs(root: str | os.PathLike[str] | None = None, *, image_size: int = 28) -> LakeRuns:
    """Load `<root>/omniglot/lake_runs/all_runs.zip` (root defaults to env `METAFILM_DATA_ROOT`).

    The zip is checked against its published sha256; images are resized to `image_size`.
    """
    check_image_size(image_size)
    path = resolve_data_root(root) / "omniglot" / "lake_runs" / "all_runs.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"Lake runs not found: {path}. Place all_runs.zip from {LAKE_RUNS_URL} there."
        )
    verify_file(path, [LAKE_RUNS_VERSION], remedy=f"Replace it with a good copy ({LAKE_RUNS_URL}).")
    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        runs = sorted(
            {name.split("/")[0] for name in members if _RUN.fullmatch(name.split("/")[0])}
        )
        parsed = [_read_run(archive, members, run, image_size, path) for run in runs]
    return LakeRuns(
        support_images=torch.from_numpy(np.stack([s for s, _, _ in parsed])).unsqueeze(2),
        query_images=torch.from_numpy(np.stack([q for _, q, _ in parsed])).unsqueeze(2),
        query_labels=torch.tensor([labels for _, _, labels in parsed], dtype=torch.int64),
    )


def _read_run(
    archive: zipfile.ZipFile, members: set[str], run: str, image_size: int, path: Path
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One run: support images in class order, query images in item order, query labels."""
    classes = sorted(m for m in members if m.startswith(f"{run}/training/") and m.endswith(".png"))
    items = sorted(m for m in members if m.startswith(f"{run}/test/") and m.endswith(".png"))
    label_of = {}
    text = archive.read(f"{run}/class_labels.txt").decode("utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _LABEL_LINE.fullmatch(line.strip())
        if match is None or match[2] not in classes:
            raise ValueError(
                f"{path}: {run}/class_labels.txt line {number} is not "
                f"'{run}/test/itemKK.png {run}/training/classJJ.png' of this run: {line!r}"
            )
        label_of[match[1]] = classes.index(match[2])
    labels = [label_of[item] for item in items]
    support = np.stack([decode_glyph(archive.read(m), image_size) for m in classes])
    query = np.stack([decode_glyph(archive.read(m), image_size) for m in items])
    return support, query, labels
