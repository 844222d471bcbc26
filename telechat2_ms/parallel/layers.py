"""Tensor- and sequence-parallel building blocks (Megatron style) over telechat2_ms.parallel.comm.

Parameter attribute names match the plain cells in telechat2_ms/layers.py (`weight`, `bias`,
`embedding_weight`), so a parallelized model keeps MindFormers' parameter names; only the shapes are the
local shards. Shapes: B batch, S tokens (S/tp inside a sequence-parallel region), H hidden, V vocab.

Regions: a tensor-parallel sub-block (attention or FFN) is entered after its norm (`RegionEntryNorm`:
identity forward / all-reduce backward, or all-gather on the sequence with sequence parallelism) and left
through a `RowParallelLinear` (all-reduce, or reduce-scatter on the sequence). With sequence parallelism the
norm weights and the row-parallel biases see only this rank's tokens, so their gradients are partial over
the tp group: they are tagged `sequence_parallel_partial` and summed by data_parallel.reduce_gradients.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, nn, ops

from telechat2_ms import kernels
from telechat2_ms.layers import host_parameter as _param
from telechat2_ms.parallel import comm

SEQ_DIM = 1  # hidden states are [B, S, H]


def mark_sequence_parallel_partial(param: Parameter) -> None:
    """Tag a parameter whose gradient must be summed over the tp group (sequence parallelism)."""
    param.sequence_parallel_partial = True


def mark_kv_copy(param: Parameter, copies: int) -> None:
    """Tag a kv projection parameter that `copies` consecutive tp ranks hold alike (fewer kv heads than tp
    ranks, parallel/plan.py): its gradient is summed over them and counted once in the norm."""
    param.kv_copies = copies


def mark_tied_copy(param: Parameter) -> None:
    """Tag the last pipeline stage's copy of a tied embedding (lm_head): its gradient is summed with the
    embedding's (parallelize.TelechatParallel), it is not counted in the gradient norm and not saved."""
    param.tied_copy = True


class _LoRA:
    """LoRA on a tensor-parallel projection (train/lora.py's update y += (alpha / r) (x A^T) B^T), sharded with it:
    column-parallel W [out/tp, in]: A [r, in] whole, B [out/tp, r]; row-parallel W [out, in/tp]: A [r, in/tp],
    B [out, r] whole, its term added to the partial sums before their reduction. The whole factor gets only this
    rank's part of its gradient (its output slice, or its input slice), so it is tagged for the sum over tp."""

    has_lora = False

    def add_lora(self, lora_a: np.ndarray, lora_b: np.ndarray, scaling: float) -> None:
        self.lora_a, self.lora_b = _param(lora_a, "lora_a"), _param(lora_b, "lora_b")
        mark_sequence_parallel_partial(self.lora_b if isinstance(self, RowParallelLinear) else self.lora_a)
        self.lora_scaling = float(scaling)
        self.lora_matmul = ops.MatMul(transpose_b=True)
        self.has_lora = True

    def _lora_term(self, x2d):
        low = self.lora_matmul(x2d, ops.cast(self.lora_a, self.compute_dtype))  # [N, r]
        return self.lora_matmul(low, ops.cast(self.lora_b, self.compute_dtype)) * self.lora_scaling  # [N, out(/tp)]

    def merged_weight(self) -> np.ndarray:
        """This rank's W + scaling * B A in fp32 [out(/tp), in(/tp)] (its slice of the merged weight)."""
        delta = self.lora_b.asnumpy().astype(np.float64) @ self.lora_a.asnumpy().astype(np.float64)
        return (self.weight.asnumpy().astype(np.float64) + self.lora_scaling * delta).astype(np.float32)


class ColumnParallelLinear(_LoRA, nn.Cell):
    """y_local = x @ W_local^T (+ b_local): W [out, in] and its bias (Qwen2's q/k/v) split on `out`; x is already
    replicated in the tp region (see RegionEntryNorm), so no communication here. x [..., in] -> [..., out/tp]."""

    def __init__(self, weight_shard: np.ndarray, compute_dtype=ms.float32, bias_shard: Optional[np.ndarray] = None):
        super().__init__()
        self.out_features, self.in_features = weight_shard.shape
        self.weight = _param(weight_shard, "weight")
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        self.has_bias = bias_shard is not None
        self.bias = _param(bias_shard, "bias") if self.has_bias else None

    def construct(self, x):
        lead = x.shape[:-1]
        x2d = ops.reshape(ops.cast(x, self.compute_dtype), (-1, x.shape[-1]))  # [N, in]
        weight = kernels.cast_to(self.weight, self.compute_dtype)
        y = kernels.weight_matmul(self.matmul, x2d, weight)  # [N, out/tp]
        if self.has_bias:
            y = y + ops.cast(self.bias, self.compute_dtype)
        if self.has_lora:
            y = y + self._lora_term(x2d)
        return ops.reshape(y, lead + (self.out_features,))


class RowParallelLinear(_LoRA, nn.Cell):
    """y = sum_tp(x_local @ W_local^T) + b: W [out, in] split on `in`, x [..., in/tp] (head/ffn-sharded).
    The partial sums are all-reduced, or reduce-scattered on the sequence with sequence parallelism;
    the bias is added once, after the reduction. -> [B, S, out] (or [B, S/tp, out])."""

    def __init__(self, weight_shard: np.ndarray, bias, group: comm.Group, sequence_parallel: bool,
                 compute_dtype=ms.float32):
        super().__init__()
        self.out_features, self.in_features = weight_shard.shape
        self.weight = _param(weight_shard, "weight")
        self.has_bias = bias is not None
        self.bias = _param(bias, "bias") if bias is not None else None
        if self.has_bias and sequence_parallel and group.size > 1:
            mark_sequence_parallel_partial(self.bias)
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        self.reduce = (comm.ReduceScatterToSPRegion(group, SEQ_DIM) if sequence_parallel
                       else comm.ReduceFromRegion(group))

    def construct(self, x):
        lead = x.shape[:-1]
        x2d = ops.reshape(ops.cast(x, self.compute_dtype), (-1, x.shape[-1]))  # [N, in/tp]
        weight = kernels.cast_to(self.weight, self.compute_dtype)
        partial = kernels.weight_matmul(self.matmul, x2d, weight)  # [N, out], partial over tp
        if self.has_lora:
            partial = partial + self._lora_term(x2d)
        partial = ops.reshape(partial, lead + (self.out_features,))  # [B, S, out]
        y = self.reduce(partial)
        if self.has_bias:
            y = y + ops.cast(self.bias, self.compute_dtype)
        return y


class RegionEntryNorm(nn.Cell):
    """RMSNorm whose output enters a tensor-parallel region: forward identity (backward all-reduce), or
    with sequence parallelism all-gather of the sequence shards (backward reduce-scatter).
    x [B, S(/tp), H] -> [B, S, H]."""

    def __init__(self, weight: np.ndarray, eps: float, group: comm.Group, sequence_parallel: bool,
                 use_fused: bool = False):
        super().__init__()
        self.weight = _param(weight, "weight")
        self.eps = eps
        self.use_fused = use_fused
        if sequence_parallel and group.size > 1:
            mark_sequence_parallel_partial(self.weight)
        self.enter = (comm.GatherFromSPRegion(group, SEQ_DIM) if sequence_parallel
                      else comm.CopyToRegion(group))

    def construct(self, x):
        return self.enter(kernels.rms_norm(x, self.weight, self.eps, self.use_fused))


class VocabParallelEmbedding(nn.Cell):
    """Embedding table [V, H] split on V: each rank looks up the ids in its range [start, start + V/tp),
    zeroes the others and the partial rows are summed over tp (all-reduce, or reduce-scatter on the
    sequence with sequence parallelism). input_ids [B, S] -> [B, S(/tp), H]."""

    def __init__(self, weight_shard: np.ndarray, group: comm.Group, sequence_parallel: bool,
                 compute_dtype=ms.float32):
        super().__init__()
        self.embedding_weight = _param(weight_shard, "embedding_weight")
        self.part = weight_shard.shape[0]
        self.start = max(group.rank, 0) * self.part
        self.compute_dtype = compute_dtype
        self.reduce = (comm.ReduceScatterToSPRegion(group, SEQ_DIM) if sequence_parallel
                       else comm.ReduceFromRegion(group))

    def construct(self, input_ids):
        local = input_ids - self.start
        inside = ops.logical_and(local >= 0, local < self.part)  # [B, S]
        rows = ops.gather(self.embedding_weight, ops.where(inside, local, ops.zeros_like(local)), 0)  # [B,S,H]
        rows = rows * ops.expand_dims(ops.cast(inside, rows.dtype), -1)
        return ops.cast(self.reduce(rows), self.compute_dtype)


class VocabParallelHead(nn.Cell):
    """lm_head [V, H] split on V. `construct` returns full logits [B, S, V] (all-gathered: a drop-in for
    generation); `local_logits` returns this rank's [B, S, V/tp] for VocabParallelCrossEntropy."""

    def __init__(self, weight_shard: Optional[np.ndarray], group: comm.Group, compute_dtype=ms.float32,
                 tied_to: Optional["VocabParallelEmbedding"] = None):
        super().__init__()
        if tied_to is not None:  # tied embeddings (Qwen2-0.5B/1.5B): the embedding's own shard, one Parameter
            self.tied = [tied_to]  # a list: not a sub-cell, so the Parameter is listed once (model.TiedHead)
            self.out_features, self.in_features = tied_to.embedding_weight.shape
        else:
            self.tied = []
            self.out_features, self.in_features = weight_shard.shape
            self.weight = _param(weight_shard, "weight")
        self.compute_dtype = compute_dtype
        self.has_bias = False
        self.matmul = ops.MatMul(transpose_b=True)
        self.gather = comm.GatherFromRegion(group, -1)

    def local_logits(self, x):
        lead = x.shape[:-1]
        x2d = ops.reshape(ops.cast(x, self.compute_dtype), (-1, x.shape[-1]))  # [N, H]
        weight = self.tied[0].embedding_weight if self.tied else self.weight
        return ops.reshape(self.matmul(x2d, kernels.cast_to(weight, self.compute_dtype)), lead + (self.out_features,))

    def construct(self, x):
        return self.gather(self.local_logits(x))  # [B, S, V]


class VocabParallelCrossEntropy(comm.Collectives):
    """Per-token cross entropy from vocab-sharded logits without gathering them.

    local_logits [N, V/tp] fp32 (rank r holds vocab ids [r*V/tp, (r+1)*V/tp)), labels [N] int -> ce [N].
    ce = log(sum_v exp(z_v - m)) + m - z_label with m the global max (a constant for autograd); the sums
    over ranks go through ReduceFromRegion (all-reduce forward, identity backward) so each rank
    differentiates only its own shard."""

    def __init__(self, group: comm.Group):
        super().__init__(group)
        self.reduce = comm.ReduceFromRegion(group)

    def construct(self, local_logits, labels):
        logits = ops.cast(local_logits, ms.float32)
        part = logits.shape[-1]
        local_max = ops.amax(logits, -1, keepdims=True)  # [N,1]
        global_max = ops.stop_gradient(self.all_max(ops.stop_gradient(local_max)))
        shifted = logits - global_max  # [N, V/tp]
        sum_exp = self.reduce(ops.sum(ops.exp(shifted), -1))  # [N]
        local_label = labels - self.rank * part
        inside = ops.logical_and(local_label >= 0, local_label < part)
        picked = ops.gather_elements(shifted, 1, ops.expand_dims(ops.where(inside, local_label,
                                                                             ops.zeros_like(local_label)), -1))[:, 0]
        target = self.reduce(picked * ops.cast(inside, ms.float32))  # [N]
        return ops.log(sum_exp) - target
