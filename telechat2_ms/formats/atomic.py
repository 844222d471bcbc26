"""Atomic outputs: a writer either leaves a complete file or directory at its output path or nothing.

`check_output_path` refuses an occupied path before any work starts (unless `overwrite`). The context
managers hand out a temporary path in the same directory (so the final rename stays on one filesystem)
and, on success, move it into place with `os.replace`; on any exception the temporary is removed and the
previous content of the output path is untouched.

Temporaries are named `.<name>.tmp-<pid>-<hex>[suffix]`, so a process killed mid-write (kill -9, a full
disk) leaves one that the next write of the same path finds: `sweep_orphans` removes those whose process is
gone and says so with their size (every writer here calls it first).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import sys
from typing import Callable, Iterator, List, Optional

from telechat2_ms.formats.errors import CheckpointError


def check_output_path(path: str, overwrite: bool, is_dir: bool) -> None:
    """Refuse an output that already holds something (a file, or a non-empty directory)."""
    if not os.path.lexists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise CheckpointError(f"output {path}: parent directory {parent} does not exist")
        return
    if is_dir and os.path.isfile(path):
        raise CheckpointError(f"output {path} is a file; a directory is needed here")
    if not is_dir and os.path.isdir(path):
        raise CheckpointError(f"output {path} is a directory; a file path is needed here")
    if is_dir and not os.listdir(path):
        return  # an empty directory holds no checkpoint
    if not overwrite:
        what = ", ".join(sorted(os.listdir(path))[:4]) if is_dir else "a file"
        raise CheckpointError(f"output {path} already holds a checkpoint ({what}); pass --overwrite "
                              f"(overwrite=True) to replace it")


_ORPHAN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}(\..*)?$")


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def make_temp_dir(path: str) -> str:
    """A new temporary directory beside `path` (after sweeping orphans of earlier writes of it); the
    caller renames it into place or removes it."""
    sweep_orphans(path)
    tmp = _tmp_name(path)
    os.mkdir(tmp)
    return tmp


@contextlib.contextmanager
def atomic_file(path: str, overwrite: bool = False, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file path beside `path`; `os.replace` it onto `path` when the block succeeds."""
    check_output_path(path, overwrite, is_dir=False)
    sweep_orphans(path)
    tmp = _tmp_name(path) + suffix
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise CheckpointError(f"internal error: nothing was written for {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `path`; rename it to `path` when the block succeeds (an old
    directory there is moved aside first and deleted only after the new one is in place)."""
    check_output_path(path, overwrite, is_dir=True)
    tmp = make_temp_dir(path)
    old = None
    try:
        yield tmp
        if os.path.isdir(path):
            if os.listdir(path):
                old = _tmp_name(path) + ".old"
                os.rename(path, old)
            else:
                os.rmdir(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if old is not None:  # put the previous checkpoint back
                os.rename(old, path)
                old = None
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        if old is not None and os.path.isdir(old):
            shutil.rmtree(old)


# ---- temporaries of interrupted writes----------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tree_size(path: str) -> int:
    """Bytes of a file or of every file under a directory."""
    if os.path.isfile(path) or os.path.islink(path):
        return os.lstat(path).st_size
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
    return total


def sweep_orphans(path: str, report: Optional[Callable[[str], None]] = None) -> List[str]:
    """Remove the temporaries that interrupted writes of `path` left beside it (their process is gone);
    each one is reported (`report`, default stderr) with its size. Returns the removed paths."""
    parent, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in sorted(os.listdir(parent)):
        match = _ORPHAN.match(entry)
        if not match or match.group("name") != name or _alive(int(match.group("pid"))):
            continue
        orphan = os.path.join(parent, entry)
        if entry.endswith(".old") and not os.path.lexists(path):  # killed between atomic_dir's two renames
            os.rename(orphan, path)
            (report or _stderr)(f"warning: restored {path} from {orphan}, left by an interrupted replacement")
            continue
        size = tree_size(orphan)
        if os.path.isdir(orphan) and not os.path.islink(orphan):
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(orphan)
        removed.append(orphan)
        (report or _stderr)(f"warning: removed {orphan} ({size / 2 ** 20:.1f} MiB), left by an interrupted "
                            f"write of {path}")
    return removed


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def write_text_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
