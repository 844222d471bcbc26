"""Communication layer for explicit (Megatron-style) parallelism: process groups, collectives, and
autograd-aware region Cells.

Two backends, chosen once per process:
- native (Ascend/HCCL, GPU/NCCL): `ops.AllReduce`, `ops.AllGather`, `ops.ReduceScatter`, `ops.Broadcast`.
- emulated (CPU/mccl, or forced with TELECHAT2_COMM_EMULATE=1): on CPU only AllReduce works inside a
  sub-group (mindspore_cpu_facts.md addendum), and only with op sum (measured: "AllReduce only support
  reduce sum on CPU"), so every other collective is built from AllReduce(sum):
  all-gather = my slice in a zero buffer + all-reduce; reduce-scatter = all-reduce + keep my slice;
  broadcast = non-roots contribute zeros; max/min = all-gather + local reduce; ring shift = blocks placed by rank + all-reduce + pick the
  neighbour's block.

all-to-all (expert parallelism's token dispatch, rows of uneven counts per member): native `ops.AlltoAllV`;
emulated: every member's pieces padded to the largest count, all-gathered, and each member keeps the pieces
addressed to it.

Point-to-point: `ring_shift` (RingAttention's ring step, pipeline generation) and `neighbour_exchange` (the
pipeline's activations forward and gradients back) send on HCCL with `mint.distributed.batch_isend_irecv` on
Ascend (`send_recv`: each member sends only to the members that need its data; MindSpore has it on Ascend only,
in PyNative). Elsewhere (the CPU emulation, GPU) they all-gather and pick, which is correct everywhere and costs
`size` times the bandwidth of a send; the cost model prices the send.

A group of size 1 (and a world of size 1, i.e. a plain `python` run without msrun) makes every op the
identity, so the same model code runs in one process.

Autograd: collectives are wrapped in Cells with an explicit `bprop` that uses only collectives existing on
the device (custom bprop works on CPU in PyNative and ms.jit):

| Cell                 | forward          | backward         | used for                                  |
|----------------------|------------------|------------------|-------------------------------------------|
| CopyToRegion         | identity         | all-reduce       | input of a column-parallel linear (TP)    |
| ReduceFromRegion     | all-reduce       | identity         | output of a row-parallel linear (TP)      |
| GatherFromRegion     | all-gather       | keep my slice    | leave a sharded region (e.g. logits)      |
| GatherFromSPRegion   | all-gather       | reduce-scatter   | sequence parallel: before column-parallel |
| ReduceScatterToSP    | reduce-scatter   | all-gather       | sequence parallel: after row-parallel     |
| AllToAllRows         | all-to-all       | all-to-all back  | expert parallel: token dispatch, combine  |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

_STATE: Dict[str, object] = {"initialized": False, "rank": 0, "world": 1, "emulate": True, "created": {}}
_PRIMS: Dict[Tuple, object] = {}


@dataclass(frozen=True)
class Group:
    """A process group: `ranks` are global ranks in group order; `rank` is this process's index in it
    (-1 when this process is not a member). `name` is the backend's communicator name."""

    name: str
    ranks: Tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"Group({self.name}, ranks={list(self.ranks)}, my index={self.rank})"


# ---- process setup ------------------------------------------------------------------------------------

def launched_by_msrun() -> bool:
    """True inside a process started by msrun: a worker (MS_ROLE=MS_WORKER) or the scheduler (MS_SCHED),
    which runs the same script and must call init() too (it serves the cluster there, then exits)."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def init_distributed() -> Tuple[int, int]:
    """Initialise communication once; returns (rank, world_size). Without msrun: (0, 1) and no init."""
    if _STATE["initialized"]:
        return int(_STATE["rank"]), int(_STATE["world"])
    device = ms.get_context("device_target")
    _STATE["emulate"] = device == "CPU" or os.environ.get("TELECHAT2_COMM_EMULATE", "0") == "1"
    if launched_by_msrun():
        from mindspore import communication

        communication.init()
        _STATE["rank"] = communication.get_rank()
        _STATE["world"] = communication.get_group_size()
    _STATE["initialized"] = True
    return int(_STATE["rank"]), int(_STATE["world"])


def get_rank() -> int:
    return int(_STATE["rank"])


def get_world_size() -> int:
    return int(_STATE["world"])


def is_emulated() -> bool:
    return bool(_STATE["emulate"])


def world_group() -> Group:
    world = get_world_size()
    if world == 1:
        return Group("world", (0,), 0)
    from mindspore.communication import GlobalComm

    return _warm(Group(GlobalComm.WORLD_COMM_GROUP, tuple(range(world)), get_rank()))


def new_group(ranks: Sequence[int], tag: str) -> Group:
    """The group of `ranks` (global ranks, in order). Only members create the communicator (a non-member
    calling create_group fails on CPU); non-members get a Group with rank -1 that they must not use."""
    ranks = tuple(int(r) for r in ranks)
    me = get_rank()
    index = ranks.index(me) if me in ranks else -1
    if len(ranks) == 1:
        return Group(f"{tag}_solo_{ranks[0]}", ranks, index)
    if len(ranks) == get_world_size() and ranks == tuple(range(len(ranks))):
        return world_group()
    name = f"{tag}_" + "_".join(str(r) for r in ranks)
    if index >= 0 and name not in _STATE["created"]:
        from mindspore.communication import create_group

        create_group(name, list(ranks))
        _STATE["created"][name] = ranks
    return _warm(Group(name, ranks, index))


def _warm(group: Group) -> Group:
    """Create every primitive a member may use, now: a compiled graph (ms.jit, e.g. the generation steps)
    can read the primitive cache but not add to it."""
    if group.rank >= 0 and group.size > 1:
        for op in (ops.ReduceOp.SUM,) if is_emulated() else (ops.ReduceOp.SUM, ops.ReduceOp.MAX,
                                                              ops.ReduceOp.MIN, ops.ReduceOp.PROD):
            _prim("allreduce", group, op)
        if not is_emulated():
            _prim("allgather", group)
            _prim("reducescatter", group)
            for root in group.ranks:
                _prim("broadcast", group, root)
        _collectives(group)
    return group


def _collectives(group: Group) -> "Collectives":
    key = ("collectives", group.name)
    if key not in _PRIMS:  # only in PyNative (see _warm)
        _PRIMS[key] = Collectives(group)
    return _PRIMS[key]


def _prim(kind: str, group: Group, *args):
    key = (kind, group.name) + tuple(args)
    if key not in _PRIMS:  # only in PyNative (see _warm)
        if kind == "allreduce":
            _PRIMS[key] = ops.AllReduce(args[0], group.name)
        elif kind == "allgather":
            _PRIMS[key] = ops.AllGather(group.name)
        elif kind == "reducescatter":
            _PRIMS[key] = ops.ReduceScatter(ops.ReduceOp.SUM, group.name)
        elif kind == "broadcast":
            _PRIMS[key] = ops.Broadcast(args[0], group.name)
        elif kind == "alltoallv":
            _PRIMS[key] = ops.AlltoAllV(group.name, args[0])
        else:
            raise ValueError(f"unknown collective {kind}")
    return _PRIMS[key]


def _check_member(group: Group, op: str) -> None:
    if group.rank < 0:
        raise ValueError(f"{op}: rank {get_rank()} is not a member of {group}")


# ---- plain collectives (no autograd; use the Cells below inside differentiated code) -------------------

def all_reduce(x: Tensor, group: Group, op: str = "sum") -> Tensor:
    """Sum (or max/min/prod) of x over the group; every member gets the result."""
    if group.size == 1:
        return x
    _check_member(group, "all_reduce")
    if op not in ("sum", "max", "min", "prod"):
        raise ValueError(f"all_reduce: unknown op {op!r}; expected sum, max, min or prod")
    if op in ("sum", "max"):
        return _collectives(group).all_reduce(x) if op == "sum" else _collectives(group).all_max(x)
    if is_emulated():  # mccl AllReduce only sums: gather every member's x, reduce here
        stacked = all_gather(ops.expand_dims(x, 0), group, dim=0)  # [size, *x.shape]
        return {"min": ops.amin, "prod": ops.prod}[op](stacked, 0)
    reduce_op = {"min": ops.ReduceOp.MIN, "prod": ops.ReduceOp.PROD}[op]
    return _prim("allreduce", group, reduce_op)(x)


def split(x: Tensor, group: Group, dim: int) -> Tensor:
    """My contiguous slice of x along `dim` (no communication)."""
    if group.size == 1:
        return x
    if x.shape[dim] % group.size:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} is not divisible by group size {group.size}")
    return _collectives(group).split(x, dim % x.ndim)


def all_gather(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Concatenate every member's x along `dim` in group order: [.., n, ..] -> [.., size*n, ..]."""
    if group.size == 1:
        return x
    _check_member(group, "all_gather")
    return _collectives(group).all_gather(x, dim % x.ndim)


def reduce_scatter(x: Tensor, group: Group, dim: int = 0) -> Tensor:
    """Sum over the group, then keep my slice along `dim`: [.., size*n, ..] -> [.., n, ..]."""
    if group.size == 1:
        return x
    _check_member(group, "reduce_scatter")
    dim = dim % x.ndim
    if x.shape[dim] % group.size:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[dim]} is not divisible by {group.size}")
    return _collectives(group).reduce_scatter(x, dim)


def broadcast(x: Tensor, group: Group, root: int = 0) -> Tensor:
    """Member `root` (an index in the group)'s x, on every member."""
    if group.size == 1:
        return x
    _check_member(group, "broadcast")
    if is_emulated():
        return all_reduce(x if group.rank == root else ops.zeros_like(x), group)
    return _prim("broadcast", group, group.ranks[root])((x,))[0]


def exchange_counts(send_counts: Sequence[int], group: Group) -> List[int]:
    """Every member's row counts for every other -> how many rows each member sends me (all_to_all's recv)."""
    if group.size == 1:
        return list(send_counts)
    mine = np.zeros((group.size, group.size), np.float32)  # fp32 (the CPU all-reduce's type): exact below 2**24
    mine[group.rank] = send_counts
    return [int(n) for n in all_reduce(Tensor(mine), group).asnumpy()[:, group.rank]]


def all_to_all(x: Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group: Group) -> Tensor:
    """x [sum(send_counts), W]: the first send_counts[0] rows go to member 0, the next to member 1, ... ->
    [sum(recv_counts), W], the rows member 0 sent me first (recv_counts from `exchange_counts`). PyNative only
    (the counts are host values)."""
    if group.size == 1:
        return x
    _check_member(group, "all_to_all")
    width = x.shape[1]
    if not is_emulated():
        out = _prim("alltoallv", group, width)(ops.reshape(x, (-1,)), list(send_counts), list(recv_counts))
        return ops.reshape(out, (sum(recv_counts), width))
    longest = int(all_reduce(Tensor(np.array([max(send_counts)], np.float32)), group, "max").asnumpy()[0]) or 1
    pieces, start = [], 0
    for n in send_counts:
        piece = x[start:start + n] if n else ops.zeros((0, width), x.dtype)
        pieces.append(ops.concat((piece, ops.zeros((longest - n, width), x.dtype)), 0) if n < longest else piece)
        start += n
    every = all_gather(ops.stack(pieces, 0), group, dim=0)  # [size*size, longest, W]: sender-major
    return ops.concat([every[s * group.size + group.rank, :n] for s, n in enumerate(recv_counts) if n], 0)


def uses_send_recv() -> bool:
    """Whether ring_shift and neighbour_exchange send point to point (HCCL on Ascend) rather than all-gather."""
    return not is_emulated() and ms.get_context("device_target") == "Ascend"


def send_recv(sends: Sequence[Tuple[Tensor, int]], receives: Sequence[Tuple[Tensor, int]], group: Group) -> List[Tensor]:
    """Point to point in one batched HCCL call: sends [(tensor, member index)], receives [(a tensor of the shape
    and dtype to receive, member index)] -> the received tensors in the order of `receives`. Every send must
    meet a receive of the same shape on its member (ring_shift and neighbour_exchange pair them). PyNative."""
    from mindspore.mint.distributed import P2POp, batch_isend_irecv

    buffers = [ops.zeros_like(like) for like, _ in receives]
    op_list = ([P2POp("isend", t, group.ranks[m], group.name) for t, m in sends]
               + [P2POp("irecv", b, group.ranks[m], group.name) for b, (_, m) in zip(buffers, receives)])
    for handle in batch_isend_irecv(op_list):
        handle.wait()
    return buffers


def ring_shift(x: Tensor, group: Group, shift: int = 1) -> Tensor:
    """Send x to member (rank+shift) % size and return what member (rank-shift) % size sent.
    Every member must call it with same-shaped x (the ring step of RingAttention and pipeline generation)."""
    if group.size == 1:
        return x
    _check_member(group, "ring_shift")
    source = (group.rank - shift) % group.size
    if uses_send_recv():
        return send_recv([(x, (group.rank + shift) % group.size)], [(x, source)], group)[0]
    stacked = all_gather(ops.expand_dims(x, 0), group, dim=0)  # [size, *x.shape]
    return stacked[source]


def neighbour_exchange(to_next: Tensor, to_prev: Tensor, group: Group) -> Tuple[Tensor, Tensor]:
    """A chain's step (the pipeline's): member i sends to_next to member i+1 and to_prev to member i-1 and gets
    (from_prev, from_next): what member i-1 sent forward and member i+1 sent back (zeros at the chain's ends).
    Every member passes tensors of the same shape (zeros when it has nothing to send)."""
    if group.size == 1:
        return ops.zeros_like(to_next), ops.zeros_like(to_prev)
    _check_member(group, "neighbour_exchange")
    me, last = group.rank, group.size - 1
    if uses_send_recv():
        sends = ([(to_next, me + 1)] if me < last else []) + ([(to_prev, me - 1)] if me > 0 else [])
        received = send_recv(sends, ([(to_next, me - 1)] if me > 0 else []) + ([(to_prev, me + 1)] if me < last else []),
                             group)
        from_prev = received.pop(0) if me > 0 else ops.zeros_like(to_next)
        return from_prev, (received.pop(0) if me < last else ops.zeros_like(to_prev))
    everyone = all_gather(ops.stack([to_next, to_prev], 0), group, dim=0)  # [size*2, *shape]: member-major
    from_prev = everyone[2 * (me - 1)] if me > 0 else ops.zeros_like(to_next)
    return from_prev, (everyone[2 * (me + 1) + 1] if me < last else ops.zeros_like(to_prev))


# ---- autograd-aware regions ----------------------------------------------------------------------------

class AllToAllRows(nn.Cell):
    """Forward all_to_all(x, send_counts, recv_counts); backward the rows sent back the way they came.
    The counts are int32 Tensors [size] (host values, PyNative)."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group

    def construct(self, x, send_counts, recv_counts):
        return all_to_all(x, send_counts.asnumpy().tolist(), recv_counts.asnumpy().tolist(), self.group)

    def bprop(self, x, send_counts, recv_counts, out, dout):
        back = all_to_all(dout, recv_counts.asnumpy().tolist(), send_counts.asnumpy().tolist(), self.group)
        return back, ops.zeros_like(send_counts), ops.zeros_like(recv_counts)


class Collectives(nn.Cell):
    """The sum / gather / scatter collectives of one group as methods, from its primitives made here: what the
    region Cells below derive from, because a compiled (ms.jit) bprop can call its Cell's own methods and
    primitives but not module-level functions (measured: "The func graph is empty"). Dims are non-negative.
    The plain functions above delegate to one instance per group."""

    def __init__(self, group: Group):
        super().__init__()
        self.group = group
        self.size, self.rank = group.size, max(group.rank, 0)
        self.emulated = is_emulated()
        if group.size > 1 and group.rank >= 0:
            self.sum_op = _prim("allreduce", group, ops.ReduceOp.SUM)
            if not self.emulated:
                self.gather_op, self.scatter_op = _prim("allgather", group), _prim("reducescatter", group)
                self.max_op = _prim("allreduce", group, ops.ReduceOp.MAX)

    def all_reduce(self, x):
        if self.size == 1:
            return x
        return self.sum_op(x)

    def all_max(self, x):
        if self.size == 1:
            return x
        if self.emulated:  # mccl AllReduce only sums: every member's x, the max taken here
            return ops.amax(self.all_gather(ops.expand_dims(x, 0), 0), 0)
        return self.max_op(x)

    def split(self, x, dim):
        if self.size == 1:
            return x
        part = x.shape[dim] // self.size
        return ops.narrow(x, dim, self.rank * part, part)

    def all_gather(self, x, dim):
        if self.size == 1:
            return x
        if self.emulated:  # my block in a zero buffer, summed
            pieces = ()
            for i in range(self.size):
                pieces = pieces + ((x if i == self.rank else ops.zeros_like(x)),)
            return self.sum_op(ops.concat(pieces, dim))
        if dim == 0:
            return self.gather_op(x)
        return ops.swapaxes(self.gather_op(ops.swapaxes(x, 0, dim)), 0, dim)

    def reduce_scatter(self, x, dim):
        if self.size == 1:
            return x
        if self.emulated:
            return self.split(self.sum_op(x), dim)
        if dim == 0:
            return self.scatter_op(x)
        return ops.swapaxes(self.scatter_op(ops.swapaxes(x, 0, dim)), 0, dim)


class CopyToRegion(Collectives):
    """Forward identity; backward all-reduce (the input of a column-parallel linear)."""

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class ReduceFromRegion(Collectives):
    """Forward all-reduce; backward identity (the output of a row-parallel linear)."""

    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class _DimRegion(Collectives):
    def __init__(self, group: Group, dim: int):
        super().__init__(group)
        self.dim = dim


class GatherFromRegion(_DimRegion):
    """Forward all-gather along `dim`; backward keep my slice (every member holds the full gradient)."""

    def construct(self, x):
        return self.all_gather(x, self.dim % x.ndim)

    def bprop(self, x, out, dout):
        return (self.split(dout, self.dim % dout.ndim),)


class GatherFromSPRegion(_DimRegion):
    """Sequence parallel -> tensor parallel: forward all-gather along `dim`; backward reduce-scatter
    (each member's gradient for the full sequence is partial over the TP group)."""

    def construct(self, x):
        return self.all_gather(x, self.dim % x.ndim)

    def bprop(self, x, out, dout):
        return (self.reduce_scatter(dout, self.dim % dout.ndim),)


class ReduceScatterToSPRegion(_DimRegion):
    """Tensor parallel -> sequence parallel: forward reduce-scatter along `dim`; backward all-gather."""

    def construct(self, x):
        return self.reduce_scatter(x, self.dim % x.ndim)

    def bprop(self, x, out, dout):
        return (self.all_gather(dout, self.dim % dout.ndim),)
