"""telechat2_ms.parallel.plan: the tensor-parallel split table and the pipeline stage assignment.

The split rules are checked against what Megatron-style parallel layers compute with them: a
column-parallel slice gives a slice of the output, row-parallel partial products sum to the full product,
vocab-parallel lookups sum to the full lookup, and the fused per-rank blocks equal the fused layout of the
rank's own column slices. Shard -> merge must be bit-exact for every parameter.
"""
import numpy as np
import pytest

from convert.keymap import deinterleave_kv, expected_ms, fuse_gate_hidden, fuse_qkv
from telechat2_ms.config import ConfigError, get_config
from telechat2_ms.parallel.plan import (check_tp, layer_index, merge_shards, param_stage, shard_shape, shard_tensor,
                                       split_rule, stage_layer_ranges)

CFG4 = get_config("tiny", num_kv_heads=4)  # 4 heads, 4 kv heads, V=1024, F=160: splits 4 ways


def _random_params(cfg, fused, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_ms(cfg, fused).items()}


@pytest.mark.parametrize("fused", [False, True])
def test_every_parameter_has_a_rule(fused):
    for name in expected_ms(CFG4, fused):
        split_rule(name)  # raises for an unknown name


def test_unknown_parameter_is_refused():
    with pytest.raises(ValueError, match="no tensor-parallel rule"):
        shard_tensor("model.layers.0.attention.rotary.weight", np.zeros((4, 4)), 2, 0)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("fused", [False, True])
def test_shard_merge_is_bit_exact(tp, fused):
    params = _random_params(CFG4, fused)
    for name, full in params.items():
        shards = [shard_tensor(name, full, tp, r) for r in range(tp)]
        for s in shards:
            assert s.shape == shard_shape(name, full.shape, tp)
            assert s.flags.c_contiguous
        merged = merge_shards(name, shards)
        assert merged.tobytes() == full.tobytes(), name


def test_rules_by_kind():
    assert split_rule("model.layers.3.attention.wq.weight").kind == "rows"
    assert split_rule("model.layers.3.attention.wk_v.weight").kind == "rows"
    assert split_rule("model.layers.3.feed_forward.w1.weight").kind == "rows"
    assert split_rule("model.layers.3.feed_forward.w3.weight").kind == "rows"
    assert split_rule("model.layers.3.attention.wo.weight").kind == "cols"
    assert split_rule("model.layers.3.feed_forward.w2.weight").kind == "cols"
    for name in ("model.layers.3.attention.wo.bias", "model.layers.3.feed_forward.w2.bias",
                 "model.layers.3.attention_norm.weight", "model.layers.3.ffn_norm.weight", "model.norm_out.weight"):
        assert split_rule(name).kind == "replicate", name
    assert split_rule("model.tok_embeddings.embedding_weight").kind == "rows"
    assert split_rule("lm_head.weight").kind == "rows"


def test_parallel_linear_semantics():
    """Column slices give output slices, row slices give partial sums, as the parallel layers assume."""
    tp, cfg = 2, CFG4
    params = _random_params(cfg, False)
    x = np.random.default_rng(1).standard_normal((3, cfg.hidden_size))  # [T, H]
    wq = params["model.layers.0.attention.wq.weight"]
    outs = [x @ shard_tensor("model.layers.0.attention.wq.weight", wq, tp, r).T for r in range(tp)]  # [T, H/tp]
    np.testing.assert_allclose(np.concatenate(outs, axis=1), x @ wq.T, rtol=0, atol=1e-12)

    w2 = params["model.layers.0.feed_forward.w2.weight"]  # [H, F]
    h = np.random.default_rng(2).standard_normal((3, cfg.ffn_hidden_size))  # [T, F]
    f_local = cfg.ffn_hidden_size // tp
    partial = [h[:, r * f_local:(r + 1) * f_local] @ shard_tensor("model.layers.0.feed_forward.w2.weight", w2, tp, r).T
               for r in range(tp)]  # each [T, H]
    np.testing.assert_allclose(sum(partial), h @ w2.T, rtol=1e-12, atol=1e-12)

    emb = params["model.tok_embeddings.embedding_weight"]  # [V, H]
    ids = np.array([0, 511, 512, 1023])
    v_local = cfg.vocab_size // tp
    looked_up = np.zeros((len(ids), cfg.hidden_size))
    for r in range(tp):
        local = shard_tensor("model.tok_embeddings.embedding_weight", emb, tp, r)  # [V/tp, H]
        mine = (ids >= r * v_local) & (ids < (r + 1) * v_local)
        looked_up[mine] += local[ids[mine] - r * v_local]  # masked lookup, then all-reduce (sum)
    np.testing.assert_array_equal(looked_up, emb[ids])


def test_kv_shard_holds_whole_heads():
    """Rank r's wk_v slice holds kv heads r*k/tp ... with their [K_h; V_h] rows, in order."""
    tp, cfg = 2, CFG4
    k, d = cfg.num_kv_heads, cfg.head_dim
    wk_v = _random_params(cfg, False)["model.layers.1.attention.wk_v.weight"]  # [2kd, H]
    for r in range(tp):
        local = shard_tensor("model.layers.1.attention.wk_v.weight", wk_v, tp, r)
        for j in range(k // tp):
            head = r * (k // tp) + j
            np.testing.assert_array_equal(local[j * 2 * d: j * 2 * d + d], wk_v[head * 2 * d: head * 2 * d + d])  # K
            np.testing.assert_array_equal(local[j * 2 * d + d: (j + 1) * 2 * d],
                                          wk_v[head * 2 * d + d: (head + 1) * 2 * d])  # V


@pytest.mark.parametrize("tp", [2, 4])
def test_fused_shard_is_fused_local_slices(tp):
    """Rank r's w_qkv block = fuse(wq_r, wk_v_r) with the per-rank head counts (not a slice of the global)."""
    cfg = CFG4
    local_cfg = cfg.replace(hidden_size=cfg.hidden_size // tp, num_heads=cfg.num_heads // tp,
                            num_kv_heads=cfg.num_kv_heads // tp)
    params = _random_params(cfg, False)
    wq, wk_v = params["model.layers.0.attention.wq.weight"], params["model.layers.0.attention.wk_v.weight"]
    w1, w3 = params["model.layers.0.feed_forward.w1.weight"], params["model.layers.0.feed_forward.w3.weight"]
    w_qkv, w_gh = fuse_qkv(cfg, wq, wk_v), fuse_gate_hidden(cfg, w1, w3)
    for r in range(tp):
        wq_r = shard_tensor("model.layers.0.attention.wq.weight", wq, tp, r)  # [H/tp, H]
        wkv_r = shard_tensor("model.layers.0.attention.wk_v.weight", wk_v, tp, r)  # [2kd/tp, H]
        k_r, v_r = deinterleave_kv(wkv_r, local_cfg)
        expect = np.concatenate([wq_r, k_r, v_r])
        np.testing.assert_array_equal(shard_tensor("model.layers.0.attention.w_qkv.weight", w_qkv, tp, r), expect)
        expect_gh = np.concatenate([shard_tensor("model.layers.0.feed_forward.w1.weight", w1, tp, r),
                                    shard_tensor("model.layers.0.feed_forward.w3.weight", w3, tp, r)])
        np.testing.assert_array_equal(
            shard_tensor("model.layers.0.feed_forward.w_gate_hidden.weight", w_gh, tp, r), expect_gh)


def test_replicated_copies_must_agree():
    a = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="replicated but its 2 copies differ"):
        merge_shards("model.norm_out.weight", [a, a * 2])


def test_check_tp():
    check_tp(CFG4, 4)
    check_tp(get_config("tiny"), 4)  # 2 kv heads at tp4: each replicated on 2 ranks
    with pytest.raises(ConfigError, match="num_kv_heads 4 of model tiny is not divisible by tp=6, nor tp by it"):
        check_tp(get_config("tiny", num_heads=12, num_kv_heads=4, hidden_size=192), 6)
    with pytest.raises(ConfigError, match="vocab_size 1020 .* not divisible by tp=8"):
        check_tp(get_config("tiny", num_heads=8, num_kv_heads=8, hidden_size=128, vocab_size=1020), 8)
    with pytest.raises(ValueError, match="dim 0 size 1024 is not divisible by tp=3"):
        shard_tensor("lm_head.weight", np.zeros((1024, 4)), 3, 0)


def test_stage_layer_ranges():
    assert stage_layer_ranges(2, 1) == [(0, 2)]
    assert stage_layer_ranges(4, 2) == [(0, 2), (2, 4)]
    assert stage_layer_ranges(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]  # extra layers on first stages
    assert stage_layer_ranges(96, 3, [33, 33, 30]) == [(0, 33), (33, 66), (66, 96)]
    with pytest.raises(ConfigError, match=r"layer_counts \[1, 2\] sum to 3, but the model has 4 layers"):
        stage_layer_ranges(4, 2, [1, 2])
    with pytest.raises(ConfigError, match="has 3 entries, expected one per stage"):
        stage_layer_ranges(4, 2, [1, 2, 1])
    with pytest.raises(ConfigError, match="at least one layer"):
        stage_layer_ranges(4, 2, [4, 0])
    with pytest.raises(ConfigError, match="2 layers cannot fill 3 pipeline stages"):
        stage_layer_ranges(2, 3)


def test_param_stage_places_embedding_first_and_head_last():
    ranges = stage_layer_ranges(4, 2)
    assert param_stage("model.tok_embeddings.embedding_weight", ranges) == 0
    assert param_stage("model.layers.1.attention.wq.weight", ranges) == 0
    assert param_stage("model.layers.2.attention.wq.weight", ranges) == 1
    assert param_stage("model.norm_out.weight", ranges) == 1
    assert param_stage("lm_head.weight", ranges) == 1
    assert layer_index("model.layers.13.ffn_norm.weight") == 13
    assert layer_index("lm_head.weight") is None
    with pytest.raises(ValueError, match="layer 7 is outside"):
        param_stage("model.layers.7.attention.wq.weight", ranges)


@pytest.mark.parametrize("name,rows", [("model.layers.0.attention.wk_v.weight", 2 * 2 * 16),
                                       ("model.layers.0.attention.wk.weight", 2 * 16),
                                       ("model.layers.0.attention.wv.bias", 2 * 16)])
def test_kv_heads_fewer_than_tp_are_replicated_whole(name, rows):
    """2 kv heads (head dim 16) at tp4: ranks 0, 1 hold head 0 and ranks 2, 3 head 1, each whole; merging takes
    one copy per head after checking the copies agree, bit for bit."""
    full = np.random.default_rng(0).standard_normal((rows, 8) if "bias" not in name else (rows,)).astype(np.float32)
    shards = [shard_tensor(name, full, 4, r, kv_heads=2) for r in range(4)]
    per_head = rows // 2
    assert shard_shape(name, full.shape, 4, kv_heads=2) == (per_head,) + full.shape[1:]
    for r, piece in enumerate(shards):
        head = r // 2
        assert np.array_equal(piece, full[head * per_head:(head + 1) * per_head])
    assert merge_shards(name, shards, kv_heads=2).tobytes() == full.tobytes()
    shards[3] = shards[3] + 1
    with pytest.raises(ValueError, match="tp ranks 2 and 3 should hold the same kv head but differ"):
        merge_shards(name, shards, kv_heads=2)
    # other parameters ignore kv_heads: wq is still split in 4
    assert shard_shape("model.layers.0.attention.wq.weight", (64, 64), 4, kv_heads=2) == (16, 64)
