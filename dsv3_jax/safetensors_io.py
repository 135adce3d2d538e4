"""safetensors files and DeepSeek's FP8 block quantisation, with no torch: header parsing, raw reads for
dtypes numpy cannot name (float8 e4m3), streaming writes one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from .errors import InputError

FP8_BLOCK = 128
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448

# safetensors dtype strings <-> numpy dtypes (bf16 and fp8 through ml_dtypes).
ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")          # accepted for any floating tensor
BIAS_DTYPES = ("F64", "F32")                          # the routing bias must not be downcast (paper section 2.1.2: it decides routing)


def np_dtype(d) -> np.dtype:
    if isinstance(d, str) and d in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    if isinstance(d, str) and d in ("float8_e4m3fn",):
        return np.dtype(ml_dtypes.float8_e4m3fn)
    return np.dtype(d)


# ----------------------------------------------------------------------------------------------------------
# safetensors I/O. Reading goes through safetensors.safe_open(framework='numpy'), except for dtypes numpy
# cannot name (FP8), which are read from the raw bytes at the offsets the header gives.

def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where the data section starts)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file, opened lazily: `get` reads a whole tensor, `get_slice` only the bytes of a
    block (one positioned read per contiguous run). `bytes_read` counts the tensor bytes read so far."""

    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = read_safetensors_header(path)
        self.bytes_read = 0
        self._st = None
        self._fd = None

    def info(self, name: str) -> tuple[str, tuple]:
        h = self.header[name]
        return h["dtype"], tuple(h["shape"])

    def get(self, name: str) -> np.ndarray:
        dt, shape = self.info(name)
        begin, end = self.header[name]["data_offsets"]
        if dt not in ("F8_E4M3", "F8_E5M2"):
            if self._st is None:
                from safetensors import safe_open
                self._st = safe_open(self.path, framework="numpy")
            try:
                out = self._st.get_tensor(name)
                self.bytes_read += end - begin
                return out
            except (AttributeError, TypeError, ValueError):
                pass                                               # fall back to the raw bytes
        return self.get_slice(name, tuple(slice(0, n) for n in shape))

    def get_slice(self, name: str, index: tuple) -> np.ndarray:
        """`tensor[index]` for a tuple of unit-step slices (one per axis), reading only the rows it needs."""
        dt, shape = self.info(name)
        dtype = ST_TO_NP[dt]
        index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
        out_shape = tuple(sl.stop - sl.start for sl in index)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        base = self.data_start + self.header[name]["data_offsets"][0]
        if not shape:
            return np.frombuffer(self._pread(name, base, dtype.itemsize), dtype).reshape(())
        # Axes after the last partial one (k) are read whole, so each run over axes k.. is contiguous.
        k = max([i for i, (sl, n) in enumerate(zip(index, shape)) if (sl.start, sl.stop) != (0, n)], default=0)
        strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
        run = out_shape[k] * strides[k]
        out = np.empty((int(np.prod(out_shape[:k], dtype=np.int64)), run), dtype)
        for n, lead in enumerate(np.ndindex(*out_shape[:k])):
            first = sum((index[i].start + j) * strides[i] for i, j in enumerate(lead)) + index[k].start * strides[k]
            out[n] = np.frombuffer(self._pread(name, base + first * dtype.itemsize, run * dtype.itemsize), dtype)
        return out.reshape(out_shape)

    def _pread(self, name: str, offset: int, nbytes: int) -> bytes:
        buf = os.pread(self._fd, nbytes, offset)
        if len(buf) != nbytes:
            raise InputError(f"{self.path}: tensor {name} is truncated")
        self.bytes_read += nbytes
        return buf

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
        self._st = self._fd = None


def write_safetensors(path: str, tensors: list[tuple[str, tuple, np.dtype, Any]]) -> None:
    """Stream tensors to one safetensors file: `tensors` holds (name, shape, dtype, producer) and each
    producer() is called once, right before its bytes are written, so only one tensor is in memory."""
    order = sorted(tensors, key=lambda t: (-np.dtype(t[2]).itemsize, t[0]))    # keeps every tensor aligned
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dt, _ in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": NP_TO_ST[np.dtype(dt)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for name, shape, dt, produce in order:
            a = np.ascontiguousarray(produce(), dtype=dt)
            if a.shape != tuple(shape):
                raise AssertionError(f"{name}: produced {a.shape}, header says {tuple(shape)}")
            fh.write(a.tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# FP8 block quantisation.

def dequantize_fp8(w8: np.ndarray, scale_inv: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    """`W[i,j] = float32(W8[i,j]) * S[i//block, j//block]` (edge blocks included) as fp32, row block by row
    block so the extra memory is one fp32 copy of the weight."""
    out, inn = w8.shape
    if scale_inv.shape != (math.ceil(out / block), math.ceil(inn / block)):
        raise InputError(f"scale_inv shape {scale_inv.shape} does not fit a {w8.shape} weight in {block}-blocks")
    w = w8.astype(np.float32)
    s = scale_inv.astype(np.float32)
    for i in range(s.shape[0]):
        w[i * block:(i + 1) * block] *= np.repeat(s[i], block)[:inn]
    return w


def quantize_fp8(w: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per 128x128 block: scale = amax/448, W8 = e4m3(W/scale); returns (W8, scale_inv fp32) such that
    `dequantize_fp8(W8, scale_inv)` approximates W (DeepSeek's `weight_scale_inv` convention)."""
    w = np.asarray(w, np.float32)
    out, inn = w.shape
    ob, ib = math.ceil(out / block), math.ceil(inn / block)
    pad = np.zeros((ob * block, ib * block), np.float32)
    pad[:out, :inn] = w
    blocks = pad.reshape(ob, block, ib, block)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / E4M3_MAX, 1.0).astype(np.float32)
    q = np.clip(blocks / scale[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(q.reshape(ob * block, ib * block)[:out, :inn]), scale


def scale_blocks(rows: slice, cols: slice, block: int = FP8_BLOCK) -> tuple[slice, slice]:
    """The slice of a `_scale_inv` tensor whose blocks cover the weight block `[rows, cols]`."""
    return (slice(rows.start // block, -(-rows.stop // block)), slice(cols.start // block, -(-cols.stop // block)))


def dequantize_fp8_slice(w8: np.ndarray, scale_inv: np.ndarray, rows: slice, cols: slice,
                         block: int = FP8_BLOCK) -> np.ndarray:
    """`dequantize_fp8` of the block `W8[rows, cols]`, given only that block and its covering scales
    (`scale_inv[scale_blocks(rows, cols)]`): the same fp32 values as dequantising the whole weight."""
    r = (np.arange(rows.start, rows.stop) // block) - rows.start // block
    c = (np.arange(cols.start, cols.stop) // block) - cols.start // block
    return w8.astype(np.float32) * scale_inv.astype(np.float32)[r[:, None], c[None, :]]
