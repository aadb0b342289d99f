"""Omniglot loader: facts of the real data, decode and rotation conventions, cache, errors."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from episodes import omniglot
from episodes.integrity import ChecksumError, KnownVersion, verify_file
from episodes.omniglot import (
    BACKGROUND_ZIP,
    EVALUATION_ZIP,
    cached_characters,
    decode_glyph,
    load_omniglot,
    omniglot_alphabets,
)

SPLIT_CLASSES = {
    "train": 4112,
    "val": 688,
    "trainval": 4800,
    "test": 1692,
    "background": 964,
    "evaluation": 659,
}


def _split_lines(data_root: Path, split: str) -> list[str]:
    text = (data_root / "omniglot" / "vinyals_splits" / f"{split}.txt").read_text()
    return [line for line in text.splitlines() if line]


def _raw_png(data_root: Path, zip_name: str, member: str) -> bytes:
    with zipfile.ZipFile(data_root / "omniglot" / zip_name) as archive:
        return archive.read(member)


def _no_decode(png: bytes, image_size: int) -> np.ndarray:
    raise AssertionError("a warm load must read the cache, not decode PNGs")


def _mirror_root(data_root: Path, tmp_path: Path, replace: dict[str, bytes]) -> Path:
    """A data root under tmp_path linking to the real files, except `replace` {name: bytes}."""
    folder = tmp_path / "root" / "omniglot"
    folder.mkdir(parents=True)
    (folder / "vinyals_splits").symlink_to(data_root / "omniglot" / "vinyals_splits")
    for name in (BACKGROUND_ZIP, EVALUATION_ZIP):
        if name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            (folder / name).symlink_to(data_root / "omniglot" / name)
    return folder.parent


@pytest.mark.parametrize("split", list(SPLIT_CLASSES))
def test_split_sizes(omniglot_split, split):
    classes = omniglot_split(split)
    assert classes.num_classes == SPLIT_CLASSES[split]
    assert bool((classes.class_sizes == 20).all())
    assert classes.images.shape == (20 * SPLIT_CLASSES[split], 1, 28, 28)
    assert classes.images.dtype == torch.uint8


@pytest.mark.parametrize("split", ["train", "val", "trainval", "test"])
def test_vinyals_names_follow_split_file(omniglot_split, data_root, split):
    assert list(omniglot_split(split).names) == _split_lines(data_root, split)


def test_original_split_alphabets(omniglot_split, data_root):
    background = omniglot_alphabets(data_root, "background")
    evaluation = omniglot_alphabets(data_root, "evaluation")
    assert len(background) == 30 and len(evaluation) == 20
    assert not set(background) & set(evaluation)
    assert {n.split("/")[0] for n in omniglot_split("background").names} == set(background)
    assert all(name.endswith("/rot000") for name in omniglot_split("evaluation").names)
    test_alphabets = omniglot_alphabets(data_root, "test")
    assert set(test_alphabets) <= set(evaluation)


def test_vinyals_splits_cover_all_characters(omniglot_split):
    def characters(split):
        return {name.rsplit("/", 1)[0] for name in omniglot_split(split).names}

    assert characters("trainval") | characters("test") == characters("background") | characters(
        "evaluation"
    )
    assert not characters("trainval") & characters("test")
    assert (
        omniglot_split("trainval").names
        == omniglot_split("train").names + omniglot_split("val").names
    )


@pytest.mark.parametrize("split", ["test", "val"])
def test_rotated_classes_are_quarter_turns_of_rot000(omniglot_split, split):
    classes = omniglot_split(split)
    index = {name: c for c, name in enumerate(classes.names)}

    def images(name):
        c = index[name]
        return classes.images[classes.offsets[c] : classes.offsets[c + 1]]

    bases = [name for name in classes.names if name.endswith("/rot000")]
    assert len(bases) * 4 == classes.num_classes
    for base in bases:
        character = base.rsplit("/", 1)[0]
        for turns in (1, 2, 3):
            rotated = images(f"{character}/rot{90 * turns:03d}")
            assert torch.equal(rotated, torch.rot90(images(base), turns, dims=(-2, -1)))
    assert not torch.equal(images(bases[0]), torch.rot90(images(bases[0]), 1, dims=(-2, -1)))


def test_rot090_is_counter_clockwise_like_pil_rotate(data_root):
    # torch.rot90(k=1) on rows top->bottom moves the top-right pixel to the top-left: CCW.
    grid = torch.tensor([[0, 1], [2, 3]])
    assert torch.rot90(grid, 1, dims=(-2, -1)).tolist() == [[1, 3], [0, 2]]
    pil = Image.fromarray(grid.numpy().astype(np.uint8)).rotate(90)  # ProtoNets' rotation
    assert np.asarray(pil).tolist() == [[1, 3], [0, 2]]
    png = _raw_png(data_root, BACKGROUND_ZIP, "images_background/Korean/character05/0647_01.png")
    with Image.open(io.BytesIO(png)) as raw:
        turned = np.asarray(raw.rotate(90))
        upright = torch.from_numpy(np.asarray(raw).copy())
    assert np.array_equal(turned, torch.rot90(upright, 1, dims=(-2, -1)).numpy())


def test_cached_image_is_greyscale_ink_on_black_and_matches_independent_resize(
    omniglot_split, data_root
):
    png = _raw_png(
        data_root, BACKGROUND_ZIP, "images_background/Alphabet_of_the_Magi/character01/0709_01.png"
    )
    cached = omniglot_split("background").images[0, 0]
    with Image.open(io.BytesIO(png)) as raw:
        assert raw.mode == "1" and raw.size == (105, 105)
        ink = torch.from_numpy(~np.asarray(raw)).float()  # 1-bit PNG: ink is black (False)
    grey_levels = ((cached > 0) & (cached < 255)).sum()
    assert grey_levels > 20, "the resize must antialias, not pick nearest 1-bit pixels"
    independent = torch.nn.functional.interpolate(
        ink[None, None], size=(28, 28), mode="bilinear", antialias=True
    )[0, 0]
    assert (cached.float() - independent * 255).abs().max() <= 1.5
    assert cached[0].sum() == 0 and cached[:, 0].sum() == 0  # background 0 at the border
    assert abs(cached.float().mean() / 255 - ink.mean()) < 0.01  # ink coverage is preserved
    assert torch.equal(cached, torch.from_numpy(decode_glyph(png, 28)))


def test_alphabet_filter(data_root, omniglot_cache_dir):
    held_out = list(omniglot_alphabets(data_root, "background")[:5])
    classes = load_omniglot(
        data_root, "background", cache_dir=omniglot_cache_dir, alphabets=held_out
    )
    assert {name.split("/")[0] for name in classes.names} == set(held_out)
    with pytest.raises(ValueError, match="not in split 'test'.*its alphabets"):
        load_omniglot(data_root, "test", cache_dir=omniglot_cache_dir, alphabets=["Latin"])
    with pytest.raises(ValueError, match="alphabets is empty"):
        load_omniglot(data_root, "background", cache_dir=omniglot_cache_dir, alphabets=[])
    with pytest.raises(TypeError, match="list of alphabet names"):
        load_omniglot(data_root, "background", cache_dir=omniglot_cache_dir, alphabets="Latin")


def test_warm_load_reads_the_cache_without_decoding(data_root, omniglot_cache_dir, monkeypatch):
    load_omniglot(data_root, "evaluation", cache_dir=omniglot_cache_dir)
    monkeypatch.setattr(omniglot, "decode_glyph", _no_decode)
    assert load_omniglot(data_root, "test", cache_dir=omniglot_cache_dir).num_classes == 1692


def test_zip_known_only_by_original_md5_is_accepted(data_root, omniglot_cache_dir, monkeypatch):
    path = data_root / "omniglot" / EVALUATION_ZIP
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    versions = (
        KnownVersion("re-packed copy", path.stat().st_size, {"sha256": "0" * 64}),
        KnownVersion("original release", path.stat().st_size, {"md5": md5}),
    )
    assert verify_file(path, versions, remedy="")["md5"] == md5
    monkeypatch.setattr(omniglot, "OMNIGLOT_VERSIONS", {EVALUATION_ZIP: versions})
    classes = load_omniglot(data_root, "evaluation", cache_dir=omniglot_cache_dir)
    assert classes.num_classes == 659


def test_corrupt_zip_is_a_clear_error(data_root, tmp_path):
    damaged = bytearray((data_root / "omniglot" / EVALUATION_ZIP).read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    root = _mirror_root(data_root, tmp_path, {EVALUATION_ZIP: bytes(damaged)})
    with pytest.raises(ChecksumError) as error:
        load_omniglot(root, "evaluation", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert str(root / "omniglot" / EVALUATION_ZIP) in message
    assert "462d9a07e5ca91b874e93b80273688df88777c05f6f454ea8f3d73d061adc275" in message
    assert "6b91aef0f799c5bb55b94e3f2daec811" in message
    assert "run 'metafilm data --download'" in message and "download=True" not in message
    assert not (tmp_path / "cache").exists()


def test_truncated_zip_is_a_clear_error(data_root, tmp_path):
    whole = (data_root / "omniglot" / BACKGROUND_ZIP).read_bytes()
    root = _mirror_root(data_root, tmp_path, {BACKGROUND_ZIP: whole[: len(whole) // 3]})
    with pytest.raises(ChecksumError, match="looks truncated") as error:
        load_omniglot(root, "train", cache_dir=tmp_path / "cache")
    assert "8,588,032 bytes" in str(error.value) and "9,464,212 bytes" in str(error.value)


def test_missing_zip_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_omniglot(tmp_path, "test", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert str(tmp_path / "omniglot" / BACKGROUND_ZIP) in message
    assert str(tmp_path / "omniglot" / EVALUATION_ZIP) in message
    assert "'metafilm data --download'" in message and "vinyals_splits" in message


def test_missing_split_file_says_where(data_root, tmp_path, omniglot_cache_dir):
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for name in (BACKGROUND_ZIP, EVALUATION_ZIP):
        (folder / name).symlink_to(data_root / "omniglot" / name)
    with pytest.raises(FileNotFoundError, match="vinyals_splits/val.txt.*prototypical-networks"):
        load_omniglot(tmp_path, "val", cache_dir=omniglot_cache_dir)


def test_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown Omniglot split 'tset'.*train, val, trainval"):
        load_omniglot(tmp_path, "tset")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        load_omniglot(tmp_path, "test", image_size=0)
    monkeypatch.delenv("METAFILM_DATA_ROOT", raising=False)
    with pytest.raises(ValueError, match="METAFILM_DATA_ROOT"):
        load_omniglot(None, "test")


# --- the cache, on a small zip cut from the real evaluation zip ---------------------------


@pytest.fixture
def small_zip(data_root, tmp_path) -> tuple[Path, str, list[bytes]]:
    """A release-layout zip of the first 3 Angelic characters; its path, sha256 and PNG bytes."""
    source = data_root / "omniglot" / EVALUATION_ZIP
    path = tmp_path / "images_evaluation.zip"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as small:
        members = sorted(
            m
            for m in archive.namelist()
            if m.endswith(".png")
            and m.split("/")[2] in {"character01", "character02"}
            and m.split("/")[1] in {"Angelic", "Tengwar"}
        )
        pngs = [archive.read(m) for m in members]
        for member, png in zip(members, pngs, strict=True):
            small.writestr(member, png)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), pngs


def _only_cache_file(cache_dir: Path) -> Path:
    (path,) = (cache_dir / "omniglot").iterdir()
    return path


def test_cache_round_trip(small_zip, tmp_path, monkeypatch):
    path, sha256, pngs = small_zip
    cold = cached_characters(path, sha256, 28, tmp_path / "cache")
    assert cold.names == (
        "Angelic/character01",
        "Angelic/character02",
        "Tengwar/character01",
        "Tengwar/character02",
    )
    expected = np.stack([decode_glyph(png, 28) for png in pngs])
    assert np.array_equal(cold.images[:, 0].numpy(), expected)
    monkeypatch.setattr(omniglot, "decode_glyph", _no_decode)
    warm = cached_characters(path, sha256, 28, tmp_path / "cache")
    assert torch.equal(warm.images, cold.images) and torch.equal(warm.offsets, cold.offsets)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) - 100], "half-written"),
        (lambda data: data[:40], "header|half-written"),
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "sha256"),
        (lambda data: b"not a cache at all", "bad magic"),
    ],
)
def test_damaged_cache_is_rebuilt(small_zip, tmp_path, damage, reason):
    path, sha256, _ = small_zip
    good = cached_characters(path, sha256, 28, tmp_path / "cache")
    cache = _only_cache_file(tmp_path / "cache")
    cache.write_bytes(damage(cache.read_bytes()))
    with pytest.warns(UserWarning, match=reason):
        rebuilt = cached_characters(path, sha256, 28, tmp_path / "cache")
    assert torch.equal(rebuilt.images, good.images)
    assert torch.equal(cached_characters(path, sha256, 28, tmp_path / "cache").images, good.images)


def test_cache_of_another_setting_or_source_is_not_trusted(small_zip, tmp_path):
    path, sha256, pngs = small_zip
    small = cached_characters(path, sha256, 14, tmp_path / "small")
    assert small.images.shape[-2:] == (14, 14)
    built_for_14 = _only_cache_file(tmp_path / "small")
    target = tmp_path / "cache" / "omniglot" / built_for_14.name.replace("-14px-", "-28px-")
    target.parent.mkdir(parents=True)
    shutil.copyfile(built_for_14, target)
    with pytest.warns(UserWarning, match="another source or setting.*image_size"):
        loaded = cached_characters(path, sha256, 28, tmp_path / "cache")
    assert loaded.images.shape[-2:] == (28, 28)
    assert np.array_equal(loaded.images[0, 0].numpy(), decode_glyph(pngs[0], 28))
    other_source = "f" * 16 + sha256[16:]  # same cache file name prefix, different digest
    os.replace(target, target.with_name(target.name.replace(sha256[:16], other_source[:16])))
    with pytest.warns(UserWarning, match="another source or setting.*source_sha256"):
        cached_characters(path, other_source, 28, tmp_path / "cache")
