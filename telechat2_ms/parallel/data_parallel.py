"""Data parallelism: gradient reduction across replicas, and the global gradient norm over every shard.

Every rank computes the gradient of its share of the global loss (loss terms are divided by the global
token count, see parallelize.TelechatParallel), so replica gradients are summed, not averaged, over the
`grad` group (dp x cp). Parameters tagged `sequence_parallel_partial` (norm weights and row-parallel
biases under sequence parallelism) are also summed over the tp group, and kv projections held as copies
(`kv_copies`: fewer kv heads than tp ranks) over the ranks holding the same head. Gradients are flattened
into buckets so each reduction is one collective per bucket.

Global norm. After reduce_gradients every data/context replica holds the same gradients, and within a
tensor-parallel group a parameter is either split (parallel/plan.py rule other than `replicate`: each rank
holds a distinct slice) or replicated (RMSNorm weights, row-parallel biases: each rank holds the same full
gradient). So the squared norm is
    sum over pipeline stages and tp ranks of (|split grads|^2 + [tp rank 0] |replicated grads|^2),
an all-reduce over tp and one over pp; dp/cp replicas are counted once by not reducing over them.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import mindspore as ms
from mindspore import ops

from telechat2_ms.kernels import cast_to, squared_sum
from telechat2_ms.parallel import comm
from telechat2_ms.parallel.plan import split_rule


BUCKET_ELEMENTS = 1 << 26  # 256 MiB of fp32 per collective: a bucket's temporaries stay bounded at any size


def _bucket_all_reduce(tensors: Sequence, group: comm.Group) -> List:
    """All-reduce several tensors with few collectives: consecutive tensors are flattened and concatenated into
    buckets of at most BUCKET_ELEMENTS (a bigger tensor goes alone), each reduced and split back."""
    out = list(tensors)
    if group.size == 1 or not out:
        return out
    buckets, current, filled = [], [], 0
    for i, t in enumerate(out):
        if current and filled + int(t.size) > BUCKET_ELEMENTS:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += int(t.size)
    buckets.append(current)
    for bucket in buckets:
        flat = ops.cat([ops.reshape(out[i], (-1,)) for i in bucket]) if len(bucket) > 1 else ops.reshape(
            out[bucket[0]], (-1,))
        reduced = comm.all_reduce(flat, group)
        del flat
        offset = 0
        for i in bucket:
            size = int(out[i].size)
            out[i] = ops.reshape(reduced[offset:offset + size], out[i].shape)
            offset += size
    return out


def reduce_gradients(params: Sequence, grads: Sequence, grad_group: comm.Group, tp_group: comm.Group,
                     expert_group: Optional[comm.Group] = None) -> List:
    """Sum gradients over the data/context-parallel replicas (an expert shard's over `expert_group`, the replicas
    of that shard: parallel/experts.py), and over tp for sequence-parallel partials."""
    grads = list(grads)
    experts = [i for i, p in enumerate(params) if getattr(p, "expert_shard", False)]
    rest = [i for i, p in enumerate(params) if not getattr(p, "expert_shard", False)]
    for indices, group in ((rest, grad_group), (experts, expert_group)):
        if not indices:
            continue
        for i, g in zip(indices, _bucket_all_reduce([grads[i] for i in indices], group)):
            grads[i] = g
    partial = [i for i, p in enumerate(params) if getattr(p, "sequence_parallel_partial", False)]
    if partial and tp_group.size > 1:
        for i, g in zip(partial, _bucket_all_reduce([grads[i] for i in partial], tp_group)):
            grads[i] = g
    for i, p in enumerate(params):
        copies = getattr(p, "kv_copies", 1)
        if copies > 1:  # sum over the tp ranks holding the same kv head (consecutive blocks of `copies`)
            every = ops.reshape(comm.all_gather(grads[i], tp_group, 0), (tp_group.size,) + tuple(grads[i].shape))
            first = tp_group.rank - tp_group.rank % copies
            grads[i] = every[first:first + copies].sum(0)
    return grads


def is_tp_replicated(name: str) -> bool:
    """True for parameters every tp rank holds whole (their gradient is counted once in the norm)."""
    return split_rule(name).replicated


def global_grad_norm(params: Sequence, grads: Sequence, groups) -> float:
    """L2 norm of the full model's gradient from this rank's (reduced) gradient shards; every rank gets it.
    `groups` is the layout's ParallelGroups; `params` carry their MindFormers names (Parameter.name)."""
    split_sq = ops.zeros((), ms.float32)
    replicated_sq = ops.zeros((), ms.float32)
    expert_split_sq = ops.zeros((), ms.float32)  # expert shards: distinct over the ep group as well
    expert_replicated_sq = ops.zeros((), ms.float32)
    for p, g in zip(params, grads):
        copies = getattr(p, "kv_copies", 1)
        if copies > 1 and groups.coords.tp % copies:
            continue  # a copy of a kv head another tp rank of its block counts
        if getattr(p, "tied_copy", False):
            continue  # the last stage's copy of a tied embedding: the first stage counts it
        sq = squared_sum(cast_to(g, ms.float32))  # []
        if getattr(p, "expert_shard", False):
            if is_tp_replicated(p.name):
                expert_replicated_sq = expert_replicated_sq + sq
            else:
                expert_split_sq = expert_split_sq + sq
        elif is_tp_replicated(p.name):
            replicated_sq = replicated_sq + sq
        else:
            split_sq = split_sq + sq
    local = split_sq + (replicated_sq if groups.coords.tp == 0 else ops.zeros((), ms.float32))
    experts = expert_split_sq + (expert_replicated_sq if groups.coords.tp == 0 else ops.zeros((), ms.float32))
    local = local + comm.all_reduce(ops.reshape(experts, (1,)), groups.ep)[0]
    total = comm.all_reduce(comm.all_reduce(ops.reshape(local, (1,)), groups.tp), groups.pp)  # [1]
    return math.sqrt(float(total.asnumpy()[0]))
