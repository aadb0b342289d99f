"""The miniImageNet configs of published protocols (TADAM, MAML, CAVIA), meant for a GPU, are
valid as shipped and run end to end on the real images on a CPU: a few meta-training steps of a
narrow copy, a checkpoint, and a test evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metafilm.assemble import build_learner
from metafilm.config import load_config
from metafilm.evaluation import evaluate_checkpoint
from metafilm.train import train

pytestmark = [pytest.mark.slow, pytest.mark.data, pytest.mark.usefixtures("one_thread")]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

SHIPPED = {
    "miniimagenet-tadam": {"backbone": "resnet12", "encoder": "mlp", "inner_steps": 0},
    "miniimagenet-maml": {"backbone": "conv4", "encoder": "linear", "inner_steps": 5},
    "miniimagenet-cavia": {"backbone": "conv4", "encoder": "none", "inner_steps": 2},
}

A_FEW_STEPS = [
    "model.width=4",
    "data.query=2",
    "outer.meta_batch_size=1",
    "outer.aux_batch_size=4",
    "train.steps=3",
    "train.val_every=2",
    "train.val_episodes=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_published_protocol_configs_run_a_few_steps_on_the_real_images(
    name: str, miniimagenet_root: Path, omniglot_cache_dir: Path, tmp_path: Path
) -> None:
    path = CONFIGS / f"{name}.toml"
    shipped = load_config(path)
    expected = SHIPPED[name]
    assert shipped.model.backbone == expected["backbone"]
    assert shipped.model.encoder == expected["encoder"]
    assert shipped.adapt.inner_steps == expected["inner_steps"]
    build_learner(shipped)  # the full-size model is accepted as shipped
    data = [f"data.root={miniimagenet_root}", f"data.cache_dir={omniglot_cache_dir}"]
    config = load_config(path, [*A_FEW_STEPS, *data])
    result = train(config, tmp_path / name)
    assert result.step == 3 and result.best_val_accuracy is not None
    rows = [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    if shipped.outer.aux_weight > 0:
        assert all(row["aux_loss"] > 0 for row in rows)
    [written] = evaluate_checkpoint(
        tmp_path / name / "last.pt", {"episodes": 2, "shots": [1], "query": 2}
    )
    record = json.loads(written.read_text())
    assert record["split"] == "test" and len(record["accuracies"]) == 2
