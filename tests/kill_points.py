"""Kill this process with SIGKILL at a chosen point of training (tests/test_faults.py, in a forked
child): `install(kind, n)` patches the library so that the `n`-th event of `kind` (counted from 1)
ends the process, as `kill -9` would:

- `step-before`, `step-after`: before or after the N-th meta-step's update of the weights;
- `checkpoint-write`: halfway through writing the N-th checkpoint file (before its rename);
- `checkpoint-renamed`: just after the N-th checkpoint file is in place (e.g. `best.pt` written,
  `last.pt` not yet);
- `validation`: after the N-th batch of validation episodes;
- `metrics-row`: halfway through writing the N-th row of `metrics.jsonl`.

The library is patched from outside, here; it has no hooks of its own for this.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

import metafilm.checkpoint
import metafilm.rundir
import metafilm.train


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _counting(n: int) -> Callable[[], bool]:
    """A function that returns True on its `n`-th call."""
    calls = 0

    def nth() -> bool:
        nonlocal calls
        calls += 1
        return calls == n

    return nth


class _HalfWriter:
    """A file that dies once half of what was written to it reached the disk."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.data = file, bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def die_halfway(self) -> None:
        self.file.write(self.data[: len(self.data) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        _die()


def install(kind: str, n: int) -> None:
    """Patch the library so that the `n`-th event of `kind` kills this process."""
    nth = _counting(n)
    if kind in ("step-before", "step-after"):
        meta_step = metafilm.train.meta_step

        def killing_step(*args: Any, **kwargs: Any) -> Any:
            if kind == "step-before" and nth():
                _die()
            result = meta_step(*args, **kwargs)
            if kind == "step-after" and nth():
                _die()
            return result

        metafilm.train.meta_step = killing_step
    elif kind == "checkpoint-write":
        atomic_writer = metafilm.checkpoint.atomic_writer

        @contextlib.contextmanager
        def killing_writer(path: Any) -> Iterator[Any]:
            with atomic_writer(path) as file:
                if not nth():
                    yield file
                    return
                half = _HalfWriter(file)
                yield half
                half.die_halfway()

        metafilm.checkpoint.atomic_writer = killing_writer
    elif kind == "checkpoint-renamed":
        save_checkpoint = metafilm.rundir.save_checkpoint

        def killing_save(*args: Any) -> None:
            save_checkpoint(*args)
            if nth():
                _die()

        metafilm.rundir.save_checkpoint = killing_save
    elif kind == "validation":
        validating = metafilm.train._validating

        def killing_validation(*args: Any) -> None:
            validating(*args)
            if nth():
                _die()

        metafilm.train._validating = killing_validation
    elif kind == "metrics-row":
        row_method = metafilm.rundir.RunWriter.row

        def killing_row(self: metafilm.rundir.RunWriter, row: Any) -> None:
            if not nth():
                return row_method(self, row)
            line = (json.dumps(row) + "\n").encode()
            with open(self.metrics_path, "ab") as file:
                file.write(line[: len(line) // 2])
            _die()

        metafilm.rundir.RunWriter.row = killing_row
    else:
        raise SystemExit(f"unknown kill point {kind!r}")
