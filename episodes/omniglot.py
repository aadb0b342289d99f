"""Omniglot from its two release zips: verified, decoded once into a compact cache, then split.

Conventions (all splits, and the Lake runs in `episodes.lake`):
- ink = 255 on a 0 background (the PNGs are 1-bit with ink = black).
- resizing: each 1-bit PNG is converted to greyscale "L" first (Pillow resizes mode "1" with
  nearest neighbour whatever filter is asked), then resized with Pillow's BILINEAR filter, which
  antialiases when shrinking (a triangle filter widened to the scale factor), so a pixel's grey
  level is the local ink coverage.
- rotation: class `Alphabet/characterNN/rotDDD` is the character turned DDD degrees
  counter-clockwise as displayed, the ProtoNets convention (PIL `Image.rotate(DDD)`), i.e.
  `torch.rot90(image, k=DDD // 90, dims=(-2, -1))` of an image whose rows run top to bottom. The
  turn is applied to the resized image.
- order: characters sorted by alphabet and character folder, images by file name; Vinyals classes
  in split-file order.

The cache holds the unrotated characters of one zip, keyed by the zip's sha256 and the resize
setting; a split is assembled from it in well under a second.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image

from episodes.classes import ClassImages, alphabet_of
from episodes.download import OMNIGLOT_ORIGINALS, download_omniglot
from episodes.integrity import (
    CacheError,
    KnownVersion,
    read_array_cache,
    resolve_cache_dir,
    resolve_data_root,
    verify_file,
    write_array_cache,
)

_log = logging.getLogger(__name__)

BACKGROUND_ZIP = "images_background.zip"
EVALUATION_ZIP = "images_evaluation.zip"
VINYALS_SPLITS = ("train", "val", "trainval", "test")
SPLITS = (*VINYALS_SPLITS, "background", "evaluation")

OMNIGLOT_VERSIONS: Mapping[str, tuple[KnownVersion, ...]] = MappingProxyType(
    {
        BACKGROUND_ZIP: (
            KnownVersion(
                "re-packed copy",
                8_588_032,
                {"sha256": "ed4740b1dc4fe2afb199f3fc62746b9ad4eee0361cf88ee42e8635d3265cc388"},
            ),
            OMNIGLOT_ORIGINALS[BACKGROUND_ZIP].version,
        ),
        EVALUATION_ZIP: (
            KnownVersion(
                "re-packed copy",
                5_863_926,
                {"sha256": "462d9a07e5ca91b874e93b80273688df88777c05f6f454ea8f3d73d061adc275"},
            ),
            OMNIGLOT_ORIGINALS[EVALUATION_ZIP].version,
        ),
    }
)

_ZIPS_OF_SPLIT = {
    "background": (BACKGROUND_ZIP,),
    "evaluation": (EVALUATION_ZIP,),
    **{split: (BACKGROUND_ZIP, EVALUATION_ZIP) for split in VINYALS_SPLITS},
}
_SPLIT_LINE = re.compile(r"([^/\s]+/character\d+)/rot(000|090|180|270)")
_RESAMPLE = Image.Resampling.BILINEAR
_CACHE_FORMAT = {"format": "metafilm-omniglot-characters", "version": 1, "ink": "255 on 0"}


def check_image_size(image_size: int) -> None:
    """Reject an `image_size` that is not a positive int, saying what was given."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (e.g. 28), got {image_size!r}")


def decode_glyph(png: bytes, image_size: int) -> np.ndarray:
    """Decode one Omniglot PNG to uint8 `[image_size, image_size]`, ink 255 on 0 (see module)."""
    with Image.open(io.BytesIO(png)) as image:
        grey = image.convert("L")
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), _RESAMPLE)
    return 255 - np.asarray(grey, dtype=np.uint8)


def cached_characters(
    zip_path: str | os.PathLike[str],
    source_sha256: str,
    image_size: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClassImages:
    """The unrotated characters of one Omniglot zip, decoded once and then read from the cache.

    `source_sha256` is the zip's verified sha256 (the cache key, with `image_size` and the resize
    filter). Classes are named `Alphabet/characterNN`; images are uint8 `[N, 1, S, S]`. A cache
    that is damaged, half-written or built for another source or setting is rebuilt with a warning.
    """
    zip_path = Path(zip_path)
    settings = {
        **_CACHE_FORMAT,
        "source": zip_path.name,
        "source_sha256": source_sha256,
        "image_size": image_size,
        "resample": _RESAMPLE.name.lower(),
    }
    cache_path = (
        resolve_cache_dir(cache_dir)
        / "omniglot"
        / f"{zip_path.stem}-{source_sha256[:16]}-{image_size}px-{settings['resample']}.cache"
    )
    try:
        return _characters_from_cache(cache_path, settings)
    except FileNotFoundError:
        pass
    except CacheError as error:
        warnings.warn(f"{error}; rebuilding it", stacklevel=2)
    _log.info(f"decoding {zip_path} into the cache {cache_path} (once; later loads read it)")
    images, names, counts = _decode_zip(zip_path, image_size)
    write_array_cache(cache_path, images, {**settings, "characters": names, "counts": counts})
    return _as_characters(images, names, counts)


def load_omniglot(
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    *,
    image_size: int = 28,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    alphabets: Sequence[str] | None = None,
) -> ClassImages:
    """Load an Omniglot split as uint8 `[N, 1, image_size, image_size]`, ink 255 on 0.

    `split`: Vinyals "train" / "val" / "trainval" / "test" (rotated characters, 4 classes each,
    in split-file order) or the original "background" / "evaluation" (964 / 659 characters, named
    `.../rot000`). `root` (default env `METAFILM_DATA_ROOT`) holds `omniglot/images_background.zip`,
    `omniglot/images_evaluation.zip` and `omniglot/vinyals_splits/<split>.txt`; each zip must be
    the re-packed copy or the original release (checked by digest). `cache_dir` defaults to env
    `METAFILM_CACHE_DIR`, else ~/.cache/metafilm. `download=True` fetches missing zips from the
    original release. `alphabets` keeps only the classes of those alphabets (see
    `omniglot_alphabets`), e.g. to hold background alphabets out for validation.
    """
    _check_split(split)
    check_image_size(image_size)
    folder = resolve_data_root(root) / "omniglot"
    zip_names = _ZIPS_OF_SPLIT[split]
    missing = [name for name in zip_names if not (folder / name).is_file()]
    if missing and download:
        download_omniglot(folder.parent, missing)
    elif missing:
        raise FileNotFoundError(
            _layout_message(folder, f"Omniglot file not found: {folder / missing[0]}")
        )
    sources = [_verified_characters(folder / name, image_size, cache_dir) for name in zip_names]
    classes = _split_classes(folder, split, sources)
    if alphabets is not None:
        classes = _select_alphabets(classes, alphabets, split)
    images = np.concatenate([source.images[:, 0].numpy() for source in sources])
    spans, shift = {}, 0
    for source in sources:
        bounds = source.offsets.tolist()
        for index, name in enumerate(source.names):
            spans[name] = (shift + bounds[index], shift + bounds[index + 1])
        shift += len(source.images)
    unknown = [character for character, _ in classes if character not in spans]
    if unknown:
        raise ValueError(
            f"split {split!r} names character {unknown[0]!r} (and {len(unknown) - 1} more) "
            f"that is in neither {' nor '.join(zip_names)}; check {folder / 'vinyals_splits'}"
        )
    names = [f"{character}/rot{90 * turns:03d}" for character, turns in classes]
    return _rotated_classes(images, [spans[c] for c, _ in classes], [t for _, t in classes], names)


def _rotated_classes(
    images: np.ndarray, spans: list[tuple[int, int]], turns: list[int], names: list[str]
) -> ClassImages:
    """Gather the rows `start:stop` of each class, turned `turns` quarter turns counter-clockwise.

    numpy, not torch: `np.rot90` is a view, so each image is copied once, straight into place.
    """
    starts = np.array([start for start, _ in spans], dtype=np.int64)
    sizes = np.array([stop - start for start, stop in spans], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.repeat(starts - offsets[:-1], sizes) + np.arange(offsets[-1])
    turns_of_row = np.repeat(np.array(turns, dtype=np.int64), sizes)
    selected = np.empty((offsets[-1], 1, *images.shape[1:]), dtype=np.uint8)
    for quarter_turns in range(4):
        where = np.flatnonzero(turns_of_row == quarter_turns)
        selected[where, 0] = np.rot90(images, quarter_turns, axes=(1, 2))[rows[where]]
    return ClassImages(torch.from_numpy(selected), torch.from_numpy(offsets), tuple(names))


def omniglot_alphabets(
    root: str | os.PathLike[str] | None = None, split: str = "background"
) -> tuple[str, ...]:
    """The sorted alphabet names of a split (e.g. the 30 background alphabets), without decoding."""
    _check_split(split)
    folder = resolve_data_root(root) / "omniglot"
    if split in VINYALS_SPLITS:
        characters = [character for character, _ in _read_split_file(folder, split)]
    else:
        (zip_name,) = _ZIPS_OF_SPLIT[split]
        path = folder / zip_name
        if not path.is_file():
            raise FileNotFoundError(_layout_message(folder, f"Omniglot file not found: {path}"))
        with zipfile.ZipFile(path) as archive:
            characters = list(_group_members(archive.namelist()))
    return tuple(sorted({alphabet_of(character) for character in characters}))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; valid splits: {', '.join(SPLITS)}")


def _layout_message(folder: Path, problem: str) -> str:
    return (
        f"{problem}. Expected layout: {folder / BACKGROUND_ZIP} and {folder / EVALUATION_ZIP} "
        f"(the release zips of https://github.com/brendenlake/omniglot, python/), and "
        f"{folder / 'vinyals_splits'}/{{train,val,trainval,test}}.txt for the Vinyals splits. "
        f"Place the files there, or fetch the original zips with 'metafilm data --download' "
        f"(load_omniglot(..., download=True) in Python)."
    )


def _verified_characters(
    zip_path: Path, image_size: int, cache_dir: str | os.PathLike[str] | None
) -> ClassImages:
    digests = verify_file(
        zip_path,
        OMNIGLOT_VERSIONS[zip_path.name],
        remedy="Replace it with a good copy, or delete it and run 'metafilm data --download' to "
        "fetch the original release.",
    )
    return cached_characters(zip_path, digests["sha256"], image_size, cache_dir)


def _split_classes(
    folder: Path, split: str, sources: Sequence[ClassImages]
) -> list[tuple[str, int]]:
    """(character, counter-clockwise quarter turns) of every class of a split, in order."""
    if split in VINYALS_SPLITS:
        return _read_split_file(folder, split)
    return [(name, 0) for source in sources for name in source.names]


def _read_split_file(folder: Path, split: str) -> list[tuple[str, int]]:
    path = folder / "vinyals_splits" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"Vinyals split file not found: {path}. Place the split files of "
            f"https://github.com/jakesnell/prototypical-networks "
            f"(data/omniglot/splits/vinyals/{{train,val,trainval,test}}.txt) in {path.parent}"
        )
    classes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        match = _SPLIT_LINE.fullmatch(line.strip())
        if match is None:
            raise ValueError(
                f"{path}:{number}: expected 'Alphabet/characterNN/rotDDD' with DDD in "
                f"000/090/180/270, got {line!r}"
            )
        classes.append((match[1], int(match[2]) // 90))
    if not classes:
        raise ValueError(f"{path} lists no classes")
    return classes


def _select_alphabets(
    classes: list[tuple[str, int]], alphabets: Sequence[str], split: str
) -> list[tuple[str, int]]:
    if isinstance(alphabets, str):
        raise TypeError(f"alphabets must be a list of alphabet names, not the string {alphabets!r}")
    if not alphabets:
        raise ValueError("alphabets is empty; pass alphabet names, or None for the whole split")
    available = sorted({alphabet_of(character) for character, _ in classes})
    unknown = sorted(set(alphabets) - set(available))
    if unknown:
        raise ValueError(
            f"alphabets {unknown} are not in split {split!r}; its alphabets: {', '.join(available)}"
        )
    wanted = set(alphabets)
    return [(character, turns) for character, turns in classes if alphabet_of(character) in wanted]


def _group_members(members: Sequence[str]) -> dict[str, list[str]]:
    """PNG members of a release zip by character `Alphabet/characterNN`, all sorted by name."""
    characters: dict[str, list[str]] = {}
    for member in sorted(members):
        parts = member.split("/")
        if member.endswith(".png") and len(parts) == 4:
            characters.setdefault(f"{parts[1]}/{parts[2]}", []).append(member)
    return characters


def _decode_zip(zip_path: Path, image_size: int) -> tuple[np.ndarray, list[str], list[int]]:
    """Decode every PNG of a release zip: uint8 `[N, S, S]`, character names, images per name."""
    with zipfile.ZipFile(zip_path) as archive:
        characters = _group_members(archive.namelist())
        if not characters:
            raise ValueError(
                f"{zip_path} holds no PNGs laid out as images_*/Alphabet/characterNN/*.png"
            )
        pngs = [archive.read(member) for members in characters.values() for member in members]
    images = np.empty((len(pngs), image_size, image_size), dtype=np.uint8)
    for row, png in enumerate(pngs):  # serial: threads measured slower (Pillow holds the GIL)
        images[row] = decode_glyph(png, image_size)
    return images, list(characters), [len(members) for members in characters.values()]


def _characters_from_cache(path: Path, settings: Mapping[str, object]) -> ClassImages:
    images, header = read_array_cache(path, settings)
    names, counts = header.get("characters"), header.get("counts")
    size = settings["image_size"]
    if (
        not isinstance(names, list)
        or not isinstance(counts, list)
        or len(names) != len(counts)
        or images.ndim != 3
        or images.shape[1:] != (size, size)
        or sum(counts) != len(images)
    ):
        raise CacheError(f"{path} has an inconsistent character index")
    return _as_characters(images, names, counts)


def _as_characters(images: np.ndarray, names: list[str], counts: list[int]) -> ClassImages:
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    return ClassImages(torch.from_numpy(images).unsqueeze(1), offsets, tuple(names))
