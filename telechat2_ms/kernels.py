"""Device dispatch for the hot kernels: RMSNorm, rotary embedding, attention and the experts of an MoE layer.

The plain path (ops available on every device, fp32/fp16) is the reference and what CPU runs. With
`use_fused=True` on Ascend the fused kernels are used instead (`ops.rms_norm`, `ops.rotary_position_embedding`,
`ops.flash_attention_score`, GroupedMatmul for the experts: `routed_experts`); each has an `ascend`-marked test
against the plain path. Shapes:
B batch, n query heads, k kv heads, g = n/k, S query length, T key length, d head dim.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from telechat2_ms.cpu import cpu_info

_NEG_INF = float(-3.4028234663852886e38)  # fp32 min, as the official masked_fill(dtype-min)


def cast_to(x, dtype):
    """`x` in `dtype`, without a copy when it already is (a same-dtype Cast copies in PyNative: the fp32
    lm_head of a 3B pipeline stage held twice while generating, research/bench_shard_memory.py)."""
    return x if x.dtype == dtype else ops.cast(x, dtype)


# the row counts weight_matmul computes as (W x^T)^T on CPU (build.setup_device: () on other devices)
SWAP_ROWS = (4, 64) if "avx512f" in cpu_info()[1] else (16, 96)


def weight_matmul(matmul, x2d, weight):
    """x2d [N, in] @ weight [out, in]^T with `matmul`, a MatMul(transpose_b=True). For N within SWAP_ROWS (a decode
    step of several rows, a short prompt's prefill) and out <= 8192 it computes (weight @ x2d^T)^T instead: there
    oneDNN runs x @ W^T on the transposed weight up to 2-4x slower than the same product taken the other way round
    (MindSpore 2.10, scratch timings of bench_100m's layer shapes). On a 2-core AVX2 EPYC from 16 to 96 rows (512
    -> 1408 at 32 rows: 1.05 vs 0.57 ms); on a 2-core AVX-512 Xeon from 4 to 64 rows (768 -> 2048 at 8 rows: 0.57
    vs 0.33 ms; at 3 rows 0.13 vs 0.32, at 128 1.11 vs 1.22). With fewer or more rows, or the vocabulary-sized
    head, the usual form is as fast or faster."""
    rows, out = x2d.shape[0], weight.shape[0]
    if SWAP_ROWS and SWAP_ROWS[0] <= rows <= SWAP_ROWS[1] and out <= 8192:
        return ops.transpose(matmul(weight, x2d), (1, 0))
    return matmul(x2d, weight)


def tiled(small, shape):
    """`small` repeated along its size-1 (or missing leading) axes to `shape`, for a binary op between tensors of
    one shape: in a compiled CPU graph a broadcasting Mul / Add holds about 4x its output's bytes that are never
    reused, for every such op of the graph (measured on MindSpore 2.10: [8,512,768] fp32 * [8,512,1] 8 times in
    one graph, 419 MiB; tiled first, 55 MiB, and 13% faster; broadcast_to instead of tile: 48 MiB but 60% slower).
    Used by the rotary embedding (its tables need no gradient); the norms and biases use `spread` (README
    Performance: the prefill's peak RSS)."""
    lead = len(shape) - len(small.shape)
    small = ops.reshape(small, (1,) * lead + small.shape) if lead else small
    multiples = tuple(s // t for s, t in zip(shape, small.shape))
    return ops.tile(small, multiples) if any(m != 1 for m in multiples) else small


_MATMUL = ops.MatMul()


def row_sums(x):
    """x [..., H] -> [..., 1] sums over the last axis, as the product with a ones column: on CPU a last-axis
    ReduceSum or ReduceMean is 4-6x slower than the matrix-vector product (MindSpore 2.10: [512, 768] fp32
    ReduceMean 1.7 ms in the prefill; [12, 512, 512] ReduceSum 7.7 ms vs 1.3), and the product's gradient is an
    outer product, not a broadcast."""
    width = x.shape[-1]
    return ops.reshape(_MATMUL(ops.reshape(x, (-1, width)), ops.ones((width, 1), x.dtype)), x.shape[:-1] + (1,))


def spread(small, shape):
    """`small` repeated to `shape` [..., H] as an outer product with ones (a K=1 matmul: exact): per-row values
    [..., 1] along the last axis, or a vector [H] over the rows. Like `tiled`, and its gradient is a
    matrix-vector product instead of a ReduceSum (on CPU 4-6x faster, see row_sums)."""
    width = shape[-1]
    if small.shape[-1] == 1:  # [..., 1] -> [M,1] x [1,H]
        out = _MATMUL(ops.reshape(small, (-1, 1)), ops.ones((1, width), small.dtype))
    else:  # [H] -> [M,1] x [1,H]
        out = _MATMUL(ops.ones((math.prod(shape[:-1]), 1), small.dtype), ops.reshape(small, (1, width)))
    return ops.reshape(out, shape)


def rms_norm(x, weight, eps: float, use_fused: bool = False):
    """x [..., H] -> weight * cast(x_fp32 * rsqrt(mean(x_fp32^2) + eps), x.dtype) (spec 1.4). The mean and the
    spreads of the per-row factor and of the weight are matmuls with ones (row_sums, spread)."""
    if use_fused:
        out, _ = ops.rms_norm(x, ops.cast(weight, x.dtype), eps)
        return out
    x32 = ops.cast(x, ms.float32)
    variance = row_sums(ops.square(x32)) / x32.shape[-1]
    normed = ops.cast(x32 * spread(ops.rsqrt(variance + eps), x32.shape), x.dtype)
    return spread(ops.cast(weight, x.dtype), normed.shape) * normed


def swap_halves(x, axis: int = -1):
    """[x1, x2] -> [x2, x1] on `axis`, -1 or 2 (halves of the head dim; _halves)."""
    half = x.shape[axis] // 2
    return ops.concat((_halves(x, axis, half, x.shape[axis]), _halves(x, axis, 0, half)), axis)


def _halves(x, axis: int, start: int, stop: int):
    """x[..., start:stop] on the last axis, x[:, :, start:stop] on axis 2 (the features-first heads, [B,h,d,S])."""
    return x[..., start:stop] if axis == -1 else x[:, :, start:stop]


def apply_rope(x, cos, sin, use_fused: bool = False, axis: int = -1):
    """x [B,h,S,d], cos/sin [B,1,S,d] fp32 -> x * cos + rotate_half(x) * sin in x.dtype, where rotate_half
    [x1, x2] -> [-x2, x1] (NeoX convention); with axis=2 the heads features-first, x [B,h,d,S] and the
    tables [B,1,d,S]. The sign goes on the small sin table instead of x: rotate_half(x) * sin = swap_halves(x) *
    [-sin1, sin2], the same numbers (a negation is exact): the negation runs on the table, not on x."""
    if use_fused:
        return ops.rotary_position_embedding(x, ops.cast(cos, x.dtype), ops.cast(sin, x.dtype), 0)
    half = sin.shape[axis] // 2
    signed_sin = ops.concat((-_halves(sin, axis, 0, half), _halves(sin, axis, half, sin.shape[axis])), axis)
    cos, sin = tiled(ops.cast(cos, x.dtype), x.shape), tiled(ops.cast(signed_sin, x.dtype), x.shape)  # over heads
    return x * cos + swap_halves(x, axis) * sin


ATTENTION_BLOCK = 512  # query rows per block of the blockwise path; it runs from 2 blocks on
ATTENTION_MAX_SCORES = 1 << 23  # query rows x keys of one block per head (longer prompts: fewer rows per block)


def attention(q, k, v, allowed, use_fused: bool = False, blockwise=None, grad_softmax: bool = False):
    """Scaled dot-product attention with GQA.

    q [B,n,S,d], k/v [B,k,T,d] (or [B*k,T,d]: an in-place cache as it lies, layers.kv_cache), allowed [B,1,S,T]
    bool (True = may attend) -> out [B,n,S,d].
    Query head j uses kv head j // g. Queries are scaled by 1/sqrt(d) before QK^T (exact when d is a power of 4,
    ~1e-7 relative otherwise); scores are masked and soft-maxed in fp32. A causal call (S = T, every caller's
    mask is causal: prefill, training, scoring) of S >= 2 x ATTENTION_BLOCK runs blockwise (`blockwise`, the
    caller's BlockwiseAttention:
    the blocks above the diagonal skipped, memory O(S x block) instead of O(S^2)); shorter ones, and decoding
    against a cache, run dense. `grad_softmax`: the dense softmax is LastAxisSoftmax (for the compiled training
    graphs, its backward holds less memory), else MindSpore's own: a Cell with a custom bprop in a forward-only
    compiled graph made it far slower (the serving benchmark's Qwen2, 8 layers: a decode step of 1 row 66.6 ms
    against 31.6 ms with the plain softmax).
    """
    batch, n_heads, seq, dim = q.shape
    stacked = len(k.shape) == 3  # [B*k,T,d]
    kv_heads = k.shape[0] // batch if stacked else k.shape[1]
    group = n_heads // kv_heads
    scale = 1.0 / math.sqrt(dim)
    if blockwise is not None and not use_fused and not stacked and seq == k.shape[2] and seq >= 2 * ATTENTION_BLOCK:
        return blockwise(q, k, v, allowed)
    if use_fused and stacked:
        k = ops.reshape(k, (batch, kv_heads) + k.shape[1:])
        v = ops.reshape(v, (batch, kv_heads) + v.shape[1:])
    if use_fused:
        k_rep = ops.repeat_interleave(k, group, 1) if group > 1 else k
        v_rep = ops.repeat_interleave(v, group, 1) if group > 1 else v
        masked = ops.logical_not(allowed).astype(ms.uint8)  # 1 = masked, [B,1,S,T]
        return ops.flash_attention_score(q, k_rep, v_rep, n_heads, attn_mask=masked, scalar_value=scale,
                                         input_layout="BNSD")
    qg = ops.reshape(q * scale, k.shape[:-2] + (group * seq, dim))  # [B,k,g*S,d] or [B*k,g*S,d]
    scores = ops.cast(ops.BatchMatMul(transpose_b=True)(qg, k), ms.float32)  # [B,k,g*S,T] or [B*k,g*S,T]
    scores = scores + ops.reshape(masking_bias(allowed, kv_heads, group, batch), scores.shape)  # masked: fp32 min
    probs = softmax(scores, grad_softmax)
    out = ops.BatchMatMul()(ops.cast(probs, v.dtype), v)  # [B,k,g*S,d]
    return ops.reshape(out, (batch, n_heads, seq, dim))


class LastAxisSoftmax(nn.Cell):
    """softmax over the last axis whose backward has no broadcasting op: dx = y * (dy - rowsum(y * dy)), the row
    sums [M,1] taken by a [M,T] x [T,1] matmul (row_sums) and spread over the row by a [M,1] x [1,T] one
    (spread), then subtracted same-shape. MindSpore's own softmax backward subtracts them broadcasting, and in a
    compiled CPU graph a broadcasting Sub holds about 4x its output that is never reused (measured on MindSpore
    2.10: 60 MiB more per softmax of [12, 512, 512] fp32, the same speed; the same numbers)."""

    def __init__(self):
        super().__init__()
        self.softmax = ops.Softmax(-1)

    def construct(self, x):
        return self.softmax(x)

    def bprop(self, x, out, dout):
        return (out * (dout - spread(row_sums(out * dout), x.shape)),)


_SOFTMAX = LastAxisSoftmax()


def softmax(scores, grad_softmax: bool):
    """The attention's softmax over the last axis: LastAxisSoftmax for the training graphs (`grad_softmax`), else
    MindSpore's own (attention's docstring)."""
    return _SOFTMAX(scores) if grad_softmax else ops.softmax(scores, -1)


def masking_bias(allowed, kv_heads: int, group: int, batch: int):
    """allowed [B or 1,1,S,T] bool -> additive fp32 bias [batch,k,g*S,T]: 0 where allowed, fp32 min where not.

    Adding it equals the official masked_fill(dtype-min) exactly: s + min rounds to min for any |s| < 1e31, and
    a row with no allowed key becomes uniform either way. It is tiled to the full score shape (a mask shared by
    the batch, too): on CPU a same-shape add is ~2.4x faster than a broadcasting one (and than select), measured
    at [8,12,512,512], and in a compiled graph a broadcasting add holds about 4x its output that is never reused
    (the training step at 4 x 512 with the causal mask [1,1,S,S]: 192 MiB a layer)."""
    rows, _, seq, keys = allowed.shape
    bias = ops.select(allowed, ops.zeros(allowed.shape, ms.float32), ops.full(allowed.shape, _NEG_INF, dtype=ms.float32))
    bias = ops.tile(ops.reshape(bias, (rows, 1, 1, seq, keys)), (batch // rows, kv_heads, group, 1, 1))  # [B,k,g,S,T]
    return ops.reshape(bias, (batch, kv_heads, group * seq, keys))


def attention_block(seq: int) -> int:
    """Query rows per block of the blockwise path for a sequence of `seq` (no max/min and no call of another
    module function: BlockwiseAttention's bprop graph under ms.jit compiles neither)."""
    block = ATTENTION_BLOCK if ATTENTION_BLOCK * seq <= ATTENTION_MAX_SCORES else ATTENTION_MAX_SCORES // seq
    return block if block > 0 else 1


class BlockwiseAttention(nn.Cell):
    """Causal attention one block of query rows at a time, each against its causal prefix of keys only (keys
    [0, end of the block)): the blocks above the diagonal are skipped and the S x S scores never exist at once
    (one block's [g x rows, end] per kv head at a time: memory O(S x rows), rows from attention_block). Each
    block is masked by its slice of `allowed` (padding, sliding window) with masking_bias's values and soft-maxed
    whole by the fused softmax kernel; an online-softmax merge over key blocks gives the same numbers but its
    max / exp / sum / broadcast steps cost ~10x the fused softmax on CPU (measured at [12, 512, 512]: softmax
    8 ms, amax 47 ms, exp(s - m) 79 ms, sum 32 ms), so the merge is not used. construct(q [B,n,S,d], k/v
    [B,k,S,d], allowed [B,1,S,S]) -> out [B,n,S,d]. Backward (bprop) recomputes each block's probabilities P:
    dV += P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK += dS^T Q (no S x S tensor either).
    Equal to the dense path on every row with an allowed key (a row with none, a left-padding query, averages
    its prefix where the dense path averages all S keys, and nothing reads it)."""

    def __init__(self, eager: bool = False):
        super().__init__()
        self.eager = eager
        self.matmul = ops.BatchMatMul()
        self.matmul_nt = ops.BatchMatMul(transpose_b=True)
        self.matmul_tn = ops.BatchMatMul(transpose_a=True)
        self.matmul_2d = ops.MatMul()
        self.matmul_2d_nt = ops.MatMul(transpose_b=True)
        self.softmax = ops.Softmax(-1)  # a primitive: a bprop graph under ms.jit fails on the functional ops.softmax

    def _bounds(self, seq: int):
        """[(first, end)] of the query blocks (attention_block's rule written out: a bprop graph under ms.jit
        cannot call a module-level function)."""
        block = ATTENTION_BLOCK if ATTENTION_BLOCK * seq <= ATTENTION_MAX_SCORES else ATTENTION_MAX_SCORES // seq
        block = block if block > 0 else 1
        return [(lo, lo + block if lo + block < seq else seq) for lo in range(0, seq, block)]

    @staticmethod
    def _rows(x5, lo, hi):
        """[B,k,g,S,d] -> rows lo..hi of every head as [B,k,g*(hi-lo),d]."""
        b, kv, g, _, d = x5.shape
        return ops.reshape(x5[:, :, :, lo:hi], (b, kv, g * (hi - lo), d))

    @staticmethod
    def _mask_bias(allowed):
        """A block of `allowed` (bool) -> the additive fp32 bias masking_bias gives: 0 where allowed, fp32 min
        where not (arithmetic: a bprop graph under ms.jit compiles no select)."""
        return (ops.cast(allowed, ms.float32) - 1.0) * -_NEG_INF

    def _probs(self, qi, k, allowed, lo, hi):
        """Scaled queries of rows lo..hi [B,k,g*c,d] against keys [0, hi) -> softmax probabilities [B,k,g*c,hi]
        fp32, masked as the dense path masks (masking_bias's values; broadcast_to and arithmetic, as a bprop
        graph under ms.jit compiles neither select nor tile)."""
        batch, kv_heads, rows, _ = qi.shape
        rows_per_head = hi - lo
        scores = ops.cast(self.matmul_nt(qi, k[:, :, :hi]), ms.float32)  # [B,k,g*c,hi]
        bias = self._mask_bias(allowed[:, :, lo:hi, :hi])  # [B,1,c,hi]
        bias = ops.broadcast_to(ops.reshape(bias, (allowed.shape[0], 1, 1, rows_per_head, hi)),  # mask batch 1 or B
                                (batch, kv_heads, rows // rows_per_head, rows_per_head, hi))
        return self.softmax(scores + ops.reshape(bias, (batch, kv_heads, rows, hi)))

    def _eager_forward(self, q5, k, v, allowed):
        """construct op by op (`eager`): per batch row and kv head, 2-D operands that are contiguous prefixes
        (each head's keys [0, hi) as [hi, d]) and a same-shape mask add. In PyNative the batched form's
        sliced 4-D operands make its matmuls 2-4x slower and its broadcasting mask add ~6x (measured at 32768
        tokens, 256 query rows against 16384 keys, 12 heads: QK^T 196 vs 96 ms contiguous, PV 478 vs 119 ms,
        the add 686 ms vs 25 ms for a same-shape one). q5 [B,k,g,S,d] scaled -> out [B,k,g,S,d]."""
        batch, kv_heads, group, seq, dim = q5.shape
        keys = ops.split(ops.reshape(k, (batch * kv_heads, seq, dim)), 1, 0)  # [1,S,d] each: contiguous
        values = ops.split(ops.reshape(v, (batch * kv_heads, seq, dim)), 1, 0)
        outs = [[] for _ in range(batch * kv_heads)]
        for lo, hi in self._bounds(seq):
            rows = hi - lo
            for b in range(batch):
                bias = self._mask_bias(allowed[b if allowed.shape[0] > 1 else 0, 0, lo:hi, :hi])  # [c,hi]
                bias = ops.tile(bias, (group, 1)) if group > 1 else bias  # [g*c,hi]
                for h in range(kv_heads):
                    i = b * kv_heads + h
                    qi = ops.reshape(q5[b, h, :, lo:hi], (group * rows, dim))
                    scores = self.matmul_2d_nt(qi, ops.reshape(keys[i], (seq, dim))[:hi])
                    scores = scores if scores.dtype == ms.float32 else ops.cast(scores, ms.float32)
                    probs = self.softmax(scores + bias)  # [g*c,hi]
                    vi = ops.reshape(values[i], (seq, dim))[:hi]
                    probs = probs if probs.dtype == vi.dtype else ops.cast(probs, vi.dtype)
                    outs[i].append(ops.reshape(self.matmul_2d(probs, vi), (group, rows, dim)))
        return ops.reshape(ops.stack([ops.concat(o, 1) for o in outs], 0), (batch, kv_heads, group, seq, dim))

    def construct(self, q, k, v, allowed):
        batch, n_heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        group = n_heads // kv_heads
        q5 = ops.reshape(q * (1.0 / math.sqrt(dim)), (batch, kv_heads, group, seq, dim))
        if self.eager:
            return ops.reshape(self._eager_forward(q5, k, v, allowed), (batch, n_heads, seq, dim))
        outs = []
        for lo, hi in self._bounds(seq):
            probs = self._probs(self._rows(q5, lo, hi), k, allowed, lo, hi)
            out = self.matmul(ops.cast(probs, v.dtype), v[:, :, :hi])  # [B,k,g*c,d]
            outs.append(ops.reshape(out, (batch, kv_heads, group, hi - lo, dim)))
        return ops.reshape(ops.concat(outs, 3), (batch, n_heads, seq, dim))

    def bprop(self, q, k, v, allowed, out, dout):
        batch, n_heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        group = n_heads // kv_heads
        scale = dim ** -0.5  # 1 / sqrt(d) (a bprop graph under ms.jit cannot call a module-level function)
        shape5 = (batch, kv_heads, group, seq, dim)
        q5 = ops.reshape(ops.cast(q, ms.float32) * scale, shape5)
        do5 = ops.reshape(ops.cast(dout, ms.float32), shape5)
        delta5 = ops.sum(do5 * ops.reshape(ops.cast(out, ms.float32), shape5), -1, keepdim=True)  # [B,k,g,S,1]
        k32, v32 = ops.cast(k, ms.float32), ops.cast(v, ms.float32)
        dk = ops.zeros((batch, kv_heads, seq, dim), ms.float32)
        dv = ops.zeros((batch, kv_heads, seq, dim), ms.float32)
        dqs = []
        bounds = self._bounds(seq)
        for i in range(len(bounds)):  # (not `for lo, hi in`: a bprop graph under ms.jit cannot unpack there)
            lo, hi = bounds[i]
            qi, doi, delta_i = self._rows(q5, lo, hi), self._rows(do5, lo, hi), self._rows(delta5, lo, hi)
            probs = self._probs(qi, k32, allowed, lo, hi)  # [B,k,g*c,hi]
            ds = probs * (self.matmul_nt(doi, v32[:, :, :hi]) - delta_i)
            dqs.append(ops.reshape(self.matmul(ds, k32[:, :, :hi]), (batch, kv_heads, group, hi - lo, dim)))
            dv_i, dk_i = self.matmul_tn(probs, doi), self.matmul_tn(ds, qi)  # [B,k,hi,d]: keys [0, hi)
            if hi < seq:
                rest = ops.zeros((batch, kv_heads, seq - hi, dim), ms.float32)
                dv_i, dk_i = ops.concat((dv_i, rest), 2), ops.concat((dk_i, rest), 2)
            dv, dk = dv + dv_i, dk + dk_i
        dq = ops.reshape(ops.concat(dqs, 3), (batch, n_heads, seq, dim)) * scale
        return ops.cast(dq, q.dtype), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype), ops.zeros_like(allowed)


def grouped_matmul(x, weight, group_list):
    """Ascend's GroupedMatmul: rows group_list[e-1]..group_list[e] of x [M, in] times weight[e]^T ([E, out, in])
    -> [M, out] (group_list: the cumulative row counts, int64)."""
    from mindspore.ops.auto_generate import grouped_matmul as gmm

    return gmm([x], [weight], group_list=group_list, split_item=3, group_type=0, transpose_b=True)[0]


def grouped_matmul_reference(x, weight, group_list):
    """What `grouped_matmul` computes, with plain ops one group at a time (PyNative: the bounds are read on the
    host): the reference the Ascend kernel is tested against, and the CPU test of `routed_experts`."""
    bounds = [0] + [int(b) for b in group_list.asnumpy()]
    parts = [ops.matmul(x[lo:hi], ops.transpose(weight[e], (1, 0))) for e, (lo, hi) in
             enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]
    return ops.concat(parts, 0) if parts else ops.zeros((0, weight.shape[1]), x.dtype)


def routed_experts(x, combine, top_k: int, w1, w3, w2, bias=None, matmul=None):
    """Dropless routed experts: each token on its k chosen experts only. x [N,H], combine [N,E] (routing weights,
    0 where not chosen), w1/w3 [E,F,H], w2 [E,H,F], bias [E,H] -> [N,H]. The N*k (token, expert) pairs are
    sorted by expert, each expert's rows multiplied by its weights in one grouped matmul (`matmul`, default the
    Ascend kernel), weighted and summed back per token; as layers.ExpertFFN's dense path without its E/k extra
    work (dynamic row counts: Ascend, or PyNative with grouped_matmul_reference)."""
    matmul = matmul or grouped_matmul
    tokens, experts = combine.shape
    top_w, top_e = ops.topk(combine, top_k)  # [N,k]: the chosen experts (their weights are > 0, the others 0)
    flat_e = ops.reshape(top_e, (-1,))  # [N*k]
    order = ops.sort(ops.cast(flat_e, ms.float32))[1]  # pairs sorted by expert
    pair_token = ops.cast(ops.floor_div(order, top_k), ms.int32)  # [N*k]: the token of each sorted pair
    counts = ops.reduce_sum(ops.one_hot(flat_e, experts, ops.ones((), ms.float32), ops.zeros((), ms.float32)), 0)
    group_list = ops.cast(ops.cumsum(counts, 0), ms.int64)  # [E]
    rows = ops.gather(x, pair_token, 0)  # [N*k, H]
    inner = ops.silu(matmul(rows, cast_to(w1, x.dtype), group_list)) * matmul(rows, cast_to(w3, x.dtype), group_list)
    out = matmul(inner, cast_to(w2, x.dtype), group_list)  # [N*k, H]
    if bias is not None:
        out = out + ops.gather(cast_to(bias, x.dtype), ops.gather(flat_e, order, 0), 0)
    weights = ops.gather(ops.reshape(top_w, (-1,)), order, 0)  # [N*k]
    return ops.unsorted_segment_sum(out * ops.expand_dims(ops.cast(weights, out.dtype), -1), pair_token, tokens)


_SQUARED_SUM_CHUNK = 1 << 25  # elements (128 MiB of float32)
_MATMUL_NT = ops.MatMul(transpose_b=True)


def squared_sum(x):
    """sum(x^2) [] of a tensor of any shape, as the trace of a small Gram matrix Y Y^T per piece of at most
    _SQUARED_SUM_CHUNK elements, the piece viewed as Y [r, n/r] (r the largest power of two dividing n, at most 16).
    A matmul, not reduce_sum(square(x)), which materialises x^2 and is 5x slower on CPU; r rows, not one dot
    product, because oneDNN runs a [1,n] x [n,1] product at a fraction of the memory bandwidth (bench_100m's
    110M gradients on the 2-core AVX-512 Xeon: 96 ms as dot products, 48 ms as 16-row Gram matrices, equal to
    float64 within 2.3e-8 relative either way). The pieces bound the buffer the CPU matmul packs its operands
    into (measured: one 65536 x 3072 embedding gradient costs 0.77 GiB more resident memory in one piece, none
    in 128 MiB pieces)."""
    flat = ops.reshape(x, (-1,))  # [N]
    total = None
    for lo in range(0, flat.shape[0], _SQUARED_SUM_CHUNK):
        piece = flat[lo:lo + _SQUARED_SUM_CHUNK] if flat.shape[0] > _SQUARED_SUM_CHUNK else flat
        rows = min(piece.shape[0] & -piece.shape[0], 16)  # the largest power of two dividing n, at most 16
        piece = ops.reshape(piece, (rows, -1))  # [r, n/r]
        part = ops.trace(_MATMUL_NT(piece, piece))  # trace of [r,r]
        total = part if total is None else total + part
    return total if total is not None else ops.zeros((), x.dtype)
