"""Weights for a parallelized model: a full checkpoint sliced at load time, or this rank's file of a
(tp, pp) layout directory written by convert/reshard.py (`OUT/tp{t}_pp{p}/model.safetensors`).

- `FullCheckpoint(path)`: a lazy name -> full numpy array mapping over one .safetensors file; pass it as
  `parallelize_telechat2(model, dims, weights=FullCheckpoint(path))` and each rank reads and slices only
  the tensors of its own stage (shard_layout.shard_tensor).
- `load_rank_checkpoint(parallel, layout_dir)`: copies this rank's pre-sliced tensors into an already
  parallelized model, after checking the layout (tp, pp, stage layer ranges) matches.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Iterator

import numpy as np

from mindspore import Tensor

from telechat2_ms.config import ConfigError


class FullCheckpoint(Mapping):
    """Read-only, lazy mapping over the tensors of one full .safetensors checkpoint."""

    def __init__(self, path: str):
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        self.path = path
        self._file = safe_open(path, framework="numpy")
        self._names = list(self._file.keys())

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(f"{name} is not in checkpoint {self.path}")
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_rank_checkpoint(parallel, layout_dir: str) -> str:
    """Load this rank's shard file of `layout_dir` into `parallel.model`; returns the file read."""
    from safetensors.numpy import load_file

    dims, coords = parallel.dims, parallel.groups.coords
    layout_path = os.path.join(layout_dir, "layout.json")
    if not os.path.isfile(layout_path):
        raise ConfigError(f"{layout_dir} is not a sharded checkpoint (no layout.json); write one with "
                          "convert/reshard.py or pass the full checkpoint as FullCheckpoint(path)")
    with open(layout_path, encoding="utf-8") as f:
        layout = json.load(f)
    ranges = [list(r) for r in dims.stage_layer_ranges(parallel.model.config.num_layers)]
    if (layout["tp"], layout["pp"], layout["layer_ranges"]) != (dims.tp, dims.pp, ranges):
        raise ConfigError(f"{layout_dir} holds tp={layout['tp']} pp={layout['pp']} layer ranges "
                          f"{layout['layer_ranges']}, but this run is tp={dims.tp} pp={dims.pp} layer ranges "
                          f"{ranges}; reshard it with convert/reshard.py")
    path = os.path.join(layout_dir, f"tp{coords.tp}_pp{coords.pp}", "model.safetensors")
    arrays = load_file(path)
    params = dict(parallel.model.parameters_and_names())
    missing, unexpected = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or unexpected:
        raise ConfigError(f"{path}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        if tuple(arrays[name].shape) != tuple(param.shape):
            raise ConfigError(f"{path}: {name} has shape {arrays[name].shape}, the model expects {param.shape}")
        param.set_data(Tensor(arrays[name].astype(np.float32)))
    return path
