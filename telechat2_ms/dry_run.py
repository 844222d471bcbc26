"""`--dry_run`: what a run would be, without building anything big.

After the one validation pass (build.plan_run) it prints the layout, the batch arithmetic, where the weights
come from, each pipeline stage's layers with the per-rank parameter shapes (read from a lazy skeleton of the
model, which allocates no weight storage) and the cost model's memory and step-time prediction for Atlas
800T A2 (telechat2_ms/cost_model.py). Without msrun the world size comes from `--world_size`.
"""
from __future__ import annotations

from typing import List

from telechat2_ms.build import RunPlan
from telechat2_ms.config import ConfigError
from telechat2_ms.parallel import plan as tp_plan
from telechat2_ms.rope import describe_rope
from telechat2_ms.settings import TRAIN_RUN_MODES, global_batch

GIB = 1024 ** 3


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _parameter_lines(run: RunPlan) -> List[str]:
    """Per-rank shapes of the embedding, one decoder layer and the head, and parameters per rank by stage."""
    from telechat2_ms.build import build_skeleton

    skeleton = build_skeleton(run, lazy=True)
    shapes = {name: tuple(p.shape) for name, p in skeleton.parameters_and_names()}
    dims, cfg = run.dims, run.config
    ranges = dims.stage_layer_ranges(cfg.num_layers)
    experts = f", expert parallel {dims.ep}" if dims.ep > 1 else ""
    lines = [f"per-rank parameter shapes (tensor parallel {dims.tp}{experts}; layer 0 stands for every layer):"]
    for name, shape in shapes.items():
        layer = tp_plan.layer_index(name)
        if layer not in (None, 0):
            continue
        local = tp_plan.rank_shape(name, shape, dims.tp, cfg.num_kv_heads, dims.ep)
        lines.append(f"  {name:45s} {_shape(shape):>16s} -> {_shape(local)}")
    for stage, (first, end) in enumerate(ranges):
        count = sum(int(_numel(tp_plan.rank_shape(n, s, dims.tp, cfg.num_kv_heads, dims.ep))) for n, s in shapes.items()
                    if stage in tp_plan.param_stages(n, ranges, cfg.tie_word_embeddings))
        ranks = [r for r in range(dims.world) if dims.coords(r).pp == stage]
        lines.append(f"stage {stage}: layers {first}..{end - 1} ({end - first}), ranks {ranks[0]}..{ranks[-1]}, "
                     f"{count:,} parameters per rank ({count * 4 / GIB:.2f} GiB in fp32)")
    return lines


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _cost_lines(run: RunPlan) -> List[str]:
    from telechat2_ms import cost_model as cm

    lay = cm.layout_from_settings(run.settings)
    try:
        stages = cm.memory_by_stage(run.config, lay)
    except ConfigError as err:
        return [f"cost model: no prediction for this layout ({err})"]
    hw = cm.ATLAS_800T_A2
    worst = max(stages, key=lambda r: r.total)
    lines = [f"cost model ({hw.name}, per device, worst stage {worst.stage}; telechat2_ms/cost_model.py):",
             f"  memory {worst.total / GIB:.1f} GiB of {hw.usable_bytes / GIB:.0f} GiB usable "
             f"({'fits' if worst.fits(hw) else 'DOES NOT FIT'}): weights {worst.weights / GIB:.1f}, gradients "
             f"{worst.grads / GIB:.1f}, optimizer {worst.optimizer / GIB:.1f}, activations "
             f"{worst.activations / GIB:.1f}, logits {worst.logits / GIB:.1f}, KV cache {worst.kv_cache / GIB:.1f}, "
             f"overhead {worst.overhead / GIB:.1f}"]
    if lay.mode == "train":
        try:
            t = cm.step_time(run.config, lay)
        except ConfigError as err:
            return lines + [f"  step time: no prediction ({err})"]
        lines.append(f"  step {t.step_time:.2f} s ({t.tokens_per_step:,} tokens), {t.tokens_per_s_per_device:.0f} "
                     f"tokens/s per device, MFU {100 * t.mfu:.1f}%: compute {t.compute:.2f}, tp/sp {t.tp_comm:.2f}, "
                     f"{f'ep {t.ep_comm:.2f}, ' if run.config.num_experts else ''}"
                     f"cp {t.cp_comm:.2f}, p2p {t.pp_comm:.2f}, bubble {t.bubble:.2f}, dp {t.dp_comm:.2f}, "
                     f"AdamW {t.optimizer:.3f} s")
    return lines


def report(run: RunPlan) -> str:
    s, dims = run.settings, run.dims
    source = {"none": "none (random initialisation from train.seed)", "file": f"file {run.ref.weights}",
              "dir": f"directory {run.ref.path} ({run.ref.weights})",
              "layout": f"per-rank layout {run.ref.path} (tp {dims.tp}, pp {dims.pp})"}[run.ref.kind]
    lines = [f"dry run: {s.run_mode} of {run.config.name} on {s.device_target} ({s.compute_dtype}), "
             f"world {run.world}: {dims.describe()}",
             f"weights: {source}; architecture from "
             f"{'the checkpoint' if run.ref.config is not None else 'the registry size ' + repr(s.model)}",
             describe_rope(run.config)]
    if s.run_mode in TRAIN_RUN_MODES:
        p, t = s.parallel_config, s.train
        lines.append(f"global batch: data_parallel {p.data_parallel} x micro_batch_num {p.micro_batch_num} x "
                     f"grad_accum_steps {t.grad_accum_steps} x batch_size {t.batch_size} = {global_batch(s)} "
                     f"sequences of {s.seq_length} tokens per step")
    else:
        lines.append(f"context: {s.seq_length} tokens")
    if s.run_mode == "serve":
        v = s.serve
        lines.append(f"serve: http://{v.host}:{v.port}/v1 as {v.served_model_name or run.config.name!r}, "
                     f"{v.max_batch} rows of KV cache decoded together, at most {v.queue_size} waiting")
    lines += _parameter_lines(run) + _cost_lines(run)
    lines.append("dry run: settings valid; nothing was built or loaded")
    return "\n".join(lines)
