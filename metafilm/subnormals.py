"""Flush subnormal floats to zero while meta-training, for speed.

A model whose support losses are nearly zero (1-shot with a prototype head: each support image is
its own prototype, and margins reach hundreds) runs the second-order inner step's backward and
double backward on subnormal float32 numbers (below 1.2e-38), which x86 CPUs compute up to 100x
slower: a miniImageNet meta-step took 2-2.5x as long (docs/benchmarks.md). The first-order inner
gradient avoids them by scaling (:data:`metafilm.inner.GRADIENT_SCALE`); the second-order one
cannot (its meta-gradient would be scaled down instead), so meta-training flushes them to zero.

``torch.set_flush_denormal`` acts on the calling thread alone: the threads of torch's pool keep
their mode (torch offers no way to reach them). That measured enough here, since the slow work is
on the small per-task support tensors that torch computes on the calling thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

SUBNORMAL = 1e-39
"""A float32 subnormal number: zero once converted on a thread that flushes them."""


def flushes_subnormals() -> bool:
    """Whether the calling thread flushes subnormal float32 numbers to zero."""
    return torch.tensor(SUBNORMAL, dtype=torch.float32).item() == 0.0


@contextmanager
def flushing_subnormals() -> Iterator[None]:
    """Flush subnormal numbers to zero on the calling thread inside the block, then restore its
    mode (a no-op on a CPU without the mode)."""
    previous = flushes_subnormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)
