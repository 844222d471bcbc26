"""Dynamic NTK-aware RoPE + mscale against the spec 4.2 formula, computed here independently in numpy/math
(float log as the official code does), and wired into the model against a patched PyTorch reference."""
import math

import numpy as np
import pytest

from telechat2_ms.config import get_config
from telechat2_ms.rope import ntk_parameters, rope_tables_numpy

D = 128


def spec_formula(L, base_seqlen=8192, training_seqlen=8192, theta=10000.0, d=D):
    L = max(L, training_seqlen)
    alpha = max(2 ** math.ceil(math.log(L / base_seqlen, 2) + 1) - 1, 1)
    base = theta * alpha ** (d / (d - 2))
    mscale = 1.0 if L / training_seqlen <= 1 else 0.1 * math.log(L / training_seqlen) + 1
    return alpha, base, mscale


@pytest.mark.parametrize("L", [1, 100, 8192, 8193, 16384, 16385, 32768, 32769, 40000, 65536, 65537, 131072])
def test_parameters_equal_spec_formula(L):
    alpha, base, mscale = spec_formula(L)
    p = ntk_parameters(L, D)
    assert p.alpha == alpha
    assert p.base == pytest.approx(base, rel=1e-12)
    assert p.mscale == pytest.approx(mscale, rel=1e-12)
    inv_freq = (1.0 / (np.float32(base) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))).astype(np.float32)
    np.testing.assert_array_equal(p.inv_freq, inv_freq)


def test_step_table_of_spec():
    """Spec 4.2 worked table: L range -> alpha, base', mscale at the top of the range."""
    table = [(8192, 1, 10000.0, 1.0), (16384, 3, 30527.74, 1.069315), (32768, 7, 72195.86, 1.138629),
             (65536, 15, 156588.32, 1.207944), (131072, 31, 327366.40, 1.277259)]
    for L, alpha, base, mscale in table:
        p = ntk_parameters(L, D)
        assert (p.alpha, round(p.base, 2), round(p.mscale, 6)) == (alpha, base, mscale), L
    assert ntk_parameters(8193, D).alpha == 3 and ntk_parameters(8193, D).mscale == pytest.approx(1.000012, abs=1e-6)
    # alpha uses base_seqlen, mscale uses training_seqlen (a 32K fine-tune with base 8K: alpha 7, mscale 1)
    p = ntk_parameters(32768, D, base_seqlen=8192, training_seqlen=32768)
    assert (p.alpha, p.mscale) == (7, 1.0)


@pytest.mark.parametrize("L", [8192, 8193, 16385, 40000])
def test_rotary_tables_in_graph_equal_numpy_formula(L):
    """The cell that builds cos/sin inside the graph gives the spec tables (fp16-rounded, times mscale)."""
    import mindspore as ms
    from mindspore import Tensor
    from telechat2_ms.rope import RotaryEmbedding

    alpha, base, mscale = spec_formula(L)
    positions = np.arange(L, dtype=np.int32)
    inv_freq = (1.0 / (np.float32(base) ** (np.arange(0, D, 2, dtype=np.float32) / np.float32(D)))).astype(np.float32)
    emb = np.concatenate([positions[:, None] * inv_freq] * 2, -1).astype(np.float32)
    want_cos = (np.cos(emb).astype(np.float16).astype(np.float32) * np.float32(mscale)).astype(np.float16)
    want_sin = (np.sin(emb).astype(np.float16).astype(np.float32) * np.float32(mscale)).astype(np.float16)
    p = ntk_parameters(L, D)
    cos, sin = RotaryEmbedding(True)(Tensor(positions[None]), Tensor(p.inv_freq), Tensor(np.float32(p.mscale)))
    cos, sin = cos.asnumpy()[0, 0], sin.asnumpy()[0, 0]
    # fp32 cos of large angles may differ by an ulp between libms; after fp16 rounding allow one fp16 ulp
    np.testing.assert_allclose(cos, want_cos.astype(np.float32), rtol=0, atol=1e-3 * mscale)
    np.testing.assert_allclose(sin, want_sin.astype(np.float32), rtol=0, atol=1e-3 * mscale)
    assert np.mean(cos == want_cos.astype(np.float32)) > 0.999
    np_cos, _ = rope_tables_numpy(positions, p)
    np.testing.assert_array_equal(np_cos, want_cos.astype(np.float32))


def test_model_beyond_window_matches_reference_with_official_rotary():
    """A tiny model with an 16-token trained window run on 40 tokens (alpha 7, mscale 1.139): logits equal the
    PyTorch reference whose rotary embedding is replaced by the official dynamic formula."""
    torch = pytest.importorskip("torch")
    from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids
    from tests.torch_reference import llama_reference, ms_state_numpy, randomize_biases_and_norms

    cfg = get_config("tiny", training_seqlen=16, base_seqlen=16, initializer_range=0.1)
    model = Telechat2ForCausalLM(cfg, seed=2)
    randomize_biases_and_norms(model)
    ref = llama_reference(cfg, ms_state_numpy(model), fp16_rotary=False)
    seq = 40
    alpha, base, mscale = spec_formula(seq, 16, 16, d=cfg.head_dim)
    assert alpha == 7

    def official_rotary(x, position_ids):
        inv_freq = 1.0 / (base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos().half() * mscale).float(), (emb.sin().half() * mscale).float()

    ref.model.rotary_emb.forward = official_rotary
    ids = np.random.default_rng(0).integers(13, cfg.vocab_size, (1, seq))
    ours = model(to_tensor_ids(ids)).asnumpy()
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids), position_ids=torch.arange(seq)[None]).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    # and the scaling is really active: plain RoPE gives clearly different logits
    plain = llama_reference(cfg, ms_state_numpy(model))
    with torch.no_grad():
        plain_logits = plain(input_ids=torch.from_numpy(ids), position_ids=torch.arange(seq)[None]).logits.numpy()
    assert np.abs(ours - plain_logits).max() > 1e-3
