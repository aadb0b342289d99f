"""The run directory: every file name in it, and the code that creates, writes and reads it.

A run directory holds::

    .metafilm-run   the marker: metafilm made this folder, so --force may clear what it wrote
    config.toml     the resolved config (every value the run used)
    metrics.jsonl   one JSON row per logged step: the mean of meta_step's metrics over the steps
                    since the previous row, validation accuracy and CI on validation steps,
                    `step` and `wall_time` (seconds of training, summed over resumes)
    last.pt         the latest checkpoint: model, optimiser, step, RNG states, logging window
    best.pt         the checkpoint with the best validation accuracy so far
    backbone.pt     the pretrained backbone (runs that pretrain, and `metafilm pretrain`)
    pretrain.pt     the resumable pretraining checkpoint; pretrain_metrics.jsonl its rows
    tensorboard/    TensorBoard event files, when tensorboard is installed
    eval/           one JSON record per evaluated (split, ways, shots, ...) with per-episode
                    accuracies (`evaluation_record`: its keys are the schema `EVAL_KEYS` requires)
    report/         the default folder of `metafilm report RUN_DIR`

The trainer writes it through `start_run_dir` and a `RunWriter`, the evaluation writes `eval/`
through `write_evaluation`, and the reporter reads it back with `read_run`: the writers and the
reader share this module and never import each other. One job in about 520 lines: every file of
a run directory, written and read in one place, so that names and the record schema cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from episodes.integrity import atomic_writer
from metafilm.checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from metafilm.config import EvalConfig, RunConfig, load_config, to_toml, trajectory_differences
from metafilm.errors import ConfigError, DivergedError, ReportError, RunError
from metafilm.markers import (
    RUN_MARKER,
    clear_report_dir,
    is_marked,
    mark,
    remove_files,
    rmdir_if_empty,
    written_files,
)

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
LAST = "last.pt"
BEST = "best.pt"
BACKBONE = "backbone.pt"
PRETRAIN_CHECKPOINT = "pretrain.pt"
PRETRAIN_METRICS = "pretrain_metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
REPORT_DIR = "report"
RUN_FILES = (
    CONFIG_FILE,
    METRICS_FILE,
    LAST,
    BEST,
    BACKBONE,
    PRETRAIN_CHECKPOINT,
    PRETRAIN_METRICS,
)
"""Files a run directory gets from `metafilm train` / `metafilm pretrain`."""
_EVALUATION = re.compile(r".+_inner\d+_bn[a-z]+\.json")
"""An evaluation file's name (see `test_time_suffix`)."""
_TENSORBOARD = re.compile(r"events\.out\.tfevents\..+")

EVAL_ORDER = (
    "split",
    "ways",
    "shots",
    "checkpoint",
    "query",
    "episodes",
    "episode_seed",
    "inner_steps_test",
)
"""How evaluations of a run are listed."""
EVAL_KEYS = (
    *EVAL_ORDER,
    "dataset",
    "inner_steps_train",
    "train_ways",
    "train_shots",
    "bn_mode",
    "backbone",
    "width",
    "film_sites",
    "checkpoint_step",
    "checkpoint_sha256",
    "accuracies",
)
"""What every evaluation record holds (`evaluation_record` writes it; `read_run` requires it)."""
LAKE_SPLIT = "lake-runs"
"""The `split` of a Lake et al. evaluation record."""

WEIGHT_BOUND = 1e4
"""No weight or floating-point buffer of a good checkpoint is this large in magnitude: a healthy
model's weights stay far below it (Adam moves each by about `outer.lr` per step), a diverging
model's pass it before or when its loss stops being finite."""
GOOD_CHECKPOINT = (
    f"a good checkpoint is one whose step had a finite loss and all of whose weights are finite "
    f"and below {WEIGHT_BOUND:g} in magnitude"
)
"""The rule that decides which checkpoint a diverged run keeps (stated in the error)."""

log = logging.getLogger(__name__)


# --- creating and checking a run directory ---------------------------------------------------


def read_run_config(run_dir: Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a metafilm run directory (no {CONFIG_FILE})")
    return load_config(path)


def check_run_dir(run_dir: Path, config: RunConfig, *, resume: bool, force: bool) -> None:
    """Refuse, before any work, a run directory that cannot be used as asked. Changes nothing.

    `--force` starts over only in a directory that metafilm marked as a run of its own when the
    run started (`RUN_MARKER`); it then deletes only what metafilm wrote there (`clear_run_dir`).
    """
    if resume and force:
        raise RunError("--resume continues a run and --force starts it over: pass only one")
    existing = next(path for path in (run_dir, *run_dir.parents) if path.exists())
    if existing == run_dir and not run_dir.is_dir():
        raise RunError(f"--out {run_dir} is a file, not a run directory; choose another --out")
    if existing != run_dir and not existing.is_dir():
        raise RunError(f"cannot create {run_dir}: {existing} is a file; choose another --out")
    marked = is_marked(run_dir, RUN_MARKER)
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise RunError(
                f"nothing to resume: {run_dir} has no {CONFIG_FILE}; start without --resume"
            )
        differences = trajectory_differences(read_run_config(run_dir), config)
        if differences:
            start_over = "--force to start over" if marked else "delete it to start over"
            raise RunError(
                f"cannot resume {run_dir} with another config ({'; '.join(differences)}); only "
                f"train.steps and data paths may change. Use the saved {run_dir / CONFIG_FILE}, "
                f"a new --out, or {start_over}"
            )
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / CONFIG_FILE).is_file() and not marked:
            raise RunError(
                f"{run_dir} exists and is not a metafilm run directory; choose another --out "
                f"(--force only replaces run directories metafilm created)"
            )
        if not force:
            raise RunError(
                f"run directory {run_dir} already exists; pass --resume to continue it or "
                + ("--force to start it over" if marked else "choose another --out")
            )
        if not marked:
            raise RunError(
                f"{run_dir} was not created by metafilm train (no {RUN_MARKER} marker), so "
                f"--force deletes nothing in it; choose another --out, or delete it yourself"
            )


def start_run_dir(run_dir: Path, config: RunConfig, *, resume: bool) -> None:
    """Create (or, after `check_run_dir` allowed it, clear of what metafilm wrote) the run
    directory, mark it as a metafilm run (`RUN_MARKER`) and save the config. Resuming removes
    the temporary files of writes that a killed process left unfinished."""
    if resume:
        remove_files(written_files(run_dir, (), ()))
    if not resume and is_marked(run_dir, RUN_MARKER):
        kept = clear_run_dir(run_dir)
        if kept:
            names = ", ".join(path.name for path in kept[:5]) + (" ..." if len(kept) > 5 else "")
            log.info(f"--force kept what metafilm did not write in {run_dir}: {names}")
    mark(run_dir, RUN_MARKER)
    with atomic_writer(run_dir / CONFIG_FILE) as file:
        file.write(to_toml(config).encode("utf-8"))


def clear_run_dir(directory: Path) -> list[Path]:
    """Delete what metafilm wrote into the marked run `directory`: its config, metrics,
    checkpoints, TensorBoard events, evaluations, default report and the marker itself. Return
    what is left, which metafilm did not write."""
    remove_files(written_files(directory, RUN_FILES, ()))
    board = directory / TENSORBOARD_DIR
    stages = [path for path in board.glob("*") if path.is_dir()]  # e.g. pretraining's events
    for folder in [*stages, board]:
        remove_files(written_files(folder, (), (_TENSORBOARD,)))
        rmdir_if_empty(folder)
    remove_files(written_files(directory / EVAL_DIR, (), (_EVALUATION,)))
    rmdir_if_empty(directory / EVAL_DIR)
    clear_report_dir(directory / REPORT_DIR)
    (directory / RUN_MARKER).unlink(missing_ok=True)
    return sorted(directory.iterdir())


def resolve_checkpoint(source: str | Path, which: str = "auto") -> Path:
    """The checkpoint file meant by a run directory or a file path.

    For a run directory: `best` is best.pt, `last` is last.pt, `auto` is best.pt if the run
    validated, else last.pt.
    """
    source = Path(source)
    if not source.exists():
        raise RunError(f"{source} does not exist: give a run directory or a checkpoint file")
    if source.is_file():
        return source
    names = {"best": [BEST], "last": [LAST], "auto": [BEST, LAST]}[which]
    for name in names:
        if (source / name).is_file():
            return source / name
    raise RunError(f"{source} has no {' or '.join(names)}: train it first")


# --- what a training run writes ---------------------------------------------------------------


def _bad_weight(state: Mapping[str, torch.Tensor]) -> str | None:
    """What breaks `GOOD_CHECKPOINT` in a model state (None if nothing does)."""
    for name, tensor in state.items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel()):
            continue
        largest = float(tensor.detach().abs().max())
        if not math.isfinite(largest) or largest >= WEIGHT_BOUND:
            return f"weight {name} reached magnitude {largest:.3g} (the bound is {WEIGHT_BOUND:g})"
    return None


def kept_checkpoint(run_dir: Path, saved_step: int | None) -> str:
    """What a diverged run keeps, with the rule that makes it good, and the checkpoint chosen by
    validation if there is one (good by that rule, and measured)."""
    if saved_step is None:
        kept = f"no checkpoint was written yet ({GOOD_CHECKPOINT})"
    else:
        kept = (
            f"the last good checkpoint {run_dir / LAST} (step {saved_step}) is kept "
            f"({GOOD_CHECKPOINT})"
        )
    if (run_dir / BEST).is_file():
        best = load_checkpoint(run_dir / BEST)
        kept += (
            f"; so is {run_dir / BEST} (step {best['step']}), the best on validation "
            f"({100 * best['best']:.2f}%)"
        )
    return kept


class RunWriter:
    """Everything a training run writes: metrics rows, TensorBoard events, checkpoints.

    In a distributed run only rank 0 owns one.
    """

    def __init__(self, run_dir: Path, resume_step: int, metrics_name: str = METRICS_FILE) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / metrics_name
        truncate_metrics(self.metrics_path, resume_step)
        board = run_dir / TENSORBOARD_DIR
        if metrics_name != METRICS_FILE:  # another stage (pretraining): its own event files
            board = board / Path(metrics_name).stem
        self.tensorboard = _tensorboard_writer(board, resume_step + 1)
        self.last_good: int | None = None
        """The step of the last training checkpoint written as `last.pt`, once known."""

    def row(self, row: Mapping[str, Any]) -> None:
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as file:
                file.write(json.dumps(row) + "\n")
                file.flush()
        except OSError as error:  # a full disk names no file: name it
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror, str(self.metrics_path)) from error
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.tensorboard.add_scalar(key, value, row["step"])

    def checkpoint(self, name: str, payload: dict[str, Any]) -> None:
        """Write a checkpoint; a training checkpoint only if its weights are good
        (`GOOD_CHECKPOINT`), else the run stops as diverged and the last good one is kept."""
        if payload.get("kind") == "train":
            if self.last_good is None and (self.run_dir / LAST).is_file():
                self.last_good = load_checkpoint(self.run_dir / LAST)["step"]
            bad = _bad_weight(payload["model"])
            if bad is not None:
                raise DivergedError(
                    f"training diverged at step {payload['step']}: {bad}; "
                    f"{kept_checkpoint(self.run_dir, self.last_good)}. Lower adapt.inner_lr or "
                    f"outer.lr and start over with --force"
                )
        save_checkpoint(self.run_dir / name, payload)
        if name == LAST and payload.get("kind") == "train":
            self.last_good = payload["step"]

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` (a half-written last line, from a kill, is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the rows of `metrics.jsonl` up to `step` (and drop a half-written last line)."""
    if not path.exists():
        return
    rows = [row for row in read_metrics(path) if row.get("step", math.inf) <= step]
    with atomic_writer(path) as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows).encode("utf-8"))


def _tensorboard_writer(log_dir: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info(
            "info: tensorboard is not installed, so no TensorBoard event files are written "
            "(pip install 'metafilm[tensorboard]' to get them)"
        )
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


# --- evaluation records ------------------------------------------------------------------------


def test_time_suffix(settings: EvalConfig) -> str:
    """The part of an evaluation's file name that the test-time model settings fix."""
    return f"inner{settings.inner_steps}_bn{settings.bn_mode}.json"


def evaluation_name(checkpoint: Path, ways: int, shots: int, settings: EvalConfig) -> str:
    """File name of one evaluation: every protocol setting that changes the numbers (a chosen
    set of alphabets appears as its count and a short hash of its names)."""
    classes = settings.split
    if settings.alphabets is not None:
        names = "\n".join(sorted(settings.alphabets)).encode("utf-8")
        digest = hashlib.sha256(names).hexdigest()[:8]
        classes += f"-{len(settings.alphabets)}alphabets-{digest}"
    if settings.within_alphabet:
        classes += "-within"
    return (
        f"{checkpoint.stem}_{classes}_{ways}w{shots}s_q{settings.query}"
        f"_n{settings.episodes}_seed{settings.seed}_{test_time_suffix(settings)}"
    )


def lake_evaluation_name(checkpoint: Path, settings: EvalConfig) -> str:
    """File name of the evaluation of `checkpoint` on Lake et al.'s runs."""
    return f"{checkpoint.stem}_{LAKE_SPLIT}_{test_time_suffix(settings)}"


def software_versions() -> dict[str, str]:
    """What computed a result: Python, torch and numpy, and metafilm itself."""
    from metafilm import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "metafilm": __version__,
    }


def evaluation_record(
    config: RunConfig,
    protocol: Mapping[str, Any],
    accuracies: Sequence[float],
    *,
    film_sites: Sequence[str],
    checkpoint: str,
    checkpoint_step: int,
    checkpoint_sha256: str,
) -> dict[str, Any]:
    """The content of an evaluation file: `protocol` (split, ways, shots, query, episodes,
    episode_seed, ...), the run's own settings from `config` (with the evaluation's [eval]), the
    model's FiLM sites, the checkpoint (file name, step, sha256) and the per-episode
    `accuracies`."""
    return {
        "dataset": config.data.dataset,
        "image_size": config.data.image_size,
        **protocol,
        "inner_steps_train": config.adapt.inner_steps,
        "inner_steps_test": config.eval.inner_steps,
        "inner_lr": config.adapt.inner_lr,
        "train_ways": config.data.ways,
        "train_shots": config.data.shots,
        "train_query": config.data.query,
        "bn_mode": config.model.bn_mode,
        "bn_mode_test": config.eval.bn_mode,
        "transductive_bn": config.eval.bn_mode == "episode",
        "backbone": config.model.backbone,
        "width": config.model.width,
        "backbone_mode": config.model.backbone_mode,
        "film_sites": list(film_sites),
        "encoder": config.model.encoder,
        "head": config.model.head,
        "precision": "float64",
        "versions": software_versions(),
        "checkpoint": checkpoint,
        "checkpoint_step": checkpoint_step,
        "checkpoint_sha256": checkpoint_sha256,
        "accuracies": list(accuracies),
    }


def evaluation_path(checkpoint: Path, name: str) -> Path:
    """Where the evaluation file `name` of `checkpoint` lives: its run's eval folder."""
    return checkpoint.parent / EVAL_DIR / name


def write_evaluation(path: Path, record: Mapping[str, Any]) -> Path:
    """Write an evaluation record (`evaluation_record`) to `path` atomically; return `path`."""
    with atomic_writer(path) as file:
        file.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))
    return path


def holds_evaluation(path: Path, expected: Mapping[str, Any]) -> bool:
    """Whether the evaluation file `path` exists and was computed exactly as `expected` (a record
    without accuracies) says: every field of it (checkpoint sha256, split, ways, shots, query,
    episodes, seed, alphabets, inner steps, batch norm, ...) equal, one accuracy per episode. The
    software versions may differ (float64 results do not depend on them)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    same = json.loads(json.dumps(expected))  # tuples as lists, as the file has them
    fields = [key for key in same if key not in ("versions", "accuracies")]
    accuracies = saved.get("accuracies") if isinstance(saved, dict) else None
    return (
        isinstance(accuracies, list)
        and len(accuracies) == same.get("episodes")
        and all(saved.get(key) == same[key] for key in fields)
    )


def bn_mode_tested(evaluation: Mapping[str, Any]) -> str:
    """The batch norm an evaluation tested with (records written before `bn_mode_test` existed
    always tested with the model's own mode)."""
    return evaluation.get("bn_mode_test", evaluation["bn_mode"])


# --- reading a run back ------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """What one run directory saved."""

    name: str
    path: Path
    config: RunConfig
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    stale: tuple[Path, ...] = ()
    """Evaluation files of an earlier checkpoint of the same name (its sha256 differs from the
    file's now): left out of `evaluations`."""


def read_run(path: str | os.PathLike[str]) -> RunFiles:
    """Load a run directory's config, metrics and evaluations."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run directory {path} does not exist")
    try:
        config = load_config(path / CONFIG_FILE)
    except ConfigError as error:
        raise ReportError(f"{path} is not a usable run directory: {error}") from None
    evaluations: list[dict[str, Any]] = []
    stale: list[Path] = []
    digests: dict[str, str | None] = {}
    for file in sorted((path / EVAL_DIR).glob("*.json")):
        try:
            evaluation = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ReportError(f"evaluation file {file} is not valid JSON: {error}") from None
        missing = [key for key in EVAL_KEYS if key not in evaluation]
        if missing:
            raise ReportError(
                f"evaluation file {file} lacks {', '.join(missing)}: not written by "
                f"metafilm evaluate (run it again)"
            )
        if not isinstance(evaluation["accuracies"], list) or not evaluation["accuracies"]:
            raise ReportError(
                f"evaluation file {file} holds no per-episode accuracies: not written by "
                f"metafilm evaluate (delete it and evaluate again)"
            )
        name = str(evaluation["checkpoint"])
        if name not in digests:
            checkpoint = path / name
            digests[name] = checkpoint_sha256(checkpoint) if checkpoint.is_file() else None
        if digests[name] not in (None, evaluation["checkpoint_sha256"]):
            stale.append(file)
            continue
        evaluations.append(evaluation)
    if stale:
        log.warning(
            f"warning: {len(stale)} evaluation file(s) of {path} were computed on an earlier "
            f"checkpoint of the same name and are left out (e.g. {stale[0].name}); run metafilm "
            f"evaluate again"
        )
    evaluations.sort(key=lambda e: (*(e[key] for key in EVAL_ORDER), bn_mode_tested(e)))
    metrics = read_metrics(path / METRICS_FILE)
    return RunFiles(path.name, path, config, metrics, evaluations, tuple(stale))
