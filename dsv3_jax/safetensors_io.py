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

FP8_BLOCK = 128
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448

# safetensors dtype strings <-> numpy dtypes (bf16 and fp8 through ml_dtypes).
_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")          # accepted for any floating tensor
_BIAS_DTYPES = ("F64", "F32")                          # the routing bias must not be downcast (SPEC section 5)


def _np_dtype(d) -> np.dtype:
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
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable safetensors header ({err})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class _Shard:
    def __init__(self, path: str):
        self.path = path
        self.header, self.data_start = read_safetensors_header(path)
        self._st = None
        self._fh = None

    def info(self, name: str) -> tuple[str, tuple]:
        h = self.header[name]
        return h["dtype"], tuple(h["shape"])

    def get(self, name: str) -> np.ndarray:
        dt, shape = self.info(name)
        if dt not in ("F8_E4M3", "F8_E5M2"):
            if self._st is None:
                from safetensors import safe_open
                self._st = safe_open(self.path, framework="numpy")
            try:
                return self._st.get_tensor(name)
            except (AttributeError, TypeError, ValueError):
                pass                                               # fall back to the raw bytes
        begin, end = self.header[name]["data_offsets"]
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(self.data_start + begin)
        buf = self._fh.read(end - begin)
        if len(buf) != end - begin:
            raise ValueError(f"{self.path}: tensor {name} is truncated")
        return np.frombuffer(buf, dtype=_ST_TO_NP[dt]).reshape(shape)

    def close(self):
        if self._fh is not None:
            self._fh.close()
        self._st = self._fh = None


def _write_safetensors(path: str, tensors: list[tuple[str, tuple, np.dtype, Any]]) -> None:
    """Stream tensors to one safetensors file: `tensors` holds (name, shape, dtype, producer) and each
    producer() is called once, right before its bytes are written, so only one tensor is in memory."""
    order = sorted(tensors, key=lambda t: (-np.dtype(t[2]).itemsize, t[0]))    # keeps every tensor aligned
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dt, _ in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _NP_TO_ST[np.dtype(dt)], "shape": list(shape),
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
        raise ValueError(f"scale_inv shape {scale_inv.shape} does not fit a {w8.shape} weight in {block}-blocks")
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
