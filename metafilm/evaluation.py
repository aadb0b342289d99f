"""Evaluation of a training checkpoint: fixed seeded episodes, or Lake et al.'s one-shot runs.

A checkpoint is loaded with its run's config (the `[eval]` section with the caller's overrides,
validated like a config file), its learner is made float64, and its accuracies are written as one
evaluation record per setting into the run's `eval/` folder (`metafilm.rundir.evaluation_record`).
The CLI (`metafilm evaluate`) and the sweep call this; the training loop never does.

Precision: in float32, a change in the order of the sums (another thread count, another CPU)
flips near-tied predictions and so changes per-episode accuracies; in float64 it does not. The
accuracies are the float64 ones, computed in float32 wherever that decides the same
(`metafilm.tiebreak`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from episodes.integrity import ChecksumError, resolve_cache_dir
from episodes.lake import load_lake_runs
from episodes.sampler import Episode
from metafilm.assemble import (
    Progress,
    build_learner,
    fixed_batches,
    fixed_episodes,
    image_progress,
    load_split,
)
from metafilm.backbones import RUNNING_BUFFERS
from metafilm.checkpoint import checkpoint_sha256, load_checkpoint, require_keys
from metafilm.config import RunConfig, config_from_dict
from metafilm.errors import CheckpointError, ConfigError, DataError
from metafilm.learner import FiLMLearner
from metafilm.meta import input_builder
from metafilm.prefix_cache import prefix_store
from metafilm.rundir import (
    LAKE_SPLIT,
    evaluation_name,
    evaluation_path,
    evaluation_record,
    holds_evaluation,
    lake_evaluation_name,
    write_evaluation,
)
from metafilm.specs import AdaptSpec, BatchNormMode
from metafilm.tiebreak import evaluate_exact

log = logging.getLogger(__name__)


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

    def record(self, protocol: Mapping[str, Any], accuracies: list[float]) -> dict[str, Any]:
        """The evaluation file's content (`metafilm.rundir.evaluation_record`) for this
        checkpoint."""
        return evaluation_record(
            self.config,
            protocol,
            accuracies,
            film_sites=self.learner.used_sites,
            checkpoint=self.checkpoint.name,
            checkpoint_step=self.step,
            checkpoint_sha256=self.sha256,
        )


def _load(
    checkpoint: Path, eval_overrides: Mapping[str, Any] | None, data_root: str | None
) -> _Evaluation:
    """The training checkpoint `checkpoint` with its run's config, `eval_overrides` (keys of
    [eval]; None values ignored) and `data_root` applied, its learner in float64."""
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
    learner.double().eval()  # float64: see the module docstring; eval: its prefix is fixed
    return _Evaluation(checkpoint, config, learner, payload["step"], checkpoint_sha256(checkpoint))


def load_trained(checkpoint: Path) -> _Evaluation:
    """A training checkpoint ready to use: its config, its learner (float64, the batch norm of
    its [eval] section), its test-time inner loop (``adapt()``), its step and sha256."""
    return _load(checkpoint, None, None)


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
    checkpoint (the same sha256) with the same protocol and model settings
    (`metafilm.rundir.holds_evaluation`); any other file of that name (say, of an earlier
    `best.pt`) is replaced. `progress` is told the episodes done after each batch.
    """
    loaded = _load(checkpoint, eval_overrides, data_root)
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
        on_images=image_progress(progress, f"prefix features of '{settings.split}'"),
    )
    sources = {
        (ways, shots): fixed_episodes(
            classes,
            settings.split,
            (ways, shots, settings.query),
            seed=settings.seed,
            episodes=settings.episodes,
            within_alphabet=settings.within_alphabet,
            what="eval.ways / eval.shots / eval.query",
        )
        for ways in settings.ways
        for shots in settings.shots
    }
    written = []
    for (ways, shots), source in sources.items():
        path = evaluation_path(checkpoint, evaluation_name(checkpoint, ways, shots, settings))
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
        if skip_existing and holds_evaluation(path, loaded.record(protocol, [])):
            written.append(path)
            continue
        what = f"evaluate {ways}-way {shots}-shot on {settings.split!r}"
        batches = _with_progress(fixed_batches(source, build), len(source), what, progress)
        accuracies = evaluate_exact(loaded.learner, batches, loaded.adapt())
        record = loaded.record(protocol, accuracies.tolist())
        written.append(write_evaluation(path, record))
        if on_result is not None:
            on_result(path, record)
    return written


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
    loaded = _load(checkpoint, {"inner_steps": inner_steps, "bn_mode": bn_mode}, data_root)
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
    accuracies = evaluate_exact(loaded.learner, [runs.episode(dtype)], loaded.adapt())
    items = runs.query_labels.shape[1]
    errors = [int(round((1 - accuracy) * items)) for accuracy in accuracies]
    protocol = {
        "split": LAKE_SPLIT,
        "ways": runs.ways,
        "shots": 1,
        "query": 1,
        "episodes": runs.runs,
        "episode_seed": "fixed",
        "train_split": config.data.train_split,
        "train_alphabets": config.data.train_alphabets,
        "val_split": config.data.val_split,
        "val_alphabets": config.data.val_alphabets,
        "error_rate": sum(errors) / (runs.runs * items),
        "errors_per_run": errors,
    }
    record = loaded.record(protocol, accuracies.tolist())
    path = write_evaluation(
        evaluation_path(checkpoint, lake_evaluation_name(checkpoint, config.eval)), record
    )
    if on_result is not None:
        on_result(path, record)
    return path
