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

The ring and its block math are methods of the RingAttention Cell, so the same code runs op by op and
compiled (ms.jit) under msrun, and in one process over a simulated ring (`simulate_ring`, used by the tests).
Shapes: B batch, n query heads, k kv heads, g = n/k, c chunk length, d head dim; local sequence 2c.
Computation is fp32 (inputs are cast).
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import ops

from telechat2_ms import kernels
from telechat2_ms.parallel.comm import Collectives, Group, ring_shift, uses_send_recv

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


# ---- the ring ------------------------------------------------------------------------------------------

def _pair_plan(cp_rank: int, cp: int):
    """Per ring step s (keys from rank (cp_rank - s) % cp) and pair (i, j) of query chunk i and key chunk j of
    the two this rank and the source hold: "full" (earlier key chunk), "diag" (the same chunk) or "skip"."""
    plan = []
    for step in range(cp):
        source_chunks = zigzag_chunks((cp_rank - step) % cp, cp)
        plan.append(tuple(tuple("full" if k_chunk < q_chunk else ("diag" if k_chunk == q_chunk else "skip")
                                for k_chunk in source_chunks) for q_chunk in zigzag_chunks(cp_rank, cp)))
    return tuple(plan)


class RingAttention(Collectives):
    """Causal GQA attention with context parallelism over `group` (zig-zag layout, see module docstring).

    construct(q [B,n,2c,d], k [B,k,2c,d], v) -> (out [B,n,2c,d] fp32, lse [B,n,2c,1]); the explicit bprop
    ignores the lse gradient (lse is an auxiliary output for the backward). The ring and its block math are
    methods of the Cell, so that construct and bprop compile under ms.jit as well as run op by op (a compiled
    bprop can call its Cell's own methods and primitives, not module-level functions); `exchange` is the ring
    step, one all-gather (CPU emulation) or HCCL point to point (Ascend, op by op only)."""

    def __init__(self, group, scale: float):
        super().__init__(group)
        self.scale = scale
        self.cp, self.cp_rank = group.size, max(group.rank, 0)
        self.source = (self.cp_rank - 1) % self.cp  # the member whose blocks a ring step brings
        self.plan = _pair_plan(self.cp_rank, self.cp)
        self.point_to_point = group.size > 1 and uses_send_recv()
        self.matmul = ops.BatchMatMul()
        self.matmul_nt = ops.BatchMatMul(transpose_b=True)
        self.matmul_tn = ops.BatchMatMul(transpose_a=True)

    # ---- one ring step: send to the next member, receive from the previous one ----------------------------
    def shift(self, x):
        if self.point_to_point:
            return ring_shift(x, self.group, 1)
        return self.all_gather(ops.expand_dims(x, 0), 0)[self.source]

    def exchange(self, message):
        """A tuple of tensors to the next member -> the previous member's tuple (same-shaped ones stacked into
        one transfer)."""
        same = True
        for t in message:
            same = same and t.shape == message[0].shape
        if same:
            moved = self.shift(ops.stack(message, 0))
            return tuple(moved[i] for i in range(len(message)))
        return tuple(self.shift(t) for t in message)

    # ---- block math -----------------------------------------------------------------------------------------
    @staticmethod
    def _bounds(c: int):
        """[(first, end)] query-row blocks of a chunk of c tokens, as kernels.BlockwiseAttention cuts a sequence
        (one block up to kernels.ATTENTION_BLOCK rows; kernels.attention_block's rule written out: a compiled
        bprop cannot call a module-level function): the scores of one block at a time, never all c x c."""
        block = kernels.ATTENTION_BLOCK if kernels.ATTENTION_BLOCK * c <= kernels.ATTENTION_MAX_SCORES \
            else kernels.ATTENTION_MAX_SCORES // c
        block = block if block > 0 else 1
        return [(lo, lo + block if lo + block < c else c) for lo in range(0, c, block)]

    @staticmethod
    def _rows(x, kv_heads: int, lo: int, hi: int):
        """[B,n,c,e] -> rows lo..hi of every query head, grouped by kv head: [B,k,g*(hi-lo),e]."""
        batch, n_heads, _, e = x.shape
        x5 = ops.reshape(x, (batch, kv_heads, n_heads // kv_heads, x.shape[2], e))
        return ops.reshape(x5[:, :, :, lo:hi], (batch, kv_heads, (n_heads // kv_heads) * (hi - lo), e))

    @staticmethod
    def _unrows(parts, n_heads: int):
        """Inverse of _rows over consecutive row blocks: [[B,k,g*r,e]] -> [B,n,c,e]."""
        batch, kv_heads, _, e = parts[0].shape
        g = n_heads // kv_heads
        blocks = [ops.reshape(p, (batch, kv_heads, g, p.shape[2] // g, e)) for p in parts]
        whole = blocks[0] if len(blocks) == 1 else ops.concat(blocks, 3)
        return ops.reshape(whole, (batch, n_heads, whole.shape[3], e))

    def _scores(self, qi, k, kind: str, lo: int, hi: int):
        """Rows lo..hi grouped [B,k,g*r,d] against the keys they see (a diagonal pair's rows lo..hi: keys
        [0, hi), the rest are after every row) -> scores [B,k,g*r,keys] fp32, masked for a diagonal pair."""
        end = hi if kind == "diag" else k.shape[2]
        scores = self.matmul_nt(qi, k[:, :, :end]) * self.scale
        if kind == "diag":
            g = qi.shape[2] // (hi - lo)
            rows = ops.reshape(ops.tile(ops.arange(lo, hi, dtype=ms.int32), (g,)), (-1, 1))  # [g*r,1]
            visible = ops.arange(0, hi, dtype=ms.int32) <= rows  # [g*r, hi]
            scores = ops.select(ops.broadcast_to(visible, scores.shape), scores,
                                ops.full(scores.shape, _MASKED, dtype=ms.float32))
        return scores

    def block_forward(self, q, k, v, kind: str):
        """One (query chunk, key chunk) pair -> (out [B,n,c,d], lse [B,n,c,1]) of softmax attention over it, one
        block of query rows at a time."""
        n_heads, kv_heads = q.shape[1], k.shape[1]
        outs, lses = [], []
        bounds = self._bounds(q.shape[2])
        for b in range(len(bounds)):  # (not `for lo, hi in`: a compiled bprop cannot unpack there)
            lo, hi = bounds[b]
            scores = self._scores(self._rows(q, kv_heads, lo, hi), k, kind, lo, hi)  # [B,k,g*r,keys]
            row_max = ops.amax(scores, -1, True)
            probs = ops.exp(scores - row_max)
            denom = ops.sum(probs, -1, keepdim=True)
            outs.append(self.matmul(probs / denom, v[:, :, :scores.shape[3]]))  # [B,k,g*r,d]
            lses.append(row_max + ops.log(denom))
        return self._unrows(outs, n_heads), self._unrows(lses, n_heads)

    @staticmethod
    def merge(acc, block):
        """Online-softmax merge of two partial results (out, lse) over disjoint key sets."""
        if acc is None:
            return block
        out_a, lse_a = acc
        out_b, lse_b = block
        lse = ops.maximum(lse_a, lse_b) + ops.log(1.0 + ops.exp(-ops.abs(lse_a - lse_b)))  # logaddexp
        return ops.exp(lse_a - lse) * out_a + ops.exp(lse_b - lse) * out_b, lse

    def block_backward(self, q, k, v, lse, dout, delta, kind: str):
        """Gradients of one pair given the final lse and delta = rowsum(dout * out), one block of query rows at a
        time: -> (dq [B,n,c,d], dk [B,k,c,d], dv [B,k,c,d])."""
        n_heads, c, kv_heads = q.shape[1], q.shape[2], k.shape[1]
        dk, dv, dqs = None, None, []
        bounds = self._bounds(c)
        for b in range(len(bounds)):
            lo, hi = bounds[b]
            qi, dout_i = self._rows(q, kv_heads, lo, hi), self._rows(dout, kv_heads, lo, hi)  # [B,k,g*r,d]
            scores = self._scores(qi, k, kind, lo, hi)  # [B,k,g*r,keys]
            end = scores.shape[3]
            probs = ops.exp(scores - self._rows(lse, kv_heads, lo, hi))  # masked entries -> 0
            dv_i = self.matmul_tn(probs, dout_i)  # [B,k,keys,d]
            dprobs = self.matmul_nt(dout_i, v[:, :, :end])  # [B,k,g*r,keys]
            dscores = probs * (dprobs - self._rows(delta, kv_heads, lo, hi))
            dqs.append(self.matmul(dscores, k[:, :, :end]) * self.scale)  # [B,k,g*r,d]
            dk_i = self.matmul_tn(dscores, qi) * self.scale  # [B,k,keys,d]
            if end < c:
                rest = ops.zeros((dk_i.shape[0], kv_heads, c - end, dk_i.shape[3]), dk_i.dtype)
                dk_i, dv_i = ops.concat((dk_i, rest), 2), ops.concat((dv_i, rest), 2)
            if dk is None:
                dk, dv = dk_i, dv_i
            else:
                dk, dv = dk + dk_i, dv + dv_i
        return self._unrows(dqs, n_heads), dk, dv

    @staticmethod
    def _halves(x):
        c = x.shape[2] // 2
        return x[:, :, :c], x[:, :, c:]

    # ---- the ring programs ------------------------------------------------------------------------------------
    def ring_forward(self, q, k, v):
        """q [B,n,2c,d], k/v [B,k,2c,d] (this rank's zig-zag chunks) -> (out [B,n,2c,d], lse [B,n,2c,1])."""
        q_parts = self._halves(q)
        acc0, acc1 = None, None
        for step in range(self.cp):
            k_parts, v_parts = self._halves(k), self._halves(v)
            for j in range(2):
                if self.plan[step][0][j] != "skip":
                    acc0 = self.merge(acc0, self.block_forward(q_parts[0], k_parts[j], v_parts[j], self.plan[step][0][j]))
                if self.plan[step][1][j] != "skip":
                    acc1 = self.merge(acc1, self.block_forward(q_parts[1], k_parts[j], v_parts[j], self.plan[step][1][j]))
            if step < self.cp - 1:
                k, v = self.exchange((k, v))
        return ops.concat((acc0[0], acc1[0]), 2), ops.concat((acc0[1], acc1[1]), 2)

    def ring_backward(self, q, k, v, out, lse, dout):
        """-> (dq, dk, dv) for this rank's q, k, v: (k, v, dk, dv) go around the ring again, each rank adding
        its queries' part to the travelling dk/dv, and one last step brings dk/dv home."""
        q_parts, lse_parts, dout_parts = self._halves(q), self._halves(lse), self._halves(dout)
        delta_parts = self._halves(ops.sum(dout * out, -1, keepdim=True))  # [B,n,c,1] each
        dq0, dq1 = ops.zeros_like(q_parts[0]), ops.zeros_like(q_parts[1])
        dk, dv = ops.zeros_like(k), ops.zeros_like(v)
        for step in range(self.cp):
            k_parts, v_parts = self._halves(k), self._halves(v)
            dk_parts, dv_parts = list(self._halves(dk)), list(self._halves(dv))
            for i in range(2):
                for j in range(2):
                    kind = self.plan[step][i][j]
                    if kind != "skip":
                        dq_b, dk_b, dv_b = self.block_backward(q_parts[i], k_parts[j], v_parts[j], lse_parts[i],
                                                               dout_parts[i], delta_parts[i], kind)
                        if i == 0:
                            dq0 = dq0 + dq_b
                        else:
                            dq1 = dq1 + dq_b
                        dk_parts[j] = dk_parts[j] + dk_b
                        dv_parts[j] = dv_parts[j] + dv_b
            dk, dv = ops.concat((dk_parts[0], dk_parts[1]), 2), ops.concat((dv_parts[0], dv_parts[1]), 2)
            if step < self.cp - 1:
                k, v, dk, dv = self.exchange((k, v, dk, dv))
        if self.cp > 1:  # we hold the gradients of rank (cp_rank + 1)'s block: send them home
            dk, dv = self.exchange((dk, dv))
        return ops.concat((dq0, dq1), 2), dk, dv

    def construct(self, q, k, v):
        return self.ring_forward(ops.cast(q, ms.float32), ops.cast(k, ms.float32), ops.cast(v, ms.float32))

    def bprop(self, q, k, v, out, dout):
        dq, dk, dv = self.ring_backward(ops.cast(q, ms.float32), ops.cast(k, ms.float32), ops.cast(v, ms.float32),
                                        out[0], out[1], dout[0])
        return ops.cast(dq, q.dtype), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype)


class _Pause(Exception):
    """A simulated member reached a ring step whose messages are not known yet."""


class SimulatedRing(RingAttention):
    """Member `rank` of a ring of `cp` simulated in one process (the tests, op by op): ring step s hands over
    the messages every member sent at step s, from `rounds` once they are known (simulate_ring)."""

    def __init__(self, rank: int, cp: int, scale: float, rounds: List, pending: List):
        super().__init__(Group("simulated", tuple(range(cp)), rank), scale)
        self.rounds, self.pending, self.steps = rounds, pending, 0

    def exchange(self, message):
        step, self.steps = self.steps, self.steps + 1
        if step < len(self.rounds):
            return self.rounds[step][(self.cp_rank - 1) % self.cp]
        self.pending[self.cp_rank] = message
        raise _Pause


def simulate_ring(cp: int, scale: float, program: Callable) -> List:
    """program(ring: SimulatedRing) for every member of a simulated ring of cp -> the members' results in rank
    order. One thread (MindSpore's op-by-op runtime is not thread safe): every member runs until its next ring
    step, the messages of that step are recorded, and all run again from the start with one more step known
    (steps^2 / 2 runs of each program; the programs are deterministic)."""
    rounds: List = []
    while True:
        pending: List = [None] * cp
        results: List = [None] * cp
        finished = 0
        for rank in range(cp):
            try:
                results[rank] = program(SimulatedRing(rank, cp, scale, rounds, pending))
                finished += 1
            except _Pause:
                pass
        if finished == cp:
            return results
        if finished or any(message is None for message in pending):
            raise RuntimeError("ring programs went out of lockstep")
        rounds.append(pending)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
