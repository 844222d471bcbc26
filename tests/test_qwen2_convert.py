"""Qwen2 conversion: a directory written by transformers' own `save_pretrained` (tiny random Qwen2 with GQA,
tied embeddings and a sliding-window layer) converts with `python -m convert hf2ms`, predicts what HF
predicts (logits <= 1e-4, fp32), and converts back bit for bit (fp32 and bf16), tied embeddings included;
it reshards to a tp2 x pp? layout and merges back exactly."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from convert.hf_to_ms import hf_to_ms  # noqa: E402
from convert.ms_to_hf import ms_to_hf  # noqa: E402
from convert.reshard import merge, reshard  # noqa: E402
from telechat2_ms.checkpoint import load_checkpoint_into  # noqa: E402
from telechat2_ms.config import ModelConfig, get_config  # noqa: E402
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids  # noqa: E402


def _hf_qwen2(directory, tied=True, dtype=torch.float32):
    cfg = get_config("qwen2_tiny")
    conf = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=tied,
        use_sliding_window=True, sliding_window=6, max_window_layers=2, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(conf).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def _safetensors(directory):
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_directory_converts_and_predicts_like_hf(tmp_path, tied):
    ref = _hf_qwen2(str(tmp_path / "hf"), tied=tied)
    assert ("lm_head.weight" in _safetensors(tmp_path / "hf")) == (not tied)
    out = hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "ms.safetensors"), progress=False)
    cfg = ModelConfig.from_hf_config(str(tmp_path / "hf"))
    assert (cfg.family, cfg.tie_word_embeddings, cfg.sliding_layers, cfg.rope_theta) == ("qwen2", tied, (2,), 1e6)
    model = Telechat2ForCausalLM(cfg)
    load_checkpoint_into(model, out)
    ids = np.random.default_rng(0).integers(13, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(model(to_tensor_ids(ids)).asnumpy() - theirs).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    _hf_qwen2(str(tmp_path / "hf"), dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    ms_file = hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "ms.safetensors"), progress=False)
    back = ms_to_hf(ms_file, str(tmp_path / "back"), progress=False)
    original, again = _safetensors(tmp_path / "hf"), _safetensors(back)
    assert sorted(original) == sorted(again)  # tied: lm_head.weight absent on both sides
    for name in original:
        assert original[name].dtype == again[name].dtype and np.array_equal(original[name].view(np.uint8),
                                                                            again[name].view(np.uint8)), name
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert written["model_type"] == "qwen2" and written["tie_word_embeddings"] is True
    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(back)  # loads in transformers
    assert reloaded.config.layer_types[2] == "sliding_attention"


def test_reshard_and_merge_are_exact(tmp_path):
    _hf_qwen2(str(tmp_path / "hf"))
    ms_file = hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "ms.safetensors"), progress=False)
    layout = reshard(ms_file, str(tmp_path / "tp2"), tp=2, pp=1, progress=False)
    merged = merge(layout, str(tmp_path / "merged.safetensors"), progress=False)
    from safetensors.numpy import load_file

    a, b = load_file(ms_file), load_file(merged)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
