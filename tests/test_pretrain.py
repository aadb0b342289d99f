"""The pretraining stage: its schedule and batches, few-shot validation that picks the backbone,
input normalisation, auxiliary co-training, and exact resume after kill -9."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from episodes.classes import ClassImages, channel_statistics
from episodes.sampler import EpisodeSampler, FixedEpisodes, gather
from metafilm.assemble import build_learner
from metafilm.backbones import Conv4
from metafilm.checkpoint import load_checkpoint
from metafilm.config import ConfigError, PretrainConfig, config_from_dict
from metafilm.learner import FiLMLearner
from metafilm.meta import Auxiliary, auxiliary_weight, make_optimizer, meta_step
from metafilm.pretrain import (
    Validation,
    batch_rows,
    pretrain_backbone,
    pretrain_lr,
    prototype_accuracies,
    total_steps,
)
from metafilm.specs import AdaptSpec, ModelSpec, OuterSpec
from tests.test_resume import assert_same_tensors, metafilm

IMAGE = 16


def _classes(n_classes: int = 6, per_class: int = 10, channels: int = 1, seed: int = 0):
    """Classes of noisy copies of one random pattern each (learnable, like a toy dataset)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 256, (n_classes, channels, IMAGE, IMAGE), generator=g)
    per = []
    for pattern in patterns:
        noise = torch.randint(-40, 41, (per_class, channels, IMAGE, IMAGE), generator=g)
        per.append((pattern + noise).clamp(0, 255).to(torch.uint8))
    return ClassImages.from_arrays(per, [f"c{i}" for i in range(n_classes)])


def test_length_and_cosine_schedule() -> None:
    settings = PretrainConfig(epochs=3, batch_size=64, lr=0.1, schedule="cosine")
    assert total_steps(settings, 1000) == 3 * 15  # 1000 // 64 full batches per epoch
    assert total_steps(PretrainConfig(steps=7, batch_size=64), 1000) == 7
    assert pretrain_lr(settings, 0, 40) == pytest.approx(0.1)
    assert pretrain_lr(settings, 20, 40) == pytest.approx(0.05)
    assert pretrain_lr(settings, 30, 40) == pytest.approx(0.1 * (1 + math.cos(0.75 * math.pi)) / 2)
    assert pretrain_lr(PretrainConfig(lr=0.1), 30, 40) == 0.1


def test_each_epoch_visits_every_image_once_in_a_new_order() -> None:
    epochs = [np.concatenate([batch_rows(5, e * 3 + b, 10, 3) for b in range(3)]) for e in (0, 1)]
    for rows in epochs:
        assert len(rows) == 9 and len(set(rows.tolist())) == 9  # 10 // 3 full batches
        assert set(rows.tolist()) <= set(range(10))
    assert epochs[0].tolist() != epochs[1].tolist()
    assert batch_rows(5, 4, 10, 3).tolist() == epochs[1][3:6].tolist()
    assert batch_rows(5, 0, 10, 3).tolist() == [2, 9, 1]  # pinned: a change of draw is visible


def test_channel_statistics_match_numpy() -> None:
    images = _classes(channels=3).images
    mean, std = channel_statistics(images, chunk=7)
    pixels = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 2, 3)), rtol=1e-9)


def test_a_normalising_backbone_is_the_plain_one_on_standardised_inputs() -> None:
    torch.manual_seed(0)
    plain = Conv4(3, 8, IMAGE, "running")
    normalising = Conv4(3, 8, IMAGE, "running", normalize=True)
    normalising.load_state_dict(plain.state_dict(), strict=False)
    mean, std = [0.2, 0.5, 0.7], [0.1, 0.3, 0.25]
    normalising.set_input_statistics(mean, std)
    x = torch.rand(4, 3, IMAGE, IMAGE)
    standardised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    plain.eval(), normalising.eval()
    torch.testing.assert_close(normalising(x), plain(standardised))
    torch.testing.assert_close(normalising.prefix(x, 2), plain.prefix(standardised, 2))
    torch.testing.assert_close(
        normalising(normalising.prefix(x, 2), start_block=2), plain(standardised)
    )
    assert set(normalising.state_dict()) - set(plain.state_dict()) == {"input_mean", "input_std"}


def test_prototype_accuracies_match_a_hand_computation() -> None:
    classes = _classes()
    torch.manual_seed(1)
    episodes = FixedEpisodes(classes, 3, 2, 3, seed=4, episodes=7)
    for bn_mode in ("running", "episode"):
        backbone = Conv4(1, 8, IMAGE, bn_mode)
        accuracies = prototype_accuracies(backbone, classes, episodes)
        expected = []
        backbone.eval()
        with torch.no_grad():
            for i in range(len(episodes)):
                task = gather(classes, episodes[i]).task(0)
                if bn_mode == "running":
                    support, query = backbone(task.support_x), backbone(task.query_x)
                else:
                    both = backbone(torch.cat([task.support_x, task.query_x]))
                    support, query = both[: len(task.support_x)], both[len(task.support_x) :]
                support, query = support.numpy(), query.numpy()
                prototypes = [support[task.support_y.numpy() == k].mean(0) for k in range(3)]
                distances = [((query - p) ** 2).sum(1) for p in prototypes]
                predicted = np.argmin(np.stack(distances, 1), 1)
                expected.append(np.mean(predicted == task.query_y.numpy()))
        np.testing.assert_allclose(accuracies, expected)


def test_pretraining_keeps_the_backbone_best_on_validation() -> None:
    classes, val_classes = _classes(seed=0), _classes(seed=1)
    episodes = FixedEpisodes(val_classes, 3, 1, 4, seed=0, episodes=20)
    torch.manual_seed(0)
    backbone = Conv4(1, 8, IMAGE, "running")
    seen: list[tuple[int, float]] = []
    settings = PretrainConfig(steps=24, batch_size=16, lr=0.05, val_every=4, checkpoint_every=8)
    checkpoints: list[int] = []
    state = pretrain_backbone(
        backbone,
        classes,
        settings,
        seed=0,
        validation=Validation(val_classes, episodes),
        on_validation=lambda step, acc: seen.append((step, float(acc.mean()))),
        on_checkpoint=lambda now: checkpoints.append(now.step),
    )
    assert [step for step, _ in seen] == [4, 8, 12, 16, 20, 24]
    assert checkpoints == [8, 16, 24]
    best_step, best = max(seen, key=lambda item: (item[1], -item[0]))
    assert (state.best_step, state.best) == (best_step, best)
    assert len({acc for _, acc in seen}) > 1, "validation should change while pretraining"
    assert_same_tensors(backbone.state_dict(), state.best_backbone)
    assert prototype_accuracies(backbone, val_classes, episodes).mean() == pytest.approx(best)


def test_auxiliary_term_adds_its_weighted_classification_gradient() -> None:
    torch.manual_seed(0)
    classes = _classes(channels=1)
    model = ModelSpec(width=8, image_size=IMAGE, bn_mode="episode", film_sites=("block4",))
    learner = FiLMLearner(model, AdaptSpec(inner_steps=1))
    twin = FiLMLearner(model, AdaptSpec(inner_steps=1))
    twin.load_state_dict(learner.state_dict())
    outer = OuterSpec(lr=0.0, grad_clip=None, meta_batch_size=2)
    episode = gather(classes, EpisodeSampler(classes, 3, 1, 2, seed=0).sample(0, 2))
    classifier = torch.nn.Linear(learner.backbone.feature_dim, classes.num_classes)
    images = torch.rand(5, 1, IMAGE, IMAGE)
    labels = torch.tensor([0, 3, 1, 5, 2])
    optimizer = make_optimizer(learner, outer)
    optimizer.add_param_group({"params": list(classifier.parameters())})
    metrics = meta_step(
        learner,
        optimizer,
        episode,
        AdaptSpec(inner_steps=1),
        outer,
        auxiliary=Auxiliary(classifier, images, labels, 0.3),
    )
    meta_step(twin, make_optimizer(twin, outer), episode, AdaptSpec(inner_steps=1), outer)
    # The auxiliary term alone, by plain autograd on a copy of the backbone.
    alone = Conv4(1, 8, IMAGE, "episode")
    alone.load_state_dict(twin.backbone.state_dict())
    loss = F.cross_entropy(
        F.linear(alone(images), classifier.weight.detach(), classifier.bias.detach()), labels
    )
    grads = torch.autograd.grad(0.3 * loss, list(alone.parameters()))
    assert metrics["aux_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, p), twin_p, extra in zip(
        learner.backbone.named_parameters(), twin.backbone.parameters(), grads, strict=True
    ):
        torch.testing.assert_close(p.grad, twin_p.grad + extra, msg=name)
    features = alone(images).detach()
    probabilities = torch.softmax(classifier(features), -1).detach()
    expected = 0.3 * (probabilities - F.one_hot(labels, 6)).T @ features / len(labels)
    torch.testing.assert_close(classifier.weight.grad, expected)


def test_auxiliary_weight_decays_by_steps() -> None:
    outer = OuterSpec(aux_weight=0.9, aux_decay=0.5, aux_decay_every=10)
    assert [auxiliary_weight(outer, s) for s in (0, 9, 10, 25)] == [0.9, 0.9, 0.45, 0.225]
    assert auxiliary_weight(OuterSpec(aux_weight=0.2), 10**6) == 0.2


def _raw(**sections: dict) -> dict:
    raw = {"data": {"ways": 5}, "model": {"width": 8}}
    for name, table in sections.items():
        raw.setdefault(name, {}).update(table)
    return raw


def test_configs_refuse_what_cannot_work() -> None:
    frozen = {"backbone_mode": "frozen", "bn_mode": "running", "film_sites": ["block4"]}
    with pytest.raises(ConfigError, match="outer.aux_weight > 0 trains the backbone"):
        config_from_dict(_raw(model=frozen, outer={"aux_weight": 0.5}))
    config = config_from_dict(_raw(model=frozen, data={"augment_flip": True}))
    with pytest.raises(ConfigError, match="data.augment_flip change training images"):
        build_learner(config)
    assert config_from_dict(_raw(model=frozen)).pretrain.enabled is True
    assert config_from_dict(_raw()).pretrain.enabled is False
    with pytest.raises(ConfigError, match=r"data.augment_jitter = 1.5 must be in \[0, 1\)"):
        config_from_dict(_raw(data={"augment_jitter": 1.5}))


TINY_PRETRAIN = """
[data]
ways = 5
shots = 1
query = 2
normalize = true
augment_crop_padding = 2
augment_flip = true
augment_jitter = 0.3

[model]
width = 8
bn_mode = "running"

[pretrain]
steps = 60
batch_size = 32
optimizer = "sgd"
lr = 0.05
schedule = "cosine"
label_smoothing = 0.1
val_every = 20
checkpoint_every = 5

[train]
log_every = 10
val_episodes = 10
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_pretraining_killed_or_stopped_then_resumed_gives_bit_identical_weights(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path, stop: int
) -> None:
    """kill -9 after a checkpoint at step 25 or later; or SIGTERM with no checkpoint scheduled
    before the end, so that the one kept is the one the stop wrote at its step."""
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config = tmp_path / "pretrain.toml"
    if stop == signal.SIGKILL:
        config.write_text(TINY_PRETRAIN)
    else:
        config.write_text(TINY_PRETRAIN.replace("checkpoint_every = 5", "checkpoint_every = 1000"))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = metafilm("pretrain", config, "--out", whole, **dirs)
    assert done.returncode == 0, done.stderr

    process = metafilm("pretrain", config, "--out", killed, wait=False, **dirs)
    deadline = time.monotonic() + 240
    checkpoint, metrics = killed / "pretrain.pt", killed / "pretrain_metrics.jsonl"

    def ready() -> bool:
        if stop == signal.SIGTERM:
            return metrics.exists() and bool(metrics.read_text())
        return checkpoint.exists() and load_checkpoint(checkpoint)["step"] >= 25

    while not ready():
        assert process.poll() is None, "pretraining ended before it could be stopped"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.05)
    process.send_signal(stop)
    assert process.wait() == (143 if stop == signal.SIGTERM else -signal.SIGKILL)
    assert not (killed / "backbone.pt").exists()
    assert (10 if stop == signal.SIGTERM else 25) <= load_checkpoint(checkpoint)["step"] < 60

    resumed = metafilm("pretrain", config, "--out", killed, "--resume", **dirs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming pretraining from step" in resumed.stderr

    a, b = load_checkpoint(whole / "backbone.pt"), load_checkpoint(killed / "backbone.pt")
    assert_same_tensors(a["backbone"], b["backbone"])
    assert a["pretrain"]["best_step"] == b["pretrain"]["best_step"]
    assert a["pretrain"]["best_val_accuracy"] == b["pretrain"]["best_val_accuracy"]
    last_a, last_b = load_checkpoint(whole / "pretrain.pt"), load_checkpoint(killed / "pretrain.pt")
    assert last_a["step"] == last_b["step"] == 60
    assert_same_tensors(last_a["backbone"], last_b["backbone"])
    assert_same_tensors(last_a["classifier"], last_b["classifier"])
    rows = _rows_without_time(killed / "pretrain_metrics.jsonl")
    assert rows == _rows_without_time(whole / "pretrain_metrics.jsonl")
    assert [row["step"] for row in rows] == [10, 20, 30, 40, 50, 60]
    assert all("val_accuracy" in row for row in rows if row["step"] % 20 == 0)
    mean = a["backbone"]["input_mean"]
    assert mean.shape == (1,) and 0.05 < float(mean) < 0.95  # Omniglot: mostly white strokes


def _rows_without_time(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]
