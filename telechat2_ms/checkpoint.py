"""Model checkpoints on the MindSpore side: what a `load_checkpoint` path is, streamed reading of weights
(whole tensors or one rank's slices), strict loading, and atomic saving (MindFormers parameter names).

    ref = resolve_checkpoint(path)        # CheckpointRef: kind, weights file / layout dir, config, tokenizer dir
    weights = open_weights(ref)           # name -> full tensor or one tp rank's slice, read on demand
    load_weights(model, weights)          # strict: names and shapes checked before anything is written
    save_model(model, "out/final", config=cfg, settings=run_settings)

What a path can be (`resolve_checkpoint`):
- a file: `.safetensors` (written by `mindspore.save_checkpoint`, by training, or by `convert/` hf2ms, which
  stores the config in the safetensors metadata under `telechat2_config`) or a MindSpore `.ckpt`;
- a directory holding `model.safetensors` (or `model.ckpt`, or one such file), optionally with `config.json`
  (`ModelConfig.to_hf_config`), `run_settings.yaml` and `tokenizer.model`;
- a training output directory (holding `checkpoints/step_*`): its newest finished checkpoint;
- a per-rank layout directory (`layout.json`, formats/layout.py): read under msrun, each rank its own file.

Reading streams: a `.safetensors` file is read tensor by tensor, and for a tensor-parallel rank only the
rows of its slice (formats/safetensors_io.py), so resident memory is one tensor (or one slice) at a time.
A `.ckpt` has no streaming API and is read whole. Loading is strict: a missing parameter, an unknown key or
another shape is refused with a `CheckpointError` listing every offending name (the TeleChat2 HF code
silently keeps a random lm_head when it is missing, spec 1.5 / 10.17; this port does not). Tensors are
cast to float32 (the parameters' dtype): a bf16 or fp16 checkpoint loads exactly.

Files are written atomically (formats/atomic.py), so a crash during a save leaves the old file or the new
one, never a partial file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from telechat2_ms.config import ConfigError, ModelConfig
from telechat2_ms.formats.atomic import atomic_file, write_text_atomic
from telechat2_ms.formats.dtypes import cast
from telechat2_ms.formats.errors import CheckpointError
from telechat2_ms.formats.json_file import read_json_object
from telechat2_ms.formats.layout import SHARD_FILE, is_layout_dir, layout_ranges, open_rank_file, read_layout
from telechat2_ms.formats.safetensors_io import SafetensorsFile, write_arrays
from telechat2_ms.parallel import plan

MODEL_FILE = "model.safetensors"
MODEL_FILE_CKPT = "model.ckpt"
CONFIG_FILE = "config.json"
SETTINGS_FILE = "run_settings.yaml"
CONFIG_METADATA_KEY = "telechat2_config"  # safetensors metadata: the HF config.json dict as JSON
CHECKPOINT_DIR = "checkpoints"  # training output: <output_dir>/checkpoints/step_XXXXXXXX/
STATE_FILE = "trainer_state.json"  # a training checkpoint is finished once this file is in it
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_MAX_LISTED = 20  # names listed per category in an error message

__all__ = ["CheckpointError", "CheckpointRef", "resolve_checkpoint", "open_weights", "load_weights",
           "load_checkpoint_into", "save_model", "save_tensors"]


# ---- training output directories --------------------------------------------------------------------
def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINT_DIR)


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """Finished checkpoints under `root`, oldest first, as (step, path)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str) -> Optional[str]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a checkpoint directory `.../step_00000040`, None for other paths."""
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


# ---- what a path is ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    """A resolved `load_checkpoint`. kind: none | file | dir | layout; `weights` is the parameter file (or the
    layout directory); `config` the architecture stored with it (None: use the registry); `tokenizer_dir`
    where a tokenizer.model may sit; `layout` the layout.json of a layout directory."""

    kind: str
    path: str = ""
    weights: str = ""
    config: Optional[ModelConfig] = None
    tokenizer_dir: str = ""
    layout: Dict[str, Any] = field(default_factory=dict)
    missing: str = ""  # why the weights file could not be found (a directory holding only config.json)


def fingerprint(ref: CheckpointRef, seed: int) -> Dict[str, Any]:
    """What identifies the weights a run loads, for records that must not be reused with other weights
    (eval results): the resolved path and every weights file's size and modification time (reading
    hundreds of GB to hash them is not an option), or the random-init seed."""
    if ref.kind == "none":
        return {"kind": "none", "seed": seed}
    root = os.path.realpath(ref.weights or ref.path)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else [""]
    files = []
    for name in names:
        path = os.path.join(root, name) if name else root
        if os.path.isfile(path):
            stat = os.stat(path)
            files.append([name, stat.st_size, stat.st_mtime_ns])
    return {"kind": ref.kind, "path": root, "files": files}


def resolve_checkpoint_file(path: str) -> str:
    """The parameter file of `path`: the file itself, or `model.safetensors` / `model.ckpt` in a directory
    (or the directory's only *.safetensors / *.ckpt file)."""
    if not path:
        raise CheckpointError("no checkpoint path given")
    if os.path.isfile(path):
        if not path.endswith((".safetensors", ".ckpt")):
            raise CheckpointError(f"{path}: a checkpoint file must end in .safetensors or .ckpt")
        return path
    if os.path.isdir(path):
        for name in (MODEL_FILE, MODEL_FILE_CKPT):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        found = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".ckpt")))
        if len(found) == 1:
            return os.path.join(path, found[0])
        detail = f"several candidates {found}" if found else "no .safetensors or .ckpt file"
        raise CheckpointError(f"checkpoint directory {path} has no {MODEL_FILE} and {detail}")
    raise CheckpointError(f"checkpoint not found: {path}")


def resolve_checkpoint(path: str) -> CheckpointRef:
    """The one interpretation of a `load_checkpoint` string (module docstring); reads headers only."""
    if not path:
        return CheckpointRef("none")
    if not os.path.exists(path):
        raise ConfigError(f"load_checkpoint {path!r} does not exist")
    if os.path.isdir(checkpoint_root(path)) and not is_layout_dir(path):
        latest = latest_checkpoint(checkpoint_root(path))
        if latest is None:
            raise ConfigError(f"{path} holds no finished checkpoint under {CHECKPOINT_DIR}/")
        return resolve_checkpoint(latest)
    if is_layout_dir(path):
        layout = read_layout(path)
        if layout.get("fused_qkv"):
            raise ConfigError(f"{path} holds the fused inference layout (w_qkv / w_gate_hidden); reshard an "
                              "unfused checkpoint for the parallel model")
        cfg = _config_from_dict(layout["model_config"], os.path.basename(os.path.abspath(path)),
                                os.path.join(path, "layout.json"))
        return CheckpointRef("layout", path, path, cfg, path, layout)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE)):
        try:  # the config decides even before the weights are looked for (build.plan_run checks both)
            file = resolve_checkpoint_file(path)
        except CheckpointError as err:
            return CheckpointRef("dir", path, "", stored_config(os.path.join(path, MODEL_FILE)), folder,
                                 missing=str(err))
    else:
        file = resolve_checkpoint_file(path)
    return CheckpointRef("dir" if os.path.isdir(path) else "file", path, file, stored_config(file), folder)


def _config_from_dict(hf: Dict[str, Any], name: str, where: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf_config(hf, name=str(hf.get("telechat2_ms_name", name)))
    except (ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def stored_config(file: str) -> Optional[ModelConfig]:
    """The ModelConfig stored with a checkpoint file: config.json beside it, else the `telechat2_config`
    safetensors metadata; None if it carries none."""
    if file.endswith(".safetensors") and os.path.isfile(file):
        _refuse_gmm(file, SafetensorsFile(file).metadata)
    config_path = os.path.join(os.path.dirname(os.path.abspath(file)), CONFIG_FILE)
    if os.path.isfile(config_path):
        hf = read_json_object(config_path, CheckpointError)
        return _config_from_dict(hf, os.path.basename(os.path.dirname(os.path.abspath(config_path))), config_path)
    if file.endswith(".safetensors"):
        metadata = SafetensorsFile(file).metadata
        if CONFIG_METADATA_KEY in metadata:
            try:
                hf = json.loads(metadata[CONFIG_METADATA_KEY])
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{file}: bad {CONFIG_METADATA_KEY} metadata: {err}") from None
            return _config_from_dict(hf, "checkpoint", file)
    return None


def load_model_config(path: str) -> Optional[ModelConfig]:
    """The ModelConfig stored with a checkpoint file or directory, or None."""
    return resolve_checkpoint(path).config


# ---- weights, read on demand --------------------------------------------------------------------------
class Weights(Mapping):
    """name -> float32 full tensor, read on demand; `shard(name, tp, tp_rank)` gives one tensor-parallel
    rank's slice (parallel/plan.py rules) without reading more than needed where the format allows."""

    path = ""

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        raise NotImplementedError

    def full(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def shard(self, name: str, tp: int, tp_rank: int, kv_heads: int = 0) -> np.ndarray:
        """This tp rank's slice (`kv_heads`: the model's kv head count, for kv copies when it is below tp)."""
        return plan.shard_tensor(name, self.full(name), tp, tp_rank, kv_heads)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.full(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes())

    def __len__(self) -> int:
        return len(self.shapes())


class ArrayWeights(Weights):
    """Weights held in memory (numpy arrays or MindSpore tensors)."""

    def __init__(self, arrays: Mapping[str, Any], path: str = "memory"):
        self.arrays, self.path = arrays, path

    def shapes(self):
        return {name: tuple(a.shape) for name, a in self.arrays.items()}

    def full(self, name):
        value = self.arrays[name]
        value = value.asnumpy() if hasattr(value, "asnumpy") else value
        return np.array(value, dtype=np.float32)  # a copy: a loaded parameter shares the array it is given


def _refuse_gmm(path: str, metadata) -> None:
    if metadata.get("expert_layout") == "gmm":  # convert/keymap.GMM_METADATA
        raise CheckpointError(f"{path} holds MindFormers' grouped-matmul expert layout ([E, in, out]); the model reads "
                              f"[E, out, in]: convert it with `python -m convert ms2hf` and `hf2ms` without --gmm")


class SafetensorsWeights(Weights):
    """One .safetensors file, streamed (F32 / F16 / BF16)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.file = SafetensorsFile(path)
        except CheckpointError as err:
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
        _refuse_gmm(path, self.file.metadata)
        self.infos = self.file.infos()

    def shapes(self):
        return {name: info.shape for name, info in self.infos.items()}

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return cast(self.file.read(name, (start, stop)), self.infos[name].code, "F32")

    def full(self, name):
        return cast(self.file.read(name), self.infos[name].code, "F32")

    def shard(self, name, tp, tp_rank, kv_heads=0):
        rule = plan.split_rule(name)
        shape = self.infos[name].shape
        if tp == 1 or rule.replicated or rule.kind in ("cols", "experts"):
            return super().shard(name, tp, tp_rank)
        plan.shard_shape(name, shape, tp, kv_heads)  # divisibility checks
        copy_rows = plan.kv_copy_rows(name, shape[0], tp, tp_rank, kv_heads)
        if copy_rows is not None:  # the whole kv head this rank's query heads use
            return self._rows(name, *copy_rows)
        sections = plan.fused_sections(name, shape) if rule.kind == "fused_rows" else [shape[0]]
        pieces, offset = [], 0
        for rows in sections:  # this rank's rows of every part: [part/tp, ...] each
            part = rows // tp
            pieces.append(self._rows(name, offset + tp_rank * part, offset + (tp_rank + 1) * part))
            offset += rows
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


class CkptWeights(Weights):
    """A MindSpore .ckpt, read whole on first use (the format has no streaming API)."""

    def __init__(self, path: str):
        self.path = path
        self._params = read_checkpoint(path)

    def shapes(self):
        return {name: tuple(p.shape) for name, p in self._params.items()}

    def full(self, name):
        import mindspore as ms
        from mindspore import ops

        value = self._params[name]
        return (value if value.dtype == ms.float32 else ops.cast(value, ms.float32)).asnumpy()


class PrefixedWeights(Weights):
    """The tensors of `inner` whose names start with `prefix`, under the rest of their names (a one-process
    training checkpoint's optimizer.safetensors holds `exp_avg.<parameter>`: read as the parameter's own name,
    it is sharded by the parameter's rule)."""

    def __init__(self, inner: Weights, prefix: str):
        self.inner, self.prefix, self.path = inner, prefix, f"{inner.path} ({prefix}*)"

    def shapes(self):
        return {n[len(self.prefix):]: s for n, s in self.inner.shapes().items() if n.startswith(self.prefix)}

    def full(self, name):
        return self.inner.full(self.prefix + name)


class LayoutWeights(Weights):
    """A per-rank layout directory: `shard(name, tp, t)` reads the slice stored in rank file tp{t}_pp{stage}
    when the directory has this tp; under another tp (a run resumed or loaded onto a new layout) the tensor is
    merged from the stored slices and cut again (parallel/plan.py). The stage of a tensor is the stored
    layout's, so any pipeline split reads it. `file`: the weights, or another per-rank file of the same names
    (a training checkpoint's optimizer moments)."""

    def __init__(self, ref: CheckpointRef, file: str = SHARD_FILE):
        self.path, self.layout, self.file = ref.path, ref.layout, file
        self.tp, self.ranges = self.layout["tp"], [tuple(r) for r in layout_ranges(self.layout)]
        self.kv_heads = ref.config.num_kv_heads if ref.config is not None else 0
        self._files: Dict[Tuple[int, int], SafetensorsFile] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        for stage in range(len(self.ranges)):
            for name, info in self._file(0, stage).infos().items():
                self._shapes[name] = plan.full_shape(name, info.shape, self.tp, self.kv_heads)

    def _file(self, tp_rank: int, stage: int) -> SafetensorsFile:
        if (tp_rank, stage) not in self._files:
            self._files[(tp_rank, stage)] = open_rank_file(self.path, self.layout, tp_rank, stage, self.file)
        return self._files[(tp_rank, stage)]

    def shapes(self):
        return dict(self._shapes)

    def full(self, name):
        if plan.split_rule(name).split_dim() is None:
            return self.shard(name, self.tp, 0)
        return plan.merge_shards(name, [self.shard(name, self.tp, t) for t in range(self.tp)], self.kv_heads)

    def shard(self, name, tp, tp_rank, kv_heads=0):
        if tp != self.tp:  # another layout: the whole tensor, then this rank's slice of it
            return plan.shard_tensor(name, self.full(name), tp, tp_rank, kv_heads or self.kv_heads)
        file = self._file(tp_rank, plan.param_stage(name, self.ranges))
        info = file.info(name)
        return cast(file.read(name), info.code, "F32")


class RandomWeights(Weights):
    """The seeded random initialisation of one process (layers.ParamInit), replayed tensor by tensor in
    definition order: norms 1, biases 0, every other tensor N(0, std) from one generator. Read in that order
    (parallelize does), each tensor is drawn once; a jump back restarts the generator."""

    def __init__(self, skeleton, seed: int):
        self.path = f"random init (seed {seed})"
        self.seed, self.std = seed, skeleton.config.initializer_range
        self._order = [(name, tuple(p.shape)) for name, p in skeleton.parameters_and_names()]
        self._index = {name: i for i, (name, _) in enumerate(self._order)}
        self._restart()

    def _restart(self):
        self._rng, self._next = np.random.default_rng(self.seed), 0

    @staticmethod
    def _constant(name: str) -> Optional[float]:
        if name.endswith(".bias"):
            return 0.0
        if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
            return 1.0
        return None

    def shapes(self):
        return dict(self._order)

    def full(self, name):
        target = self._index[name]
        if target < self._next:
            self._restart()
        while True:
            current, shape = self._order[self._next]
            self._next += 1
            value = self._constant(current)
            if value is None:
                array = self._rng.standard_normal(shape, dtype=np.float32) * np.float32(self.std)
            elif current == name:
                array = np.full(shape, value, np.float32)
            else:
                continue
            if current == name:
                return array


def open_weights(ref: CheckpointRef) -> Weights:
    """The weights of a resolved checkpoint (a layout directory is read under any layout, or in one process)."""
    if ref.missing:
        raise CheckpointError(ref.missing)
    if ref.kind == "layout":  # another tp or pipeline split than the run's (one process: tp 1): merged and cut again
        return LayoutWeights(ref)
    if ref.weights.endswith(".safetensors"):
        return SafetensorsWeights(ref.weights)
    return CkptWeights(ref.weights)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """All tensors of a checkpoint file or directory, {name: Parameter} (loaded into host memory)."""
    import mindspore as ms

    file = resolve_checkpoint_file(path)
    try:
        return dict(ms.load_checkpoint(file, format="safetensors" if file.endswith(".safetensors") else "ckpt"))
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with long internal messages
        raise CheckpointError(f"cannot read checkpoint {file}: {type(err).__name__}: {err}") from err


def _listed(names: Sequence[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def check_state_matches(model_shapes: Mapping[str, tuple], ckpt_shapes: Mapping[str, tuple], source: str,
                        strict: bool = True) -> None:
    """Raise CheckpointError naming every missing, unknown (strict only) and mis-shaped key."""
    missing = [n for n in model_shapes if n not in ckpt_shapes]
    unknown = [n for n in ckpt_shapes if n not in model_shapes] if strict else []
    bad = [f"{n} (checkpoint {tuple(ckpt_shapes[n])}, model {tuple(model_shapes[n])})"
           for n in model_shapes if n in ckpt_shapes and tuple(ckpt_shapes[n]) != tuple(model_shapes[n])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) missing from the checkpoint: {_listed(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) not in the model: {_listed(unknown)}")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {_listed(bad)}")
    if problems:
        hint = (" (is the model size right? a checkpoint's config.json decides it when present; names must "
                "be MindFormers-style, convert HF weights with `python -m convert hf2ms`)")
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems) + hint)


def load_weights(model, weights: Weights, strict: bool = True) -> List[str]:
    """Fill `model`'s parameters (by name) from `weights`, one tensor at a time; returns the loaded names.
    strict: the checkpoint may hold no other keys. All checks run before any parameter is changed."""
    from telechat2_ms.layers import fill_parameter

    params = model_state(model)
    check_state_matches({n: tuple(p.shape) for n, p in params.items()}, weights.shapes(), weights.path, strict)
    for name, param in params.items():
        fill_parameter(param, weights.full(name))
    return sorted(params)


def load_checkpoint_into(model, path: str, strict: bool = True) -> List[str]:
    """Load a checkpoint file or directory into `model` (strict=False allows extra keys such as optimizer
    state, but every model parameter must be there)."""
    file = resolve_checkpoint_file(path)
    return load_weights(model, SafetensorsWeights(file) if file.endswith(".safetensors") else CkptWeights(file),
                        strict)


def model_state(model) -> Dict[str, Any]:
    """{parameter name: Parameter} of a model in definition order; names are attribute paths from `model`
    (MindFormers names for Telechat2ForCausalLM), whatever cell the model has been wrapped in since. The last
    pipeline stage's copy of a tied embedding (parallel/layers.mark_tied_copy) is not part of it."""
    return {name: p for name, p in model.parameters_and_names() if not getattr(p, "tied_copy", False)}


# ---- writing -------------------------------------------------------------------------------------------
def save_tensors(tensors: Mapping[str, Any], path: str) -> str:
    """Write {name: Tensor | Parameter | numpy array} to `path` (.safetensors or .ckpt) atomically; a
    .safetensors file is written one tensor at a time (formats/safetensors_io.write_arrays)."""
    import mindspore as ms
    from mindspore import Tensor

    if not path.endswith((".safetensors", ".ckpt")):
        raise CheckpointError(f"{path}: checkpoint file names must end in .safetensors or .ckpt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ext = os.path.splitext(path)[1]
    with atomic_file(path, overwrite=True, suffix=ext) as tmp:  # mindspore keeps a name that has the extension
        if ext == ".safetensors":
            write_arrays(tmp, tensors)
        else:
            items = [{"name": name, "data": Tensor(v) if isinstance(v, np.ndarray) else v}
                     for name, v in tensors.items()]
            ms.save_checkpoint(items, tmp, format="ckpt")
    return path


def save_model(model, out_dir: str, config: Optional[ModelConfig] = None, settings: Any = None,
               file_name: str = MODEL_FILE) -> str:
    """Save `model`'s parameters to out_dir/model.safetensors (or file_name), with config.json (when `config`
    is given) and run_settings.yaml (when `settings`, a RunSettings, is given). Returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    save_tensors(model_state(model), os.path.join(out_dir, file_name))
    if config is not None:
        write_config(out_dir, config)
    if settings is not None:
        write_settings(out_dir, settings)
    return out_dir


def write_config(out_dir: str, config: ModelConfig) -> None:
    hf = dict(config.to_hf_config(), telechat2_ms_name=config.name)
    write_text_atomic(os.path.join(out_dir, CONFIG_FILE), json.dumps(hf, indent=2, ensure_ascii=False) + "\n")


def write_settings(out_dir: str, settings: Any) -> None:
    """The resolved RunSettings as YAML that `telechat2_ms.settings.load_settings` reads back."""
    from telechat2_ms.settings import settings_to_dict

    text = yaml.safe_dump(settings_to_dict(settings), allow_unicode=True, sort_keys=False)
    write_text_atomic(os.path.join(out_dir, SETTINGS_FILE), text)
