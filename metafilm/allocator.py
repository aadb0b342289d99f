"""Keep glibc's malloc from mapping and unmapping large activations on every step.

Measured on the project's CPU machines: in plain Conv-4 training about a third of the CPU time
went to the kernel, because the first-layer activations exceed glibc's mmap threshold and were
mapped, page-faulted and unmapped afresh at every step. Telling malloc never to use mmap for
allocations and never to give the heap's top back to the system gives identical numbers, faster.

``import metafilm`` calls :func:`tune_allocator` once, so users get this without asking. Set the
environment variable ``METAFILM_TUNE_ALLOCATOR=0`` before the import to keep malloc's defaults
(e.g. to measure the difference). On a C library other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""The largest value ``mallopt`` takes (an ``int``): the heap's top is never trimmed in practice."""

ENV_SWITCH = "METAFILM_TUNE_ALLOCATOR"


def tune_allocator() -> dict[str, int]:
    """Set glibc's ``M_MMAP_MAX = 0`` and ``M_TRIM_THRESHOLD`` to its maximum.

    Returns the settings applied (empty when not on glibc), for benchmarks to record. Raises
    ``OSError`` if glibc refuses a setting.
    """
    if platform.libc_ver()[0] != "glibc":
        return {}
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    settings = {
        "M_MMAP_MAX": (M_MMAP_MAX, 0),
        "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    }
    for name, (option, value) in settings.items():
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc mallopt refused {name} = {value}")
    return {name: value for name, (_, value) in settings.items()}


def tune_on_import() -> dict[str, int]:
    """:func:`tune_allocator` unless ``METAFILM_TUNE_ALLOCATOR=0``."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return {}
    return tune_allocator()
