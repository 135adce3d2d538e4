"""TPU topologies by Cloud TPU accelerator name (`v5p-1024`, `v5e-256`, `v6e-256`, `v4-128`, `tpu7x-256`) or by
raw libtpu name (`v5:8x8x8`), and their compile-only devices.

Accelerator names count what Cloud TPU counts: TensorCores for v4, v5p and tpu7x (v5p-1024 is 512 chips; a v4
or v5p chip is one "megacore" device, a tpu7x chip two devices), chips for v5e and v6e (one device each).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from ..errors import InputError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Generation:
    libtpu: str               # libtpu's topology prefix
    chip_config: str          # "megacore" fuses a chip's two TensorCores into one device
    cores_per_chip: int       # TensorCores per chip (what v4/v5p/tpu7x accelerator names count)
    devices_per_chip: int
    dims: int                 # torus dimensions
    hbm_bytes: int            # per device
    peak_bf16_flops: float    # per chip, the published figure
    host_offload: bool        # pinned host memory usable as an offload target


GENERATIONS = {
    "v4": Generation("v4", "megacore", 2, 1, 3, 32 * GIB, 275e12, True),
    "v5p": Generation("v5", "megacore", 2, 1, 3, int(95.74 * GIB), 459e12, True),
    "v5e": Generation("v5e", "default", 1, 1, 2, 16 * GIB, 197e12, True),
    "v6e": Generation("v6e", "default", 1, 1, 2, 32 * GIB, 918e12, True),
    "tpu7x": Generation("tpu7x", "default", 2, 2, 3, int(94.75 * GIB), 4614e12, True),
}
_LIBTPU_PREFIX = {g.libtpu: name for name, g in GENERATIONS.items()}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "ironwood": "tpu7x"}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                 # as the user gave it
    generation: str           # key of GENERATIONS
    shape: tuple              # chips along each torus axis

    @property
    def gen(self) -> Generation:
        return GENERATIONS[self.generation]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def num_devices(self) -> int:
        return self.chips * self.gen.devices_per_chip

    @property
    def libtpu_name(self) -> str:
        return f"{self.gen.libtpu}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        per = self.gen.cores_per_chip if self.gen.chip_config == "megacore" or self.generation == "tpu7x" else 1
        return f"{self.generation}-{self.chips * per}"

    def describe(self) -> str:
        return (f"{self.accelerator_type} ({self.libtpu_name}): {self.chips} chips, {self.num_devices} devices, "
                f"{self.gen.hbm_bytes / GIB:.2f} GiB HBM per device")

    def devices(self) -> list:
        """Compile-only devices of this topology (libtpu must import)."""
        if not libtpu_available():
            raise LibtpuMissing()
        # Compiling needs no TPU, so several planners may share a machine: skip libtpu's one-process lock.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies
        desc = topologies.get_topology_desc(platform="tpu", topology_name=self.libtpu_name,
                                            chip_config_name=self.gen.chip_config,
                                            chips_per_host_bounds=_host_bounds(self), num_slices=1)
        return list(desc.devices)


class LibtpuMissing(InputError):
    """libtpu does not import: one line saying what to install."""

    def __init__(self):
        super().__init__("planning for TPU needs libtpu (compile-only devices); install it with "
                         "`pip install -r requirements-tpu.txt` (or `pip install 'jax[tpu]'`)")


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


def _host_bounds(t: Topology) -> tuple:
    """Chips per host: a 2x2x1 block (4 chips) where the slice has one, else the whole small slice."""
    s = tuple(t.shape) + (1,) * (3 - len(t.shape))
    return tuple(min(2, x) if i < 2 else 1 for i, x in enumerate(s))


def _default_shape(chips: int, dims: int) -> tuple:
    """The usual slice shape for `chips` chips: powers of two as even as possible, the larger axes last
    (v5p-1024 -> 8x8x8, 128 chips -> 4x4x8; v5e-256 -> 16x16)."""
    if chips < 1 or chips & (chips - 1):
        raise InputError(f"{chips} chips: only powers of two map to a standard slice shape; give the raw "
                         f"topology instead (e.g. v5:4x4x12)")
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape = [2, 2, 1]
        chips //= 4
    while chips > 1:
        shape[min(range(dims), key=lambda j: (shape[j], -j))] *= 2
        chips //= 2
    shape = sorted(shape)
    return (2, 2, 1) if shape == [1, 2, 2] else tuple(shape)


def parse_topology(text: str) -> Topology:
    """`v5p-1024`, `v5e-256`, `v6e-256`, `v4-128`, `tpu7x-256` or a raw `v5:8x8x8` / `tpu7x:4x4x8` string."""
    raw = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", raw)
    if m:
        prefix, shape = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
        gen = _LIBTPU_PREFIX.get(prefix) or (prefix if prefix in GENERATIONS else _ALIASES.get(prefix))
        if gen is None:
            raise InputError(f"topology {text!r}: unknown TPU {prefix!r}; raw names start with one of "
                             f"{sorted(_LIBTPU_PREFIX)}")
        if len(shape) != GENERATIONS[gen].dims:
            raise InputError(f"topology {text!r}: {gen} slices have {GENERATIONS[gen].dims} axes")
        return Topology(text, gen, shape)
    m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", raw)
    if not m:
        raise InputError(f"topology {text!r}: use an accelerator type (v5p-1024, v5e-256, v6e-256, v4-128, "
                         f"tpu7x-256) or a raw libtpu topology (v5:8x8x8)")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in GENERATIONS:
        raise InputError(f"topology {text!r}: unknown TPU {m.group(1)!r}; choose one of {sorted(GENERATIONS)}")
    g, n = GENERATIONS[gen], int(m.group(2))
    cores = g.cores_per_chip if gen in ("v4", "v5p", "tpu7x") else 1
    if n % cores:
        raise InputError(f"topology {text!r}: {gen} names count TensorCores ({cores} per chip); use a multiple "
                         f"of {cores}")
    return Topology(text, gen, _default_shape(n // cores, g.dims))
