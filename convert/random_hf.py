"""Random TeleChat2 checkpoints in the HF layout, for tests and benchmarks (no torch needed).

`RandomHFWeights(cfg, seed)` is a lazy mapping {HF name: float32 array} that generates each tensor on
access (N(0, 0.02) weights, norms near 1, non-zero biases, so every parameter matters);
`save_hf_checkpoint` writes a HF directory (config.json, `model-0000i-of-0000N.safetensors` shards of
bounded size, `model.safetensors.index.json`) one tensor at a time, so even real-size shapes (the 3B
benchmark) need memory for one tensor only.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Callable, Dict, Iterator, Mapping, Tuple

import numpy as np

from telechat2_ms.formats.dtypes import STORAGE, cast
from convert.keymap import expected_hf
from convert.ms_to_hf import INDEX_NAME, pack_shards
from telechat2_ms.formats.safetensors_io import SafetensorsWriter, TensorInfo
from convert.stream import TensorPlan
from telechat2_ms.config import ModelConfig

Shape = Tuple[int, ...]


class RandomHFWeights(Mapping):
    """{HF name: float32 array}, each tensor drawn on access from a generator seeded by (seed, crc32(name))."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.shapes: Dict[str, Shape] = expected_hf(cfg)

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        values = rng.standard_normal(shape, dtype=np.float32)
        if name.endswith("layernorm.weight") or name.endswith("ln_f.weight"):
            return 1.0 + 0.1 * values  # [H]
        if name.endswith(".bias"):
            return 0.1 * values  # [H]
        values *= np.float32(0.02)
        return values

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def save_hf_checkpoint(directory: str, config: Mapping, tensors: Mapping[str, np.ndarray], code: str = "F32",
                       shard_bytes: int = 1 << 30, shapes: Mapping[str, Shape] = None) -> Dict[str, str]:
    """Write float32 `tensors` (any mapping; read one at a time) stored as `code` into a HF directory.

    `shapes` avoids touching lazy mappings for the header (RandomHFWeights has `.shapes`). Returns the
    weight map {name: shard file}."""
    os.makedirs(directory, exist_ok=True)
    shapes = shapes if shapes is not None else getattr(tensors, "shapes", None)
    if shapes is None:
        shapes = {name: tuple(tensors[name].shape) for name in tensors}
    plans = [TensorPlan(name, TensorInfo(code, tuple(shape)), (name,)) for name, shape in shapes.items()]
    groups = pack_shards(plans, shard_bytes)
    weight_map: Dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        writer = SafetensorsWriter(os.path.join(directory, fname), [(p.name, p.info) for p in group],
                                   {"format": "pt"})
        for plan in group:
            array = np.asarray(tensors[plan.name])
            stored = array if array.dtype == STORAGE[code] else cast(array.astype(np.float32), "F32", code)
            writer.write(plan.name, stored)
            weight_map[plan.name] = fname
        writer.close()
    total = sum(p.info.nbytes for p in plans)
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    return weight_map


def make_random_hf(directory: str, cfg: ModelConfig, code: str = "F32", seed: int = 0,
                   shard_bytes: int = 1 << 30, transform: Callable[[Dict], Dict] = None) -> str:
    """A random HF TeleChat2 directory for `cfg`; `transform` may edit the {name: array} dict first
    (materialised in memory: for tiny configs only)."""
    weights = RandomHFWeights(cfg, seed)
    if transform is not None:
        tensors = transform({name: weights[name] for name in weights})
        save_hf_checkpoint(directory, cfg.to_hf_config(), tensors, code, shard_bytes, shapes=None)
    else:
        save_hf_checkpoint(directory, cfg.to_hf_config(), weights, code, shard_bytes)
    return directory
