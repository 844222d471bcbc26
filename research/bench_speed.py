"""Speed of this port against the PyTorch reference (HF transformers), side by side in one run (not a test).

    .venv/bin/python research/bench_speed.py                       # ~100M TeleChat2 (bench_100m), 2 threads
    .venv/bin/python research/bench_speed.py --json out/bench.json --repeats 5
    .venv/bin/python research/bench_speed.py --size tiny --prompt-len 64 --new-tokens 16 --train-seq 64  # smoke

Both frameworks run the same weights (the MindSpore model's seeded initialisation, handed to the PyTorch
worker as a safetensors file and mapped to HF `LlamaForCausalLM` by tests/torch_reference.py, the parity
tests' reference), the same token ids, in fp32 on the CPU with the same thread count. Each measure (generation
at one batch size, the training step at one batch size) runs in its own child process, this port's then
PyTorch's, one after the other (so they never share cores, and each peak RSS is that measure's own: ru_maxrss
of the child from os.wait4, framework import included).

Also measured in the same run, in a child of its own: this machine's limits, for a roofline. The fp32 matmul
peak with the best library here (PyTorch's MKL sgemm, a 3072^3 product, --threads threads) and the read
bandwidth of one thread and of --threads threads (a sum over 512 MiB). Each tokens/s figure is also printed as
a fraction of its bound: prefill and training by FLOPs (matmuls counted 2 per weight per token, the lm_head at
every training position but once per prefill row, causal attention 4 * layers * hidden per (query, earlier key)
pair; training 3x the forward), decode by bytes (every matmul weight plus each row's K/V cache read once per
step) over the all-thread bandwidth. Printed with them: the CPU model, its vector extensions, and the matmul
kernels each side runs (this port's from oneDNN's verbose log of one MatMul; PyTorch's BLAS and CPU capability).

Measured, each as median [min, max] of --repeats runs after --warm-up untimed runs (default 6, both frameworks);
prefill and decode come from the same --repeats generations. Why 6: the first run compiles, and MindSpore's CPU
kernels other than the matmuls (elementwise, AdamW, softmax, ...) split their work by ParallelLaunchAutoSearch,
which times each split for 5 launches of the kernel, starting with the whole work on one thread: a graph reaches
its steady speed at its 6th call (measured on an AVX-512 Xeon: the bench_100m training step at b1 2.22 s for
calls 2-5, 1.80 s from call 6 on; the b1 prefill of 512 tokens 0.41 s, then 0.34 s; flat over calls 6-18 while
the search tries finer splits on both threads). A training run of many steps and a server's decode step run at
the steady speed; a one-shot prefill (predict) at the first one's.
  prefill  batch 1 and 8, --prompt-len tokens: time to the first token (prompt in -> KV cache filled ->
           last-position logits -> greedy token on the host); tokens/s = batch * prompt_len / time.
           This port: Generator (telechat2_ms/generate.py), compiled prefill; PyTorch: `model.generate`
           (DynamicCache, sdpa attention by default), timed with a streamer at the first new token.
  decode   the same prompts, --new-tokens greedy tokens: time from the first to the last new token;
           tokens/s = batch * (new_tokens - 1) / time. Eos is disabled on both sides so every run makes
           exactly new_tokens tokens; no repetition penalty.
  train    one optimizer step on each of --train-batches x --train-seq tokens: forward, masked next-token
           cross-entropy, backward, global-norm clipping (1.0), AdamW. This port: the trainer's
           TrainStep.step (telechat2_ms/train/step.py: one compiled graph for one micro-batch, else the
           accumulating graphs), the batch in micro-batches of --port-micro-batch rows (the
           trainer's train.batch_size, gradient accumulation: the same step; default 1, leaner than one graph
           of several rows, labelled "port 4 x b1" at b4); PyTorch: eager autograd +
           torch.optim.AdamW on the whole batch. tokens/s = batch * seq / step time.
Ratio = port tokens/s / PyTorch tokens/s (> 1: the port is faster). Also printed: how many of the batch-1
greedy tokens agree between the two (a sanity check that both ran the same model; random weights give
nearly flat logits, so late tokens may flip on fp32 rounding; the first batch row when batch 1 is not run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from telechat2_ms.config import ConfigError, get_config
from telechat2_ms.cpu import cpu_info

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_ORDINARY_ID = 13  # ids 0-12 are TeleChat2's special tokens; prompts use ordinary ids only


def summarize(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def make_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """[batch, length] int32 token ids, the same on both sides."""
    return np.random.default_rng(seed).integers(FIRST_ORDINARY_ID, vocab, (batch, length)).astype(np.int32)


def time_repeats(fn, repeats: int, warm_up: int) -> List[float]:
    """`warm_up` untimed calls, then `repeats` timed calls of fn() -> seconds (fn returns its own measured time)."""
    for _ in range(warm_up):
        fn()
    return [fn() for _ in range(repeats)]


def record_generation(result: Dict, run, repeats: int, new_tokens: int, warm_up: int) -> None:
    """Warm up (`warm_up` generations of 2 new tokens: the first compiles the prefill and decode steps), then
    `repeats` timed generations of new_tokens; each gives one prefill time (to the first token) and one decode
    time (first to last token). run(new_tokens) -> {"prefill": s, "decode": s}."""
    for _ in range(warm_up):
        run(2)
    timings = [run(new_tokens) for _ in range(repeats)]
    result["prefill"] = [t["prefill"] for t in timings]
    result["decode"] = [t["decode"] for t in timings]


def parse_measure(measure: str):
    """'generate:8' -> ('generate', 8); 'train:4' -> ('train', 4)."""
    kind, _, batch = measure.partition(":")
    return kind, int(batch)


# ---- this port --------------------------------------------------------------------------------------

def mindspore_worker(args) -> Dict:
    import mindspore as ms
    from safetensors.numpy import save_file

    from telechat2_ms.build import synchronous_cpu_runtime
    from telechat2_ms.generate import GenerationConfig, Generator
    from telechat2_ms.layers import use_training_kernels
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.train.loss import CausalLMLoss
    from telechat2_ms.train.optim import AdamW
    from telechat2_ms.train.step import TrainStep

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    cfg = get_config(args.size)
    model = Telechat2ForCausalLM(cfg, seed=args.seed)
    if not os.path.exists(args.weights):  # the first measure hands the weights to PyTorch's workers
        save_file({p.name: p.asnumpy() for p in model.get_parameters()}, args.weights + ".partial")
        os.replace(args.weights + ".partial", args.weights)
    kind, batch = parse_measure(args.measure)
    result: Dict = {}
    if kind == "generate":
        generator = Generator(model, args.prompt_len + args.new_tokens)
        prompts = make_prompts(batch, args.prompt_len, cfg.vocab_size, args.seed).tolist()

        def run(new_tokens: int) -> Dict[str, float]:
            gen = GenerationConfig(max_new_tokens=new_tokens, repetition_penalty=1.0, eos_token_id=-1,
                                   pad_token_id=cfg.pad_token_id)
            outputs = generator.generate(prompts, gen)
            assert all(len(o) == new_tokens for o in outputs), "generation stopped early"
            result["tokens"] = outputs[0]
            return dict(generator.last_timing)

        record_generation(result, run, args.repeats, args.new_tokens, args.warm_up)
        return result

    use_training_kernels(model)  # as train/engine.py does for a compiled step
    params = model.trainable_params()
    optimizer = AdamW(params, 0.9, 0.95, 1e-8, 0.1)
    micro = min(args.port_micro_batch, batch)  # parse_args: batch is a multiple of it
    step = TrainStep(CausalLMLoss(model, micro, args.train_seq), params, optimizer, use_jit=True)
    all_ids = make_prompts(batch, args.train_seq, cfg.vocab_size, args.seed + 1)
    pieces = [(ms.Tensor(all_ids[i:i + micro]), ms.Tensor(np.ones((micro, args.train_seq), np.float32)))
              for i in range(0, batch, micro)]  # the trainer's micro-batches of train.batch_size rows
    result["micro_batch"] = micro
    denominator = ms.Tensor(np.float32(batch * (args.train_seq - 1)))
    count = [0]

    def train_step() -> float:
        start = time.perf_counter()
        count[0] += 1
        _, _, applied = step.step(pieces, denominator, 1.0, 1.0, 1e-4, count[0])  # as LocalEngine.step
        if not applied:
            raise RuntimeError("non-finite training loss or gradients")
        return time.perf_counter() - start

    result["train"] = time_repeats(train_step, args.repeats, args.warm_up)
    return result


# ---- the PyTorch reference ----------------------------------------------------------------------------

def torch_worker(args) -> Dict:
    import torch
    from safetensors.numpy import load_file
    from transformers.generation.streamers import BaseStreamer

    from tests.torch_reference import llama_reference

    torch.set_num_threads(args.threads)
    cfg = get_config(args.size)
    model = llama_reference(cfg, load_file(args.weights), attn_implementation=args.torch_attention)
    model.generation_config.eos_token_id = None  # eos disabled: exactly new_tokens tokens (as the port)
    kind, batch = parse_measure(args.measure)
    result: Dict = {}
    if kind == "generate":
        class Clock(BaseStreamer):
            """generate() calls put() with the prompt, then once per new token: times the first and the last."""

            def __init__(self):
                self.calls, self.first, self.last = 0, None, None

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    self.first = time.perf_counter()
                self.last = time.perf_counter()

            def end(self):
                self.last = time.perf_counter()

        prompts = torch.from_numpy(make_prompts(batch, args.prompt_len, cfg.vocab_size, args.seed).astype(np.int64))

        def run(new_tokens: int) -> Dict[str, float]:
            clock = Clock()
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=cfg.pad_token_id, streamer=clock)
            assert out.shape[1] == args.prompt_len + new_tokens, "generation stopped early"
            result["tokens"] = out[0, args.prompt_len:].tolist()
            return {"prefill": clock.first - start, "decode": clock.last - clock.first}

        record_generation(result, run, args.repeats, args.new_tokens, args.warm_up)
        return result

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.from_numpy(make_prompts(batch, args.train_seq, cfg.vocab_size, args.seed + 1).astype(np.int64))

    def train_step() -> float:
        start = time.perf_counter()
        logits = model(ids).logits.float()  # [B,S,V]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise RuntimeError("non-finite training loss")
        return time.perf_counter() - start

    result["train"] = time_repeats(train_step, args.repeats, args.warm_up)
    return result


# ---- this machine's limits and kernels ------------------------------------------------------------------

VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16")
ONEDNN_PROBE = """
import numpy as np, mindspore as ms
ms.set_device("CPU")
a = ms.Tensor(np.ones((256, 256), np.float32))
ms.ops.MatMul(transpose_b=True)(a, a).asnumpy()
"""


def cpu_description() -> Dict:
    """CPU model name and which of VECTOR_FLAGS it has (from /proc/cpuinfo; empty elsewhere)."""
    model, flags = cpu_info()
    return {"model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def limits_worker(args) -> Dict:
    """fp32 matmul peak (PyTorch/MKL, --threads threads) and read bandwidth (1 and --threads threads);
    which matmul kernels each framework runs."""
    import torch

    def best(fn, repeats=5) -> float:
        fn()
        return min(timed(fn) for _ in range(repeats))

    torch.set_num_threads(args.threads)
    n = 3072
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul_flops = 2 * n ** 3 / best(lambda: torch.mm(a, b))
    del a, b
    data = torch.ones(128 * 1024 ** 2)  # 512 MiB of fp32, far beyond any cache
    bandwidth = {}
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        bandwidth[str(threads)] = data.numel() * 4 / best(lambda: data.sum())
    probe = subprocess.run([sys.executable, "-c", ONEDNN_PROBE], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, ONEDNN_VERBOSE="1", GLOG_v="3"))
    isa = [line.split("isa:")[1].strip() for line in probe.stdout.splitlines() if "isa:" in line]
    impl = [line.split(",")[6] for line in probe.stdout.splitlines() if ",exec,cpu,matmul," in line]
    config = torch.__config__.show()
    blas = next((part.split("=")[1] for part in config.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
                "unknown")
    return {"matmul_flops": matmul_flops, "read_bandwidth": bandwidth,
            "kernels": {"port": f"oneDNN {impl[0] if impl else 'not seen'} ({isa[0] if isa else 'isa not reported'})",
                        "torch": f"{blas} sgemm, CPU capability {torch.backends.cpu.get_cpu_capability()}"}}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


WORKERS = {"mindspore": mindspore_worker, "torch": torch_worker, "limits": limits_worker}


# ---- the parent: runs both workers and prints the table -------------------------------------------------

def run_worker(kind: str, args, weights: str, out_json: str, measure: str = "") -> Dict:
    """Run one worker as a child process; returns its result plus peak RSS and wall seconds."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--weights", weights,
               "--worker-out", out_json, "--measure", measure] + args.passthrough
    # the child runs in the temporary directory (MindSpore's compile files land there); PYTHONPATH names the
    # repository root so it imports tests/torch_reference.py (the project packages are pip-installed)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOG_v=os.environ.get("GLOG_v", "3"),
               PYTHONPATH=REPO_ROOT)
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=os.path.dirname(out_json))
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"error: the {kind} worker ({measure or 'limits'}) failed with exit code {code}")
    with open(out_json, encoding="utf-8") as f:
        result = json.load(f)
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["wall_s"] = time.perf_counter() - start
    return result


def measures(args) -> List[str]:
    return [f"generate:{b}" for b in args.batches] + [f"train:{b}" for b in args.train_batches]


# ---- the roofline ------------------------------------------------------------------------------------------

def matmul_weights(cfg) -> int:
    """Weights each token multiplies in the decoder layers (attention and SwiGLU projections)."""
    H, F = cfg.hidden_size, cfg.ffn_hidden_size
    return cfg.num_layers * (2 * H * H + 2 * cfg.kv_dim * H + 3 * H * F)


def forward_flops(cfg, batch: int, seq: int, head_positions: int) -> float:
    """One causal forward of [batch, seq]: 2 FLOPs per weight per token, the lm_head at head_positions per row,
    4 * hidden per (query, key <= query) pair per layer (scores and weighted values)."""
    pairs = seq * (seq + 1) // 2
    return batch * (2.0 * matmul_weights(cfg) * seq + 2.0 * cfg.vocab_size * cfg.hidden_size * head_positions
                    + 4.0 * cfg.num_layers * cfg.hidden_size * pairs)


def roofline_fraction(args, kind: str, batch: int, tokens_per_s: float, limits: Dict) -> float:
    """Achieved FLOP/s (prefill, train) or bytes/s (decode) over this machine's peak."""
    cfg = get_config(args.size)
    if kind == "prefill":
        per_token = forward_flops(cfg, batch, args.prompt_len, 1) / (batch * args.prompt_len)
        return tokens_per_s * per_token / limits["matmul_flops"]
    if kind == "train":
        per_token = 3 * forward_flops(cfg, batch, args.train_seq, args.train_seq) / (batch * args.train_seq)
        return tokens_per_s * per_token / limits["matmul_flops"]
    # decode: every step reads the fp32 weights once and each row's K/V cache (mean context over the steps)
    context = args.prompt_len + args.new_tokens / 2
    step_bytes = 4 * (matmul_weights(cfg) + cfg.vocab_size * cfg.hidden_size) + \
        batch * 2 * cfg.num_layers * cfg.kv_dim * context * 4
    bandwidth = limits["read_bandwidth"][str(args.threads)]
    return tokens_per_s / batch * step_bytes / bandwidth


def rows(args, port: Dict, ref: Dict, limits: Dict) -> List[Dict]:
    """One row per measurement: tokens/s of each side (median, min, max), the ratio of medians, each side's
    peak RSS (of the process that ran the measure) and fraction of its roofline."""
    table = []

    def add(name: str, kind: str, batch: int, tokens: int, measure: str, key: str):
        rate = lambda seconds: summarize([tokens / s for s in seconds])
        mine, theirs = rate(port[measure][key]), rate(ref[measure][key])
        table.append({"measure": name, "port_tokens_per_s": mine, "torch_tokens_per_s": theirs,
                      "ratio": mine["median"] / theirs["median"],
                      "peak_rss_bytes": {"port": port[measure]["peak_rss_bytes"], "torch": ref[measure]["peak_rss_bytes"]},
                      "roofline": {side: roofline_fraction(args, kind, batch, r["median"], limits)
                                   for side, r in (("port", mine), ("torch", theirs))}})

    for batch in args.batches:
        add(f"prefill b{batch} x {args.prompt_len}", "prefill", batch, batch * args.prompt_len,
            f"generate:{batch}", "prefill")
    for batch in args.batches:
        add(f"decode b{batch}, {args.new_tokens} new after {args.prompt_len}", "decode", batch,
            batch * (args.new_tokens - 1), f"generate:{batch}", "decode")
    for batch in args.train_batches:
        micro = port[f"train:{batch}"]["micro_batch"]  # the port's rows per forward + backward
        split = f", port {batch // micro} x b{micro}" if micro < batch else ""
        add(f"train step b{batch} x {args.train_seq}{split}", "train", batch, batch * args.train_seq,
            f"train:{batch}", "train")
    return table


def print_table(args, table: List[Dict], limits: Dict, cpu: Dict, agree: int) -> None:
    cfg = get_config(args.size)
    print(f"\nTeleChat2 {args.size} ({cfg.num_parameters() / 1e6:.1f}M parameters), fp32, CPU, {args.threads} "
          f"threads, {args.repeats} runs each after {args.warm_up} untimed; tokens/s as median [min, max]")
    print(f"CPU: {cpu['model']}; vector extensions: {' '.join(cpu['vector_extensions']) or 'none reported'}")
    print(f"matmul kernels: this port {limits['kernels']['port']}; PyTorch {limits['kernels']['torch']}")
    bw = limits["read_bandwidth"]
    print(f"limits: fp32 matmul {limits['matmul_flops'] / 1e9:.1f} GFLOP/s ({args.threads} threads); read bandwidth "
          + ", ".join(f"{bw[t] / 1e9:.1f} GB/s ({t} thread{'s' if t != '1' else ''})" for t in sorted(bw, key=int)))
    print(f"PyTorch reference: HF transformers LlamaForCausalLM, attention {args.torch_attention}\n")
    fmt = lambda r: f"{r['median']:9.1f} [{r['min']:.1f}, {r['max']:.1f}]"
    gib = lambda b: b / 1024 ** 3
    print(f"| {'measure':<36} | {'this port':<28} | {'PyTorch':<28} | ratio | peak RSS GiB | roofline |")
    print(f"|{'-' * 38}|{'-' * 30}|{'-' * 30}|-------|--------------|----------|")
    for row in table:
        rss, roof = row["peak_rss_bytes"], row["roofline"]
        print(f"| {row['measure']:<36} | {fmt(row['port_tokens_per_s']):<28} | {fmt(row['torch_tokens_per_s']):<28} "
              f"| {row['ratio']:5.2f} | {gib(rss['port']):5.2f} / {gib(rss['torch']):4.2f} "
              f"| {100 * roof['port']:3.0f}% / {100 * roof['torch']:2.0f}% |")
    print("\npeak RSS: of the process that ran the measure (this port / PyTorch); roofline: FLOP/s over the matmul "
          "peak (prefill, train) or bytes/s over the all-thread read bandwidth (decode), this port / PyTorch")
    print(f"greedy tokens of the first prompt equal between the two: first {agree} of {args.new_tokens}")


def leading_agreement(a: List[int], b: List[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="bench_100m", help="model size from the registry (default bench_100m)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after the warm-up")
    p.add_argument("--warm-up", type=int, default=6,
                   help="untimed runs first, both frameworks (default 6: the first compiles; MindSpore's CPU kernels "
                        "run their first 5 launches on one thread, see the module docstring)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes for prefill and decode")
    p.add_argument("--train-batches", type=int, nargs="+", default=[1, 4], help="batch sizes of the training step")
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--port-micro-batch", type=int, default=1,
                   help="rows per forward + backward of this port's training step (the trainer's train.batch_size); "
                        "a step of more rows runs its micro-batches into the gradient accumulators, as the trainer "
                        "does. Default 1: leaner on CPU than one graph of several rows (bench_100m at 4 x 512: "
                        "3.60 against 6.30 GiB), at a similar speed")
    p.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "eager"],
                   help="HF attention implementation of the reference (default sdpa, HF's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--measure", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.new_tokens < 2 or min(args.warm_up, args.prompt_len, args.repeats, args.threads, args.port_micro_batch) < 1:
        p.error("--new-tokens must be >= 2 and --warm-up, --prompt-len, --repeats, --threads, --port-micro-batch >= 1")
    uneven = [b for b in args.train_batches if b % min(args.port_micro_batch, b)]
    if uneven:
        p.error(f"--train-batches {uneven} are not multiples of --port-micro-batch {args.port_micro_batch}")
    try:
        get_config(args.size)
    except ConfigError as err:  # an unknown size: one line naming the known ones
        p.error(str(err))
    if min(args.batches + args.train_batches) < 1:
        p.error("--batches and --train-batches must be >= 1")
    skip = {"--json", "--worker", "--weights", "--worker-out", "--measure"}
    args.passthrough = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if flag in skip or key == "passthrough" or value is None:
            continue
        args.passthrough += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        result = WORKERS[args.worker](args)
        with open(args.worker_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_speed_") as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        print("measuring this machine's limits ...", flush=True)
        limits = run_worker("limits", args, weights, os.path.join(tmp, "limits.json"))
        port, ref = {}, {}
        for measure in measures(args):  # this port then PyTorch, each measure in a process of its own
            print(f"running {measure} on {args.size}: this port (MindSpore) ...", flush=True)
            port[measure] = run_worker("mindspore", args, weights, os.path.join(tmp, "mindspore.json"), measure)
            print(f"running {measure} on {args.size}: the PyTorch reference ...", flush=True)
            ref[measure] = run_worker("torch", args, weights, os.path.join(tmp, "torch.json"), measure)
    table = rows(args, port, ref, limits)
    first = f"generate:{args.batches[0]}"
    agree = leading_agreement(port[first]["tokens"], ref[first]["tokens"])
    cpu = cpu_description()
    print_table(args, table, limits, cpu, agree)
    report = {"size": args.size, "parameters": get_config(args.size).num_parameters(), "threads": args.threads,
              "repeats": args.repeats, "warm_up": args.warm_up, "port_micro_batch": args.port_micro_batch,
              "torch_attention": args.torch_attention, "rows": table,
              "greedy_tokens_agree": agree, "machine": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu,
              "limits": limits, "worker_wall_s": {m: {"port": port[m]["wall_s"], "torch": ref[m]["wall_s"]}
                                                  for m in port},
              "total_wall_s": time.perf_counter() - started}
    print(json.dumps(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(f"total {report['total_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
