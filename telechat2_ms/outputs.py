"""An output directory belongs to one run.

    lock = OutputLock(output_dir).acquire()                       # rank 0, for the whole run
    claim = claim_run(output_dir, identity, resumed_state, overwrite)  # claim.run_id goes into every checkpoint

A training run records, in `<output_dir>/run.json`, its identity (what makes it the same run: model
architecture, data, seed, batch arithmetic, layout, base checkpoint, LoRA) and a run id that every checkpoint
of it carries in trainer_state.json, and holds `<output_dir>/.lock` (an exclusive `flock`, released by the
kernel when the process ends, kill -9 included) while it runs. Then:
- a second run on the same directory while the first runs is refused, naming the holder (pid, host, start);
- a fresh run into a directory that holds another run's results (run.json, checkpoints, metrics) is refused
  unless `overwrite` (then those results are removed first, never mixed with the new ones);
- a resumed run must have the identity recorded in run.json (compared before anything is built);
- retention removes only checkpoints carrying the current run id (train/checkpointing.py).
Eval holds the same lock on its result directory (evaluate/runner.py).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from telechat2_ms.config import ConfigError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"
RUN_FORMAT = "telechat2_ms.run/1"
# what a fresh run would mix with: a previous run's results in the output directory (a run.json alone, of
# a run that stopped before writing any, is replaced without asking)
RESULT_ENTRIES = ("checkpoints", "metrics.jsonl", "loss_curve.png", "training_curves.png")


class OutputBusy(ConfigError):
    """Another live process holds the output directory."""


def _holder_text(info: Dict[str, Any]) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')}, "
            f"{info.get('command', '?')})")


class OutputLock:
    """`<directory>/.lock` held exclusively from `acquire()` to `release()` (or the end of the process);
    OutputBusy naming the holder if another process has it. The file stays (it only names the lock); its
    content says who holds it."""

    def __init__(self, directory: str, what: str = "output_dir"):
        self.directory, self.what = directory, what
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            try:
                with open(self.path, encoding="utf-8") as f:
                    info = json.load(f)
            except (OSError, ValueError):
                info = {}
            raise OutputBusy(f"{self.what} {self.directory} is in use by {_holder_text(info)}; wait for that run "
                             "to end or choose another output_dir") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:6]))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def read_run(directory: str) -> Optional[Dict[str, Any]]:
    """run.json of an output directory, None if there is none; ConfigError naming it if unreadable."""
    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}; it records which run owns {directory}: restore it, or "
                          "pass --overwrite to start a new run there") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or "run_id" not in record:
        raise ConfigError(f"{path} is not a run record of this program; pass --overwrite to start a new run in "
                          f"{directory}")
    return record


def identity_differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """'key: recorded X, now Y' for every identity key that differs."""
    keys = sorted(set(recorded) | set(current))
    return [f"{k}: recorded {recorded.get(k)!r}, now {current.get(k)!r}" for k in keys
            if recorded.get(k) != current.get(k)]


def previous_results(directory: str) -> List[str]:
    """The RESULT_ENTRIES present in `directory` (an empty subdirectory holds nothing)."""
    held = []
    for name in RESULT_ENTRIES:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            if os.listdir(path):
                held.append(name)
        elif os.path.lexists(path):
            held.append(name)
    return held


@dataclass
class RunClaim:
    run_id: str
    resumed: bool
    replaced: List[str]


# identity keys a resumed run may change (the global batch may not): the parallel layout and the rows per
# micro-batch (a checkpoint resumes under another layout)
RESHARDABLE = ("layout:", "batch_size:")
# what trainer states written before run identities existed recorded (compared when resuming those)
_LEGACY_KEYS = ("model", "seed", "batch_size", "grad_accum_steps", "seq_length", "lora")


def recorded_identity(state: Dict[str, Any]) -> Dict[str, Any]:
    if isinstance(state.get("identity"), dict):
        return state["identity"]
    return {k: state.get(k) for k in _LEGACY_KEYS}


def claim_run(directory: str, identity: Dict[str, Any], resumed_state: Optional[Dict[str, Any]],
              overwrite: bool, resumed_from: str = "") -> RunClaim:
    """Decide (under the lock) whether this run may use `directory` (module docstring) and record it there.
    `resumed_state` is the trainer_state.json of the checkpoint being resumed (None for a fresh run).
    Raises ConfigError naming the directory or checkpoint, what differs and the way out."""
    owner = None if overwrite else read_run(directory)
    if resumed_state is not None:
        mine = identity if isinstance(resumed_state.get("identity"), dict) else \
            {k: identity.get(k) for k in _LEGACY_KEYS}
        differences = [d for d in identity_differences(recorded_identity(resumed_state), mine)
                       if not d.startswith(RESHARDABLE)]
        if differences:
            raise ConfigError(f"cannot resume from {resumed_from or directory}: this run is not the one recorded "
                              f"there ({'; '.join(differences)}); resume with the recorded settings (its "
                              "run_settings.yaml) or start a new run in another output_dir")
        run_id = resumed_state.get("run_id") or (owner or {}).get("run_id") or uuid.uuid4().hex
        if owner is not None and owner["run_id"] != run_id:
            raise ConfigError(f"output_dir {directory} belongs to run {owner['run_id'][:8]}, not to run "
                              f"{run_id[:8]} of {resumed_from}; resume into that run's own output_dir, or pass "
                              "--overwrite to remove what the other run left there")
        replaced = _remove_results(directory) if overwrite else []
        _write_run(directory, run_id, identity, owner if owner and owner["run_id"] == run_id else None, True)
        return RunClaim(run_id, True, replaced)
    held = previous_results(directory)
    if held and not overwrite:
        what = f"run {owner['run_id'][:8]} (started {owner.get('created')})" if owner else "an earlier run"
        raise ConfigError(f"output_dir {directory} holds {what}'s results ({', '.join(held)}); continue it with "
                          "--train.resume=true, choose another output_dir, or pass --overwrite to remove them and "
                          "start anew")
    replaced = _remove_results(directory)
    run_id = uuid.uuid4().hex
    _write_run(directory, run_id, identity, None, False)
    return RunClaim(run_id, False, replaced)


def _remove_results(directory: str) -> List[str]:
    """--overwrite: the old run's results go before the new run writes anything (never mixed)."""
    held = previous_results(directory)
    for name in held:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            aside = os.path.join(directory, f".replaced-{uuid.uuid4().hex[:8]}-{name}")
            os.rename(path, aside)  # one rename: the old checkpoints vanish at once, then are deleted
            shutil.rmtree(aside)
        else:
            os.remove(path)
    return held


def _write_run(directory: str, run_id: str, identity: Dict[str, Any], previous: Optional[Dict[str, Any]],
               resumed: bool) -> None:
    from telechat2_ms.formats.atomic import write_text_atomic

    record = {"format": RUN_FORMAT, "run_id": run_id,
              "created": previous.get("created") if previous else _now(), "identity": identity,
              "resumed": (previous.get("resumed", 0) + 1) if previous else int(resumed)}
    write_text_atomic(os.path.join(directory, RUN_FILE), json.dumps(record, indent=2, sort_keys=True) + "\n")
