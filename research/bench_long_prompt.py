"""Long sequences on bench_100m: prefill (time to the first token of one prompt of --lengths tokens) or, with
--train, one training step (forward + backward of the loss on one sequence, compiled), and each one's peak RSS:
this port with the blockwise causal attention (kernels.BlockwiseAttention, layers.use_blockwise_attention; the
Generator's default), this port with the dense attention (the S x S scores), PyTorch
(tests/torch_reference.llama_reference, sdpa); each in its own process, one after the other in one run, same
weights, --threads threads, the second of two calls timed (--no-warm-up: the first). The "-pynative" kinds run
this port uncompiled.

    .venv/bin/python research/bench_long_prompt.py --lengths 8192 32768
    .venv/bin/python research/bench_long_prompt.py --train --lengths 2048 4096 --kinds blockwise dense torch

Prints a table and writes JSON (--out). A worker that fails (out of memory) is reported as such. Lengths past
bench_100m's trained window (seq_length) run with the NTK alpha active on this port; the PyTorch reference has
no NTK scaling (plain RoPE), which changes no cost.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("blockwise", "dense", "blockwise-pynative", "dense-pynative", "torch")


def worker(kind: str, length: int, threads: int, weights: str, out: str, train: bool = False,
           warm_up: bool = True) -> None:
    from telechat2_ms.config import get_config

    cfg = get_config("bench_100m")
    prompt = np.random.default_rng(0).integers(4, cfg.vocab_size, size=(1, length))
    if kind == "torch":
        import torch
        from safetensors.numpy import load_file

        from tests.torch_reference import llama_reference

        torch.set_num_threads(threads)
        model = llama_reference(cfg, load_file(weights), attn_implementation="sdpa")
        ids = torch.from_numpy(prompt.astype(np.int64))

        def call():
            if train:
                logits = model(ids).logits.float()
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
                loss.backward()
                return float(loss)
            with torch.inference_mode():
                return int(model(ids).logits[0, -1].argmax())
    else:
        import mindspore as ms

        from telechat2_ms import kernels
        from telechat2_ms.build import synchronous_cpu_runtime
        from telechat2_ms.generate import GenerationConfig, Generator
        from telechat2_ms.layers import use_blockwise_attention
        from telechat2_ms.model import Telechat2ForCausalLM
        from telechat2_ms.train.loss import CausalLMLoss

        ms.set_device("CPU")
        synchronous_cpu_runtime()
        ms.device_context.cpu.op_tuning.threads_num(threads)
        if kind.startswith("dense"):
            kernels.ATTENTION_BLOCK = 1 << 30  # never blockwise
        model = Telechat2ForCausalLM(cfg, seed=0)
        if not os.path.exists(weights):
            from safetensors.numpy import save_file

            save_file({p.name: p.asnumpy() for p in model.get_parameters()}, weights)
        compiled = not kind.endswith("pynative")
        if train:
            use_blockwise_attention(model, kind.startswith("blockwise"))
            net = CausalLMLoss(model, 1, length)
            step = ms.value_and_grad(net, None, net.trainable_params())
            step = ms.jit(step) if compiled else step
            inputs = (ms.Tensor(prompt.astype(np.int32)), ms.Tensor(np.ones((1, length), np.float32)),
                      ms.Tensor(np.float32(length - 1)))

            def call():
                return float(step(*inputs)[0].asnumpy())
        else:
            generator = Generator(model, length + 1, use_jit=compiled)
            gen = GenerationConfig(max_new_tokens=1, repetition_penalty=1.0, eos_token_id=-1,
                                   pad_token_id=cfg.pad_token_id)

            def call():
                return generator.generate(prompt.tolist(), gen)[0][0]
    start = time.perf_counter()
    token = call()  # compiles (this port), warms up (both)
    first = seconds = time.perf_counter() - start
    if warm_up:
        start = time.perf_counter()
        token = call()
        seconds = time.perf_counter() - start
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"seconds": seconds, "first_call_s": first, "token": token, "timed_call": 2 if warm_up else 1}, f)


def run(kind: str, length: int, args, weights: str, workdir: str) -> Dict:
    out = os.path.join(workdir, f"{kind}_{length}.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--lengths", str(length),
               "--threads", str(args.threads), "--weights", weights, "--worker-out", out] + (
                   ["--train"] if args.train else []) + (["--no-warm-up"] if args.no_warm_up else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOG_v=os.environ.get("GLOG_v", "3"),
               PYTHONPATH=REPO_ROOT)
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=workdir)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    row = {"kind": kind, "length": length, "peak_rss_gib": usage.ru_maxrss / 2**20,
           "wall_s": time.perf_counter() - start, "exit_code": code}
    if code == 0:
        with open(out, encoding="utf-8") as f:
            row.update(json.load(f))
        row["tokens_per_s"] = length / row["seconds"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train", action="store_true", help="one training step instead of a prefill")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--no-warm-up", action="store_true",
                   help="time the first call (default: the second of two); for lengths where a second call would "
                        "double a long run (the uncompiled kinds and PyTorch compile nothing)")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.lengths[0], args.threads, args.weights, args.worker_out, args.train,
               not args.no_warm_up)
        return 0
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="long_prompt_") as workdir:
        weights = os.path.join(workdir, "weights.safetensors")
        kinds = sorted(args.kinds, key=lambda k: k == "torch")  # a port worker writes the weights first
        for length in args.lengths:
            for kind in kinds:
                rows.append(run(kind, length, args, weights, workdir))
                r = rows[-1]
                status = (f"{r['seconds']:8.1f} s {r['tokens_per_s']:8.1f} tok/s  ({r['token']})" if r["exit_code"] == 0
                          else f"failed (exit {r['exit_code']})")
                print(f"{length:6d} {kind:10s} {status}  peak RSS {r['peak_rss_gib']:6.2f} GiB", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
