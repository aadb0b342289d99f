"""The `metafilm` command end to end, as a user runs it: train -> evaluate -> report, help texts,
and one-line errors with a non-zero exit status for user mistakes."""

from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metafilm.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from metafilm.cli import COMMANDS, BarProgress, build_parser, main
from metafilm.config import config_from_dict, load_config, to_toml
from metafilm.evaluation import _with_progress
from metafilm.report import FIGURES

TINY = {
    "model": {"film_sites": ["block3", "block4"]},
    "train": {
        "steps": 12,
        "log_every": 2,
        "val_every": 6,
        "val_episodes": 4,
        "checkpoint_every": 4,
    },
}
"""This file's settings of the tiny run (`TINY_RUN` in conftest.py)."""

OPTIONS = {
    "data": ["--root", "--cache-dir", "--image-size", "--download"],
    "train": ["config", "--set", "--out", "--resume", "--force"],
    "pretrain": ["config", "--set", "--out", "--resume", "--force"],
    "evaluate": [
        "RUN_DIR|CHECKPOINT",
        "--checkpoint",
        "--ways",
        "--shots",
        "--query",
        "--episodes",
        "--seed",
        "--split",
        "--alphabets",
        "--within-alphabet",
        "--inner-steps",
        "--bn-mode",
        "--lake",
        "--data-root",
    ],
    "report": ["RUN_DIR", "--out", "--compare-published"],
    "sweep": ["config", "--set", "--grid", "--out", "--one-at-a-time"],
    "adapt": ["RUN_DIR|CHECKPOINT", "--support", "--checkpoint", "--out"],
    "predict": ["PATH", "--support", "--checkpoint", "--task", "--checkpoint-file", "--out"],
    "export": ["TASK", "--onnx", "--checkpoint-file"],
}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metafilm(
    *args: str | Path,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    threads: int = 1,
) -> subprocess.CompletedProcess:
    """Run `python -m metafilm ARGS` on `threads` threads with the given data root (or none)."""
    env = {k: v for k, v in os.environ.items() if k != "METAFILM_DATA_ROOT"}
    env["OMP_NUM_THREADS"] = str(threads)
    if data_root is not None:
        env["METAFILM_DATA_ROOT"] = str(data_root)
    if cache_dir is not None:
        env["METAFILM_CACHE_DIR"] = str(cache_dir)
    command = [sys.executable, "-m", "metafilm", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error line of a failed command, after checking it failed cleanly."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("metafilm: error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def in_process_error(capsys: pytest.CaptureFixture[str], *args: str | Path) -> str:
    """`main(ARGS)` in this process: exit status 1 and the one error line it printed."""
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    assert status == 1, captured.err
    assert captured.err.startswith("metafilm: error: ") and captured.err.count("\n") == 1
    return captured.err.strip()


def subparser(command: str) -> argparse.ArgumentParser:
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return commands.choices[command]


PROMISES = {
    "train": ["deleting only the files metafilm wrote", "same weights as an uninterrupted run"],
    "pretrain": ["backbone.pt", "pretrain.backbone", "deleting only the files it wrote"],
    "evaluate": ["auto", "best.pt if the run validated", "transductive", "--lake", "error rate"],
    "report": ["95% CI", "never a folder with other files"],
    "sweep": ["every combination", "resumes", "--one-at-a-time"],
    "data": ["checksum", "md5", "resumable"],
    "adapt": ["one subfolder of images per class", "any number each", "without running code"],
    "predict": ["metafilm predict --task TASK", "runners-up", "every probability"],
    "export": ["FiLM folded into the batch norms", "[0, 1]"],
}
"""What each command's help must tell a user, beyond naming its options (see the README)."""


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_of_every_command_explains_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    options = re.findall(r"^  (-{1,2}[\w-]+|[A-Z_|]+|config)\b", _raw_help(command), flags=re.M)
    assert sorted(set(options) - {"-h", "--help"}) == sorted(OPTIONS[command])
    for promise in PROMISES[command]:
        assert promise in text, promise


def _raw_help(command: str) -> str:
    """The help text as argparse prints it, one option per indented line."""
    return subparser(command).format_help()


@pytest.mark.slow
def test_python_m_metafilm_lists_the_commands() -> None:
    result = metafilm("--help")
    assert result.returncode == 0
    for command in OPTIONS:
        assert command in result.stdout


def test_config_mistakes_stop_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_toml: Callable[..., str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(**TINY))
    run = tmp_path / "run"
    message = in_process_error(capsys, "train", config, "--out", run, "--set", "model.widht=3")
    assert message.endswith("unknown setting model.widht (did you mean model.width?)")
    message = in_process_error(capsys, "train", config, "--out", run, "--set", "adapt.inner_lr=-1")
    assert "adapt.inner_lr = -1.0 must not be negative" in message
    assert not run.exists()
    message = in_process_error(capsys, "train", tmp_path / "absent.toml")
    assert "absent.toml does not exist" in message


def test_missing_data_root_is_one_clear_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_toml: Callable[..., str],
) -> None:
    monkeypatch.delenv("METAFILM_DATA_ROOT", raising=False)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(**TINY))
    message = in_process_error(capsys, "train", config, "--out", tmp_path / "run")
    assert "METAFILM_DATA_ROOT" in message
    assert not (tmp_path / "run").exists()


def test_usage_errors_of_evaluate_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = in_process_error(capsys, "evaluate", tmp_path / "nowhere")
    assert "nowhere does not exist" in message
    message = in_process_error(capsys, "report", tmp_path / "a", tmp_path / "b")
    assert "needs --out" in message
    message = in_process_error(capsys, "report", tmp_path / "a")
    assert "does not exist" in message
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"
    message = in_process_error(capsys, "train", quickstart, "--out", a_file / "run")
    assert f"{a_file} is a file" in message and a_file.read_text() == "not a folder"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(config_from_dict({})))
    message = in_process_error(capsys, "report", run, "--out", a_file)
    assert (
        message == f"metafilm: error: --out {a_file} is a file, not a folder; choose another --out"
    )
    assert a_file.read_text() == "not a folder"
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(tmp_path), "--ways", "five"])
    assert exited.value.code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.slow
def test_episode_shape_is_checked_against_the_split(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path, tiny_toml: Callable[..., str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(**TINY))
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    run = tmp_path / "run"
    message = one_line_error(
        metafilm("train", config, "--out", run, "--set", "data.ways=5000", **dirs)
    )
    assert "data.ways / data.shots / data.query do not fit the 'train' split" in message
    assert "ways=5000 exceeds the 4112 classes" in message
    message = one_line_error(
        metafilm(
            "train",
            config,
            "--out",
            run,
            "--set",
            "data.shots=10",
            "--set",
            "data.query=15",
            **dirs,
        )
    )
    assert "shots + query = 10 + 15 = 25 exceeds the 20 images" in message
    assert not run.exists()


@pytest.mark.slow
def test_train_evaluate_report_end_to_end(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path, tiny_toml: Callable[..., str]
) -> None:
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(tiny_toml(**TINY))
    run = tmp_path / "run"

    trained = metafilm("train", config_path, "--out", run, "--set", "adapt.inner_steps=2", **dirs)
    assert trained.returncode == 0, trained.stderr
    assert f"trained 12 steps into {run}" in trained.stdout
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    saved = load_config(run / "config.toml")
    assert saved == load_config(config_path, ["adapt.inner_steps=2"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12]
    for row in rows:
        assert {
            "step",
            "wall_time",
            "loss",
            "accuracy",
            "film_predicted/block3",
            "film_adapted/block4",
        } <= row.keys()
    assert [row["step"] for row in rows if "val_accuracy" in row] == [6, 12]

    evaluated = metafilm(
        "evaluate",
        run,
        "--ways",
        "5",
        "10",
        "--shots",
        "1",
        "2",
        "--query",
        "3",
        "--episodes",
        "10",
        "--seed",
        "7",
        "--inner-steps",
        "3",
        **dirs,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    files = sorted((run / "eval").glob("*.json"))
    assert len(files) == 4
    best_sha = hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    records = {}
    for file in files:
        record = json.loads(file.read_text())
        records[(record["ways"], record["shots"])] = record
        assert len(record["accuracies"]) == 10
        per_query = record["ways"] * 3
        for accuracy in record["accuracies"]:
            assert 0 <= accuracy <= 1
            assert abs(accuracy * per_query - round(accuracy * per_query)) < 1e-6
        assert (record["query"], record["episode_seed"], record["split"]) == (3, 7, "test")
        assert (record["inner_steps_train"], record["inner_steps_test"]) == (2, 3)
        assert record["checkpoint_sha256"] == best_sha
        assert record["film_sites"] == ["block3", "block4"]
    assert set(records) == {(5, 1), (5, 2), (10, 1), (10, 2)}

    again = metafilm(
        "evaluate",
        run / "best.pt",
        "--ways",
        "5",
        "--shots",
        "1",
        "--query",
        "3",
        "--episodes",
        "10",
        "--seed",
        "7",
        "--inner-steps",
        "3",
        threads=2,
        **dirs,
    )
    assert again.returncode == 0, again.stderr
    repeat = json.loads(next((run / "eval").glob("best_test_5w1s_*")).read_text())
    assert repeat["accuracies"] == records[(5, 1)]["accuracies"], "same on 2 threads as on 1"

    out = tmp_path / "report"
    reported = metafilm("report", run, "--out", out, "--compare-published")
    assert reported.returncode == 0, reported.stderr
    document = json.loads((out / "report.json").read_text())
    assert len(document["results"]) == 4
    markdown = (out / "report.md").read_text()
    for result in document["results"]:
        values = records[(result["ways"], result["shots"])]["accuracies"]
        assert result["accuracies"] == values
        mean = statistics.fmean(values)
        ci = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
        assert result["mean"] == pytest.approx(mean, abs=1e-12)
        assert result["ci95"] == pytest.approx(ci, abs=1e-12)
        setting = f"{result['ways']}-way {result['shots']}-shot"
        assert f"| run | {setting} | {100 * mean:.2f} ± {100 * ci:.2f} | 10 | 3 | 7 | test |" in (
            markdown
        )
    for field in (
        "5-way 1-shot (differs from test)",
        "2 / 3",
        "transductive",
        "conv4, width 8",
        "FiLM sites block3, block4",
        f"sha256 `{best_sha}`",
        "98.7 ± 0.4",
    ):
        assert field in markdown, field
    for name in FIGURES:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 500 and image.size[1] >= 300


def test_one_run_with_running_statistics_reports_both_batch_norms(
    tmp_path: Path,
    data_root: Path,
    omniglot_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_toml: Callable[..., str],
) -> None:
    """A model trained with running statistics is tested either way, and its transductive test
    is exactly that of the same training with episode batch norm (training never reads the running
    buffers, so both runs reach the same weights)."""
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(**TINY, eval={"episodes": 8}))
    runs = {mode: tmp_path / mode for mode in ("episode", "running")}
    for mode, run in runs.items():
        trained = metafilm("train", config, "--out", run, "--set", f"model.bn_mode={mode}", **dirs)
        assert trained.returncode == 0, trained.stderr
    for mode, extra in (("episode", []), ("running", []), ("running", ["--bn-mode", "episode"])):
        tested = metafilm("evaluate", runs[mode], "--checkpoint", "last", *extra, **dirs)
        assert tested.returncode == 0, tested.stderr

    def record(mode: str, tested: str) -> dict:
        (file,) = (runs[mode] / "eval").glob(f"last_test_5w1s_*_bn{tested}.json")
        return json.loads(file.read_text())

    transductive, running = record("running", "episode"), record("running", "running")
    assert (transductive["bn_mode"], transductive["bn_mode_test"]) == ("running", "episode")
    assert (running["bn_mode"], running["bn_mode_test"]) == ("running", "running")
    assert transductive["transductive_bn"] and not running["transductive_bn"]
    assert transductive["accuracies"] == record("episode", "episode")["accuracies"]
    assert running["accuracies"] != transductive["accuracies"]

    out = tmp_path / "report"
    assert metafilm("report", runs["running"], "--out", out).returncode == 0
    markdown = (out / "report.md").read_text()
    assert "| transductive (episode statistics) |" in markdown
    assert "| running statistics at test |" in markdown

    # several runs: each later run minus the first, on the same episodes, printed and reported
    both = metafilm("report", runs["episode"], runs["running"], "--out", tmp_path / "both")
    assert both.returncode == 0, both.stderr
    differences = np.subtract(running["accuracies"], record("episode", "episode")["accuracies"])
    mean, ci = 100 * differences.mean(), 196 * differences.std(ddof=1) / np.sqrt(8)
    line = f"running minus episode, test 5-way 1-shot last: {mean:.2f} ± {ci:.2f} points over 8"
    assert f"{line} episodes" in both.stdout.splitlines()
    assert "## Paired differences" in (tmp_path / "both" / "report.md").read_text()

    message = in_process_error(
        capsys, "evaluate", runs["episode"], "--bn-mode", "running", "--data-root", data_root
    )
    assert 'train with model.bn_mode = "running"' in message


def test_a_frozen_backbone_without_pretraining_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_toml: Callable[..., str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(**TINY))
    frozen = ["--set", "model.backbone_mode=frozen", "--set", "pretrain.enabled=false"]
    message = in_process_error(capsys, "train", config, "--out", tmp_path / "run", *frozen)
    assert message == (
        "metafilm: error: pretrain.enabled = false with "
        'model.backbone_mode = "frozen" would freeze random weights: enable pretraining or name '
        "a pretrained file in pretrain.backbone"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_frozen_backbone_is_pretrained_once_and_never_changes(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path, tiny_toml: Callable[..., str]
) -> None:
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config = tmp_path / "frozen.toml"
    config.write_text(
        tiny_toml(**TINY, pretrain={"steps": 15, "batch_size": 16}, eval={"episodes": 5})
    )
    frozen = ["--set", "model.backbone_mode=frozen", "--set", "model.bn_mode=running"]
    shared, own, reused = tmp_path / "pretrained", tmp_path / "own", tmp_path / "reused"

    result = metafilm("pretrain", config, "--out", shared, *frozen, **dirs)
    assert result.returncode == 0, result.stderr
    result = metafilm("train", config, "--out", own, *frozen, **dirs)
    assert result.returncode == 0, result.stderr
    backbone = load_checkpoint(own / "backbone.pt")["backbone"]
    assert_same_tensors(backbone, load_checkpoint(shared / "backbone.pt")["backbone"])
    trained = load_checkpoint(own / "last.pt")["model"]
    assert_same_tensors(
        backbone,
        {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")},
    )

    given = ["--set", f"pretrain.backbone={shared / 'backbone.pt'}"]
    result = metafilm("train", config, "--out", reused, *frozen, *given, **dirs)
    assert result.returncode == 0, result.stderr
    assert not (reused / "backbone.pt").exists()
    assert_same_tensors(trained, load_checkpoint(reused / "last.pt")["model"])
    result = metafilm("evaluate", reused, **dirs)
    assert result.returncode == 0 and "5-way 1-shot on 'test'" in result.stdout


@pytest.mark.data
def test_data_command_verifies_and_caches_omniglot(
    data_root: Path, omniglot_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "--root", str(data_root), "--cache-dir", str(omniglot_cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "omniglot background: 964 characters, 19280 images" in out
    assert "omniglot evaluation: 659 characters, 13180 images" in out


def test_data_command_names_the_missing_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = in_process_error(capsys, "data", "--root", tmp_path, "--cache-dir", tmp_path)
    assert str(tmp_path / "omniglot" / "images_background.zip") in message


# --- issue 17: nothing lost, nothing silent ---

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml"


def decoy_project(root: Path) -> dict[Path, bytes]:
    """A user's folder that happens to hold a `config.toml`; returns its files and contents."""
    (root / "src").mkdir(parents=True)
    (root / "config.toml").write_text('[paper]\ntitle = "my thesis"\n')
    (root / "thesis.tex").write_text("\\documentclass{article} years of work")
    (root / "src" / "main.py").write_text("print('hello')\n")
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_force_refuses_a_folder_metafilm_did_not_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "myproject"
    before = decoy_project(project)
    message = in_process_error(capsys, "train", QUICKSTART, "--out", project, "--force")
    assert message == (
        f"metafilm: error: {project} was not created by metafilm train (no .metafilm-run marker), "
        f"so --force deletes nothing in it; choose another --out, or delete it yourself"
    )
    message = in_process_error(
        capsys,
        "pretrain",
        QUICKSTART,
        "--out",
        project,
        "--force",
        "--set",
        "model.backbone_mode=frozen",
    )
    assert "was not created by metafilm train" in message
    message = in_process_error(
        capsys, "sweep", QUICKSTART, "--grid", "adapt.inner_steps=0,1", "--out", project
    )
    assert message == (
        f"metafilm: error: {project} already holds files that metafilm sweep did not write (no "
        f".metafilm-sweep marker); choose a new --out"
    )
    assert {path: path.read_bytes() for path in project.rglob("*") if path.is_file()} == before


def test_out_naming_a_plain_file_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    message = in_process_error(capsys, "train", QUICKSTART, "--out", a_file)
    assert message == (
        f"metafilm: error: --out {a_file} is a file, not a run directory; choose another --out"
    )
    message = in_process_error(
        capsys, "sweep", QUICKSTART, "--grid", "adapt.inner_steps=0,1", "--out", a_file
    )
    assert (
        message == f"metafilm: error: --out {a_file} is a file, not a folder; choose another --out"
    )
    assert a_file.read_text() == "keep"


def test_a_number_float32_cannot_hold_is_refused_with_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    message = in_process_error(capsys, "train", QUICKSTART, "--out", run, "--set", "outer.lr=1e39")
    assert message.endswith(
        "outer.lr = 1e+39 is beyond what float32 (the model's precision) can hold, about 3.4e38: "
        "use a smaller value"
    )
    assert not run.exists()
    assert load_config(QUICKSTART, ["model.metric_scale=3.4e38"]).model.metric_scale == 3.4e38
    # Adam divides the learning rate by 1 - beta1 = 0.1 at its first step (3.5e37 overflowed)
    too_large = ["--out", run, "--set", "outer.lr=3.5e37"]
    message = in_process_error(capsys, "train", QUICKSTART, *too_large)
    assert message.endswith(
        "outer.lr = 3.5e+37 must be positive and at most 3.4e37: Adam's first step divides it by "
        "1 - beta1 = 0.1, and float32 must hold the result"
    )
    assert not run.exists()
    assert load_config(QUICKSTART, ["outer.lr=3.4e37"]).outer.lr == 3.4e37
    message = in_process_error(capsys, "train", QUICKSTART, "--set", "adapt.inner_lr=-1e39")
    assert "adapt.inner_lr = -1e+39 is beyond what float32" in message


def test_checkpoint_refusals_in_our_own_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"kind": "train", "w": torch.ones(10)})
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0xFF
    path.write_bytes(bytes(damaged))
    message = in_process_error(capsys, "evaluate", path)
    assert message == (
        f"metafilm: error: checkpoint {path} is corrupt: its contents do not match the sha256 "
        f"recorded in it (damaged or half-copied); restore a good copy, or train the run again "
        f"(metafilm train ... --force)"
    )
    buffer = io.BytesIO()
    torch.save({"kind": "train", "evil": Smuggled()}, buffer)
    body = buffer.getvalue()
    path.write_bytes(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    message = in_process_error(capsys, "evaluate", path)
    assert message == (
        f"metafilm: error: checkpoint {path} cannot be unpickled safely: it refers to the Python "
        f"object {__name__}.Smuggled, which a metafilm checkpoint never holds; it is not loaded. "
        f"Use a checkpoint metafilm wrote"
    )


class Smuggled:
    """Not a tensor or a plain container."""


def test_data_errors_name_the_file_and_the_data_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = in_process_error(
        capsys, "train", QUICKSTART, "--out", tmp_path / "run", "--set", f"data.root={tmp_path}"
    )
    assert "fetch the original zips with 'metafilm data --download'" in message
    pickle = tmp_path / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    pickle.parent.mkdir()
    pickle.write_bytes(b"")
    mini = ["--set", "data.dataset=miniimagenet", "--set", "data.format=pickle"]
    message = in_process_error(
        capsys,
        "train",
        QUICKSTART,
        "--out",
        tmp_path / "run",
        "--set",
        f"data.root={tmp_path}",
        *mini,
    )
    assert message == (
        f"metafilm: error: cannot load miniimagenet split 'train': {pickle} is empty (0 bytes): "
        f"replace it with a whole copy of the miniImageNet pickle"
    )
    assert not (tmp_path / "run").exists()


def test_a_full_disk_names_the_file_and_the_intact_checkpoint(
    tmp_path: Path,
    data_root: Path,
    omniglot_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
    tiny_toml: Callable[..., str],
) -> None:
    monkeypatch.setenv("METAFILM_DATA_ROOT", str(data_root))
    monkeypatch.setenv("METAFILM_CACHE_DIR", str(omniglot_cache_dir))
    config, run = tmp_path / "tiny.toml", tmp_path / "run"
    config.write_text(tiny_toml(**TINY))  # last.pt at steps 4, 8 and 12
    real_fsync, checkpoints = os.fsync, []

    def fsync(fd: int) -> None:
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoints.append(fd)
            if len(checkpoints) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    status = main(["train", str(config), "--out", str(run)])
    assert status == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"metafilm: error: no space left on the device writing {run / 'last.pt'}; its last "
        f"checkpoint {run / 'last.pt'} (step 4) is intact (checkpoints are replaced atomically): "
        f"free some space, then continue with metafilm train {config} --out {run} --resume"
    )
    assert load_checkpoint(run / "last.pt")["step"] == 4
    assert not list(run.glob(".*.tmp")), "no half-written file is left behind"
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert main(["train", str(config), "--out", str(run), "--resume"]) == 0
    assert load_checkpoint(run / "last.pt")["step"] == 12


@pytest.mark.slow
def test_sigterm_stops_like_an_interruption_and_says_how_to_resume(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path, tiny_toml: Callable[..., str]
) -> None:
    config, run = tmp_path / "tiny.toml", tmp_path / "run"
    config.write_text(tiny_toml(**TINY))
    # No scheduled checkpoint before step 1000: the one kept is the one the stop wrote.
    steps = ["--set", "train.steps=400", "--set", "train.checkpoint_every=1000"]
    env = {
        **os.environ,
        "METAFILM_DATA_ROOT": str(data_root),
        "METAFILM_CACHE_DIR": str(omniglot_cache_dir),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "metafilm", "train", str(config), "--out", str(run), *steps]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "no metrics in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and "Traceback" not in stderr
    kept = load_checkpoint(run / "last.pt")["step"]
    assert 3 <= kept < 400
    assert "metafilm: stopping once this step and its checkpoint are done" in stderr
    resume = (
        f"metafilm train {config} --out {run} --set train.steps=400 --set "
        f"train.checkpoint_every=1000 --resume"
    )
    assert stderr.splitlines()[-1] == (
        f"metafilm: terminated (SIGTERM); its last checkpoint {run / 'last.pt'} (step {kept}) is "
        f"intact: continue with {resume}"
    )
    resumed = metafilm(*shlex.split(resume)[1:], data_root=data_root, cache_dir=omniglot_cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} from step {kept}" in resumed.stderr
    assert load_checkpoint(run / "last.pt")["step"] == 400


def test_evaluation_reports_its_progress_per_batch() -> None:
    class Batch:
        def __init__(self, tasks: int) -> None:
            self.tasks = tasks

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def start(self, phase: str, done: int, total: int, unit: str | None = None) -> None:
            self.calls.append(("start", phase, done, total))

        def update(self, done: int, metrics: dict) -> None:
            self.calls.append(("update", done))

        def close(self) -> None:
            self.calls.append(("close",))

    recorder = Recorder()
    batches = [Batch(50), Batch(50), Batch(20)]
    seen = list(_with_progress(iter(batches), 120, "evaluate 5-way 1-shot on 'test'", recorder))
    assert seen == batches
    assert recorder.calls == [
        ("start", "evaluate 5-way 1-shot on 'test'", 0, 120),
        ("update", 50),
        ("update", 100),
        ("update", 120),
        ("close",),
    ]


@pytest.mark.data
def test_validation_inside_training_reports_its_episodes(
    tmp_path: Path, tiny_toml: Callable[..., str], data_root: Path
) -> None:
    """The training bar says how far a validation has come instead of standing still."""
    from metafilm.train import train

    class Notes:
        def __init__(self) -> None:
            self.notes: list[str] = []

        def start(self, phase: str, done: int, total: int, unit: str | None = None) -> None: ...

        def update(self, done: int, metrics: dict) -> None: ...

        def note(self, text: str) -> None:
            self.notes.append(text)

        def close(self) -> None: ...

    config = tmp_path / "tiny.toml"
    config.write_text(
        tiny_toml(train={"steps": 2, "val_every": 2, "val_episodes": 70, "checkpoint_every": 2})
    )
    recorder = Notes()
    train(load_config(config), tmp_path / "run", progress=recorder)
    assert recorder.notes == ["validating: 50/70 episodes", "validating: 70/70 episodes"]


@pytest.mark.data
def test_a_long_run_says_how_long_it_will_take(
    tmp_path: Path, tiny_toml: Callable[..., str], data_root: Path, caplog, monkeypatch
) -> None:
    """After its first steps, a run longer than the threshold states the time its rest takes,
    from the measured pace; a short one says nothing."""
    from metafilm import train as training

    config = tmp_path / "tiny.toml"
    config.write_text(tiny_toml(train={"steps": 8, "val_every": 0, "checkpoint_every": 8}))
    caplog.set_level("INFO", logger="metafilm")
    training.train(load_config(config), tmp_path / "short")
    assert "steps take about" not in caplog.text
    monkeypatch.setattr(training, "ESTIMATE_ABOVE_S", 0.0)
    training.train(load_config(config), tmp_path / "long")
    lines = [r.message for r in caplog.records if "steps take about" in r.message]
    assert len(lines) == 1 and "the remaining 3 steps take about" in lines[0], lines
    assert training._duration(3900) == "1 h 05 min" and training._duration(420) == "7 min"


def test_log_lines_and_warnings_get_lines_of_their_own_under_a_progress_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Written to a file, stderr keeps every message on its own line (as the terminal shows it:
    what follows the last carriage return), never glued to the bar; a warning is one line."""

    def command(args: object) -> None:
        bar = BarProgress()
        bar.start("train", 0, 10)
        bar.update(3, {"loss": 1.0, "accuracy": 0.5})
        logging.getLogger("metafilm.train").info("the remaining 7 steps take about 1 minute")
        warnings.warn("cache x is damaged; rebuilding it", stacklevel=1)
        bar.update(4, {"loss": 1.0, "accuracy": 0.5})
        bar.close()

    monkeypatch.setitem(COMMANDS, "data", command)
    assert main(["data"]) == 0
    shown = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]
    assert "the remaining 7 steps take about 1 minute" in shown
    assert "metafilm: warning: cache x is damaged; rebuilding it" in shown
    assert not [line for line in shown if "UserWarning" in line or "warnings.warn" in line]
