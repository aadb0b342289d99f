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

    backbone: str = "conv4"
    """``"conv4"``, ``"resnet12"``, or a user's network, ``"package.module:factory"`` (the factory
    called with no arguments returns the ``nn.Module``; FiLM acts at its normalisation layers,
    :mod:`metafilm.any_backbone`)."""
    weights: str = ""
    """A user's network only: a state-dict file loaded into it (``torch.load(weights_only=True)``)
    before training; empty: the factory's own initial weights."""
    width: int = 64
    in_channels: int = 1
    image_size: int = 28
    film_sites: tuple[str, ...] | Literal["all"] = "all"
    bn_mode: BatchNormMode = "episode"
    encoder: Literal["linear", "mlp", "none"] = "linear"
    encoder_hidden: int = 256
    head: Literal["prototype", "cosine", "linear"] = "prototype"
    metric_scale: float = 1.0
    """Initial metric scale of the prototype or cosine head (TADAM). Meta-Baseline starts its
    cosine head at 10."""
    learn_metric_scale: bool = True
    """Whether the outer loop learns the metric scale (TADAM) or keeps it at ``metric_scale``."""
    head_ways: int = 5
    backbone_mode: Literal["outer", "frozen"] = "outer"
    normalize: bool = False
    """Standardise each input channel by the training split's mean and std (buffers of the
    backbone, filled from the data before training and saved with the weights)."""


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
    lr_decay: float = 1.0
    """Factor applied to ``lr`` every ``lr_decay_every`` steps (ProtoNets halved it every 2000
    episodes, CAVIA took 0.9 every 5000)."""
    lr_decay_every: int = 0
    """Steps between two decays; 0: a constant learning rate."""
    meta_batch_size: int = 32
    film_l2: float = 1e-3
    """Weight of the squared size of the adapted deviations in the outer loss."""
    postmult_l2: float = 1e-2
    """Weight of the squared encoder post-multipliers in the outer loss (TADAM used 0.01)."""
    encoder_weight_decay: float = 1e-4
    """Adam weight decay of the encoder's predictor (and of nothing else)."""
    grad_clip: float | None = 10.0
    """Largest norm of the meta-gradient (all trainable parameters together); None: no clipping."""
    aux_weight: float = 0.0
    """TADAM's auxiliary co-training: weight of a classification loss over all training classes
    (a linear classifier on the unmodulated backbone embedding of ``aux_batch_size`` training
    images per step), added to the outer objective; 0: off. Needs an outer-trained backbone."""
    aux_decay: float = 1.0
    """Factor applied to ``aux_weight`` every ``aux_decay_every`` steps (TADAM annealed it)."""
    aux_decay_every: int = 0
    """Steps between two decays of the auxiliary weight; 0: a constant weight."""
    aux_batch_size: int = 64
    strategy: Literal["auto", "loop", "vmap"] = "auto"
    """How a meta-batch is computed: ``loop``, task after task, each back-propagated at once (the
    memory of one task; the faster for a full backbone on CPU), or ``vmap``, all tasks together
    (several times faster when the per-task work is small, e.g. a frozen backbone with a cached
    prefix; needs batch norm that updates no running statistics); ``auto`` picks ``vmap`` for
    cached prefix features and ``loop`` otherwise, as measured on CPU."""
