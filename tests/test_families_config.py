"""Families as data: real config.json fields of TeleChat2 32K, TeleChat2.5 and Qwen2 load into ModelConfig
(../shared/docs/families.md), the rotary base follows the rule (config.json's rope_theta when given, else
TeleChat2's 10000, and the run says which), fields this port cannot honour are refused by name, and a tiny
TeleChat2 with the 32K rotary base matches the PyTorch reference (logits <= 1e-4)."""
import json

import numpy as np
import pytest

from telechat2_ms.config import ConfigError, ModelConfig, get_config
from telechat2_ms.rope import describe_rope, rope_parameters

TELECHAT2_7B_32K = {  # families.md 1 (TeleChat2-7B-32K config.json fields)
    "architectures": ["TeleChat2ForCausalLM"], "model_type": "telechat", "hidden_size": 4096, "n_layer": 30,
    "n_head": 32, "num_key_value_heads": 32, "ffn_hidden_size": 12288, "vocab_size": 131072,
    "layer_norm_epsilon": 1e-5, "training_seqlen": 32768, "base_seqlen": 32768, "seq_length": 32768,
    "max_position_embeddings": 32768, "rope_theta": 1000000, "rope_scaling": {"factor": 1.0, "rope_type": "dynamic"},
    "embed_layernorm": False, "tie_word_embeddings": False}


def test_telechat2_32k_config_uses_its_rope_theta_and_says_so():
    cfg = ModelConfig.from_hf_config(TELECHAT2_7B_32K, name="telechat2_7b_32k")
    assert cfg.architecture() == get_config("telechat2_7b_32k").architecture()
    assert (cfg.rope_theta, cfg.training_seqlen, cfg.base_seqlen) == (1e6, 32768, 32768)
    assert "base 1e+06 (config.json rope_theta 1e+06)" in describe_rope(cfg)
    # inside 32K plain RoPE at base 1e6; beyond it the NTK rule on top of that base
    assert rope_parameters(32768, cfg).base == 1e6 and rope_parameters(65536, cfg).alpha == 3
    plain = {k: v for k, v in TELECHAT2_7B_32K.items() if k not in ("rope_theta", "rope_scaling")}
    cfg = ModelConfig.from_hf_config(plain)
    assert cfg.rope_theta == 10000.0 and "the TeleChat2 default 10000 (config.json gives no rope_theta)" in \
        describe_rope(cfg)


def test_telechat2_5_config_loads_on_the_telechat2_architecture():
    config = dict(TELECHAT2_7B_32K, hidden_size=6144, n_layer=64, n_head=48, num_key_value_heads=48,
                  ffn_hidden_size=20480, training_seqlen=8192, base_seqlen=8192, embed_layernorm=False)
    del config["rope_theta"], config["rope_scaling"]
    cfg = ModelConfig.from_hf_config(config, name="telechat2_5_35b")
    assert cfg.architecture() == get_config("telechat2_5_35b").architecture() and cfg.family == "telechat2"


def test_qwen2_config_json_loads_with_hf_sliding_window_semantics():
    transformers = pytest.importorskip("transformers")
    for tied, size in ((False, "qwen2_7b"), (True, "qwen2_0_5b")):
        want = get_config(size)
        conf = transformers.Qwen2Config(
            vocab_size=want.vocab_size, hidden_size=want.hidden_size, intermediate_size=want.ffn_hidden_size,
            num_hidden_layers=want.num_layers, num_attention_heads=want.num_heads,
            num_key_value_heads=want.num_kv_heads, rms_norm_eps=want.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=tied,
            max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645)
        cfg = ModelConfig.from_hf_config(json.loads(conf.to_json_string()), name=size)
        assert cfg.architecture() == want.architecture(), size
    conf = transformers.Qwen2Config(num_hidden_layers=6, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=1024, use_sliding_window=True,
                                    sliding_window=16, max_window_layers=4)
    cfg = ModelConfig.from_hf_config(json.loads(conf.to_json_string()))
    assert cfg.sliding_window == 16 and cfg.sliding_layers == tuple(
        i for i, kind in enumerate(conf.layer_types) if kind == "sliding_attention") == (4, 5)
    legacy = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 1024, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "rope_scaling": None, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 1}
    cfg = ModelConfig.from_hf_config(legacy)  # transformers 4 field names; the window is off
    assert (cfg.rope_theta, cfg.sliding_layers, cfg.sliding_window) == (1e6, (), 0)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling .* is not TeleChat2's dynamic NTK"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"embed_layernorm": True}, "embed_layernorm=true is not supported"),
    ({"model_type": "qwen3_moe"}, "model_type 'qwen3_moe' is not a family this port runs"),
    ({"n_layer": "thirty"}, "n_layer must be an integer, got 'thirty'"),
])
def test_fields_this_port_cannot_honour_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config(dict(TELECHAT2_7B_32K, **change))


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling .* is not supported for Qwen2"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}, "rope scaling"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding_attention layers but no sliding_window"),
    ({"layer_types": ["full_attention"]}, "layer_types must list"),
])
def test_qwen2_fields_this_port_cannot_honour_are_refused(change, message):
    base = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "vocab_size": 1024, "rms_norm_eps": 1e-6}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_config(dict(base, **change))


def test_tiny_telechat2_with_the_32k_rotary_base_matches_the_reference():
    torch = pytest.importorskip("torch")
    from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids
    from tests.torch_reference import llama_reference, ms_state_numpy, randomize_biases_and_norms

    cfg = ModelConfig.from_hf_config(dict(get_config("tiny").to_hf_config(), rope_theta=1000000,
                                          rope_scaling={"factor": 1.0, "rope_type": "dynamic"}))
    assert cfg.rope_theta == 1e6
    cfg = cfg.replace(initializer_range=0.25)  # larger weights: the rotary base shows in the logits
    model = Telechat2ForCausalLM(cfg, seed=4)
    randomize_biases_and_norms(model, 5)
    ids = np.random.default_rng(6).integers(13, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = llama_reference(cfg, ms_state_numpy(model))(torch.from_numpy(ids)).logits.numpy()
    ours = model(to_tensor_ids(ids)).asnumpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    default = Telechat2ForCausalLM(cfg.replace(rope_theta=10000.0), seed=4)  # the base matters
    for p, q in zip(default.get_parameters(), model.get_parameters()):
        p.set_data(q.data)
    assert np.abs(default(to_tensor_ids(ids)).asnumpy() - ours).max() > 1e-2
