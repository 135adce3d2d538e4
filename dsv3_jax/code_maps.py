"""Compiled programs' memory mappings: keep a long-lived process from running out of them.

XLA:CPU links each kernel of a compiled program into memory of its own: a code, a read-only and a data
mapping per kernel, 1,400-1,900 mappings for one decode configuration (a batch size, a cache length) of
the tiny or bench preset (experiments/results/code_maps.md). Linux caps a process's mappings at
`vm.max_map_count` (65530 by default), and past it LLVM aborts the whole process ("Unable to allocate
section memory") with gigabytes of memory free. A notebook or a serving process that decodes many shapes
meets that limit after some dozens of them; nothing can catch the abort.

`ensure_map_headroom` is the guard `generate` runs before it compiles anything: past a fraction of the
limit it drops JAX's compiled programs (`jax.clear_caches`, which unmaps them; they compile again on their
next use) and warns, naming the limit to raise instead. Where the mappings are not compiled programs (the
clear frees few of them), it says so once and stops clearing, rather than recompiling at every call.
Linux only: elsewhere the counts are unknown and the guard does nothing.
"""

from __future__ import annotations

import gc
import warnings
from typing import Optional

import jax

MAPS = "/proc/self/maps"
LIMIT = "/proc/sys/vm/max_map_count"
# Past this fraction of the limit the guard clears. At 65530 that leaves ~16k mappings, about eight new
# decode configurations, for the call that follows.
CLEAR_AT = 0.75
# A clear that frees less than this fraction of the mappings in use did not find the cause.
USEFUL_CLEAR = 0.1

_futile = False          # set once a clear freed too little: the mappings are not compiled programs


def maps_in_use() -> Optional[int]:
    """The number of memory mappings this process holds, or None where /proc/self/maps is unreadable."""
    try:
        with open(MAPS, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def map_limit() -> Optional[int]:
    """vm.max_map_count, or None where it is unreadable (not Linux)."""
    try:
        with open(LIMIT) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ensure_map_headroom(clear_at: Optional[float] = None) -> bool:
    """Drop JAX's compiled programs when the process holds more than `clear_at` (default CLEAR_AT) of the
    mappings Linux allows (module docstring). Returns whether it cleared."""
    global _futile
    clear_at = CLEAR_AT if clear_at is None else clear_at
    used, limit = maps_in_use(), map_limit()
    if used is None or limit is None or used <= clear_at * limit or _futile:
        return False
    jax.clear_caches()
    gc.collect()
    after = maps_in_use() or 0
    advice = (f"raise the limit (sysctl -w vm.max_map_count={4 * limit}) to keep more programs compiled")
    if used - after < USEFUL_CLEAR * used:
        _futile = True
        warnings.warn(f"this process holds {used} memory mappings of the {limit} Linux allows (vm.max_map_count), "
                      f"and dropping JAX's compiled programs freed only {used - after}: something else holds "
                      f"them. Past the limit the process aborts; {advice}.", RuntimeWarning, stacklevel=2)
    else:
        warnings.warn(f"this process held {used} memory mappings of the {limit} Linux allows (vm.max_map_count), "
                      f"most of them compiled XLA programs (three per kernel), and past the limit it would abort "
                      f"('Unable to allocate section memory'): JAX's compiled programs were dropped ({after} "
                      f"mappings now) and compile again on use; {advice}.", RuntimeWarning, stacklevel=2)
    return True
