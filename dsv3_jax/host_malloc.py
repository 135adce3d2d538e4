"""Host-memory allocator settings for XLA:CPU runs: reuse freed memory instead of page-faulting fresh pages.

XLA:CPU allocates each step's large temporary buffers (the MoE kernel's sorted rows, the layer stacks'
activations and gradients) with malloc and frees them at the end of the step. glibc serves allocations
above its mmap threshold with a fresh mmap and returns them with munmap, and the threads' arenas trim
their heaps, so every step touches hundreds of MB of new pages, each a minor fault the kernel zero-fills.
The settings below (no mmap for large blocks, no trimming at any size, one arena) make the next step
reuse the freed blocks; the resident size stays at its peak (no faults per bench step after the first
few, when the heap reaches that peak). Measured effect on the bench step:
experiments/results/train_speed.md ("Routed experts (session 6)", and the trim threshold in session 7).

They have to be in effect before any thread has made its own arena (numpy's and XLA's thread pools start
early), which `mallopt` from inside the process cannot guarantee once numpy or jax is imported, so
`reuse_freed_memory` sets them through GLIBC_TUNABLES and restarts the process once with `os.execv`. For
scripts' entry points only (a benchmark, a training run), never for library code or tests.
"""

from __future__ import annotations

import os
import sys

# glibc gives the free top of its main heap back (brk shrinks) once it reaches trim_threshold. The bench
# step's temporaries alone leave more than 2 GiB free at the top at the end of a step, so a threshold of
# 2 GiB - 1 (the first version) still trimmed and re-faulted the heap every few steps; 2**62 never trims.
TRIM_THRESHOLD = 2 ** 62
TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}:glibc.malloc.arena_max=1"


def in_effect() -> bool:
    """Whether this process started with the settings."""
    return TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def supported() -> bool:
    """Whether the C library is glibc (whose malloc reads GLIBC_TUNABLES)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):           # not Linux/glibc
        return False


def reuse_freed_memory() -> bool:
    """Restart this process once with the settings (module docstring), then return True. Returns False,
    changing nothing, where the C library is not glibc or GLIBC_TUNABLES already sets malloc options."""
    if in_effect():
        return True
    current = os.environ.get("GLIBC_TUNABLES", "")
    if not supported() or "glibc.malloc." in current:
        return False
    os.environ["GLIBC_TUNABLES"] = f"{current}:{TUNABLES}" if current else TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)
