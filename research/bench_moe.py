"""Tokens/s of one mixture-of-experts block, forward + backward, this port against transformers' PyTorch
Qwen2MoeSparseMoeBlock holding the same weights, in one run (each side in its own process, one after the other).

    GLOG_v=3 .venv/bin/python research/bench_moe.py                  # about 2 minutes on 2 cores

The block is Qwen2-MoE's (fp32 router, softmax over all experts, top-k without renormalisation, SwiGLU experts,
a shared expert under a sigmoid gate) at the widths below (default: hidden 512, 16 experts, top-4, expert width
256, shared expert 1024, 4 x 512 tokens: Qwen2-57B-A14B's ratios scaled down). One iteration: the block's
output on [B, S, H] random activations, the sum of (output * a fixed random tensor) as the loss, and the
gradients of every weight and of the input. Ours runs compiled (ms.jit of value_and_grad over the block), the
reference in torch eager (transformers' own code: it loops over the experts that received tokens and runs
each on its own rows). Both outputs are checked equal (max abs difference printed) before timing. Reported:
median seconds per iteration over --iters after --warmup, and tokens/s = B*S / median.

This port runs twice: dropless (its default: every expert on every token, the unchosen weighted by 0, static
shapes under the compiler, so E/k times the routed expert work; transformers gathers each expert's rows instead)
and with `moe_capacity_factor` --capacity_factor (each expert on ceil(c x k x tokens / E) slots, the tokens past
them dropped: MindFormers' capacity factor; its output differs from the dropless reference by the dropped pairs,
whose share is printed). Results go to research/results/bench_moe.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: dict, capacity_factor: float = 0.0):
    from telechat2_ms.config import get_config

    return get_config("qwen2_moe_tiny", hidden_size=spec["hidden"], num_experts=spec["experts"],
                      num_experts_per_tok=spec["top_k"], moe_ffn_hidden_size=spec["expert_width"],
                      shared_expert_ffn_hidden_size=spec["shared_width"], num_heads=8, num_kv_heads=8,
                      moe_capacity_factor=capacity_factor)


def _inputs(spec: dict):
    import numpy as np

    rng = np.random.default_rng(1)
    shape = (spec["batch"], spec["seq"], spec["hidden"])
    return rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)


def _weights(spec: dict) -> dict:
    """The block's weights (MindFormers' names, stacked experts), drawn once from a seed."""
    import numpy as np

    rng = np.random.default_rng(0)
    E, H, F, S = spec["experts"], spec["hidden"], spec["expert_width"], spec["shared_width"]

    def draw(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05))

    return {"routed_experts.router.dense.weight": draw(E, H), "routed_experts.ffn.w1.weight": draw(E, F, H),
            "routed_experts.ffn.w3.weight": draw(E, F, H), "routed_experts.ffn.w2.weight": draw(E, H, F),
            "shared_experts.w1.weight": draw(S, H), "shared_experts.w3.weight": draw(S, H),
            "shared_experts.w2.weight": draw(H, S), "shared_experts_gate.weight": draw(1, H)}


def _timed(run, spec: dict):
    for _ in range(spec["warmup"]):
        run()
    times = []
    for _ in range(spec["iters"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def ours(spec: dict, capacity_factor: float = 0.0) -> dict:
    import mindspore as ms
    from mindspore import Tensor, ops

    from telechat2_ms.layers import ParamInit, SharedExpertMoE, capacity_slots, expert_capacity

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = _config(spec, capacity_factor)
    block = SharedExpertMoE(cfg, ParamInit(0))
    weights = _weights(spec)
    for name, param in block.parameters_and_names():
        param.set_data(Tensor(weights[name]))
    x, probe = (Tensor(a) for a in _inputs(spec))
    params = ms.ParameterTuple(block.trainable_params())

    def loss_fn(x, probe):
        out, _, _ = block(x)
        return ops.reduce_sum(out * probe), out

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, 0, params, has_aux=True))

    def run():
        (loss, out), grads = grad_fn(x, probe)
        return float(loss.asnumpy()), out

    _, out = run()
    dropped = 0.0
    if capacity_factor:
        tokens = spec["batch"] * spec["seq"]
        combine = block.routed_experts.gate(ops.reshape(x, (tokens, spec["hidden"])))[0]
        kept = capacity_slots(combine, expert_capacity(tokens, cfg))[2]
        dropped = 1.0 - float((kept.asnumpy() > 0).sum()) / (tokens * cfg.num_experts_per_tok)
    return {"median_s": _timed(lambda: run(), spec), "output": out.asnumpy().tolist(), "dropped": dropped}


def reference(spec: dict) -> dict:
    import torch
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = _config(spec)
    from transformers import Qwen2MoeConfig

    conf = Qwen2MoeConfig(hidden_size=cfg.hidden_size, num_experts=cfg.num_experts,
                          num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                          shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size, norm_topk_prob=False)
    block = Qwen2MoeSparseMoeBlock(conf).float()
    w = {k: torch.from_numpy(v) for k, v in _weights(spec).items()}
    block.load_state_dict({
        "gate.weight": w["routed_experts.router.dense.weight"],
        "experts.gate_up_proj": torch.cat([w["routed_experts.ffn.w1.weight"], w["routed_experts.ffn.w3.weight"]], 1),
        "experts.down_proj": w["routed_experts.ffn.w2.weight"],
        "shared_expert.gate_proj.weight": w["shared_experts.w1.weight"],
        "shared_expert.up_proj.weight": w["shared_experts.w3.weight"],
        "shared_expert.down_proj.weight": w["shared_experts.w2.weight"],
        "shared_expert_gate.weight": w["shared_experts_gate.weight"]}, strict=True)
    x_np, probe_np = _inputs(spec)
    probe = torch.from_numpy(probe_np)

    def run():
        block.zero_grad(set_to_none=True)
        x = torch.from_numpy(x_np).requires_grad_(True)
        out = block(x)
        out = out[0] if isinstance(out, tuple) else out
        (out * probe).sum().backward()
        return out

    out = run()
    return {"median_s": _timed(run, spec), "output": out.detach().numpy().tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top_k", type=int, default=4)
    parser.add_argument("--expert_width", type=int, default=256)
    parser.add_argument("--shared_width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--capacity_factor", type=float, default=1.2, help="the capacity run's factor (MindFormers' "
                                                                           "39B fine-tune: 1.2)")
    parser.add_argument("--output", default=os.path.join(REPO, "research", "results", "bench_moe.json"))
    parser.add_argument("--worker", choices=("ours", "capacity", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, REPO)
        with open(args.spec, encoding="utf-8") as f:
            spec = json.load(f)
        result = (reference(spec) if args.worker == "reference" else
                  ours(spec, spec["capacity_factor"] if args.worker == "capacity" else 0.0))
        with open(args.spec + "." + args.worker, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    import numpy as np

    spec = {k: getattr(args, k) for k in ("hidden", "experts", "top_k", "expert_width", "shared_width", "batch",
                                          "seq", "warmup", "iters", "capacity_factor")}
    tokens = spec["batch"] * spec["seq"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = os.path.join(tmp, "spec.json")
        with open(spec_file, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        for side in ("ours", "capacity", "reference"):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", side, "--spec", spec_file],
                           check=True, cwd=tmp, env=dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3")))
            with open(spec_file + "." + side, encoding="utf-8") as f:
                results[side] = json.load(f)
    theirs = np.array(results["reference"].pop("output"))
    difference = float(np.abs(np.array(results["ours"].pop("output")) - theirs).max())
    capacity_difference = float(np.abs(np.array(results["capacity"].pop("output")) - theirs).max())
    report = {"spec": spec, "tokens": tokens, "max_abs_output_difference": difference,
              "capacity_max_abs_output_difference": capacity_difference,
              "capacity_dropped_pairs": round(results["capacity"]["dropped"], 4)}
    for side in ("ours", "capacity", "reference"):
        median = results[side]["median_s"]
        report[side] = {"median_s_per_iter": round(median, 4), "tokens_per_s": round(tokens / median, 1)}
    for side in ("ours", "capacity"):
        report[f"{side}_vs_reference"] = round(report[side]["tokens_per_s"] / report["reference"]["tokens_per_s"], 3)
    print(f"MoE block fwd+bwd, {tokens} tokens, hidden {spec['hidden']}, {spec['experts']} experts top-{spec['top_k']}"
          f", expert width {spec['expert_width']}, shared {spec['shared_width']} (fp32, CPU)")
    print(f"  dropless outputs agree with transformers to {difference:.2e} (max abs); capacity "
          f"{spec['capacity_factor']}: {100 * report['capacity_dropped_pairs']:.1f}% of the (token, expert) pairs "
          f"dropped, max abs difference {capacity_difference:.2e}")
    for side, label in (("ours", "this port, dropless (ms.jit)"), ("capacity", f"this port, capacity {spec['capacity_factor']}"),
                        ("reference", "transformers (torch eager)")):
        ratio = f"  {report[side + '_vs_reference']:.2f}x" if side != "reference" else ""
        print(f"  {label:32s} {report[side]['median_s_per_iter']:.3f} s/iter  {report[side]['tokens_per_s']:9.1f} tok/s"
              f"{ratio}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
