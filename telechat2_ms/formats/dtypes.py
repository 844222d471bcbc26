"""Element types of the checkpoints and exact casts between them, in numpy only.

Tensors travel as numpy arrays tagged with a safetensors dtype code: "F32" (float32), "F16" (float16) and
"BF16". numpy has no bfloat16, so BF16 tensors are carried as their raw bit patterns in uint16 arrays; that
makes every read/write bit-exact. Casts:
- BF16 -> F32 is exact (the 16 bits become the high half of the float32).
- F32 -> BF16 rounds to nearest, ties to even (what torch's `.to(torch.bfloat16)` does); NaN stays NaN.
- F16 <-> F32 use numpy's IEEE casts; BF16 <-> F16 go through F32 (exact first step, one rounding).
Casts run in chunks so a large tensor never needs more than one extra float32 chunk of scratch memory.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from telechat2_ms.formats.errors import CheckpointError

# safetensors dtype code -> numpy storage dtype (little-endian, as the format prescribes)
STORAGE: Dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
ITEMSIZE: Dict[str, int] = {code: dt.itemsize for code, dt in STORAGE.items()}
# user-facing --dtype choices -> code ("keep" keeps each tensor's own code)
DTYPE_CHOICES: Dict[str, str] = {"keep": "", "bf16": "BF16", "fp16": "F16", "fp32": "F32"}

_CHUNK = 1 << 22  # elements per cast chunk (16 MiB of float32 scratch)


def check_code(code: str, what: str) -> str:
    if code not in STORAGE:
        raise CheckpointError(f"{what} has dtype {code}; supported dtypes are {', '.join(STORAGE)}")
    return code


def target_code(src_code: str, choice: str) -> str:
    """The output code for a tensor stored as `src_code` under the --dtype `choice`."""
    if choice not in DTYPE_CHOICES:
        raise CheckpointError(f"unknown dtype {choice!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[choice] or src_code


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even; NaN keeps its sign and is quieted."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    out = ((u + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def _to_f32(chunk: np.ndarray, code: str) -> np.ndarray:
    return bf16_bits_to_f32(chunk) if code == "BF16" else chunk.astype(np.float32)


def _from_f32(chunk: np.ndarray, code: str) -> np.ndarray:
    return f32_to_bf16_bits(chunk) if code == "BF16" else chunk.astype(STORAGE[code])


def cast(array: np.ndarray, src_code: str, dst_code: str) -> np.ndarray:
    """`array` (storage of `src_code`) re-encoded as `dst_code`; the same object when the codes agree."""
    if src_code == dst_code:
        return array
    src = np.ascontiguousarray(array).reshape(-1)
    out = np.empty(array.shape, dtype=STORAGE[dst_code])  # owns its storage (layers.host_parameter shares it)
    flat = out.reshape(-1)
    for start in range(0, src.size, _CHUNK):
        part = src[start:start + _CHUNK]
        flat[start:start + _CHUNK] = _from_f32(_to_f32(part, src_code), dst_code)
    return out
