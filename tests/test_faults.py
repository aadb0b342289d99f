"""Fault injection: training killed (SIGKILL) again and again at seeded random points, each time
resumed, ends with the very weights, optimiser state, checkpoints and metrics of a run never
killed; and a stop asked by SIGTERM or Ctrl-C writes the step's checkpoint first."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from kill_points import install
from test_resume import assert_same_tensors, rows_without_time

from metafilm.checkpoint import load_checkpoint
from metafilm.config import RunConfig, load_config
from metafilm.errors import CheckpointError
from metafilm.stopping import StopRequest, Terminated, handle_signals
from metafilm.train import train

MOST = {
    "step-before": 4,
    "step-after": 4,
    "checkpoint-write": 2,
    "checkpoint-renamed": 2,
    "validation": 1,
    "metrics-row": 2,
}
"""Each kind of kill point (`kill_points`) and the most events of it a killed process
waits for: few enough that every process of the chain reaches its point."""
FAULTS = {
    "outer": {"lr_decay": 0.5, "lr_decay_every": 7},
    "train": {
        "steps": 60,
        "log_every": 3,
        "val_every": 10,
        "val_episodes": 4,
        "checkpoint_every": 5,
    },
}


def _killed_run(kind: str, n: int, config: RunConfig, run_dir: Path, resume: bool) -> int:
    """Train in a forked child that `kill_points` kills at the `n`-th event of `kind`; return
    its exit code (-9 when killed, 0 when training finished first)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        status = 1
        try:
            install(kind, n)
            train(config, run_dir, resume=resume)
            status = 0
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _assert_same_run(whole: Path, other: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(whole / name), load_checkpoint(other / name)
        assert a["step"] == b["step"]
        assert_same_tensors(a["model"], b["model"])
        for state_a, state_b in zip(
            a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
        ):
            assert_same_tensors(state_a, state_b)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert rows_without_time(other) == rows_without_time(whole)


@pytest.mark.slow
def test_ten_kills_at_random_points_each_resumed_end_in_the_same_run(
    tmp_path: Path,
    data_root: Path,
    omniglot_cache_dir: Path,
    tiny_toml: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
) -> None:
    monkeypatch.setenv("METAFILM_DATA_ROOT", str(data_root))
    monkeypatch.setenv("METAFILM_CACHE_DIR", str(omniglot_cache_dir))
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_toml(**FAULTS))
    config = load_config(path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    train(config, whole)

    rng = random.Random(20261205)
    schedule = [(kind, rng.randint(1, MOST[kind])) for kind in rng.sample(list(MOST) * 2, 12)]
    kills: list[tuple[str, int, int | None]] = []  # kind, n, the step of last.pt afterwards
    for kind, n in schedule:
        code = _killed_run(kind, n, config, killed, resume=bool(kills))
        if code == 0:  # the run finished before this point: the chain ends here
            break
        assert code == -signal.SIGKILL, f"{kind} {n} after {kills}: exit code {code}"
        if kind == "checkpoint-write":  # the half-written file is there, under a temporary name
            assert [name for name in os.listdir(killed) if name.endswith(".tmp")]
        try:
            kept = load_checkpoint(killed / "last.pt")["step"]
        except CheckpointError:
            kept = None
        kills.append((kind, n, kept))
    assert len(kills) >= 10, f"only {len(kills)} kills before the run ended: {kills}"
    assert {"checkpoint-write", "validation"} <= {kind for kind, _, _ in kills}, kills

    train(config, killed, resume=True)
    _assert_same_run(whole, killed)
    assert not [name for name in os.listdir(killed) if name.endswith(".tmp")]


class _StopAt:
    """A progress display that lets a stop signal arrive after training step `step`."""

    def __init__(self, request: StopRequest, step: int) -> None:
        self.request, self.step = request, step

    def start(self, phase: str, done: int, total: int, unit: str | None = None) -> None:
        pass

    def update(self, done: int, metrics: object) -> None:
        if done == self.step:
            self.request.signal = signal.SIGTERM

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arrives_after", "kept"),
    [(7, 8), (9, 5)],
    ids=["between-steps-checkpoints-now", "before-a-validation-abandons-it"],
)
def test_a_stop_request_checkpoints_the_step_and_the_resumed_run_is_the_same(
    tmp_path: Path,
    data_root: Path,
    omniglot_cache_dir: Path,
    tiny_toml: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    one_thread: None,
    arrives_after: int,
    kept: int,
) -> None:
    """A stop due at the end of step 8 writes last.pt at step 8 (checkpoints are every 5 steps);
    one due when step 10's validation starts abandons it: last.pt stays at step 5, and the
    resumed run repeats step 10. Either way the resumed run equals one never stopped."""
    monkeypatch.setenv("METAFILM_DATA_ROOT", str(data_root))
    monkeypatch.setenv("METAFILM_CACHE_DIR", str(omniglot_cache_dir))
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_toml(**{**FAULTS, "train": {**FAULTS["train"], "steps": 20}}))
    config = load_config(path)
    train(config, tmp_path / "whole")
    request = StopRequest()
    with pytest.raises(Terminated):
        train(config, tmp_path / "stopped", progress=_StopAt(request, arrives_after), stop=request)
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["step"] == kept
    assert max(row["step"] for row in rows_without_time(tmp_path / "stopped")) < 10
    train(config, tmp_path / "stopped", resume=True)
    _assert_same_run(tmp_path / "whole", tmp_path / "stopped")


def test_the_first_signal_asks_for_a_stop_and_the_second_stops_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with handle_signals(deferred=True) as request:
        assert request is not None and not request.due()
        os.kill(os.getpid(), signal.SIGINT)
        assert request.due() and request.signal == signal.SIGINT
        assert "signal again to stop at once" in capsys.readouterr().err
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Terminated):
            request.stop()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with handle_signals(deferred=False) as request:
        assert request is None
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
