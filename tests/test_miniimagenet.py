"""miniImageNet loaders on small fixtures written in each real format, plus the real split CSVs."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import episodes.miniimagenet as mi
from episodes.miniimagenet import load_miniimagenet, read_ravi_csv

N_CLASSES, N_IMAGES = 5, 3


def colour(c: int, i: int) -> tuple[int, int, int]:
    """A distinct solid colour for image `i` of class `c`."""
    return (30 + 45 * c, 220 - 40 * c, 40 + 60 * i)


def image(c: int, i: int, height: int = 84, width: int = 84) -> np.ndarray:
    return np.broadcast_to(np.array(colour(c, i), np.uint8), (height, width, 3)).copy()


@functools.cache
def real_rows(root: str) -> list[tuple[str, str]]:
    files = read_ravi_csv(Path(root) / "miniimagenet" / "ravi_splits" / "train.csv")
    return [(f, label) for label in list(files)[:N_CLASSES] for f in files[label][:N_IMAGES]]


@pytest.fixture
def rows(data_root) -> list[tuple[str, str]]:
    """Real rows of the real train CSV: the first images of its first classes."""
    return real_rows(str(data_root))


def labels_of(rows: list[tuple[str, str]]) -> list[str]:
    return list(dict.fromkeys(label for _, label in rows))


def write_csv(folder: Path, split: str, rows: list[tuple[str, str]]) -> Path:
    path = folder / "ravi_splits" / f"{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("filename", "label"), *rows])
    return path


def write_jpegs(folder: Path, rows, *, nested: bool = False, height: int = 84, width: int = 84):
    labels = labels_of(rows)
    for n, (filename, label) in enumerate(rows):
        c, i = labels.index(label), n % N_IMAGES
        path = folder / "images" / (label if nested else "") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image(c, i, height, width)).save(path, quality=95)


class Python2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch is open
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the original caches were written."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: str | bytes) -> None:
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str
    dispatch[str] = save_python2_str


def dumps(obj: object, protocol: int | str) -> bytes:
    """Pickle `obj` with a Python 3 protocol, or as a Python 2 pickle when `protocol="python2"`."""
    if protocol != "python2":
        return pickle.dumps(obj, protocol=protocol)
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.", b"numpy.core.")  # numpy 1's module names


def write_pickle(folder: Path, name: str, rows, protocol: int | str = pickle.HIGHEST_PROTOCOL):
    """The real cache structure, with the images stored shuffled so regrouping is exercised."""
    labels = labels_of(rows)
    order = np.random.default_rng(0).permutation(len(rows))  # slot order[n] holds image n
    image_data = np.empty((len(rows), 84, 84, 3), np.uint8)
    class_dict: dict[str, list[int]] = {}
    for n, (_, label) in enumerate(rows):
        image_data[order[n]] = image(labels.index(label), n % N_IMAGES)
        class_dict.setdefault(label, []).append(int(order[n]))
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"image_data": image_data, "class_dict": class_dict}
    (folder / name).write_bytes(dumps(payload, protocol))


def write_hdf5(folder: Path, split: str, rows) -> None:
    h5py = pytest.importorskip("h5py")
    labels = labels_of(rows)
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
        group = f.create_group("datasets")
        for c, label in enumerate(labels):
            group.create_dataset(label, data=np.stack([image(c, i) for i in range(N_IMAGES)]))
    (folder / f"{split}_labels.json").write_text(json.dumps(sorted(labels)))


def check(ci, rows, size: int = 84, tol: int = 0) -> None:
    assert ci.names == tuple(sorted(labels_of(rows)))
    assert ci.images.shape == (N_CLASSES * N_IMAGES, 3, size, size)
    assert ci.class_sizes.tolist() == [N_IMAGES] * N_CLASSES
    for c in range(N_CLASSES):
        for i in range(N_IMAGES):
            got = ci.images[int(ci.offsets[c]) + i].int()
            want = torch.tensor(colour(c, i)).reshape(3, 1, 1)
            assert int((got - want).abs().max()) <= tol, (c, i)


# ---- the real split CSVs ----------------------------------------------------------------------


def test_real_split_csvs(data_root):
    splits = {
        s: read_ravi_csv(Path(data_root) / "miniimagenet" / "ravi_splits" / f"{s}.csv")
        for s in ("train", "val", "test")
    }
    assert {s: len(f) for s, f in splits.items()} == {"train": 64, "val": 16, "test": 20}
    for files in splits.values():
        assert all(len(v) == 600 for v in files.values())
        assert all(f.startswith(label) for label, v in files.items() for f in v)
    train, val, test = (set(f) for f in splits.values())
    assert not (train & val or train & test or val & test)


# ---- Ravi CSV + JPEG folder -------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "per-class"])
def test_jpeg_round_trip(tmp_path, rows, nested):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows, nested=nested)
    ci = load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "cache")
    check(ci, rows, tol=6)


@pytest.mark.parametrize("size", [84, 32])
def test_jpeg_resized_to_image_size(tmp_path, rows, size):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows, height=100, width=120)
    ci = load_miniimagenet(tmp_path, "train", format="jpeg", image_size=size, cache_dir=tmp_path)
    check(ci, rows, size=size, tol=6)


def test_jpeg_cache_reused_then_rebuilt_when_csv_changes(tmp_path, rows, monkeypatch):
    folder, cache = tmp_path / "miniimagenet", tmp_path / "cache"
    csv_path = write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    decoded = []
    real_decode = mi._decode
    monkeypatch.setattr(mi, "_decode", lambda p, s: decoded.append(p) or real_decode(p, s))

    first = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    assert len(decoded) == len(rows)
    sha256 = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    assert [p.name for p in (cache / "miniimagenet").iterdir()] == [
        f"train-{sha256[:16]}-84px-lanczos.cache"
    ]

    decoded.clear()
    second = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    assert decoded == []
    assert second.names == first.names and bool((second.images == first.images).all())

    write_csv(folder, "train", rows[1:])  # the CSV changes: one image fewer
    third = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    assert len(decoded) == len(rows) - 1
    assert third.class_sizes.tolist() == [N_IMAGES - 1] + [N_IMAGES] * (N_CLASSES - 1)
    assert len(list((cache / "miniimagenet").iterdir())) == 2  # no temp files left behind


def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, rows):
    folder, cache = tmp_path / "miniimagenet", tmp_path / "cache"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    first = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    (path,) = (cache / "miniimagenet").iterdir()
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    assert bool((again.images == first.images).all())
    assert load_miniimagenet(tmp_path, "train", cache_dir=cache).names == first.names


def test_cache_dir_from_environment(tmp_path, rows, monkeypatch):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    monkeypatch.setenv("METAFILM_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("METAFILM_CACHE_DIR", str(tmp_path / "envcache"))
    load_miniimagenet(split="train")
    assert len(list((tmp_path / "envcache" / "miniimagenet").glob("train-*.cache"))) == 1


def test_missing_image_folder_names_the_paths(tmp_path, rows):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    with pytest.raises(FileNotFoundError) as e:
        load_miniimagenet(tmp_path, "train", format="jpeg", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(folder / "images") in msg and "<label>/<filename>" in msg and rows[0][0] in msg


def test_missing_single_image_names_the_file(tmp_path, rows):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    gone = folder / "images" / rows[4][0]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=str(gone)):
        load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "miniimagenet").exists()


def test_first_image_in_neither_layout_names_both_paths(tmp_path, rows):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    (folder / "images").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "cache")
    filename, label = rows[0]
    assert str(folder / "images" / filename) in str(e.value)
    assert str(folder / "images" / label / filename) in str(e.value)


def test_corrupt_image_names_the_file(tmp_path, rows):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    bad = folder / "images" / rows[2][0]
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=f"cannot decode .*{bad.name}"):
        load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "cache")


def test_bad_csv_header(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("file,class\nx.jpg,n01\n")
    with pytest.raises(ValueError, match="expected the header 'filename,label'"):
        read_ravi_csv(path)


# ---- pickled caches ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 5, "python2"])
@pytest.mark.parametrize(
    ("split", "name"),
    [
        ("train", "mini-imagenet-cache-train.pkl"),
        ("val", "mini-imagenet-cache-validation.pkl"),
        ("val", "mini-imagenet-cache-val.pkl"),
        ("test", "mini-imagenet-cache-test.pkl"),
    ],
)
def test_pickle_round_trip(tmp_path, rows, protocol, split, name):
    write_pickle(tmp_path / "miniimagenet", name, rows, protocol)
    check(load_miniimagenet(tmp_path, split), rows)


def test_pickle_resized(tmp_path, rows):
    write_pickle(tmp_path / "miniimagenet", "mini-imagenet-cache-train.pkl", rows)
    check(load_miniimagenet(tmp_path, "train", image_size=42), rows, size=42, tol=1)


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    payload = {"image_data": _RunsACommand(marker), "class_dict": {}}
    (folder / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r"refused to load (posix|os)\.system"):
        load_miniimagenet(tmp_path, "train")
    assert not marker.exists()


def test_pickle_codecs_only_for_latin1(tmp_path):
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    # protocol-0 opcodes: _codecs.encode("x", "rot13"), which array pickles never need
    data = b"c_codecs\nencode\n(Vx\nVrot13\ntR."
    (folder / "mini-imagenet-cache-test.pkl").write_bytes(data)
    with pytest.raises(ValueError, match="refused _codecs.encode with encoding 'rot13'"):
        load_miniimagenet(tmp_path, "test")


RGB = np.zeros((3, 84, 84, 3), np.uint8)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"image_data": RGB[..., 0], "class_dict": {"a": [0]}}, r"\[N, H, W, 3\]"),
        ({"image_data": RGB.astype(np.float32), "class_dict": {"a": [0]}}, "uint8"),
        ({"images": RGB}, "keys 'image_data' and 'class_dict'"),
        ({"image_data": RGB, "class_dict": {"a": [3]}}, "outside"),
        ({"image_data": RGB, "class_dict": {"a": []}}, "non-empty"),
    ],
    ids=["grey", "float", "keys", "index", "empty-class"],
)
def test_bad_pickle_contents(tmp_path, payload, message):
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    (folder / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=message) as e:
        load_miniimagenet(tmp_path, "train")
    assert "mini-imagenet-cache-train.pkl" in str(e.value)


# ---- HDF5 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_hdf5_round_trip(tmp_path, rows, split):
    write_hdf5(tmp_path / "miniimagenet", split, rows)
    check(load_miniimagenet(tmp_path, split), rows)


def test_hdf5_label_without_dataset(tmp_path, rows):
    folder = tmp_path / "miniimagenet"
    write_hdf5(folder, "train", rows)
    (folder / "train_labels.json").write_text(json.dumps([*labels_of(rows), "n99999999"]))
    with pytest.raises(ValueError, match="lacks classes .*n99999999"):
        load_miniimagenet(tmp_path, "train")


def test_hdf5_without_h5py_says_how_to_install(tmp_path, rows, monkeypatch):
    write_hdf5(tmp_path / "miniimagenet", "train", rows)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        load_miniimagenet(tmp_path, "train")


# ---- place discovery and arguments ------------------------------------------------------------


def test_auto_with_nothing_present_lists_the_layouts(tmp_path):
    (tmp_path / "miniimagenet" / "ravi_splits").mkdir(parents=True)
    write_csv(tmp_path / "miniimagenet", "val", [("n0000000100000001.jpg", "n00000001")])
    with pytest.raises(FileNotFoundError) as e:
        load_miniimagenet(tmp_path, "val")
    msg = str(e.value)
    folder = tmp_path / "miniimagenet"
    for path in [
        folder / "mini-imagenet-cache-validation.pkl",
        folder / "val_data.hdf5",
        folder / "ravi_splits" / "val.csv",
        folder / "images",
    ]:
        assert str(path) in msg
    assert "jpeg:" in msg and "pickle:" in msg and "hdf5:" in msg


def test_auto_prefers_pickle_over_jpeg(tmp_path, rows, monkeypatch):
    folder = tmp_path / "miniimagenet"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    write_pickle(folder, "mini-imagenet-cache-train.pkl", rows)
    monkeypatch.setattr(mi, "_decode", None)  # decoding would fail: the pickle must be read
    check(load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "cache"), rows)


def test_unknown_split_and_format(tmp_path):
    with pytest.raises(ValueError, match="unknown miniImageNet split 'validation'.*'val'"):
        load_miniimagenet(tmp_path, "validation")
    with pytest.raises(ValueError, match="unknown miniImageNet format 'zip'"):
        load_miniimagenet(tmp_path, "train", format="zip")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_miniimagenet(tmp_path, "train", image_size=0)


def test_no_data_root(monkeypatch):
    monkeypatch.delenv("METAFILM_DATA_ROOT", raising=False)
    with pytest.raises(ValueError, match="METAFILM_DATA_ROOT"):
        load_miniimagenet(split="train")


# ---- issue 17: damaged files are named in one line, never a traceback or a huge allocation ----


def test_empty_and_truncated_pickles_name_the_file(tmp_path, rows):
    folder = tmp_path / "miniimagenet"
    write_pickle(folder, "mini-imagenet-cache-train.pkl", rows)
    path = folder / "mini-imagenet-cache-train.pkl"
    whole = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(ValueError) as error:
        load_miniimagenet(tmp_path, "train")
    assert str(error.value) == (
        f"{path} is empty (0 bytes): replace it with a whole copy of the miniImageNet pickle"
    )
    for cut in (1, 40, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="truncated") as error:
            load_miniimagenet(tmp_path, "train")
        assert str(error.value).startswith(f"{path} is ")
        assert "\n" not in str(error.value)


def test_a_cache_header_claiming_a_huge_shape_is_rebuilt_without_allocating(tmp_path, rows):
    folder, cache = tmp_path / "miniimagenet", tmp_path / "cache"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    first = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    (path,) = (cache / "miniimagenet").iterdir()
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[16:24])
    header = json.loads(data[24 : 24 + length])
    header["shape"] = [10**12, 3, 84, 84]  # 21 PB
    forged = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(data[:16] + struct.pack("<Q", len(forged)) + forged + data[24 + length :])
    with pytest.warns(UserWarning, match=r"claims shape \[1000000000000, 3, 84, 84\]"):
        again = load_miniimagenet(tmp_path, "train", cache_dir=cache)
    assert bool((again.images == first.images).all())
    (length_only,) = (cache / "miniimagenet").iterdir()
    length_only.write_bytes(data[:16] + struct.pack("<Q", 2**62) + data[24:])
    with pytest.warns(UserWarning, match="byte header in a"):
        assert load_miniimagenet(tmp_path, "train", cache_dir=cache).names == first.names


def test_a_cache_build_says_what_it_builds_and_its_size(tmp_path, rows, caplog):
    folder, cache = tmp_path / "miniimagenet", tmp_path / "cache"
    write_csv(folder, "train", rows)
    write_jpegs(folder, rows)
    with caplog.at_level("INFO", logger="episodes"):
        load_miniimagenet(tmp_path, "train", cache_dir=cache, image_size=32)
    (path,) = (cache / "miniimagenet").iterdir()
    megabytes = N_CLASSES * N_IMAGES * 3 * 32 * 32 / 1e6  # 0.046 MB
    assert caplog.messages[0] == (
        f"decoding {N_CLASSES * N_IMAGES} miniImageNet 'train' images into the cache {path} "
        f"({megabytes:.1f} MB; once, later loads read the cache)"
    )
    assert caplog.messages[1] == f"cached [15, 3, 32, 32] uint8 (0.0 MB) in {path}"
