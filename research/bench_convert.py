"""Benchmark of the streaming converters on a random checkpoint with real TeleChat2 shapes (not a test).

    .venv/bin/python research/bench_convert.py                       # TeleChat2-3B shapes, bf16
    .venv/bin/python research/bench_convert.py --size tiny --dtype fp16

Writes random HF shards (`convert.random_hf`, one tensor at a time) into a temporary directory, then runs
each step as its own `python -m convert ...` process and reports its wall time, bytes/s (tensor bytes
written) and peak RSS (ru_maxrss of that child from os.wait4). A child starts with its parent's RSS
high-water mark, so the parent stays small and the random shards are written by a child as well.
Memory budget checked (the issue's): peak RSS < 2 GiB + the largest single tensor of the input.
Steps: hf2ms (keep dtype); ms2hf (back to HF, 5 GB shards); reshard to tp=2, pp=2; hf2ms to fp32 with the
fused qkv layout (casts and fusion). Needs about 6x the checkpoint size of free disk in --workdir.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from telechat2_ms.formats.dtypes import DTYPE_CHOICES, ITEMSIZE
from convert.keymap import expected_hf
from convert.random_hf import make_random_hf
from telechat2_ms.config import get_config

GIB = 1 << 30


def run_step(args, cwd):
    """Run `python -m convert ARGS` and return (wall seconds, peak RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "convert", *args, "--no-progress"], cwd=cwd,
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"step {args[0]} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="telechat2_3b", help="size name in telechat2_ms.config.CONFIGS")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the HF shards")
    parser.add_argument("--workdir", default=None, help="where to write (default: a new temp dir, removed after)")
    parser.add_argument("--generate-into", default=None, help=argparse.SUPPRESS)  # internal: child step
    args = parser.parse_args()

    cfg = get_config(args.size)
    code = DTYPE_CHOICES[args.dtype]
    if args.generate_into:
        make_random_hf(args.generate_into, cfg, code, shard_bytes=5 * 10**9)
        return
    shapes = expected_hf(cfg)
    total = sum(ITEMSIZE[code] * math.prod(s) for s in shapes.values())
    largest = max(ITEMSIZE[code] * math.prod(s) for s in shapes.values())
    budget = 2 * GIB + largest
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    os.makedirs(work, exist_ok=True)
    try:
        print(f"model {cfg.name}: {len(shapes)} tensors, {cfg.num_parameters() / 1e9:.2f} B parameters, "
              f"{total / GIB:.2f} GiB as {code}; largest tensor {largest / GIB:.2f} GiB; RSS budget "
              f"{budget / GIB:.2f} GiB")
        t0 = time.perf_counter()
        # in a child process too: a forked child starts with its parent's RSS high-water mark
        subprocess.run([sys.executable, __file__, "--size", args.size, "--dtype", args.dtype, "--generate-into",
                        os.path.join(work, "hf")], check=True)
        print(f"random HF shards written in {time.perf_counter() - t0:.1f} s")
        steps = [("hf2ms", ["hf2ms", "hf", "ms.safetensors"]),
                 ("ms2hf", ["ms2hf", "ms.safetensors", "hf_back"]),
                 ("reshard tp2 pp2", ["reshard", "ms.safetensors", "tp2_pp2", "--tp", "2", "--pp", "2"]),
                 ("hf2ms fp32 fused", ["hf2ms", "hf", "ms_fp32_fused.safetensors", "--dtype", "fp32", "--fused-qkv"])]
        print(f"{'step':<16} {'wall s':>8} {'MB/s':>8} {'peak RSS GiB':>13} {'< budget':>9}")
        ok = True
        for label, step in steps:
            wall, rss = run_step(step, work)
            written = total * (2 if "fp32" in step and code != "F32" else 1)
            ok &= rss < budget
            print(f"{label:<16} {wall:8.1f} {written / wall / 1e6:8.1f} {rss / GIB:13.2f} {str(rss < budget):>9}")
        print("all steps within the memory budget" if ok else "MEMORY BUDGET EXCEEDED")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
