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


def test_plain_gqa_attention_matches_numpy():
    q = RNG.normal(size=(2, 4, 6, 8)).astype(np.float32)
    k, v = RNG.normal(size=(2, 2, 6, 8)).astype(np.float32), RNG.normal(size=(2, 2, 6, 8)).astype(np.float32)
    allowed = np.tril(np.ones((6, 6), bool))[None, None].repeat(2, 0)
    allowed[1, :, :, :2] = False  # left padding on row 1
    allowed[1, :, :2, 0] = True  # keep every query row non-empty for the softmax comparison
    got = kernels.attention(Tensor(q), Tensor(k), Tensor(v), Tensor(allowed)).asnumpy()
    np.testing.assert_allclose(got, _np_attention(q, k, v, allowed), rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("chunk", [1 << 25, 1000])
def test_squared_sum_matches_float64_in_one_piece_and_in_pieces(monkeypatch, chunk):
    monkeypatch.setattr(kernels, "_SQUARED_SUM_CHUNK", chunk)
    x = np.random.default_rng(0).standard_normal((37, 301)).astype(np.float32)  # 11137 elements: 12 pieces of 1000
    want = float((x.astype(np.float64) ** 2).sum())
    got = float(kernels.squared_sum(Tensor(x)).asnumpy())
    assert abs(got - want) <= 1e-6 * want  # fp32 accumulation over ~1e4 terms
