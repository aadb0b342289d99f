"""Multi-process meta-training over `torch.distributed`, as launched by `torchrun`.

The distributed run is the single-process training loop with two additions: each process draws
its own `task_slice` of every meta-batch, and the meta-gradients are averaged over the processes
before clipping and the optimiser step. Since every process then applies the same update to the
same weights, the processes never drift apart and there is nothing to synchronise but gradients.

- `process_group()` reads what `torchrun` sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
  `MASTER_PORT`) and joins the group: gloo for CPU tensors and, when CUDA is available, NCCL for
  CUDA tensors (device `LOCAL_RANK`). Without those variables it yields `SINGLE_PROCESS`, whose
  collectives do nothing, so one code path serves both.
- Every collective waits at most `METAFILM_DIST_TIMEOUT` seconds (default 600) for the other
  processes; a process that died or hangs makes the others fail instead of waiting forever.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from metafilm.errors import ConfigError, DistributedError

TIMEOUT_VARIABLE = "METAFILM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a `torchrun` launch."""

    rank: int
    world_size: int
    local_rank: int


def launched(env: Mapping[str, str]) -> bool:
    """Whether `env` names a distributed run (torchrun sets `RANK` and `WORLD_SIZE`)."""
    return "RANK" in env or "WORLD_SIZE" in env


def launch_from_env(env: Mapping[str, str]) -> Launch | None:
    """The launch `env` describes; None when it names no distributed run (see `launched`)."""
    if not launched(env):
        return None
    missing = [name for name in LAUNCH_VARIABLES if not env.get(name)]
    if missing:
        raise DistributedError(
            f"a distributed run needs {', '.join(LAUNCH_VARIABLES)} in the environment; "
            f"{', '.join(missing)} missing: launch with torchrun"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[name] = int(env[name])
        except ValueError:
            raise DistributedError(f"{name}={env[name]!r} is not an integer") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(
            f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do not describe a "
            f"process of a group (need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0)"
        )
    return Launch(rank, world_size, local_rank)


def timeout_from_env(env: Mapping[str, str]) -> timedelta:
    """How long a collective waits for the other processes: `METAFILM_DIST_TIMEOUT` seconds."""
    value = env.get(TIMEOUT_VARIABLE, "")
    if not value:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise DistributedError(
            f"{TIMEOUT_VARIABLE}={value!r}: expected a positive number of seconds"
        )
    return timedelta(seconds=seconds)


def shard(n: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of `range(n)`: sizes differ by at most one, in rank order."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def task_slice(meta_batch_size: int, rank: int, world_size: int) -> slice:
    """The tasks of each meta-batch that rank `rank` draws: equal, disjoint, contiguous slices, so
    the mean of the per-process mean gradients is the meta-batch's mean gradient."""
    if meta_batch_size % world_size:
        raise ConfigError(
            f"outer.meta_batch_size = {meta_batch_size} cannot be split evenly over "
            f"{world_size} processes; use a multiple of {world_size}"
        )
    share = shard(meta_batch_size, rank, world_size)
    return slice(share.start, share.stop)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group, and the few collectives training needs.

    The collectives act on the default process group when `joined`; otherwise (`SINGLE_PROCESS`)
    every collective leaves its input as it is. No reference to the group itself is kept: a
    process group still referenced from Python when the interpreter shuts down aborts the process
    ("terminate called without an active exception", seen in about one torchrun launch in six).
    """

    rank: int
    world_size: int
    joined: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0

    def task_slice(self, meta_batch_size: int) -> slice:
        """This process's tasks of each meta-batch (see `task_slice`)."""
        return task_slice(meta_batch_size, self.rank, self.world_size)

    def shard(self, n: int) -> range:
        """This process's share of `n` items (see `shard`)."""
        return shard(n, self.rank, self.world_size)

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.joined:
            dist.barrier()

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values."""
        if not self.joined:
            return
        for tensor in tensors:
            dist.broadcast(tensor, src=0)

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        """Replace `tensors` (one dtype and device) in place by their mean over the processes,
        in one all-reduce."""
        if not self.joined or not tensors:
            return
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        start = 0
        for tensor in tensors:
            tensor.copy_(flat[start : start + tensor.numel()].view_as(tensor))
            start += tensor.numel()

    def mean_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """`metrics` averaged over the processes (every process has the same keys)."""
        if not self.joined:
            return dict(metrics)
        names = sorted(metrics)
        values = torch.tensor([metrics[name] for name in names], dtype=torch.float64)
        self.mean_([values])
        return dict(zip(names, values.tolist(), strict=True))

    def gather_shards(self, values: np.ndarray, n: int) -> np.ndarray:
        """Every process's `shard(n)` of a float array, joined in rank order: all `n` values."""
        if not self.joined:
            return values
        width = -(-n // self.world_size)
        padded = torch.zeros(width, dtype=torch.float64)
        padded[: len(values)] = torch.from_numpy(np.asarray(values, dtype=np.float64))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return np.concatenate(
            [part[: len(shard(n, r, self.world_size))].numpy() for r, part in enumerate(parts)]
        )

    def require_same(self, name: str, value: int) -> None:
        """Raise a `DistributedError` unless every process holds the same `value`."""
        if not self.joined:
            return
        values = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(values, torch.tensor([value], dtype=torch.int64))
        seen = [int(v) for v in values]
        if len(set(seen)) > 1:
            raise DistributedError(
                f"the processes disagree on {name}: {seen} (by rank). Every process must read the "
                f"same run directory: on several machines, put it on a shared file system"
            )


SINGLE_PROCESS = Distributed(rank=0, world_size=1)


def exit_process(status: int) -> NoReturn:
    """End this process with `status`. A torchrun worker ends at once, after flushing its
    output, without the interpreter's shutdown: there, gloo's threads occasionally abort the
    process even after the group was destroyed ("terminate called without an active exception",
    exit status -6, seen in a few percent of launches), which would fail a run that succeeded."""
    if not launched(os.environ):
        raise SystemExit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@contextmanager
def process_group() -> Iterator[Distributed]:
    """Join the process group `torchrun` launched this process into (see the module docstring),
    and leave it at the end; `SINGLE_PROCESS` when the environment names no launch."""
    launch = launch_from_env(os.environ)
    if launch is None:
        yield SINGLE_PROCESS
        return
    timeout = timeout_from_env(os.environ)
    backend = "gloo"
    if torch.cuda.is_available():
        if launch.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={launch.local_rank} but this machine has "
                f"{torch.cuda.device_count()} CUDA devices: start at most that many processes "
                f"per node"
            )
        torch.cuda.set_device(launch.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
    )
    try:
        yield Distributed(launch.rank, launch.world_size, joined=True)
        # Leave together, so that no process tears the group down while another still uses it.
        # After a failure, or when a peer has already left, there is nobody to wait for.
        with suppress(RuntimeError):
            dist.barrier()
    finally:
        dist.destroy_process_group()
