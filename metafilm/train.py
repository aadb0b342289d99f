"""The outer loop as a library: run directory, data, validation, checkpoints, logs, exact resume.

A run directory holds::

    config.toml     the resolved config (every value the run used)
    metrics.jsonl   one JSON row per logged step: the mean of meta_step's metrics over the steps
                    since the previous row, validation accuracy and CI on validation steps,
                    `step` and `wall_time` (seconds of training, summed over resumes)
    last.pt         the latest checkpoint: model, optimiser, step, RNG states, logging window
    best.pt         the checkpoint with the best validation accuracy so far
    backbone.pt     the pretrained backbone (frozen-backbone runs only)
    tensorboard/    TensorBoard event files, when tensorboard is installed
    eval/           one JSON per evaluated (split, ways, shots, ...) with per-episode accuracies

Exact resume: training task `j` of step `s` is a function of `(seed, s, j)` (`EpisodeSampler`), so
a checkpoint needs only the step counter beside the weights, the optimiser and the global RNG
states. On resume `metrics.jsonl` is cut back to the checkpoint's step, and the run continues to
the same final weights, bit for bit, as an uninterrupted one.

Frozen backbone (`model.backbone_mode = "frozen"`): `train` first pretrains the backbone by plain
classification over the training classes and keeps it as `backbone.pt` in the run directory, unless
`pretrain.backbone` names a file written by `pretrain_run` (`metafilm pretrain`) to start from.
Pretraining is checkpointed once, at its end: a run killed during pretraining pretrains again on
resume (deterministically, so the result is the same); one killed later reuses `backbone.pt`.

Distributed (`torchrun`, see `metafilm.distributed` and docs/distributed.md): the same loop in
every process. Each draws its own `task_slice` of the step's meta-batch from the same stateless
sampler; the meta-gradients are averaged over the processes before clipping and the update, the
logged metrics are averaged too, and each process validates its share of the fixed episodes. The
processes start from rank 0's weights and so stay identical. Rank 0 alone owns a `RunWriter`
and changes the run directory; every process reads the same checkpoint to resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from episodes.classes import ClassImages, channel_statistics
from episodes.folder import load_folder
from episodes.integrity import CacheError, ChecksumError, atomic_writer, resolve_cache_dir
from episodes.lake import load_lake_runs
from episodes.miniimagenet import load_miniimagenet
from episodes.omniglot import load_omniglot
from episodes.photo import PhotoAugmentation
from episodes.sampler import Episode, EpisodeSampler, FixedEpisodes
from metafilm.backbones import RUNNING_BUFFERS
from metafilm.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    require_keys,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metafilm.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    RunConfig,
    config_from_dict,
    config_hash,
    config_to_dict,
    episodes_fitting,
    load_config,
    to_toml,
    trajectory_differences,
)
from metafilm.distributed import SINGLE_PROCESS, Distributed, DistributedError
from metafilm.learner import FiLMLearner
from metafilm.markers import RUN_MARKER, clear_run_dir, is_marked, mark
from metafilm.meta import (
    Auxiliary,
    auxiliary_weight,
    evaluate,
    evaluate_exact,
    input_builder,
    learning_rate,
    make_optimizer,
    meta_step,
    set_learning_rate,
)
from metafilm.prefix_cache import prefix_store
from metafilm.pretrain import (
    PretrainState,
    Validation,
    auxiliary_batch,
    make_classifier,
    pretrain_backbone,
    pretrain_lr,
    total_steps,
)
from metafilm.report import (
    BEST,
    CONFIG_FILE,
    EVAL_DIR,
    LAST,
    METRICS_FILE,
    accuracy_summary,
    read_metrics,
)
from metafilm.specs import AdaptSpec, BatchNormMode

BACKBONE = "backbone.pt"
PRETRAIN_CHECKPOINT = "pretrain.pt"
PRETRAIN_METRICS = "pretrain_metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_BATCH = 50
"""Fixed episodes gathered per batch in evaluation (memory only; results do not depend on it)."""

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists, nothing to resume, other config)."""


class DataError(RuntimeError):
    """A dataset split that cannot be loaded (missing, corrupt, misplaced files)."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


USER_ERRORS = (ConfigError, CheckpointError, RunError, DataError, DivergedError, DistributedError)
"""What a user's input (config, files, data) can cause; the CLI reports them in one line."""


class Progress(Protocol):
    """Where training reports its progress (the CLI's progress bar)."""

    def start(self, phase: str, done: int, total: int) -> None: ...

    def update(self, done: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def load_split(
    data: DataConfig, split: str, alphabets: tuple[str, ...] | None = None
) -> ClassImages:
    """One split of the configured dataset (for Omniglot, only `alphabets` of it if given); any
    problem with the files is a `DataError`."""
    root = data.root or None
    cache_dir = data.cache_dir or None
    try:
        if data.dataset == "omniglot":
            return load_omniglot(
                root, split, image_size=data.image_size, cache_dir=cache_dir, alphabets=alphabets
            )
        if data.dataset == "folder":
            return load_folder(
                data.root,
                split,
                image_size=data.image_size,
                channels=data.channels,
                class_lists=data.class_lists or None,
                fractions=data.split_fractions,
                seed=data.split_seed,
                cache_dir=cache_dir,
            )
        return load_miniimagenet(
            root, split, format=data.format, image_size=data.image_size, cache_dir=cache_dir
        )
    except (FileNotFoundError, ValueError, ChecksumError, CacheError) as error:
        raise DataError(f"cannot load {data.dataset} split {split!r}: {error}") from None


AUGMENTATIONS = (
    "augment_rotations",
    "augment_affine",
    "augment_crop_padding",
    "augment_flip",
    "augment_jitter",
)
"""The `[data]` settings that change training images as they are drawn."""


def build_learner(config: RunConfig) -> FiLMLearner:
    """The learner a config describes; settings the model rejects become a `ConfigError`."""
    try:
        learner = FiLMLearner(config.model, config.adapt)
    except ValueError as error:
        raise ConfigError(f"[model] / [adapt] settings rejected: {error}") from None
    augmenting = [f"data.{name}" for name in AUGMENTATIONS if getattr(config.data, name)]
    if augmenting and learner.caches_prefix:
        raise ConfigError(
            f"{' and '.join(augmenting)} change training images, but a frozen backbone with "
            "running batch norm and no FiLM site in block 1 computes its first blocks once per "
            "image: turn the augmentation off (pretrain with it by 'metafilm pretrain' and pass "
            "pretrain.backbone), or use FiLM in block 1 or bn_mode 'episode'"
        )
    return learner


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and Python generators (model initialisation)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def read_run_config(run_dir: Path) -> RunConfig:
    """The resolved config saved in a run directory."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} is not a metafilm run directory (no {CONFIG_FILE})")
    return load_config(path)


def check_run_dir(run_dir: Path, config: RunConfig, *, resume: bool, force: bool) -> None:
    """Refuse, before any work, a run directory that cannot be used as asked. Changes nothing.

    `--force` starts over only in a directory that metafilm marked as a run of its own when the
    run started (`metafilm.markers.RUN_MARKER`); it then deletes only what metafilm wrote there.
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
    directory, mark it as a metafilm run (`RUN_MARKER`) and save the config."""
    if not resume and is_marked(run_dir, RUN_MARKER):
        kept = clear_run_dir(run_dir)
        if kept:
            names = ", ".join(path.name for path in kept[:5]) + (" ..." if len(kept) > 5 else "")
            log.info(f"--force kept what metafilm did not write in {run_dir}: {names}")
    mark(run_dir, RUN_MARKER)
    with atomic_writer(run_dir / CONFIG_FILE) as file:
        file.write(to_toml(config).encode("utf-8"))


@dataclass
class LogWindow:
    """Sums of the training metrics since the last logged row (saved in checkpoints, so a resumed
    run logs the same means)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def flush(self) -> dict[str, float]:
        means = {key: total / self.count for key, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


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
                    f"{_kept(self.run_dir, self.last_good)}. Lower adapt.inner_lr or outer.lr "
                    f"and start over with --force"
                )
        save_checkpoint(self.run_dir / name, payload)
        if name == LAST and payload.get("kind") == "train":
            self.last_good = payload["step"]

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


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


def fixed_batches(
    source: FixedEpisodes,
    build: Callable[[Any], Episode],
    size: int = EVAL_BATCH,
    episodes: range | None = None,
) -> Iterator[Episode]:
    """The fixed episodes (all, or those numbered in `episodes`) as model inputs, `size` tasks at
    a time."""
    numbers = range(len(source)) if episodes is None else episodes
    return (build(source.take(numbers[i : i + size])) for i in range(0, len(numbers), size))


def validate(
    learner: FiLMLearner,
    source: FixedEpisodes,
    build: Callable[[Any], Episode],
    adapt: AdaptSpec,
    processes: Distributed = SINGLE_PROCESS,
) -> np.ndarray:
    """Accuracy on every fixed validation episode, in order; each process evaluates its share."""
    mine = evaluate(
        learner, fixed_batches(source, build, episodes=processes.shard(len(source))), adapt
    )
    return processes.gather_shards(mine, len(source))


def photo_augmentation(data: DataConfig) -> PhotoAugmentation:
    """The photo augmentation of training images that `[data]` describes."""
    return PhotoAugmentation(data.augment_crop_padding, data.augment_flip, data.augment_jitter)


def _standardise_inputs(learner: FiLMLearner, config: RunConfig, classes: ClassImages) -> None:
    """With `data.normalize`, give the backbone the training split's per-channel statistics
    (they travel with its weights in every checkpoint and backbone file)."""
    if not config.data.normalize:
        return
    mean, std = channel_statistics(classes.images)
    learner.backbone.set_input_statistics(mean, std)
    shown = ", ".join(f"{m:.4f} / {s:.4f}" for m, s in zip(mean, std, strict=True))
    log.info(f"input normalisation, mean / std per channel of {config.data.train_split}: {shown}")


def _pretrain_payload(
    learner: FiLMLearner, config: RunConfig, state: PretrainState, window: LogWindow
) -> dict[str, Any]:
    """The resumable pretraining checkpoint (`pretrain.pt`)."""
    return {
        "kind": "pretrain",
        "config_hash": config_hash(config),
        "backbone": learner.backbone.state_dict(),
        **dataclasses.asdict(state),
        "window": {"sums": dict(window.sums), "count": window.count},
    }


def _pretrain_resume(
    learner: FiLMLearner, config: RunConfig, path: Path
) -> tuple[PretrainState, LogWindow] | None:
    """The pretraining checkpoint `path` loaded into `learner.backbone` (None if absent)."""
    if not path.is_file():
        return None
    payload = load_checkpoint(path)
    names = [f.name for f in dataclasses.fields(PretrainState)]
    require_keys(payload, ("kind", "config_hash", "backbone", "window", *names), path)
    if payload["kind"] != "pretrain" or payload["config_hash"] != config_hash(config):
        raise CheckpointError(
            f"{path} was not written by pretraining with this config; use the run's own "
            f"{CONFIG_FILE} or start over with --force"
        )
    learner.backbone.load_state_dict(payload["backbone"])
    log.info(f"resuming pretraining from step {payload['step']} ({path})")
    window = LogWindow(dict(payload["window"]["sums"]), payload["window"]["count"])
    return PretrainState(**{name: payload[name] for name in names}), window


def pretrain(
    config: RunConfig,
    learner: FiLMLearner,
    sources: _Sources,
    run_dir: Path,
    progress: Progress | None = None,
    *,
    write: bool = True,
) -> dict[str, Any]:
    """Pretrain `learner.backbone` in place (`metafilm.pretrain`), continuing from
    `run_dir/pretrain.pt` if an earlier attempt wrote it; return the backbone file's payload.

    With `write`, checkpoints go to `pretrain.pt` every `pretrain.checkpoint_every` steps and
    rows (mean loss and accuracy since the last row, learning rate, validation accuracy) to
    `pretrain_metrics.jsonl` every `train.log_every` steps.
    """
    settings, classes = config.pretrain, sources.train_classes
    total = total_steps(settings, len(classes.images))
    resumed = _pretrain_resume(learner, config, run_dir / PRETRAIN_CHECKPOINT)
    state, window = resumed if resumed is not None else (None, LogWindow())
    done = 0 if state is None else state.step
    writer = RunWriter(run_dir, done, PRETRAIN_METRICS) if write else None
    validation = None
    if settings.val_every and sources.validation is not None:
        validation = Validation(sources.val_classes, sources.validation)
    pending: dict[str, Any] = {}
    if progress is not None:
        progress.start("pretrain", done, total)

    def on_step(step: int, loss: float, accuracy: float) -> None:
        if not math.isfinite(loss):
            raise DivergedError(
                f"pretraining loss became {loss} at step {step + 1}; lower pretrain.lr"
            )
        window.add({"loss": loss, "accuracy": accuracy})
        if (step + 1) % config.train.log_every == 0 or step + 1 == total:
            pending.update(window.flush(), lr=pretrain_lr(settings, step, total))
        if progress is not None:
            progress.update(step + 1, {"loss": loss, "accuracy": accuracy})

    def on_validation(step: int, accuracies: np.ndarray) -> None:
        summary = accuracy_summary(accuracies)
        pending.update(val_accuracy=summary["mean"], val_ci95=summary["ci95"])

    def on_checkpoint(now: PretrainState) -> None:
        if writer is not None:
            writer.checkpoint(PRETRAIN_CHECKPOINT, _pretrain_payload(learner, config, now, window))

    def on_step_end(now: PretrainState) -> None:
        if pending and writer is not None:
            writer.row({"step": now.step, "wall_time": round(now.wall_time, 3), **pending})
        pending.clear()

    try:
        state = pretrain_backbone(
            learner.backbone,
            classes,
            settings,
            seed=config.train.seed,
            photo=photo_augmentation(config.data),
            validation=validation,
            resume=state,
            on_step=on_step,
            on_validation=on_validation,
            on_step_end=on_step_end,
            on_checkpoint=on_checkpoint,
            clock=time.perf_counter,
        )
    finally:
        if writer is not None:
            writer.close()
        if progress is not None:
            progress.close()
    return {
        "kind": "backbone",
        "backbone": learner.backbone.state_dict(),
        "config": config_to_dict(config),
        "pretrain": {
            "steps": state.step,
            "best_val_accuracy": state.best,
            "best_step": state.best_step,
            "wall_time": state.wall_time,
        },
    }


def load_backbone(learner: FiLMLearner, path: Path) -> None:
    """Load a backbone file written by `pretrain` into `learner.backbone`."""
    payload = load_checkpoint(path)
    require_keys(payload, ("kind", "backbone"), path)
    if payload["kind"] != "backbone":
        raise CheckpointError(f"{path} is a {payload['kind']} checkpoint, not a backbone file")
    try:
        learner.backbone.load_state_dict(payload["backbone"])
    except RuntimeError as error:
        raise CheckpointError(
            f"backbone file {path} does not fit model {learner.model_spec.backbone} of width "
            f"{learner.model_spec.width} (normalize = {learner.model_spec.normalize}): {error}"
        ) from None


def _pretrain_into_run(
    config: RunConfig,
    learner: FiLMLearner,
    run_dir: Path,
    sources: _Sources,
    progress: Progress | None,
    *,
    write: bool,
) -> None:
    """The run's own pretrained backbone: `backbone.pt` if an earlier attempt wrote it, else
    pretrain now (resuming from `pretrain.pt`) and, if `write`, write it."""
    own = run_dir / BACKBONE
    if own.is_file():
        log.info(f"using the pretrained backbone {own}")
        load_backbone(learner, own)
    else:
        payload = pretrain(config, learner, sources, run_dir, progress, write=write)
        if write:
            save_checkpoint(own, payload)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run stands."""

    run_dir: Path
    step: int
    best_val_accuracy: float | None


@dataclass(frozen=True)
class _Sources:
    """The loaded training data: the split, its sampler, and the fixed validation episodes."""

    train_classes: ClassImages
    sampler: EpisodeSampler
    val_classes: ClassImages | None
    validation: FixedEpisodes | None


def _load_sources(config: RunConfig) -> _Sources:
    """Load the splits and check the episode shapes against them (before any work)."""
    data, settings = config.data, config.train
    what = "data.ways / data.shots / data.query"
    train_classes = load_split(data, data.train_split, data.train_alphabets)
    sampler = episodes_fitting(
        what,
        data.train_split,
        lambda: EpisodeSampler(
            train_classes,
            data.ways,
            data.shots,
            data.query,
            seed=settings.seed,
            augment_rotations=data.augment_rotations,
            within_alphabet=data.within_alphabet,
            augment_affine=data.augment_affine,
            photo=photo_augmentation(data),
        ),
    )
    pretrain_validates = config.pretrain.enabled and config.pretrain.val_every > 0
    if not settings.val_every and not pretrain_validates:
        return _Sources(train_classes, sampler, None, None)
    val_classes = load_split(data, data.val_split, data.val_alphabets)
    validation = episodes_fitting(
        what,
        data.val_split,
        lambda: FixedEpisodes(
            val_classes,
            data.ways,
            data.shots,
            data.query,
            seed=settings.val_seed,
            episodes=settings.val_episodes,
            within_alphabet=data.within_alphabet,
        ),
    )
    return _Sources(train_classes, sampler, val_classes, validation)


WEIGHT_BOUND = 1e4
"""No weight or floating-point buffer of a good checkpoint is this large in magnitude: a healthy
model's weights stay far below it (Adam moves each by about `outer.lr` per step), a diverging
model's pass it before or when its loss stops being finite."""
GOOD_CHECKPOINT = (
    f"a good checkpoint is one whose step had a finite loss and all of whose weights are finite "
    f"and below {WEIGHT_BOUND:g} in magnitude"
)
"""The rule that decides which checkpoint a diverged run keeps (stated in the error)."""


def _bad_weight(state: Mapping[str, torch.Tensor]) -> str | None:
    """What breaks `GOOD_CHECKPOINT` in a model state (None if nothing does)."""
    for name, tensor in state.items():
        if not (torch.is_tensor(tensor) and tensor.is_floating_point() and tensor.numel()):
            continue
        largest = float(tensor.detach().abs().max())
        if not math.isfinite(largest) or largest >= WEIGHT_BOUND:
            return f"weight {name} reached magnitude {largest:.3g} (the bound is {WEIGHT_BOUND:g})"
    return None


def _kept(run_dir: Path, saved_step: int | None) -> str:
    """What a diverged run keeps, with the rule that makes it good."""
    if saved_step is None:
        return f"no checkpoint was written yet ({GOOD_CHECKPOINT})"
    return (
        f"the last good checkpoint {run_dir / LAST} (step {saved_step}) is kept ({GOOD_CHECKPOINT})"
    )


def _divergence(
    step: int, metrics: Mapping[str, float], run_dir: Path, saved_step: int | None
) -> DivergedError | None:
    """The error for a step whose metrics are not all finite (None if they are)."""
    bad = [key for key, value in metrics.items() if not math.isfinite(value)]
    if not bad:
        return None
    first = "loss" if "loss" in bad else bad[0]
    more = f" (and {len(bad) - 1} more metrics not finite)" if len(bad) > 1 else ""
    return DivergedError(
        f"training diverged at step {step}: {first} = {metrics[first]}{more}; "
        f"{_kept(run_dir, saved_step)}. Lower adapt.inner_lr or outer.lr and start over with "
        f"--force"
    )


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    processes: Distributed = SINGLE_PROCESS,
) -> TrainResult:
    """Meta-train as `config` says into `run_dir` (see the module docstring), as one process of
    `processes` (give `progress` to rank 0 only).

    Everything is checked before the run directory changes: the split of the meta-batch over the
    processes, the run directory, the data (split sizes against the episode shapes), the model
    settings, the checkpoint to resume from.
    """
    run_dir = Path(run_dir)
    task_slice = processes.task_slice(config.outer.meta_batch_size)
    check_run_dir(run_dir, config, resume=resume, force=force)
    sources = _load_sources(config)
    seed_everything(config.train.seed)
    learner = build_learner(config)
    checkpoint = _resume_payload(run_dir, config) if resume else None
    # Also a barrier: every process has read the run directory before rank 0 changes it.
    processes.require_same(
        "the step to start from", 0 if checkpoint is None else checkpoint["step"]
    )
    fresh = checkpoint is None
    if fresh and config.pretrain.backbone:  # its statistics come with its weights
        load_backbone(learner, Path(config.pretrain.backbone))
    elif fresh:
        _standardise_inputs(learner, config, sources.train_classes)
    if processes.is_main:
        start_run_dir(run_dir, config, resume=resume)
    processes.barrier()
    if fresh and config.pretrain.enabled and not config.pretrain.backbone:
        _pretrain_into_run(config, learner, run_dir, sources, progress, write=processes.is_main)
    optimizer = make_optimizer(learner, config.outer)
    aux_classifier = None
    if config.outer.aux_weight > 0:  # TADAM's co-training head: a training device, not the model
        like = next(learner.parameters())
        classes = sources.train_classes.num_classes
        aux_classifier = make_classifier(learner.backbone.feature_dim, classes, like)
        optimizer.add_param_group({"params": list(aux_classifier.parameters()), "weight_decay": 0})
    step, elapsed, best, window = 0, 0.0, None, LogWindow()
    if checkpoint is None:
        seed_everything(config.train.seed)  # the same start whether or not pretraining ran
    else:
        learner.load_state_dict(checkpoint["model"])
        if aux_classifier is not None:
            aux_classifier.load_state_dict(checkpoint["aux_classifier"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"])
        step, elapsed, best = checkpoint["step"], checkpoint["wall_time"], checkpoint["best"]
        window = LogWindow(dict(checkpoint["window"]["sums"]), checkpoint["window"]["count"])
        log.info(f"resuming {run_dir} from step {step}")
    processes.broadcast_(list(learner.state_dict().values()))  # one start for all processes
    # Running batch-norm statistics follow each process's own tasks: averaged after every step,
    # they stay the same everywhere, so that validation and a resumed run see what is saved.
    running_statistics = list(learner.buffers())
    photo, dtype = photo_augmentation(config.data), next(learner.parameters()).dtype
    stored = prefix_store(resolve_cache_dir(config.data.cache_dir or None))
    build_train = input_builder(learner, sources.train_classes, stored=stored)
    if sources.validation is not None:
        validation_inputs = input_builder(learner, sources.val_classes, stored=stored)
    saved_step = None if checkpoint is None else step
    settings = config.train
    writer = RunWriter(run_dir, step) if processes.is_main else None
    if progress is not None:
        progress.start("train", step, settings.steps)
    try:
        while step < settings.steps:
            started = time.perf_counter()
            set_learning_rate(optimizer, learning_rate(config.outer, step))
            tasks = sources.sampler.sample(
                step, config.outer.meta_batch_size, task_slice=task_slice
            )
            auxiliary = None
            if aux_classifier is not None:
                images, labels = auxiliary_batch(
                    sources.train_classes,
                    config.train.seed,
                    step,
                    config.outer.aux_batch_size,
                    photo,
                    dtype,
                )
                weight = auxiliary_weight(config.outer, step)
                auxiliary = Auxiliary(aux_classifier, images, labels, weight)
            local = meta_step(
                learner,
                optimizer,
                build_train(tasks),
                config.adapt,
                config.outer,
                reduce_gradients=processes.mean_,
                auxiliary=auxiliary,
            )
            processes.mean_(running_statistics)
            metrics = processes.mean_metrics(local)
            step += 1
            diverged = _divergence(step, metrics, run_dir, saved_step)
            if diverged is not None:
                raise diverged
            window.add(metrics)
            last_step = step == settings.steps
            row: dict[str, Any] = {}
            if step % settings.log_every == 0 or last_step:
                row.update(window.flush(), lr=optimizer.param_groups[0]["lr"])
            improved = False
            validates = settings.val_every and (step % settings.val_every == 0 or last_step)
            if sources.validation is not None and validates:
                accuracies = validate(
                    learner, sources.validation, validation_inputs, config.adapt, processes
                )
                summary = accuracy_summary(accuracies)
                row.update(val_accuracy=summary["mean"], val_ci95=summary["ci95"])
                improved = best is None or summary["mean"] > best
                best = summary["mean"] if improved else best
            elapsed += time.perf_counter() - started
            if row and writer is not None:
                writer.row({"step": step, "wall_time": round(elapsed, 3), **row})
            save_last = step % settings.checkpoint_every == 0 or last_step
            if writer is not None and (improved or save_last):
                payload = {
                    "kind": "train",
                    "step": step,
                    "config": config_to_dict(config),
                    "config_hash": config_hash(config),
                    "model": learner.state_dict(),
                    "aux_classifier": aux_classifier and aux_classifier.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(),
                    "wall_time": elapsed,
                    "best": best,
                    "window": {"sums": dict(window.sums), "count": window.count},
                }
                if improved:
                    writer.checkpoint(BEST, payload)
                if save_last:
                    writer.checkpoint(LAST, payload)
            if save_last:
                saved_step = step
            if progress is not None:
                progress.update(step, metrics)
    finally:
        if writer is not None:
            writer.close()
        if progress is not None:
            progress.close()
    return TrainResult(run_dir, step, best)


def _resume_payload(run_dir: Path, config: RunConfig) -> dict[str, Any] | None:
    """The last checkpoint of a run to resume, checked against `config` (None before the first
    checkpoint: the run starts again from step 0)."""
    path = run_dir / LAST
    if not path.exists():
        log.info(f"{run_dir} has no {LAST} yet: starting it from step 0")
        return None
    payload = load_checkpoint(path)
    require_keys(
        payload,
        ("kind", "step", "config_hash", "model", "optimizer", "rng", "wall_time", "best", "window"),
        path,
    )
    if payload["config_hash"] != config_hash(config):
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another config; use the run's own "
            f"{run_dir / CONFIG_FILE} or start over with --force"
        )
    if payload["step"] > config.train.steps:
        raise ConfigError(
            f"train.steps = {config.train.steps} is below the step {payload['step']} that "
            f"{path} reached; raise train.steps to continue"
        )
    return payload


def pretrain_run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Pretrain a backbone into `run_dir/backbone.pt`, for `pretrain.backbone` of later runs
    (frozen or outer-trained); `resume` continues from `pretrain.pt` after an interruption."""
    run_dir = Path(run_dir)
    config = dataclasses.replace(
        config, pretrain=dataclasses.replace(config.pretrain, enabled=True)
    )
    check_run_dir(run_dir, config, resume=resume, force=force)
    sources = _load_sources(config)
    seed_everything(config.train.seed)
    # Only the backbone learns here, so how meta-training would use it (frozen, cached) is moot.
    learner = build_learner(
        dataclasses.replace(config, model=dataclasses.replace(config.model, backbone_mode="outer"))
    )
    _standardise_inputs(learner, config, sources.train_classes)
    start_run_dir(run_dir, config, resume=resume)
    _pretrain_into_run(config, learner, run_dir, sources, progress, write=True)
    return run_dir / BACKBONE


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


def _test_time_suffix(settings: EvalConfig) -> str:
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
        f"_n{settings.episodes}_seed{settings.seed}_{_test_time_suffix(settings)}"
    )


def software_versions() -> dict[str, str]:
    """What computed a result: Python, torch and numpy, and metafilm itself."""
    from metafilm import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "metafilm": __version__,
    }


@dataclass(frozen=True)
class _Evaluation:
    """A training checkpoint made ready to test: its config (with the evaluation overrides), its
    learner in float64, and what identifies it in the records."""

    checkpoint: Path
    config: RunConfig
    learner: FiLMLearner
    step: int
    sha256: str

    def adapt(self) -> AdaptSpec:
        """The inner loop of the test: the training one with `eval.inner_steps` steps."""
        return dataclasses.replace(self.config.adapt, inner_steps=self.config.eval.inner_steps)

    def record(self, **protocol: Any) -> dict[str, Any]:
        """The evaluation file's content: `protocol` (split, ways, shots, query, episodes,
        episode_seed, accuracies, ...) and the run's own settings."""
        config = self.config
        return {
            "dataset": config.data.dataset,
            "image_size": config.data.image_size,
            **{key: value for key, value in protocol.items() if key != "accuracies"},
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
            "film_sites": list(self.learner.used_sites),
            "encoder": config.model.encoder,
            "head": config.model.head,
            "precision": "float64",
            "versions": software_versions(),
            "checkpoint": self.checkpoint.name,
            "checkpoint_step": self.step,
            "checkpoint_sha256": self.sha256,
            "accuracies": protocol["accuracies"],
        }

    def holds(self, name: str, expected: Mapping[str, Any]) -> bool:
        """Whether the evaluation file `name` exists and was computed exactly as `expected` says:
        every field of that record (checkpoint sha256, split, ways, shots, query, episodes, seed,
        alphabets, inner steps, batch norm, ...) equal, one accuracy per episode. The software
        versions may differ (float64 results do not depend on them)."""
        try:
            saved = json.loads(self.path(name).read_text(encoding="utf-8"))
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

    def path(self, name: str) -> Path:
        """Where the evaluation file `name` of this checkpoint lives: its run's eval folder."""
        return self.checkpoint.parent / EVAL_DIR / name

    def write(self, name: str, record: dict[str, Any]) -> Path:
        path = self.path(name)
        with atomic_writer(path) as file:
            file.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))
        return path


def _load_evaluation(
    checkpoint: Path, eval_overrides: Mapping[str, Any] | None, data_root: str | None
) -> _Evaluation:
    payload = load_checkpoint(checkpoint)
    require_keys(payload, ("kind", "config", "model", "step"), checkpoint)
    if payload["kind"] != "train":
        raise CheckpointError(
            f"{checkpoint} is a {payload['kind']} file, not a training checkpoint"
        )
    raw = {section: dict(table) for section, table in payload["config"].items()}
    raw["eval"].update({k: v for k, v in (eval_overrides or {}).items() if v is not None})
    if data_root is not None:
        raw["data"]["root"] = data_root
    config = config_from_dict(raw)
    state = payload["model"]
    if config.eval.bn_mode != config.model.bn_mode:  # running-statistics model, episode test
        state = {k: v for k, v in state.items() if k.rpartition(".")[2] not in RUNNING_BUFFERS}
    tested = dataclasses.replace(config.model, bn_mode=config.eval.bn_mode)
    learner = build_learner(dataclasses.replace(config, model=tested))
    learner.load_state_dict(state)
    # float64: in float32, a change in the order of the sums (another thread count, another CPU)
    # flips near-tied predictions and so changes per-episode accuracies; in float64 it does not.
    # evaluate_exact runs a float32 copy and redoes in float64 only the near-tied tasks.
    learner.double()
    return _Evaluation(checkpoint, config, learner, payload["step"], checkpoint_sha256(checkpoint))


def load_trained(checkpoint: Path) -> _Evaluation:
    """A training checkpoint ready to use: its config, its learner (float64, the batch norm of
    its [eval] section), its test-time inner loop (``adapt()``), its step and sha256."""
    return _load_evaluation(checkpoint, None, None)


def _with_progress(
    batches: Iterator[Episode], total: int, phase: str, progress: Progress | None
) -> Iterator[Episode]:
    """`batches` as they are, telling `progress` how many of the `total` episodes are done."""
    if progress is None:
        yield from batches
        return
    progress.start(phase, 0, total)
    done = 0
    try:
        for batch in batches:
            yield batch
            done = min(total, done + batch.tasks)
            progress.update(done, {})
    finally:
        progress.close()


def evaluate_checkpoint(
    checkpoint: Path,
    eval_overrides: Mapping[str, Any] | None = None,
    *,
    data_root: str | None = None,
    on_result: Callable[[Path, dict[str, Any]], None] | None = None,
    skip_existing: bool = False,
    progress: Progress | None = None,
) -> list[Path]:
    """Evaluate a training checkpoint on fixed seeded episodes for every (ways, shots); write one
    JSON per setting into `<run dir>/eval/` (the run dir is the checkpoint's folder).

    The protocol is the run's [eval] section with `eval_overrides` (keys of [eval]; None values
    ignored) applied and validated like a config file; `data_root` replaces the saved data.root.
    With `skip_existing`, a setting is not evaluated again if its file was written for this very
    checkpoint (the same sha256) with the same protocol and model settings (`_Evaluation.holds`);
    any other file of that name (say, of an earlier `best.pt`) is replaced. `progress` is told
    the episodes done after each batch.
    """
    loaded = _load_evaluation(checkpoint, eval_overrides, data_root)
    config, settings = loaded.config, loaded.config.eval
    if config.model.head == "linear" and set(settings.ways) != {config.data.ways}:
        raise ConfigError(
            f"eval.ways = {list(settings.ways)}: this run's linear head has {config.data.ways} "
            f"outputs, so it can only be tested {config.data.ways}-way"
        )
    classes = load_split(config.data, settings.split, settings.alphabets)
    build = input_builder(
        loaded.learner,
        classes,
        stored=prefix_store(resolve_cache_dir(config.data.cache_dir or None)),
    )
    sources = {
        (ways, shots): episodes_fitting(
            "eval.ways / eval.shots / eval.query",
            settings.split,
            lambda ways=ways, shots=shots: FixedEpisodes(
                classes,
                ways,
                shots,
                settings.query,
                seed=settings.seed,
                episodes=settings.episodes,
                within_alphabet=settings.within_alphabet,
            ),
        )
        for ways in settings.ways
        for shots in settings.shots
    }
    written = []
    for (ways, shots), source in sources.items():
        name = evaluation_name(checkpoint, ways, shots, settings)
        protocol = {
            "split": settings.split,
            "alphabets": settings.alphabets,
            "within_alphabet": settings.within_alphabet,
            "ways": ways,
            "shots": shots,
            "query": settings.query,
            "episodes": settings.episodes,
            "episode_seed": settings.seed,
        }
        if skip_existing and loaded.holds(name, loaded.record(**protocol, accuracies=[])):
            written.append(loaded.path(name))
            continue
        what = f"evaluate {ways}-way {shots}-shot on {settings.split!r}"
        batches = _with_progress(fixed_batches(source, build), len(source), what, progress)
        accuracies, recomputed = evaluate_exact(loaded.learner, batches, loaded.adapt())
        record = loaded.record(**protocol, accuracies=accuracies.tolist())
        record["tasks_in_float64"] = recomputed  # the near-ties; the rest ran in float32
        written.append(loaded.write(name, record))
        if on_result is not None:
            on_result(written[-1], record)
    return written


LAKE_SPLIT = "lake-runs"
"""The `split` of a Lake et al. evaluation record."""


def evaluate_lake(
    checkpoint: Path,
    *,
    inner_steps: int | None = None,
    bn_mode: BatchNormMode | None = None,
    data_root: str | None = None,
    on_result: Callable[[Path, dict[str, Any]], None] | None = None,
) -> Path:
    """Evaluate a training checkpoint on the 20 runs of Lake et al.'s one-shot challenge (20-way
    1-shot within one evaluation alphabet, one test item per class); write
    `<run dir>/eval/<checkpoint>_lake-runs_inner<N>_bn<mode>.json`.

    `accuracies` holds the accuracy of each run (k/20); the error rate of the paper, over the 400
    test items, is `1 - mean`, also stored as `error_rate` with `errors_per_run`. The images are
    decoded like the run's training images (same size). The paper's protocol also asks that the
    model learned from the background alphabets alone: the record states the run's training and
    validation splits so that a reader can check it.
    """
    loaded = _load_evaluation(
        checkpoint, {"inner_steps": inner_steps, "bn_mode": bn_mode}, data_root
    )
    config = loaded.config
    if config.data.dataset != "omniglot":
        raise ConfigError(
            f"the Lake one-shot runs are Omniglot characters; this run was trained on "
            f"{config.data.dataset}"
        )
    seen = [config.data.train_split] + ([config.data.val_split] if config.train.val_every else [])
    if any(split != "background" for split in seen):
        log.warning(
            f"warning: this run learned from the split(s) {', '.join(map(repr, seen))}, not the "
            f"background alphabets alone as the challenge's protocol asks (data.train_split = "
            f'"background"): its error rate is not comparable with the published ones'
        )
    try:
        runs = load_lake_runs(config.data.root or None, image_size=config.data.image_size)
    except (FileNotFoundError, ValueError, ChecksumError) as error:
        raise DataError(str(error)) from None
    dtype = next(loaded.learner.parameters()).dtype
    accuracies = evaluate(loaded.learner, [runs.episode(dtype)], loaded.adapt())
    items = runs.query_labels.shape[1]
    errors = [int(round((1 - accuracy) * items)) for accuracy in accuracies]
    record = loaded.record(
        split=LAKE_SPLIT,
        ways=runs.ways,
        shots=1,
        query=1,
        episodes=runs.runs,
        episode_seed="fixed",
        train_split=config.data.train_split,
        train_alphabets=config.data.train_alphabets,
        val_split=config.data.val_split,
        val_alphabets=config.data.val_alphabets,
        error_rate=sum(errors) / (runs.runs * items),
        errors_per_run=errors,
        accuracies=accuracies.tolist(),
    )
    name = f"{checkpoint.stem}_{LAKE_SPLIT}_{_test_time_suffix(config.eval)}"
    path = loaded.write(name, record)
    if on_result is not None:
        on_result(path, record)
    return path
