"""Meta-training's flush-to-zero mode (metafilm.subnormals): on inside the block, restored after."""

from __future__ import annotations

import pytest
import torch

from metafilm.subnormals import flushes_subnormals, flushing_subnormals

pytestmark = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="this CPU has no flush-to-zero mode"
)


def _flushed(value: float) -> bool:
    return torch.tensor([value], dtype=torch.float32).mul(1.0).item() == 0.0


def test_subnormals_are_flushed_inside_the_block_and_the_mode_restored():
    assert not flushes_subnormals() and not _flushed(1e-39)
    with flushing_subnormals():
        assert flushes_subnormals()
        assert _flushed(1e-39) and not _flushed(1e-37)  # 1e-37 is a normal float32
    assert not flushes_subnormals() and not _flushed(1e-39)


def test_a_mode_set_before_is_kept():
    torch.set_flush_denormal(True)
    try:
        with flushing_subnormals():
            pass
        assert flushes_subnormals()
    finally:
        torch.set_flush_denormal(False)
