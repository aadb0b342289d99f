"""`metafilm sweep`: the grid, one run per arm on real Omniglot, the comparison recomputed from the
saved evaluations, and resuming a finished or interrupted sweep without redoing work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metafilm.checkpoint import load_checkpoint
from metafilm.config import ConfigError, load_config
from metafilm.rundir import RunFiles
from metafilm.stats import accuracy_summary
from metafilm.sweep import (
    Arm,
    arm_summary,
    grid_arms,
    one_at_a_time_arms,
    paired_differences,
    parse_grid,
)

TINY = {
    "train": {"steps": 6, "log_every": 2, "val_every": 3, "val_episodes": 4, "checkpoint_every": 2},
    "eval": {"query": 3, "episodes": 6},
}
"""This file's settings of the tiny run (`TINY_RUN` in conftest.py)."""


def test_the_grid_is_every_combination_in_order() -> None:
    axes = parse_grid(["adapt.inner_steps=0,1", "model.encoder=linear, none"])
    assert axes == [("adapt.inner_steps", ["0", "1"]), ("model.encoder", ["linear", "none"])]
    assert [arm.name for arm in grid_arms(axes)] == [
        "adapt.inner_steps=0,model.encoder=linear",
        "adapt.inner_steps=0,model.encoder=none",
        "adapt.inner_steps=1,model.encoder=linear",
        "adapt.inner_steps=1,model.encoder=none",
    ]
    assert Arm(("pretrain.backbone=runs/a/backbone.pt",)).name == (
        "pretrain.backbone=runs_a_backbone.pt"
    )


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([], "at least one --grid"),
        (["adapt.inner_steps"], "expected section.key=value1,value2"),
        (["adapt.inner_steps=1,"], "expected section.key=value1,value2"),
        (["inner_steps=1,2"], "expected section.key=value"),
        (["adapt.inner_steps=0", "adapt.inner_steps=1"], "given twice"),
    ],
)
def test_a_bad_grid_is_refused_with_its_reason(grid: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid(grid)


def test_one_at_a_time_varies_each_setting_alone_around_the_base(tiny_config: Path) -> None:
    axes = parse_grid(
        ["adapt.inner_steps=0,1,3", "model.encoder=linear,none", "outer.film_l2=0,1e-3,0.001"]
    )

    def config(arm: Arm):
        return load_config(tiny_config, list(arm.settings))

    arms = one_at_a_time_arms(axes, config)
    # The base has one inner step, the linear encoder and film_l2 1e-3 (the defaults): those
    # values, however written, are the base arm itself.
    assert [arm.name for arm in arms] == [
        "base",
        "adapt.inner_steps=0",
        "adapt.inner_steps=3",
        "model.encoder=none",
        "outer.film_l2=0",
    ]
    base = config(arms[0])
    assert base == load_config(tiny_config)
    for arm in arms[1:]:
        changed = [
            (section, key)
            for section in ("adapt", "model", "outer")
            for key in vars(getattr(base, section))
            if getattr(getattr(config(arm), section), key) != getattr(getattr(base, section), key)
        ]
        assert [".".join(pair) for pair in changed] == [arm.settings[0].partition("=")[0]]


def _evaluation(split: str, accuracies: list[float], seed: int = 1, **test_time: object) -> dict:
    return {
        "checkpoint": "best.pt",
        "inner_steps_train": 1,
        "inner_steps_test": 1,
        "bn_mode": "running",
        **test_time,
        "dataset": "omniglot",
        "image_size": 28,
        "split": split,
        "ways": 5,
        "shots": 1,
        "query": 15,
        "episodes": len(accuracies),
        "episode_seed": seed,
        "accuracies": accuracies,
    }


def test_an_arm_is_compared_with_the_base_episode_by_episode(tmp_path: Path) -> None:
    base_val, arm_val = [0.9, 0.8, 1.0, 0.7], [0.95, 0.85, 1.0, 0.8]

    def run(*evaluations: dict) -> RunFiles:
        return RunFiles("run", tmp_path, None, [], list(evaluations))  # type: ignore[arg-type]

    base = run(_evaluation("val", base_val), _evaluation("test", [0.5, 0.6]))
    arm = run(_evaluation("val", arm_val), _evaluation("test", [0.7, 0.8], seed=2))
    differences = paired_differences(arm, base)
    # Test episodes of another seed are other episodes: no pairing.
    assert list(differences) == ["val 5-way 1-shot"]
    paired = np.array(arm_val) - np.array(base_val)
    expected_ci = 1.96 * paired.std(ddof=1) / np.sqrt(len(paired))
    assert differences["val 5-way 1-shot"]["mean"] == pytest.approx(paired.mean())
    assert differences["val 5-way 1-shot"]["ci95"] == pytest.approx(expected_ci)
    # Pairing removes the spread of episode difficulty shared by both: far tighter than the CI of
    # either arm alone.
    assert expected_ci < accuracy_summary(base_val)["ci95"] / 2


def test_each_test_time_choice_of_a_run_keeps_its_own_result(tmp_path: Path) -> None:
    evaluations = [
        _evaluation("test", [0.9, 0.8]),
        _evaluation("test", [0.7, 0.6], bn_mode_test="episode"),
        _evaluation("test", [0.5, 0.4], inner_steps_test=0),
        _evaluation("test", [0.3, 0.2], checkpoint="last.pt"),
    ]
    base = RunFiles("base", tmp_path, None, [], evaluations)  # type: ignore[arg-type]
    results = arm_summary(Arm(()), base)["results"]
    assert {label: result["mean"] for label, result in results.items()} == pytest.approx(
        {
            "test 5-way 1-shot": 0.85,
            "test 5-way 1-shot bn episode": 0.65,
            "test 5-way 1-shot inner 0": 0.45,
            "test 5-way 1-shot last": 0.25,
        }
    )
    # An arm trained with the other batch norm and tested with its own pairs with the base.
    other_bn = [_evaluation("test", [1.0, 0.9], bn_mode="episode")]
    arm = RunFiles("arm", tmp_path, None, [], other_bn)  # type: ignore[arg-type]
    differences = paired_differences(arm, base)
    assert list(differences) == ["test 5-way 1-shot"]
    assert differences["test 5-way 1-shot"]["mean"] == pytest.approx(0.1)


def test_episodes_of_chosen_alphabets_pair_only_with_the_same_alphabets(tmp_path: Path) -> None:
    held_out = {"alphabets": ["Balinese", "Tifinagh"], "within_alphabet": True}

    def run(name: str, *evaluations: dict) -> RunFiles:
        return RunFiles(name, tmp_path, None, [], list(evaluations))  # type: ignore[arg-type]

    base = run(
        "base",
        _evaluation("background", [0.5, 0.6]),  # a record from before alphabets were recorded
        _evaluation("background", [0.8, 0.9], **held_out),
    )
    other_alphabets = {"alphabets": ["Balinese", "Korean"], "within_alphabet": True}
    arm = run(
        "arm",
        _evaluation("background", [0.7, 0.7], alphabets=None, within_alphabet=False),
        _evaluation("background", [1.0, 1.0], **held_out),
    )
    differences = paired_differences(arm, base)
    assert {label: d["mean"] for label, d in differences.items()} == pytest.approx(
        {
            "background 5-way 1-shot": 0.15,
            "background (2 alphabets), within alphabet 5-way 1-shot": 0.15,
        }
    )
    stranger = run("stranger", _evaluation("background", [1.0, 1.0], **other_alphabets))
    assert paired_differences(stranger, base) == {}


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_toml: Callable[..., str]) -> Path:
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(**TINY))
    return config


def sweep(
    config: Path,
    out: Path,
    data_root: Path,
    cache_dir: Path,
    *grid: str,
    options: tuple[str, ...] = (),
):
    env = {
        **os.environ,
        "METAFILM_DATA_ROOT": str(data_root),
        "METAFILM_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "metafilm", "sweep", str(config), "--out", str(out), *options]
    for setting in grid:
        command += ["--grid", setting]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.data
def test_sweep_trains_evaluates_compares_and_resumes(
    tiny_config: Path, tmp_path: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    config, out = tiny_config, tmp_path / "sweep"
    grid = ("adapt.inner_steps=0,1",)
    done = sweep(config, out, data_root, omniglot_cache_dir, *grid)
    assert done.returncode == 0, done.stderr
    names = ["adapt.inner_steps=0", "adapt.inner_steps=1"]
    document = json.loads((out / "sweep.json").read_text())
    assert [arm["arm"] for arm in document["arms"]] == names
    for name, arm in zip(names, document["arms"], strict=True):
        run = out / name
        assert load_checkpoint(run / "last.pt")["step"] == 6
        assert f"inner_steps = {name[-1]}" in (run / "config.toml").read_text()
        evaluations = {}
        for file in (run / "eval").glob("*.json"):
            record = json.loads(file.read_text())
            evaluations[f"{record['split']} 5-way 1-shot"] = record["accuracies"]
        assert sorted(evaluations) == ["test 5-way 1-shot", "val 5-way 1-shot"]
        for label, accuracies in evaluations.items():
            assert len(accuracies) == 6
            assert arm["results"][label] == pytest.approx(accuracy_summary(accuracies))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        train_accuracy = [row["accuracy"] for row in rows if "accuracy" in row][-1]
        val_accuracy = [row["val_accuracy"] for row in rows if "val_accuracy" in row][-1]
        assert arm["train_val_gap"] == pytest.approx(train_accuracy - val_accuracy)
        assert arm["film_adapted_rms"] is not None
    table = (out / "sweep.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    test_mean = 100 * document["arms"][1]["results"]["test 5-way 1-shot"]["mean"]
    assert f"{test_mean:.2f}" in table
    for figure in (out / "sweep_accuracy.png", out / "report" / "accuracy.png"):
        with Image.open(figure) as image:
            image.verify()

    # Again, after an interruption while the second arm was being evaluated: only its missing
    # evaluations are done, and the finished arm is not touched.
    finished = out / names[0]
    kept = {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()}
    interrupted = out / names[1]
    for file in (interrupted / "eval").glob("*.json"):
        file.unlink()
    again = sweep(config, out, data_root, omniglot_cache_dir, *grid)
    assert again.returncode == 0, again.stderr
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert len(list((interrupted / "eval").glob("*.json"))) == 2
    assert json.loads((out / "sweep.json").read_text()) == document, "the same numbers again"

    # Again, with every checkpoint removed (the records kept, as a committed study keeps them):
    # reported from the records, nothing retrained.
    for checkpoint in out.rglob("*.pt"):
        checkpoint.unlink()
    from_records = sweep(config, out, data_root, omniglot_cache_dir, *grid)
    assert from_records.returncode == 0, from_records.stderr
    assert not list(out.rglob("*.pt"))
    assert json.loads((out / "sweep.json").read_text()) == document


@pytest.mark.slow
@pytest.mark.data
def test_an_ablation_is_compared_with_its_base_and_a_changed_config_is_refused(
    tiny_config: Path,
    tmp_path: Path,
    data_root: Path,
    omniglot_cache_dir: Path,
    tiny_toml: Callable[..., str],
) -> None:
    # One inner step is the base config's own setting: two arms, "base" and no inner step.
    config, out = tiny_config, tmp_path / "sweep"
    ablation = ("adapt.inner_steps=1,0",)
    done = sweep(
        config, out, data_root, omniglot_cache_dir, *ablation, options=("--one-at-a-time",)
    )
    assert done.returncode == 0, done.stderr
    names = sorted(path.name for path in out.iterdir() if (path / "last.pt").is_file())
    assert names == ["adapt.inner_steps=0", "base"]
    arm = json.loads((out / "sweep.json").read_text())["arms"][1]
    assert arm["arm"] == "adapt.inner_steps=0"

    def accuracies(name: str) -> np.ndarray:
        (file,) = (out / name / "eval").glob("*_test_*.json")
        return np.array(json.loads(file.read_text())["accuracies"])

    paired = accuracies("adapt.inner_steps=0") - accuracies("base")
    assert arm["vs_base"]["test 5-way 1-shot"] == pytest.approx(accuracy_summary(paired))
    table = (out / "sweep.md").read_text().split("## Difference from `base`")[1]
    assert "| adapt.inner_steps=0 | " in table and f"{100 * paired.mean():.2f}" in table

    config.write_text(tiny_toml(**TINY, model={"width": 4}))
    refused = sweep(
        config, out, data_root, omniglot_cache_dir, *ablation, options=("--one-at-a-time",)
    )
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "cannot resume" in refused.stderr and "model.width" in refused.stderr


@pytest.mark.slow
@pytest.mark.data
def test_after_raising_train_steps_the_new_checkpoint_is_evaluated_again(
    tiny_config: Path, tmp_path: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    """Issue 17: the step-30 evaluations were reported for the step-31 checkpoint."""
    out, grid = tmp_path / "sweep", ("adapt.inner_steps=1",)
    arm = out / "adapt.inner_steps=1"
    no_validation = ("--set", "train.val_every=0")  # the sweep then evaluates last.pt

    def records() -> dict[str, dict]:
        return {f.name: json.loads(f.read_text()) for f in sorted((arm / "eval").glob("*.json"))}

    def check(steps: int) -> dict[str, dict]:
        done = sweep(
            tiny_config,
            out,
            data_root,
            omniglot_cache_dir,
            *grid,
            options=(*no_validation, "--set", f"train.steps={steps}"),
        )
        assert done.returncode == 0, done.stderr
        sha = hashlib.sha256((arm / "last.pt").read_bytes()).hexdigest()
        evaluated = records()
        assert len(evaluated) == 2
        for record in evaluated.values():
            assert (record["checkpoint_step"], record["checkpoint_sha256"]) == (steps, sha)
        results = json.loads((out / "sweep.json").read_text())["arms"][0]["results"]
        for record in evaluated.values():
            label = f"{record['split']} 5-way 1-shot last"
            assert results[label] == pytest.approx(accuracy_summary(record["accuracies"]))
        return evaluated

    check(6)
    first = check(8)
    mtimes = {path: path.stat().st_mtime_ns for path in (arm / "eval").glob("*.json")}
    assert check(8) == first, "the same checkpoint and protocol: the files are reused"
    assert {path: path.stat().st_mtime_ns for path in mtimes} == mtimes
    tampered = next(iter(mtimes))
    record = json.loads(tampered.read_text())
    record["episode_seed"] = 2  # a file of this name, but not of this protocol
    tampered.write_text(json.dumps(record))
    assert check(8) == first, "evaluated again, with the protocol's own seed"
