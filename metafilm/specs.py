"""Plain settings objects shared by the library, the CLI and the benchmarks.

They hold what a run is, not how it is computed; the maths read them, only the CLI reads files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BatchNormMode = Literal["episode", "running"]
"""`episode`: batch norm always normalises with the statistics of the batch it sees (transductive,
as MAML and CAVIA). `running`: batch statistics in training, running statistics at evaluation."""


@dataclass(frozen=True)
class ModelSpec:
    """The network: backbone, where FiLM acts, how a task's starting deviations are predicted."""

    backbone: Literal["conv4", "resnet12"] = "conv4"
    width: int = 64
    in_channels: int = 1
    image_size: int = 28
    film_sites: tuple[str, ...] | Literal["all"] = "all"
    bn_mode: BatchNormMode = "episode"
    encoder: Literal["linear", "mlp", "none"] = "linear"
    encoder_hidden: int = 256
    head: Literal["prototype", "linear"] = "prototype"
    head_ways: int = 5
    backbone_mode: Literal["outer", "frozen"] = "outer"


@dataclass(frozen=True)
class AdaptSpec:
    """The inner loop: SGD on the FiLM deviations only."""

    inner_steps: int = 1
    inner_lr: float = 0.1
    first_order: bool = False
    learn_inner_lr: bool = False
    film_l2: float = 0.0


@dataclass(frozen=True)
class OuterSpec:
    """The outer loop: optimiser and the regularisers, each with its own weight."""

    lr: float = 1e-3
    meta_batch_size: int = 32
    film_l2: float = 1e-3
    postmult_l2: float = 1e-2
    encoder_weight_decay: float = 1e-4
    grad_clip: float | None = 10.0
    strategy: Literal["loop", "vmap"] = "loop"
