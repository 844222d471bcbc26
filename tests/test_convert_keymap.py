"""The key map against the real TeleChat2-115B index (963 keys, no weights) and its own invariants."""
import json

import numpy as np
import pytest

from convert.errors import ConversionError
from convert.keymap import (KEY_MAP, Match, check_names_and_shapes, deinterleave_kv, expected_hf, expected_ms,
                            fuse_gate_hidden, fuse_qkv, hf_to_ms_name, interleave_kv, ms_to_hf_names,
                            split_gate_hidden, split_qkv)
from telechat2_ms.config import ModelConfig, get_config


@pytest.fixture
def index_115b(shared_dir):
    ref = shared_dir / "reference" / "telechat2-115b"
    with open(ref / "model.safetensors.index.json") as f:
        index = json.load(f)
    return index, ModelConfig.from_hf_config(str(ref / "config.json"))


def test_115b_index_maps_both_ways_with_config_shapes(index_115b):
    index, cfg = index_115b
    names = list(index["weight_map"])
    assert len(names) == 963 == 10 * cfg.num_layers + 3
    hf_shapes = expected_hf(cfg)
    ms_shapes = expected_ms(cfg)
    assert set(names) == set(hf_shapes)
    mapped = {}
    for name in names:
        match = hf_to_ms_name(name, cfg)
        assert match is not None and match.name is not None and match.expert is None, name
        ms_name = match.name
        assert ms_name in ms_shapes, ms_name
        assert ms_shapes[ms_name] == hf_shapes[name], name  # pure rename, no transposes
        assert [m.name for m in ms_to_hf_names(ms_name, cfg)] == [name]
        mapped[name] = ms_name
    assert len(set(mapped.values())) == 963 and set(mapped.values()) == set(ms_shapes)
    # spot checks against spec 3.1/3.2 for the real sizes (H=8192, k*d=1024, F=40960, V=131072)
    assert hf_shapes["transformer.h.95.self_attention.key_value.weight"] == (2048, 8192)
    assert mapped["transformer.h.95.self_attention.key_value.weight"] == "model.layers.95.attention.wk_v.weight"
    assert hf_shapes["transformer.h.0.mlp.down_proj.weight"] == (8192, 40960)
    assert mapped["transformer.word_embeddings.weight"] == "model.tok_embeddings.embedding_weight"
    assert mapped["transformer.ln_f.weight"] == "model.norm_out.weight"


def test_115b_total_size_is_fp32_bytes_of_the_config_shapes(index_115b):
    index, cfg = index_115b
    numel = sum(int(np.prod(s)) for s in expected_hf(cfg).values())
    assert numel == cfg.num_parameters() == 113_282_916_352
    assert index["metadata"]["total_size"] == 4 * numel


def test_key_map_is_a_bijection_with_one_deliberate_drop():
    cfg = get_config("tiny")
    hf, ms = expected_hf(cfg), expected_ms(cfg)
    assert len(hf) == len(ms) == 10 * cfg.num_layers + 3
    assert [m.name for n in ms for m in ms_to_hf_names(n, cfg)] == list(hf)  # same canonical order both ways
    dropped = [r.hf for r in KEY_MAP if r.ms is None]
    assert dropped == ["transformer.h.{layer}.self_attention.rotary_emb.inv_freq"]
    assert hf_to_ms_name("transformer.h.1.self_attention.rotary_emb.inv_freq", cfg) == Match(None)


def test_unknown_names_and_out_of_range_layers_are_not_mapped():
    cfg = get_config("tiny")  # 2 layers
    assert hf_to_ms_name("transformer.h.2.input_layernorm.weight", cfg) is None
    assert hf_to_ms_name("transformer.h.0.self_attention.query.bias", cfg) is None
    assert hf_to_ms_name("model.layers.0.attention.wq.weight", cfg) is None  # MS name on the HF side
    assert ms_to_hf_names("model.layers.0.attention.w_qkv.weight", cfg) == []  # fused: via FUSIONS only


def test_fused_layout_matches_spec_and_inverts():
    cfg = get_config("tiny")  # 4 heads, 2 kv heads, d=16
    H, k, d = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    wq = rng.standard_normal((H, H)).astype(np.float32)
    wk_v = rng.standard_normal((2 * k * d, H)).astype(np.float32)
    w_qkv = fuse_qkv(cfg, wq, wk_v)
    assert w_qkv.shape == (H + 2 * k * d, H)
    # spec 3.1: row r of key_value is kv head r // 2d, a K row if r % 2d < d
    k_rows = [r for r in range(2 * k * d) if r % (2 * d) < d]
    v_rows = [r for r in range(2 * k * d) if r % (2 * d) >= d]
    np.testing.assert_array_equal(w_qkv, np.concatenate([wq, wk_v[k_rows], wk_v[v_rows]]))
    q_back, kv_back = split_qkv(cfg, w_qkv)
    assert q_back.tobytes() == wq.tobytes() and kv_back.tobytes() == wk_v.tobytes()
    assert interleave_kv(*deinterleave_kv(wk_v, cfg), cfg).tobytes() == wk_v.tobytes()
    w1, w3 = rng.standard_normal((2, cfg.ffn_hidden_size, H)).astype(np.float32)
    gh = fuse_gate_hidden(cfg, w1, w3)
    assert [a.tobytes() for a in split_gate_hidden(cfg, gh)] == [w1.tobytes(), w3.tobytes()]


def test_check_names_and_shapes_messages():
    cfg = get_config("tiny")
    expected = expected_hf(cfg)
    found = dict(expected)
    del found["lm_head.weight"]
    with pytest.raises(ConversionError, match=r"X: missing lm_head.weight; the weights do not match the config"):
        check_names_and_shapes(found, expected, "X", cfg)
    found = dict(expected, **{"transformer.h.0.self_attention.key_value.weight": (128, 64)})
    with pytest.raises(ConversionError, match=r"X: shape mismatch: transformer.h.0.self_attention.key_value.weight "
                                              r"is \[128, 64\], config implies \[64, 64\]; .*num_kv_heads=2"):
        check_names_and_shapes(found, expected, "X", cfg)
