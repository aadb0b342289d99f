"""Checkpoint files that are written atomically, carry their own digest, and load no code.

A checkpoint file is a short header followed by the bytes of `torch.save(payload)`::

    METAFILM-CHECKPOINT-1\\n<64 hex digits: sha256 of the payload bytes>\\n<payload bytes>

It is written to a temporary file in the same folder, fsynced, then renamed over the old one, so a
crash or `kill -9` at any moment leaves either the previous checkpoint or the new one, never a mix.
Loading checks the header and the digest before unpickling, and unpickles with
`torch.load(..., weights_only=True)` (tensors and plain containers only): a damaged, truncated or
foreign file is named in a `CheckpointError`, never loaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from episodes.integrity import atomic_writer, file_digests
from metafilm.errors import CheckpointError

MAGIC = b"METAFILM-CHECKPOINT-1\n"
_DIGEST_LENGTH = 64


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write `payload` (tensors and plain containers) to `path` atomically with its sha256."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    with atomic_writer(path) as file:
        file.write(MAGIC)
        file.write(hashlib.sha256(body).hexdigest().encode("ascii") + b"\n")
        file.write(body)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The payload of a checkpoint written by `save_checkpoint`, after checking its digest."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, expected a .pt file") from None
    start = len(MAGIC) + _DIGEST_LENGTH + 1
    if not data.startswith(MAGIC) or len(data) < start or data[start - 1 : start] != b"\n":
        raise CheckpointError(
            f"checkpoint {path} is not a metafilm checkpoint (no METAFILM-CHECKPOINT header); "
            f"it may be truncated or another program's file"
        )
    recorded = data[len(MAGIC) : start - 1].decode("ascii", errors="replace")
    body = memoryview(data)[start:]
    if hashlib.sha256(body).hexdigest() != recorded:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the sha256 recorded in it "
            f"(damaged or half-copied); restore a good copy, or train the run again "
            f"(metafilm train ... --force)"
        )
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} {_unsafe_reason(error)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict payload")
    return payload


def _unsafe_reason(error: Exception) -> str:
    """Why torch's safe loader refused a payload, in one line of our own (torch's text advises
    loading the file unsafely, which a metafilm checkpoint never needs)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found:
        what = f"refers to the Python object {found.group(1)}"
    else:
        what = f"is not made of tensors and plain containers ({type(error).__name__})"
    return (
        f"cannot be unpickled safely: it {what}, which a metafilm checkpoint never holds; it "
        f"is not loaded. Use a checkpoint metafilm wrote"
    )


def checkpoint_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the whole checkpoint file, as `sha256sum` prints it (for reports)."""
    return file_digests(path, ["sha256"])["sha256"]


def require_keys(payload: dict[str, Any], keys: tuple[str, ...], path: str | os.PathLike) -> None:
    """Raise a `CheckpointError` naming `path` unless `payload` holds every key."""
    missing = [key for key in keys if key not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(missing)}: not this kind of file"
        )


def rng_state() -> dict[str, Any]:
    """The global random states of torch, numpy and Python, in checkpoint-safe types."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global random states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    key = saved["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, saved["pos"], saved["has_gauss"], saved["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
