"""Tensor-by-tensor copy engine shared by hf2ms, ms2hf and reshard.

A conversion is a list of `TensorPlan`s decided (and validated) before any output is opened: output name,
output dtype/shape, the source tensors it is built from, and a small named function building it (identity
for a rename, fuse/split for the fused layouts). `run_plans` executes them in order: it reads the sources
(a one-entry cache lets consecutive plans share a source, e.g. query and key_value both cut from w_qkv),
casts each to the output dtype, builds, checks the shape, and hands the array to a sink (a writer). So at
most the plan's sources and its output are in memory. A tqdm bar counts tensors and bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from telechat2_ms.formats.dtypes import cast
from convert.errors import ConversionError
from telechat2_ms.formats.safetensors_io import TensorInfo
from convert.sources import TensorSource


def identity(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0]


@dataclass(frozen=True)
class TensorPlan:
    name: str  # output tensor name
    info: TensorInfo  # output dtype code and shape
    sources: Tuple[str, ...]  # source tensor names, in `build` argument order
    build: Callable[[Sequence[np.ndarray]], np.ndarray] = identity


class _LastRead:
    """Reads through `source`, keeping only the most recently read tensor."""

    def __init__(self, source: TensorSource):
        self.source, self.name, self.array = source, None, None

    def get(self, name: str) -> np.ndarray:
        if name != self.name:
            self.array = None  # drop the previous tensor before reading the next
            self.array, self.name = self.source.read(name), name
        return self.array


def run_plans(plans: Sequence[TensorPlan], source: TensorSource, sink: Callable[[TensorPlan, np.ndarray], None],
              progress: bool = True, desc: str = "convert") -> Set[str]:
    """Execute `plans` in order; returns the set of source names consumed."""
    infos: Dict[str, TensorInfo] = source.infos()
    reader = _LastRead(source)
    consumed: Set[str] = set()
    total = sum(p.info.nbytes for p in plans)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
        for i, plan in enumerate(plans):
            arrays = [cast(reader.get(s), infos[s].code, plan.info.code) for s in plan.sources]
            out = plan.build(arrays)
            if tuple(out.shape) != tuple(plan.info.shape):
                raise ConversionError(f"internal error: {plan.name} built as {list(out.shape)}, "
                                      f"planned {list(plan.info.shape)}")
            sink(plan, out)
            del arrays, out
            consumed.update(plan.sources)
            bar.update(plan.info.nbytes)
            bar.set_postfix_str(f"{i + 1}/{len(plans)} tensors", refresh=False)
    return consumed


def check_all_consumed(consumed: Set[str], expected: Set[str], what: str) -> None:
    """The invariant every conversion ends with: each source tensor was used."""
    left = sorted(expected - consumed)
    if left:
        raise ConversionError(f"internal error: {what}: source tensor(s) not consumed: {', '.join(left[:4])}")
