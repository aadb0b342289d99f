"""Meta-training throughput (tasks/s) of 1 process vs N processes under torchrun, same workload.

Each arm is a real `metafilm train` of `configs/quickstart.toml` (Conv-4 width 32, Omniglot 5-way
1-shot, 5 query) with validation off and a row of metrics.jsonl per step; the throughput is read
from the rows' `wall_time` (seconds of training on rank 0, start-up and checkpoint writes excluded),
after `--warmup` steps. The arms alternate within each repeat; figures are medians over repeats.
(That the arms train the same model is checked by tests/test_distributed.py on a short run; over
this many steps rounding differences grow, as they do between thread counts of one process.)
Run from the repository root, with the data root in `METAFILM_DATA_ROOT`:

    python scripts/bench_distributed.py --processes 1 2 --repeats 3 --json /tmp/bench_dist.json

Processes get `--threads` intra-op threads each (default 1), so N processes use N cores; on a
machine with fewer free cores than processes the N-process arm cannot gain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.toml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_arm(processes: int, out: Path, args: argparse.Namespace) -> float:
    """Train one arm into `out`; its tasks per second after the warm-up steps."""
    settings = {
        "train.steps": args.steps,
        "train.log_every": 1,
        "train.val_every": 0,
        "train.checkpoint_every": args.steps,
        "outer.meta_batch_size": args.meta_batch_size,
        "model.width": args.width,
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    train = ["-m", "metafilm", "train", str(CONFIG), "--out", str(out), "--force", *sets]
    launcher = [
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    command = [sys.executable, *(launcher if processes > 1 else []), *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes}-process arm failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[args.warmup - 1], rows[-1]
    tasks = (last["step"] - first["step"]) * args.meta_batch_size
    return tasks / (last["wall_time"] - first["wall_time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--meta-batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        parser.error("need 1 <= --warmup < --steps")
    for n in args.processes:
        if args.meta_batch_size % n:
            parser.error(f"--meta-batch-size {args.meta_batch_size} is not a multiple of {n}")

    throughput: dict[int, list[float]] = {n: [] for n in args.processes}
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        for repeat in range(args.repeats):
            for n in args.processes:
                rate = run_arm(n, Path(scratch) / f"p{n}", args)
                throughput[n].append(rate)
                print(f"repeat {repeat + 1}: {n} process(es): {rate:.1f} tasks/s", flush=True)

    base = statistics.median(throughput[args.processes[0]])
    result = {
        "workload": {
            "config": str(CONFIG.relative_to(REPO)),
            "width": args.width,
            "meta_batch_size": args.meta_batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads_per_process": args.threads,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1m": os.getloadavg()[0],
        },
        "tasks_per_s": {str(n): statistics.median(rates) for n, rates in throughput.items()},
        "all_tasks_per_s": {str(n): rates for n, rates in throughput.items()},
    }
    print(f"\nmedian over {args.repeats} repeats, meta-batch {args.meta_batch_size}:")
    for n, rates in throughput.items():
        median = statistics.median(rates)
        print(f"  {n} process(es): {median:7.1f} tasks/s  ({median / base:.2f}x)")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
