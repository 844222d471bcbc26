"""Model checkpoints on the MindSpore side: save and load parameters as safetensors (MindFormers names).

    save_model(model, "out/final", config=cfg, settings=run_settings)   # out/final/model.safetensors
                                                                         # + config.json + run_settings.yaml
    load_checkpoint_into(model, "out/final")                             # or a .safetensors / .ckpt file
    cfg = load_model_config("out/final")                                 # ModelConfig or None

A checkpoint is either one file (`.safetensors`, as written by `mindspore.save_checkpoint(format=
"safetensors")` or by `convert/` hf2ms, or a MindSpore `.ckpt`) or a directory holding `model.safetensors`
(or `model.ckpt`), optionally with `config.json` (the HF-style TeleChat2 config, `ModelConfig.to_hf_config`)
and `run_settings.yaml` (the resolved RunSettings of the run that wrote it).

`load_checkpoint_into` is strict: a checkpoint that misses a parameter of the model, has a name the model
does not know, or has a tensor of another shape is refused with a `CheckpointError` that lists every offending
name (the TeleChat2 HF code silently keeps a random lm_head when it is missing, spec 1.5 / 10.17; this port
does not). Nothing is written into the model unless every check passes. Tensors are cast to each
parameter's dtype (a bf16 checkpoint loads into an fp32 model and vice versa).

Files are written atomically (a temporary name in the same directory, then `os.replace`), so a crash during
a save leaves either the old file or the new one, never a partial file.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import yaml

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms.config import ConfigError, ModelConfig

MODEL_FILE = "model.safetensors"
MODEL_FILE_CKPT = "model.ckpt"
CONFIG_FILE = "config.json"
SETTINGS_FILE = "run_settings.yaml"
CONVERTER_CONFIG_KEY = "telechat2_config"  # safetensors metadata key written by convert/ (hf2ms)
_MAX_LISTED = 20  # names listed per category in an error message


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the model; the message names file and keys."""


# ---- paths ---------------------------------------------------------------------------------------------
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


def _format_of(path: str) -> str:
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


# ---- reading -------------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> Dict[str, ms.Parameter]:
    """All tensors of a checkpoint file or directory, {name: Parameter} (loaded into host memory)."""
    file = resolve_checkpoint_file(path)
    try:
        return dict(ms.load_checkpoint(file, format=_format_of(file)))
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with long internal messages
        raise CheckpointError(f"cannot read checkpoint {file}: {type(err).__name__}: {err}") from err


def load_model_config(path: str) -> Optional[ModelConfig]:
    """The ModelConfig stored with a checkpoint: `config.json` in (or beside) it, else the `telechat2_config`
    safetensors metadata that convert/ writes; None if it carries no config."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_path = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(config_path):
        return ModelConfig.from_hf_config(config_path, name=_config_name(config_path))
    file = resolve_checkpoint_file(path)
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(file, "np") as handle:
                metadata = handle.metadata() or {}
        except Exception as err:
            raise CheckpointError(f"cannot read safetensors header of {file}: {err}") from err
        if CONVERTER_CONFIG_KEY in metadata:
            try:
                return ModelConfig.from_hf_config(json.loads(metadata[CONVERTER_CONFIG_KEY]), name="checkpoint")
            except (json.JSONDecodeError, ConfigError) as err:
                raise CheckpointError(f"{file}: bad {CONVERTER_CONFIG_KEY} metadata: {err}") from err
    return None


def _config_name(config_path: str) -> str:
    try:
        with open(config_path, encoding="utf-8") as f:
            return str(json.load(f).get("telechat2_ms_name", "checkpoint"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {config_path}: {err}") from err


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


def load_checkpoint_into(model: nn.Cell, path: str, strict: bool = True) -> List[str]:
    """Load a checkpoint file or directory into `model`'s parameters (by name) and return the loaded names.

    strict=True (default): every model parameter must be present with the same shape and the checkpoint may
    hold no other keys. strict=False allows extra checkpoint keys (e.g. optimizer state) but still requires
    every model parameter. All checks run before any parameter is changed."""
    file = resolve_checkpoint_file(path)
    state = read_checkpoint(file)
    params = model_state(model)
    check_state_matches({n: tuple(p.shape) for n, p in params.items()},
                        {n: tuple(t.shape) for n, t in state.items()}, file, strict)
    for name, param in params.items():
        value = state[name]  # a host Parameter; cast on the host when the dtypes differ (bf16 <-> fp32)
        param.set_data(Tensor(value) if value.dtype == param.dtype else ops.cast(value, param.dtype))
    return sorted(params)


# ---- writing -------------------------------------------------------------------------------------------
def _atomic_target(path: str) -> str:
    """A temporary path beside `path` with the same extension (mindspore appends .safetensors/.ckpt)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial" + ext, dir=directory)
    os.close(fd)
    os.unlink(tmp)
    return tmp


def save_tensors(tensors: Mapping[str, Any], path: str) -> str:
    """Write {name: Tensor | Parameter | numpy array} to `path` (.safetensors or .ckpt) atomically."""
    if not path.endswith((".safetensors", ".ckpt")):
        raise CheckpointError(f"{path}: checkpoint file names must end in .safetensors or .ckpt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    items = []
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            value = Tensor(value)
        items.append({"name": name, "data": value})
    tmp = _atomic_target(path)
    try:
        ms.save_checkpoint(items, tmp, format=_format_of(path))
        if not os.path.isfile(tmp):
            raise CheckpointError(f"mindspore did not write {tmp} while saving {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".partial", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def model_state(model: nn.Cell) -> Dict[str, ms.Parameter]:
    """{parameter name: Parameter} of a model in definition order; names are attribute paths from `model`
    (MindFormers names for Telechat2ForCausalLM), whatever cell the model has been wrapped in since."""
    return dict(model.parameters_and_names())


def save_model(model: nn.Cell, out_dir: str, config: Optional[ModelConfig] = None, settings: Any = None,
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
