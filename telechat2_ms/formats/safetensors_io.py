"""Streaming safetensors reader and writer (numpy only, bit-exact, any of F32/F16/BF16).

Why not `safetensors.safe_open`: its numpy backend cannot return BF16 tensors (numpy has no bfloat16) and
its torch backend would make torch a runtime dependency. The format is small (8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes), so this module reads it
directly:
- `SafetensorsFile` parses and validates the header once (offsets contiguous, sizes consistent, the file
  as long as the header says: a truncated shard is refused up front) and reads one tensor, or a range of
  its rows, into a fresh numpy array with seek + readinto (no mmap, so resident memory is that array).
- `SafetensorsWriter` knows every (name, dtype, shape) before any data arrives, writes the header first
  and then each tensor's bytes at their final offsets, in any order and in row pieces if wanted; `close`
  checks that every byte of every tensor was written exactly once. Files written here load with
  `safetensors.safe_open`, HF transformers and `mindspore.load_checkpoint(format="safetensors")`.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from telechat2_ms.formats.dtypes import ITEMSIZE, STORAGE, check_code
from telechat2_ms.formats.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class TensorInfo:
    """dtype code and shape of one stored tensor."""

    code: str
    shape: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.code]


def _int_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class SafetensorsFile:
    """Header of one .safetensors file plus on-demand reads of its tensors."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path} is truncated: {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CheckpointError(f"{self.path} is truncated or not safetensors: header length {header_len} "
                                      f"does not fit in a {size}-byte file")
            try:
                header = json.loads(f.read(header_len).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path} has an unreadable safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} has an unreadable safetensors header: not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: safetensors __metadata__ must map names to strings")
        self.metadata: Dict[str, str] = dict(metadata)
        self._data_start = 8 + header_len
        self._entries: Dict[str, Tuple[TensorInfo, int, int]] = {}
        for name, entry in header.items():
            shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
            if not (_int_list(shape) and all(d >= 0 for d in shape) and _int_list(offsets) and len(offsets) == 2
                    and 0 <= offsets[0] <= offsets[1]):
                raise CheckpointError(f"{self.path}: safetensors header entry of tensor {name!r} is malformed "
                                      "(it needs dtype, shape: non-negative integers, data_offsets: [begin, end])")
            info = TensorInfo(check_code(entry.get("dtype"), f"tensor {name} in {self.path}"), tuple(shape))
            begin, end = offsets
            if end - begin != info.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name} has {end - begin} bytes for shape "
                                      f"{list(info.shape)} {info.code} ({info.nbytes} expected)")
            self._entries[name] = (info, begin, end)
        data_len = self._check_offsets()
        if self._data_start + data_len != size:
            raise CheckpointError(f"{self.path} is truncated: its header describes {self._data_start + data_len} "
                                  f"bytes but the file has {size}" if size < self._data_start + data_len else
                                  f"{self.path} has {size - self._data_start - data_len} bytes after the data "
                                  f"its header describes")

    def _check_offsets(self) -> int:
        spans = sorted((begin, end, name) for name, (_, begin, end) in self._entries.items())
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise CheckpointError(f"{self.path}: tensor {name} starts at byte {begin}, expected {pos} "
                                      f"(overlapping or gapped data offsets)")
            pos = end
        return pos

    def names(self) -> List[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def infos(self) -> Dict[str, TensorInfo]:
        return {name: entry[0] for name, entry in self._entries.items()}

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None) -> np.ndarray:
        """Tensor `name` (BF16 as uint16 bits), or only rows [start, stop) of its first axis."""
        info, begin, end = self._entries[name]
        shape = info.shape
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            start, stop = rows
            begin, end = begin + start * row_bytes, begin + stop * row_bytes
            shape = (stop - start,) + tuple(shape[1:])
        out = np.empty(shape, dtype=STORAGE[info.code])
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(memoryview(out.reshape(-1)).cast("B"))
        if got != end - begin:
            raise CheckpointError(f"{self.path} is truncated: tensor {name} needs {end - begin} bytes, got {got}")
        return out


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is fixed at construction (header first, data after)."""

    def __init__(self, path: str, entries: Sequence[Tuple[str, TensorInfo]], metadata: Mapping[str, str] = None):
        self.path = str(path)
        header: Dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: Dict[str, Tuple[TensorInfo, int]] = {}
        pos = 0
        for name, info in entries:
            if name in self._layout:
                raise CheckpointError(f"tensor {name} listed twice for {self.path}")
            header[name] = {"dtype": info.code, "shape": list(info.shape), "data_offsets": [pos, pos + info.nbytes]}
            self._layout[name] = (info, pos)
            pos += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
        self._data_start = 8 + len(blob)
        self._written: Dict[str, List[Tuple[int, int]]] = {name: [] for name in self._layout}
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._file.truncate(self._data_start + pos)

    def write(self, name: str, array: np.ndarray, row_offset: int = 0) -> int:
        """Write `array` as tensor `name` (or as its rows starting at `row_offset`); returns bytes written."""
        if name not in self._layout:
            raise CheckpointError(f"{self.path}: tensor {name} is not in the planned header")
        info, begin = self._layout[name]
        if array.dtype != STORAGE[info.code]:
            raise CheckpointError(f"{self.path}: tensor {name} planned as {info.code}, got numpy {array.dtype}")
        full = tuple(info.shape)
        if row_offset == 0 and tuple(array.shape) == full:
            start = 0
        elif (array.ndim == len(full) and tuple(array.shape[1:]) == full[1:]
              and 0 <= row_offset and row_offset + array.shape[0] <= full[0]):
            start = row_offset * (info.nbytes // full[0])
        else:
            raise CheckpointError(f"{self.path}: tensor {name} has planned shape {list(full)}, got "
                                  f"{list(array.shape)} at row {row_offset}")
        data = np.ascontiguousarray(array)
        self._file.seek(self._data_start + begin + start)
        self._file.write(memoryview(data.reshape(-1)).cast("B"))
        self._written[name].append((start, start + data.nbytes))
        return data.nbytes

    def close(self) -> None:
        """Flush and check that every tensor was written completely, exactly once."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        for name, spans in self._written.items():
            info = self._layout[name][0]
            pos = 0
            for start, end in sorted(spans):
                if start != pos:
                    break
                pos = end
            if pos != info.nbytes or sum(e - s for s, e in spans) != info.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name} was not written exactly once "
                                      f"({sum(e - s for s, e in spans)} of {info.nbytes} bytes)")

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()



def write_arrays(path: str, tensors: Mapping[str, object], metadata: Mapping[str, str] = None) -> None:
    """Write {name: numpy array | MindSpore Tensor/Parameter} to `path`, one tensor at a time: a Tensor is
    copied to the host only while its own bytes are written (never the whole set at once). float32 / float16
    arrays keep their dtype; MindSpore bfloat16 tensors are stored as BF16 (exact)."""
    import numpy as _np

    from telechat2_ms.formats.dtypes import f32_to_bf16_bits

    def code_of(value) -> str:
        if isinstance(value, _np.ndarray):
            return {"float32": "F32", "float16": "F16", "uint16": "BF16"}.get(str(value.dtype), str(value.dtype))
        return {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16"}.get(str(value.dtype), str(value.dtype))

    def host(value, code: str) -> _np.ndarray:
        if isinstance(value, _np.ndarray):
            return value
        if code == "BF16":
            import mindspore as ms
            from mindspore import ops

            return f32_to_bf16_bits(ops.cast(value, ms.float32).asnumpy())  # bf16 -> f32 -> bf16 is exact
        return value.asnumpy()

    entries = []
    for name, value in tensors.items():
        code = check_code(code_of(value), f"tensor {name}")
        entries.append((name, TensorInfo(code, tuple(int(s) for s in value.shape))))
    writer = SafetensorsWriter(path, entries, metadata)
    try:
        for name, info in entries:
            array = host(tensors[name], info.code)
            writer.write(name, array)
            del array
        writer.close()
    except BaseException:
        writer.abort()
        raise
