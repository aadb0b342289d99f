"""The `metafilm` command end to end, as a user runs it: train -> evaluate -> report, help texts,
and one-line errors with a non-zero exit status for user mistakes."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metafilm.checkpoint import load_checkpoint
from metafilm.cli import build_parser, main
from metafilm.config import config_from_dict, load_config, to_toml
from metafilm.report import FIGURES

TINY = """
[data]
ways = 5
shots = 1
query = 2

[model]
width = 8
film_sites = ["block3", "block4"]

[outer]
meta_batch_size = 2

[train]
steps = 12
log_every = 2
val_every = 6
val_episodes = 4
checkpoint_every = 4
"""

OPTIONS = {
    "data": ["--root", "--cache-dir", "--image-size", "--download"],
    "train": ["config", "--set", "--out", "--resume", "--force"],
    "pretrain": ["config", "--set", "--out", "--force"],
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


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_of_every_command_explains_every_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    actions = [action for action in subparser(command)._actions if action.dest != "help"]
    names = [
        action.option_strings[0] if action.option_strings else action.metavar or action.dest
        for action in actions
    ]
    assert sorted(names) == sorted(OPTIONS[command])
    for name, action in zip(names, actions, strict=True):
        assert name in text and action.help, name
        assert action.help.split()[0] in text


@pytest.mark.slow
def test_python_m_metafilm_lists_the_commands() -> None:
    result = metafilm("--help")
    assert result.returncode == 0
    for command in OPTIONS:
        assert command in result.stdout


def test_config_mistakes_stop_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    run = tmp_path / "run"
    message = in_process_error(capsys, "train", config, "--out", run, "--set", "model.widht=3")
    assert message.endswith("unknown setting model.widht (did you mean model.width?)")
    message = in_process_error(capsys, "train", config, "--out", run, "--set", "adapt.inner_lr=-1")
    assert "adapt.inner_lr = -1.0 must not be negative" in message
    assert not run.exists()
    message = in_process_error(capsys, "train", tmp_path / "absent.toml")
    assert "absent.toml does not exist" in message


def test_missing_data_root_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METAFILM_DATA_ROOT", raising=False)
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
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
    assert "File exists" in message and a_file.read_text() == "not a folder"
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(tmp_path), "--ways", "five"])
    assert exited.value.code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.slow
def test_episode_shape_is_checked_against_the_split(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
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
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(TINY)
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
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model trained with running statistics is tested either way, and its transductive test
    is exactly that of the same training with episode batch norm (training never reads the running
    buffers, so both runs reach the same weights)."""
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config = tmp_path / "tiny.toml"
    config.write_text(TINY + "\n[eval]\nepisodes = 8\n")
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
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    frozen = ["--set", "model.backbone_mode=frozen", "--set", "pretrain.enabled=false"]
    message = in_process_error(capsys, "train", config, "--out", tmp_path / "run", *frozen)
    assert message == (
        'pretrain.enabled = false with model.backbone_mode = "frozen" would freeze random '
        "weights: enable pretraining or name a pretrained file in pretrain.backbone"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_frozen_backbone_is_pretrained_once_and_never_changes(
    tmp_path: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    config = tmp_path / "frozen.toml"
    config.write_text(
        TINY + "\n[pretrain]\nsteps = 15\nbatch_size = 16\n" + "\n[eval]\nepisodes = 5\n"
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
