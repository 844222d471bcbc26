"""Training checkpoints: atomic save every N steps, keep the last K, find and load the newest for resume.

A checkpoint is a directory `<output_dir>/checkpoints/step_00000040/` holding
    model.safetensors       the full model (LoRA adapters merged in), loadable by load_checkpoint_into /
                            `--load_checkpoint` for predict
    optimizer.safetensors   AdamW moments (`exp_avg.<param>`, `exp_avg_sq.<param>`) of the trained parameters
    lora.safetensors        the adapters (LoRA runs only)
    trainer_state.json      step, data position, loss-scaler state, seed, ... (see Trainer.state_dict)
    config.json, run_settings.yaml
It is written into a temporary sibling directory (`.tmp-step_...`) and renamed into place in one
`os.rename`, so a process killed during a save leaves the previous checkpoints intact and at worst a
`.tmp-*` directory, which is ignored and removed by the next save. Directories without trainer_state.json
are never considered complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from telechat2_ms.checkpoint import CheckpointError, save_tensors, write_config, write_settings

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
LORA_FILE = "lora.safetensors"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(root: str) -> List[Tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first, as (step, path)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a checkpoint directory `.../step_00000040`, None for other paths."""
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def latest_checkpoint(root: str) -> Optional[str]:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale_temporaries(root: str) -> None:
    """Delete `.tmp-*` directories left by a save that was interrupted."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_training_checkpoint(root: str, step: int, files: Mapping[str, Mapping[str, Any]], state: Dict[str, Any],
                             config=None, settings=None, keep: int = 0,
                             before_rename: Optional[Callable[[str], None]] = None) -> str:
    """Write {file name: {tensor name: tensor}} plus trainer_state.json as checkpoint `step` atomically;
    then delete all but the newest `keep` checkpoints (keep <= 0 keeps all). Returns the directory."""
    os.makedirs(root, exist_ok=True)
    remove_stale_temporaries(root)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=root)
    try:
        for file_name, tensors in files.items():
            save_tensors(tensors, os.path.join(tmp, file_name))
        if config is not None:
            write_config(tmp, config)
        if settings is not None:
            write_settings(tmp, settings)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:  # test hook: simulate a crash between writing and publishing
            before_rename(tmp)
        if os.path.isdir(final):  # the same step saved again (e.g. after resuming from an older one)
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer_state(path: str) -> Dict[str, Any]:
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {STATE_FILE}); "
                              "point train.resume_from at a checkpoints/step_XXXXXXXX directory")
    try:
        with open(state_path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {state_path}: {err}") from None


def resolve_resume(output_dir: str, resume: bool, resume_from: str) -> Optional[str]:
    """The checkpoint to resume from: `resume_from` if set, else the newest under output_dir when `resume`;
    CheckpointError when resuming was asked for and there is nothing to resume from."""
    if resume_from:
        if not os.path.isdir(resume_from):
            raise CheckpointError(f"train.resume_from: checkpoint directory not found: {resume_from}")
        read_trainer_state(resume_from)
        return resume_from
    if not resume:
        return None
    root = checkpoint_root(output_dir)
    latest = latest_checkpoint(root)
    if latest is None:
        raise CheckpointError(f"train.resume is true but there is no complete checkpoint under {root}; "
                              "run without resume to start from scratch, or set train.resume_from")
    return latest
