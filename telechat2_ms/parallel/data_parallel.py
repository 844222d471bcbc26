"""Data parallelism: gradient reduction across replicas, and the optimizer step.

Every rank computes the gradient of its share of the global loss (loss terms are divided by the global
token count, see parallelize.TelechatParallel), so replica gradients are summed, not averaged, over the
`grad` group (dp x cp). Parameters tagged `sequence_parallel_partial` (norm weights and row-parallel
biases under sequence parallelism) are also summed over the tp group. Gradients are flattened into one
buffer per group so each reduction is a single collective.
"""
from __future__ import annotations

from typing import List, Sequence

from mindspore import ops

from telechat2_ms.parallel import comm


def _bucket_all_reduce(tensors: Sequence, group: comm.Group) -> List:
    """All-reduce several tensors with one collective (flatten, concatenate, reduce, split back)."""
    if group.size == 1 or not tensors:
        return list(tensors)
    flat = ops.cat([ops.reshape(t, (-1,)) for t in tensors])
    reduced = comm.all_reduce(flat, group)
    out, offset = [], 0
    for t in tensors:
        size = int(t.size)
        out.append(ops.reshape(reduced[offset:offset + size], t.shape))
        offset += size
    return out


def reduce_gradients(params: Sequence, grads: Sequence, grad_group: comm.Group, tp_group: comm.Group) -> List:
    """Sum gradients over the data/context-parallel replicas, and over tp for sequence-parallel partials."""
    grads = _bucket_all_reduce(list(grads), grad_group)
    partial = [i for i, p in enumerate(params) if getattr(p, "sequence_parallel_partial", False)]
    if partial and tp_group.size > 1:
        for i, g in zip(partial, _bucket_all_reduce([grads[i] for i in partial], tp_group)):
            grads[i] = g
    return grads


def sgd_step(params: Sequence, grads: Sequence, learning_rate: float) -> None:
    """p <- p - lr * g, in place."""
    for p, g in zip(params, grads):
        ops.assign(p, p - learning_rate * g)
