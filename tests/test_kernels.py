"""The device-dispatch kernels: the plain path against numpy formulas (CPU), and each Ascend fused kernel
against the plain path (marked `ascend`, skipped without an NPU)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from telechat2_ms import kernels

RNG = np.random.default_rng(0)


def _np_attention(q, k, v, allowed):
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, 1), np.repeat(v, group, 1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    scores = np.where(allowed, scores, np.finfo(np.float32).min)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def test_plain_rms_norm_matches_formula():
    x, w = RNG.normal(size=(2, 5, 32)).astype(np.float32), RNG.normal(size=32).astype(np.float32)
    want = w * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
    got = kernels.rms_norm(Tensor(x), Tensor(w), 1e-5).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_plain_rope_matches_rotate_half_formula():
    x = RNG.normal(size=(2, 3, 5, 8)).astype(np.float32)
    cos, sin = RNG.normal(size=(2, 1, 5, 8)).astype(np.float32), RNG.normal(size=(2, 1, 5, 8)).astype(np.float32)
    rotated = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    got = kernels.apply_rope(Tensor(x), Tensor(cos), Tensor(sin)).asnumpy()
    np.testing.assert_allclose(got, x * cos + rotated * sin, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 64, 96, 97])
@pytest.mark.parametrize("mode", ["pynative", "jit"])
@pytest.mark.parametrize("swap", [(16, 96), (4, 64)])  # kernels.SWAP_ROWS without and with AVX-512
def test_weight_matmul_equals_numpy_in_either_form(rows, mode, swap, monkeypatch):
    """Rows within SWAP_ROWS take the (W x^T)^T form, the others x W^T: the same product and the same gradients
    (float64 numpy reference, fp32 tolerance)."""
    monkeypatch.setattr(kernels, "SWAP_ROWS", swap)
    x, w = RNG.normal(size=(rows, 24)).astype(np.float32), RNG.normal(size=(40, 24)).astype(np.float32)
    dy = RNG.normal(size=(rows, 40)).astype(np.float32)
    matmul = ms.ops.MatMul(transpose_b=True)

    def loss(x, w):
        return (kernels.weight_matmul(matmul, x, w) * Tensor(dy)).sum()

    grad = ms.value_and_grad(loss, (0, 1))
    value, (dx, dw) = (ms.jit(grad) if mode == "jit" else grad)(Tensor(x), Tensor(w))
    x64, w64, dy64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    np.testing.assert_allclose(value.asnumpy(), ((x64 @ w64.T) * dy64).sum(), rtol=1e-5)
    np.testing.assert_allclose(dx.asnumpy(), dy64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw.asnumpy(), dy64.T @ x64, rtol=1e-5, atol=1e-5)


def test_plain_gqa_attention_matches_numpy():
    q = RNG.normal(size=(2, 4, 6, 8)).astype(np.float32)
    k, v = RNG.normal(size=(2, 2, 6, 8)).astype(np.float32), RNG.normal(size=(2, 2, 6, 8)).astype(np.float32)
    allowed = np.tril(np.ones((6, 6), bool))[None, None].repeat(2, 0)
    allowed[1, :, :, :2] = False  # left padding on row 1
    allowed[1, :, :2, 0] = True  # keep every query row non-empty for the softmax comparison
    got = kernels.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(allowed)).asnumpy()
    np.testing.assert_allclose(got, _np_attention(q, k, v, allowed), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["pynative", "jit"])
def test_last_axis_softmax_backward_equals_mindspores_and_float64(mode):
    """LastAxisSoftmax (the attention's softmax, its backward without a broadcasting op): the same values as
    ops.softmax, gradients equal to MindSpore's own softmax backward within fp32 rounding and to the float64
    formula y * (dy - sum(y * dy)) to fp32 tolerance; rows of -inf-like masked entries included. Rounding: each
    side's error in y * (dy - s) is a few float32 eps times the size of its terms, y * (|dy| + sum|y * dy|)
    (measured on an AVX-512 Xeon, 30 draws: the two sides differ by at most 2.3 eps of it, 2.3e-7 absolute, where
    a fixed atol of 1e-7 failed on one element); held to 8 eps, and masked entries (y = 0) exactly."""
    x = RNG.normal(size=(2, 3, 5, 7)).astype(np.float32) * 3
    x[0, 0, 1, 4:] = kernels._NEG_INF  # masked keys, as the attention's bias gives them
    dy = RNG.normal(size=x.shape).astype(np.float32)
    softmax = kernels.LastAxisSoftmax()

    def ours(x):
        return (softmax(x) * Tensor(dy)).sum()

    def theirs(x):
        return (ms.ops.softmax(x, -1) * Tensor(dy)).sum()

    wrap = ms.jit if mode == "jit" else (lambda fn: fn)
    value, grad = wrap(ms.value_and_grad(ours))(Tensor(x))
    ref_value, ref_grad = wrap(ms.value_and_grad(theirs))(Tensor(x))
    np.testing.assert_array_equal(value.asnumpy(), ref_value.asnumpy())
    x64 = x.astype(np.float64)
    y = np.exp(x64 - x64.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    terms = y * (np.abs(dy) + np.abs(y * dy).sum(-1, keepdims=True))
    gap = np.abs(grad.asnumpy().astype(np.float64) - ref_grad.asnumpy())
    assert np.all(gap <= 8 * np.finfo(np.float32).eps * terms), (gap / np.maximum(terms, 1e-30)).max()
    expected = y * (dy - (y * dy).sum(-1, keepdims=True))
    np.testing.assert_allclose(grad.asnumpy(), expected, rtol=1e-5, atol=1e-6)


def test_attention_with_a_mask_shared_by_the_batch_equals_the_mask_per_row():
    """A [1,1,S,S] causal mask (training: no padding) gives the same output as the same mask repeated per row."""
    q = RNG.normal(size=(3, 4, 6, 8)).astype(np.float32)
    k, v = RNG.normal(size=(3, 2, 6, 8)).astype(np.float32), RNG.normal(size=(3, 2, 6, 8)).astype(np.float32)
    causal = np.tril(np.ones((6, 6), bool))[None, None]
    shared = kernels.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(causal)).asnumpy()
    per_row = kernels.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(causal.repeat(3, 0))).asnumpy()
    np.testing.assert_array_equal(shared, per_row)
    np.testing.assert_allclose(shared, _np_attention(q, k, v, causal.repeat(3, 0)), rtol=1e-5, atol=1e-6)


ascend = pytest.mark.ascend


def _on_ascend():
    try:
        ms.set_device("Ascend")
    except Exception as err:  # noqa: BLE001 - any failure means no NPU here
        pytest.skip(f"no Ascend device: {err}")


@ascend
@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_fused_kernels_match_plain_path_on_ascend(dtype):
    _on_ascend()
    x = Tensor(RNG.normal(size=(2, 16, 64)).astype(np.float32)).astype(dtype)
    w = Tensor(RNG.normal(size=64).astype(np.float32))
    plain, fused = kernels.rms_norm(x, w, 1e-5), kernels.rms_norm(x, w, 1e-5, use_fused=True)
    np.testing.assert_allclose(fused.astype(ms.float32).asnumpy(), plain.astype(ms.float32).asnumpy(), atol=2e-2)
    q = Tensor(RNG.normal(size=(2, 4, 16, 64)).astype(np.float32)).astype(dtype)
    cos = Tensor(RNG.normal(size=(1, 1, 16, 64)).astype(np.float32))
    sin = Tensor(RNG.normal(size=(1, 1, 16, 64)).astype(np.float32))
    np.testing.assert_allclose(kernels.apply_rope(q, cos, sin, True).astype(ms.float32).asnumpy(),
                               kernels.apply_rope(q, cos, sin).astype(ms.float32).asnumpy(), atol=2e-2)
    k = Tensor(RNG.normal(size=(2, 2, 16, 64)).astype(np.float32)).astype(dtype)
    allowed = Tensor(np.tril(np.ones((16, 16), bool))[None, None].repeat(2, 0))
    np.testing.assert_allclose(kernels.attention(q, k, k, allowed, True).astype(ms.float32).asnumpy(),
                               kernels.attention(q, k, k, allowed).astype(ms.float32).asnumpy(), atol=2e-2)


@pytest.mark.parametrize("shape", [(37, 301), (64, 300), (6, 7, 2)])  # odd: 1 row; 16 rows; 2 rows
@pytest.mark.parametrize("chunk", [1 << 25, 1000])
def test_squared_sum_matches_float64_in_one_piece_and_in_pieces(monkeypatch, chunk, shape):
    monkeypatch.setattr(kernels, "_SQUARED_SUM_CHUNK", chunk)
    # (37, 301): 11137 elements, 12 pieces of 1000 (Gram matrices of 8 rows) and a last one of 137 (1 row)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = float((x.astype(np.float64) ** 2).sum())
    got = float(kernels.squared_sum(Tensor(x)).asnumpy())
    assert abs(got - want) <= 1e-6 * want  # fp32 accumulation over ~1e4 terms


def _experts_case(seed=0, tokens=24, experts=4, hidden=32, width=16, k=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    logits = rng.standard_normal((tokens, experts)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, -1)[:, :k]
    combine = np.zeros_like(probs)
    np.put_along_axis(combine, top, np.take_along_axis(probs, top, -1), -1)
    w1, w3 = (rng.standard_normal((experts, width, hidden)).astype(np.float32) * 0.2 for _ in range(2))
    w2 = rng.standard_normal((experts, hidden, width)).astype(np.float32) * 0.2
    bias = rng.standard_normal((experts, hidden)).astype(np.float32) * 0.1
    return x, combine, k, w1, w3, w2, bias


def _dense_experts(x, combine, w1, w3, w2, bias):
    """Every expert on every token, weighted by the routing weights (layers.ExpertFFN's dropless path), numpy."""
    gate, up = np.einsum("th,efh->etf", x, w1), np.einsum("th,efh->etf", x, w3)
    out = np.einsum("etf,ehf->eth", gate / (1 + np.exp(-gate)) * up, w2) + bias[:, None]
    return np.einsum("te,eth->th", combine, out)


def _dense_experts_ms(x, combine, w1, w3, w2, bias):
    """The same dense path in MindSpore ops (autograd reference)."""
    from mindspore import ops

    experts, tokens = combine.shape[1], x.shape[0]
    stacked = ops.broadcast_to(ops.expand_dims(x, 0), (experts,) + tuple(x.shape))
    matmul = ops.BatchMatMul(transpose_b=True)
    out = matmul(ops.silu(matmul(stacked, w1)) * matmul(stacked, w3), w2) + ops.expand_dims(bias, 1)
    return ops.reduce_sum(out * ops.expand_dims(ops.transpose(combine, (1, 0)), -1), 0)


def test_routed_experts_with_the_reference_grouped_matmul_equal_every_expert_on_every_token():
    """kernels.routed_experts (the Ascend GroupedMatmul path) run on CPU with grouped_matmul_reference in its
    kernel's place: the sort by expert, gather, per-token weighting and segment sum give the dense path's output
    (numpy, 1e-5) and the same gradients of x, the routing weights (where chosen) and the expert weights and
    biases as autograd through the dense path (1e-5 of each gradient's largest magnitude)."""
    import mindspore as ms

    x, combine, k, w1, w3, w2, bias = _experts_case()
    args = [Tensor(a) for a in (x, combine, w1, w3, w2, bias)]

    def run(x, combine, w1, w3, w2, bias):
        return kernels.routed_experts(x, combine, k, w1, w3, w2, bias, kernels.grouped_matmul_reference)

    np.testing.assert_allclose(run(*args).asnumpy(), _dense_experts(x, combine, w1, w3, w2, bias), rtol=1e-5,
                               atol=1e-5)
    probe = Tensor(RNG.normal(size=x.shape).astype(np.float32))
    positions = (0, 1, 2, 3, 4, 5)
    routed = ms.grad(lambda *a: (run(*a) * probe).sum(), grad_position=positions)(*args)
    dense = ms.grad(lambda *a: (_dense_experts_ms(*a) * probe).sum(), grad_position=positions)(*args)
    for i, (got, want) in enumerate(zip(routed, dense)):
        got, want = got.asnumpy(), want.asnumpy()
        if i == 1:  # an unchosen expert's routing weight is not an input of the routed path
            got, want = got * (combine > 0), want * (combine > 0)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), i


@ascend
@pytest.mark.parametrize("dtype", [ms.float16, ms.bfloat16])
def test_grouped_matmul_experts_match_the_plain_path_on_ascend(dtype):
    _on_ascend()
    x, combine, k, w1, w3, w2, bias = _experts_case(tokens=64, hidden=128, width=64)
    cast = [Tensor(a).astype(dtype) for a in (x, w1, w3, w2, bias)]
    fused = kernels.routed_experts(cast[0], Tensor(combine), k, *cast[1:])
    plain = kernels.routed_experts(cast[0], Tensor(combine), k, *cast[1:], matmul=kernels.grouped_matmul_reference)
    np.testing.assert_allclose(fused.astype(ms.float32).asnumpy(), plain.astype(ms.float32).asnumpy(), atol=5e-2)
