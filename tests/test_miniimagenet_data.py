"""The real miniImageNet under METAFILM_DATA_ROOT, read as users have it (flat JPEGs and the Ravi
split CSVs): class and image counts, shapes, and every split's decoded pixels against the sha256
of `../shared/data/MANIFEST.md`. The first load of a CI run decodes the 60,000 JPEGs into the
cache (about 25 s); later loads read the cache."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch

from episodes.classes import ClassImages
from episodes.miniimagenet import load_miniimagenet

pytestmark = pytest.mark.data

PIXEL_SHA256 = {
    "train": "5d01887a9f33920c31372a09d6b4ef01125581fb47bf63201717bd5c07d5b6ac",
    "val": "89b8731b22e5b4f1043bb14d48234d6e40979eb2665ea4bd52fc0293f342ef27",
    "test": "fc17f5f4bcb39dc864eebde7683d1198d72b8bbcf0b1a1d054a05f197fb43a4a",
}
CLASSES = {"train": 64, "val": 16, "test": 20}


def csv_order(classes: ClassImages, csv_path: Path) -> torch.Tensor:
    """Row of `classes.images` holding each CSV row's image, in CSV order (computed from the
    CSV alone: the loader's class order is the sorted wnids, images in file order)."""
    with csv_path.open(newline="") as file:
        rows = list(csv.reader(file))[1:]
    labels = sorted({label for _, label in rows})
    seen = dict.fromkeys(labels, 0)
    order = []
    for _, label in rows:
        order.append(int(classes.offsets[labels.index(label)]) + seen[label])
        seen[label] += 1
    return torch.tensor(order)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_split_decodes_to_the_manifest_pixels(
    miniimagenet_root: Path, omniglot_cache_dir: Path, split: str
) -> None:
    loaded = load_miniimagenet(
        miniimagenet_root, split, format="jpeg", cache_dir=omniglot_cache_dir
    )
    assert loaded.num_classes == CLASSES[split]
    assert loaded.images.dtype == torch.uint8
    assert tuple(loaded.images.shape) == (CLASSES[split] * 600, 3, 84, 84)
    assert loaded.class_sizes.tolist() == [600] * CLASSES[split]
    assert all(name.startswith("n") and len(name) == 9 for name in loaded.names)
    order = csv_order(loaded, miniimagenet_root / "miniimagenet" / "ravi_splits" / f"{split}.csv")
    pixels = loaded.images[order].permute(0, 2, 3, 1).contiguous().numpy()  # [N, 84, 84, 3]
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == PIXEL_SHA256[split]
