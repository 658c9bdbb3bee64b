"""glibc malloc settings that stop XLA:CPU from page-faulting on every step.

XLA:CPU gets each execution's buffers from ``malloc``. With glibc's defaults, blocks
above the mmap threshold (and, on worker threads, any block larger than a thread
arena's 64 MiB heap) are fresh ``mmap`` pages that are returned on ``free``, so
every training step touches tens of MiB of new pages: measured on the 2-core
development CPU, about 16,000 minor page faults per step of the book's LSTM
(hidden 32, batch 1024, 32 steps) and half of its step time (36 ms vs 18 ms).

:func:`tune_malloc` asks glibc (``mallopt``) for one arena, no ``mmap`` and no
trimming, so freed blocks are reused: the process keeps its peak heap instead of
returning it to the system. PyTorch's CPU allocator uses ``malloc`` too and gains
the same way; ``experiments/benchmark.py`` applies the same setting to every
implementation it times. The environment variables ``MALLOC_ARENA_MAX=1
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967295`` do the same from process
start (slightly more complete: threads created before the call keep their arena).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def tune_malloc() -> bool:
    """Applies the settings; returns whether they took effect (glibc on Linux only).

    Call it early, before JAX or PyTorch start their thread pools (before the first
    computation). Safe to call more than once; a no-op elsewhere.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
        ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    return bool(ok)
