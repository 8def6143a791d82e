"""Keep freed activation memory in the process (glibc malloc).

By default glibc serves every allocation of 128 KiB or more (after its dynamic
threshold settles, up to 32 MiB) with a fresh mmap and returns it to the system
on free. An inference pass allocates each layer's output anew, so every pass
page-faults all of its activations again: in a deployed resnet18-PS1_P9 at
batch 64 (16 MiB activations) the kernel's page-fault and zeroing work was
about 6% of the time, and the pass took 120 ms instead of 98 ms. Dense models
barely notice (their time is in the convolutions). PyTorch's CPU tuning guide
gives the same advice through jemalloc or tcmalloc; this does it in-process
with mallopt, so nothing has to be preloaded.

The cost: memory freed by large tensors stays mapped in the process (its
resident size stays near its peak instead of shrinking between passes).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc refuses mmap thresholds above half its heap size: 32 MiB on 64-bit systems.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest mallopt takes: never give the heap's top back


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks up to 32 MiB instead of unmapping them. Returns whether it
    took effect (False on non-glibc systems, where nothing is changed). Applied once per process."""
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
                bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
            ok = False
    return ok
