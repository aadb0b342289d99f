"""The PNG figures of a report: training curves, accuracy per setting, FiLM diagnostics.

Each is drawn from what the runs saved (`metafilm.rundir.RunFiles`) and the report's results, and
nothing else; the report decides what the figures are called and how results are labelled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metafilm.rundir import RunFiles

FIGURES = ("training_curves.png", "accuracy.png", "film_diagnostics.png")


def write_figures(
    runs: Sequence[RunFiles],
    results: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    out: Path,
) -> list[Path]:
    """Draw the three `FIGURES` of `runs` and their `results` (labelled `labels`) into `out`."""
    paths = [out / name for name in FIGURES]
    plot_training_curves(runs, paths[0])
    plot_accuracy(results, labels, paths[1])
    plot_film_diagnostics(runs, paths[2])
    return paths


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _film_keys(runs: Sequence[RunFiles], prefix: str) -> list[str]:
    return sorted(
        {key for run in runs for row in run.metrics for key in row if key.startswith(prefix)}
    )


def plot_training_curves(runs: Sequence[RunFiles], path: Path) -> None:
    """Training and validation accuracy (validation with its CI band) and training loss."""
    import matplotlib.pyplot as plt

    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for run in runs:
        steps, values = _series(run.metrics, "accuracy")
        accuracy_axis.plot(steps, values, label=f"{run.name} train")
        steps, values = _series(run.metrics, "val_accuracy")
        if len(steps):
            line = accuracy_axis.plot(steps, values, marker="o", label=f"{run.name} validation")
            _, ci = _series(run.metrics, "val_ci95")
            if len(ci) == len(values):
                accuracy_axis.fill_between(
                    steps, values - ci, values + ci, alpha=0.2, color=line[0].get_color()
                )
        steps, values = _series(run.metrics, "loss")
        loss_axis.plot(steps, values, label=f"{run.name} train")
    accuracy_axis.set(xlabel="outer step", ylabel="query accuracy", title="Accuracy")
    loss_axis.set(xlabel="outer step", ylabel="query loss", title="Training loss")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_accuracy(results: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> None:
    """Accuracy with its 95% CI per evaluation result, labelled by `labels`."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(results) + 2), 4.5), dpi=100)
    if results:
        means = [100 * r["mean"] for r in results]
        errors = [0 if r["ci95"] is None else 100 * r["ci95"] for r in results]
        positions = np.arange(len(results))
        axis.errorbar(positions, means, yerr=errors, fmt="o", capsize=6)
        axis.set_xticks(positions, labels, fontsize="small")
        axis.set_xlim(-0.5, len(results) - 0.5)
    else:
        axis.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
    axis.set(ylabel="test accuracy (%), 95% CI", title="Accuracy per setting")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_film_diagnostics(runs: Sequence[RunFiles], path: Path) -> None:
    """RMS size of the predicted and adapted deviations per site, and the train-validation gap."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for axis, prefix, title in (
        (axes[0], "film_predicted/", "Predicted deviations (encoder)"),
        (axes[1], "film_adapted/", "Adapted deviations (after inner loop)"),
    ):
        keys = _film_keys(runs, prefix)
        for run in runs:
            for key in keys:
                steps, values = _series(run.metrics, key)
                label = key.removeprefix(prefix) if len(runs) == 1 else f"{run.name} {key}"
                axis.plot(steps, values, label=label)
        if not keys:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
        else:
            axis.legend(fontsize="x-small")
        axis.set(xlabel="outer step", ylabel="RMS size", title=title)
        axis.grid(alpha=0.3)
    gap_axis = axes[2]
    for run in runs:
        val_steps, val_accuracy = _series(run.metrics, "val_accuracy")
        train_steps, train_accuracy = _series(run.metrics, "accuracy")
        if len(val_steps) and len(train_steps):
            gap = np.interp(val_steps, train_steps, train_accuracy) - val_accuracy
            gap_axis.plot(val_steps, gap, marker="o", label=run.name)
    gap_axis.axhline(0, color="grey", linewidth=0.8)
    gap_axis.set(
        xlabel="outer step", ylabel="train - validation accuracy", title="Generalisation gap"
    )
    gap_axis.grid(alpha=0.3)
    if gap_axis.lines[1:]:  # beyond the zero line: some run validated
        gap_axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
