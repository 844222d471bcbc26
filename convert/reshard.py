"""Split a full MindSpore checkpoint into per-rank files for a (tp, pp) layout, merge it back, or go from
one layout to another directly, tensor by tensor and bit-exact.

    reshard("telechat2_7b.safetensors", "out/tp2_pp2", tp=2, pp=2)          # split
    reshard("out/tp2_pp2", "out/tp4_pp1", tp=4, pp=1)                       # layout -> layout
    reshard("out/tp4_pp1", "merged.safetensors")                            # merge (tp = pp = 1)

The split rules are telechat2_ms.shard_layout's (one table shared with the parallel layers). A layout
directory holds
    layout.json                    tp, pp, layer_counts, layer_ranges, rank order, fused flag, model config
    tp{t}_pp{p}/model.safetensors  the parameters of pipeline stage p, tensor-parallel slice t
Parameter names keep their global layer index on every stage (what MindFormers' pipeline checkpoints do,
and merging needs no renumbering); rank = p * tp + t. Each rank file also carries the model config and its
own (tp, tp_rank, pp, pp_stage) in the safetensors metadata.

Going between layouts reads one parameter at a time (merged from the source slices in memory), slices it
for every target rank and writes the slices straight into the target files: the full checkpoint is never
written. All checks (config, names, shapes, divisibility, stage counts, output path) run before writing;
the output directory appears atomically.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from convert.atomic import atomic_dir, atomic_file, check_output_path
from convert.dtypes import target_code
from convert.errors import ConversionError
from convert.keymap import check_names_and_shapes, expected_ms, is_fused
from convert.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorInfo
from convert.sources import CONFIG_METADATA_KEY, TensorSource, config_metadata, open_ms_checkpoint, \
    resolve_config
from convert.stream import TensorPlan, check_all_consumed, run_plans
from telechat2_ms.config import ModelConfig
from telechat2_ms.shard_layout import check_tp, merge_shards, param_stage, shard_shape, shard_tensor, \
    split_rule, stage_layer_ranges

LAYOUT_NAME = "layout.json"
LAYOUT_FORMAT = "telechat2_ms.sharded/1"
SHARD_FILE = "model.safetensors"


def rank_file(tp_rank: int, stage: int) -> str:
    """Path of one rank's file inside a layout directory."""
    return os.path.join(f"tp{tp_rank}_pp{stage}", SHARD_FILE)


def _full_shape(name: str, local: Tuple[int, ...], tp: int) -> Tuple[int, ...]:
    dim = split_rule(name).split_dim()
    return local if dim is None else local[:dim] + (local[dim] * tp,) + local[dim + 1:]


class ShardedSource(TensorSource):
    """A layout directory read as a full checkpoint: `read(name)` merges the tp slices of one parameter."""

    def __init__(self, directory: str):
        self.path = directory
        layout_path = os.path.join(directory, LAYOUT_NAME)
        if not os.path.isfile(layout_path):
            raise ConversionError(f"{directory} is not a sharded checkpoint (no {LAYOUT_NAME})")
        with open(layout_path, encoding="utf-8") as f:
            layout = json.load(f)
        if layout.get("format") != LAYOUT_FORMAT:
            raise ConversionError(f"{layout_path}: format {layout.get('format')!r}, expected {LAYOUT_FORMAT!r}")
        try:
            self.tp, self.pp = int(layout["tp"]), int(layout["pp"])
            self.layer_counts = [int(c) for c in layout["layer_counts"]]
            cfg = ModelConfig.from_hf_config(layout["model_config"], name="layout")
            self.ranges = stage_layer_ranges(cfg.num_layers, self.pp, self.layer_counts)
        except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise ConversionError(f"{layout_path} is not a valid layout: {type(e).__name__}: {e}") from None
        self.metadata = {CONFIG_METADATA_KEY: json.dumps(layout["model_config"])}
        self._files: Dict[Tuple[int, int], SafetensorsFile] = {}
        for stage in range(self.pp):
            for t in range(self.tp):
                path = os.path.join(directory, rank_file(t, stage))
                if not os.path.isfile(path):
                    raise ConversionError(f"{directory}: rank file {rank_file(t, stage)} is missing")
                self._files[(t, stage)] = SafetensorsFile(path)
        self._stage: Dict[str, int] = {}
        self._infos: Dict[str, TensorInfo] = {}
        for stage in range(self.pp):
            self._index_stage(stage)

    def _index_stage(self, stage: int) -> None:
        first = self._files[(0, stage)]
        for t in range(1, self.tp):
            other = self._files[(t, stage)]
            if other.infos() != first.infos():
                raise ConversionError(f"{other.path} holds different tensors or shapes than {first.path}")
        for name, info in first.infos().items():
            try:
                owner = param_stage(name, self.ranges)
                full = _full_shape(name, info.shape, self.tp)
            except ValueError as e:
                raise ConversionError(f"{first.path}: {e}") from None
            if owner != stage or name in self._stage:
                raise ConversionError(f"{first.path}: {name} belongs to pipeline stage {owner}, not {stage} "
                                      f"(layer ranges {self.ranges})")
            self._stage[name] = stage
            self._infos[name] = TensorInfo(info.code, full)

    def infos(self) -> Dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        stage = self._stage[name]
        return merge_shards(name, [self._files[(t, stage)].read(name) for t in range(self.tp)])


def _plans(source: TensorSource, cfg: ModelConfig, dtype: str) -> List[TensorPlan]:
    """Validated identity plans over the checkpoint's parameters, in canonical order."""
    infos = source.infos()
    expected = expected_ms(cfg, is_fused(infos))
    check_names_and_shapes({n: i.shape for n, i in infos.items()}, expected, f"MindSpore checkpoint {source.path}",
                           cfg)
    return [TensorPlan(name, TensorInfo(target_code(infos[name].code, dtype), tuple(shape)), (name,))
            for name, shape in expected.items()]


def _write_full(source: TensorSource, plans: List[TensorPlan], cfg: ModelConfig, output: str, overwrite: bool,
                progress: bool) -> None:
    with atomic_file(output, overwrite) as tmp:
        writer = SafetensorsWriter(tmp, [(p.name, p.info) for p in plans], config_metadata(cfg))
        try:
            consumed = run_plans(plans, source, lambda p, a: writer.write(p.name, a), progress, "merge")
            writer.close()
        finally:
            writer.abort()
        check_all_consumed(consumed, set(source.infos()), "merge")


def _write_layout(source: TensorSource, plans: List[TensorPlan], cfg: ModelConfig, out_dir: str, tp: int,
                  ranges: List[Tuple[int, int]], overwrite: bool, progress: bool) -> None:
    pp = len(ranges)
    entries: Dict[Tuple[int, int], List[Tuple[str, TensorInfo]]] = {(t, s): [] for s in range(pp) for t in range(tp)}
    for plan in plans:
        stage = param_stage(plan.name, ranges)
        local = TensorInfo(plan.info.code, shard_shape(plan.name, plan.info.shape, tp))
        for t in range(tp):
            entries[(t, stage)].append((plan.name, local))
    with atomic_dir(out_dir, overwrite) as tmp:
        writers: Dict[Tuple[int, int], SafetensorsWriter] = {}
        try:
            for (t, s), items in entries.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, rank_file(t, s))), exist_ok=True)
                shard_meta = {"tp": tp, "tp_rank": t, "pp": pp, "pp_stage": s, "layer_range": list(ranges[s])}
                meta = dict(config_metadata(cfg), telechat2_shard=json.dumps(shard_meta))
                writers[(t, s)] = SafetensorsWriter(os.path.join(tmp, rank_file(t, s)), items, meta)

            def sink(plan: TensorPlan, array: np.ndarray) -> None:
                stage = param_stage(plan.name, ranges)
                for t in range(tp):
                    writers[(t, stage)].write(plan.name, shard_tensor(plan.name, array, tp, t))

            consumed = run_plans(plans, source, sink, progress, f"reshard tp{tp} pp{pp}")
            for writer in writers.values():
                writer.close()
        finally:
            for writer in writers.values():
                writer.abort()
        check_all_consumed(consumed, set(source.infos()), "reshard")
        layout = {
            "format": LAYOUT_FORMAT,
            "tp": tp,
            "pp": pp,
            "layer_counts": [end - first for first, end in ranges],
            "layer_ranges": [list(r) for r in ranges],
            "layer_numbering": "global",
            "rank_order": "rank = pp_stage * tp + tp_rank",
            "fused_qkv": is_fused(p.name for p in plans),
            "files": {str(s * tp + t): rank_file(t, s) for s in range(pp) for t in range(tp)},
            "model_config": cfg.to_hf_config(),
        }
        with open(os.path.join(tmp, LAYOUT_NAME), "w", encoding="utf-8") as f:
            json.dump(layout, f, indent=2)
            f.write("\n")


def reshard(src: str, output: str, tp: int = 1, pp: int = 1, layer_counts: Optional[Sequence[int]] = None,
            config: Union[None, str, ModelConfig] = None, dtype: str = "keep", overwrite: bool = False,
            progress: bool = True) -> str:
    """Write `src` (a full .safetensors/.ckpt checkpoint or a layout directory) as a (tp, pp) layout
    directory, or as one full `.safetensors` file when `output` ends in .safetensors (needs tp = pp = 1)."""
    to_file = output.endswith(".safetensors")
    if to_file and (tp, pp) != (1, 1):
        raise ConversionError(f"output {output} is a single file, which holds the full checkpoint (tp=1, pp=1); "
                              f"got tp={tp}, pp={pp}: give a directory instead")
    check_output_path(output, overwrite, is_dir=not to_file)
    source = open_ms_checkpoint(src)
    cfg = resolve_config(source, config)
    check_tp(cfg, tp)
    ranges = stage_layer_ranges(cfg.num_layers, pp, layer_counts)
    plans = _plans(source, cfg, dtype)
    if to_file:
        _write_full(source, plans, cfg, output, overwrite, progress)
    else:
        _write_layout(source, plans, cfg, output, tp, ranges, overwrite, progress)
    return output


def merge(src_dir: str, output: str, overwrite: bool = False, progress: bool = True) -> str:
    """A layout directory back to one full `.safetensors` checkpoint."""
    if not output.endswith(".safetensors"):
        raise ConversionError(f"merge output {output} must end in .safetensors")
    return reshard(src_dir, output, 1, 1, overwrite=overwrite, progress=progress)
