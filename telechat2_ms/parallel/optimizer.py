"""The optimizer step of the explicit parallel path: global gradient-norm clipping over every shard, and
AdamW whose states can be sharded over data parallel (ZeRO stage 1, `parallel_config.optimizer_shard`).

Global norm. After data_parallel.reduce_gradients every data/context replica holds the same gradients, and
within a tensor-parallel group a parameter is either split (shard_layout rule other than `replicate`: each
rank holds a distinct slice) or replicated (RMSNorm weights, row-parallel biases: each rank holds the same
full gradient). So the squared norm is
    sum over pipeline stages and tp ranks of (|split grads|^2 + [tp rank 0] |replicated grads|^2),
an all-reduce over tp and one over pp; dp/cp replicas are counted once by not reducing over them. The
clip coefficient is torch's clip_grad_norm_ (train/optim.clip_coefficient, shared with the trainer).

AdamW (`ParallelAdamW`) is train/optim.AdamW's update (torch.optim.AdamW: decoupled weight decay on
parameters with >= 2 dims, bias corrections) on one flat fp32 vector of this rank's parameters. With
`shard=True` the vector (zero-padded to a multiple of dp) is cut into dp equal slices: dp rank r keeps the
moments of slice r only, updates that slice of the parameters and the updated slices are all-gathered over
the dp group (on CPU the all-gather is the AllReduce emulation of parallel/comm.py). Optimizer memory per
rank drops from 2 N to 2 N / dp floats; the result equals the replicated update bit for bit up to the
order of float operations (the same element-wise formula runs on the same numbers).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from telechat2_ms.parallel import comm
from telechat2_ms.shard_layout import REPLICATE, split_rule
from telechat2_ms.train.optim import squared_sum


def is_tp_replicated(name: str) -> bool:
    """True for parameters every tp rank holds whole (their gradient is counted once in the norm)."""
    return split_rule(name) is REPLICATE


def global_grad_norm(params: Sequence, grads: Sequence, groups) -> float:
    """L2 norm of the full model's gradient from this rank's (reduced) gradient shards; every rank gets it.
    `groups` is the layout's ParallelGroups; `params` carry their MindFormers names (Parameter.name)."""
    split_sq = ops.zeros((), ms.float32)
    replicated_sq = ops.zeros((), ms.float32)
    for p, g in zip(params, grads):
        sq = squared_sum(ops.cast(g, ms.float32))  # []
        if is_tp_replicated(p.name):
            replicated_sq = replicated_sq + sq
        else:
            split_sq = split_sq + sq
    local = split_sq + (replicated_sq if groups.coords.tp == 0 else ops.zeros((), ms.float32))
    total = comm.all_reduce(comm.all_reduce(ops.reshape(local, (1,)), groups.tp), groups.pp)  # [1]
    return math.sqrt(float(total.asnumpy()[0]))


class ParallelAdamW:
    """AdamW over this rank's parameters; `shard=True` keeps states for 1/dp of them (module docstring).

    step(grads, lr, step, grad_coef): one update in place; `step` is the 1-based optimizer step (bias
    corrections), grad_coef multiplies every gradient first (the clip coefficient)."""

    def __init__(self, params: Sequence, dp_group: comm.Group, shard: bool, beta1: float = 0.9,
                 beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = list(params)
        self.group = dp_group
        self.shard = bool(shard) and dp_group.size > 1
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.sizes = [int(np.prod(p.shape)) for p in self.params]
        total = sum(self.sizes)
        parts = dp_group.size if self.shard else 1
        self.part = -(-total // parts)  # ceil
        self.padding = self.part * parts - total
        self.lo = (dp_group.rank if self.shard else 0) * self.part
        decay = np.concatenate([np.full(n, float(len(p.shape) >= 2 and weight_decay > 0), np.float32)
                                for p, n in zip(self.params, self.sizes)] + [np.zeros(self.padding, np.float32)])
        self.decay = Tensor(decay[self.lo:self.lo + self.part])  # [part] 1 where weight decay applies
        self.exp_avg = ops.zeros((self.part,), ms.float32)  # [part]
        self.exp_avg_sq = ops.zeros((self.part,), ms.float32)  # [part]

    @property
    def state_elements(self) -> int:
        """Moment elements kept by this rank (2 x its slice)."""
        return 2 * self.part

    def _my_slice(self, tensors: Sequence) -> Tensor:
        flat = [ops.reshape(ops.cast(t, ms.float32), (-1,)) for t in tensors]
        if self.padding:
            flat.append(ops.zeros((self.padding,), ms.float32))
        return ops.cat(flat)[self.lo:self.lo + self.part]  # [part]

    def step(self, grads: Sequence, lr: float, step: int, grad_coef: float = 1.0) -> None:
        bc1, bc2 = 1.0 - self.beta1 ** step, 1.0 - self.beta2 ** step
        g = self._my_slice(grads) * grad_coef  # [part]
        p = self._my_slice(self.params)  # [part]
        p = p * (1.0 - lr * self.weight_decay * self.decay)
        self.exp_avg = self.exp_avg * self.beta1 + g * (1.0 - self.beta1)
        self.exp_avg_sq = self.exp_avg_sq * self.beta2 + ops.square(g) * (1.0 - self.beta2)
        denom = ops.sqrt(self.exp_avg_sq) / math.sqrt(bc2) + self.eps
        p = p - (lr / bc1) * self.exp_avg / denom  # [part]
        full = comm.all_gather(p, self.group, 0) if self.shard else p  # [parts * part]
        offset = 0
        for param, n in zip(self.params, self.sizes):
            ops.assign(param, ops.cast(ops.reshape(full[offset:offset + n], param.shape), param.dtype))
            offset += n


def clipped_grads(grads: Sequence, coef: float) -> List:
    return list(grads) if coef == 1.0 else [g * coef for g in grads]
