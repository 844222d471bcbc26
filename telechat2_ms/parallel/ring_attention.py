"""Context parallelism with RingAttention: causal attention over a sequence split across `cp` ranks.

Zig-zag split: the sequence is cut into 2*cp equal chunks; cp rank r holds chunks r and 2*cp-1-r, so every
rank gets the same amount of causal work. Each rank keeps its queries; the key/value blocks travel around
the ring (rank r sends to r+1) for cp steps. Per (query chunk, key chunk) pair the causal structure is known
from the chunk indices alone: earlier key chunk -> fully visible, same chunk -> lower-triangular mask,
later key chunk -> skipped. Block results are merged with the online-softmax (log-sum-exp) rule. Inside a
pair, query rows go one block at a time (kernels.attention_block's rows: 512 up to 16K-token chunks), a diagonal
pair's block against its causal prefix of keys only, so no c x c score matrix exists for long chunks and the
keys after a block's last row are skipped, forward and backward.

Backward is explicit (flash-attention style, no recompute): the forward returns (out, lse); the backward
sends (k, v, dk, dv) around the ring again, each rank adding its queries' contribution to the travelling
dk/dv, and one last step brings dk/dv home. GQA: query head j uses kv head j // (n/k) as in kernels.attention.

The ring logic is written as generators that yield the blocks to send and receive the neighbour's blocks,
so the same code runs under msrun (`ring_driver` over a comm group) and in one process over a simulated
ring (`simulate_ring`, used by the tests). Shapes: B batch, n query heads, k kv heads, g = n/k, c chunk
length, d head dim; local sequence 2c. Computation is fp32 (inputs are cast).
"""
from __future__ import annotations

import math
from typing import Callable, Generator, List, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms import kernels

_MASKED = -1e30  # finite: a diagonal block always leaves each row one visible key, so exp() of this is 0


# ---- zig-zag layout ------------------------------------------------------------------------------------

def zigzag_chunks(cp_rank: int, cp: int) -> Tuple[int, int]:
    """The two global chunk indices (out of 2*cp) held by `cp_rank`."""
    return cp_rank, 2 * cp - 1 - cp_rank


def zigzag_positions(seq_len: int, cp_rank: int, cp: int) -> np.ndarray:
    """Global positions [seq_len / cp] of the tokens held by `cp_rank` (int32)."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context_parallel ({2 * cp})")
    c = seq_len // (2 * cp)
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in zigzag_chunks(cp_rank, cp)]).astype(np.int32)


def zigzag_split(x: np.ndarray, cp_rank: int, cp: int, axis: int = 1) -> np.ndarray:
    """numpy: this rank's part of a full-sequence array (sequence on `axis`)."""
    return np.take(x, zigzag_positions(x.shape[axis], cp_rank, cp), axis=axis)


def zigzag_merge(parts: Sequence[np.ndarray], axis: int = 1) -> np.ndarray:
    """numpy: inverse of zigzag_split over all cp ranks' parts."""
    cp = len(parts)
    seq_len = parts[0].shape[axis] * cp
    out = np.zeros(parts[0].shape[:axis] + (seq_len,) + parts[0].shape[axis + 1:], parts[0].dtype)
    for r, part in enumerate(parts):
        index = [slice(None)] * out.ndim
        index[axis] = zigzag_positions(seq_len, r, cp)
        out[tuple(index)] = part
    return out


# ---- block math ----------------------------------------------------------------------------------------

def _pair_kind(q_chunk: int, k_chunk: int) -> str:
    if k_chunk < q_chunk:
        return "full"
    return "diag" if k_chunk == q_chunk else "skip"


def _row_blocks(c: int) -> List[Tuple[int, int]]:
    """[(first, end)] query-row blocks of a chunk of c tokens, as kernels.BlockwiseAttention cuts a sequence
    (one block up to kernels.ATTENTION_BLOCK rows): the scores of one block at a time, never all c x c."""
    block = kernels.attention_block(c)
    return [(lo, min(lo + block, c)) for lo in range(0, c, block)]


def _rows(x, kv_heads: int, lo: int, hi: int):
    """[B,n,c,e] -> rows lo..hi of every query head, grouped by kv head: [B,k,g*(hi-lo),e]."""
    batch, n_heads, c, e = x.shape
    x5 = ops.reshape(x, (batch, kv_heads, n_heads // kv_heads, c, e))
    return ops.reshape(x5[:, :, :, lo:hi], (batch, kv_heads, (n_heads // kv_heads) * (hi - lo), e))


def _unrows(parts, n_heads: int):
    """Inverse of _rows over consecutive row blocks: [[B,k,g*r,e]] -> [B,n,c,e]."""
    batch, kv_heads, _, e = parts[0].shape
    g = n_heads // kv_heads
    blocks = [ops.reshape(p, (batch, kv_heads, g, p.shape[2] // g, e)) for p in parts]
    whole = blocks[0] if len(blocks) == 1 else ops.concat(blocks, 3)
    return ops.reshape(whole, (batch, n_heads, whole.shape[3], e))


def _keys(kind: str, c: int, hi: int) -> int:
    """Keys a row block sees: a diagonal pair's rows lo..hi see keys [0, hi) (the rest are after every row)."""
    return hi if kind == "diag" else c


def _scores(qi, k, kind: str, scale: float, lo: int, hi: int):
    """Rows lo..hi grouped [B,k,g*r,d] against the keys they see -> scores [B,k,g*r,keys] fp32 (masked for a
    diagonal pair)."""
    end = _keys(kind, k.shape[2], hi)
    scores = ops.BatchMatMul(transpose_b=True)(qi, k[:, :, :end]) * scale
    if kind == "diag":
        g = qi.shape[2] // (hi - lo)
        visible = Tensor(np.tile(np.tril(np.ones((hi, hi), dtype=bool))[lo:hi], (g, 1)))  # [g*r, hi]
        scores = ops.where(visible, scores, ops.full_like(scores, _MASKED))
    return scores


def block_forward(q, k, v, kind: str, scale: float):
    """One (query chunk, key chunk) pair -> (out [B,n,c,d], lse [B,n,c,1]) of softmax attention over it, one
    block of query rows at a time (_row_blocks)."""
    n_heads, c, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    outs, lses = [], []
    for lo, hi in _row_blocks(c):
        scores = _scores(_rows(q, kv_heads, lo, hi), k, kind, scale, lo, hi)  # [B,k,g*r,keys]
        row_max = ops.amax(scores, -1, keepdims=True)
        probs = ops.exp(scores - row_max)
        denom = ops.sum(probs, -1, keepdim=True)
        outs.append(ops.BatchMatMul()(probs / denom, v[:, :, :scores.shape[3]]))  # [B,k,g*r,d]
        lses.append(row_max + ops.log(denom))
    return _unrows(outs, n_heads), _unrows(lses, n_heads)


def merge(acc, block):
    """Online-softmax merge of two partial results (out, lse) over disjoint key sets."""
    if acc is None:
        return block
    out_a, lse_a = acc
    out_b, lse_b = block
    lse = ops.maximum(lse_a, lse_b) + ops.log(1.0 + ops.exp(-ops.abs(lse_a - lse_b)))  # logaddexp
    return ops.exp(lse_a - lse) * out_a + ops.exp(lse_b - lse) * out_b, lse


def block_backward(q, k, v, lse, dout, delta, kind: str, scale: float):
    """Gradients of one pair given the final lse and delta = rowsum(dout * out), one block of query rows at a
    time: -> (dq [B,n,c,d], dk [B,k,c,d], dv [B,k,c,d])."""
    n_heads, c, kv_heads = q.shape[1], q.shape[2], k.shape[1]
    dk, dv, dqs = None, None, []
    for lo, hi in _row_blocks(c):
        qi, dout_i = _rows(q, kv_heads, lo, hi), _rows(dout, kv_heads, lo, hi)  # [B,k,g*r,d]
        scores = _scores(qi, k, kind, scale, lo, hi)  # [B,k,g*r,keys]
        end = scores.shape[3]
        probs = ops.exp(scores - _rows(lse, kv_heads, lo, hi))  # masked entries -> 0
        dv_i = ops.BatchMatMul(transpose_a=True)(probs, dout_i)  # [B,k,keys,d]
        dprobs = ops.BatchMatMul(transpose_b=True)(dout_i, v[:, :, :end])  # [B,k,g*r,keys]
        dscores = probs * (dprobs - _rows(delta, kv_heads, lo, hi))
        dqs.append(ops.BatchMatMul()(dscores, k[:, :, :end]) * scale)  # [B,k,g*r,d]
        dk_i = ops.BatchMatMul(transpose_a=True)(dscores, qi) * scale  # [B,k,keys,d]
        if end < c:
            rest = ops.zeros((dk_i.shape[0], kv_heads, c - end, dk_i.shape[3]), dk_i.dtype)
            dk_i, dv_i = ops.concat((dk_i, rest), 2), ops.concat((dv_i, rest), 2)
        dk, dv = (dk_i, dv_i) if dk is None else (dk + dk_i, dv + dv_i)
    return _unrows(dqs, n_heads), dk, dv


def _halves(x):
    c = x.shape[2] // 2
    return x[:, :, :c], x[:, :, c:]


# ---- ring programs (generators: yield blocks to send, receive the neighbour's) --------------------------

RingProgram = Generator[Tuple[Tensor, ...], Tuple[Tensor, ...], Tuple[Tensor, ...]]


def ring_forward(q, k, v, cp_rank: int, cp: int, scale: float) -> RingProgram:
    """q [B,n,2c,d], k/v [B,k,2c,d] (this rank's zig-zag chunks) -> returns (out [B,n,2c,d], lse [B,n,2c,1])."""
    q_chunks = zigzag_chunks(cp_rank, cp)
    q_parts = _halves(q)
    acc: List = [None, None]
    for step in range(cp):
        source = (cp_rank - step) % cp
        k_parts, v_parts = _halves(k), _halves(v)
        for i, q_chunk in enumerate(q_chunks):
            for j, k_chunk in enumerate(zigzag_chunks(source, cp)):
                kind = _pair_kind(q_chunk, k_chunk)
                if kind != "skip":
                    acc[i] = merge(acc[i], block_forward(q_parts[i], k_parts[j], v_parts[j], kind, scale))
        if step < cp - 1:
            k, v = yield (k, v)
    out = ops.cat([acc[0][0], acc[1][0]], axis=2)
    lse = ops.cat([acc[0][1], acc[1][1]], axis=2)
    return out, lse


def ring_backward(q, k, v, out, lse, dout, cp_rank: int, cp: int, scale: float) -> RingProgram:
    """Returns (dq, dk, dv) for this rank's q, k, v."""
    q_chunks = zigzag_chunks(cp_rank, cp)
    q_parts, lse_parts, dout_parts = _halves(q), _halves(lse), _halves(dout)
    delta_parts = _halves(ops.sum(dout * out, -1, keepdim=True))  # [B,n,c,1] each
    dq_parts = [ops.zeros_like(q_parts[0]), ops.zeros_like(q_parts[1])]
    dk, dv = ops.zeros_like(k), ops.zeros_like(v)
    for step in range(cp):
        source = (cp_rank - step) % cp
        k_parts, v_parts = _halves(k), _halves(v)
        dk_parts, dv_parts = list(_halves(dk)), list(_halves(dv))
        for i, q_chunk in enumerate(q_chunks):
            for j, k_chunk in enumerate(zigzag_chunks(source, cp)):
                kind = _pair_kind(q_chunk, k_chunk)
                if kind == "skip":
                    continue
                dq_b, dk_b, dv_b = block_backward(q_parts[i], k_parts[j], v_parts[j], lse_parts[i],
                                                  dout_parts[i], delta_parts[i], kind, scale)
                dq_parts[i] = dq_parts[i] + dq_b
                dk_parts[j] = dk_parts[j] + dk_b
                dv_parts[j] = dv_parts[j] + dv_b
        dk, dv = ops.cat(dk_parts, axis=2), ops.cat(dv_parts, axis=2)
        if step < cp - 1:
            k, v, dk, dv = yield (k, v, dk, dv)
    if cp > 1:  # we hold the gradients of rank (cp_rank + 1)'s block: send them home
        dk, dv = yield (dk, dv)
    return ops.cat(dq_parts, axis=2), dk, dv


def ring_driver(program: RingProgram, exchange: Callable[[Tuple[Tensor, ...]], Tuple[Tensor, ...]]):
    """Run one rank's ring program; `exchange` sends a tuple to the next rank and returns the previous
    rank's tuple (all ranks call it the same number of times)."""
    try:
        message = next(program)
        while True:
            message = program.send(exchange(message))
    except StopIteration as stop:
        return stop.value


def simulate_ring(programs: Sequence[RingProgram]) -> List[Tuple[Tensor, ...]]:
    """Run cp ranks' programs in lockstep in one process; the exchange is a list rotation (r -> r+1)."""
    results: List = [None] * len(programs)
    messages = [next(p) for p in programs]
    while True:
        received = [messages[(r - 1) % len(programs)] for r in range(len(programs))]
        messages = []
        for r, program in enumerate(programs):
            try:
                messages.append(program.send(received[r]))
            except StopIteration as stop:
                results[r] = stop.value
        if all(result is not None for result in results):
            return results
        if any(result is not None for result in results):
            raise RuntimeError("ring programs went out of lockstep")


def group_exchange(group) -> Callable:
    """Exchange over a comm group: same-shaped tensors are stacked and shifted in one collective."""
    from telechat2_ms.parallel import comm

    def exchange(message):
        shapes = {tuple(t.shape) for t in message}
        if len(shapes) == 1:
            moved = comm.ring_shift(ops.stack(message, 0), group, 1)
            return tuple(moved[i] for i in range(len(message)))
        return tuple(comm.ring_shift(t, group, 1) for t in message)

    return exchange


class RingAttention(nn.Cell):
    """Causal GQA attention with context parallelism over `group` (zig-zag layout, see module docstring).

    construct(q [B,n,2c,d], k [B,k,2c,d], v) -> (out [B,n,2c,d] fp32, lse [B,n,2c,1]); the explicit bprop
    ignores the lse gradient (lse is an auxiliary output for the backward)."""

    def __init__(self, group, scale: float):
        super().__init__()
        self.group = group
        self.scale = scale
        self.exchange = group_exchange(group)

    def construct(self, q, k, v):
        q, k, v = (ops.cast(t, ms.float32) for t in (q, k, v))
        return ring_driver(ring_forward(q, k, v, self.group.rank, self.group.size, self.scale), self.exchange)

    def bprop(self, q, k, v, out, dout):
        dq, dk, dv = ring_driver(
            ring_backward(ops.cast(q, ms.float32), ops.cast(k, ms.float32), ops.cast(v, ms.float32), out[0],
                          out[1], dout[0], self.group.rank, self.group.size, self.scale), self.exchange)
        return ops.cast(dq, q.dtype), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
