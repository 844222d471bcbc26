"""Expert parallelism (with tensor parallelism inside every expert) for the mixture-of-experts block.

Layout (parallel/dims.py): the `ep` ranks of a block of data-parallel ranks split the E experts of every sparse
layer, rank i holding experts [i*E/ep, (i+1)*E/ep) (`expert_range`); with tp each expert's FFN is split as the
dense FFN is (w1/w3 rows, w2 columns: plan.EXPERT_COLUMN / EXPERT_ROW; the down biases whole). The router and
Qwen2-MoE's shared-expert gate are whole on every rank; the shared expert is a tensor-parallel FFN.

Routing is computed by every rank on its own tokens (layers.RoutedExperts.gate). Dispatch and combine are
all-to-alls over the ep group (comm.AllToAllRows: native AlltoAllV on Ascend, emulated from all-reduce on CPU):
    rows_r = this rank's tokens that chose one of ep rank r's experts (host indices, PyNative), each piece ending
             in a zero row of weight 0, so none is empty
    X, C = all_to_all((x[rows_0], x[rows_1], ...)), the same for combine     [R, H], [R, E]: sender-major
    Z = sum over this rank's experts e of C[:, e] * expert_e(X)    (zero weight where a row did not choose e)
    y = sum over r of all_to_all_back(Z)[rows_r]   [T, H]   each token's sum over the experts that hold it
so each rank runs its E/ep experts over the rows it received: dropless, and equal to one process up to fp32
summation order. The received rows keep the block's token order (ranks in group order, tokens in order), so with
a capacity factor each expert fills the slots it fills on the gathered block. Compiled steps (ms.jit: the
KV-cache generation steps, generate.CachedSteps -> use_static_dispatch) cannot read the routing on the host;
they dispatch by all-gather of the block's tokens and combine by reduce-scatter, every expert on every token of
the block, static shapes. Under tp the experts' partial outputs are summed once, after the weighting (an
all-reduce of [R, H]); the routing weights enter that partial sum through CopyToRegion, so their gradient is
summed over tp as well, and the down biases are added after the sum.

The block's input is not a tensor-parallel region's (the sparse layer's ffn_norm stays a plain norm): every tp
rank holds the whole activations and, from the whole router, their whole gradient; the experts' and the shared
expert's column-parallel inputs enter through CopyToRegion.

Gradients: expert weights and biases are tagged `expert_shard` and summed over the `expert_grad` group (the
replicas of this rank's experts), the router over the whole `grad` group like every replicated weight
(data_parallel.reduce_gradients); the gradient norm adds the expert shards over the ep group.

Load balancing (model.aux_loss) is computed from the statistics of the whole global micro-batch: every rank sums
its (assignments, probability mass) over the grad group (forward all-reduce, backward all-reduce) and adds
aux / grad_size to its loss share, so the summed loss and every gradient equal one process's. Under pipeline
stages each stage adds the aux of its own layers to its backward (the `local` term of pipeline.StageFunctions): exact for
the per-layer aux of TeleChat2-MoE; Qwen2-MoE's aux over every layer at once is refused with pp (dims.check_experts).

With a capacity factor (ModelConfig.moe_capacity_factor) each of this rank's experts runs on its
ceil(c k N / E) slots of the block's N = ep x T tokens, filled in token order (layers.capacity_combine).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms.layers import (StackedLinear, capacity_combine, capacity_slots, expert_capacity, host_parameter,
                                 weighted_sum)
from telechat2_ms.model import aux_loss
from telechat2_ms.parallel import comm
from telechat2_ms.parallel.layers import ColumnParallelLinear, RowParallelLinear


def expert_range(num_experts: int, ep: int, ep_rank: int) -> Tuple[int, int]:
    """[first, end) of the experts ep rank `ep_rank` holds."""
    per = num_experts // ep
    return ep_rank * per, (ep_rank + 1) * per


def mark_expert_shard(param) -> None:
    """Tag a parameter that only this rank's expert-parallel block position holds (summed over expert_grad)."""
    param.expert_shard = True


class ExpertParallelFFN(nn.Cell):
    """This rank's experts (stacked [E/ep, ...], split over tp inside) with the dispatch and combine of the module
    docstring; construct(x [T,H], combine [T,E]) -> [T,H], as layers.ExpertFFN."""

    def __init__(self, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, bias, first: int, ep_group: comm.Group,
                 tp_group: comm.Group, compute_dtype=ms.float32, config=None):
        super().__init__()
        self.config = config  # its moe_capacity_factor: each expert on its capacity slots of the block's tokens
        self.w1 = StackedLinear(host_parameter(w1, "weight"), None, compute_dtype)
        self.w3 = StackedLinear(host_parameter(w3, "weight"), None, compute_dtype)
        self.w2 = StackedLinear(host_parameter(w2, "weight"), None if bias is None else host_parameter(bias, "bias"),
                                compute_dtype)
        for param in self.get_parameters():
            mark_expert_shard(param)
        self.first, self.local = first, w1.shape[0]
        self.compute_dtype = compute_dtype
        self.ep_group, self.ep_size = ep_group, ep_group.size
        # all-to-all dispatch (PyNative); False: all-gather + reduce-scatter (static shapes; ep1: no dispatch)
        self.routed = ep_group.size > 1
        self.all_to_all = comm.AllToAllRows(ep_group)
        self.dispatch = comm.GatherFromSPRegion(ep_group, 0)  # all-gather; backward reduce-scatter
        self.collect = comm.ReduceScatterToSPRegion(ep_group, 0)  # reduce-scatter; backward all-gather
        self.enter_tp = comm.CopyToRegion(tp_group)
        self.weights_tp = comm.CopyToRegion(tp_group)
        self.reduce_tp = comm.ReduceFromRegion(tp_group)

    def construct(self, x, combine):
        if self.routed:
            return self._routed(x, combine)
        tokens = self.dispatch(x)  # [ep*T, H]
        weights = self.dispatch(combine)[:, self.first:self.first + self.local]  # [ep*T, E_local] fp32
        return self.collect(self._experts(tokens, weights, tokens.shape[0]))  # [T, H]

    def _routed(self, x, combine):
        """The all-to-all dispatch: each token to the ep ranks holding one of its experts, and back."""
        tokens, hidden = x.shape
        chosen = combine.asnumpy() > 0  # [T, E]: host values (PyNative), the same on every tp rank
        hits = chosen.reshape(tokens, self.ep_size, self.local).any(-1)  # [T, ep]
        # each rank's piece ends in a zero row of weight 0 (row T), so no piece is empty
        rows = [np.append(np.nonzero(hits[:, r])[0], tokens) for r in range(self.ep_size)]
        send = [len(r) for r in rows]
        recv = comm.exchange_counts(send, self.ep_group)
        index = Tensor(np.concatenate(rows).astype(np.int32))
        send_t, recv_t = Tensor(np.array(send, np.int32)), Tensor(np.array(recv, np.int32))
        padded_x = ops.concat((x, ops.zeros((1, hidden), x.dtype)), 0)
        padded_c = ops.concat((combine, ops.zeros((1, combine.shape[1]), combine.dtype)), 0)
        received = self.all_to_all(ops.gather(padded_x, index, 0), send_t, recv_t)  # [R, H], sender-major
        weights = self.all_to_all(ops.gather(padded_c, index, 0), send_t, recv_t)[:, self.first:self.first + self.local]
        out = self._experts(received, weights, self.ep_size * tokens)  # [R, H]
        back = self.all_to_all(out, recv_t, send_t)  # [sum(send), H] in the order sent
        return ops.unsorted_segment_sum(back, index, tokens + 1)[:tokens]  # [T, H]

    def _experts(self, tokens, weights, block_tokens: int):
        """tokens [N,H] with their weights [N,E_local] for this rank's experts -> [N,H]: sum over those experts,
        whole over tp, biases added. With a capacity factor the slots are those of the block's `block_tokens`
        tokens (the received rows keep the block's token order, so they fill the same slots)."""
        n, hidden = tokens.shape
        capacity = expert_capacity(block_tokens, self.config) if self.config is not None else 0
        if capacity:  # this rank's experts on their slots of the block's tokens, in token order
            entered = self.enter_tp(ops.cast(tokens, self.compute_dtype))
            out = self.reduce_tp(capacity_combine(self._partial_swiglu, entered, self.weights_tp(weights), capacity))
            if self.w2.has_bias:  # from the weights themselves: the bias path's gradient is whole on every tp rank
                kept = capacity_slots(weights, capacity)[2]  # [N, E_local]
                out = out + ops.matmul(ops.cast(kept, self.compute_dtype), ops.cast(self.w2.bias, self.compute_dtype))
            return out
        stacked = ops.broadcast_to(ops.expand_dims(self.enter_tp(ops.cast(tokens, self.compute_dtype)), 0),
                                   (self.local, n, hidden))  # [E_local, N, H]
        partial = self._partial_swiglu(stacked)  # [E_local, N, H], partial over tp
        out = self.reduce_tp(weighted_sum(partial, self.weights_tp(weights)))  # [N, H]
        if self.w2.has_bias:
            out = out + ops.matmul(ops.cast(weights, self.compute_dtype),
                                   ops.cast(self.w2.bias, self.compute_dtype))  # sum_e C[:, e] * b_e
        return out

    def _partial_swiglu(self, stacked):
        """[E_local, C, H] -> [E_local, C, H], partial over tp (no bias)."""
        return self.w2.project(ops.silu(self.w1.project(stacked)) * self.w3.project(stacked))


class TensorParallelFFN(nn.Cell):
    """Qwen2-MoE's shared expert under tp: a SwiGLU whose input enters the tp region here (CopyToRegion), its w1/w3
    column-parallel and w2 row-parallel (all-reduce). x [T,H] -> [T,H]."""

    def __init__(self, w1: np.ndarray, w3: np.ndarray, w2: np.ndarray, tp_group: comm.Group, compute_dtype=ms.float32):
        super().__init__()
        self.w1 = ColumnParallelLinear(w1, compute_dtype)
        self.w3 = ColumnParallelLinear(w3, compute_dtype)
        self.w2 = RowParallelLinear(w2, None, tp_group, False, compute_dtype)
        self.enter = comm.CopyToRegion(tp_group)

    def construct(self, x):
        x = self.enter(x)
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


def apply_expert_parallel(model, weights, groups, layer_range: Tuple[int, int]) -> None:
    """Swap in this rank's experts (and the tp shared expert) in the sparse layers of `layer_range`, read from
    `weights` (checkpoint.Weights); the routers and gates keep their whole weights from `weights` too."""
    from telechat2_ms.layers import fill_parameter

    cfg, dims = model.config, groups.dims
    tp, tp_rank = dims.tp, groups.coords.tp
    first, end = expert_range(cfg.num_experts, dims.ep, groups.ep.rank)
    dtype = model.compute_dtype
    for i in range(*layer_range):
        if not cfg.is_sparse(i):
            continue
        block = model.model.layers[i].feed_forward
        prefix = f"model.layers.{i}.feed_forward."
        routed, routed_prefix = (block.routed_experts, prefix + "routed_experts.") if hasattr(
            block, "routed_experts") else (block, prefix)
        fill_parameter(routed.router.dense.weight, weights.full(routed_prefix + "router.dense.weight"))

        def local(name):
            return weights.shard(routed_prefix + name, tp, tp_rank)[first:end]

        bias = local("ffn.w2.bias") if cfg.down_bias else None
        routed.ffn = ExpertParallelFFN(local("ffn.w1.weight"), local("ffn.w3.weight"), local("ffn.w2.weight"), bias,
                                       first, groups.ep, groups.tp, dtype, cfg)
        if hasattr(block, "shared_experts"):
            shared = prefix + "shared_experts."
            block.shared_experts = TensorParallelFFN(*(weights.shard(shared + w + ".weight", tp, tp_rank)
                                                       for w in ("w1", "w3", "w2")), groups.tp, dtype)
            fill_parameter(block.shared_experts_gate.weight, weights.full(prefix + "shared_experts_gate.weight"))


def use_static_dispatch(model) -> None:
    """Dispatch by all-gather + reduce-scatter in every ExpertParallelFFN of `model`: shapes that do not depend on
    the routing, for a compiled (ms.jit) step."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, ExpertParallelFFN):
            cell.routed = False


def gather_experts(state, ep_group: comm.Group):
    """{name: Parameter or array} of this rank -> the same with every expert shard gathered over the ep group
    (dim 0: all E experts, still split over tp): what a checkpoint's rank file holds. Every member must call it."""
    out = {}
    for name, value in state.items():
        if getattr(value, "expert_shard", False) and ep_group.size > 1:
            value = comm.all_gather(value, ep_group, 0)
        out[name] = value
    return out


class _SumBothWays(comm.Collectives):
    """Forward all-reduce, backward all-reduce: a statistic every rank sums and then uses whole."""

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class GlobalAuxLoss(nn.Cell):
    """This rank's share [] of the load-balancing loss of the global micro-batch (module docstring) from its sparse
    layers' (assignments, mass) over `local_tokens` rows: the statistics summed over the grad group, model.aux_loss
    over grad_size x local_tokens rows, / grad_size."""

    def __init__(self, cfg, grad_group: comm.Group):
        super().__init__()
        self.cfg, self.size = cfg, grad_group.size
        self.total = _SumBothWays(grad_group)

    def construct(self, stats, local_tokens: int):
        summed = ()
        for assigned, mass in stats:
            summed = summed + ((ops.stop_gradient(self.total(assigned)), self.total(mass)),)
        return aux_loss(self.cfg, summed, local_tokens * self.size) / self.size
