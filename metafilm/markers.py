"""Directories metafilm marks as its own, so that it never deletes or overwrites other files.

`metafilm train` writes `.metafilm-run` into a run directory when the run starts, `metafilm report`
writes `.metafilm-report` into its output folder and `metafilm sweep` writes `.metafilm-sweep`.
`--force`, a rewritten report and a resumed sweep act only on a directory that carries the
matching marker, and `--force` deletes only the files a run writes
(`metafilm.rundir.clear_run_dir`, with the helpers here): anything else in the folder is left
where it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

RUN_MARKER = ".metafilm-run"
REPORT_MARKER = ".metafilm-report"
SWEEP_MARKER = ".metafilm-sweep"

_MARKER_TEXT = {
    RUN_MARKER: "a metafilm run directory: 'metafilm train --force' deletes only the files "
    "metafilm wrote here",
    REPORT_MARKER: "a metafilm report: 'metafilm report --out' rewrites only its own files here",
    SWEEP_MARKER: "a metafilm sweep: running the same 'metafilm sweep' again resumes it here",
}

REPORT_FILES = (
    "report.md",
    "report.json",
    "training_curves.png",
    "accuracy.png",
    "film_diagnostics.png",
)
"""Files `metafilm report` writes."""
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")
"""A file `atomic_writer` had not yet renamed when its process was killed."""


def mark(directory: Path, marker: str) -> None:
    """Create `directory` if needed and mark it as metafilm's (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / marker
    if not path.is_file():
        path.write_text(_MARKER_TEXT[marker] + "\n", encoding="utf-8")


def is_marked(directory: Path, marker: str) -> bool:
    """Whether `directory` carries `marker`."""
    return (directory / marker).is_file()


def is_empty_dir(directory: Path) -> bool:
    """Whether `directory` is a folder with nothing in it."""
    return directory.is_dir() and not any(directory.iterdir())


def foreign_folder(out: Path, marker: str, command: str) -> str | None:
    """Why `command` must not write into the folder `out` (None when it may): `out` is a file,
    or it holds files and does not carry `marker`, so something else wrote them."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder; choose another --out"
    if out.is_dir() and not is_marked(out, marker) and not is_empty_dir(out):
        return (
            f"{out} already holds files that {command} did not write (no {marker} marker); "
            f"choose a new --out"
        )
    return None


def remove_files(paths: Iterable[Path]) -> None:
    """Delete each of `paths` that is a file (or a link); leave anything else."""
    for path in paths:
        if path.is_file() or path.is_symlink():
            path.unlink()


def rmdir_if_empty(directory: Path) -> None:
    """Remove `directory` if it is a folder with nothing in it."""
    if is_empty_dir(directory):
        directory.rmdir()


def written_files(
    directory: Path, names: Iterable[str], patterns: Iterable[re.Pattern]
) -> list[Path]:
    """The files in `directory` named in `names` or matching one of `patterns`, with the
    temporary files `atomic_writer` leaves behind when killed."""
    if not directory.is_dir():
        return []
    names, patterns = set(names), [*patterns, _TEMPORARY]
    return [
        path
        for path in directory.iterdir()
        if path.name in names or any(pattern.fullmatch(path.name) for pattern in patterns)
    ]


def clear_report_dir(directory: Path) -> None:
    """Delete what `metafilm report` wrote into a marked `directory` (nothing else)."""
    if not is_marked(directory, REPORT_MARKER):
        return
    remove_files(written_files(directory, REPORT_FILES, ()))
    (directory / REPORT_MARKER).unlink()
    rmdir_if_empty(directory)
