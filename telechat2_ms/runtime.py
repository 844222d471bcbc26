"""Run-time set-up shared by every run mode: device context, model config resolution, model + tokenizer.

The architecture comes from the checkpoint's config.json when `load_checkpoint` names a directory holding
one, else from the size registry (`model:` in the YAML). Without a checkpoint the model is randomly
initialised (the built-in tiny default needs no download).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

from telechat2_ms.config import ConfigError, ModelConfig, get_config
from telechat2_ms.settings import RunSettings

_RUN_MODES = ("train", "finetune", "predict", "chat", "eval")


def setup_device(settings: RunSettings) -> None:
    """Select the device; PyNative runs synchronously on CPU (3.5x faster on small machines, errors where
    they happen)."""
    import mindspore as ms

    target = settings.device_target
    if target not in ("CPU", "Ascend", "GPU"):
        raise ConfigError(f"device_target must be CPU, Ascend or GPU, got {target!r}")
    ms.set_device(target)
    if target == "CPU":
        if settings.compute_dtype == "bfloat16":
            raise ConfigError("compute_dtype bfloat16 has no CPU kernels in MindSpore 2.10; use float32 or float16 on CPU")
        if settings.use_fused_kernels:
            raise ConfigError("use_fused_kernels needs Ascend (the fused attention/norm/rope kernels have no CPU version)")
        ms.runtime.launch_blocking()


def checkpoint_config_path(path: str) -> Optional[str]:
    """config.json beside a checkpoint (in the directory, or next to the file)."""
    if not path:
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(folder, "config.json")
    return candidate if os.path.exists(candidate) else None


def resolve_checkpoint_path(path: str) -> str:
    """A training output directory (holding checkpoints/step_*) stands for its latest checkpoint."""
    from telechat2_ms.train.checkpointing import checkpoint_root, latest_checkpoint

    if path and os.path.isdir(checkpoint_root(path)):
        latest = latest_checkpoint(checkpoint_root(path))
        if latest is None:
            raise ConfigError(f"{path} holds no finished checkpoint under checkpoints/")
        return latest
    return path


def resolve_model_config(settings: RunSettings) -> ModelConfig:
    if settings.load_checkpoint and not os.path.exists(settings.load_checkpoint):
        raise ConfigError(f"load_checkpoint {settings.load_checkpoint!r} does not exist")
    settings.load_checkpoint = resolve_checkpoint_path(settings.load_checkpoint)
    stored = _stored_config(settings.load_checkpoint)
    if stored is not None:
        if settings.model != "tiny" and settings.model in _known_sizes():
            registry = get_config(settings.model)
            if _architecture(registry) != _architecture(stored):
                raise ConfigError(f"the config stored with {settings.load_checkpoint} does not match model "
                                  f"'{settings.model}': {_architecture(stored)} vs {_architecture(registry)}")
        return stored
    return get_config(settings.model)


def _stored_config(path: str) -> Optional[ModelConfig]:
    """The architecture saved with a checkpoint (config.json beside it, or converter metadata), if any."""
    if not path:
        return None
    found = checkpoint_config_path(path)
    if found:
        return ModelConfig.from_hf_config(found, name=os.path.basename(os.path.dirname(os.path.abspath(found))))
    if os.path.isfile(path) and path.endswith(".safetensors"):
        from telechat2_ms.checkpoint import load_model_config
        return load_model_config(path)
    return None


def _known_sizes():
    from telechat2_ms.config import CONFIGS
    return CONFIGS


def _architecture(cfg: ModelConfig) -> dict:
    keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size")
    return {k: getattr(cfg, k) for k in keys}


def build_model(settings: RunSettings, cfg: Optional[ModelConfig] = None):
    """-> Telechat2ForCausalLM with the checkpoint loaded (if any)."""
    from telechat2_ms.model import Telechat2ForCausalLM

    cfg = cfg or resolve_model_config(settings)
    model = Telechat2ForCausalLM(cfg, compute_dtype=settings.compute_dtype, seed=settings.train.seed,
                                 use_fused=settings.use_fused_kernels, init_zeros=bool(settings.load_checkpoint))
    if settings.load_checkpoint:
        from telechat2_ms.checkpoint import load_checkpoint_into
        load_checkpoint_into(model, settings.load_checkpoint)
    return model


def build_tokenizer(settings: RunSettings, cfg: ModelConfig):
    """The tokenizer named in settings (file or directory), else the checkpoint directory's tokenizer.model,
    else the built-in demo tokenizer (which only fits vocab-1024 models such as `tiny`)."""
    from telechat2_ms.tokenizer import load_tokenizer

    path = settings.tokenizer
    if not path and settings.load_checkpoint:
        folder = settings.load_checkpoint if os.path.isdir(settings.load_checkpoint) else os.path.dirname(settings.load_checkpoint)
        if os.path.exists(os.path.join(folder, "tokenizer.model")):
            path = folder
    tokenizer = load_tokenizer(path or None)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {cfg.vocab_size}; "
                          "pass the tokenizer.model that belongs to the checkpoint with --tokenizer=PATH")
    return tokenizer


def check_run_mode(mode: str) -> str:
    if mode not in _RUN_MODES:
        raise ConfigError(f"unknown run_mode {mode!r}; choose one of {', '.join(_RUN_MODES)}")
    return mode


def model_and_tokenizer(settings: RunSettings) -> Tuple[object, object]:
    cfg = resolve_model_config(settings)
    tokenizer = build_tokenizer(settings, cfg)
    return build_model(settings, cfg), tokenizer
