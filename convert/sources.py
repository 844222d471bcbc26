"""Read-only tensor sources: a HF model directory, a MindSpore checkpoint file, a sharded layout.

Every source exposes `infos()` ({name: TensorInfo}, from headers only) and `read(name)` (one tensor as a
numpy array in its storage dtype, BF16 as uint16 bits), so the converters hold one tensor at a time.
- HF directory: `model.safetensors.index.json` + shards, a single `model.safetensors`, or legacy
  `pytorch_model*.bin` (+ `pytorch_model.bin.index.json`) loaded with `torch.load(weights_only=True,
  mmap=True)`; torch is imported only for .bin files. `config.json` gives the ModelConfig.
- MindSpore `.safetensors`: streamed like the HF shards. The model config, when this package wrote the
  file, is in the safetensors metadata under `telechat2_config` (the HF config.json dict as JSON).
- MindSpore `.ckpt`: `mindspore.load_checkpoint` has no streaming API, so the whole checkpoint is loaded
  into memory (documented limitation; use safetensors for large models).
- A sharded directory (`layout.json`, telechat2_ms/formats/layout.py): `ShardedSource` merges the tp slices
  of one parameter on read.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from telechat2_ms.formats.dtypes import STORAGE, check_code
from convert.errors import ConversionError
from telechat2_ms.formats.layout import LAYOUT_NAME, SHARD_FILE, open_rank_file, read_layout
from telechat2_ms.formats.safetensors_io import SafetensorsFile, TensorInfo
from telechat2_ms.parallel.plan import full_shape, merge_shards, param_stage, stage_layer_ranges
from telechat2_ms.checkpoint import CONFIG_METADATA_KEY
from telechat2_ms.config import ARCH_FIELDS, ConfigError, ModelConfig, get_config



class TensorSource:
    """Base: a mapping of tensor names to on-demand reads."""

    path: str = ""
    metadata: Dict[str, str] = {}

    def infos(self) -> Dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    """Tensors spread over one or more .safetensors files (header-validated at open)."""

    def __init__(self, path: str, files: List[str], weight_map: Optional[Dict[str, str]] = None):
        self.path = path
        self._where: Dict[str, SafetensorsFile] = {}
        opened = {f: SafetensorsFile(f) for f in files}
        for f in files:
            for name in opened[f].names():
                if name in self._where:
                    raise ConversionError(f"{path}: tensor {name} is stored twice ({self._where[name].path}, {f})")
                self._where[name] = opened[f]
        if weight_map is not None:
            for name, fname in weight_map.items():
                where = self._where.get(name)
                if where is None or os.path.basename(where.path) != fname:
                    raise ConversionError(f"{path}: the index puts {name} in {fname}, but that shard does not "
                                          f"hold it")
        self.metadata = dict(opened[files[0]].metadata) if len(files) == 1 else {}

    def infos(self) -> Dict[str, TensorInfo]:
        return {name: f.info(name) for name, f in self._where.items()}

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)


_TORCH_CODES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


class TorchBinSource(TensorSource):
    """Legacy `pytorch_model*.bin` state dicts; one file is mapped at a time (mmap, weights_only)."""

    def __init__(self, path: str, files: List[str]):
        self.path = path
        self._file_of: Dict[str, str] = {}
        self._infos: Dict[str, TensorInfo] = {}
        self._current: Optional[str] = None
        self._state: Dict[str, object] = {}
        for f in files:
            for name, tensor in self._load(f).items():
                if name in self._file_of:
                    raise ConversionError(f"{path}: tensor {name} is stored twice ({self._file_of[name]}, {f})")
                code = check_code(_TORCH_CODES.get(str(tensor.dtype), str(tensor.dtype)), f"tensor {name} in {f}")
                self._file_of[name] = f
                self._infos[name] = TensorInfo(code, tuple(tensor.shape))

    def _load(self, f: str) -> Dict[str, object]:
        if self._current != f:
            try:
                import torch
            except ImportError:
                raise ConversionError(f"{f}: reading pytorch_model*.bin needs torch (pip install torch); "
                                      f"safetensors checkpoints do not") from None
            self._state = {}
            with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's concern
                warnings.simplefilter("ignore")
                try:
                    try:
                        self._state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                    except RuntimeError as e:
                        if "mmap" not in str(e):
                            raise
                        # an old non-zip .bin cannot be mapped: load it whole
                        self._state = torch.load(f, map_location="cpu", weights_only=True)
                except Exception as e:  # truncated zip, a raw pickle, code in the pickle, ...
                    first = str(e).strip().split(". ")[0].splitlines()[0] if str(e).strip() else ""
                    raise ConversionError(f"cannot load {f} as a PyTorch weights file ({type(e).__name__}: "
                                          f"{first}); only torch.save state dicts of tensors are read (no "
                                          "pickled code)") from None
            if not isinstance(self._state, dict):
                raise ConversionError(f"{f} holds a {type(self._state).__name__}, not a state dict of tensors")
            self._current = f
        return self._state

    def infos(self) -> Dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        import torch

        tensor = self._load(self._file_of[name])[name].contiguous()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16).copy()
        return tensor.numpy().copy()


_MS_CODES = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16"}


class MindSporeCkptSource(TensorSource):
    """A MindSpore `.ckpt` (loaded whole with mindspore.load_checkpoint; no streaming API exists)."""

    def __init__(self, path: str):
        import mindspore as ms

        self.path = path
        try:
            self._params = ms.load_checkpoint(path)
        except Exception as e:
            raise ConversionError(f"cannot load MindSpore checkpoint {path}: {e}") from None
        self._infos = {name: TensorInfo(check_code(_MS_CODES.get(str(p.dtype), str(p.dtype)), f"tensor {name}"),
                                        tuple(p.shape)) for name, p in self._params.items()}

    def infos(self) -> Dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, name: str) -> np.ndarray:
        return self._params[name].asnumpy().view(STORAGE[self._infos[name].code]).copy()


def _listed(directory: str, suffix: str, prefix: str) -> List[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.startswith(prefix) and f.endswith(suffix))


def _from_index(directory: str, index_name: str) -> tuple:
    path = os.path.join(directory, index_name)
    try:
        with open(path, encoding="utf-8") as fh:
            index = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{directory}/{index_name} has no weight_map")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ConversionError(f"{directory}: {index_name} names shard(s) that are not there: {', '.join(missing)}")
    return [os.path.join(directory, f) for f in files], weight_map


def open_hf_dir(directory: str) -> "tuple[TensorSource, ModelConfig]":
    """The weights and ModelConfig of a HF TeleChat2 directory."""
    if not os.path.isdir(directory):
        raise ConversionError(f"HF checkpoint directory {directory} does not exist")
    cfg = ModelConfig.from_hf_config(directory, name=os.path.basename(os.path.normpath(directory)))
    if os.path.isfile(os.path.join(directory, "model.safetensors.index.json")):
        files, weight_map = _from_index(directory, "model.safetensors.index.json")
        return SafetensorsSource(directory, files, weight_map), cfg
    single = _listed(directory, ".safetensors", "model")
    if single:
        return SafetensorsSource(directory, single), cfg
    if os.path.isfile(os.path.join(directory, "pytorch_model.bin.index.json")):
        files, _ = _from_index(directory, "pytorch_model.bin.index.json")
        return TorchBinSource(directory, files), cfg
    bins = _listed(directory, ".bin", "pytorch_model")
    if bins:
        return TorchBinSource(directory, bins), cfg
    raise ConversionError(f"{directory} holds no weights (expected model.safetensors.index.json + shards, "
                          f"model.safetensors, or pytorch_model*.bin)")


def open_ms_checkpoint(path: str, file: str = SHARD_FILE) -> TensorSource:
    """A MindSpore checkpoint: `.safetensors` file, `.ckpt` file, or a sharded directory with layout.json (`file`:
    which per-rank file of it; a training checkpoint's optimizer moments sit beside the weights)."""
    if os.path.isdir(path):
        return ShardedSource(path, file)
    if not os.path.isfile(path):
        raise ConversionError(f"MindSpore checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        return SafetensorsSource(path, [path])
    if path.endswith(".ckpt"):
        return MindSporeCkptSource(path)
    raise ConversionError(f"{path}: a MindSpore checkpoint must end in .safetensors or .ckpt")


def config_metadata(cfg: ModelConfig) -> Dict[str, str]:
    return {CONFIG_METADATA_KEY: json.dumps(cfg.to_hf_config(), sort_keys=True)}


def load_config_arg(value: Union[None, str, ModelConfig]) -> Optional[ModelConfig]:
    """A ModelConfig from a ModelConfig, a registry size name, or a config.json path (or its directory)."""
    if value is None or isinstance(value, ModelConfig):
        return value
    if os.path.exists(value):
        return ModelConfig.from_hf_config(value)
    try:
        return get_config(value)
    except ConfigError as e:
        raise ConfigError(f"--config {value!r} is neither a config.json path nor a size name: {e}") from None


def resolve_config(source: TensorSource, given: Union[None, str, ModelConfig]) -> ModelConfig:
    """The config stored with a checkpoint and/or the one given; refuse if they disagree or both lack."""
    stored = None
    if CONFIG_METADATA_KEY in source.metadata:
        stored = ModelConfig.from_hf_config(json.loads(source.metadata[CONFIG_METADATA_KEY]), name="checkpoint")
    given_cfg = load_config_arg(given)
    if stored is None and given_cfg is None:
        raise ConversionError(f"{source.path} carries no model config; pass --config (a size name such as "
                              f"telechat2_7b, or a config.json)")
    if stored is not None and given_cfg is not None:
        diff = [f"{k}: checkpoint {getattr(stored, k)} vs given {getattr(given_cfg, k)}" for k in ARCH_FIELDS
                if getattr(stored, k) != getattr(given_cfg, k)]
        if diff:
            raise ConversionError(f"the given config does not match the one stored in {source.path}: "
                                  f"{'; '.join(diff)}")
    return given_cfg or stored


class ShardedSource(TensorSource):
    """A layout directory read as a full checkpoint: `read(name)` merges the tp slices of one parameter (of the
    per-rank `file`s: the weights, or a training checkpoint's moments stored under the same names)."""

    def __init__(self, directory: str, file: str = SHARD_FILE):
        self.path = directory
        layout = read_layout(directory)
        layout_path = os.path.join(directory, LAYOUT_NAME)
        self.tp, self.pp, self.layer_counts = layout["tp"], layout["pp"], layout["layer_counts"]
        try:
            cfg = ModelConfig.from_hf_config(layout["model_config"], name="layout")
            self.ranges = stage_layer_ranges(cfg.num_layers, self.pp, self.layer_counts)
            self.kv_heads = cfg.num_kv_heads
        except (KeyError, TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise ConversionError(f"{layout_path} is not a valid layout: {type(e).__name__}: {e}") from None
        self.metadata = {CONFIG_METADATA_KEY: json.dumps(layout["model_config"])}
        layout["layer_ranges"] = [list(r) for r in self.ranges]
        self._files: Dict[Tuple[int, int], SafetensorsFile] = {
            (t, stage): open_rank_file(directory, layout, t, stage, file) for stage in range(self.pp)
            for t in range(self.tp)}
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
                full = full_shape(name, info.shape, self.tp, self.kv_heads)
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
        return merge_shards(name, [self._files[(t, stage)].read(name) for t in range(self.tp)], self.kv_heads)
