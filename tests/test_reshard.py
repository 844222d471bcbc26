"""Resharding a MindSpore checkpoint between (tp, pp) layouts: bit-exact, files as documented."""
import json
import os

import numpy as np

from convert.__main__ import main as cli_main
from telechat2_ms.formats.dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from convert.hf_to_ms import hf_to_ms
from convert.ms_to_hf import ms_to_hf
from convert.random_hf import make_random_hf
from convert.reshard import reshard
from telechat2_ms.formats.safetensors_io import SafetensorsFile
from convert.sources import open_hf_dir
from telechat2_ms.config import get_config
from telechat2_ms.parallel.plan import shard_tensor

CFG4 = get_config("tiny", num_kv_heads=4, num_layers=3)  # kv heads and V divisible by 4; 3 layers for uneven pp


def full_checkpoint(tmp_path, cfg=CFG4, code="BF16", fused=False):
    src = make_random_hf(str(tmp_path / "hf"), cfg, code)
    return hf_to_ms(src, str(tmp_path / ("fused.safetensors" if fused else "full.safetensors")), fused_qkv=fused,
                    progress=False)


def read_all(path):
    f = SafetensorsFile(path)
    return {name: f.read(name) for name in f.names()}


def assert_same_tensors(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_full_to_tp2_pp2_and_back_is_bit_exact(tmp_path):
    full = full_checkpoint(tmp_path)
    layout = reshard(full, str(tmp_path / "tp2_pp2"), tp=2, pp=2, progress=False)
    merged = reshard(layout, str(tmp_path / "merged.safetensors"), progress=False)
    assert_same_tensors(read_all(full), read_all(merged))
    with open(full, "rb") as f1, open(merged, "rb") as f2:
        assert f1.read() == f2.read()  # same header, metadata and bytes


def test_layout_files_hold_the_documented_slices(tmp_path):
    full = full_checkpoint(tmp_path)
    tensors = read_all(full)
    layout = reshard(full, str(tmp_path / "tp2_pp2"), tp=2, pp=2, progress=False)
    with open(os.path.join(layout, "layout.json")) as f:
        meta = json.load(f)
    assert meta["tp"] == 2 and meta["pp"] == 2 and meta["layer_counts"] == [2, 1]
    assert meta["layer_ranges"] == [[0, 2], [2, 3]] and meta["layer_numbering"] == "global"
    assert meta["files"] == {"0": "tp0_pp0/model.safetensors", "1": "tp1_pp0/model.safetensors",
                             "2": "tp0_pp1/model.safetensors", "3": "tp1_pp1/model.safetensors"}
    assert meta["model_config"] == CFG4.to_hf_config()
    stage_names = {0: set(), 1: set()}
    for t in range(2):
        for p in range(2):
            rank = read_all(os.path.join(layout, f"tp{t}_pp{p}", "model.safetensors"))
            for name, array in rank.items():
                assert array.tobytes() == shard_tensor(name, tensors[name], 2, t).tobytes(), name
            stage_names[p] |= set(rank)
            info = json.loads(SafetensorsFile(os.path.join(layout, f"tp{t}_pp{p}", "model.safetensors"))
                              .metadata["telechat2_shard"])
            assert info == {"tp": 2, "tp_rank": t, "pp": 2, "pp_stage": p, "layer_range": [[0, 2], [2, 3]][p]}
    assert "model.tok_embeddings.embedding_weight" in stage_names[0]
    assert {"lm_head.weight", "model.norm_out.weight", "model.layers.2.attention.wq.weight"} <= stage_names[1]
    assert not any(n.startswith("model.layers.2.") for n in stage_names[0])
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.")) for n in stage_names[1])
    assert stage_names[0] | stage_names[1] == set(tensors) and not stage_names[0] & stage_names[1]
    wq = SafetensorsFile(os.path.join(layout, "tp1_pp0", "model.safetensors")).info("model.layers.0.attention.wq.weight")
    assert wq.shape == (32, 64) and wq.code == "BF16"


def test_tp2_to_tp4_directly_is_bit_exact(tmp_path):
    full = full_checkpoint(tmp_path)
    tp2 = reshard(full, str(tmp_path / "tp2"), tp=2, progress=False)
    tp4 = reshard(tp2, str(tmp_path / "tp4"), tp=4, pp=1, progress=False)
    direct = reshard(full, str(tmp_path / "tp4_direct"), tp=4, progress=False)
    for t in range(4):
        a = os.path.join(tp4, f"tp{t}_pp0", "model.safetensors")
        b = os.path.join(direct, f"tp{t}_pp0", "model.safetensors")
        with open(a, "rb") as fa, open(b, "rb") as fb:
            assert fa.read() == fb.read()
    assert_same_tensors(read_all(full), read_all(reshard(tp4, str(tmp_path / "m.safetensors"), progress=False)))
    assert not os.path.exists(tmp_path / "tp2" / "model.safetensors")  # no full checkpoint on the way


def test_fewer_kv_heads_than_tp_reshard_with_copies_and_back(tmp_path):
    """Tiny with 2 kv heads at tp4: every rank file holds the whole kv head its query heads use (ranks 0, 1 head
    0; ranks 2, 3 head 1), the layout loads at its shard shapes (checkpoint.LayoutWeights) and merges back bit
    for bit, and a tp2 layout reshards to it directly."""
    from telechat2_ms.checkpoint import LayoutWeights, resolve_checkpoint

    cfg = get_config("tiny", num_layers=3)
    assert cfg.num_kv_heads == 2
    full = full_checkpoint(tmp_path, cfg)
    tp4 = reshard(full, str(tmp_path / "tp4"), tp=4, progress=False)
    wk_v = "model.layers.1.attention.wk_v.weight"
    original = read_all(full)[wk_v]
    rows = original.shape[0] // 2  # one kv head: [K_h; V_h]
    for t in range(4):
        held = SafetensorsFile(os.path.join(tp4, f"tp{t}_pp0", "model.safetensors")).read(wk_v)
        assert held.tobytes() == original[(t // 2) * rows:(t // 2 + 1) * rows].tobytes()
    weights = LayoutWeights(resolve_checkpoint(tp4))
    assert weights.shapes()[wk_v] == original.shape
    assert weights.full(wk_v).shape == original.shape
    assert_same_tensors(read_all(full), read_all(reshard(tp4, str(tmp_path / "m.safetensors"), progress=False)))
    via_tp2 = reshard(reshard(full, str(tmp_path / "tp2"), tp=2, progress=False), str(tmp_path / "tp4b"), tp=4,
                      progress=False)
    for t in range(4):
        with open(os.path.join(tp4, f"tp{t}_pp0", "model.safetensors"), "rb") as fa, \
                open(os.path.join(via_tp2, f"tp{t}_pp0", "model.safetensors"), "rb") as fb:
            assert fa.read() == fb.read()


def test_explicit_layer_counts_and_fused_layout(tmp_path):
    full = full_checkpoint(tmp_path, fused=True)
    layout = reshard(full, str(tmp_path / "l"), tp=2, pp=2, layer_counts=[1, 2], progress=False)
    with open(os.path.join(layout, "layout.json")) as f:
        meta = json.load(f)
    assert meta["layer_ranges"] == [[0, 1], [1, 3]] and meta["fused_qkv"] is True
    q = SafetensorsFile(os.path.join(layout, "tp1_pp1", "model.safetensors")).info("model.layers.2.attention.w_qkv.weight")
    assert q.shape == ((64 + 2 * 64) // 2, 64)
    regrouped = reshard(layout, str(tmp_path / "l2"), tp=4, pp=3, progress=False)
    assert_same_tensors(read_all(full), read_all(reshard(regrouped, str(tmp_path / "m.safetensors"), progress=False)))


def test_dtype_change_and_ms2hf_from_a_layout(tmp_path):
    full = full_checkpoint(tmp_path, code="F32")
    layout = reshard(full, str(tmp_path / "l"), tp=2, pp=3, dtype="bf16", progress=False)
    back = ms_to_hf(layout, str(tmp_path / "hf_back"), dtype="fp32", progress=False)
    source, cfg = open_hf_dir(back)
    original = read_all(full)
    for hf_name, ms_name in (("transformer.h.1.self_attention.query.weight", "model.layers.1.attention.wq.weight"),
                             ("lm_head.weight", "lm_head.weight")):
        expect = bf16_bits_to_f32(f32_to_bf16_bits(original[ms_name]))  # fp32 -> bf16 -> fp32, rounded once
        assert source.read(hf_name).tobytes() == expect.tobytes()
        assert not np.array_equal(expect, original[ms_name])  # the rounding really happened
    assert cfg.num_kv_heads == 4 and cfg.num_layers == 3


def test_reshard_command_line(tmp_path):
    full = full_checkpoint(tmp_path)
    assert cli_main(["reshard", full, str(tmp_path / "l"), "--tp", "2", "--pp", "3", "--no-progress"]) == 0
    assert cli_main(["reshard", str(tmp_path / "l"), str(tmp_path / "l4"), "--tp", "4", "--pp", "2",
                     "--layer-counts", "2,1", "--no-progress"]) == 0
    assert cli_main(["merge", str(tmp_path / "l4"), str(tmp_path / "m.safetensors"), "--no-progress"]) == 0
    assert_same_tensors(read_all(full), read_all(str(tmp_path / "m.safetensors")))


def test_a_layout_directory_loads_in_one_process_as_the_full_checkpoint(tmp_path):
    """`--load_checkpoint` of a tp2 x pp2 layout directory in one process: every parameter merged as it is read
    equals the full checkpoint's (fp32 here, so bit for bit)."""
    from telechat2_ms.build import from_settings
    from telechat2_ms.settings import load_settings

    full = full_checkpoint(tmp_path, code="F32")
    layout = reshard(full, str(tmp_path / "tp2_pp2"), tp=2, pp=2, progress=False)
    from_layout = from_settings(load_settings(None, [f"--load_checkpoint={layout}"]), world=1, tokenizer=False)
    want = read_all(full)
    got = {name: p.asnumpy() for name, p in from_layout.model.parameters_and_names()}
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
