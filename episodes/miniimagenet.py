"""miniImageNet (Ravi & Larochelle split: 64 / 16 / 20 classes) from the files users already have.

`load_miniimagenet(root, split)` reads one of three formats, all under `<root>/miniimagenet/`:

``jpeg`` -- the split CSVs with a folder of images::

    <root>/miniimagenet/ravi_splits/{train,val,test}.csv    (or <root>/miniimagenet/{split}.csv)
    <root>/miniimagenet/images/<filename>                    flat, as the Ravi pipeline writes it
    <root>/miniimagenet/images/<label>/<filename>            or one folder per class

  Each CSV has the header ``filename,label`` and one row per image, e.g.
  ``n0153282900000005.jpg,n01532829``. Images are decoded with Pillow to RGB and resized to
  `image_size` with Lanczos if they are not that size already. Decoding ~38k JPEGs takes minutes,
  so the result is cached once under `<cache_dir>/miniimagenet/`, keyed by the CSV's sha256 and
  `image_size` (a verified array cache from `episodes.integrity`: a damaged one is rebuilt with a
  warning). While the CSV is unchanged later loads read only the cache, not the image folder;
  after editing the images themselves without touching the CSV, delete the cache file.

``pickle`` -- pickled caches ``mini-imagenet-cache-{train,validation,test}.pkl`` (the name with
  ``val`` instead of ``validation`` is accepted too): a dict with ``image_data``, uint8
  ``[N, 84, 84, 3]``, and ``class_dict``, {class name: list of indices into image_data}. They are
  read with a restricted unpickler that admits numpy arrays and plain containers only.

``hdf5`` -- ``{train,val,test}_data.hdf5`` holding a group ``datasets`` with one uint8
  ``[n, 84, 84, 3]`` dataset per class, next to ``{split}_labels.json``, the list of class names.
  Needs the optional dependency h5py.

`format="auto"` takes the first present in the order pickle, hdf5, jpeg (the first two need no
decoding). Every format yields the same `ClassImages`: classes sorted by wnid (the order of the
CSVs), the images of a class in file order, uint8 `[N, 3, image_size, image_size]`.
"""

from __future__ import annotations

import codecs
import csv
import importlib
import json
import logging
import os
import pickle
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from episodes.classes import ClassImages
from episodes.integrity import (
    CacheError,
    file_digests,
    read_array_cache,
    resolve_cache_dir,
    resolve_data_root,
    write_array_cache,
)

SPLITS = ("train", "val", "test")
FORMATS = ("auto", "pickle", "hdf5", "jpeg")

_RESAMPLE = Image.Resampling.LANCZOS
_log = logging.getLogger(__name__)
_CACHE_FORMAT = {"format": "metafilm-miniimagenet-split", "version": 1}
_PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-val.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}

_LAYOUTS = """\
  jpeg:   <root>/miniimagenet/ravi_splits/{split}.csv (or <root>/miniimagenet/{split}.csv)
          with the images in <root>/miniimagenet/images/<filename>
          or <root>/miniimagenet/images/<label>/<filename>
  pickle: <root>/miniimagenet/mini-imagenet-cache-{train,validation,test}.pkl
  hdf5:   <root>/miniimagenet/{split}_data.hdf5 and <root>/miniimagenet/{split}_labels.json"""


def load_miniimagenet(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    format: str = "auto",
    image_size: int = 84,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClassImages:
    """Load one miniImageNet split as uint8 `[N, 3, image_size, image_size]`, classes sorted.

    `root` (default: env `METAFILM_DATA_ROOT`) holds the `miniimagenet/` folder described in the
    module docstring; `split` is "train", "val" or "test"; `format` is "auto", "pickle", "hdf5"
    or "jpeg". `cache_dir` (default: env `METAFILM_CACHE_DIR`, else `~/.cache/metafilm`) only
    serves the jpeg format.
    """
    if split not in SPLITS:
        raise ValueError(
            f"unknown miniImageNet split {split!r}: use one of {SPLITS} "
            "(the pickle named '...-validation.pkl' is read for 'val')"
        )
    if format not in FORMATS:
        raise ValueError(f"unknown miniImageNet format {format!r}: use one of {FORMATS}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    folder = resolve_data_root(root) / "miniimagenet"
    if format == "auto":
        format = _detect_format(folder, split)
    if format == "pickle":
        return _load_pickle(_find_pickle(folder, split), image_size)
    if format == "hdf5":
        return _load_hdf5(folder, split, image_size)
    return _load_jpeg(folder, split, image_size, resolve_cache_dir(cache_dir))


def read_ravi_csv(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Parse a Ravi & Larochelle split CSV: {label: [filenames in file order]}, labels sorted."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        header = rows[0] if rows else "nothing"
        raise ValueError(f"{path}: expected the header 'filename,label', found {header!r}")
    files: dict[str, list[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"{path}, line {line}: expected 'filename,label', found {row!r}")
        files.setdefault(row[1].strip(), []).append(row[0].strip())
    if not files:
        raise ValueError(f"{path}: the CSV lists no images")
    return {label: files[label] for label in sorted(files)}


# ---- where things are -------------------------------------------------------------------------


def _pickle_candidates(folder: Path, split: str) -> list[Path]:
    return [folder / name for name in _PICKLE_NAMES[split]]


def _csv_candidates(folder: Path, split: str) -> list[Path]:
    return [folder / "ravi_splits" / f"{split}.csv", folder / f"{split}.csv"]


def _detect_format(folder: Path, split: str) -> str:
    if any(p.is_file() for p in _pickle_candidates(folder, split)):
        return "pickle"
    if (folder / f"{split}_data.hdf5").is_file():
        return "hdf5"
    if (folder / "images").is_dir() and any(p.is_file() for p in _csv_candidates(folder, split)):
        return "jpeg"
    looked = [
        *_pickle_candidates(folder, split),
        folder / f"{split}_data.hdf5",
        *_csv_candidates(folder, split),
        folder / "images",
    ]
    raise FileNotFoundError(
        f"no miniImageNet {split!r} split found under {folder}. Looked for:\n"
        + "\n".join(f"  {p}" for p in looked)
        + "\nPlace one of these layouts there:\n"
        + _LAYOUTS.replace("{split}", split)
    )


def _find_pickle(folder: Path, split: str) -> Path:
    candidates = _pickle_candidates(folder, split)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no miniImageNet pickle for split {split!r}: looked for "
        + ", ".join(str(p) for p in candidates)
    )


# ---- shared image handling --------------------------------------------------------------------


def _check_hwc(array: object, what: str) -> None:
    """Raise unless `array` (numpy array or h5py dataset) is non-empty uint8 `[n, H, W, 3]`."""
    shape, dtype = getattr(array, "shape", None), getattr(array, "dtype", None)
    if dtype != np.uint8 or shape is None or len(shape) != 4 or shape[-1] != 3 or not shape[0]:
        found = f"{dtype} {tuple(shape)}" if shape is not None else type(array).__name__
        raise ValueError(
            f"{what}: expected a non-empty uint8 array [N, H, W, 3] (RGB), found {found}"
        )


def _resize(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    return image.resize((size, size), _RESAMPLE)


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[n, H, W, 3]` -> `[n, size, size, 3]`, untouched when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(_resize(Image.fromarray(x), size)) for x in images])


def _assemble(
    names: list[str], sizes: list[int], read_class: Callable[[int], np.ndarray], size: int
) -> ClassImages:
    """Fill one preallocated `[N, 3, size, size]` tensor class by class (peak memory ~1 copy)."""
    offsets = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
    images = torch.empty((int(offsets[-1]), 3, size, size), dtype=torch.uint8)
    for c in range(len(names)):
        chunk = torch.from_numpy(np.ascontiguousarray(_resize_batch(read_class(c), size)))
        images[offsets[c] : offsets[c + 1]] = chunk.permute(0, 3, 1, 2)
    return ClassImages(images, offsets, tuple(names))


# ---- pickle -----------------------------------------------------------------------------------


def _numpy_core(module: str) -> ModuleType:
    """numpy's internal `module`, from `numpy._core` (numpy >= 2) or `numpy.core` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What protocol-2 pickles call to rebuild a bytes buffer, restricted to that one use."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that admits numpy arrays and plain containers, and refuses any other global."""

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_core("multiarray")._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_core("multiarray")._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _numpy_core("numeric")._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _numpy_core("numeric")._frombuffer,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: only numpy arrays and plain containers are "
                "allowed in a miniImageNet pickle"
            ) from None


def _load_pickle(path: Path, size: int) -> ClassImages:
    remedy = "replace it with a whole copy of the miniImageNet pickle"
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): {remedy}")
    try:
        with path.open("rb") as f:
            # latin1 reads the Python 2 pickles the original caches were written as.
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "truncated" in str(e):
            raise ValueError(f"{path} is truncated ({e}): {remedy}") from None
        raise ValueError(f"{path}: not a safe miniImageNet pickle ({e})") from None
    except EOFError:
        raise ValueError(f"{path} is truncated (it ends inside the pickle): {remedy}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error) as e:
        # What the unpickler or numpy raise on bytes that are not a whole pickle.
        raise ValueError(
            f"{path} is damaged or truncated ({type(e).__name__}: {e}): {remedy}"
        ) from None
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path}: expected a dict with keys 'image_data' and 'class_dict', found {found}"
        )
    image_data = data["image_data"]
    _check_hwc(image_data, f"{path}: image_data")
    class_dict = data["class_dict"]
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"{path}: class_dict must be a non-empty dict {{class name: indices}}")
    names = sorted(class_dict)
    indices = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{path}: class_dict keys must be class names (str), found {name!r}")
        idx = np.asarray(class_dict[name])
        if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{path}: class_dict[{name!r}] must be a non-empty list of indices")
        if idx.min() < 0 or idx.max() >= len(image_data):
            raise ValueError(
                f"{path}: class_dict[{name!r}] indexes outside image_data "
                f"({len(image_data)} images)"
            )
        indices.append(idx)
    return _assemble(names, [len(i) for i in indices], lambda c: image_data[indices[c]], size)


# ---- hdf5 -------------------------------------------------------------------------------------


def _load_hdf5(folder: Path, split: str, size: int) -> ClassImages:
    data_path = folder / f"{split}_data.hdf5"
    labels_path = folder / f"{split}_labels.json"
    for path in (data_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"miniImageNet hdf5 format needs {data_path} and {labels_path}; {path} is missing"
            )
    try:
        import h5py
    except ImportError:
        raise ImportError(
            f"reading {data_path} needs h5py: pip install h5py (or pip install 'metafilm[hdf5]')"
        ) from None
    labels = json.loads(labels_path.read_text(encoding="utf-8"))
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{labels_path}: expected a non-empty JSON list of class names")
    names = sorted(labels)
    with h5py.File(data_path, "r") as f:
        group = f.get("datasets")
        if not isinstance(group, h5py.Group):
            raise ValueError(
                f"{data_path}: expected a group 'datasets' holding one array per class"
            )
        missing = [n for n in names if not isinstance(group.get(n), h5py.Dataset)]
        if missing:
            raise ValueError(
                f"{data_path}: group 'datasets' lacks classes listed in {labels_path.name}: "
                + ", ".join(missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        for n in names:
            _check_hwc(group[n], f"{data_path}: datasets/{n}")
        sizes = [group[n].shape[0] for n in names]
        return _assemble(names, sizes, lambda c: group[names[c]][()], size)


# ---- jpeg -------------------------------------------------------------------------------------


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(_resize(image.convert("RGB"), size))
    except FileNotFoundError:
        raise FileNotFoundError(f"miniImageNet image missing: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode miniImageNet image {path}: {e}") from None


def _image_paths(images_dir: Path, files: dict[str, list[str]]) -> list[list[Path]]:
    """Paths of every image, per class, in whichever layout (flat or per class) the folder uses."""
    label, first = next(iter(files.items()))
    flat, nested = images_dir / first[0], images_dir / label / first[0]
    if flat.is_file():
        return [[images_dir / name for name in names] for names in files.values()]
    if nested.is_file():
        return [[images_dir / lab / name for name in names] for lab, names in files.items()]
    raise FileNotFoundError(
        f"miniImageNet image {first[0]} not found: looked for {flat} (flat layout) and "
        f"{nested} (one folder per class)"
    )


def _load_jpeg(folder: Path, split: str, size: int, cache_root: Path) -> ClassImages:
    csvs = _csv_candidates(folder, split)
    csv_path = next((p for p in csvs if p.is_file()), None)
    if csv_path is None:
        raise FileNotFoundError(
            f"no miniImageNet split CSV for {split!r}: looked for "
            + " and ".join(str(p) for p in csvs)
        )
    files = read_ravi_csv(csv_path)
    names, sizes = list(files), [len(v) for v in files.values()]
    settings = {
        **_CACHE_FORMAT,
        "source": csv_path.name,
        "source_sha256": file_digests(csv_path, ["sha256"])["sha256"],
        "image_size": size,
        "resample": _RESAMPLE.name.lower(),
    }
    cache = (
        cache_root
        / "miniimagenet"
        / f"{split}-{settings['source_sha256'][:16]}-{size}px-{settings['resample']}.cache"
    )
    offsets = torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64)
    try:
        cached, _ = read_array_cache(cache, settings)
        if cached.shape != (sum(sizes), 3, size, size):
            raise CacheError(f"{cache} holds {cached.shape} images, the CSV lists {sum(sizes)}")
        return ClassImages(torch.from_numpy(cached), offsets, tuple(names))
    except FileNotFoundError:
        pass
    except CacheError as error:
        warnings.warn(f"{error}; rebuilding it", stacklevel=3)
    images_dir = folder / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"no miniImageNet image folder: looked for {images_dir} (for the CSV {csv_path}). "
            f"Put the images there either flat, {images_dir}/<filename> "
            f"(e.g. {images_dir}/{files[names[0]][0]}), or one folder per class, "
            f"{images_dir}/<label>/<filename>."
        )
    paths = _image_paths(images_dir, files)
    megabytes = sum(sizes) * 3 * size * size / 1e6
    _log.info(
        f"decoding {sum(sizes):,} miniImageNet {split!r} images into the cache {cache} "
        f"({megabytes:,.1f} MB; once, later loads read the cache)"
    )
    result = _assemble(names, sizes, lambda c: np.stack([_decode(p, size) for p in paths[c]]), size)
    write_array_cache(cache, result.images.numpy(), settings)
    return result
