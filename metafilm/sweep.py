"""`metafilm sweep`: train and evaluate one run per point of a grid of settings, one after another,
and compare them in one report.

Each arm is an ordinary run directory, `OUT/<key=value,...>`, trained from the base config with
the arm's `--set` overrides. Running the same sweep again resumes it: a finished arm is left as
it is, an interrupted one continues from its last checkpoint (to the weights an uninterrupted run
reaches), and an evaluation already written is not repeated. A finished and evaluated arm whose
checkpoints were removed (its config, metrics and evaluation records kept) is reported from its
records. Every arm is evaluated on the validation split and on the test split with the base
config's [eval] protocol (choose on validation; the test numbers are for reporting).

With `one_at_a_time`, the arms are an ablation instead of a grid: the base config's own arm
(`base`), then each key's values with every other setting left at the base config's, so that
each arm differs from `base` in one setting only. Every arm is then also compared with `base`
on the very same evaluation episodes: the per-episode accuracy difference, with its 95% CI, is
far tighter than two independent CIs, so that small effects can be told from noise.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metafilm.assemble import Progress
from metafilm.checkpoint import load_checkpoint
from metafilm.config import RunConfig, load_config, parse_override
from metafilm.errors import ConfigError, RunError
from metafilm.evaluation import evaluate_checkpoint
from metafilm.markers import SWEEP_MARKER, foreign_folder, mark
from metafilm.report import labelled, mean_ci_text, paired_differences, write_report
from metafilm.rundir import (
    BEST,
    CONFIG_FILE,
    LAST,
    RunFiles,
    check_run_dir,
    read_run,
    resolve_checkpoint,
)
from metafilm.stats import accuracy_summary
from metafilm.stopping import StopRequest
from metafilm.train import train

SUMMARY_FIGURE = "sweep_accuracy.png"


@dataclass(frozen=True)
class Arm:
    """One point of the grid: its `section.key=value` overrides and its run directory name."""

    settings: tuple[str, ...]

    @property
    def name(self) -> str:
        return ",".join(self.settings).replace("/", "_") or "base"


def parse_grid(grid: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`["section.key=v1,v2", ...]` -> `[("section.key", ["v1", "v2"]), ...]`, validated: every
    key once, at least one value each, each `key=value` readable as a `--set` override."""
    axes: list[tuple[str, list[str]]] = []
    for text in grid:
        key, sep, values = text.partition("=")
        key = key.strip()
        choices = [value.strip() for value in values.split(",")]
        if not sep or not key or any(not value for value in choices):
            raise ConfigError(
                f"--grid {text!r}: expected section.key=value1,value2,... "
                f"(e.g. --grid adapt.inner_steps=0,1,3)"
            )
        if key in (axis for axis, _ in axes):
            raise ConfigError(f"--grid {key} is given twice: list all its values in one --grid")
        for value in choices:
            parse_override(f"{key}={value}")
        axes.append((key, choices))
    if not axes:
        raise ConfigError("a sweep needs at least one --grid section.key=value1,value2,...")
    return axes


def grid_arms(axes: Sequence[tuple[str, Sequence[str]]]) -> list[Arm]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = [key for key, _ in axes]
    return [
        Arm(tuple(f"{key}={value}" for key, value in zip(keys, values, strict=True)))
        for values in itertools.product(*(values for _, values in axes))
    ]


def one_at_a_time_arms(
    axes: Sequence[tuple[str, Sequence[str]]], arm_config: Callable[[Arm], RunConfig]
) -> list[Arm]:
    """The base arm, then one arm per key and value that changes the base config (`arm_config`
    gives an arm's config): a value equal to the base setting is the base arm, not a copy."""
    base = Arm(())
    base_config = arm_config(base)
    arms = [base]
    for key, values in axes:
        for value in values:
            arm = Arm((f"{key}={value}",))
            if arm_config(arm) != base_config:
                arms.append(arm)
    return arms


def _finished(run_dir: Path, config: RunConfig) -> bool:
    """Whether an arm's run already holds its last step (after checking that `config` is the
    run's own, as a resume would)."""
    if not (run_dir / LAST).is_file():
        return False
    check_run_dir(run_dir, config, resume=True, force=False)
    return load_checkpoint(run_dir / LAST)["step"] >= config.train.steps


def _reported_from_records(run_dir: Path, config: RunConfig) -> bool:
    """Whether an arm finished and was evaluated on every split, and kept its records but not its
    checkpoints (removed to save space once evaluated, or kept in version control without them):
    such an arm is reported from its records as they are, never retrained."""
    if (run_dir / LAST).exists() or (run_dir / BEST).exists():
        return False
    if not (run_dir / CONFIG_FILE).is_file():
        return False
    check_run_dir(run_dir, config, resume=True, force=False)
    run = read_run(run_dir)
    steps = [row["step"] for row in run.metrics if "step" in row]
    settings = len(config.eval.ways) * len(config.eval.shots)
    evaluated = Counter(evaluation["split"] for evaluation in run.evaluations)
    splits = {config.data.val_split, config.eval.split}
    return max(steps, default=0) >= config.train.steps and all(
        evaluated[split] >= settings for split in splits
    )


def _last(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return float(values[-1]) if values else None


def _mean_of_prefix(row: Mapping[str, Any] | None, prefix: str) -> float | None:
    if row is None:
        return None
    values = [value for key, value in row.items() if key.startswith(prefix)]
    return float(np.mean(values)) if values else None


def arm_summary(arm: Arm, run: RunFiles, labels: Mapping[int, str] | None = None) -> dict[str, Any]:
    """An arm's comparison figures: accuracy with 95% CI per split and setting, the final train
    and validation accuracy and their gap, and the final RMS FiLM deviations (mean over sites).
    `labels` (`metafilm.report.labelled` of all arms) names the evaluations; by default they are
    labelled among this run's own."""
    labels = labelled([run]) if labels is None else labels
    results = {
        labels[id(evaluation)]: accuracy_summary(evaluation["accuracies"])
        for evaluation in run.evaluations
    }
    train_accuracy = _last(run.metrics, "accuracy")
    val_accuracy = _last(run.metrics, "val_accuracy")
    logged = [row for row in run.metrics if "accuracy" in row]
    last_row = logged[-1] if logged else None
    return {
        "arm": arm.name,
        "settings": list(arm.settings),
        "run_dir": str(run.path),
        "results": results,
        "final_train_accuracy": train_accuracy,
        "final_val_accuracy": val_accuracy,
        "train_val_gap": (
            None
            if train_accuracy is None or val_accuracy is None
            else train_accuracy - val_accuracy
        ),
        "film_predicted_rms": _mean_of_prefix(last_row, "film_predicted/"),
        "film_adapted_rms": _mean_of_prefix(last_row, "film_adapted/"),
        "wall_time_s": _last(run.metrics, "wall_time"),
    }


def _fmt(value: float | None, scale: float = 100.0, digits: int = 2) -> str:
    return "–" if value is None else f"{scale * value:.{digits}f}"


def _markdown(
    config_path: Path,
    overrides: Sequence[str],
    axes: Sequence[tuple[str, Sequence[str]]],
    one_at_a_time: bool,
    rows: list[dict],
) -> str:
    labels = sorted({label for row in rows for label in row["results"]})
    changed = "".join(f" `--set {text}`" for text in overrides)
    values = "; ".join(f"`{key}` ∈ {{{', '.join(values)}}}" for key, values in axes)
    design = (
        f"one setting at a time around the base config (arm `base`): {values}"
        if one_at_a_time
        else f"grid: {values}"
    )
    lines = [
        "# metafilm sweep",
        "",
        f"Base config `{config_path}`{changed}; {design}. "
        "Every arm has the same training budget (`train.steps`).",
        "",
        "Accuracy in percent, mean ± 95% CI (1.96 · s / sqrt(n) over the episodes). "
        "Train and validation accuracy are the last logged values during training, at the "
        "training ways/shots; the gap is their difference (overfitting shows as a large gap). "
        "Deviation sizes are the RMS of the predicted and adapted FiLM deviations at the last "
        "log, averaged over the sites.",
        "",
        "| arm | " + " | ".join(labels) + " | train | val | gap | predicted RMS | adapted RMS "
        "| train time (s) |",
        "|---|" + "---|" * (len(labels) + 6),
    ]
    for row in rows:
        cells = [mean_ci_text(row["results"].get(label)) for label in labels]
        lines.append(
            f"| {row['arm']} | "
            + " | ".join(cells)
            + f" | {_fmt(row['final_train_accuracy'])} | {_fmt(row['final_val_accuracy'])} "
            f"| {_fmt(row['train_val_gap'])} | {_fmt(row['film_predicted_rms'], 1, 4)} "
            f"| {_fmt(row['film_adapted_rms'], 1, 4)} | {_fmt(row['wall_time_s'], 1, 0)} |"
        )
    if one_at_a_time:
        lines += [
            "",
            "## Difference from `base` on the same episodes",
            "",
            "Accuracy of the arm minus that of `base`, in percentage points: mean ± 95% CI of "
            "the per-episode differences over the same evaluation episodes. **Bold**: the CI "
            "excludes 0.",
            "",
            "| arm | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for row in rows[1:]:
            cells = [
                mean_ci_text(row["vs_base"].get(label), bold_if_clear=True) for label in labels
            ]
            lines.append(f"| {row['arm']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![accuracy per arm]({SUMMARY_FIGURE})",
        "",
        "Per-arm protocol, training curves and FiLM diagnostics: [report/report.md]"
        "(report/report.md).",
        "",
    ]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = sorted({label for row in rows for label in row["results"]})
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.5))
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        summaries = [row["results"].get(label) for row in rows]
        means = [np.nan if s is None else 100 * s["mean"] for s in summaries]
        errors = [0.0 if s is None or s["ci95"] is None else 100 * s["ci95"] for s in summaries]
        positions = np.arange(len(rows)) + (index - (len(labels) - 1) / 2) * width
        axis.bar(positions, means, width, yerr=errors, capsize=3, label=label)
    axis.set_xticks(np.arange(len(rows)))
    axis.set_xticklabels([row["arm"] for row in rows], rotation=20, ha="right", fontsize=8)
    finite = [100 * s["mean"] for row in rows for s in row["results"].values() if s is not None]
    if finite:
        axis.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
    axis.set_ylabel("accuracy (%), 95% CI")
    axis.legend(fontsize=8)
    axis.set_title("accuracy per arm")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def check_sweep_dir(out: Path) -> None:
    """Refuse a sweep folder that is a file, or that holds files `metafilm sweep` did not write
    (no `SWEEP_MARKER`): a sweep only ever resumes an earlier sweep."""
    refusal = foreign_folder(out, SWEEP_MARKER, "metafilm sweep")
    if refusal is not None:
        raise RunError(refusal)


def run_sweep(
    config_path: str | Path,
    grid: Sequence[str],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    one_at_a_time: bool = False,
    progress: Callable[[Arm], Progress | None] | None = None,
    on_arm: Callable[[Arm, dict[str, Any]], None] | None = None,
    stop: StopRequest | None = None,
) -> list[Path]:
    """Train, evaluate (validation and test splits) and compare every arm of `grid` (see the
    module docstring); return the files of the comparison (`sweep.md`, `sweep.json`, the plot,
    then the full report of all arms in `OUT/report`). A due `stop` ends the sweep at the next
    step of training or between evaluations, with every finished file kept."""
    import matplotlib

    matplotlib.use("Agg")
    config_path, out = Path(config_path), Path(out)
    axes = parse_grid(grid)

    def arm_config(arm: Arm) -> RunConfig:
        return load_config(config_path, [*overrides, *arm.settings])

    arms = one_at_a_time_arms(axes, arm_config) if one_at_a_time else grid_arms(axes)
    configs = {arm: arm_config(arm) for arm in arms}
    check_sweep_dir(out)
    mark(out, SWEEP_MARKER)
    rows, runs = [], []
    for arm, config in configs.items():
        run_dir = out / arm.name
        if not _reported_from_records(run_dir, config):
            if not _finished(run_dir, config):
                train(
                    config,
                    run_dir,
                    resume=(run_dir / CONFIG_FILE).is_file(),
                    progress=None if progress is None else progress(arm),
                    stop=stop,
                )
            checkpoint = resolve_checkpoint(run_dir)
            for split in dict.fromkeys((config.data.val_split, config.eval.split)):
                if stop is not None and stop.due():
                    stop.stop()
                evaluate_checkpoint(checkpoint, {"split": split}, skip_existing=True)
        runs.append(read_run(run_dir))
        row = arm_summary(arm, runs[-1])
        rows.append(row)
        if on_arm is not None:
            on_arm(arm, row)
    labels = labelled(runs)  # labels that tell apart every evaluation of every arm
    rows = [arm_summary(arm, run, labels) for arm, run in zip(arms, runs, strict=True)]
    if one_at_a_time:  # the base arm comes first
        for row, run in zip(rows[1:], runs[1:], strict=True):
            row["vs_base"] = paired_differences(run, runs[0], among=runs)
    written = [out / "sweep.md", out / "sweep.json", out / SUMMARY_FIGURE]
    written[0].write_text(
        _markdown(config_path, overrides, axes, one_at_a_time, rows), encoding="utf-8"
    )
    document = {
        "config": str(config_path),
        "overrides": list(overrides),
        "grid": {key: list(values) for key, values in axes},
        "one_at_a_time": one_at_a_time,
        "arms": rows,
    }
    written[1].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    _plot(rows, written[2])
    return written + write_report([out / arm.name for arm in arms], out / "report")
