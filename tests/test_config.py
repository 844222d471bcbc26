"""Size registry, HF config.json loading and strict YAML run settings."""
import json

import pytest

from telechat2_ms.config import CONFIGS, ConfigError, ModelConfig, get_config
from telechat2_ms.settings import load_settings
from tests.conftest import REFERENCE_115B, REPO_ROOT

SPEC_SIZES = {  # spec 2.2: layers, hidden, ffn, heads, kv heads, params (billions, spec's count)
    "telechat2_3b": (24, 3072, 6144, 24, 24, 3.07),
    "telechat2_7b": (30, 4096, 12288, 32, 32, 7.62),
    "telechat2_35b": (64, 6144, 20480, 48, 48, 35.44),
    "telechat2_115b": (96, 8192, 40960, 64, 8, 113.28),
}


@pytest.mark.parametrize("name", sorted(SPEC_SIZES))
def test_registry_matches_spec(name):
    cfg = get_config(name)
    layers, hidden, ffn, heads, kv, billions = SPEC_SIZES[name]
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_heads, cfg.num_kv_heads) == \
        (layers, hidden, ffn, heads, kv)
    assert cfg.head_dim == 128 and cfg.vocab_size == 131072
    assert cfg.num_parameters() / 1e9 == pytest.approx(billions, abs=0.005)


def test_tiny_is_gqa_and_small():
    cfg = get_config("tiny")
    assert cfg.num_kv_heads < cfg.num_heads and cfg.num_parameters() < 1_000_000


def test_real_115b_config_json_gives_the_registry_entry(shared_dir):
    cfg = ModelConfig.from_hf_config(str(REFERENCE_115B / "config.json"))
    assert cfg == get_config("telechat2_115b")
    assert cfg.rms_norm_eps == 1e-8


def test_hf_config_round_trip_and_mha_default():
    for name in CONFIGS:
        cfg = get_config(name)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg
    hf = get_config("telechat2_7b").to_hf_config()
    del hf["num_key_value_heads"]  # 3B/7B/35B config.json have no kv-head field: MHA
    assert ModelConfig.from_hf_config(hf).num_kv_heads == 32


def test_bad_sizes_and_configs_are_named():
    with pytest.raises(ConfigError, match="unknown model size 'telechat2_8b'"):
        get_config("telechat2_8b")
    with pytest.raises(ConfigError, match="not divisible by num_kv_heads"):
        get_config("tiny", num_kv_heads=3)
    with pytest.raises(ConfigError, match="lacks n_layer"):
        ModelConfig.from_hf_config({"hidden_size": 64, "n_head": 4})
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        ModelConfig.from_hf_config({**get_config("tiny").to_hf_config(), "tie_word_embeddings": True})
    with pytest.raises(ConfigError, match="unknown model config key"):
        get_config("tiny", n_layers=3)


def test_yaml_is_strict(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model: tiny\ngenerate:\n  top_k: 3\nparallel_config:\n  model_parallel: 2\n")
    s = load_settings(str(good), ["--generate.max_new_tokens=7", "--seq_length=128"])
    assert (s.generate.top_k, s.generate.max_new_tokens, s.seq_length, s.parallel_config.model_parallel) == (3, 7, 128, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ngenerate:\n  topk: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'generate.topk'"):
        load_settings(str(bad))
    with pytest.raises(ConfigError, match="seq_length: expected int"):
        load_settings(None, ["--seq_length=long"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path / "missing.yaml"))


def test_every_shipped_yaml_loads():
    yamls = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert yamls
    for path in yamls:
        settings = load_settings(str(path))
        assert settings.model in CONFIGS, path
