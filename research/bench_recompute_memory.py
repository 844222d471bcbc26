"""Activation memory per decoder layer under train.recompute none / selective / full, measured on the CPU and
set beside the cost model's figure for the same shapes (telechat2_ms/cost_model.py, layer_activation_bytes).

    GLOG_v=3 .venv/bin/python research/bench_recompute_memory.py                 # about 5 minutes

Each case is its own process: a model of the given widths with L decoder layers (random fp32 weights, vocabulary
small so the logits do not dominate), the trainer's recompute marks (train/engine.apply_recompute), and one
forward + backward of the training loss (train/step.TrainStep.micro_step: value_and_grad into the gradient
accumulators), in PyNative (the trainer's jit=false) and compiled with ms.jit (jit=true). The process
reports its peak RSS (ru_maxrss). Everything that does not grow with the layer count (MindSpore itself, the
embedding, the logits, the compiled graph's fixed buffers) cancels in the slope between L_low and L_high layers:

    per layer = (peak(L_high) - peak(L_low)) / (L_high - L_low)  -  4 x P

with P the bytes of one layer's fp32 parameters: its weights, gradient accumulators and AdamW's two moments
exist all through the step. The gradients of a layer are produced as its activations are released, so the
figure may hold up to one more P. The cost model's figure is for the plain kernels the CPU runs
(fused_kernels=False: fp32 probabilities, no FlashAttention statistics) in fp32; its MEASURED_CPU_LAYER_ACTIVATION
holds the PyNative figures of the default shapes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
MODES = ("none", "selective", "full")


def widths(args) -> dict:
    return dict(hidden_size=args.hidden, num_heads=args.heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab)


def as_worker(spec: dict) -> dict:
    """One forward + backward at `spec`'s shapes -> peak RSS and the layer parameter count."""
    sys.path.insert(0, REPO)
    import numpy as np
    import mindspore as ms

    from telechat2_ms.config import get_config
    from telechat2_ms.layers import use_training_kernels
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.train.engine import apply_recompute
    from telechat2_ms.train.loss import CausalLMLoss
    from telechat2_ms.train.optim import AdamW
    from telechat2_ms.train.step import TrainStep

    ms.set_context(mode=ms.GRAPH_MODE if spec["jit"] else ms.PYNATIVE_MODE, device_target="CPU")
    cfg = get_config("tiny", num_layers=spec["layers"], **spec["widths"])
    model = Telechat2ForCausalLM(cfg, "float32", seed=0)
    apply_recompute(model, spec["recompute"])
    use_training_kernels(model, compiled=spec["jit"])  # the trainer's forms (train/engine.LocalEngine)
    params = [p for p in model.trainable_params()]
    step = TrainStep(CausalLMLoss(model, spec["batch"], spec["seq"]), params, AdamW(params), spec["jit"])
    rng = np.random.default_rng(0)
    ids = ms.Tensor(rng.integers(0, cfg.vocab_size, (spec["batch"], spec["seq"])).astype(np.int32))
    mask = ms.Tensor(np.ones((spec["batch"], spec["seq"]), np.float32))
    one = ms.Tensor(np.float32(1.0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = float(step.micro_step(ids, mask, ms.Tensor(np.float32(ids.size)), one).asnumpy())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layer_params = sum(int(np.prod(p.shape)) for name, p in model.parameters_and_names() if ".layers.0." in name)
    return {"peak": peak, "before_step": before, "loss": loss, "layer_params": layer_params}


def run_case(spec: dict, timeout: int) -> dict:
    with tempfile.TemporaryDirectory() as cwd:  # MindSpore compiles into the working directory
        proc = subprocess.run(["timeout", str(timeout), sys.executable, os.path.abspath(__file__), "--as-worker",
                               json.dumps(spec)], cwd=cwd, capture_output=True, text=True,
                              env=dict(os.environ, GLOG_v="3"))
    if proc.returncode != 0:
        raise SystemExit(f"error: case {spec} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cost_model_bytes(spec: dict, recompute: str) -> float:
    sys.path.insert(0, REPO)
    from telechat2_ms import cost_model as cm
    from telechat2_ms.config import get_config

    cfg = get_config("tiny", num_layers=spec["layers"], **spec["widths"])
    lay = cm.Layout(micro_batch_size=spec["batch"], seq_length=spec["seq"], compute_dtype="float32",
                    fused_kernels=False)
    return cm.layer_activation_bytes(cfg, lay, recompute)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--as-worker", dest="worker", help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--layers", type=int, nargs=2, default=(2, 10), metavar=("L_LOW", "L_HIGH"))
    p.add_argument("--modes", nargs="+", choices=("pynative", "jit"), default=("pynative", "jit"))
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--output", default=os.path.join(REPO, "research", "results", "bench_recompute_memory.json"))
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(as_worker(json.loads(args.worker))))
        return 0
    print(f"shapes: hidden {args.hidden}, heads {args.heads}, ffn {args.ffn}, vocab {args.vocab}, batch {args.batch}, "
          f"seq {args.seq}, fp32; layers {args.layers[0]} and {args.layers[1]}", flush=True)
    print(f"{'run':<9} {'recompute':<10} {'peak L_low':>11} {'peak L_high':>12} {'measured/layer':>15} "
          f"{'cost model':>11} {'model/measured':>15}", flush=True)
    rows = []
    for run in args.modes:
        base = {"widths": widths(args), "batch": args.batch, "seq": args.seq, "jit": run == "jit"}
        for mode in MODES:
            started = time.perf_counter()
            low, high = (run_case(dict(base, layers=n, recompute=mode), args.timeout) for n in args.layers)
            layer_bytes = 4 * low["layer_params"]
            measured = (high["peak"] - low["peak"]) / (args.layers[1] - args.layers[0]) - 4 * layer_bytes
            model = cost_model_bytes(dict(base, layers=args.layers[0]), mode)
            rows.append({"run": run, "recompute": mode, "peak_low": low["peak"], "peak_high": high["peak"],
                         "measured_per_layer": measured, "cost_model_per_layer": model,
                         "layer_param_bytes": layer_bytes, "loss": [low["loss"], high["loss"]],
                         "seconds": time.perf_counter() - started})
            print(f"{run:<9} {mode:<10} {low['peak'] / MIB:>9.1f} M {high['peak'] / MIB:>10.1f} M "
                  f"{measured / MIB:>13.1f} M {model / MIB:>9.1f} M {model / measured:>15.2f}", flush=True)
    print(f"(M = MiB; one layer's fp32 parameters P = {rows[0]['layer_param_bytes'] / MIB:.1f} MiB, of which up to "
          f"one more copy, the layer's gradients, may be in the measured figure)")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    os.replace(args.output + ".tmp", args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
