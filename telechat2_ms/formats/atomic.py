"""Atomic outputs: a writer either leaves a complete file or directory at its output path or nothing.

`check_output_path` refuses an occupied path before any work starts (unless `overwrite`). The context
managers hand out a temporary path in the same directory (so the final rename stays on one filesystem)
and, on success, move it into place with `os.replace`; on any exception the temporary is removed and the
previous content of the output path is untouched.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from typing import Iterator

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


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_file(path: str, overwrite: bool = False, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file path beside `path`; `os.replace` it onto `path` when the block succeeds."""
    check_output_path(path, overwrite, is_dir=False)
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
    tmp = _tmp_name(path)
    os.mkdir(tmp)
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
