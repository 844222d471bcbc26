"""HF <-> MindSpore conversion on tiny random checkpoints: bit-exact round trips, dtypes, fused layouts,
legacy .bin input, MindSpore and safetensors readers on the outputs, the command line."""
import json
import os

import numpy as np
import pytest

from convert.__main__ import main as cli_main
from telechat2_ms.formats.dtypes import bf16_bits_to_f32, cast, f32_to_bf16_bits
from convert.hf_to_ms import hf_to_ms
from convert.ms_to_hf import ms_to_hf
from convert.random_hf import RandomHFWeights, make_random_hf
from telechat2_ms.config import ModelConfig, get_config

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

CODES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_hf_dir(directory):
    """{name: torch tensor} of a HF directory, read with the official safetensors library via the index."""
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(safetensors_torch.load_file(os.path.join(directory, fname)))
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def assert_bitwise_equal(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


@pytest.mark.parametrize("code", ["F32", "BF16"])
def test_round_trip_hf_ms_hf_is_bit_exact(tmp_path, code):
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, code, shard_bytes=120_000)
    assert len([f for f in os.listdir(src) if f.endswith(".safetensors")]) > 2  # really sharded
    hf_to_ms(src, str(tmp_path / "ms.safetensors"), progress=False)
    ms_to_hf(str(tmp_path / "ms.safetensors"), str(tmp_path / "back"), shard_size="100KB", progress=False)
    original, back = load_hf_dir(src), load_hf_dir(str(tmp_path / "back"))
    assert all(t.dtype == CODES[code] for t in back.values())
    assert_bitwise_equal(original, back)
    with open(tmp_path / "back" / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    shards = {}
    for name, fname in weight_map.items():
        shards.setdefault(fname, []).append(back[name].numel() * back[name].element_size())
    assert len(shards) >= 4
    for fname, sizes in shards.items():  # at most 100 kB of data, unless one tensor alone is larger
        assert sum(sizes) <= 100_000 or len(sizes) == 1, (fname, sizes)
    back_cfg = ModelConfig.from_hf_config(str(tmp_path / "back"))
    assert back_cfg == cfg.replace(name="hf")  # the config round-trips through config.json and the metadata


def test_ms_names_and_values_match_hf(tmp_path):
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, "F32")
    out = hf_to_ms(src, str(tmp_path / "ms.safetensors"), progress=False)
    ms_weights = safetensors_torch.load_file(out)
    hf = load_hf_dir(src)
    assert len(ms_weights) == len(hf) == 23
    pairs = {"transformer.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
             "transformer.h.1.self_attention.key_value.weight": "model.layers.1.attention.wk_v.weight",
             "transformer.h.0.mlp.gate_proj.weight": "model.layers.0.feed_forward.w1.weight",
             "transformer.h.0.mlp.up_proj.weight": "model.layers.0.feed_forward.w3.weight",
             "transformer.h.0.mlp.down_proj.bias": "model.layers.0.feed_forward.w2.bias",
             "transformer.h.1.self_attention.dense.bias": "model.layers.1.attention.wo.bias",
             "transformer.ln_f.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
    for hf_name, ms_name in pairs.items():
        assert torch.equal(hf[hf_name], ms_weights[ms_name]), hf_name


@pytest.mark.parametrize("code", ["F32", "BF16"])
def test_mindspore_loads_the_safetensors_output(tmp_path, code):
    ms = pytest.importorskip("mindspore")
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, code)
    out = hf_to_ms(src, str(tmp_path / "ms.safetensors"), progress=False)
    params = ms.load_checkpoint(out, format="safetensors")
    reference = safetensors_torch.load_file(out)
    assert set(params) == set(reference)
    for name, p in params.items():
        expected = reference[name]
        assert str(p.dtype) == {"F32": "Float32", "BF16": "BFloat16"}[code]
        if code == "BF16":
            assert np.array_equal(p.asnumpy().view(np.uint16), expected.view(torch.int16).numpy().view(np.uint16))
        else:
            assert np.array_equal(p.asnumpy(), expected.numpy()), name


def test_ckpt_output_and_input(tmp_path):
    ms = pytest.importorskip("mindspore")
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, "BF16")
    out = hf_to_ms(src, str(tmp_path / "model.ckpt"), dtype="fp32", progress=False)
    params = ms.load_checkpoint(out)
    hf = load_hf_dir(src)
    assert params["lm_head.weight"].dtype == ms.float32
    assert np.array_equal(params["lm_head.weight"].asnumpy(), hf["lm_head.weight"].float().numpy())
    # .ckpt carries no config: ms2hf needs one (and writes the bf16 values back exactly)
    ms_to_hf(out, str(tmp_path / "back"), config="tiny", dtype="bf16", progress=False)
    assert_bitwise_equal(hf, load_hf_dir(str(tmp_path / "back")))


@pytest.mark.parametrize("code", ["F32", "BF16"])
def test_fused_qkv_round_trip(tmp_path, code):
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, code)
    out = hf_to_ms(src, str(tmp_path / "fused.safetensors"), fused_qkv=True, progress=False)
    fused = safetensors_torch.load_file(out)
    hf = load_hf_dir(src)
    assert len(fused) == 23 - 2 * cfg.num_layers
    assert not any(n.endswith(("wq.weight", "wk_v.weight", "w1.weight", "w3.weight")) for n in fused)
    H, kd, d = cfg.hidden_size, cfg.kv_dim, cfg.head_dim
    for i in range(cfg.num_layers):
        w_qkv = fused[f"model.layers.{i}.attention.w_qkv.weight"]
        kv = hf[f"transformer.h.{i}.self_attention.key_value.weight"]
        heads = kv.reshape(cfg.num_kv_heads, 2, d, H)  # per-head [K_h; V_h] (spec 3.1)
        expect = torch.cat([hf[f"transformer.h.{i}.self_attention.query.weight"],
                            heads[:, 0].reshape(kd, H), heads[:, 1].reshape(kd, H)])
        assert torch.equal(w_qkv, expect)
        expect_gh = torch.cat([hf[f"transformer.h.{i}.mlp.gate_proj.weight"], hf[f"transformer.h.{i}.mlp.up_proj.weight"]])
        assert torch.equal(fused[f"model.layers.{i}.feed_forward.w_gate_hidden.weight"], expect_gh)
    ms_to_hf(out, str(tmp_path / "back"), progress=False)
    assert_bitwise_equal(hf, load_hf_dir(str(tmp_path / "back")))


@pytest.mark.parametrize("src_code,choice,dst", [("F32", "bf16", torch.bfloat16), ("F32", "fp16", torch.float16),
                                                 ("BF16", "fp32", torch.float32), ("BF16", "fp16", torch.float16),
                                                 ("F16", "bf16", torch.bfloat16)])
def test_dtype_choice_matches_torch_casts(tmp_path, src_code, choice, dst):
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, src_code)
    out = hf_to_ms(src, str(tmp_path / "ms.safetensors"), dtype=choice, progress=False)
    ms_weights = safetensors_torch.load_file(out)
    hf = load_hf_dir(src)
    for name, tensor in hf.items():
        ms_name = name.replace("transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight")
        if ms_name in ms_weights:
            expect = tensor.to(dst) if {tensor.dtype, dst} != {torch.bfloat16, torch.float16} else \
                tensor.float().to(dst)
            assert torch.equal(ms_weights[ms_name].view(torch.uint8), expect.view(torch.uint8)), name


def test_bf16_rounding_matches_torch_on_edge_values():
    special = np.array([0.0, -0.0, 1.0, 1.00390625, 1.005859375, 3.4e38, -3.4e38, np.inf, -np.inf, 1e-40, -1e-45,
                        65504.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8], np.float32)
    rand = np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 100
    values = np.concatenate([special, rand])
    ours = f32_to_bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32))))
    assert np.array_equal(bf16_bits_to_f32(ours), torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float())
    big = np.random.default_rng(1).standard_normal(5 * (1 << 22) + 7).astype(np.float32)  # several cast chunks
    assert np.array_equal(cast(big, "F32", "BF16"), torch.from_numpy(big).to(torch.bfloat16).view(torch.int16)
                          .numpy().view(np.uint16))


def test_row_range_reads(tmp_path):
    """SafetensorsFile.read(rows=...) reads just rows [start, stop) (what a tp rank loads of a column slice)."""
    from telechat2_ms.formats.safetensors_io import SafetensorsFile

    src = make_random_hf(str(tmp_path / "hf"), get_config("tiny"), "BF16")
    out = SafetensorsFile(hf_to_ms(src, str(tmp_path / "ms.safetensors"), progress=False))
    full = out.read("lm_head.weight")  # [1024, 64] as uint16 bits
    assert out.read("lm_head.weight", rows=(256, 512)).tobytes() == full[256:512].tobytes()
    assert out.read("lm_head.weight", rows=(1023, 1024)).shape == (1, 64)


def test_legacy_pytorch_bin_input(tmp_path):
    cfg = get_config("tiny")
    weights = RandomHFWeights(cfg, seed=3)
    state = {name: torch.from_numpy(weights[name]).to(torch.bfloat16) for name in weights}
    state["transformer.h.0.self_attention.rotary_emb.inv_freq"] = torch.ones(8)  # dropped on purpose
    names = list(state)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({n: state[n] for n in names[:12]}, legacy / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[12:]}, legacy / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {n: f"pytorch_model-0000{1 if i < 12 else 2}-of-00002.bin" for i, n in enumerate(names)}}
    (legacy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (legacy / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    out = hf_to_ms(str(legacy), str(tmp_path / "ms.safetensors"), progress=False)
    ms_to_hf(out, str(tmp_path / "back"), progress=False)
    back = load_hf_dir(str(tmp_path / "back"))
    del state["transformer.h.0.self_attention.rotary_emb.inv_freq"]
    assert_bitwise_equal(state, back)


def test_command_line(tmp_path, capsys):
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, "BF16")
    ms_file = str(tmp_path / "ms.safetensors")
    assert cli_main(["hf2ms", src, ms_file, "--no-progress", "--dtype", "fp32", "--fused-qkv"]) == 0
    assert cli_main(["ms2hf", ms_file, str(tmp_path / "back"), "--no-progress", "--dtype", "bf16",
                     "--shard-size", "1MiB"]) == 0
    assert_bitwise_equal(load_hf_dir(src), load_hf_dir(str(tmp_path / "back")))
    assert cli_main(["hf2ms", src, ms_file, "--no-progress"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert cli_main(["hf2ms", src, ms_file, "--no-progress", "--overwrite"]) == 0
    assert safetensors_torch.load_file(ms_file)["lm_head.weight"].dtype == torch.bfloat16
