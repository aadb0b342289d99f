"""Where data and caches live, how source files are verified, and how files reach the disk.

Shared by every loader: a data root and a cache dir resolved the same way everywhere, source files
checked against the sizes and digests of their known published versions, and files written so that
a crash never leaves a half-written file under its final name (temp file in the same folder, then
`os.replace`). Array caches carry their own header and payload digest, so a cache that was
half-written, damaged, or built from another source or setting is detected, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

DATA_ROOT_ENV = "METAFILM_DATA_ROOT"
CACHE_DIR_ENV = "METAFILM_CACHE_DIR"

_CHUNK_BYTES = 1 << 20
_CACHE_MAGIC = b"METAFILM-ARRAY-1"
_HEADER_LENGTH = struct.Struct("<Q")
_log = logging.getLogger(__name__)


class ChecksumError(RuntimeError):
    """A source file does not match any known published version (corrupt, truncated or other)."""


class CacheError(RuntimeError):
    """A cache file is damaged, half-written or was built for another source or setting."""


def resolve_data_root(root: str | os.PathLike[str] | None) -> Path:
    """The data root: `root` if given, else env `METAFILM_DATA_ROOT`; a clear error if neither."""
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV)
        if not root:
            raise ValueError(
                f"no data root: pass root=... or set {DATA_ROOT_ENV} to the folder that holds "
                f"the benchmark folders (e.g. <root>/omniglot/images_background.zip)"
            )
    return Path(root).expanduser()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache dir: `cache_dir`, else env `METAFILM_CACHE_DIR`, else ~/.cache/metafilm."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "metafilm"
    return Path(cache_dir).expanduser()


@dataclass(frozen=True)
class KnownVersion:
    """One published version of a file: a label for messages, its size and its digests.

    `digests` maps a hashlib algorithm name ("sha256", "md5") to the lowercase hex digest.
    """

    label: str
    size: int
    digests: Mapping[str, str]


def file_digests(path: str | os.PathLike[str], algorithms: Iterable[str]) -> dict[str, str]:
    """Hex digests of a file for each algorithm, computed in one streaming pass."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            for digest in hashes.values():
                digest.update(chunk)
    return {name: digest.hexdigest() for name, digest in hashes.items()}


def verify_file(
    path: str | os.PathLike[str], versions: Sequence[KnownVersion], *, remedy: str
) -> dict[str, str]:
    """Check that `path` is one of the known `versions`; return its digests (always with sha256).

    A file matches a version when its size and every digest that version lists agree. On no
    match, raise `ChecksumError` naming the file, what was expected, what was found, and `remedy`
    (what the user should do).
    """
    path = Path(path)
    size = path.stat().st_size
    same_size = [version for version in versions if version.size == size]
    if not same_size:
        expected = " or ".join(f"{v.size:,} bytes ({v.label})" for v in versions)
        shortest = min(v.size for v in versions)
        why = "it looks truncated" if size < shortest else "it is not a known version"
        raise ChecksumError(f"{path} is {size:,} bytes, expected {expected}: {why}. {remedy}")
    algorithms = {"sha256"}.union(*(version.digests for version in same_size))
    digests = file_digests(path, sorted(algorithms))
    for version in same_size:
        if all(digests[name] == value for name, value in version.digests.items()):
            return digests
    expected = " or ".join(
        ", ".join(f"{name} {value}" for name, value in v.digests.items()) + f" ({v.label})"
        for v in versions
    )
    found = ", ".join(f"{name} {value}" for name, value in sorted(digests.items()))
    raise ChecksumError(
        f"{path} has {found}; expected {expected}: the file is corrupt or a different "
        f"version. {remedy}"
    )


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temp file next to `path` for binary writing; on success it replaces `path`.

    The data is flushed and fsynced before the rename; on any error the temp file is removed and
    `path` is left as it was. An `OSError` that names no file (a full disk: `ENOSPC`) is raised
    again naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temp, "xb") as file:  # plain open: the file gets the usual umask permissions
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        if error.filename is None or error.filename == str(temp):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_array_cache(
    path: str | os.PathLike[str], array: np.ndarray, header: Mapping[str, Any]
) -> None:
    """Write `array` with a JSON `header` atomically, recording dtype, shape and payload sha256.

    Layout: 16-byte magic, little-endian uint64 header length, UTF-8 JSON header, raw C-order
    payload. `header` must be JSON-serialisable and must not use the keys the cache adds.
    """
    array = np.ascontiguousarray(array)
    reserved = {"dtype", "shape", "payload_sha256"} & set(header)
    if reserved:
        raise ValueError(f"write_array_cache: header keys {sorted(reserved)} are reserved")
    payload = memoryview(array).cast("B")
    full_header = {
        **header,
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    encoded = json.dumps(full_header, sort_keys=True).encode("utf-8")
    with atomic_writer(path) as file:
        file.write(_CACHE_MAGIC)
        file.write(_HEADER_LENGTH.pack(len(encoded)))
        file.write(encoded)
        file.write(payload)
    _log.info(f"cached {list(array.shape)} {array.dtype} ({array.nbytes / 1e6:,.1f} MB) in {path}")


def read_array_cache(
    path: str | os.PathLike[str], expected: Mapping[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a cache written by `write_array_cache`, trusting it only if it is whole and matches.

    Every key of `expected` must be in the header with an equal value (source digest, settings,
    format version), the payload must have exactly the recorded size and sha256. Returns a
    writable array and the header. Raises `FileNotFoundError` if absent, `CacheError` otherwise.
    """
    path = Path(path)
    with open(path, "rb") as file:
        if file.read(len(_CACHE_MAGIC)) != _CACHE_MAGIC:
            raise CacheError(f"{path} is not a metafilm array cache (bad magic)")
        length_bytes = file.read(_HEADER_LENGTH.size)
        if len(length_bytes) != _HEADER_LENGTH.size:
            raise CacheError(f"{path} is truncated inside its header")
        (length,) = _HEADER_LENGTH.unpack(length_bytes)
        size = os.fstat(file.fileno()).st_size
        if length > size - file.tell():
            raise CacheError(
                f"{path} claims a {length:,}-byte header in a {size:,}-byte file (damaged)"
            )
        try:
            header = json.loads(file.read(length).decode("utf-8"))
            dtype = np.dtype(header["dtype"])
            shape = tuple(int(n) for n in header["shape"])
            payload_sha256 = header["payload_sha256"]
        except (ValueError, KeyError, TypeError) as error:
            raise CacheError(f"{path} has an unreadable header ({error})") from error
        # Checked before anything is allocated: a header may claim any shape.
        claimed = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or any(n < 0 for n in shape) or claimed != size - file.tell():
            raise CacheError(
                f"{path} header claims shape {list(shape)} of {dtype} ({claimed:,} bytes) but "
                f"holds {size - file.tell():,} payload bytes (half-written or damaged)"
            )
        mismatched = {key for key, value in expected.items() if header.get(key) != value}
        if mismatched:
            detail = ", ".join(
                f"{key}: cache has {header.get(key)!r}, wanted {expected[key]!r}"
                for key in sorted(mismatched)
            )
            raise CacheError(f"{path} was built for another source or setting ({detail})")
        payload = bytearray(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        received = file.readinto(payload)
        if received != len(payload) or file.read(1):
            raise CacheError(
                f"{path} payload size differs from the recorded {len(payload):,} bytes "
                f"(half-written or damaged)"
            )
    if hashlib.sha256(payload).hexdigest() != payload_sha256:
        raise CacheError(f"{path} payload does not match its recorded sha256 (damaged)")
    return np.frombuffer(payload, dtype=dtype).reshape(shape), header
