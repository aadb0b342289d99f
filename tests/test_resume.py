"""Nothing is lost: atomic, self-checking checkpoints; kill -9 and resume to identical weights;
corrupt checkpoints, existing run directories and diverging runs are refused with a message."""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from metafilm.checkpoint import (
    MAGIC,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from metafilm.config import config_from_dict
from metafilm.errors import DivergedError, RunError
from metafilm.markers import REPORT_MARKER, RUN_MARKER
from metafilm.rundir import (
    GOOD_CHECKPOINT,
    RunWriter,
    check_run_dir,
    start_run_dir,
    truncate_metrics,
)
from metafilm.train import _divergence

TINY = {
    # The learning-rate schedule is a function of the step: a resumed run follows it too.
    "outer": {"lr_decay": 0.5, "lr_decay_every": 7},
    "train": {
        "steps": 40,
        "log_every": 3,
        "val_every": 10,
        "val_episodes": 4,
        "checkpoint_every": 5,
    },
}
"""This file's settings of the tiny run (`TINY_RUN` in conftest.py)."""


def metafilm(
    *args: str | Path, data_root: Path, cache_dir: Path, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run `python -m metafilm ARGS` on one thread (deterministic, and fair on shared CPUs)."""
    env = {
        **os.environ,
        "METAFILM_DATA_ROOT": str(data_root),
        "METAFILM_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "metafilm", *map(str, args)]
    if not wait:
        return subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def rows_without_time(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- checkpoint files (no data) ---


def test_checkpoint_round_trip_and_rng_states(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = rng_state()
    expected = (torch.rand(4), np.random.rand(4), random.random())
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"rng": state, "w": torch.arange(5.0), "meta": {"step": 7, "x": None}})
    assert path.read_bytes().startswith(MAGIC)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file must be renamed away"
    payload = load_checkpoint(path)
    assert payload["meta"] == {"step": 7, "x": None}
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(payload["rng"])
    again = (torch.rand(4), np.random.rand(4), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_damaged_truncated_and_foreign_checkpoints_are_named(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.ones(100)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"damaged\.pt is corrupt"):
        load_checkpoint(damaged)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:30])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is not a metafilm checkpoint"):
        load_checkpoint(truncated)
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(CheckpointError, match="not a metafilm checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


class Smuggled:
    """Not a tensor or a plain container: a safe loader must refuse it."""


def test_a_checkpoint_with_code_objects_is_refused_even_with_a_valid_digest(
    tmp_path: Path,
) -> None:
    import hashlib

    buffer = io.BytesIO()
    torch.save({"evil": Smuggled()}, buffer)
    body = buffer.getvalue()
    path = tmp_path / "evil.pt"
    path.write_bytes(MAGIC + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    # Our own words, not torch's advice to load the file with weights_only=False.
    assert str(refused.value) == (
        f"checkpoint {path} cannot be unpickled safely: it refers to the Python object "
        f"{__name__}.Smuggled, which a metafilm checkpoint never holds; it is not loaded. Use a "
        f"checkpoint metafilm wrote"
    )


def test_metrics_are_cut_back_to_the_checkpoint_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (2, 4, 6, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 10, "lo')
    truncate_metrics(path, 4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


def test_run_directory_rules(tmp_path: Path) -> None:
    config = config_from_dict({})
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(RunError, match="not-a-run exists and is not a metafilm run directory"):
            check_run_dir(other, config, resume=False, force=force)
    with pytest.raises(RunError, match="nothing to resume"):
        check_run_dir(other, config, resume=True, force=False)
    with pytest.raises(RunError, match="pass only one"):
        check_run_dir(other, config, resume=True, force=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for resume in (False, True):
        with pytest.raises(RunError, match=r"--out .*file is a file, not a run directory"):
            check_run_dir(a_file, config, resume=resume, force=False)
    run = tmp_path / "run"
    start_run_dir(run, config, resume=False)
    assert (run / RUN_MARKER).is_file()
    with pytest.raises(RunError, match="already exists; pass --resume .* or --force"):
        check_run_dir(run, config, resume=False, force=False)
    check_run_dir(run, config, resume=False, force=True)
    changed = config_from_dict({"adapt": {"inner_lr": 0.3}})
    with pytest.raises(RunError, match=r"adapt\.inner_lr: 0\.1 -> 0\.3"):
        check_run_dir(run, changed, resume=True, force=False)
    check_run_dir(run, config, resume=True, force=False)
    check_run_dir(tmp_path / "new", config, resume=False, force=False)


def test_force_deletes_nothing_in_a_folder_metafilm_did_not_create(tmp_path: Path) -> None:
    """Issue 17: a folder with any `config.toml`, a thesis and sources was wiped by --force."""
    project = tmp_path / "myproject"
    (project / "src").mkdir(parents=True)
    (project / "config.toml").write_text('title = "my thesis"\n')
    (project / "thesis.tex").write_text("\\documentclass{article}")
    (project / "src" / "main.py").write_text("print('hello')\n")
    before = {path: path.read_bytes() for path in project.rglob("*") if path.is_file()}
    with pytest.raises(RunError) as refused:
        check_run_dir(project, config_from_dict({}), resume=False, force=True)
    assert str(refused.value) == (
        f"{project} was not created by metafilm train (no .metafilm-run marker), so --force "
        f"deletes nothing in it; choose another --out, or delete it yourself"
    )
    assert {path: path.read_bytes() for path in project.rglob("*") if path.is_file()} == before


def test_force_clears_only_what_metafilm_wrote(tmp_path: Path) -> None:
    config = config_from_dict({"train": {"steps": 7}})
    run = tmp_path / "run"
    start_run_dir(run, config_from_dict({}), resume=False)
    written = [
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "backbone.pt",
        "pretrain.pt",
        "pretrain_metrics.jsonl",
        ".last.pt.0123456789abcdef.tmp",
        "eval/best_test_5w1s_q15_n600_seed1_inner1_bnepisode.json",
        "tensorboard/events.out.tfevents.1.host",
        "tensorboard/pretrain_metrics/events.out.tfevents.2.host",
        "report/report.md",
        "report/accuracy.png",
    ]
    foreign = ["notes.txt", "eval/my-analysis.json", "tensorboard/README", "report/draft.md"]
    for name in written + foreign:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    (run / "report" / REPORT_MARKER).write_text("")
    check_run_dir(run, config, resume=False, force=True)
    start_run_dir(run, config, resume=False)
    left = sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file())
    assert left == sorted([*foreign, "config.toml", RUN_MARKER])
    assert all((run / name).read_text() == name for name in foreign)
    assert "steps = 7" in (run / "config.toml").read_text()


# --- end to end on real Omniglot ---


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_toml: Callable[..., str]) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_toml(**TINY))
    return path


@pytest.mark.slow
def test_kill_9_then_resume_gives_bit_identical_weights(
    tmp_path: Path, tiny_config: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = metafilm("train", tiny_config, "--out", whole, **dirs)
    assert done.returncode == 0, done.stderr

    process = metafilm("train", tiny_config, "--out", killed, wait=False, **dirs)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.01)
    assert process.poll() is None, "training finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_checkpoint(killed / "last.pt")["step"] < 40

    resumed = metafilm("train", tiny_config, "--out", killed, "--resume", **dirs)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(killed / "last.pt")
    assert a["step"] == b["step"] == 40
    assert_same_tensors(a["model"], b["model"])
    for state_a, state_b in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        assert_same_tensors(state_a, state_b)
    assert_same_tensors(
        load_checkpoint(whole / "best.pt")["model"], load_checkpoint(killed / "best.pt")["model"]
    )
    rows = rows_without_time(killed)
    assert [row["step"] for row in rows] == [
        3,
        6,
        9,
        10,
        12,
        15,
        18,
        20,
        21,
        24,
        27,
        30,
        33,
        36,
        39,
        40,
    ]
    assert rows == rows_without_time(whole)
    # The update after step s - 1 used lr 1e-3 * 0.5 ** ((s - 1) // 7).
    assert [row["lr"] for row in rows if "lr" in row] == pytest.approx(
        [1e-3 * 0.5 ** ((row["step"] - 1) // 7) for row in rows if "lr" in row]
    )

    again = metafilm("train", tiny_config, "--out", killed, "--resume", **dirs)
    assert again.returncode == 0 and rows_without_time(killed) == rows, "a finished run stays"


@pytest.mark.slow
def test_refusals_keep_the_run_and_say_why(
    tmp_path: Path, tiny_config: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    dirs = {"data_root": data_root, "cache_dir": omniglot_cache_dir}
    run = tmp_path / "run"
    short = ["--set", "train.steps=5", "--set", "train.val_every=0"]
    assert metafilm("train", tiny_config, "--out", run, *short, **dirs).returncode == 0
    before = (run / "last.pt").read_bytes()

    exists = metafilm("train", tiny_config, "--out", run, *short, **dirs)
    assert exists.returncode == 1
    assert f"run directory {run} already exists" in exists.stderr
    assert "Traceback" not in exists.stderr
    assert (run / "last.pt").read_bytes() == before

    other = metafilm(
        "train",
        tiny_config,
        "--out",
        run,
        "--resume",
        *short,
        "--set",
        "adapt.inner_lr=0.5",
        **dirs,
    )
    assert other.returncode == 1 and "adapt.inner_lr: 0.1 -> 0.5" in other.stderr

    damaged = bytearray(before)
    damaged[len(damaged) // 2] ^= 0xFF
    (run / "last.pt").write_bytes(bytes(damaged))
    corrupt = metafilm(
        "train",
        tiny_config,
        "--out",
        run,
        "--resume",
        "--set",
        "train.steps=8",
        "--set",
        "train.val_every=0",
        **dirs,
    )
    assert corrupt.returncode == 1
    assert f"checkpoint {run / 'last.pt'} is corrupt" in corrupt.stderr
    assert "Traceback" not in corrupt.stderr
    assert (run / "last.pt").read_bytes() == bytes(damaged), "a refused resume changes nothing"
    evaluated = metafilm("evaluate", run / "last.pt", **dirs)
    assert evaluated.returncode == 1 and "is corrupt" in evaluated.stderr

    forced = metafilm("train", tiny_config, "--out", run, "--force", *short, **dirs)
    assert forced.returncode == 0, forced.stderr
    assert load_checkpoint(run / "last.pt")["step"] == 5


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_config: Path, data_root: Path, omniglot_cache_dir: Path
) -> None:
    run = tmp_path / "nan"
    result = metafilm(
        "train",
        tiny_config,
        "--out",
        run,
        "--set",
        "outer.lr=1e30",
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.log_every=1",
        data_root=data_root,
        cache_dir=omniglot_cache_dir,
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    # Issue 17: the step-1 checkpoint had a finite loss but weights of size ~1e30 (one Adam step
    # of lr 1e30): it is not good, so it is not written, and the message gives the rule.
    assert re.fullmatch(
        r"metafilm: error: training diverged at step 1: weight \S+ reached magnitude "
        r"[0-9.]+e\+(2[5-9]|3\d) \(the bound is 10000\); no checkpoint was written yet \(a good "
        r"checkpoint is one whose step had a finite loss and all of whose weights are finite and "
        r"below 10000 in magnitude\)\. Lower adapt\.inner_lr or outer\.lr and start over with "
        r"--force",
        message,
    ), message
    assert "Traceback" not in result.stderr
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_a_checkpoint_with_huge_weights_is_not_kept_as_good(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, 0)
    good = {"kind": "train", "step": 5, "model": {"w": torch.full((3,), 9999.0)}}
    writer.checkpoint("last.pt", good)
    for bad_value, shown in ((1.0e6, "1e+06"), (float("nan"), "nan"), (-1e4, "1e+04")):
        bad = {"kind": "train", "step": 6, "model": {"w": torch.tensor([0.0, bad_value])}}
        with pytest.raises(DivergedError) as diverged:
            writer.checkpoint("last.pt", bad)
        assert str(diverged.value) == (
            f"training diverged at step 6: weight w reached magnitude {shown} (the bound is "
            f"10000); the last good checkpoint {tmp_path / 'last.pt'} (step 5) is kept (a good "
            f"checkpoint is one whose step had a finite loss and all of whose weights are finite "
            f"and below 10000 in magnitude). Lower adapt.inner_lr or outer.lr and start over with "
            f"--force"
        )
        assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
    counter = {"kind": "train", "step": 7, "model": {"n": torch.tensor(10**6)}}  # an int buffer
    writer.checkpoint("last.pt", counter)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 7
    assert f"(step 7) is kept ({GOOD_CHECKPOINT})" in str(
        _divergence(8, {"loss": math.inf}, tmp_path, 7)
    )
    # The checkpoint validation chose is named too, with its accuracy.
    writer.checkpoint("best.pt", {**good, "step": 4, "best": 0.4321})
    assert str(_divergence(8, {"loss": math.inf}, tmp_path, 7)).endswith(
        f"(step 7) is kept ({GOOD_CHECKPOINT}); so is {tmp_path / 'best.pt'} (step 4), the best "
        f"on validation (43.21%). Lower adapt.inner_lr or outer.lr and start over with --force"
    )
    writer.close()
