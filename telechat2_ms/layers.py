"""TeleChat2 building blocks as plain MindSpore cells (no parallel code; see telechat2_ms/parallel).

Parameter names follow MindFormers' TeleChat2 (spec 3.2) so checkpoints interoperate:
attention.{wq, wk_v, wo}, feed_forward.{w1 (gate), w3 (up), w2 (down)}, attention_norm, ffn_norm.
TeleChat2: only `wo` and `w2` carry a bias (spec 1.2-1.3). The family switches of ModelConfig give Qwen2 (as
MindFormers' research/qwen2 names it): separate `wk`, `wv`, biases on wq / wk / wv, none on wo / w2. Shapes: B batch, S tokens, H hidden, n heads, k kv heads,
d head dim, F ffn hidden, T key length (S, or the KV-cache length when decoding).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Zero
from mindspore.nn.utils import no_init_parameters

from telechat2_ms import kernels
from telechat2_ms.config import ModelConfig


def host_parameter(array: np.ndarray, name: str) -> Parameter:
    """A Parameter over `array`'s own memory (fp32, C order). `Parameter(Tensor(a))` holds three copies of `a`
    at its peak and `Parameter(Tensor.from_numpy(a))` two (research/bench_shard_memory.py measured the extra
    copy of the 1.5 GiB lm_head as the overage of a pipeline stage); filling a placeholder with `set_data`
    holds one. A view is copied first, so that the parameter does not keep a whole checkpoint tensor alive."""
    param = Parameter(Tensor(np.zeros(1, np.float32)), name=name)
    fill_parameter(param, array)
    return param


def fill_parameter(param: Parameter, array: np.ndarray) -> None:
    """Replace `param`'s data with `array`, holding one copy of it (see host_parameter)."""
    data = np.asarray(array, dtype=np.float32)
    if data.base is not None or not data.flags.c_contiguous or not data.flags.writeable:
        data = np.array(data, dtype=np.float32, order="C")
    param.set_data(Tensor.from_numpy(data))


class ParamInit:
    """Deterministic initialiser: N(0, std) weights from one numpy generator; or, with `zeros`, weights that
    hold no storage yet (a lazy zero initializer: a skeleton to load a checkpoint into, or to cut into one
    rank's shards, without ever materialising the full model; build.py). Parameter() fills a lazy Tensor with its
    zeros unless `no_init_parameters` says not to: virtual memory at first, resident once freed memory is reused
    (the third skeleton of Qwen2-0.5B in one process: +1.3 GiB; the dry-run test of every YAML grew a pytest worker
    to 7-11 GiB). An unloaded weight is initialized to its zeros when a graph runs, as before; read eagerly it is an
    error instead of zeros."""

    def __init__(self, seed: int = 0, std: float = 0.02, zeros: bool = False):
        self.rng = np.random.default_rng(seed)
        self.std = std
        self.zeros = zeros

    def normal(self, shape, name):
        if self.zeros:
            with no_init_parameters():
                return Parameter(Tensor(shape=tuple(shape), dtype=ms.float32, init=Zero()), name=name)
        data = self.rng.standard_normal(shape, dtype=np.float32)
        data *= np.float32(self.std)
        return host_parameter(data, name)

    @staticmethod
    def constant(shape, value, name):
        return host_parameter(np.full(shape, value, np.float32), name)


class Linear(nn.Cell):
    """y = x @ weight^T (+ bias). weight [out, in] as in PyTorch and MindFormers; x [..., in] -> [..., out]."""

    def __init__(self, in_features: int, out_features: int, has_bias: bool, init: ParamInit,
                 compute_dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = init.normal((out_features, in_features), "weight")
        self.has_bias = has_bias
        self.bias = ParamInit.constant((out_features,), 0.0, "bias") if has_bias else None
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        lead = x.shape[:-1]
        x2d = ops.reshape(ops.cast(x, self.compute_dtype), (-1, x.shape[-1]))  # [B*S, in]
        y = kernels.weight_matmul(self.matmul, x2d, kernels.cast_to(self.weight, self.compute_dtype))  # [B*S,out]
        if self.has_bias:
            y = y + kernels.spread(ops.cast(self.bias, self.compute_dtype), y.shape)
        return ops.reshape(y, lead + (self.out_features,))


class Embedding(nn.Cell):
    """input_ids [B,S] -> [B,S,H]; parameter `embedding_weight` [V,H] (MindFormers name)."""

    def __init__(self, vocab_size: int, hidden_size: int, init: ParamInit, compute_dtype=ms.float32):
        super().__init__()
        self.embedding_weight = init.normal((vocab_size, hidden_size), "embedding_weight")
        self.compute_dtype = compute_dtype

    def construct(self, input_ids):
        return ops.cast(ops.gather(self.embedding_weight, input_ids, 0), self.compute_dtype)


class RMSNorm(nn.Cell):
    """x [..., H] -> RMS-normalised x times `weight` [H] (fp32 variance)."""

    def __init__(self, hidden_size: int, eps: float, use_fused: bool = False):
        super().__init__()
        self.weight = ParamInit.constant((hidden_size,), 1.0, "weight")
        self.eps = eps
        self.use_fused = use_fused

    def construct(self, x):
        return kernels.rms_norm(x, self.weight, self.eps, self.use_fused)


class Attention(nn.Cell):
    """Causal self-attention with a fused, per-kv-head interleaved key_value projection (spec 1.2, 10.1).

    wk_v output rows are [K_h0 (d), V_h0 (d), K_h1, V_h1, ...]: viewed as [B,S,k,2,d] and split on axis 3.
    """

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, use_fused: bool = False):
        super().__init__()
        self.head_dim = cfg.head_dim
        H = cfg.hidden_size
        self.separate_kv = cfg.separate_kv
        self.wq = Linear(H, cfg.num_heads * cfg.head_dim, cfg.qkv_bias, init, compute_dtype)
        if cfg.separate_kv:
            self.wk = Linear(H, cfg.kv_dim, cfg.qkv_bias, init, compute_dtype)
            self.wv = Linear(H, cfg.kv_dim, cfg.qkv_bias, init, compute_dtype)
        else:
            self.wk_v = Linear(H, 2 * cfg.kv_dim, cfg.qkv_bias, init, compute_dtype)
        self.wo = Linear(cfg.num_heads * cfg.head_dim, H, cfg.out_bias, init, compute_dtype)
        self.use_fused = use_fused
        self.blockwise = None  # use_blockwise_attention: long causal calls blockwise (kernels.attention)
        self.head_views = False  # use_training_kernels: the heads' transposes as strided views (compiled training)
        self.features_first = False  # use_training_kernels: a training call's heads as [B*h,d,S] (_features_first)
        self.grad_softmax = False  # use_training_kernels: kernels.LastAxisSoftmax (training)
        self.ring = None  # context parallel: RingAttention (attend)

    @property
    def local_kv_heads(self) -> int:
        """kv heads this cell computes (tensor parallel shrinks the projections)."""
        if self.separate_kv:
            return self.wk.out_features // self.head_dim
        return self.wk_v.out_features // (2 * self.head_dim)

    def _heads_first(self, x):
        """[B,S,h,d] <-> [B,h,S,d]: a Transpose, or with `head_views` a strided view (use_training_kernels)."""
        if self.head_views:
            return ms.mint.permute(x, (0, 2, 1, 3))
        return ops.transpose(x, (0, 2, 1, 3))

    def project_qkv(self, x, cos, sin):
        """x [B,S,H] -> q [B,n,S,d], k, v [B,k,S,d] with rotary applied to q and k."""
        batch, seq = x.shape[0], x.shape[1]
        n_heads = self.wq.out_features // self.head_dim  # local head counts (tensor parallel shrinks them)
        q = self._heads_first(ops.reshape(self.wq(x), (batch, seq, n_heads, self.head_dim)))
        if self.separate_kv:
            kv_heads = self.wk.out_features // self.head_dim
            k = ops.reshape(self.wk(x), (batch, seq, kv_heads, self.head_dim))
            v = ops.reshape(self.wv(x), (batch, seq, kv_heads, self.head_dim))
        else:
            kv_heads = self.wk_v.out_features // (2 * self.head_dim)
            kv = ops.reshape(self.wk_v(x), (batch, seq, kv_heads, 2, self.head_dim))  # [B,S,k,2,d]
            k, v = ops.unstack(kv, 3)  # [B,S,k,d] each (an Unstack is ~17x faster on CPU than kv[:, :, :, 0])
        k = self._heads_first(k)  # [B,k,S,d]
        v = self._heads_first(v)  # [B,k,S,d]
        q = kernels.apply_rope(q, cos, sin, self.use_fused)
        k = kernels.apply_rope(k, cos, sin, self.use_fused)
        return q, k, v

    def attend(self, q, k, v, allowed):
        """q [B,n,S,d], k/v [B,k,T,d], allowed [B,1,S,T] -> [B,S,H_local] before wo. Under context parallel
        (`ring`, parallel/parallelize.apply_context_parallel) the core is RingAttention over the cp group, its mask
        implied by the zig-zag layout (causal, no padding)."""
        if self.ring is not None:
            out = ops.cast(self.ring(q, k, v)[0], q.dtype)  # [B,n,S_local,d] fp32 -> compute dtype
        else:
            out = kernels.attention(q, k, v, allowed, self.use_fused, self.blockwise, self.grad_softmax)  # [B,n,S,d]
        batch, n_heads, seq, dim = out.shape
        return ops.reshape(self._heads_first(out), (batch, seq, n_heads * dim))

    def construct(self, x, cos, sin, allowed, cache=None, write_slots=None):
        """x [B,S,H]; cos/sin [B,1,S,d]; allowed [B,1,S,T].

        Without `cache`, keys are this call's own tokens (T = S). With `cache` = (k_cache, v_cache), the new
        K/V are written into the cache first and attention runs over all T slots, in one of two forms:
        - functional: k_cache/v_cache [B,k,T,d] tensors and `write_slots` [S,T] float one-hot (row i marks the
          slot of token i); returns updated copies;
        - in place (generation's fast path): k_cache/v_cache Parameters [R*k,T,d] (kv_cache: row b*k + h, R >= B
          cache rows) and `write_slots` [S] or [B,S] int32 slot indices; the S new entries per (b, h) are
          scattered into the Parameters (update_rows) and attention reads the first B rows as [B*k,W,d]: the
          first W = allowed's last axis slots of each row (serving: a decode step reads only the slots its rows
          use).
        Returns (out [B,S,H], (k, v)): the updated cache ([B*k,W,d] in place, [B,k,T,d] functional) or, without a
        cache, this call's K/V ([B,k,S,d]; [B*k,d,S] from the features-first training form, _features_first).
        """
        if self.features_first and cache is None and self.ring is None and not self.use_fused \
                and (self.blockwise is None or x.shape[1] < 2 * kernels.ATTENTION_BLOCK):
            return self._features_first(x, cos, sin, allowed)
        q, k, v = self.project_qkv(x, cos, sin)
        if cache is not None:
            k = _write_cache(cache[0], k, write_slots, allowed.shape[-1])
            v = _write_cache(cache[1], v, write_slots, allowed.shape[-1])
        return self.wo(self.attend(q, k, v, allowed)), (k, v)

    def _features_first(self, x, cos, sin, allowed):
        """The training call (no cache, dense, one kv head per query head: use_training_kernels) with the heads
        features-first, [B*h,d,S], so that no Transpose and no strided view runs: q^T = Wq x^T (the projection's
        swapped form; several rows as a batched matmul with the weight tiled over them) and k^T, v^T likewise,
        rotary along d, scores = (q^T)^T k^T, out^T = v^T P^T (batched matmuls with transposed operands),
        y = (out^T)^T Wo^T. In a compiled CPU graph the Transposes hold about 2x their outputs for the whole
        graph, and a view's consumer copies it strided, single-threaded, between the kernels (README Performance,
        the training step). The same numbers as the heads-first path, the order of the fp32 sums aside.
        Returns (y [B,S,H], (k^T, v^T) [B*k,d,S]): the generation steps, which read the K/V, switch this form off."""
        batch, seq, dim = x.shape[0], x.shape[1], self.head_dim
        rows = ops.cast(x, self.wq.compute_dtype)  # [B,S,H]
        q = ops.reshape(_projected(self.wq, rows), (batch, -1, dim, seq))  # [B,n,d,S]
        if self.separate_kv:
            k = ops.reshape(_projected(self.wk, rows), (batch, -1, dim, seq))
            v = ops.reshape(_projected(self.wv, rows), (batch, -1, dim, seq))
        else:  # wk_v rows per kv head [K (d), V (d)]
            k, v = ops.unstack(ops.reshape(_projected(self.wk_v, rows), (batch, -1, 2, dim, seq)), 2)
        cos_t, sin_t = (ops.transpose(ops.cast(t, rows.dtype), (0, 1, 3, 2)) for t in (cos, sin))  # [B,1,d,S]
        q = kernels.apply_rope(q, cos_t, sin_t, axis=2)
        k = kernels.apply_rope(k, cos_t, sin_t, axis=2)
        heads = q.shape[1]
        q, k, v = (ops.reshape(t, (batch * heads, dim, seq)) for t in (q, k, v))
        scores = ops.cast(_BMM_TN(q * (1.0 / math.sqrt(dim)), k), ms.float32)  # [B*n,S,T]
        scores = scores + ops.reshape(kernels.masking_bias(allowed, heads, 1, batch), scores.shape)
        probs = kernels.softmax(scores, self.grad_softmax)
        out = ops.reshape(_BMM_NT(v, ops.cast(probs, v.dtype)), (batch, -1, seq))  # [B,n*d,S]
        weight = kernels.cast_to(self.wo.weight, self.wo.compute_dtype)
        if batch == 1:
            y = ops.reshape(_MATMUL_TT(ops.reshape(out, out.shape[1:]), weight), (1, seq, -1))  # [1,S,H]
        else:
            y = _BMM_TT(out, _over_rows(weight, batch))  # [B,S,H]
        if self.wo.has_bias:
            y = y + kernels.spread(ops.cast(self.wo.bias, y.dtype), y.shape)
        return y, (k, v)


_MATMUL_TT = ops.MatMul(transpose_a=True, transpose_b=True)
_BMM_TN = ops.BatchMatMul(transpose_a=True)
_BMM_NT = ops.BatchMatMul(transpose_b=True)
_BMM_TT = ops.BatchMatMul(transpose_a=True, transpose_b=True)


def _over_rows(weight, batch: int):
    """weight [out,in] tiled to [B,out,in]: MindSpore's CPU batched matmul does not broadcast (its gradient sums
    the B copies back)."""
    return ops.tile(ops.reshape(weight, (1,) + weight.shape), (batch, 1, 1))


def _projected(linear: Linear, rows):
    """rows [B,S,in] -> [B,out,S] = weight @ row^T for each row, plus the bias along the features (one row: the
    layer's own MatMul(transpose_b=True), its operands swapped; several: a batched matmul, _over_rows)."""
    weight = kernels.cast_to(linear.weight, linear.compute_dtype)
    batch, seq = rows.shape[0], rows.shape[1]
    if batch == 1:
        out = ops.reshape(linear.matmul(weight, ops.reshape(rows, rows.shape[1:])), (1, -1, seq))
    else:
        out = _BMM_NT(_over_rows(weight, batch), rows)
    if linear.has_bias:
        bias = kernels.spread(ops.reshape(ops.cast(linear.bias, weight.dtype), (-1, 1)), out.shape[1:])  # [out,S]
        out = out + kernels.tiled(bias, out.shape)
    return out


def use_blockwise_attention(model, on: bool = True, eager: bool = False) -> None:
    """Long causal calls of every Attention in `model` blockwise (kernels.BlockwiseAttention; `eager`: its form
    for op-by-op runs, one head at a time) or dense. Off by default; generate.Generator turns it on (eager) and
    prefills long prompts uncompiled: MindSpore's compiled CPU graph keeps the outputs of its transposes and
    broadcasts, so a compiled blockwise prefill of 8192 tokens on bench_100m peaks at 10.0 GiB (dense: killed
    at 23 GiB), uncompiled (eager) 3.0 GiB (README, Long prompts)."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, Attention):
            cell.blockwise = kernels.BlockwiseAttention(eager) if on else None


def use_training_kernels(model, compiled: bool = True) -> None:
    """Every Attention in `model` takes the training forms (train/engine.py, research/bench_speed.py):
    - the softmax kernels.LastAxisSoftmax, whose backward holds less memory in a compiled graph (its docstring);
      forward-only graphs keep MindSpore's own softmax (kernels.attention: the custom bprop slows them);
    - `compiled` (the step runs as ms.jit graphs): the heads features-first (Attention._features_first: no
      Transpose and no view), where every query head has its own kv head (GQA would need a broadcasting batched
      matmul, which MindSpore's CPU kernel refuses) and the projections are plain Linear layers (not LoRA's or
      tensor parallel's); else the heads split and merged by strided views (mint.permute) instead of
      Transposes. In a compiled CPU graph a Transpose holds about 2x its output that is never reused (MindSpore
      2.10), and a view's consumer copies it strided, single-threaded, between the kernels (README Performance;
      on an AVX-512 Xeon the bench_100m step at 1 x 512 took 1.78 s on views at 3.30 GiB, 1.44-1.46 s
      features-first at 3.34 GiB; at 4 x 512 in one graph 6.05 s on views at 6.54 GiB, 4.86 s on Transposes at
      7.68 GiB, and later 6.49-7.14 s on views against 5.20-6.46 s features-first, both at 6.27 GiB).
      Generation keeps the Transposes (a compiled prefill runs 15-20% slower on the views)."""
    for _, cell in model.cells_and_names():
        if isinstance(cell, Attention):
            cell.grad_softmax = True
            projections = [cell.wq, cell.wo] + ([cell.wk, cell.wv] if cell.separate_kv else [cell.wk_v])
            one_per_head = cell.wq.out_features == cell.local_kv_heads * cell.head_dim  # no GQA
            cell.features_first = compiled and one_per_head and all(type(p) is Linear for p in projections)
            cell.head_views = compiled  # the calls features-first does not take


def _write_cache(cache, new, write_slots, window: int):
    """Write new [B,k,S,d] into a cache (the two forms of Attention.construct) -> the cache as [B*k,W,d] (in
    place) or [B,k,T,d] (the functional form: exact, every output is either the old value or one new value
    times 1 plus zeros)."""
    if len(cache.shape) == 3:
        return scatter_rows(cache, new, write_slots, window)
    keep = 1.0 - ops.reduce_sum(write_slots, 0)  # [T]: 0 where a new token lands
    placed = ops.matmul(ops.cast(ops.transpose(write_slots, (1, 0)), new.dtype), new)  # [T,S]@[B,k,S,d]->[B,k,T,d]
    return cache * ops.reshape(ops.cast(keep, cache.dtype), (1, 1, -1, 1)) + placed


def kv_cache(rows: int, slots: int, head_dim: int, dtype, name: str) -> Parameter:
    """An in-place cache Parameter of zeros [rows, slots, d] (rows: batch rows x kv heads, row b*k + h; the
    layout the decode step's batched matmuls read as it lies: reading it through a reshape copies it whole on
    CPU, 0.66 ms a read at 8 x 12 x 640 x 64 fp32, 15.7 ms of bench_100m's ~58 ms decode step at 8 rows)."""
    return Parameter(Tensor(np.zeros((rows, slots, head_dim), ms.dtype_to_nptype(dtype))), name=name,
                     requires_grad=False)


# Writes of fewer pairs than the cache's (row, slot) entries / OVERWRITE_RATIO take the two in-place scatters
# (update_rows); the per-pair scatters cost about as much per pair as ScatterNdUpdate's copy per 25 entries
# (scratch, 2-core Xeon, [96, 640, 64] fp32: 0.6 us a pair against a 1.4 ms copy).
OVERWRITE_RATIO = 25


def update_rows(cache, index, values):
    """cache Parameter [N,T,d], index [n,2] int32 (cache row, slot) pairs, values [n,d] -> the Parameter with
    those entries replaced, in place. ScatterNdUpdate copies the whole Parameter on CPU (24 writes of 96 pairs
    into [96, 640, 64]: 34 ms); a ScatterNdMin with -inf followed by a ScatterNdMax with the values writes in
    place (3.1 ms) and leaves exactly the values, infinities and NaNs included (max(-inf, x) = x; on CPU min
    (NaN, -inf) = -inf), but it moves each pair on its own: from 1 / OVERWRITE_RATIO of the entries on the
    copy is cheaper (a 512-token prefill of 8 rows: 113 ms against 768)."""
    if OVERWRITE_RATIO * index.shape[0] >= cache.shape[0] * cache.shape[1]:
        return ops.scatter_nd_update(cache, index, values)
    ops.scatter_nd_min(cache, index, ops.full(values.shape, -math.inf, dtype=values.dtype))  # side effects on a
    return ops.scatter_nd_max(cache, index, values)  # Parameter run in the order written, compiled too


def write_rows(cache, new, slots):
    """In-place cache write: cache Parameter [R*k,T,d] (row b*k + h), new [B,k,S,d] into cache rows 0 .. B - 1,
    slots [S] int32 (the same slots for every row) or [B,S] (each row its own) -> the updated Parameter
    (update_rows)."""
    batch, heads, seq, dim = new.shape
    rows = ops.broadcast_to(ops.reshape(ops.arange(0, batch * heads, dtype=ms.int32), (batch, heads, 1)),
                            (batch, heads, seq))
    slots = ops.broadcast_to(ops.reshape(slots, (-1, 1, seq)), (batch, heads, seq))
    index = ops.reshape(ops.stack((rows, slots), -1), (-1, 2))  # [B*k*S, 2]
    return update_rows(cache, index, ops.reshape(ops.cast(new, cache.dtype), (-1, dim)))


def write_prompts(cache, new, first_row=0):
    """The prefill's cache write: new [B,k,P,d] into slots 0 .. P-1 of cache rows first_row .. first_row + B - 1
    (an int or a [] int32 Tensor), whose slots from P on become zeros (the decode steps write each of them before
    it is attended) -> the updated Parameter. Whole rows, [T,d] each, go in by a ScatterUpdate along axis 0,
    which writes in place: a 512-token prompt into one of 8 rows of bench_100m's caches 0.76 ms a write, against
    1.7 ms for update_rows, which copies the whole cache (profiler, 2-core Xeon); a write of every row is an
    Assign (24 writes of [12, 640, 64]: 4.2 ms against ScatterUpdate's 18.6; scratch)."""
    batch, heads, seq, dim = new.shape
    slots = cache.shape[1]
    rows = ops.reshape(ops.cast(new, cache.dtype), (batch * heads, seq, dim))
    if seq < slots:
        rows = ops.concat((rows, ops.zeros((batch * heads, slots - seq, dim), cache.dtype)), 1)  # [B*k,T,d]
    if batch * heads == cache.shape[0]:  # every row (first_row is 0)
        return ops.assign(cache, rows)
    index = ops.arange(0, batch * heads, dtype=ms.int32)
    if not isinstance(first_row, int) or first_row:
        index = index + first_row * heads
    return ops.scatter_update(cache, index, rows)


def scatter_rows(cache, new, slots, window: int = 0):
    """write_rows into the first B <= R rows, then those rows read back: window W <= T (default T) -> the first
    W slots of the first B rows of the updated cache as [B*k,W,d]: the Parameter itself when B = R and W = T,
    else sliced (a copy), one axis at a time, the axis that leaves fewer entries first (a [:B*k, :W] slice of
    both axes at once runs ~40x slower on CPU: 16 reads of 16 of 32 rows' first 256 of 1025 slots, [64, 1025,
    64] each, took 234 ms against 6.1 ms; scratch, 2-core Xeon)."""
    rows, window = new.shape[0] * new.shape[1], window or cache.shape[1]
    updated = write_rows(cache, new, slots)
    if rows < cache.shape[0] and rows * cache.shape[1] <= cache.shape[0] * window:
        updated = updated[:rows]
    if window < cache.shape[1]:
        updated = updated[:, :window]
    if rows < updated.shape[0]:
        updated = updated[:rows]
    return updated


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1(x)) * w3(x)); x [B,S,H] -> [B,S,H] (w1 = gate, w3 = up, w2 = down; TeleChat2's w2
    has a bias)."""

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, width: int = 0):
        super().__init__()
        H, F = cfg.hidden_size, width or cfg.ffn_hidden_size
        self.w1 = Linear(H, F, False, init, compute_dtype)
        self.w3 = Linear(H, F, False, init, compute_dtype)
        self.w2 = Linear(F, H, cfg.down_bias, init, compute_dtype)

    def construct(self, x):
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class StackedLinear(nn.Cell):
    """E experts' Linear layers as one stacked weight [E, out, in] (+ bias [E, out]), MindFormers' layout before
    its convert_gmm transpose; x [E, T, in] -> [E, T, out], expert e applied to x[e]. Built from the Parameters
    (`stacked_linear` draws them; parallel/experts.py hands in this rank's shards)."""

    def __init__(self, weight: Parameter, bias: Optional[Parameter], compute_dtype=ms.float32):
        super().__init__()
        self.weight = weight
        self.has_bias = bias is not None
        self.bias = bias
        self.compute_dtype = compute_dtype
        self.matmul = ops.BatchMatMul(transpose_b=True)

    def project(self, x):
        """x [E, T, in] -> [E, T, out] without the bias."""
        return self.matmul(ops.cast(x, self.compute_dtype), kernels.cast_to(self.weight, self.compute_dtype))

    def construct(self, x):
        y = self.project(x)
        if self.has_bias:
            y = y + ops.expand_dims(ops.cast(self.bias, self.compute_dtype), 1)
        return y


def stacked_linear(experts: int, in_features: int, out_features: int, has_bias: bool, init: ParamInit,
                   compute_dtype=ms.float32) -> StackedLinear:
    """A StackedLinear with weights drawn by `init` and zero biases."""
    bias = ParamInit.constant((experts, out_features), 0.0, "bias") if has_bias else None
    return StackedLinear(init.normal((experts, out_features, in_features), "weight"), bias, compute_dtype)


def weighted_sum(expert_out, weights):
    """expert_out [E,T,H], weights [T,E] (0 where a token did not choose the expert) -> [T,H]."""
    per_expert = ops.expand_dims(ops.transpose(ops.cast(weights, expert_out.dtype), (1, 0)), -1)  # [E,T,1]
    return ops.reduce_sum(expert_out * per_expert, 0)


class Router(nn.Cell):
    """x [T,H] -> router logits [T,E] in fp32 (router_dense_type float32: weight and input both fp32)."""

    def __init__(self, cfg: ModelConfig, init: ParamInit):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.num_experts, False, init, ms.float32)

    def construct(self, x):
        return self.dense(ops.cast(x, ms.float32))


def expert_capacity(tokens: int, cfg: ModelConfig) -> int:
    """Slots of each expert for `tokens` tokens: ceil(capacity_factor * k * tokens / E), at most
    `tokens` (no more can choose one expert); 0 when cfg is dropless."""
    if not cfg.moe_capacity_factor:
        return 0
    return min(tokens, int(np.ceil(cfg.moe_capacity_factor * cfg.num_experts_per_tok * tokens / cfg.num_experts)))


def capacity_slots(weights, capacity: int):
    """weights [N,E] fp32 (a token's routing weight for each expert, 0 where not chosen) -> (slot_token [E*C]
    int32: the token (0-based index + 1; 0 = an empty slot) in each of expert e's C slots, filled in token order;
    slot_weight [E*C] fp32, its routing weight; kept [N,E]: `weights` where the token got a slot, else 0). A token
    past an expert's C slots is dropped there."""
    tokens, experts = weights.shape
    chosen = ops.cast(weights > 0, ms.float32)  # [N,E]
    position = ops.cumsum(chosen, 0) - 1.0  # [N,E]: the token's place in each expert's queue
    keep = chosen * ops.cast(position < capacity, ms.float32)
    base = ops.cast(ops.arange(experts), ms.float32) * capacity  # [E]
    trash = float(experts * capacity)  # one extra slot takes every token not placed
    slot = ops.cast(keep * (base + position) + (1.0 - keep) * trash, ms.int32)  # [N,E]
    token = ops.broadcast_to(ops.expand_dims(ops.cast(ops.arange(tokens), ms.float32) + 1.0, 1), (tokens, experts))
    flat_slot = ops.reshape(slot, (-1,))
    slot_token = ops.unsorted_segment_sum(ops.reshape(token * keep, (-1,)), flat_slot, experts * capacity + 1)
    slot_weight = ops.unsorted_segment_sum(ops.reshape(weights * keep, (-1,)), flat_slot, experts * capacity + 1)
    return ops.cast(ops.stop_gradient(slot_token[:-1]), ms.int32), slot_weight[:-1], weights * keep


def capacity_combine(swiglu, x, weights, capacity: int):
    """The experts over their slots: x [N,H], weights [N,E] -> [N,H] = sum over each token's kept experts of its
    weight x expert(x); `swiglu(stacked [E,C,H]) -> [E,C,H]` runs the experts (static shapes: E*C slots)."""
    tokens, hidden = x.shape
    experts = weights.shape[1]
    slot_token, slot_weight, _ = capacity_slots(weights, capacity)
    padded = ops.concat((ops.zeros((1, hidden), x.dtype), x), 0)  # row 0: what an empty slot reads
    stacked = ops.reshape(ops.gather(padded, slot_token, 0), (experts, capacity, hidden))
    out = ops.reshape(swiglu(stacked), (experts * capacity, hidden))
    out = out * ops.expand_dims(ops.cast(slot_weight, out.dtype), -1)
    return ops.unsorted_segment_sum(out, slot_token, tokens + 1)[1:]  # [N,H]


class ExpertFFN(nn.Cell):
    """The E SwiGLU experts, w2(silu(w1 x) * w3 x) (+ w2's bias, TeleChat2), stacked [E, ...], and their weighted
    sum. The dropless path runs every expert on every token and weights the unchosen ones by exactly 0 (E/k times
    the routed work, static shapes: the reference and CPU path); with a capacity factor each expert runs on its
    C slots only (capacity_combine: E*C = capacity_factor x k x N token rows). parallel/experts.py's
    ExpertParallelFFN takes its place under expert and tensor parallelism, with the same construct."""

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, use_fused: bool = False):
        super().__init__()
        E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
        self.w1 = stacked_linear(E, H, F, False, init, compute_dtype)
        self.w3 = stacked_linear(E, H, F, False, init, compute_dtype)
        self.w2 = stacked_linear(E, F, H, cfg.down_bias, init, compute_dtype)
        self.config = cfg
        self.use_fused = use_fused  # Ascend: dropless routed experts on GroupedMatmul (kernels.routed_experts)

    def swiglu(self, stacked):
        """[E,T,H] -> [E,T,H], expert e on stacked[e]."""
        return self.w2(ops.silu(self.w1(stacked)) * self.w3(stacked))

    def construct(self, x, combine):
        """x [T,H], combine [T,E] (each token's weight for each expert, 0 where not chosen) -> [T,H]."""
        experts, (tokens, hidden) = combine.shape[1], x.shape
        capacity = expert_capacity(tokens, self.config)
        if capacity:
            return capacity_combine(self.swiglu, x, combine, capacity)
        if self.use_fused:
            x = ops.cast(x, self.w1.compute_dtype)
            return kernels.routed_experts(x, combine, self.config.num_experts_per_tok, self.w1.weight, self.w3.weight,
                                          self.w2.weight, self.w2.bias if self.w2.has_bias else None)
        stacked = ops.broadcast_to(ops.expand_dims(x, 0), (experts, tokens, hidden))  # [E,T,H]
        return weighted_sum(self.swiglu(stacked), combine)  # [T,H]


class RoutedExperts(nn.Cell):
    """Top-k routing over E experts (families.md 3): router logits in fp32, softmax over all E, top-k, the k
    weights renormalised to sum 1 when `norm_topk_prob`; out = sum over the k chosen experts of weight *
    expert(x). Dropless: every token reaches its k experts.
    TeleChat2-MoE's feed_forward is this cell (MindFormers' names `feed_forward.router.dense`,
    `feed_forward.ffn.w1/w3/w2` [E, ...]). construct: x [B,S,H] -> (out [B,S,H], assignments [E] (tokens routed
    to each expert; they sum to k*B*S), probability mass [E] (the softmax summed over tokens)): the
    load-balancing statistics (model.aux_loss)."""

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, use_fused: bool = False):
        super().__init__()
        self.router = Router(cfg, init)
        self.ffn = ExpertFFN(cfg, init, compute_dtype, use_fused)
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob

    def gate(self, x):
        """x [T,H] -> (combine [T,E] fp32: the routing weight of each chosen expert, 0 elsewhere; assignments [E];
        probability mass [E])."""
        probs = ops.softmax(self.router(x), -1)  # [T,E] fp32
        top_p, top_i = ops.topk(probs, self.top_k)  # [T,k]
        if self.norm_topk_prob:
            top_p = top_p / ops.sum(top_p, -1, keepdim=True)
        chosen = ops.one_hot(top_i, self.num_experts, ops.ones((), ms.float32), ops.zeros((), ms.float32))  # [T,k,E]
        combine = ops.reduce_sum(chosen * ops.expand_dims(top_p, -1), 1)  # [T,E]
        return combine, ops.reduce_sum(chosen, (0, 1)), ops.reduce_sum(probs, 0)

    def route(self, x):
        """x [T,H] -> (out [T,H], assignments [E], probability mass [E])."""
        combine, assigned, mass = self.gate(x)
        return self.ffn(x, combine), assigned, mass

    def construct(self, x):
        batch, seq, hidden = x.shape
        out, assigned, mass = self.route(ops.reshape(x, (batch * seq, hidden)))
        return ops.reshape(out, (batch, seq, hidden)), assigned, mass


class SharedExpertMoE(nn.Cell):
    """Qwen2-MoE's feed_forward: routed experts plus a shared expert under a sigmoid gate,
    out = routed(x) + sigmoid(shared_experts_gate(x)) * shared_experts(x), named as MindFormers' qwen2_moe
    (`feed_forward.routed_experts.router.dense`, `feed_forward.routed_experts.ffn.*`,
    `feed_forward.shared_experts.w1/w3/w2`, `feed_forward.shared_experts_gate`). Same outputs as RoutedExperts.
    `shared_entry` (identity here) is where tensor parallelism enters the shared expert's region."""

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, use_fused: bool = False):
        super().__init__()
        self.routed_experts = RoutedExperts(cfg, init, compute_dtype, use_fused)
        self.shared_experts = FeedForward(cfg, init, compute_dtype, cfg.shared_expert_ffn_hidden_size)
        self.shared_experts_gate = Linear(cfg.hidden_size, 1, False, init, compute_dtype)
        self.shared_entry = nn.Identity()

    def construct(self, x):
        batch, seq, hidden = x.shape
        flat = ops.reshape(x, (batch * seq, hidden))
        out, assigned, mass = self.routed_experts.route(flat)
        out = out + ops.sigmoid(self.shared_experts_gate(flat)) * self.shared_experts(self.shared_entry(flat))
        return ops.reshape(out, (batch, seq, hidden)), assigned, mass


class DecoderLayer(nn.Cell):
    """Pre-norm block: h += attention(attention_norm(h)); h += feed_forward(ffn_norm(h)). A `sliding` layer
    takes the second mask of the pair `allowed` (model.layer_masks): keys within the sliding window. A
    `sparse` layer's feed_forward is the MoE block (RoutedExperts, or SharedExpertMoE with a shared expert);
    it returns (h, kv, assignments, probability mass), a dense layer (h, kv)."""

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, use_fused: bool = False,
                 sliding: bool = False, sparse: bool = False):
        super().__init__()
        self.sliding = sliding
        self.sparse = sparse
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_fused)
        self.attention = Attention(cfg, init, compute_dtype, use_fused)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_fused)
        if not sparse:
            self.feed_forward = FeedForward(cfg, init, compute_dtype)
        elif cfg.shared_expert_ffn_hidden_size:
            self.feed_forward = SharedExpertMoE(cfg, init, compute_dtype, use_fused)
        else:
            self.feed_forward = RoutedExperts(cfg, init, compute_dtype, use_fused)

    def construct(self, h, cos, sin, allowed, cache=None, write_slots=None):
        if isinstance(allowed, (tuple, list)):
            allowed = allowed[1] if self.sliding else allowed[0]
        attn_out, new_cache = self.attention(self.attention_norm(h), cos, sin, allowed, cache, write_slots)
        h = h + attn_out
        if self.sparse:
            ffn_out, assigned, mass = self.feed_forward(self.ffn_norm(h))
            return h + ffn_out, new_cache, assigned, mass
        h = h + self.feed_forward(self.ffn_norm(h))
        return h, new_cache
