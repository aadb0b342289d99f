"""Run configuration: a TOML file (plus `--set section.key=value` overrides) -> one `RunConfig`.

Everything is validated on load, before any work starts: an unknown section or key (with the
closest valid name suggested), a value of the wrong type, or an impossible value stops with one
`ConfigError` naming the key. What depends on the data (ways against a split's classes, shots +
query against its images per class) is checked by `episodes_fitting` once the split is loaded,
still before training.

Settings that are derived are not written: `[model]` takes its `image_size` from
`data.image_size`, `in_channels` from the dataset and `head_ways` from `data.ways`. Defaults that
depend on other settings (`data.image_size`, `eval.ways`, `eval.shots`, `eval.inner_steps`,
`eval.bn_mode`) are resolved on load, so the saved `config.toml` of a run states every value it
used.

TOML has no null: optional settings take the string "none" (`outer.grad_clip = "none"`).

One job, the config: its schema (every section's settings, each documented where it is declared)
and the checks that go with each, which is why the module runs past 600 lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from episodes import folder, miniimagenet, omniglot
from metafilm.errors import ConfigError
from metafilm.specs import AdaptSpec, BatchNormMode, ModelSpec, OuterSpec

DATASETS: dict[str, dict[str, Any]] = {
    "omniglot": {"channels": 1, "image_size": 28, "splits": omniglot.SPLITS},
    "miniimagenet": {"channels": 3, "image_size": 84, "splits": miniimagenet.SPLITS},
    "folder": {"channels": 3, "image_size": 84, "splits": folder.SPLITS},
}
"""Per dataset: image channels (the default of data.channels), the conventional image size (the
default of data.image_size) and the split names its loader knows."""

_SEED_LIMIT = 2**32
_Source = TypeVar("_Source")


@dataclass(frozen=True)
class DataConfig:
    """Which benchmark, where it lives, and the shape of the training episodes."""

    dataset: Literal["omniglot", "miniimagenet", "folder"] = "omniglot"
    root: str = ""
    """Data root; empty: the environment variable METAFILM_DATA_ROOT. For "folder": the folder of
    class subfolders itself (`episodes.folder`), required."""
    cache_dir: str = ""
    """Cache folder; empty: METAFILM_CACHE_DIR, else ~/.cache/metafilm."""
    format: Literal["auto", "pickle", "hdf5", "jpeg"] = "auto"
    """miniImageNet file format (ignored for Omniglot)."""
    image_size: int | None = None
    """None: the dataset's conventional size (Omniglot 28, miniImageNet 84, a folder 84)."""
    channels: int | None = None
    """Image channels, 1 (grey) or 3 (RGB); only a folder's may be chosen. None: the dataset's."""
    class_lists: str = ""
    """Folder only: a folder holding train.txt, val.txt and test.txt, the class names of each
    split (one per line); empty: a seeded random `split_fractions` of the classes."""
    split_fractions: tuple[float, float, float] = folder.DEFAULT_FRACTIONS
    """Folder only, without class lists: the fractions of the classes in train, val and test."""
    split_seed: int = 0
    """Folder only, without class lists: the seed of the classes' shuffle before the cut."""
    train_split: str = "train"
    val_split: str = "val"
    ways: int = 5
    shots: int = 1
    query: int = 15
    augment_rotations: bool = False
    augment_affine: bool = False
    """Distort every training image by its own random affine map (Koch et al.'s ranges, see
    `episodes.distort`); validation and test images are never distorted."""
    normalize: bool = False
    """Standardise each input channel by the mean and std of the training split's pixels
    (computed once at the start of a run and saved with the model's weights)."""
    augment_crop_padding: int = 0
    """Photos: crop each training image at a random offset out of the image padded by this many
    pixels (reflection) on every side; 0: off (`episodes.photo`)."""
    augment_flip: bool = False
    """Photos: flip each training image horizontally with probability 1/2."""
    augment_jitter: float = 0.0
    """Photos: colour jitter; brightness, contrast and saturation factors each drawn in
    [1 - jitter, 1 + jitter]; 0: off."""
    train_alphabets: tuple[str, ...] | None = None
    """Omniglot only: train on these alphabets of `train_split` alone; None: all of them."""
    val_alphabets: tuple[str, ...] | None = None
    """Omniglot only: validate on these alphabets of `val_split` alone, e.g. background alphabets
    held out of training (the protocol of Lake et al.'s one-shot runs); None: all of them."""
    within_alphabet: bool = False
    """Omniglot only: draw each training and validation task's classes from one alphabet (as in
    Lake et al.'s one-shot runs), not from the whole split."""


@dataclass(frozen=True)
class TrainConfig:
    """The outer loop's length, seed and bookkeeping."""

    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    val_every: int = 100
    """Validate every this many steps (and at the last step); 0: never."""
    val_episodes: int = 100
    val_seed: int = 0
    checkpoint_every: int = 100


@dataclass(frozen=True)
class PretrainConfig:
    """Backbone pretraining: classification over all training classes (`metafilm.pretrain`),
    with the training augmentation of [data], before meta-training."""

    enabled: bool | None = None
    """Pretrain before meta-training; None: exactly when the backbone is frozen. An
    outer-trained backbone then starts from the pretrained weights."""
    steps: int = 2000
    """Length in steps when `epochs` is "none"."""
    epochs: int | None = None
    """Length in passes over the training split (each of `images // batch_size` steps)."""
    batch_size: int = 64
    optimizer: Literal["adam", "sgd"] = "adam"
    """`sgd`: Nesterov momentum 0.9."""
    lr: float = 1e-3
    schedule: Literal["constant", "cosine"] = "constant"
    """`cosine`: the learning rate follows a half cosine from `lr` to 0 over the whole length."""
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    val_every: int = 0
    """Every this many steps (and at the end), the few-shot accuracy of the backbone's
    embedding on the fixed validation episodes of [train] (nearest prototype); the backbone
    kept is the best one on them. 0: never; the last backbone is kept."""
    checkpoint_every: int = 500
    """Steps between two resumable pretraining checkpoints."""
    backbone: str = ""
    """A backbone file written by `metafilm pretrain` to start from (frozen or outer-trained);
    empty: pretrain in the run when `enabled`."""


@dataclass(frozen=True)
class EvalConfig:
    """Defaults of `metafilm evaluate`: the fixed test episodes and the test-time inner loop."""

    split: str = "test"
    alphabets: tuple[str, ...] | None = None
    """Omniglot only: test on these alphabets of `split` alone (e.g. a run's held-out validation
    alphabets); None: all of them."""
    within_alphabet: bool = False
    """Omniglot only: draw each test episode's classes from one alphabet."""
    ways: tuple[int, ...] | None = None
    """None: the training ways."""
    shots: tuple[int, ...] | None = None
    """None: the training shots."""
    query: int = 15
    episodes: int = 600
    seed: int = 1
    inner_steps: int | None = None
    """None: the training inner steps."""
    bn_mode: BatchNormMode | None = None
    """Batch norm at test time. None: the model's own `model.bn_mode`. A model trained with
    `"running"` can also be tested with `"episode"` statistics (transductive), so that one run
    reports both protocols; an `"episode"` model keeps no running statistics to test with."""


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one frozen settings object per TOML section."""

    data: DataConfig
    model: ModelSpec
    adapt: AdaptSpec
    outer: OuterSpec
    train: TrainConfig
    pretrain: PretrainConfig
    eval: EvalConfig


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelSpec,
    "adapt": AdaptSpec,
    "outer": OuterSpec,
    "train": TrainConfig,
    "pretrain": PretrainConfig,
    "eval": EvalConfig,
}

MODEL_DERIVED: dict[str, str] = {
    "image_size": "data.image_size",
    "in_channels": "data.channels",
    "head_ways": "data.ways",
    "normalize": "data.normalize",
}
"""ModelSpec fields not written in [model]: the setting each one follows."""

RESUME_MAY_CHANGE: frozenset[str] = frozenset(
    {"data.root", "data.cache_dir", "data.format", "train.steps"}
)
"""Keys a resumed run may change (where the files are, and how long to train); the [eval]
section never affects training either. Anything else would change the trajectory."""


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be at least {low}"


def _seed() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: 0 <= v < _SEED_LIMIT), "must be in 0 .. 2**32 - 1"


_NON_NEGATIVE = ((lambda v: v >= 0), "must not be negative")
_POSITIVE = ((lambda v: v > 0), "must be positive")

FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: every number setting must fit (torch turns them into float32 tensors)."""
ADAM_LR_MAX = FLOAT32_MAX * (1 - 0.9)
"""The largest `outer.lr` and `pretrain.lr`: Adam's first step divides it by 1 - beta1 (torch's
default 0.9, which `metafilm.meta.make_optimizer` keeps), and float32 must hold the quotient."""

_ADAM_LR = (
    (lambda v: 0 < v <= ADAM_LR_MAX),
    "must be positive and at most 3.4e37: Adam's first step divides it by 1 - beta1 = 0.1, "
    "and float32 must hold the result",
)
_VALUE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.image_size": _at_least(1),
    "data.channels": ((lambda v: v in (1, 3)), "must be 1 (grey) or 3 (RGB)"),
    "data.split_seed": _seed(),
    "data.ways": _at_least(2),
    "data.shots": _at_least(1),
    "data.query": _at_least(1),
    "model.width": _at_least(1),
    "model.encoder_hidden": _at_least(1),
    "model.metric_scale": _POSITIVE,
    "adapt.inner_steps": _NON_NEGATIVE,
    "adapt.inner_lr": _NON_NEGATIVE,
    "adapt.film_l2": _NON_NEGATIVE,
    "outer.lr": _ADAM_LR,
    "outer.lr_decay": ((lambda v: 0 < v <= 1), "must be in (0, 1]"),
    "outer.lr_decay_every": _NON_NEGATIVE,
    "outer.meta_batch_size": _at_least(1),
    "outer.film_l2": _NON_NEGATIVE,
    "outer.postmult_l2": _NON_NEGATIVE,
    "outer.encoder_weight_decay": _NON_NEGATIVE,
    "outer.grad_clip": _POSITIVE,
    "train.steps": _at_least(1),
    "train.seed": _seed(),
    "train.log_every": _at_least(1),
    "train.val_every": _NON_NEGATIVE,
    "train.val_episodes": _at_least(1),
    "train.val_seed": _seed(),
    "train.checkpoint_every": _at_least(1),
    "pretrain.steps": _at_least(1),
    "pretrain.epochs": _at_least(1),
    "pretrain.batch_size": _at_least(1),
    "pretrain.lr": _ADAM_LR,
    "pretrain.weight_decay": _NON_NEGATIVE,
    "pretrain.label_smoothing": ((lambda v: 0 <= v < 1), "must be in [0, 1)"),
    "pretrain.val_every": _NON_NEGATIVE,
    "pretrain.checkpoint_every": _at_least(1),
    "data.augment_crop_padding": _NON_NEGATIVE,
    "data.augment_jitter": ((lambda v: 0 <= v < 1), "must be in [0, 1)"),
    "outer.aux_weight": _NON_NEGATIVE,
    "outer.aux_decay": ((lambda v: 0 < v <= 1), "must be in (0, 1]"),
    "outer.aux_decay_every": _NON_NEGATIVE,
    "outer.aux_batch_size": _at_least(1),
    "eval.ways": _at_least(2),
    "eval.shots": _at_least(1),
    "eval.query": _at_least(1),
    "eval.episodes": _at_least(1),
    "eval.seed": _seed(),
    "eval.inner_steps": _NON_NEGATIVE,
}
"""Impossible values per key (for a tuple setting, each element is checked)."""


def _settable_keys(section: str) -> list[str]:
    names = [field.name for field in dataclasses.fields(SECTIONS[section])]
    return [name for name in names if not (section == "model" and name in MODEL_DERIVED)]


def _all_keys() -> list[str]:
    return [f"{section}.{key}" for section in SECTIONS for key in _settable_keys(section)]


def _suggest(section: str, key: str) -> str:
    """' (did you mean ...?)' for an unknown key: the same key in another section, else the
    closest key of this section, else the closest key anywhere."""
    elsewhere = [
        f"{other}.{key}" for other in SECTIONS if other != section and key in _settable_keys(other)
    ]
    close = elsewhere or difflib.get_close_matches(key, _settable_keys(section), n=1, cutoff=0.6)
    if close and not elsewhere:
        close = [f"{section}.{close[0]}"]
    close = close or difflib.get_close_matches(f"{section}.{key}", _all_keys(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(
            item, "values"
        )
    if hint is type(None):
        return '"none"'
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )


class _Mismatch(Exception):
    """Internal: a value does not fit a type hint."""


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` describes, or `_Mismatch`. Ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in typing.get_args(hint) and type(value) is not bool:
            return value
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]  # a single number stands for a list of one
        if not isinstance(value, list | tuple):
            raise _Mismatch
        return tuple(_coerce(item, typing.get_args(hint)[0]) for item in value)
    if hint is type(None):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config: unsupported setting type {hint!r}")


def _check_value(key: str, value: Any) -> None:
    if value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{key} = {item} must be a finite number")
        if isinstance(item, float) and abs(item) > FLOAT32_MAX:
            raise ConfigError(
                f"{key} = {item} is beyond what float32 (the model's precision) can hold, "
                f"about 3.4e38: use a smaller value"
            )
        if key in _VALUE_CHECKS and isinstance(item, int | float) and not isinstance(item, bool):
            accept, rule = _VALUE_CHECKS[key]
            if not accept(item):
                raise ConfigError(f"{key} = {_show(value)} {rule}")
    if isinstance(value, tuple) and key in ("eval.ways", "eval.shots") and not value:
        raise ConfigError(f"{key} must list at least one value")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value) if isinstance(value, str | list | bool) else repr(value)


def _mismatch_message(key: str, value: Any, hint: Any) -> str:
    choices = [
        choice
        for arg in (typing.get_args(hint) if typing.get_origin(hint) is not Literal else (hint,))
        if typing.get_origin(arg) is Literal
        for choice in typing.get_args(arg)
    ]
    if isinstance(value, str) and choices:
        close = difflib.get_close_matches(value, [str(c) for c in choices], n=1, cutoff=0.6)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        if typing.get_origin(hint) is Literal:
            return f"{key} = {_show(value)} is not one of {_type_name(hint)}{hint_text}"
        return f"{key} = {_show(value)} has the wrong type: expected {_type_name(hint)}{hint_text}"
    return f"{key} = {_show(value)} has the wrong type: expected {_type_name(hint)}"


def _section(name: str, raw: Mapping[str, Any]) -> Any:
    """One section's settings object from its raw TOML table."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if name == "model" and key in MODEL_DERIVED:
            raise ConfigError(
                f"{full} is not set in [model]: it follows {MODEL_DERIVED[key]}; remove it"
            )
        if key not in hints:
            raise ConfigError(f"unknown setting {full}{_suggest(name, key)}")
        try:
            values[key] = _coerce(value, hints[key])
        except _Mismatch:
            raise ConfigError(_mismatch_message(full, value, hints[key])) from None
        _check_value(full, values[key])
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a `{section: {key: value}}` mapping (a parsed TOML file) into a `RunConfig`."""
    for name, table in raw.items():
        if name not in SECTIONS:
            close = difflib.get_close_matches(name, list(SECTIONS), n=1, cutoff=0.6)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"unknown section [{name}]{hint}; sections are {', '.join(SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{name} must be a section ([{name}]), not a single value")
    parts = {name: _section(name, raw.get(name, {})) for name in SECTIONS}
    data: DataConfig = parts["data"]
    dataset = DATASETS[data.dataset]
    for key, split in (
        ("data.train_split", data.train_split),
        ("data.val_split", data.val_split),
        ("eval.split", parts["eval"].split),
    ):
        if split not in dataset["splits"]:
            close = difflib.get_close_matches(split, dataset["splits"], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key} = {_show(split)} is not a split of {data.dataset}{hint}; "
                f"splits are {', '.join(dataset['splits'])}"
            )
    _check_alphabets(data, parts["eval"])
    _check_folder(data)
    _check_backbone(parts["model"])
    if data.image_size is None:
        data = dataclasses.replace(data, image_size=dataset["image_size"])
    if data.channels is None:
        data = dataclasses.replace(data, channels=dataset["channels"])
    model = dataclasses.replace(
        parts["model"],
        image_size=data.image_size,
        in_channels=data.channels,
        head_ways=data.ways,
        normalize=data.normalize,
    )
    adapt: AdaptSpec = parts["adapt"]
    evaluation: EvalConfig = parts["eval"]
    evaluation = dataclasses.replace(
        evaluation,
        ways=evaluation.ways if evaluation.ways is not None else (data.ways,),
        shots=evaluation.shots if evaluation.shots is not None else (data.shots,),
        inner_steps=(
            evaluation.inner_steps if evaluation.inner_steps is not None else adapt.inner_steps
        ),
        bn_mode=evaluation.bn_mode or model.bn_mode,
    )
    if evaluation.bn_mode == "running" and model.bn_mode == "episode":
        raise ConfigError(
            'eval.bn_mode = "running" needs running statistics, and a model with '
            'model.bn_mode = "episode" keeps none: train with model.bn_mode = "running" '
            '(its evaluations can then use either), or test with eval.bn_mode = "episode"'
        )
    pretrain = _resolve_pretrain(parts["pretrain"], model, parts["outer"])
    return RunConfig(
        data=data,
        model=model,
        adapt=adapt,
        outer=parts["outer"],
        train=parts["train"],
        pretrain=pretrain,
        eval=evaluation,
    )


def _resolve_pretrain(
    pretrain: PretrainConfig, model: ModelSpec, outer: OuterSpec
) -> PretrainConfig:
    """`pretrain.enabled` resolved (None: when the backbone is frozen); a frozen backbone that is
    neither pretrained nor loaded, and co-training that nothing could learn from, refused."""
    frozen = model.backbone_mode == "frozen"
    enabled = frozen if pretrain.enabled is None else pretrain.enabled
    if frozen and not enabled and not pretrain.backbone:
        raise ConfigError(
            'pretrain.enabled = false with model.backbone_mode = "frozen" would freeze random '
            "weights: enable pretraining or name a pretrained file in pretrain.backbone"
        )
    if frozen and outer.aux_weight > 0:
        raise ConfigError(
            "outer.aux_weight > 0 trains the backbone by classification, but it is frozen: set "
            'outer.aux_weight = 0 or model.backbone_mode = "outer"'
        )
    return dataclasses.replace(pretrain, enabled=enabled)


def _check_alphabets(data: DataConfig, evaluation: EvalConfig) -> None:
    """Alphabet settings are Omniglot's alone; validating on training characters is refused."""
    settings = {
        "data.train_alphabets": data.train_alphabets,
        "data.val_alphabets": data.val_alphabets,
        "data.within_alphabet": data.within_alphabet,
        "eval.alphabets": evaluation.alphabets,
        "eval.within_alphabet": evaluation.within_alphabet,
    }
    chosen = [key for key, value in settings.items() if value]
    if chosen and data.dataset != "omniglot":
        raise ConfigError(f"{chosen[0]} is about Omniglot alphabets; remove it for {data.dataset}")
    for key, value in settings.items():
        if value == ():
            raise ConfigError(f'{key} is empty; list alphabet names, or "none" for all')
    if data.train_split == data.val_split and data.train_alphabets is not None:
        train, val = set(data.train_alphabets), set(data.val_alphabets or ())
        if data.val_alphabets is None or train & val:
            shared = "all of them" if data.val_alphabets is None else ", ".join(sorted(train & val))
            raise ConfigError(
                f"data.train_alphabets and data.val_alphabets of split {data.train_split!r} share "
                f"{shared}: validation would see training characters; give data.val_alphabets "
                f"other alphabets"
            )


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as a TOML value
    (`32`, `1e-3`, `true`, `["block1"]`, `"text"`); anything else is taken as a bare string."""
    name, sep, literal = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set model.width=32")
    literal = literal.strip()
    try:
        value = tomllib.loads(f"value = {literal}")["value"]
    except tomllib.TOMLDecodeError:
        value = literal
    return section, key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the raw `{section: {key: value}}` mapping with each `section.key=value` set."""
    merged = {name: dict(table) for name, table in raw.items() if isinstance(table, Mapping)}
    merged.update({name: table for name, table in raw.items() if not isinstance(table, Mapping)})
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}.{key}?)" if close else ""
            raise ConfigError(f"--set {text!r}: unknown section {section!r}{hint}")
        merged.setdefault(section, {})[key] = value
    return merged


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file, or a `ConfigError` saying why it cannot be read."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, expected a .toml file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read, override and validate a TOML config file."""
    return config_from_dict(apply_overrides(read_toml(path), overrides))


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The settable values as plain data (lists for tuples, None kept); `config_from_dict` of it
    gives back the same config."""
    out: dict[str, dict[str, Any]] = {}
    for section in SECTIONS:
        obj = getattr(config, section)
        out[section] = {}
        for key in _settable_keys(section):
            value = getattr(obj, key)
            out[section][key] = list(value) if isinstance(value, tuple) else value
    return out


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML text that `load_config` reads back to an equal config."""
    lines: list[str] = []
    for section, table in config_to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def _trajectory_items(config: RunConfig) -> dict[str, Any]:
    return {
        f"{section}.{key}": value
        for section, table in config_to_dict(config).items()
        if section != "eval"
        for key, value in table.items()
        if f"{section}.{key}" not in RESUME_MAY_CHANGE
    }


def config_hash(config: RunConfig) -> str:
    """sha256 of every setting that determines the training trajectory (not paths, step count
    or evaluation defaults): two configs with equal hashes train identical weights."""
    text = json.dumps(_trajectory_items(config), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def trajectory_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """'key: old -> new' for every trajectory setting that differs (empty if resumable)."""
    before, after = _trajectory_items(old), _trajectory_items(new)
    return [
        f"{key}: {_show(before[key])} -> {_show(after[key])}"
        for key in before
        if before[key] != after[key]
    ]


BUILT_IN_BACKBONES = ("conv4", "resnet12")


def _check_backbone(model: ModelSpec) -> None:
    """A built-in backbone's name or a user's ``package.module:factory``; weights only for the
    latter."""
    if model.backbone in BUILT_IN_BACKBONES:
        if model.weights:
            raise ConfigError(
                f"model.weights loads a state dict into a user's network "
                f'(model.backbone = "package.module:factory"); for {model.backbone} use '
                f"pretrain.backbone"
            )
        return
    module, colon, factory = model.backbone.partition(":")
    if not (colon and module and factory):
        raise ConfigError(
            f"model.backbone = {_show(model.backbone)} is neither "
            f"{' nor '.join(BUILT_IN_BACKBONES)} nor a network's factory written "
            f'"package.module:factory"'
        )


def _check_folder(data: DataConfig) -> None:
    """The settings only an image folder has, and the folder's required root."""
    if data.dataset != "folder":
        chosen = [
            f"data.{key}"
            for key in ("class_lists", "split_fractions", "split_seed")
            if getattr(data, key) != getattr(DataConfig, key)
        ]
        if data.channels not in (None, DATASETS[data.dataset]["channels"]):
            chosen.append("data.channels")
        if chosen:
            raise ConfigError(
                f'{chosen[0]} is about image folders (data.dataset = "folder"); remove it for '
                f"{data.dataset}"
            )
        return
    if not data.root:
        raise ConfigError(
            "data.root must name the image folder (one subfolder of images per class) when "
            'data.dataset = "folder"'
        )
    fractions = data.split_fractions
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(
            f"data.split_fractions = {list(fractions)} must be three non-negative fractions of "
            f"the classes (train, val, test) summing to 1"
        )


def episodes_fitting(what: str, split: str, make: Callable[[], _Source]) -> _Source:
    """`make()` (an `EpisodeSampler` or `FixedEpisodes` over a loaded split); the `ValueError` it
    raises when the episode shape does not fit the split (ways above its classes, shots + query
    above its images per class) becomes a `ConfigError` naming the settings `what`."""
    try:
        return make()
    except ValueError as error:
        raise ConfigError(f"{what} do not fit the {split!r} split: {error}") from None
