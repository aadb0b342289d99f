"""metafilm: few-shot meta-learning with FiLM adaptation.

Importing the package tunes glibc's malloc for large activations (see :mod:`metafilm.allocator`;
``METAFILM_TUNE_ALLOCATOR=0`` keeps the defaults); the settings applied are in ``ALLOCATOR``.
"""

from metafilm.allocator import tune_allocator, tune_on_import
from metafilm.encoder import TaskEncoder
from metafilm.heads import LinearHead, PrototypeHead
from metafilm.inner import adapt
from metafilm.interop import as_episode, split_task
from metafilm.learner import FiLMLearner
from metafilm.maml import FiLMClone, FiLMMAML, SupportEncoder
from metafilm.meta import (
    evaluate,
    input_builder,
    make_optimizer,
    meta_backward,
    meta_step,
    task_loss,
)
from metafilm.pretrain import pretrain_backbone
from metafilm.specs import AdaptSpec, ModelSpec, OuterSpec

__version__ = "0.1.0"

ALLOCATOR: dict[str, int] = tune_on_import()

__all__ = [
    "ALLOCATOR",
    "AdaptSpec",
    "FiLMClone",
    "FiLMLearner",
    "FiLMMAML",
    "LinearHead",
    "ModelSpec",
    "OuterSpec",
    "PrototypeHead",
    "SupportEncoder",
    "TaskEncoder",
    "adapt",
    "as_episode",
    "evaluate",
    "input_builder",
    "make_optimizer",
    "meta_backward",
    "meta_step",
    "pretrain_backbone",
    "split_task",
    "task_loss",
    "tune_allocator",
]
