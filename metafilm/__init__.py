"""metafilm: few-shot meta-learning with FiLM adaptation.

The public API: everything a user needs is importable from here (``from metafilm import ...``);
the submodules are the implementation. The training loop alone is imported from its module
(``from metafilm.train import train``): exported here, the function would hide the module
``metafilm.train``. The version is stated here alone (``pyproject.toml`` reads it).

Importing the package tunes glibc's malloc for large activations (see :mod:`metafilm.allocator`;
``METAFILM_TUNE_ALLOCATOR=0`` keeps the defaults); the settings applied are in ``ALLOCATOR``.
"""

from metafilm.allocator import tune_allocator, tune_on_import
from metafilm.any_backbone import ModuleBackbone, adapted_parameters
from metafilm.backbones import Backbone, Conv4, ResNet12, build_backbone
from metafilm.config import RunConfig, load_config
from metafilm.encoder import TaskEncoder
from metafilm.evaluation import evaluate_checkpoint, evaluate_lake, load_trained
from metafilm.export import export_onnx
from metafilm.film import Deviations
from metafilm.heads import (
    HEADS,
    CosineHead,
    Head,
    LinearHead,
    PrototypeHead,
    build_head,
    register_head,
)
from metafilm.inner import inner_loop
from metafilm.interop import as_episode, split_task
from metafilm.learner import FiLMLearner
from metafilm.maml import FiLMClone, FiLMMAML, SupportEncoder
from metafilm.meta import (
    adapt_to_support,
    evaluate,
    input_builder,
    make_optimizer,
    meta_backward,
    meta_step,
    task_loss,
)
from metafilm.network_loader import load_module_backbone
from metafilm.pretrain import pretrain_backbone
from metafilm.report import write_report
from metafilm.specs import AdaptSpec, ModelSpec, OuterSpec
from metafilm.stats import accuracy_summary
from metafilm.subnormals import flushing_subnormals
from metafilm.sweep import run_sweep
from metafilm.task_model import TaskModel, adapt_checkpoint, adapt_task
from metafilm.train import pretrain_run

__version__ = "0.1.0"

ALLOCATOR: dict[str, int] = tune_on_import()

__all__ = [
    "ALLOCATOR",
    "HEADS",
    "AdaptSpec",
    "Backbone",
    "Conv4",
    "CosineHead",
    "Deviations",
    "FiLMClone",
    "FiLMLearner",
    "FiLMMAML",
    "Head",
    "LinearHead",
    "ModelSpec",
    "ModuleBackbone",
    "OuterSpec",
    "PrototypeHead",
    "ResNet12",
    "RunConfig",
    "SupportEncoder",
    "TaskEncoder",
    "TaskModel",
    "__version__",
    "accuracy_summary",
    "adapt_checkpoint",
    "adapt_task",
    "adapt_to_support",
    "adapted_parameters",
    "as_episode",
    "build_backbone",
    "build_head",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_lake",
    "export_onnx",
    "flushing_subnormals",
    "inner_loop",
    "input_builder",
    "load_config",
    "load_module_backbone",
    "load_trained",
    "make_optimizer",
    "meta_backward",
    "meta_step",
    "pretrain_backbone",
    "pretrain_run",
    "register_head",
    "run_sweep",
    "split_task",
    "task_loss",
    "tune_allocator",
    "write_report",
]
