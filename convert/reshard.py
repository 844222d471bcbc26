"""Split a full MindSpore checkpoint into per-rank files for a (tp, pp) layout, merge it back, or go from
one layout to another directly, tensor by tensor and bit-exact.

    reshard("telechat2_7b.safetensors", "out/tp2_pp2", tp=2, pp=2)          # split
    reshard("out/tp2_pp2", "out/tp4_pp1", tp=4, pp=1)                       # layout -> layout
    reshard("out/tp4_pp1", "merged.safetensors")                            # merge (tp = pp = 1)

The split rules are telechat2_ms.parallel.plan's (one table shared with the parallel layers); the layout
directory format is the library's (telechat2_ms/formats/layout.py): layout.json plus tp{t}_pp{p}/model.safetensors,
parameter names with their global layer index on every stage, rank = p * tp + t, each rank file carrying
the model config and its own (tp, tp_rank, pp, pp_stage) in its safetensors metadata.

Going between layouts reads one parameter at a time (merged from the source slices in memory), slices it
for every target rank and writes the slices straight into the target files: the full checkpoint is never
written. All checks (config, names, shapes, divisibility, stage counts, output path) run before writing;
the output directory appears atomically.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from convert.errors import ConversionError
from convert.keymap import GMM_METADATA, check_names_and_shapes, expected_ms, is_fused
from convert.sources import ShardedSource, TensorSource, config_metadata, open_ms_checkpoint, resolve_config
from convert.stream import TensorPlan, check_all_consumed, run_plans
from telechat2_ms.config import ModelConfig
from telechat2_ms.formats.atomic import atomic_dir, atomic_file, check_output_path
from telechat2_ms.formats.dtypes import target_code
from telechat2_ms.formats.layout import SHARD_FILE, layout_dict, rank_file, shard_metadata, write_layout
from telechat2_ms.formats.safetensors_io import SafetensorsWriter, TensorInfo
from telechat2_ms.parallel.plan import check_tp, param_stage, shard_shape, shard_tensor, stage_layer_ranges

__all__ = ["ShardedSource", "merge", "reshard"]

def _plans(source: TensorSource, cfg: ModelConfig, dtype: str) -> List[TensorPlan]:
    """Validated identity plans over the checkpoint's parameters, in canonical order."""
    infos = source.infos()
    if source.metadata.get(GMM_METADATA[0]) == GMM_METADATA[1]:
        raise ConversionError(f"{source.path} holds MindFormers' grouped-matmul expert layout ([E, in, out]); "
                              f"reshard reads [E, out, in]: convert it with ms2hf and hf2ms without --gmm first")
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
        local = TensorInfo(plan.info.code, shard_shape(plan.name, plan.info.shape, tp, cfg.num_kv_heads))
        for t in range(tp):
            entries[(t, stage)].append((plan.name, local))
    with atomic_dir(out_dir, overwrite) as tmp:
        writers: Dict[Tuple[int, int], SafetensorsWriter] = {}
        try:
            for (t, s), items in entries.items():
                os.makedirs(os.path.dirname(os.path.join(tmp, rank_file(t, s))), exist_ok=True)
                meta = dict(config_metadata(cfg), **shard_metadata(tp, t, pp, s, ranges[s]))
                writers[(t, s)] = SafetensorsWriter(os.path.join(tmp, rank_file(t, s)), items, meta)

            def sink(plan: TensorPlan, array: np.ndarray) -> None:
                stage = param_stage(plan.name, ranges)
                for t in range(tp):
                    writers[(t, stage)].write(plan.name, shard_tensor(plan.name, array, tp, t, cfg.num_kv_heads))

            consumed = run_plans(plans, source, sink, progress, f"reshard tp{tp} pp{pp}")
            for writer in writers.values():
                writer.close()
        finally:
            for writer in writers.values():
                writer.abort()
        check_all_consumed(consumed, set(source.infos()), "reshard")
        write_layout(tmp, layout_dict(tp, ranges, cfg.to_hf_config(), is_fused(p.name for p in plans)))


def reshard(src: str, output: str, tp: int = 1, pp: int = 1, layer_counts: Optional[Sequence[int]] = None,
            config: Union[None, str, ModelConfig] = None, dtype: str = "keep", overwrite: bool = False,
            progress: bool = True, file: str = SHARD_FILE) -> str:
    """Write `src` (a full .safetensors/.ckpt checkpoint, a layout directory, or an HF directory) as a (tp, pp) layout
    directory, or as one full `.safetensors` file when `output` ends in .safetensors (needs tp = pp = 1).
    `file`: which per-rank file of a layout directory to read (a training checkpoint's `exp_avg.safetensors` or
    `exp_avg_sq.safetensors`: AdamW's moments, under the parameters' names)."""
    to_file = output.endswith(".safetensors")
    if to_file and (tp, pp) != (1, 1):
        raise ConversionError(f"output {output} is a single file, which holds the full checkpoint (tp=1, pp=1); "
                              f"got tp={tp}, pp={pp}: give a directory instead")
    check_output_path(output, overwrite, is_dir=not to_file)
    source = _open_source(src, file)
    cfg = resolve_config(source, config)
    check_tp(cfg, tp)
    ranges = stage_layer_ranges(cfg.num_layers, pp, layer_counts)
    plans = _plans(source, cfg, dtype)
    if to_file:
        _write_full(source, plans, cfg, output, overwrite, progress)
    else:
        _write_layout(source, plans, cfg, output, tp, ranges, overwrite, progress)
    return output


def _open_source(src: str, file: str) -> TensorSource:
    """A MindSpore checkpoint or layout, or an HF directory (config.json beside HF weights, no layout.json),
    converted tensor by tensor as hf2ms would."""
    from telechat2_ms.formats.layout import is_layout_dir

    if os.path.isdir(src) and not is_layout_dir(src) and os.path.isfile(os.path.join(src, "config.json")):
        from convert.hf_to_ms import ConvertedSource

        return ConvertedSource(src)
    return open_ms_checkpoint(src, file)


def merge(src_dir: str, output: str, overwrite: bool = False, progress: bool = True, file: str = SHARD_FILE) -> str:
    """A layout directory back to one full `.safetensors` checkpoint (`file`: see reshard)."""
    if not output.endswith(".safetensors"):
        raise ConversionError(f"merge output {output} must end in .safetensors")
    return reshard(src_dir, output, 1, 1, overwrite=overwrite, progress=progress, file=file)
