"""Reading training data files: jsonl records with file:line errors, and data-mix configs.

A training source is one of
- a `.jsonl` file (one JSON object per line; blank lines are skipped), or a MindFormers `.mindrecord` file
  (data/mindrecord.py: rows of input_ids and labels, already tokenized),
- a directory: every `*.jsonl` in it, sorted by name, each with weight 1,
- a data-mix `.json` file {path: weight, ...} as in the official DeepSpeed recipe (spec 6.1); relative paths
  are resolved against the mix file's directory,
- several of the above joined by commas.
A malformed line raises `DataError` naming the file and the 1-based line number.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple


class DataError(ValueError):
    """Training data is unusable; the message names the file (and line) and what is wrong."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute path of a .jsonl file
    weight: float = 1.0  # resampling factor: int(weight * samples) samples are drawn from this file

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies this file's content cheaply (path, size, mtime) for the preprocessing cache."""
        stat = os.stat(self.path)
        return {"path": self.path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "weight": self.weight}


def iter_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield (line number, object) for every non-blank line; DataError on invalid JSON or a non-object."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot open training data {path}: {err.strerror}") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                f"{err.start + 1}: {err.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON at column {err.colno}: {err.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
            yield line_no, obj


def _mix_sources(path: str) -> List[Source]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            mix = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"data-mix file {path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(mix, dict) or not mix:
        raise DataError(f"data-mix file {path}: expected a non-empty JSON object {{\"file.jsonl\": weight, ...}}")
    base = os.path.dirname(os.path.abspath(path))
    sources = []
    for name, weight in mix.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise DataError(f"data-mix file {path}: weight of {name!r} must be a positive number, got {weight!r}")
        full = name if os.path.isabs(name) else os.path.join(base, name)
        if not full.endswith((".jsonl", ".mindrecord")) or not os.path.isfile(full):
            raise DataError(f"data-mix file {path}: {name!r} is not an existing .jsonl or .mindrecord file")
        sources.append(Source(os.path.abspath(full), float(weight)))
    return sources


def resolve_sources(spec: str) -> List[Source]:
    """Turn `train.train_dataset` (see the module docstring) into a list of jsonl Sources."""
    if not spec or not spec.strip():
        raise DataError("no training data given (set train.train_dataset to a .jsonl file, a directory of "
                        ".jsonl files, a data-mix .json, or a preprocessed dataset directory)")
    sources: List[Source] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if os.path.isdir(part):
            files = sorted(f for f in os.listdir(part) if f.endswith(".jsonl"))
            if not files:
                raise DataError(f"training data directory {part} holds no .jsonl files")
            sources += [Source(os.path.abspath(os.path.join(part, f))) for f in files]
        elif part.endswith(".json") and os.path.isfile(part):
            sources += _mix_sources(part)
        elif os.path.isfile(part):
            sources.append(Source(os.path.abspath(part)))
        else:
            raise DataError(f"training data not found: {part}")
    return sources
