"""Published few-shot accuracies, with their protocols, to set beside a report's own.

Figures from the papers and the authors' code (percent); '±' is a 95% CI unless the protocol note
says otherwise. `metafilm report --compare-published` shows those of the benchmark and setting of
each evaluation (`published_matches`), so that a reader compares only where the protocols agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Published:
    """One published figure: accuracy in percent, its ± (None if not given), and its protocol."""

    method: str
    backbone: str
    dataset: str
    ways: int
    shots: int
    accuracy: float
    plus_minus: float | None
    protocol: str
    decimals: int = 1
    """Decimals as published."""


def _published_table() -> tuple[Published, ...]:
    """Published results (percent) with their protocol notes, from the papers and the authors'
    code; '±' is a 95% CI unless the protocol note says otherwise."""
    omniglot = "Conv-4"
    rows: list[Published] = []
    settings = ((5, 1), (5, 5), (20, 1), (20, 5))
    for method, backbone, figures, protocol in (
        (
            "MAML (Finn 2017)",
            omniglot,
            ((98.7, 0.4), (99.9, 0.1), (95.8, 0.3), (98.9, 0.2)),
            "600 test tasks, seed 1, batch statistics at test (transductive BN)",
        ),
        (
            "MAML, fully connected net",
            "MLP",
            ((89.7, 1.1), (97.5, 0.6), None, None),
            "600 test tasks, seed 1, transductive BN",
        ),
        (
            "Prototypical Networks (Snell 2017)",
            omniglot,
            ((98.8, None), (99.7, None), (96.0, None), (98.9, None)),
            "1000 test episodes, no CI, model in eval mode; trained 60-way",
        ),
        (
            "ANIL (Raghu 2020)",
            omniglot,
            (None, None, (96.2, None), (98.0, None)),
            "± in the paper is the std over 3 seeds, not a CI",
        ),
        (
            "learn2learn MAML example",
            omniglot,
            ((99.1, None), None, None, None),
            "no CI, protocol not stated",
        ),
    ):
        for (ways, shots), figure in zip(settings, figures, strict=True):
            if figure is not None:
                rows.append(Published(method, backbone, "omniglot", ways, shots, *figure, protocol))
    for method, backbone, one_shot, five_shot, protocol in (
        (
            "MAML",
            "Conv-4, 32 filters",
            (48.70, 1.84),
            (63.11, 0.92),
            "600 tasks; query = K per class; 5 inner steps train, 10 test",
        ),
        (
            "first-order MAML",
            "Conv-4, 32 filters",
            (48.07, 1.75),
            (63.15, 0.91),
            "600 tasks; query = K per class; 5 inner steps train, 10 test",
        ),
        (
            "Prototypical Networks",
            "Conv-4, 64 filters",
            (49.42, 0.78),
            (68.20, 0.66),
            "600 episodes, 15 query per class",
        ),
        (
            "CAVIA (Zintgraf 2019)",
            "Conv-4, 32 filters",
            (47.24, 0.65),
            (59.05, 0.54),
            "15 query per class, transductive BN",
        ),
        (
            "CAVIA",
            "Conv-4, 128 filters",
            (49.84, 0.68),
            (64.63, 0.54),
            "15 query per class, transductive BN",
        ),
        (
            "CAVIA",
            "Conv-4, 512 filters",
            (51.82, 0.65),
            (65.85, 0.55),
            "15 query per class, transductive BN; first-order: 49.92 / 63.59",
        ),
        (
            "TADAM (Oreshkin 2018)",
            "ResNet-12",
            (58.5, 0.3),
            (76.7, 0.3),
            "10 restarts x 500 tasks, 100 query per task",
        ),
        ("Simple CNAPs", "ResNet-18 + FiLM", (53.2, 0.9), (70.8, 0.7), "600 tasks"),
    ):
        decimals = 1 if backbone.startswith("ResNet") else 2
        for shots, figure in ((1, one_shot), (5, five_shot)):
            rows.append(
                Published(method, backbone, "miniimagenet", 5, shots, *figure, protocol, decimals)
            )
    return tuple(rows)


PUBLISHED: tuple[Published, ...] = _published_table()
PUBLISHED_SOURCES = {
    "omniglot": "Omniglot, Vinyals split (1200 training characters x4 rotations, 423 test), 28x28",
    "miniimagenet": "miniImageNet, Ravi & Larochelle split (64 / 16 / 20 classes), 84x84, 5-way",
}


LAKE_PUBLISHED = "people 4.5%, Bayesian Program Learning 3.3%, a deep Siamese convnet 8.0%"
"""Error rates on the Lake et al. (2015) one-shot runs, as published there."""


def published_matches(result: Mapping[str, Any]) -> list[Published]:
    """The published figures of the dataset, ways and shots of an evaluation result."""
    return [
        row
        for row in PUBLISHED
        if (row.dataset, row.ways, row.shots)
        == (result["dataset"], result["ways"], result["shots"])
    ]
