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
from telechat2_ms.shard_layout import merge_shards

BATCH, SEQ, SEED, LR = 4, 16, 7, 0.5

# layout name -> ParallelDims keyword arguments
LAYOUTS: Dict[str, dict] = {
    "dp2": dict(dp=2, micro_batch_num=2),
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2": dict(pp=2, micro_batch_num=4),
    "cp2": dict(cp=2),
    "tp2_pp2": dict(tp=2, pp=2, micro_batch_num=4),
}


def build_model() -> Telechat2ForCausalLM:
    return Telechat2ForCausalLM(get_config("tiny"), compute_dtype="float32", seed=SEED)


def build_zero_model() -> Telechat2ForCausalLM:
    """Same architecture, all-zero weights (to be loaded)."""
    return Telechat2ForCausalLM(get_config("tiny"), compute_dtype="float32", init_zeros=True)


def make_batch():
    """input_ids, next-token labels, loss mask (some zeros), all [BATCH, SEQ]."""
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(0, get_config("tiny").vocab_size, size=(BATCH, SEQ + 1)).astype(np.int32)
    mask = (rng.random((BATCH, SEQ)) > 0.2).astype(np.float32)
    return tokens[:, :-1], tokens[:, 1:], mask


def reference_loss_fn(model):
    """Plain single-process loss: sum(ce * mask) / sum(mask) from the full logits (log_softmax)."""
    ids, labels, mask = make_batch()
    ids_t, labels_t, mask_t = Tensor(ids), Tensor(labels.reshape(-1, 1)), Tensor(mask.reshape(-1))

    def loss():
        logits = model(ids_t)  # [B,S,V]
        logp = ops.log_softmax(ops.reshape(logits, (-1, logits.shape[-1])), -1)
        ce = -ops.gather_elements(logp, 1, labels_t)[:, 0]
        return (ce * mask_t).sum() / mask_t.sum()

    return loss


def reference_step() -> tuple:
    """(loss, {name: updated full parameter}) after one SGD step of the plain model."""
    model = build_model()
    params = model.trainable_params()
    loss_fn = reference_loss_fn(model)
    loss, grads = ms.value_and_grad(loss_fn, None, weights=params)()
    for p, g in zip(params, grads):
        ops.assign(p, p - LR * g)
    return float(loss.asnumpy()), {name: p.asnumpy() for name, p in model.parameters_and_names()}


def initial_state() -> Dict[str, np.ndarray]:
    return {name: p.asnumpy() for name, p in build_model().parameters_and_names()}


def save_rank_result(out_dir: str, layout: str, rank: int, coords, loss: float, state: Dict[str, np.ndarray],
                     seconds: float) -> None:
    path = os.path.join(out_dir, layout)
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, f"rank{rank}.npz"), **state)
    with open(os.path.join(path, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"loss": loss, "coords": list(coords), "seconds": seconds}, f)


def merge_layout(out_dir: str, layout: str) -> tuple:
    """(losses per rank, {name: full tensor}) from the per-rank dumps of one layout; replicas (dp, cp)
    are checked to agree bit for bit before merging the tp shards with shard_layout.merge_shards."""
    dims = ParallelDims(**LAYOUTS[layout])
    losses: List[float] = []
    shards: Dict[str, Dict[int, np.ndarray]] = {}
    for rank in range(dims.world):
        with open(os.path.join(out_dir, layout, f"rank{rank}.json"), encoding="utf-8") as f:
            info = json.load(f)
        losses.append(info["loss"])
        pp, dp, cp, tp = dims.coords(rank)
        with np.load(os.path.join(out_dir, layout, f"rank{rank}.npz")) as data:
            for name in data.files:
                replicas = shards.setdefault(name, {})
                if tp in replicas:
                    if replicas[tp].tobytes() != data[name].tobytes():
                        raise AssertionError(f"{layout}: replicas of {name} (tp rank {tp}) differ")
                else:
                    replicas[tp] = data[name]
    merged = {name: merge_shards(name, [by_tp[t] for t in sorted(by_tp)]) for name, by_tp in shards.items()}
    return losses, merged


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def layout_names() -> List[str]:
    return list(LAYOUTS)
