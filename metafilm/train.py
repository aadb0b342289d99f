"""The outer loop as a library: meta-training, its pretraining stage, validation, exact resume.

A run writes its directory (see `metafilm.rundir`, which owns every file name in it) through a
`RunWriter`; the data and the learner come from `metafilm.assemble`. Evaluating a finished
checkpoint is `metafilm.evaluation`'s job, and reporting `metafilm.report`'s: this module imports
neither. One job in about 530 lines: meta-training and the pretraining stage it starts with share
the run's checkpoints, logging window and resume, so they stay together.

Exact resume: training task `j` of step `s` is a function of `(seed, s, j)` (`EpisodeSampler`), so
a checkpoint needs only the step counter beside the weights, the optimiser and the global RNG
states. On resume `metrics.jsonl` is cut back to the checkpoint's step, and the run continues to
the same final weights, bit for bit, as an uninterrupted one. Each meta-step flushes subnormal
floats to zero (`metafilm.subnormals`: a trained 1-shot model's second-order step can run 2x
slower on them).

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
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from episodes.classes import ClassImages, channel_statistics
from episodes.integrity import resolve_cache_dir
from episodes.sampler import Episode, FixedEpisodes
from metafilm.assemble import (
    Progress,
    TrainingData,
    build_learner,
    fixed_batches,
    image_progress,
    load_training_data,
    photo_augmentation,
    seed_everything,
)
from metafilm.checkpoint import (
    load_checkpoint,
    require_keys,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metafilm.config import RunConfig, config_hash, config_to_dict
from metafilm.distributed import SINGLE_PROCESS, Distributed
from metafilm.errors import CheckpointError, ConfigError, DivergedError
from metafilm.learner import FiLMLearner
from metafilm.meta import (
    Auxiliary,
    auxiliary_weight,
    evaluate,
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
from metafilm.rundir import (
    BACKBONE,
    BEST,
    CONFIG_FILE,
    LAST,
    PRETRAIN_CHECKPOINT,
    PRETRAIN_METRICS,
    RunWriter,
    check_run_dir,
    kept_checkpoint,
    start_run_dir,
)
from metafilm.specs import AdaptSpec
from metafilm.stats import mean_ci
from metafilm.stopping import StopRequest
from metafilm.subnormals import flushing_subnormals

log = logging.getLogger(__name__)


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


ESTIMATE_AFTER_STEPS = 5
"""The steps timed before a run says how long the rest will take."""
ESTIMATE_ABOVE_S = 60.0
"""Runs whose rest takes longer than this say so."""


def _announce_duration(seconds_per_step: float, steps_left: int) -> None:
    """Log how long the remaining steps take at the measured pace, if that is long."""
    total = seconds_per_step * steps_left
    if total > ESTIMATE_ABOVE_S:
        log.info(
            f"{seconds_per_step:.2f} s per step so far: the remaining {steps_left:,} steps take "
            f"about {_duration(total)} (validations and checkpoints not included)"
        )


def _duration(seconds: float) -> str:
    """``1 h 05 min``, ``7 min``, ``45 s``."""
    minutes = round(seconds / 60)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def validate(
    learner: FiLMLearner,
    source: FixedEpisodes,
    build: Callable[[Any], Episode],
    adapt: AdaptSpec,
    processes: Distributed = SINGLE_PROCESS,
    on_done: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Accuracy on every fixed validation episode, in order; each process evaluates its share,
    telling ``on_done`` how many of its episodes are done after each batch."""

    def told(batches: Iterator[Episode]) -> Iterator[Episode]:
        done = 0
        for batch in batches:
            yield batch
            done += batch.tasks
            if on_done is not None:
                on_done(done)

    share = processes.shard(len(source))
    mine = evaluate(learner, told(fixed_batches(source, build, episodes=share)), adapt)
    return processes.gather_shards(mine, len(source))


def _validating(done: int, share: int, progress: Progress | None, stop: StopRequest | None) -> None:
    """After each batch of a validation: show how far it has come; abandon it when a stop is due
    (the step is then not saved: the run resumes from its last checkpoint and repeats it)."""
    if stop is not None and stop.due():
        stop.stop()
    if progress is not None:
        progress.note(f"validating: {done}/{share} episodes")


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
    sources: TrainingData,
    run_dir: Path,
    progress: Progress | None = None,
    *,
    write: bool = True,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Pretrain `learner.backbone` in place (`metafilm.pretrain`), continuing from
    `run_dir/pretrain.pt` if an earlier attempt wrote it; return the backbone file's payload.

    With `write`, checkpoints go to `pretrain.pt` every `pretrain.checkpoint_every` steps and
    rows (mean loss and accuracy since the last row, learning rate, validation accuracy) to
    `pretrain_metrics.jsonl` every `train.log_every` steps. When `stop` is due at the end of a
    step, that step's checkpoint is written and pretraining stops (`metafilm.stopping`).
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
        mean, ci95 = mean_ci(accuracies)
        pending.update(val_accuracy=mean, val_ci95=ci95)

    def on_checkpoint(now: PretrainState) -> None:
        if writer is not None:
            writer.checkpoint(PRETRAIN_CHECKPOINT, _pretrain_payload(learner, config, now, window))

    def on_step_end(now: PretrainState) -> None:
        if pending and writer is not None:
            writer.row({"step": now.step, "wall_time": round(now.wall_time, 3), **pending})
        pending.clear()
        if stop is not None and stop.due():
            on_checkpoint(now)
            stop.stop()

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
    sources: TrainingData,
    progress: Progress | None,
    *,
    write: bool,
    stop: StopRequest | None = None,
) -> None:
    """The run's own pretrained backbone: `backbone.pt` if an earlier attempt wrote it, else
    pretrain now (resuming from `pretrain.pt`) and, if `write`, write it."""
    own = run_dir / BACKBONE
    if own.is_file():
        log.info(f"using the pretrained backbone {own}")
        load_backbone(learner, own)
    else:
        payload = pretrain(config, learner, sources, run_dir, progress, write=write, stop=stop)
        if write:
            save_checkpoint(own, payload)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run stands."""

    run_dir: Path
    step: int
    best_val_accuracy: float | None


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
        f"{kept_checkpoint(run_dir, saved_step)}. Lower adapt.inner_lr or outer.lr and start "
        f"over with --force"
    )


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    processes: Distributed = SINGLE_PROCESS,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Meta-train as `config` says into `run_dir` (see the module docstring), as one process of
    `processes` (give `progress` to rank 0 only). When `stop` is due at the end of a step, the
    step's checkpoint is written (`last.pt`) and the run stops (`metafilm.stopping`).

    Everything is checked before the run directory changes: the split of the meta-batch over the
    processes, the run directory, the data (split sizes against the episode shapes), the model
    settings, the checkpoint to resume from.
    """
    run_dir = Path(run_dir)
    task_slice = processes.task_slice(config.outer.meta_batch_size)
    check_run_dir(run_dir, config, resume=resume, force=force)
    sources = load_training_data(config)
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
        _pretrain_into_run(
            config, learner, run_dir, sources, progress, write=processes.is_main, stop=stop
        )
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
    build_train = input_builder(
        learner,
        sources.train_classes,
        stored=stored,
        on_images=image_progress(progress, f"prefix features of '{config.data.train_split}'"),
    )
    if sources.validation is not None:
        validation_inputs = input_builder(
            learner,
            sources.val_classes,
            stored=stored,
            on_images=image_progress(progress, f"prefix features of '{config.data.val_split}'"),
        )
    saved_step = None if checkpoint is None else step
    settings = config.train
    writer = RunWriter(run_dir, step) if processes.is_main else None
    if progress is not None:
        progress.start("train", step, settings.steps)
    timed_from, timing_started = step, time.perf_counter()
    try:
        while step < settings.steps:
            started = time.perf_counter()
            if step == timed_from + ESTIMATE_AFTER_STEPS:
                _announce_duration(
                    (started - timing_started) / ESTIMATE_AFTER_STEPS, settings.steps - step
                )
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
            with flushing_subnormals():
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
                share = len(processes.shard(len(sources.validation)))
                accuracies = validate(
                    learner,
                    sources.validation,
                    validation_inputs,
                    config.adapt,
                    processes,
                    on_done=lambda done, share=share: _validating(done, share, progress, stop),
                )
                mean, ci95 = mean_ci(accuracies)
                row.update(val_accuracy=mean, val_ci95=ci95)
                improved = best is None or mean > best
                best = mean if improved else best
            elapsed += time.perf_counter() - started
            if row and writer is not None:
                writer.row({"step": step, "wall_time": round(elapsed, 3), **row})
            stopping = stop is not None and stop.due()
            save_last = step % settings.checkpoint_every == 0 or last_step or stopping
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
            if stopping:
                stop.stop()
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
    stop: StopRequest | None = None,
) -> Path:
    """Pretrain a backbone into `run_dir/backbone.pt`, for `pretrain.backbone` of later runs
    (frozen or outer-trained); `resume` continues from `pretrain.pt` after an interruption (or a
    `stop`, as in `pretrain`)."""
    run_dir = Path(run_dir)
    config = dataclasses.replace(
        config, pretrain=dataclasses.replace(config.pretrain, enabled=True)
    )
    check_run_dir(run_dir, config, resume=resume, force=force)
    sources = load_training_data(config)
    seed_everything(config.train.seed)
    # Only the backbone learns here, so how meta-training would use it (frozen, cached) is moot.
    learner = build_learner(
        dataclasses.replace(config, model=dataclasses.replace(config.model, backbone_mode="outer"))
    )
    _standardise_inputs(learner, config, sources.train_classes)
    start_run_dir(run_dir, config, resume=resume)
    _pretrain_into_run(config, learner, run_dir, sources, progress, write=True, stop=stop)
    return run_dir / BACKBONE
