"""The statistics of every reported accuracy: mean, 95% confidence interval, paired differences.

The accuracy of a setting is the mean of its per-episode query accuracies; its 95% confidence
interval is `1.96 * s / sqrt(n)`, with `s` the *sample* standard deviation (ddof = 1) over the
`n` episodes. Two evaluations on the very same episodes compare by the mean of their per-episode
differences, with the same interval: pairing removes the variation between episodes, so it is
far tighter than two separate intervals. Numbers only: this module imports nothing of metafilm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CI_Z = 1.96
STD_KIND = "sample standard deviation (ddof=1)"


def accuracy_summary(accuracies: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Mean, sample std (ddof=1) and 95% CI `1.96 * std / sqrt(n)` of per-episode accuracies.

    With a single episode the std and CI are undefined and given as None.
    """
    values = np.asarray(accuracies, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(
            f"need a non-empty list of per-episode accuracies, got shape {values.shape}"
        )
    n = len(values)
    std = float(values.std(ddof=1)) if n > 1 else None
    return {
        "episodes": n,
        "mean": float(values.mean()),
        "std": std,
        "ci95": None if std is None else CI_Z * std / math.sqrt(n),
    }


def mean_ci(accuracies: Sequence[float] | np.ndarray) -> tuple[float, float | None]:
    """The mean of per-episode accuracies and its 95% CI (None for one episode)."""
    summary = accuracy_summary(accuracies)
    return summary["mean"], summary["ci95"]


def paired_difference(
    accuracies: Sequence[float] | np.ndarray, base: Sequence[float] | np.ndarray
) -> dict[str, Any]:
    """`accuracy_summary` of `accuracies - base`, episode by episode (the same episodes, in the
    same order): the paired difference and its 95% CI."""
    return accuracy_summary(np.subtract(accuracies, base))
