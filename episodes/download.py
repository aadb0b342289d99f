"""Opt-in download of the original Omniglot release zips: verified, atomic, resumable.

Runs only when asked (`load_omniglot(..., download=True)` or `download_omniglot`). A transfer goes
to `<file>.part`; a broken transfer is resumed with an HTTP Range request on the next attempt; the
finished file is checked against its published size and md5 before it is renamed into place, so a
file under its final name is always complete and verified. Uses only the standard library.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from episodes.integrity import ChecksumError, KnownVersion, resolve_data_root, verify_file

OMNIGLOT_RELEASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"

_CHUNK_BYTES = 1 << 16
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(?:\d+|\*)")
_log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A file could not be fetched (no network, server error); the message says what to do."""


class _Interrupted(Exception):
    """A transfer attempt failed in a way that a later attempt may fix."""


@dataclass(frozen=True)
class RemoteFile:
    """Where a file is published and the published version it must match."""

    url: str
    version: KnownVersion


OMNIGLOT_ORIGINALS: Mapping[str, RemoteFile] = MappingProxyType(
    {
        "images_background.zip": RemoteFile(
            f"{OMNIGLOT_RELEASE_URL}/images_background.zip",
            KnownVersion(
                "original release", 9_464_212, {"md5": "68d2efa1b9178cc56df9314c21c6e718"}
            ),
        ),
        "images_evaluation.zip": RemoteFile(
            f"{OMNIGLOT_RELEASE_URL}/images_evaluation.zip",
            KnownVersion(
                "original release", 6_462_886, {"md5": "6b91aef0f799c5bb55b94e3f2daec811"}
            ),
        ),
    }
)


def fetch_file(
    url: str,
    dest: str | os.PathLike[str],
    version: KnownVersion,
    *,
    attempts: int = 4,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming and retrying, then verify and rename.

    Makes up to `attempts` tries, waiting `backoff_s * 2**k` between them; each try after a broken
    one asks for the missing bytes only (HTTP Range). Raises `DownloadError` when every try fails
    or the server refuses the URL, `ChecksumError` (the `.part` file removed, `dest` untouched) when
    the bytes do not match `version`.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        _log.info("downloading %s -> %s (attempt %d of %d)", url, dest, attempt + 1, attempts)
        try:
            _transfer(url, part, timeout_s)
            break
        except _Interrupted as error:
            failures.append(str(error))
    else:
        raise DownloadError(
            f"could not download {url} after {attempts} attempts: {'; '.join(failures)}"
        )
    try:
        verify_file(
            part,
            [version],
            remedy=f"The download from {url} was removed and nothing was written to {dest}; "
            f"retry later, or place a verified copy at {dest} by hand.",
        )
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    with open(part, "rb+") as file:
        os.fsync(file.fileno())
    os.replace(part, dest)
    return dest


def download_omniglot(
    root: str | os.PathLike[str] | None = None,
    names: Iterable[str] | None = None,
    *,
    files: Mapping[str, RemoteFile] = OMNIGLOT_ORIGINALS,
    attempts: int = 4,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
) -> list[Path]:
    """Fetch the named Omniglot zips (default: all of `files`) missing from `<root>/omniglot/`.

    `root` defaults to env `METAFILM_DATA_ROOT`; `files` maps a file name to where it is published
    (default: the original release in brendenlake/omniglot). Files already present are left as
    they are (the loader verifies them). Returns the paths of all named files. When a download
    fails, the one error lists the exact paths where the files can be placed by hand.
    """
    folder = resolve_data_root(root) / "omniglot"
    names = list(files) if names is None else list(names)
    unknown = [name for name in names if name not in files]
    if unknown:
        raise ValueError(f"unknown Omniglot files {unknown}; known: {sorted(files)}")
    missing = [name for name in names if not (folder / name).exists()]
    for name in missing:
        remote = files[name]
        try:
            fetch_file(
                remote.url,
                folder / name,
                remote.version,
                attempts=attempts,
                timeout_s=timeout_s,
                backoff_s=backoff_s,
            )
        except DownloadError as error:
            placement = "\n".join(
                f"  {folder / other}  <- {files[other].url} ({_describe(files[other].version)})"
                for other in missing
                if not (folder / other).exists()
            )
            raise DownloadError(
                f"{error}\nWithout network access, download these files on another machine and "
                f"place them at exactly these paths:\n{placement}"
            ) from error
    return [folder / name for name in names]


def _describe(version: KnownVersion) -> str:
    digests = ", ".join(f"{name} {value}" for name, value in version.digests.items())
    return f"{version.size:,} bytes, {digests}"


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """One attempt: append the missing bytes to `part` (or restart it); raise if it broke off."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout_s
        )
    except urllib.error.HTTPError as error:
        if error.code == 416:  # the partial file is not a prefix of what is served now
            part.unlink(missing_ok=True)
            raise _Interrupted(f"HTTP 416 when resuming at byte {offset:,}") from error
        if error.code >= 500 or error.code == 429:
            raise _Interrupted(f"HTTP {error.code} {error.reason}") from error
        raise DownloadError(
            f"{url} answered HTTP {error.code} {error.reason}; check the URL"
        ) from error
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise _Interrupted(str(getattr(error, "reason", error))) from error
    with response:
        resumed = response.status == 206
        if resumed:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if offset == 0 or match is None or int(match[1]) != offset:
                part.unlink(missing_ok=True)
                raise _Interrupted(
                    f"asked for bytes from {offset:,}, the server sent another range"
                )
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        try:
            with open(part, "ab" if resumed else "wb") as file:
                while chunk := response.read(_CHUNK_BYTES):
                    file.write(chunk)
        except (http.client.HTTPException, OSError) as error:
            raise _Interrupted(f"transfer broke off: {error}") from error
    received = part.stat().st_size
    if total is not None and received < total:
        raise _Interrupted(f"connection closed at byte {received:,} of {total:,}")
