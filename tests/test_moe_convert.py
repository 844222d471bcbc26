"""Conversion of the mixture-of-experts families: HF's one tensor per expert <-> MindFormers' stacked
`feed_forward.ffn.w1/w3/w2` [E, ...] (and `router.dense`, Qwen2-MoE's `routed_experts` / `shared_experts` /
`shared_experts_gate`), from the one key map (convert/keymap.py).
- Qwen2-MoE: a directory written by transformers' own `save_pretrained` (shared expert, layer 1 dense via
  mlp_only_layers) converts and predicts what transformers predicts (logits <= 1e-4, fp32), and converts back bit
  for bit (fp32 and bf16), loadable by transformers;
- TeleChat2-MoE (39B-A12B's names `mlp.router`, `mlp.local_experts.{e}.*`, expert down biases): random HF weights
  convert, each stacked slice is its expert's HF tensor, and the round trip is bit for bit;
- a missing expert or an expert index beyond num_experts is refused by name.
"""
import json
import os

import numpy as np
import pytest

from convert.errors import ConversionError
from convert.hf_to_ms import hf_to_ms
from convert.keymap import expected_hf, expected_ms
from convert.ms_to_hf import ms_to_hf
from convert.random_hf import make_random_hf
from telechat2_ms.checkpoint import load_checkpoint_into
from telechat2_ms.config import ModelConfig, get_config
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids
from tests.test_qwen2_convert import _safetensors


def _assert_bit_equal(original, again):
    assert sorted(original) == sorted(again)
    for name in original:
        assert original[name].dtype == again[name].dtype, name
        assert np.array_equal(original[name].view(np.uint8), again[name].view(np.uint8)), name


def _hf_qwen2_moe(directory, dtype="float32"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = get_config("qwen2_moe_tiny")
    conf = transformers.Qwen2MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=cfg.moe_ffn_hidden_size, shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=list(cfg.mlp_only_layers), rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, initializer_range=0.25,
        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(conf).to(getattr(torch, dtype)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    return model


def test_qwen2_moe_save_pretrained_converts_and_predicts_like_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    ref = _hf_qwen2_moe(str(tmp_path / "hf"))
    written = _safetensors(tmp_path / "hf")
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in written  # the hub's one tensor per expert
    out = hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "ms.safetensors"), progress=False)
    cfg = ModelConfig.from_hf_config(str(tmp_path / "hf"))
    assert (cfg.num_experts, cfg.sparse_layers, cfg.shared_expert_ffn_hidden_size) == (4, (0, 2), 96)
    from safetensors.numpy import load_file

    ms_tensors = load_file(out)
    stacked = ms_tensors["model.layers.2.feed_forward.routed_experts.ffn.w2.weight"]
    assert stacked.shape == (4, cfg.hidden_size, cfg.moe_ffn_hidden_size)
    for e in range(4):
        assert np.array_equal(stacked[e], written[f"model.layers.2.mlp.experts.{e}.down_proj.weight"])
    model = Telechat2ForCausalLM(cfg)
    load_checkpoint_into(model, out)
    ids = np.random.default_rng(0).integers(13, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(model(to_tensor_ids(ids)).asnumpy() - theirs).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qwen2_moe_round_trip_is_bit_exact(tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    _hf_qwen2_moe(str(tmp_path / "hf"), dtype)
    ms_file = hf_to_ms(str(tmp_path / "hf"), str(tmp_path / "ms.safetensors"), progress=False)
    back = ms_to_hf(ms_file, str(tmp_path / "back"), progress=False)
    _assert_bit_equal(_safetensors(tmp_path / "hf"), _safetensors(back))
    with open(os.path.join(back, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert (config["model_type"], config["num_experts"], config["mlp_only_layers"]) == ("qwen2_moe", 4, [1])
    reloaded = transformers.Qwen2MoeForCausalLM.from_pretrained(back)  # loads in transformers
    assert reloaded.config.shared_expert_intermediate_size == 96


def test_telechat2_moe_converts_stacked_and_round_trips_bit_exact(tmp_path):
    cfg = get_config("telechat2_moe_tiny")
    hf_dir = make_random_hf(str(tmp_path / "hf"), cfg, code="BF16")
    names = expected_hf(cfg)
    assert "transformer.h.1.mlp.local_experts.3.down_proj.bias" in names
    assert "transformer.h.1.mlp.router.weight" in names and "transformer.h.1.mlp.gate_proj.weight" not in names
    ms_file = hf_to_ms(hf_dir, str(tmp_path / "ms.safetensors"), progress=False)
    from safetensors.numpy import load_file

    ms_tensors, original = load_file(ms_file), _safetensors(hf_dir)
    assert set(ms_tensors) == set(expected_ms(cfg))
    E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
    assert ms_tensors["model.layers.0.feed_forward.ffn.w1.weight"].shape == (E, F, H)
    assert ms_tensors["model.layers.0.feed_forward.ffn.w2.bias"].shape == (E, H)
    assert ms_tensors["model.layers.0.feed_forward.router.dense.weight"].shape == (E, H)
    for e in range(E):
        for hf_part, ms_part in (("gate_proj.weight", "w1.weight"), ("up_proj.weight", "w3.weight"),
                                 ("down_proj.weight", "w2.weight"), ("down_proj.bias", "w2.bias")):
            assert np.array_equal(ms_tensors[f"model.layers.1.feed_forward.ffn.{ms_part}"][e],
                                  original[f"transformer.h.1.mlp.local_experts.{e}.{hf_part}"])
    model = Telechat2ForCausalLM(cfg)
    load_checkpoint_into(model, ms_file)  # every parameter of the model is there, with its shape
    back = ms_to_hf(ms_file, str(tmp_path / "back"), progress=False)
    _assert_bit_equal(original, _safetensors(back))
    assert ModelConfig.from_hf_config(back) == ModelConfig.from_hf_config(hf_dir)


def test_a_missing_expert_or_one_beyond_num_experts_is_refused_by_name(tmp_path):
    cfg = get_config("telechat2_moe_tiny")

    def drop(tensors):
        del tensors["transformer.h.0.mlp.local_experts.2.up_proj.weight"]
        return tensors

    make_random_hf(str(tmp_path / "missing"), cfg, transform=drop)
    with pytest.raises(ConversionError, match=r"missing transformer\.h\.0\.mlp\.local_experts\.2\.up_proj\.weight"):
        hf_to_ms(str(tmp_path / "missing"), str(tmp_path / "a.safetensors"), progress=False)

    def extra(tensors):
        tensors["transformer.h.0.mlp.local_experts.4.up_proj.weight"] = tensors[
            "transformer.h.0.mlp.local_experts.0.up_proj.weight"]
        return tensors

    make_random_hf(str(tmp_path / "extra"), cfg, transform=extra)
    with pytest.raises(ConversionError, match=r"unknown tensor name\(s\) transformer\.h\.0\.mlp\.local_experts\.4"):
        hf_to_ms(str(tmp_path / "extra"), str(tmp_path / "b.safetensors"), progress=False)
    assert not os.path.exists(tmp_path / "a.safetensors") and not os.path.exists(tmp_path / "b.safetensors")


def test_grouped_matmul_layout_round_trips_and_is_refused_where_it_cannot_be_read(tmp_path, capsys):
    """`hf2ms --gmm` writes the stacked expert weights as MindFormers' convert_gmm does, [E, in, out] (biases and
    routers as before), marked in the metadata; ms2hf reads it back bit for bit, and with --gmm also a file without
    the mark (MindFormers' own, simulated); the model loader and reshard refuse it by name."""
    from safetensors.numpy import load_file, save_file

    from convert.__main__ import main as convert_main
    from convert.reshard import reshard
    from telechat2_ms.checkpoint import CheckpointError

    cfg = get_config("telechat2_moe_tiny")
    hf_dir = make_random_hf(str(tmp_path / "hf"), cfg)
    gmm = str(tmp_path / "gmm.safetensors")
    assert convert_main(["hf2ms", hf_dir, gmm, "--gmm", "--no-progress"]) == 0
    plain = load_file(hf_to_ms(hf_dir, str(tmp_path / "plain.safetensors"), progress=False))
    stacked = load_file(gmm)
    E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
    assert stacked["model.layers.0.feed_forward.ffn.w1.weight"].shape == (E, H, F)
    assert stacked["model.layers.0.feed_forward.ffn.w2.weight"].shape == (E, F, H)
    for name, array in plain.items():
        want = array.transpose(0, 2, 1) if name.endswith(("ffn.w1.weight", "ffn.w3.weight", "ffn.w2.weight")) else array
        assert np.array_equal(stacked[name], want), name
    back = ms_to_hf(gmm, str(tmp_path / "back"), progress=False)
    _assert_bit_equal(_safetensors(hf_dir), _safetensors(back))
    unmarked = str(tmp_path / "mindformers_gmm.safetensors")
    save_file(stacked, unmarked)  # no metadata: the config and the layout come from the command line
    with pytest.raises(ConversionError, match="shape mismatch"):
        ms_to_hf(unmarked, str(tmp_path / "wrong"), config="telechat2_moe_tiny", progress=False)
    assert not os.path.exists(tmp_path / "wrong")
    again = ms_to_hf(unmarked, str(tmp_path / "again"), config="telechat2_moe_tiny", progress=False, gmm=True)
    _assert_bit_equal(_safetensors(hf_dir), _safetensors(again))
    with pytest.raises(CheckpointError, match="grouped-matmul expert layout"):
        load_checkpoint_into(Telechat2ForCausalLM(cfg), gmm)
    with pytest.raises(ConversionError, match="grouped-matmul expert layout"):
        reshard(gmm, str(tmp_path / "tp2"), tp=2, progress=False)
    assert convert_main(["hf2ms", str(tmp_path / "hf"), str(tmp_path / "x.ckpt"), "--gmm"]) != 0
    assert "--gmm writes .safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("name, pp", [("telechat2_moe_tiny", 2), ("qwen2_moe_tiny", 1)])
def test_moe_layouts_hold_every_expert_split_over_tp_and_merge_back_bit_exact(tmp_path, name, pp):
    """HF -> (tp2, pp) layout -> merge equals the direct conversion bit for bit, through hf2ms + reshard and with
    reshard reading the HF directory itself (one command); a rank file holds all E experts,
    each split over tp as the dense FFN is (w1/w3 rows, w2 columns, down biases whole), so a run under any
    expert_parallel takes its experts from it at load time (parallel/experts.py; tests/test_moe_msrun.py)."""
    from safetensors.numpy import load_file

    from convert.reshard import merge, reshard

    cfg = get_config(name)
    full = hf_to_ms(make_random_hf(str(tmp_path / "hf"), cfg), str(tmp_path / "full.safetensors"), progress=False)
    layout = reshard(full, str(tmp_path / "layout"), tp=2, pp=pp, progress=False)
    prefix = "model.layers.0.feed_forward." + ("routed_experts." if cfg.shared_expert_ffn_hidden_size else "")
    rank = load_file(os.path.join(layout, "tp1_pp0", "model.safetensors"))
    E, H, F = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
    assert rank[prefix + "ffn.w1.weight"].shape == (E, F // 2, H) and rank[prefix + "ffn.w2.weight"].shape == (E, H, F // 2)
    whole = load_file(full)
    assert np.array_equal(rank[prefix + "ffn.w1.weight"], whole[prefix + "ffn.w1.weight"][:, F // 2:])
    merged = load_file(merge(layout, str(tmp_path / "merged.safetensors"), progress=False))
    assert sorted(merged) == sorted(whole) and all(np.array_equal(merged[k], whole[k]) for k in whole)
    # one command from the HF directory to the layout (converted tensor by tensor as hf2ms would)
    direct = reshard(str(tmp_path / "hf"), str(tmp_path / "direct"), tp=2, pp=pp, progress=False)
    again = load_file(merge(direct, str(tmp_path / "again.safetensors"), progress=False))
    assert sorted(again) == sorted(whole) and all(np.array_equal(again[k], whole[k]) for k in whole)
