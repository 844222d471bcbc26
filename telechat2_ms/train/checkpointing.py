"""Training checkpoints: atomic save every N steps, keep the last K, find the newest for resume.

A checkpoint is a directory `<output_dir>/checkpoints/step_00000040/` holding the step engine's files
(train/engine.py: one process model.safetensors, optimizer.safetensors, lora.safetensors; under msrun a
per-rank layout, layout.json + tp{t}_pp{p}/model.safetensors) plus
    trainer_state.json      step, data position, loss-scaler state, seed, ... (see Trainer.state_dict)
    config.json, run_settings.yaml
Either kind loads with `--load_checkpoint` (checkpoint.resolve_checkpoint). It is written into a temporary
sibling directory (`.tmp-step_...`; every rank writes its share into the same one) and renamed into place in
one `os.rename` by rank 0, so a process killed during a save leaves the previous checkpoints intact and at
worst a `.tmp-*` directory, which is ignored and removed by the next save. Retention renames an old
checkpoint to a `.tmp-` name before deleting it, so a kill during the deletion never leaves a listed
checkpoint with files missing. Directories without trainer_state.json are never considered complete
(checkpoint.list_checkpoints).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Union

from telechat2_ms.checkpoint import (STATE_FILE, CheckpointError, checkpoint_root, latest_checkpoint,
                                     list_checkpoints, save_tensors, write_config, write_settings)


def remove_stale_temporaries(root: str) -> None:
    """Delete the `.tmp-*` directories of saves that were interrupted (the caller holds the run's lock, so
    no live save owns them), saying so with their size."""
    from telechat2_ms.formats.atomic import tree_size

    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            if name.startswith(".tmp-"):
                path = os.path.join(root, name)
                size = tree_size(path)
                shutil.rmtree(path, ignore_errors=True)
                print(f"warning: removed {path} ({size / 2 ** 20:.1f} MiB), left by an interrupted checkpoint save",
                      file=sys.stderr)


def discard_checkpoint(path: str) -> None:
    """Remove a checkpoint directory so that no kill can leave it half deleted but listed: one rename to a
    `.tmp-` name first (never listed; removed by the next save), then the deletion."""
    head, name = os.path.split(os.path.abspath(path))
    aside = os.path.join(head, f".tmp-removing-{name}-{os.getpid()}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def save_training_checkpoint(root: str, step: int, write_files: Union[Callable[[str], None], Mapping[str, Any]],
                             state: Dict[str, Any],
                             config=None, settings=None, keep: int = 0,
                             before_rename: Optional[Callable[[str], None]] = None, is_main: bool = True,
                             barrier: Optional[Callable[[], None]] = None, run_id: Optional[str] = None,
                             check_files: Optional[Callable[[str], None]] = None) -> str:
    """Write checkpoint `step` atomically: `write_files(tmp_dir)` (on every rank; or a mapping {file name:
    {tensor name: tensor}} written with checkpoint.save_tensors), then trainer_state.json,
    config.json and run_settings.yaml; then delete all but the newest `keep` checkpoints of this run (those
    whose trainer state carries `run_id`; keep <= 0 keeps all; a checkpoint of another run is never
    removed). Under msrun every rank calls it with a `barrier`; rank 0 runs `check_files(tmp_dir)` (every rank's
    file is there) before publishing. Returns the directory."""
    sync = barrier or (lambda: None)
    if not callable(write_files):
        files = write_files

        def write_files(directory: str) -> None:
            for file_name, tensors in files.items():
                save_tensors(tensors, os.path.join(directory, file_name))
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f".tmp-step_{step:08d}")
    if is_main:
        os.makedirs(root, exist_ok=True)
        remove_stale_temporaries(root)
        os.makedirs(tmp)
    sync()
    try:
        write_files(tmp)
        sync()
        if is_main:
            if check_files is not None:
                check_files(tmp)
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
                discard_checkpoint(final)
            os.rename(tmp, final)
            if keep > 0:
                for old in run_checkpoints(root, run_id)[:-keep]:
                    discard_checkpoint(old)
    finally:
        if is_main and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    sync()
    return final


def run_checkpoints(root: str, run_id: Optional[str]) -> list:
    """The complete checkpoints under `root` that belong to run `run_id` (all when run_id is None), oldest
    first."""
    mine = []
    for _, path in list_checkpoints(root):
        if run_id is not None:
            try:
                with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
                    if json.load(f).get("run_id") != run_id:
                        continue
            except (OSError, ValueError):
                continue
        mine.append(path)
    return mine


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
