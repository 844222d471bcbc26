"""This machine's CPU as /proc/cpuinfo names it: kernels.SWAP_ROWS picks its matmul form by it, the benchmarks
print it."""
from __future__ import annotations

import platform
from typing import Set, Tuple


def cpu_info() -> Tuple[str, Set[str]]:
    """(model name, set of flags) of the first CPU in /proc/cpuinfo (elsewhere platform.processor() or
    "unknown", and no flags)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, flags
