"""RingAttention (zig-zag context parallel) against full causal attention, in one process.

The ring of cp ranks is simulated (ring_attention.simulate_ring: each member's ring program run up to each
ring step in turn, the steps' messages handed over in lockstep); forward outputs and q/k/v gradients are compared with kernels.attention (the model's plain
attention) differentiated by MindSpore autograd. Tolerance (fp32): max |ring - full| / max |full| <= 1e-5
for the output and each of dq, dk, dv (measured 0.5e-6 to 2.4e-6: summation order only).
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from telechat2_ms import kernels
from telechat2_ms.build import synchronous_cpu_runtime
from telechat2_ms.parallel import ring_attention as ra
from telechat2_ms.parallel.comm import Group

TOL = 1e-5


def _rel_err(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(autouse=True, scope="module")
def _cpu():
    ms.set_device("CPU")
    synchronous_cpu_runtime()


def _inputs(batch, heads, kv_heads, seq, dim, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads, seq, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, seq, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, seq, dim)).astype(np.float32)
    w = rng.standard_normal((batch, heads, seq, dim)).astype(np.float32)  # d loss / d out
    return q, k, v, w


def _reference(q, k, v, w):
    seq = q.shape[2]
    allowed = Tensor(np.tril(np.ones((seq, seq), dtype=bool))[None, None])  # [1,1,S,S]
    weight = Tensor(w)

    def loss(qt, kt, vt):
        return (kernels.attention(qt, kt, vt, allowed) * weight).sum()

    out = kernels.attention(Tensor(q), Tensor(k), Tensor(v), allowed).asnumpy()
    grads = ms.grad(loss, grad_position=(0, 1, 2))(Tensor(q), Tensor(k), Tensor(v))
    return out, [g.asnumpy() for g in grads]


def test_zigzag_layout_round_trip():
    x = np.arange(2 * 16 * 3).reshape(2, 16, 3)
    parts = [ra.zigzag_split(x, r, 4, axis=1) for r in range(4)]
    assert ra.zigzag_positions(16, 1, 4).tolist() == [2, 3, 12, 13]
    np.testing.assert_array_equal(ra.zigzag_merge(parts, axis=1), x)
    with pytest.raises(ValueError, match="divisible by 2 x context_parallel"):
        ra.zigzag_positions(12, 0, 4)


@pytest.mark.parametrize("cp,heads,kv_heads", [(4, 4, 2), (2, 4, 4), (4, 8, 1)])
def test_simulated_ring_matches_full_causal_attention(cp, heads, kv_heads):
    _check_ring(cp, heads, kv_heads, 2, 8 * cp, 8)


@pytest.mark.parametrize("block,cp,heads,kv_heads", [(3, 2, 4, 2), (4, 4, 8, 1), (1, 2, 2, 2)])
def test_ring_local_blocks_run_blockwise(monkeypatch, block, cp, heads, kv_heads):
    """Chunks of 10 tokens cut into query-row blocks of 3 (uneven last block), 4 or 1 rows: each diagonal block
    against its causal prefix only; output and gradients equal full causal attention."""
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", block)
    assert ra.RingAttention._bounds(10) == [(lo, min(lo + block, 10)) for lo in range(0, 10, block)]
    _check_ring(cp, heads, kv_heads, 2, 20 * cp, 8)


def _check_ring(cp, heads, kv_heads, batch, seq, dim):
    q, k, v, w = _inputs(batch, heads, kv_heads, seq, dim)
    ref_out, (ref_dq, ref_dk, ref_dv) = _reference(q, k, v, w)
    scale = ra.default_scale(dim)
    local = [[Tensor(ra.zigzag_split(a, r, cp, axis=2)) for a in (q, k, v, w)] for r in range(cp)]

    fwd = ra.simulate_ring(cp, scale, lambda ring: ring.ring_forward(*local[ring.cp_rank][:3]))
    out = ra.zigzag_merge([o.asnumpy() for o, _ in fwd], axis=2)
    assert _rel_err(out, ref_out) <= TOL

    def backward(ring):
        lq, lk, lv, lw = local[ring.cp_rank]
        return ring.ring_backward(lq, lk, lv, fwd[ring.cp_rank][0], fwd[ring.cp_rank][1], lw)

    bwd = ra.simulate_ring(cp, scale, backward)
    for i, ref in enumerate((ref_dq, ref_dk, ref_dv)):
        got = ra.zigzag_merge([g[i].asnumpy() for g in bwd], axis=2)
        assert _rel_err(got, ref) <= TOL, f"gradient d{'qkv'[i]}: {_rel_err(got, ref)}"


def test_ring_attention_cell_bprop_single_rank():
    """cp = 1: the Cell (custom bprop) inside MindSpore autograd equals plain causal attention."""
    q, k, v, w = _inputs(1, 4, 2, 12, 8, seed=1)
    ref_out, ref_grads = _reference(q, k, v, w)
    cell = ra.RingAttention(Group("solo", (0,), 0), ra.default_scale(8))
    weight = Tensor(w)

    def loss(qt, kt, vt):
        out, _ = cell(qt, kt, vt)
        return (out * weight).sum()

    out, _ = cell(Tensor(q), Tensor(k), Tensor(v))
    assert _rel_err(out.asnumpy(), ref_out) <= TOL
    grads = ms.grad(loss, grad_position=(0, 1, 2))(Tensor(q), Tensor(k), Tensor(v))
    for got, ref in zip(grads, ref_grads):
        assert _rel_err(got.asnumpy(), ref) <= TOL
