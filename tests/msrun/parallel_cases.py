"""Shared pieces of the parallel training checks: the tiny model, the fixed batch, the single-process
reference step, the layouts, and merging per-rank parameter dumps back into full tensors.

Imported by the msrun worker (tests/msrun/worker_parallel.py, as a sibling module) and by the pytest files
(as tests.msrun.parallel_cases).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from telechat2_ms.config import get_config
from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.parallel.dims import ParallelDims
from telechat2_ms.parallel.parallelize import parallelize_telechat2
from telechat2_ms.parallel.plan import merge_shards

BATCH, SEQ, SEED, LR = 4, 16, 7, 0.5
CLIP = 0.5  # global-norm clipping in every training case (the tests check the norm exceeds it)
# AdamW cases: ADAMW_STEPS steps on the same batch (the 2nd step uses the moments of the 1st). eps 1e-3, as for
# LoRA and MoE below: at 1e-6, m / (sqrt(v) + eps) has a gain of up to lr / eps on a gradient element near eps, so the
# ~1e-9 summation-order noise of such an element (-2.5e-7 in dp2_zero's first step) moved wo.weight by 1.05e-4 of its
# largest value on an AVX2 CPU; at 1e-3 dp2_zero's and dp2_tp2_sp_zero's parameters are within 5.1e-6 and their
# updates 3.8e-5 (measured), and the tests hold them to the plain layouts' 1e-4
ADAMW = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-3, weight_decay=0.1)
ADAMW_STEPS = 2

# layout name -> ParallelDims keyword arguments
LAYOUTS: Dict[str, dict] = {
    "dp2": dict(dp=2, micro_batch_num=2),
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2": dict(pp=2, micro_batch_num=4),
    "cp2": dict(cp=2),
    "tp2_pp2": dict(tp=2, pp=2, micro_batch_num=4),
    "dp2_zero": dict(dp=2, micro_batch_num=2, optimizer_shard=True),
    "dp2_tp2_sp_zero": dict(dp=2, tp=2, sp=True, optimizer_shard=True),
}
ADAMW_LAYOUTS = ("dp2_zero", "dp2_tp2_sp_zero")
# generation layouts (worker task generate:LAYOUT): tensor parallel, pipeline stages in turn, both
GENERATE_LAYOUTS: Dict[str, dict] = {"tp2": dict(tp=2), "pp2": dict(pp=2, micro_batch_num=2),
                                     "tp2_pp2": dict(tp=2, pp=2, micro_batch_num=2),
                                     "qwen2_kv1_tp2": dict(tp=2)}  # AdamW (sharded states); the others one SGD step
# chat under tp2 (worker task chat:tp2) and in one process (the test): run_chat arguments and typed lines
CHAT_ARGS = ["--seq_length=128", "--generate.max_new_tokens=6"]
CHAT_INPUT = "hello\nhow are you\n/exit\n"
# predict under dp2 (worker task predict:dp2: replicas split the prompts) and in one process (the test)
PREDICT_ARGS = ["--seq_length=128", "--generate.max_new_tokens=6", "--jit=false",
                '--predict_data=["What is 3 plus 4?", "hi", "Tell me a story"]']
# the train run mode under a layout (worker task trainer:LAYOUT) and in one process (the test): run settings
TRAIN_ARGS = ["--train.train_dataset=demo:64", "--seq_length=64", "--train.truncation=truncate",
              "--train.batch_size=2", "--train.total_steps=2", "--train.learning_rate=1e-2",
              "--train.min_learning_rate=1e-3", "--train.eps=1e-6", "--train.grad_clip=0.5", "--jit=false"]
# layout -> (settings of both runs, the layout's parallel_config under msrun): the same global batch in both
TRAINER_LAYOUTS = {
    "tp2": ([], ["--parallel_config.model_parallel=2"]),
    "qwen2_tied_pp2": (["--model=qwen2_tiny", "--parallel_config.micro_batch_num=2"],
                       ["--parallel_config.pipeline_stage=2"]),
    # LoRA (rank 4 on every projection; the adapters sharded with their projections). AdamW's eps 1e-3: at 1e-6
    # it turns the reduction-order noise of gradient elements near eps into update noise (module docstring of
    # test_parallel_msrun.py), which the 1e-6 check of the merged weights would see
    "lora_tp2": (["--train.lora_rank=4", "--train.eps=1e-3"], ["--parallel_config.model_parallel=2"]),
    "lora_pp2": (["--train.lora_rank=4", "--train.eps=1e-3", "--parallel_config.micro_batch_num=2"],
                 ["--parallel_config.pipeline_stage=2"]),
    # selective recompute (attention blocks recomputed) with one pipeline stage
    "selective_tp2": (["--train.recompute=selective"], ["--parallel_config.model_parallel=2"]),
    # float16 with a loss scale that overflows the first steps (test_fp16_loss_scaling_...)
    "fp16_tp2": (["--compute_dtype=float16", "--train.loss_scale=262144", "--train.total_steps=4"],
                 ["--parallel_config.model_parallel=2"]),
    "fp16_pp2": (["--compute_dtype=float16", "--train.loss_scale=262144", "--train.total_steps=4",
                  "--parallel_config.micro_batch_num=2"], ["--parallel_config.pipeline_stage=2"]),
    # compiled (settings.jit): each stage's forward and backward as graphs, in one process the compiled TrainStep
    "jit_pp2": (["--jit=true", "--parallel_config.micro_batch_num=2"], ["--parallel_config.pipeline_stage=2"]),
}
FP16_TRAINER_LAYOUTS = ("fp16_tp2", "fp16_pp2")
# the train run mode of a mixture-of-experts model (tests/test_moe_msrun.py), from the checkpoint save_moe_init
# writes: experts over ep2 inside dp2, one sequence per replica, so a global micro-batch is the single process's
# micro-batch of 2 sequences (the load-balancing loss is taken over the same rows); and dp2 x ep2 x tp2 on 4.
# AdamW's eps 1e-3 as for LoRA above: at 1e-6 the reduction-order noise of gradient elements near eps becomes
# update noise (1.4e-3 of the embedding's largest update after 3 steps, measured)
MOE_TRAINER_LAYOUTS = {
    "moe_ep2": (["--train.total_steps=3", "--train.eps=1e-3"], ["--parallel_config.data_parallel=2", "--parallel_config.expert_parallel=2",
                                            "--train.batch_size=1"]),
    "moe_ep2_tp2": (["--train.total_steps=3", "--train.eps=1e-3"], ["--parallel_config.data_parallel=2",
                                                "--parallel_config.expert_parallel=2",
                                                "--parallel_config.model_parallel=2", "--train.batch_size=1"]),
}


def moe_init_path(out_dir: str) -> str:
    return os.path.join(out_dir, "moe_init")


def save_moe_init(out_dir: str) -> str:
    """The tiny TeleChat2-MoE of model_config("moe") (weights drawn with std 0.25: uneven routing, no near-ties
    between experts) saved with its config.json, for the MoE train run mode."""
    from telechat2_ms.checkpoint import save_model

    model = build_model("moe")
    return save_model(model, moe_init_path(out_dir), model.config)


# layouts of another family: layout name -> model (MODELS); the rest use "tiny"
LAYOUT_MODELS = {"qwen2_tp2": "qwen2", "qwen2_pp2": "qwen2", "qwen2_kv1_tp2": "qwen2_kv1",
                 "qwen2_tied_tp2": "qwen2_tiny", "qwen2_tied_pp2": "qwen2_tiny", "qwen2_tied_tp2_pp2": "qwen2_tiny"}
LAYOUTS.update({"qwen2_tp2": dict(tp=2), "qwen2_pp2": dict(pp=2, micro_batch_num=4), "qwen2_kv1_tp2": dict(tp=2),
                "qwen2_tied_tp2": dict(tp=2), "qwen2_tied_pp2": dict(pp=2, micro_batch_num=4),
                "qwen2_tied_tp2_pp2": dict(tp=2, pp=2, micro_batch_num=4)})
GENERATE_LAYOUTS["qwen2_tied_pp2"] = dict(pp=2, micro_batch_num=2)  # the head on stage 1 is the embedding's copy
# mixture of experts (parallel/experts.py): TeleChat2-MoE ("moe": 4 experts, top-2, down biases) and Qwen2-MoE
# ("qwen2_moe": shared expert, layer 1 dense) with the experts split over ep2 (inside dp2), also with tp2 inside
# every expert; moe_dp2 keeps every expert on both replicas (the aux loss still over the global batch)
LAYOUTS.update({"moe_dp2": dict(dp=2), "moe_ep2": dict(dp=2, ep=2), "qwen2_moe_ep2": dict(dp=2, ep=2),
                "moe_cap_ep2": dict(dp=2, ep=2), "moe_cap_ep2_tp2": dict(dp=2, ep=2, tp=2),
                "moe_ep2_tp2": dict(dp=2, ep=2, tp=2), "qwen2_moe_ep2_tp2": dict(dp=2, ep=2, tp=2)})
LAYOUT_MODELS.update({"moe_cap_ep2": "moe_cap", "moe_cap_ep2_tp2": "moe_cap", "moe_dp2": "moe", "moe_ep2": "moe", "moe_ep2_tp2": "moe", "qwen2_moe_ep2": "qwen2_moe",
                      "qwen2_moe_ep2_tp2": "qwen2_moe"})
GENERATE_LAYOUTS.update({"moe_ep2": dict(dp=2, ep=2), "qwen2_moe_ep2": dict(dp=2, ep=2)})
# MoE under pipeline stages: each stage adds the load-balancing loss of its own layers, per global micro-batch
# (aux_groups); the references of these layouts are taken over the same row groups (reference:moe@LAYOUT)
LAYOUTS.update({"moe_pp2": dict(pp=2, micro_batch_num=2), "moe_ep2_pp2": dict(dp=2, ep=2, pp=2, micro_batch_num=2)})
LAYOUT_MODELS.update({"moe_pp2": "moe", "moe_ep2_pp2": "moe"})
GROUPED_AUX_LAYOUTS = ("moe_pp2", "moe_ep2_pp2")
# the same step compiled (parallelize.TelechatParallel.compiled: each stage's forward and backward one ms.jit graph):
# LAYOUT_jit runs LAYOUT's step so, and must give what the PyNative LAYOUT gives; every training layout (cp2 with
# RingAttention's ring compiled too)
COMPILED_LAYOUTS = tuple(LAYOUTS)
for _name in COMPILED_LAYOUTS:
    LAYOUTS[_name + "_jit"] = LAYOUTS[_name]
    if _name in LAYOUT_MODELS:
        LAYOUT_MODELS[_name + "_jit"] = LAYOUT_MODELS[_name]
ADAMW_LAYOUTS = ADAMW_LAYOUTS + tuple(name + "_jit" for name in ADAMW_LAYOUTS)
GROUPED_AUX_LAYOUTS = GROUPED_AUX_LAYOUTS + tuple(name + "_jit" for name in GROUPED_AUX_LAYOUTS
                                                  if name in COMPILED_LAYOUTS)


def parallelize_layout(layout: str, model=None):
    """parallelize_telechat2 of LAYOUT's model (or `model`) under its dims, compiled for a LAYOUT_jit."""
    parallel = parallelize_telechat2(model if model is not None else build_model(LAYOUT_MODELS.get(layout, "tiny")),
                                     ParallelDims(**LAYOUTS[layout]))
    parallel.compiled = layout.endswith("_jit")
    return parallel


def model_config(model: str = "tiny"):
    """"tiny" (TeleChat2), "qwen2_tiny" (tied embeddings), or "qwen2": tiny Qwen2 (q/k/v biases, separate k/v, GQA
    with 2 kv heads, so 1 per rank under tp2; a sliding-window layer) with untied embeddings."""
    import dataclasses

    if model in ("qwen2", "qwen2_kv1"):  # qwen2_kv1: one kv head, so both tp2 ranks hold a copy of it
        return dataclasses.replace(get_config("qwen2_tiny"), tie_word_embeddings=False, sliding_window=5,
                                   num_kv_heads=1 if model == "qwen2_kv1" else 2)
    if model in ("moe", "qwen2_moe", "moe_cap"):  # weights large enough for uneven routing (a visible aux loss)
        cfg = get_config("qwen2_moe_tiny" if model == "qwen2_moe" else "telechat2_moe_tiny", initializer_range=0.25)
        # moe_cap: capacity factor 1, each expert takes at most ceil(2 * 64 / 4) = 32 of the batch's 64 tokens
        return dataclasses.replace(cfg, moe_capacity_factor=1.0) if model == "moe_cap" else cfg
    return get_config(model)


def build_model(model: str = "tiny") -> Telechat2ForCausalLM:
    return Telechat2ForCausalLM(model_config(model), compute_dtype="float32", seed=SEED)


def build_zero_model() -> Telechat2ForCausalLM:
    """Same architecture, all-zero weights (to be loaded)."""
    return Telechat2ForCausalLM(get_config("tiny"), compute_dtype="float32", init_zeros=True)


def make_batch():
    """input_ids, next-token labels, loss mask (some zeros), all [BATCH, SEQ]."""
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, get_config("tiny").vocab_size, size=(BATCH, SEQ + 1)).astype(np.int32)
    mask = (rng.random((BATCH, SEQ)) > 0.2).astype(np.float32)
    return tokens[:, :-1], tokens[:, 1:], mask


def aux_groups(layout: str) -> List[List[int]]:
    """The batch rows of each global micro-batch of a layout (dp rank d holds rows [d*R, (d+1)*R), split into
    micro_batch_num micro-batches): the rows an MoE layout takes each load-balancing loss over."""
    dims = ParallelDims(**LAYOUTS[layout])
    per_rank = BATCH // dims.dp
    size = per_rank // dims.micro_batch_num
    return [[d * per_rank + i * size + j for d in range(dims.dp) for j in range(size)]
            for i in range(dims.micro_batch_num)]


def reference_loss_fn(model, groups: List[List[int]] = None):
    """Plain single-process loss: sum(ce * mask) / sum(mask) from the full logits (log_softmax), plus an MoE
    model's load-balancing loss over the whole batch, or its mean over the row `groups` (global micro-batches)."""
    ids, labels, mask = make_batch()
    ids_t, labels_t, mask_t = Tensor(ids), Tensor(labels.reshape(-1, 1)), Tensor(mask.reshape(-1))
    inputs = model.prepare_inputs(ids_t)
    parts = [(Tensor(ids[rows]), model.prepare_inputs(Tensor(ids[rows]))) for rows in groups or []]

    def loss():
        hidden, _, aux = model.model(ids_t, *inputs, with_aux=True)  # aux: MoE load balancing (0 when dense)
        if parts:
            aux = sum(model.model(part, *part_inputs, with_aux=True)[2] for part, part_inputs in parts) / len(parts)
        logits = model.logits(hidden)  # [B,S,V]
        logp = ops.log_softmax(ops.reshape(logits, (-1, logits.shape[-1])), -1)
        ce = -ops.gather_elements(logp, 1, labels_t)[:, 0]
        return (ce * mask_t).sum() / mask_t.sum() + aux

    return loss


def reference_aux_loss(model_name: str, groups: List[List[int]] = None) -> List[float]:
    """The single-process load-balancing loss of the initial model on the batch, or on each row group (MoE)."""
    model = build_model(model_name)
    ids = make_batch()[0]
    values = []
    for rows in groups or [list(range(len(ids)))]:
        part = Tensor(ids[rows])
        values.append(float(model.model(part, *model.prepare_inputs(part), with_aux=True)[2].asnumpy()))
    return values


def _norm_and_coef(grads) -> tuple:
    from telechat2_ms.train.optim import clip_coefficient

    norm = float(np.sqrt(sum(float(np.sum(g.asnumpy().astype(np.float64) ** 2)) for g in grads)))
    return norm, clip_coefficient(norm, CLIP)


def reference_step(model_name: str = "tiny", gradients: dict = None, groups: List[List[int]] = None) -> tuple:
    """(loss, gradient norm, {name: updated full parameter}) after one clipped SGD step of the plain model;
    `gradients` (a dict) receives {name: gradient} of the step; `groups`: see reference_loss_fn."""
    model = build_model(model_name)
    params = model.trainable_params()
    loss_fn = reference_loss_fn(model, groups)
    loss, grads = ms.value_and_grad(loss_fn, None, weights=params)()
    if gradients is not None:
        gradients.update({p.name: g.asnumpy() for p, g in zip(params, grads)})
    norm, coef = _norm_and_coef(grads)
    for p, g in zip(params, grads):
        ops.assign(p, p - LR * coef * g)
    return float(loss.asnumpy()), norm, {name: p.asnumpy() for name, p in model.parameters_and_names()}


def reference_adamw() -> tuple:
    """(losses, gradient norms, {name: parameter}) after ADAMW_STEPS clipped steps of the trainer's AdamW
    (telechat2_ms/train/optim.py) on the plain model."""
    from telechat2_ms.train.optim import AdamW

    model = build_model()
    params = model.trainable_params()
    optimizer = AdamW(params, ADAMW["beta1"], ADAMW["beta2"], ADAMW["eps"], ADAMW["weight_decay"])
    grad_fn = ms.value_and_grad(reference_loss_fn(model), None, weights=params)
    losses, norms = [], []
    for step in range(1, ADAMW_STEPS + 1):
        loss, grads = grad_fn()
        norm, coef = _norm_and_coef(grads)
        optimizer(tuple(grads), *optimizer.step_scalars(ADAMW["lr"], step, coef))
        losses.append(float(loss.asnumpy()))
        norms.append(norm)
    return losses, norms, {name: p.asnumpy() for name, p in model.parameters_and_names()}


def initial_state(model: str = "tiny") -> Dict[str, np.ndarray]:
    return {name: p.asnumpy() for name, p in build_model(model).parameters_and_names()}


def save_rank_result(out_dir: str, layout: str, rank: int, coords, loss: float, state: Dict[str, np.ndarray],
                     seconds: float, **extra) -> None:
    path = os.path.join(out_dir, layout)
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, f"rank{rank}.npz"), **state)
    with open(os.path.join(path, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"loss": loss, "coords": list(coords), "seconds": seconds, **extra}, f)


def rank_info(out_dir: str, layout: str, rank: int) -> dict:
    with open(os.path.join(out_dir, layout, f"rank{rank}.json"), encoding="utf-8") as f:
        return json.load(f)


def merge_layout(out_dir: str, layout: str, suffix: str = "") -> tuple:
    """(losses per rank, {name: full tensor}) from the per-rank dumps of one layout (rank{r}{suffix}.npz: the
    parameters, or with suffix "_grads" the reduced gradients); replicas (dp, cp) are checked to agree bit for
    bit before merging the tp shards with plan.merge_shards (and the expert shards over ep)."""
    dims = ParallelDims(**LAYOUTS[layout])
    losses: List[float] = []
    shards: Dict[str, Dict[int, np.ndarray]] = {}
    experts: Dict[str, Dict[int, Dict[int, np.ndarray]]] = {}  # expert shards: name -> ep index -> tp -> array
    for rank in range(dims.world):
        with open(os.path.join(out_dir, layout, f"rank{rank}.json"), encoding="utf-8") as f:
            info = json.load(f)
        losses.append(info["loss"])
        pp, dp, cp, tp = dims.coords(rank)
        with np.load(os.path.join(out_dir, layout, f"rank{rank}{suffix}.npz")) as data:
            for name in data.files:
                if ".ffn." in name and ".feed_forward." in name:  # stacked experts: split over ep on dim 0
                    held = experts.setdefault(name, {}).setdefault(dp % dims.ep, {})
                    if tp in held and held[tp].tobytes() != data[name].tobytes():
                        raise AssertionError(f"{layout}: replicas of {name} (ep {dp % dims.ep}, tp {tp}) differ")
                    held[tp] = data[name]
                    continue
                replicas = shards.setdefault(name, {})
                if tp in replicas:
                    if replicas[tp].tobytes() != data[name].tobytes():
                        raise AssertionError(f"{layout}: replicas of {name} (tp rank {tp}) differ")
                else:
                    replicas[tp] = data[name]
    kv_heads = model_config(LAYOUT_MODELS.get(layout, "tiny")).num_kv_heads
    merged = {name: merge_shards(name, [by_tp[t] for t in sorted(by_tp)], kv_heads) for name, by_tp in shards.items()}
    for name, by_ep in experts.items():
        merged[name] = np.concatenate([merge_shards(name, [by_ep[e][t] for t in sorted(by_ep[e])])
                                       for e in sorted(by_ep)], axis=0)
    return losses, merged


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def max_update_diff(got: np.ndarray, want: np.ndarray, initial: np.ndarray) -> float:
    """How far a step's update got - initial is from want - initial, relative to the largest update, not counting
    one float32 ulp of each stored parameter: a parameter holds its update only to its own ulp, and two runs
    that round the same update differently differ by one. For a norm weight near 1.0 that ulp (5.96e-8 below 1)
    is 1.0e-4 of the tiny model's largest SGD update of it (5.9e-4): measured on an AVX-512 Xeon, cp2 and the single
    process stored model.norm_out.weight one ulp apart, each as far from a float64 PyTorch step (9.8e-5)."""
    gap = np.abs(got.astype(np.float64) - want) - np.spacing(np.abs(want).astype(np.float32))
    return float(np.max(np.maximum(gap, 0.0)) / max(np.max(np.abs(want.astype(np.float64) - initial)), 1e-30))


COMPILED_TOL = 1e-6  # compiled vs PyNative step: the same ops, fused or ordered differently by the graph compiler
# AdamW layouts: m / (sqrt(v) + eps) amplifies the compiled step's summation-order noise by up to lr / eps = 10, so
# their parameters are held to 1e-5 of a tensor's largest (measured: 1.5e-6 dp2_zero, 1.1e-6 dp2_tp2_sp_zero); losses
# and gradient norms still to COMPILED_TOL
COMPILED_ADAMW_PARAM_TOL = 1e-5


def check_compiled(out_dir: str, layout: str) -> None:
    """LAYOUT_jit (each stage's forward and backward compiled) against the PyNative LAYOUT, rank by rank: loss, global
    gradient norm(s), MoE aux losses and the updated parameters within COMPILED_TOL (relative; AdamW layouts' parameters
    within COMPILED_ADAMW_PARAM_TOL)."""
    jit = layout + "_jit"
    losses, merged = merge_layout(out_dir, layout)
    jit_losses, jit_merged = merge_layout(out_dir, jit)
    for got, want in zip(jit_losses, losses):
        assert abs(got - want) <= COMPILED_TOL * abs(want), (jit, "loss", got, want)
    for rank in range(len(losses)):
        mine, theirs = rank_info(out_dir, jit, rank), rank_info(out_dir, layout, rank)
        for key in ("norms", "losses", "aux_losses"):
            assert len(mine.get(key, [])) == len(theirs.get(key, [])), (jit, rank, key)
            for got, want in zip(mine.get(key, []), theirs.get(key, [])):
                assert abs(got - want) <= COMPILED_TOL * abs(want), (jit, rank, key, got, want)
    assert sorted(jit_merged) == sorted(merged)
    param_tol = COMPILED_ADAMW_PARAM_TOL if layout in ADAMW_LAYOUTS else COMPILED_TOL
    for name, want in merged.items():
        assert max_rel_diff(jit_merged[name], want) <= param_tol, (jit, name, max_rel_diff(jit_merged[name], want))


def layout_names() -> List[str]:
    return list(LAYOUTS)


def clipped_grads(grads, coef: float) -> list:
    return list(grads) if coef == 1.0 else [g * coef for g in grads]


def sgd_step(params, grads, learning_rate: float) -> None:
    """p <- p - lr * g, in place (the test step: no optimizer state, so every layout is compared exactly)."""
    for p, g in zip(params, grads):
        ops.assign(p, p - learning_rate * g)


def make_adamw(parallel):
    """ParallelAdamW over a TelechatParallel's parameters (states sharded over dp with optimizer_shard)."""
    from telechat2_ms.train.optim import ParallelAdamW

    return ParallelAdamW(parallel.params, parallel.groups.grad, parallel.dims.optimizer_shard, ADAMW["beta1"],
                         ADAMW["beta2"], ADAMW["eps"], ADAMW["weight_decay"])


def adamw_step(parallel, batch, optimizer, step: int):
    """One clipped AdamW step as train/engine.ParallelEngine takes it -> (loss, grad norm)."""
    from telechat2_ms.train.optim import clip_coefficient

    loss, grads = parallel.forward_backward(*batch)
    norm = parallel.grad_norm(grads)
    optimizer.step(grads, ADAMW["lr"], step, clip_coefficient(norm, CLIP))
    return loss, norm
