"""HF TeleChat2 directory -> MindSpore checkpoint with MindFormers parameter names.

    hf_to_ms("TeleChat2-7B/", "telechat2_7b.safetensors", dtype="bf16", fused_qkv=False)

Everything is checked before the output is opened: config.json is read into a ModelConfig, every HF name
must match the key map (unknown names, missing names and shapes that the config does not imply are
refused with a message naming them). Output:
- `.safetensors` (default): streamed; the header is written first (all shapes are known from the plan),
  then one tensor at a time. The model config is stored in the file metadata (`telechat2_config`), so
  ms2hf and reshard need no --config. MindSpore reads it with
  `mindspore.load_checkpoint(path, format="safetensors")`.
- `.ckpt`: `mindspore.save_checkpoint` needs all tensors at once, so this path holds the whole converted
  checkpoint in memory (fine for small models; use safetensors for 7B and up).
The file appears atomically (temp file beside it + os.replace).
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Sequence

import numpy as np

from telechat2_ms.formats.atomic import atomic_file, check_output_path
from telechat2_ms.formats.dtypes import cast, target_code
from convert.errors import ConversionError
from convert.keymap import (GMM_METADATA, Fusion, check_names_and_shapes, expected_hf, expected_ms, fusion_of,
                            hf_to_ms_name, is_gmm_weight)
from telechat2_ms.formats.safetensors_io import SafetensorsWriter, TensorInfo
from convert.sources import TensorSource, config_metadata, open_hf_dir
from convert.stream import TensorPlan, check_all_consumed, run_plans
from telechat2_ms.config import ModelConfig


def _fused(fusion: Fusion, cfg: ModelConfig, arrays: Sequence[np.ndarray]) -> np.ndarray:
    return fusion.fuse(cfg, *arrays)


def stack_experts(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """E experts' HF tensors, in expert order -> the stacked MindSpore tensor [E, ...]."""
    return np.stack(arrays)


def stack_experts_gmm(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """E experts' HF weights [out, in] -> MindFormers' grouped-matmul layout [E, in, out] (its convert_gmm)."""
    return np.ascontiguousarray(np.stack(arrays).transpose(0, 2, 1))


def plan_hf_to_ms(source: TensorSource, cfg: ModelConfig, dtype: str = "keep",
                  fused_qkv: bool = False, gmm: bool = False) -> List[TensorPlan]:
    """Validate the HF tensors against `cfg` and list the MindSpore tensors to produce, in canonical order."""
    infos = source.infos()
    to_ms: Dict[str, Dict[Optional[int], str]] = {}  # MindSpore name -> {expert index or None: HF name}
    unknown = []
    for name in infos:
        match = hf_to_ms_name(name, cfg)
        if match is None:
            unknown.append(name)
        elif match.name is not None:  # None: a deliberate drop (rotary buffers)
            to_ms.setdefault(match.name, {})[match.expert] = name
    found = {name: infos[name].shape for parts in to_ms.values() for name in parts.values()}
    check_names_and_shapes(found, expected_hf(cfg), f"HF checkpoint {source.path}", cfg, unknown)
    plans = []
    for ms_name, shape in expected_ms(cfg, fused_qkv, gmm).items():
        fused = fusion_of(ms_name)
        parts = to_ms.get(ms_name, {})
        if None not in parts and fused is None:  # one expert's tensor each: stacked in expert order
            sources = tuple(parts[e] for e in range(cfg.num_experts))
            build = stack_experts_gmm if gmm and is_gmm_weight(ms_name) else stack_experts
        elif fused is None:
            sources, build = (parts[None],), None
        else:
            fusion, layer = fused
            sources = tuple(to_ms[part.format(layer=layer)][None] for part in fusion.parts)
            build = functools.partial(_fused, fusion, cfg)
        codes = sorted({target_code(infos[s].code, dtype) for s in sources})
        if len(codes) > 1:
            raise ConversionError(f"cannot fuse {', '.join(sources)} stored in different dtypes {codes} with "
                                  f"dtype=keep; choose bf16, fp16 or fp32")
        info = TensorInfo(codes[0], tuple(shape))
        plans.append(TensorPlan(ms_name, info, sources, build) if build else TensorPlan(ms_name, info, sources))
    return plans


class ConvertedSource(TensorSource):
    """An HF directory seen as the MindSpore checkpoint hf2ms would write from it (names, stacked experts), each
    tensor built when it is read: lets reshard go from HF weights to a layout in one command."""

    def __init__(self, hf_dir: str):
        self.hf, self.config = open_hf_dir(hf_dir)
        self.path = hf_dir
        self.metadata = config_metadata(self.config)
        self.plans = {p.name: p for p in plan_hf_to_ms(self.hf, self.config)}

    def infos(self) -> Dict[str, TensorInfo]:
        return {name: plan.info for name, plan in self.plans.items()}

    def read(self, name: str) -> np.ndarray:
        plan = self.plans[name]
        hf_infos = self.hf.infos()
        return plan.build([cast(self.hf.read(s), hf_infos[s].code, plan.info.code) for s in plan.sources])


def _output_format(output: str) -> str:
    for ext in ("safetensors", "ckpt"):
        if output.endswith("." + ext):
            return ext
    raise ConversionError(f"output {output} must end in .safetensors or .ckpt")


def hf_to_ms(hf_dir: str, output: str, dtype: str = "keep", fused_qkv: bool = False, overwrite: bool = False,
             progress: bool = True, gmm: bool = False) -> str:
    """Convert; returns `output`. See the module docstring for the formats and the checks. `gmm`: the stacked
    expert weights in MindFormers' grouped-matmul layout [E, in, out] (marked in the file's metadata)."""
    fmt = _output_format(output)
    if gmm and fmt != "safetensors":
        raise ConversionError(f"output {output}: --gmm writes .safetensors (its metadata marks the layout)")
    check_output_path(output, overwrite, is_dir=False)
    source, cfg = open_hf_dir(hf_dir)
    plans = plan_hf_to_ms(source, cfg, dtype, fused_qkv, gmm)
    expected_sources = {s for p in plans for s in p.sources}
    if fmt == "safetensors":
        with atomic_file(output, overwrite) as tmp:
            metadata = dict(config_metadata(cfg), **(dict([GMM_METADATA]) if gmm else {}))
            writer = SafetensorsWriter(tmp, [(p.name, p.info) for p in plans], metadata)
            try:
                consumed = run_plans(plans, source, lambda p, a: writer.write(p.name, a), progress, "hf2ms")
                writer.close()
            finally:
                writer.abort()
            check_all_consumed(consumed, expected_sources, "hf2ms")
    else:
        with atomic_file(output, overwrite, suffix=".ckpt") as tmp:
            consumed = _save_ckpt(plans, source, tmp, progress)
            check_all_consumed(consumed, expected_sources, "hf2ms")
    return output


def _save_ckpt(plans: List[TensorPlan], source: TensorSource, path: str, progress: bool):
    """MindSpore .ckpt via mindspore.save_checkpoint (holds every converted tensor in memory)."""
    import mindspore as ms
    from mindspore.common import np_dtype

    params = []

    def keep(plan: TensorPlan, array: np.ndarray) -> None:
        data = array.view(np_dtype.bfloat16) if plan.info.code == "BF16" else array
        params.append({"name": plan.name, "data": ms.Tensor(np.array(data, copy=True))})

    consumed = run_plans(plans, source, keep, progress, "hf2ms")
    ms.save_checkpoint(params, path)
    return consumed
