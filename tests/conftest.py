"""Shared fixtures: the real data root, a session cache dir, quick access to Omniglot splits, and
the tiny run configs of the end-to-end tests.

Tests that need real data take `data_root`: it skips when `METAFILM_DATA_ROOT` is unset, and fails
instead when `METAFILM_REQUIRE_DATA=1` (as CI sets) or when the Omniglot zips are missing under it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from episodes.classes import ClassImages
from episodes.omniglot import BACKGROUND_ZIP, EVALUATION_ZIP, load_omniglot

TINY_RUN: dict[str, dict[str, Any]] = {
    "data": {"ways": 5, "shots": 1, "query": 2},
    "model": {"width": 8},
    "outer": {"meta_batch_size": 2},
}
"""The tiny Omniglot run that end-to-end tests train: 5-way 1-shot with 2 query images per class,
Conv-4 of width 8, two tasks per step (each test adds its own steps, validation and checkpoints)."""


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real data root from `METAFILM_DATA_ROOT` (read-only)."""
    value = os.environ.get("METAFILM_DATA_ROOT")
    if not value:
        message = "METAFILM_DATA_ROOT is not set; it must point at the benchmark data folder"
        if os.environ.get("METAFILM_REQUIRE_DATA") == "1":
            pytest.fail(f"{message} (METAFILM_REQUIRE_DATA=1)")
        pytest.skip(message)
    root = Path(value)
    missing = [root / "omniglot" / name for name in (BACKGROUND_ZIP, EVALUATION_ZIP)]
    missing = [str(path) for path in missing if not path.is_file()]
    if missing:
        pytest.fail(f"METAFILM_DATA_ROOT={value} lacks the Omniglot zips: {', '.join(missing)}")
    return root


@pytest.fixture(scope="session")
def miniimagenet_root(data_root: Path) -> Path:
    """The data root, once it is known to hold miniImageNet's images and split CSVs (missing
    ones fail, as Omniglot's do)."""
    folder = data_root / "miniimagenet"
    missing = [p for p in (folder / "images", folder / "ravi_splits") if not p.is_dir()]
    if missing:
        pytest.fail(f"METAFILM_DATA_ROOT={data_root} lacks miniImageNet: {missing[0]} is missing")
    return data_root


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`METAFILM_CACHE_DIR` if set (caches survive between runs), else a session temp dir."""
    value = os.environ.get("METAFILM_CACHE_DIR")
    return Path(value) if value else tmp_path_factory.mktemp("metafilm-cache")


@pytest.fixture(scope="session")
def omniglot_split(data_root: Path, omniglot_cache_dir: Path) -> Callable[[str], ClassImages]:
    """`omniglot_split(split)`: a 28x28 Omniglot split, loaded once per session."""
    loaded: dict[str, ClassImages] = {}

    def load(split: str) -> ClassImages:
        if split not in loaded:
            loaded[split] = load_omniglot(data_root, split, cache_dir=omniglot_cache_dir)
        return loaded[split]

    return load


@pytest.fixture
def one_thread():
    """Small networks run on one thread: on shared cores OpenMP's waiting threads cost 10-100x,
    and one thread keeps floating-point summation order fixed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_toml() -> Callable[..., str]:
    """`tiny_toml(section={key: value, ...}, ...)`: the TOML text of `TINY_RUN` with those
    settings added (or replacing its own), e.g. `tiny_toml(train={"steps": 6})`."""

    def text(**sections: Mapping[str, Any]) -> str:
        merged = {name: dict(table) for name, table in TINY_RUN.items()}
        for name, table in sections.items():
            merged.setdefault(name, {}).update(table)
        return "".join(
            f"[{name}]\n"
            + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
            + "\n"
            for name, table in merged.items()
        )

    return text
