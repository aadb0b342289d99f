"""Distributed meta-training: the launch environment, the collectives between real processes, and
`torchrun` end to end on real Omniglot (2 processes on loopback reach the weights of 1 process; a
killed process stops the run within seconds, and `--resume` finishes it to the same weights)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from episodes.sampler import FixedEpisodes
from metafilm.assemble import build_learner, load_split
from metafilm.checkpoint import load_checkpoint
from metafilm.config import ConfigError, config_from_dict, load_config
from metafilm.distributed import (
    DEFAULT_TIMEOUT_S,
    Distributed,
    DistributedError,
    Launch,
    launch_from_env,
    shard,
    task_slice,
    timeout_from_env,
)
from metafilm.meta import input_builder
from metafilm.train import train, validate

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.toml"
STEPS = 20
TINY = [
    f"train.steps={STEPS}",
    "train.log_every=5",
    "train.val_every=10",
    "train.val_episodes=7",  # not a multiple of 2: the validation shards differ in size
    "train.checkpoint_every=5",
    "model.width=8",
    "data.query=2",
    "outer.meta_batch_size=4",
]
WEIGHT_TOLERANCE = 1e-4
"""|2-process - 1-process| weights after STEPS Adam steps. Only the order of the float32 sums of
the meta-gradient differs, but Adam divides by the gradient's running magnitude, which turns a
rounding difference in a near-zero gradient element into a visible step: 1.4e-5 was seen on one
first-layer weight (most weights agree to 1e-7). A process that missed the all-reduce would drift
by up to Adam's step size (2e-3) per step, far beyond this."""
LAUNCH = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_env(**extra: str | Path) -> dict[str, str]:
    """This environment without any launch of ours, one thread per process, gloo on loopback."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env.update({key: str(value) for key, value in extra.items()})
    return env


def train_command(out: Path, *extra: str, processes: int) -> list[str]:
    """`metafilm train` of the tiny config, under torchrun on loopback when `processes` > 1."""
    sets = [arg for setting in TINY for arg in ("--set", setting)]
    metafilm = ["-m", "metafilm", "train", str(QUICKSTART), "--out", str(out), *sets, *extra]
    if processes == 1:
        return [sys.executable, *metafilm]
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    address = ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return [sys.executable, *launcher, *address, *metafilm]


# --- the launch environment and the split of the work (no processes) ---


def test_the_launch_is_read_from_torchrun_variables() -> None:
    assert launch_from_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(DistributedError, match="MASTER_PORT missing: launch with torchrun"):
        launch_from_env(env)
    env["MASTER_PORT"] = "29500"
    assert launch_from_env(env) == Launch(rank=1, world_size=2, local_rank=1)
    with pytest.raises(DistributedError, match="RANK='one' is not an integer"):
        launch_from_env({**env, "RANK": "one"})
    with pytest.raises(DistributedError, match="need 0 <= RANK < WORLD_SIZE"):
        launch_from_env({**env, "RANK": "2"})


def test_the_collective_timeout_is_configurable() -> None:
    assert timeout_from_env({}) == timedelta(seconds=DEFAULT_TIMEOUT_S)
    assert timeout_from_env({"METAFILM_DIST_TIMEOUT": "2.5"}) == timedelta(seconds=2.5)
    for bad in ("0", "-3", "soon", "inf", "nan"):
        with pytest.raises(DistributedError, match="expected a positive number of seconds"):
            timeout_from_env({"METAFILM_DIST_TIMEOUT": bad})


@pytest.mark.parametrize(("n", "world_size"), [(0, 2), (4, 2), (7, 2), (5, 3), (2, 4)])
def test_shards_are_disjoint_contiguous_and_cover_everything(n: int, world_size: int) -> None:
    shares = [shard(n, rank, world_size) for rank in range(world_size)]
    assert [i for share in shares for i in share] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_process_takes_an_equal_slice_of_the_meta_batch() -> None:
    assert [task_slice(6, rank, 3) for rank in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(ConfigError, match="meta_batch_size = 3 cannot be split evenly over 2"):
        task_slice(3, 0, 2)


def test_an_uneven_meta_batch_is_refused_before_any_work(tmp_path: Path) -> None:
    config = config_from_dict({"outer": {"meta_batch_size": 3}})
    with pytest.raises(ConfigError, match="use a multiple of 2"):
        train(config, tmp_path / "run", processes=Distributed(rank=0, world_size=2))
    assert not (tmp_path / "run").exists()


ONE_PROCESS = """
import numpy as np, torch
from metafilm.distributed import SINGLE_PROCESS, process_group

def outcome(group):
    grads = [torch.arange(6.0).reshape(2, 3) - 2.5, torch.tensor([1.0 / 3.0])]
    group.mean_(grads)
    weights = [torch.linspace(-1, 1, 4)]
    group.broadcast_(weights)
    values = np.array([0.25, 0.5, 0.75])
    return (
        [g.tolist() for g in grads],
        weights[0].tolist(),
        group.mean_metrics({"loss": 1.5, "accuracy": 0.25}),
        group.gather_shards(values[group.shard(3)], 3).tolist(),
        group.task_slice(4),
        group.is_main,
    )

with process_group() as real:
    assert real is not SINGLE_PROCESS and real.world_size == 1
    print(outcome(real) == outcome(SINGLE_PROCESS), outcome(SINGLE_PROCESS))
"""


@pytest.mark.slow
def test_one_process_collectives_equal_a_real_process_group_of_one() -> None:
    """`SINGLE_PROCESS` (used when no launch is named) gives what real gloo collectives give in a
    process group of one, on the same values."""
    port = free_port()
    env = process_env(
        WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    same, shown = result.stdout.split(maxsplit=1)
    assert same == "True", shown
    assert "[[-2.5, -1.5, -0.5], [0.5, 1.5, 2.5]]" in shown  # a mean over one process: unchanged


# --- the collectives between two real processes (gloo on loopback) ---

COLLECTIVES = """
import sys, time
import numpy as np, torch
from metafilm.distributed import DistributedError, process_group

with process_group() as group:
    rank = group.rank
    grads = [torch.full((2, 3), float(rank)), torch.tensor([1.0 + 2 * rank])]
    group.mean_(grads)
    assert torch.equal(grads[0], torch.full((2, 3), 0.5)) and grads[1].item() == 2.0, grads
    assert group.mean_metrics({"loss": float(rank), "accuracy": 1.0}) == {
        "loss": 0.5, "accuracy": 1.0}
    mine = np.arange(7.0)[group.shard(7).start : group.shard(7).stop]
    assert group.gather_shards(mine, 7).tolist() == list(range(7))
    weights = torch.full((3,), float(rank + 10))
    group.broadcast_([weights])
    assert torch.equal(weights, torch.full((3,), 10.0))
    group.require_same("the step", 5)
    try:
        group.require_same("the step", rank)
        raise AssertionError("disagreeing processes went unnoticed")
    except DistributedError as error:
        assert "disagree on the step: [0, 1] (by rank)" in str(error), error
    if rank == 1:
        time.sleep(5)  # alive but absent: rank 0's barrier must give up after the timeout
        sys.exit(0)
    started = time.monotonic()
    try:
        group.barrier()
        raise AssertionError("the barrier did not time out")
    except RuntimeError as error:
        print(f"rank 0 gave up after {time.monotonic() - started:.1f} s: {error}")
"""


@pytest.mark.slow
def test_collectives_between_two_processes_and_the_timeout() -> None:
    port = free_port()
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", COLLECTIVES],
            env=process_env(
                **common, RANK=str(rank), LOCAL_RANK=str(rank), METAFILM_DIST_TIMEOUT="1.5"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    waited = float(outputs[0].split("rank 0 gave up after ")[1].split(" s")[0])
    assert 1.4 <= waited < 4.5, outputs[0]


# --- torchrun end to end on real Omniglot ---


@pytest.fixture(scope="module")
def data_env(data_root: Path, omniglot_cache_dir: Path) -> dict[str, str]:
    return process_env(METAFILM_DATA_ROOT=data_root, METAFILM_CACHE_DIR=omniglot_cache_dir)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory, data_env: dict[str, str]) -> Path:
    """The tiny config trained by a single process: the reference."""
    out = tmp_path_factory.mktemp("distributed") / "one"
    done = subprocess.run(
        train_command(out, processes=1), env=data_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return out


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: Path, b: Path) -> None:
    first, second = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert first["step"] == second["step"] == STEPS
    assert first["model"].keys() == second["model"].keys()
    for name, tensor in first["model"].items():
        assert torch.allclose(tensor, second["model"][name], rtol=0, atol=WEIGHT_TOLERANCE), name


@pytest.mark.slow
@pytest.mark.data
def test_two_processes_reach_the_weights_of_one(
    one_process_run: Path, data_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "two"
    done = subprocess.run(
        train_command(out, processes=2), env=data_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(f"trained {STEPS} steps into {out}") == 1, "rank 0 alone reports"
    assert done.stderr.count("info: tensorboard") <= 1
    assert sorted(path.name for path in out.iterdir()) == sorted(
        path.name for path in one_process_run.iterdir()
    )
    assert_close_weights(one_process_run, out)
    single, double = rows(one_process_run), rows(out)
    assert [row["step"] for row in double] == [row["step"] for row in single] == [5, 10, 15, 20]
    for a, b in zip(single, double, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step", "wall_time"}:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.data
def test_running_statistics_stay_the_same_in_every_process(
    data_env: dict[str, str], tmp_path: Path
) -> None:
    """Each process updates batch-norm running statistics from its own tasks; they are averaged
    every step, so the validation logged (each process scoring its share with its own statistics)
    is that of the saved model scored by one process."""
    out = tmp_path / "running"
    done = subprocess.run(
        train_command(out, "--set", "model.bn_mode=running", processes=2),
        env=data_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    config = load_config(out / "config.toml")
    learner = build_learner(config)
    learner.load_state_dict(load_checkpoint(out / "last.pt")["model"])
    classes = load_split(config.data, config.data.val_split)
    source = FixedEpisodes(
        classes,
        config.data.ways,
        config.data.shots,
        config.data.query,
        seed=config.train.val_seed,
        episodes=config.train.val_episodes,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the processes ran
    try:
        accuracies = validate(learner, source, input_builder(learner, classes), config.adapt)
    finally:
        torch.set_num_threads(threads)
    assert rows(out)[-1]["val_accuracy"] == accuracies.mean()


def worker_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun agent started (its children, from /proc)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[1]) != launcher:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # a process that ended while we looked
        ranks = [entry[5:] for entry in env if entry.startswith(b"RANK=")]
        if ranks:
            workers[int(ranks[0])] = int(stat.parent.name)
    return workers


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.data
def test_a_killed_process_stops_the_run_and_resume_finishes_it(
    one_process_run: Path, data_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    launcher = subprocess.Popen(
        train_command(out, processes=2),
        env=data_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "last.pt").exists():
            assert launcher.poll() is None, launcher.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        workers = worker_pids(launcher.pid)
        assert sorted(workers) == [0, 1], workers
        assert launcher.poll() is None, "training finished before a process could be killed"
        os.kill(workers[1], signal.SIGKILL)
        killed_at = time.monotonic()
        stderr = launcher.communicate(timeout=60)[1]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "Signal 9 (SIGKILL) received by PID" in stderr
    assert not any(running(pid) for pid in workers.values()), "a worker outlived the run"
    assert load_checkpoint(out / "last.pt")["step"] < STEPS

    resumed = subprocess.run(
        train_command(out, "--resume", processes=2),
        env=data_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("resuming") == 1, "rank 0 alone logs"
    assert_close_weights(one_process_run, out)
    assert [row["step"] for row in rows(out)] == [5, 10, 15, 20]
