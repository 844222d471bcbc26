"""MindSpore checkpoint (MindFormers names) -> HF TeleChat2 directory.

    ms_to_hf("telechat2_7b.safetensors", "TeleChat2-7B-hf/", dtype="keep", shard_size="5GB")

Input: a `.safetensors` file written by hf2ms (config in its metadata), a `.ckpt` (loaded whole by
MindSpore), or a sharded layout directory (merged tensor by tensor); `config` (size name, config.json or
ModelConfig) is needed when the checkpoint carries none and must agree with it when it does. Fused
layouts (w_qkv, w_gate_hidden) are split back with the inverse functions of the key map. Names are mapped
with the inverse derived from `convert.keymap.KEY_MAP`.

Output directory (written in a temporary directory beside it, renamed at the end): `config.json` from
`ModelConfig.to_hf_config`, `model-0000i-of-0000N.safetensors` shards of at most `shard_size` bytes (a
single tensor larger than that gets a shard of its own; metadata {"format": "pt"} as transformers expects)
and `model.safetensors.index.json` (metadata.total_size + weight_map).
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

from telechat2_ms.formats.atomic import atomic_dir, check_output_path
from telechat2_ms.formats.dtypes import target_code
from convert.errors import ConversionError
from convert.keymap import (GMM_METADATA, Fusion, check_names_and_shapes, expected_hf, expected_ms, fusion_of,
                            is_fused, is_gmm_weight, ms_to_hf_names)
from telechat2_ms.formats.safetensors_io import SafetensorsWriter, TensorInfo
from convert.sources import TensorSource, open_ms_checkpoint, resolve_config
from convert.stream import TensorPlan, check_all_consumed, run_plans
from telechat2_ms.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"


class _SplitPart:
    """Build function: part `index` of a fused weight (picklable, named in tracebacks)."""

    def __init__(self, fusion: Fusion, cfg: ModelConfig, index: int):
        self.fusion, self.cfg, self.index = fusion, cfg, index

    def __call__(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(self.fusion.split(self.cfg, arrays[0])[self.index])


class _Expert:
    """Build function: expert `index`'s tensor from a stacked [E, ...] MindSpore tensor (`transposed`: a
    grouped-matmul layout weight [E, in, out], given back as HF's [out, in])."""

    def __init__(self, index: int, transposed: bool = False):
        self.index, self.transposed = index, transposed

    def __call__(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        one = arrays[0][self.index]
        return np.ascontiguousarray(one.T if self.transposed else one)


def plan_ms_to_hf(source: TensorSource, cfg: ModelConfig, dtype: str = "keep", gmm: bool = False) -> List[TensorPlan]:
    """Validate the MindSpore tensors against `cfg` and list the HF tensors to produce, in canonical order.
    `gmm`: the stacked expert weights are in the grouped-matmul layout (also when the file's metadata says so)."""
    infos = source.infos()
    gmm = gmm or source.metadata.get(GMM_METADATA[0]) == GMM_METADATA[1]
    check_names_and_shapes({n: i.shape for n, i in infos.items()}, expected_ms(cfg, is_fused(infos), gmm),
                           f"MindSpore checkpoint {source.path}{' (grouped-matmul layout)' if gmm else ''}", cfg)
    origin: Dict[str, Tuple[str, object]] = {}  # HF name -> (MindSpore source name, build function or None)
    for ms_name in infos:
        fused_weight = fusion_of(ms_name)
        if fused_weight is None:
            parts = [(ms_name, None)]
        else:
            fusion, layer = fused_weight
            parts = [(p.format(layer=layer), _SplitPart(fusion, cfg, i)) for i, p in enumerate(fusion.parts)]
        for part_name, build in parts:
            for match in ms_to_hf_names(part_name, cfg):  # the inverse derived from KEY_MAP
                origin[match.name] = (ms_name, build if match.expert is None else
                                      _Expert(match.expert, gmm and is_gmm_weight(ms_name)))
    plans = []
    for hf_name, shape in expected_hf(cfg).items():
        ms_name, build = origin[hf_name]
        info = TensorInfo(target_code(infos[ms_name].code, dtype), tuple(shape))
        plans.append(TensorPlan(hf_name, info, (ms_name,), build) if build else TensorPlan(hf_name, info, (ms_name,)))
    return plans


def parse_size(value: Union[int, str]) -> int:
    """Bytes from an int or a string such as '5GB' (10**9), '500MiB' (2**20), '1024'."""
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if m is None:
            raise ConversionError(f"shard size {value!r} is not a size such as 5GB, 500MiB or 1000000")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ConversionError(f"shard size must be positive, got {value!r}")
    return size


def pack_shards(plans: Sequence[TensorPlan], max_bytes: int) -> List[List[TensorPlan]]:
    """Consecutive groups of at most `max_bytes` (a larger single tensor gets its own group)."""
    shards: List[List[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        if shards[-1] and size + plan.info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += plan.info.nbytes
    return shards


def ms_to_hf(ms_path: str, out_dir: str, config: Union[None, str, ModelConfig] = None, dtype: str = "keep",
             shard_size: Union[int, str] = "5GB", overwrite: bool = False, progress: bool = True,
             gmm: bool = False) -> str:
    """Convert; returns `out_dir`. See the module docstring for the inputs, outputs and checks."""
    max_bytes = parse_size(shard_size)
    check_output_path(out_dir, overwrite, is_dir=True)
    source = open_ms_checkpoint(ms_path)
    cfg = resolve_config(source, config)
    plans = plan_ms_to_hf(source, cfg, dtype, gmm)
    shards = pack_shards(plans, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    consumed = set()
    with atomic_dir(out_dir, overwrite) as tmp:
        for fname, group in zip(names, shards):
            writer = SafetensorsWriter(os.path.join(tmp, fname), [(p.name, p.info) for p in group], {"format": "pt"})
            try:
                consumed |= run_plans(group, source, lambda p, a: writer.write(p.name, a), progress,
                                      f"ms2hf {fname}")
                writer.close()
            finally:
                writer.abort()
        check_all_consumed(consumed, set(source.infos()), "ms2hf")
        index = {"metadata": {"total_size": sum(p.info.nbytes for p in plans)},
                 "weight_map": {p.name: fname for fname, group in zip(names, shards) for p in group}}
        _write_json(os.path.join(tmp, INDEX_NAME), index)
        _write_json(os.path.join(tmp, "config.json"), cfg.to_hf_config())
    return out_dir


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
