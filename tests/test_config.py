"""Config loading and validation: every bad input stops with one message naming the key."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
import torch

from episodes.classes import ClassImages
from episodes.sampler import EpisodeSampler, FixedEpisodes
from metafilm.assemble import build_learner
from metafilm.config import (
    ConfigError,
    config_from_dict,
    config_hash,
    episodes_fitting,
    load_config,
    parse_override,
    to_toml,
    trajectory_differences,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.toml"))


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    return str(caught.value)


def test_defaults_resolve_derived_settings() -> None:
    config = config_from_dict({"data": {"ways": 20, "shots": 5}, "adapt": {"inner_steps": 3}})
    assert config.data.image_size == 28
    assert (config.model.image_size, config.model.in_channels) == (28, 1)
    assert config.model.head_ways == 20
    assert config.eval.ways == (20,) and config.eval.shots == (5,)
    assert config.eval.inner_steps == 3
    assert config.eval.bn_mode == config.model.bn_mode == "episode"
    running = config_from_dict({"model": {"bn_mode": "running"}})
    assert running.eval.bn_mode == "running"
    transductive = {"model": {"bn_mode": "running"}, "eval": {"bn_mode": "episode"}}
    assert config_from_dict(transductive).eval.bn_mode == "episode"
    with pytest.raises(ConfigError, match='eval.bn_mode = "running" needs running statistics'):
        config_from_dict({"eval": {"bn_mode": "running"}})
    mini = config_from_dict({"data": {"dataset": "miniimagenet"}})
    assert (mini.model.image_size, mini.model.in_channels) == (84, 3)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"widht": 32}}, "unknown setting model.widht (did you mean model.width?)"),
        (
            {"model": {"inner_lr": 0.1}},
            "unknown setting model.inner_lr (did you mean adapt.inner_lr?)",
        ),
        ({"modle": {"width": 32}}, "unknown section [modle] (did you mean [model]?)"),
        ({"train": {"stpes": 10}}, "did you mean train.steps?"),
    ],
)
def test_unknown_keys_suggest_the_closest(raw: dict, expected: str) -> None:
    assert expected in error_of(raw)


@pytest.mark.parametrize(
    ("raw", "key", "detail"),
    [
        ({"model": {"width": "wide"}}, "model.width", "expected an integer"),
        ({"model": {"width": 32.5}}, "model.width", "expected an integer"),
        ({"data": {"ways": True}}, "data.ways", "expected an integer"),
        ({"data": {"augment_rotations": 1}}, "data.augment_rotations", "expected true or false"),
        ({"adapt": {"inner_lr": "fast"}}, "adapt.inner_lr", "expected a number"),
        ({"model": {"film_sites": [1, 2]}}, "model.film_sites", "a list of strings or 'all'"),
        ({"model": {"bn_mode": "runing"}}, "model.bn_mode", "did you mean 'running'?"),
        ({"data": {"dataset": "omniglott"}}, "data.dataset", "did you mean 'omniglot'?"),
        ({"data": "omniglot"}, "data", "must be a section"),
    ],
)
def test_wrong_types_name_the_key(raw: dict, key: str, detail: str) -> None:
    message = error_of(raw)
    assert key in message and detail in message


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"adapt": {"inner_lr": -0.1}}, "adapt.inner_lr"),
        ({"adapt": {"inner_steps": -1}}, "adapt.inner_steps"),
        ({"outer": {"lr": 0}}, "outer.lr"),
        ({"outer": {"lr": float("nan")}}, "outer.lr"),
        ({"outer": {"meta_batch_size": 0}}, "outer.meta_batch_size"),
        ({"outer": {"grad_clip": -1.0}}, "outer.grad_clip"),
        ({"data": {"ways": 1}}, "data.ways"),
        ({"data": {"shots": 0}}, "data.shots"),
        ({"data": {"query": 0}}, "data.query"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"seed": -3}}, "train.seed"),
        ({"train": {"checkpoint_every": 0}}, "train.checkpoint_every"),
        ({"eval": {"ways": [5, 1]}}, "eval.ways"),
        ({"model": {"width": 0}}, "model.width"),
    ],
)
def test_impossible_values_name_the_key(raw: dict, key: str) -> None:
    message = error_of(raw)
    assert message.startswith(key), message


def test_derived_model_settings_are_refused_with_the_setting_they_follow() -> None:
    assert "data.image_size" in error_of({"model": {"image_size": 84}})
    assert "data.ways" in error_of({"model": {"head_ways": 20}})


def test_split_names_are_checked_per_dataset() -> None:
    message = error_of({"data": {"train_split": "trian"}})
    assert "data.train_split" in message and "did you mean 'train'?" in message
    message = error_of({"data": {"dataset": "miniimagenet", "val_split": "trainval"}})
    assert "data.val_split" in message and "miniimagenet" in message
    assert "eval.split" in error_of({"eval": {"split": "tset"}})


def test_alphabets_are_omniglot_only_and_validation_never_sees_training_characters() -> None:
    held_out = {"train_split": "background", "val_split": "background"}
    config = config_from_dict(
        {"data": {**held_out, "train_alphabets": ["Greek", "Latin"], "val_alphabets": ["Korean"]}}
    )
    assert (config.data.train_alphabets, config.data.val_alphabets) == (
        ("Greek", "Latin"),
        ("Korean",),
    )
    message = error_of({"data": {**held_out, "train_alphabets": ["Greek"]}})
    assert "share all of them" in message
    overlap = {"train_alphabets": ["Greek", "Latin"], "val_alphabets": ["Latin"]}
    assert "share Latin" in error_of({"data": {**held_out, **overlap}})
    assert "data.val_alphabets is empty" in error_of({"data": {"val_alphabets": []}})
    message = error_of({"data": {"dataset": "miniimagenet", "train_alphabets": ["Greek"]}})
    assert message.startswith("data.train_alphabets is about Omniglot alphabets")
    message = error_of({"data": {"dataset": "miniimagenet"}, "eval": {"within_alphabet": True}})
    assert message.startswith("eval.within_alphabet is about Omniglot alphabets")
    assert "eval.alphabets is empty" in error_of({"eval": {"alphabets": []}})
    config = config_from_dict({"data": {"within_alphabet": True}, "eval": {"alphabets": ["Greek"]}})
    assert (config.data.within_alphabet, config.eval.alphabets) == (True, ("Greek",))


def test_optional_values_and_single_numbers() -> None:
    config = config_from_dict({"outer": {"grad_clip": "none"}, "eval": {"ways": 20}})
    assert config.outer.grad_clip is None
    assert config.eval.ways == (20,)
    config = config_from_dict({"model": {"film_sites": ["block1", "block3"]}})
    assert config.model.film_sites == ("block1", "block3")


def test_overrides_are_parsed_and_validated_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[model]\nwidth = 64\n[data]\nways = 5\n")
    config = load_config(
        path,
        [
            "model.width=32",
            "adapt.inner_lr=1e-2",
            "data.dataset=omniglot",
            'model.film_sites=["block4"]',
            "data.augment_rotations=true",
        ],
    )
    assert config.model.width == 32
    assert config.adapt.inner_lr == 0.01
    assert config.model.film_sites == ("block4",)
    assert config.data.augment_rotations is True
    with pytest.raises(ConfigError, match=r"^adapt\.inner_lr = -1\.0 must not be negative"):
        load_config(path, ["adapt.inner_lr=-1"])
    with pytest.raises(ConfigError, match=r"did you mean model\.width\?"):
        load_config(path, ["model.widht=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["model.width"])
    with pytest.raises(
        ConfigError, match=r"unknown section 'modle' \(did you mean model\.width\?\)"
    ):
        load_config(path, ["modle.width=3"])
    assert parse_override("train.steps = 7") == ("train", "steps", 7)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nwidth = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_saved_toml_reads_back_to_the_same_config(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "model": {"film_sites": ["block2"], "width": 16},
            "outer": {"grad_clip": "none", "lr": 3e-4},
            "eval": {"ways": [5, 20], "shots": [1, 5]},
        }
    )
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config
    assert tomllib.loads(to_toml(config))["outer"]["grad_clip"] == "none"


def test_hash_covers_the_trajectory_but_not_paths_or_length() -> None:
    config = config_from_dict({})
    longer = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=99))
    moved = dataclasses.replace(config, data=dataclasses.replace(config.data, root="/elsewhere"))
    other = config_from_dict({"adapt": {"inner_lr": 0.5}})
    assert config_hash(config) == config_hash(longer) == config_hash(moved)
    assert config_hash(config) != config_hash(other)
    assert trajectory_differences(config, longer) == []
    assert trajectory_differences(config, other) == ["adapt.inner_lr: 0.1 -> 0.5"]


def small_split(classes: int, images: int) -> ClassImages:
    per_class = [torch.full((images, 1, 4, 4), c, dtype=torch.uint8) for c in range(classes)]
    return ClassImages.from_arrays(per_class, [f"class{c}" for c in range(classes)])


def test_ways_above_the_split_classes_names_the_settings() -> None:
    split = small_split(classes=4, images=6)
    with pytest.raises(ConfigError) as caught:
        episodes_fitting(
            "data.ways / data.shots / data.query",
            "train",
            lambda: EpisodeSampler(split, 5, 1, 1, seed=0),
        )
    message = str(caught.value)
    assert message.startswith("data.ways / data.shots / data.query do not fit the 'train' split")
    assert "ways=5 exceeds the 4 classes" in message


def test_shots_plus_query_above_images_per_class_names_the_settings() -> None:
    split = small_split(classes=4, images=6)
    with pytest.raises(ConfigError) as caught:
        episodes_fitting(
            "eval.ways / eval.shots / eval.query",
            "test",
            lambda: FixedEpisodes(split, 3, 2, 5, seed=1, episodes=10),
        )
    message = str(caught.value)
    assert message.startswith("eval.ways / eval.shots / eval.query do not fit the 'test' split")
    assert "shots + query = 2 + 5 = 7 exceeds the 6 images" in message
    assert isinstance(
        episodes_fitting("x", "test", lambda: FixedEpisodes(split, 3, 2, 4, seed=1, episodes=2)),
        FixedEpisodes,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    """Every setting written in a shipped config is the one the run gets, read independently
    with tomllib, and the saved form (`config.toml` of a run) reads back to the same config."""
    config = load_config(path)
    with path.open("rb") as file:
        written = tomllib.load(file)
    assert written, f"{path} sets nothing"
    for section, table in written.items():
        for key, value in table.items():
            got = getattr(getattr(config, section), key)
            want = tuple(value) if isinstance(value, list) else value
            if want == "none" and got is None:  # how a TOML file writes None
                want = None
            assert got == want, f"{section}.{key}"
            assert isinstance(got, bool) == isinstance(want, bool), f"{section}.{key}"
    assert config_from_dict(tomllib.loads(to_toml(config))) == config


def test_the_shipped_configs_cover_the_documented_setups() -> None:
    names = {path.stem for path in CONFIGS}
    assert {
        "quickstart",
        "omniglot-5way-1shot",
        "omniglot-5way-5shot",
        "omniglot-20way-1shot",
        "omniglot-20way-5shot",
        "omniglot-frozen",
        "miniimagenet-maml",
        "miniimagenet-cavia",
        "miniimagenet-tadam",
    } <= names


@pytest.mark.parametrize("augmentation", ["augment_rotations", "augment_affine"])
def test_augmentation_is_refused_where_the_backbone_prefix_is_cached(augmentation: str) -> None:
    frozen = {"backbone_mode": "frozen", "bn_mode": "running"}
    cached = config_from_dict(
        {"data": {augmentation: True}, "model": {**frozen, "film_sites": ["block4"]}}
    )
    with pytest.raises(ConfigError, match=rf"^data\.{augmentation} change training images"):
        build_learner(cached)
    for model in ({**frozen, "film_sites": "all"}, {"bn_mode": "running"}):
        assert build_learner(config_from_dict({"data": {augmentation: True}, "model": model}))
