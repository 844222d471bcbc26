"""Every refusal of the converters and the resharder: the message names the problem and no output (not
even a temporary file) is left behind."""
import json
import os

import numpy as np
import pytest

from convert.errors import ConversionError
from convert.hf_to_ms import hf_to_ms
from convert.ms_to_hf import ms_to_hf
from convert.random_hf import make_random_hf
from convert.reshard import reshard
from telechat2_ms.formats.safetensors_io import SafetensorsFile
from telechat2_ms.config import ConfigError, get_config

CFG = get_config("tiny")


@pytest.fixture
def hf_dir(tmp_path):
    return make_random_hf(str(tmp_path / "hf"), CFG, "F32", shard_bytes=120_000)


def tampered(tmp_path, transform, config=None):
    """A tiny HF directory whose {name: array} dict was edited by `transform` (and maybe another config)."""
    directory = make_random_hf(str(tmp_path / "bad"), CFG, "F32", transform=transform)
    if config is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f)
    return directory


def assert_nothing_written(out_dir, allowed=("hf", "bad")):
    """`out_dir` holds only the inputs: no output, no temporary."""
    assert sorted(os.listdir(out_dir)) == sorted(a for a in allowed if os.path.exists(os.path.join(out_dir, a)))


def refuse(tmp_path, match, fn, *args, exc=ConversionError, allowed=("hf", "bad"), **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, progress=False, **kwargs)
    assert_nothing_written(tmp_path, allowed)


def test_missing_key(tmp_path):
    src = tampered(tmp_path, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    refuse(tmp_path, r"missing lm_head.weight; the weights do not match the config", hf_to_ms, src,
           str(tmp_path / "out.safetensors"))


def test_unknown_key(tmp_path):
    src = tampered(tmp_path, lambda t: dict(t, **{"transformer.h.0.self_attention.query.bias": np.zeros(64, np.float32)}))
    refuse(tmp_path, r"unknown tensor name\(s\) transformer.h.0.self_attention.query.bias", hf_to_ms, src,
           str(tmp_path / "out.safetensors"))


def test_shape_that_does_not_fit_the_config(tmp_path):
    src = tampered(tmp_path, lambda t: dict(t, **{"transformer.h.1.mlp.up_proj.weight": np.zeros((100, 64), np.float32)}))
    refuse(tmp_path, r"shape mismatch: transformer.h.1.mlp.up_proj.weight is \[100, 64\], config implies \[160, 64\]",
           hf_to_ms, src, str(tmp_path / "out.safetensors"))


def test_config_that_does_not_match_the_weights(tmp_path):
    wrong_heads = dict(CFG.to_hf_config(), num_key_value_heads=4)
    src = tampered(tmp_path, lambda t: t, config=wrong_heads)
    refuse(tmp_path, r"key_value.weight is \[64, 64\], config implies \[128, 64\].*num_kv_heads=4", hf_to_ms, src,
           str(tmp_path / "out.safetensors"))
    os.remove(os.path.join(src, "config.json"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(dict(CFG.to_hf_config(), n_layer=3), f)
    refuse(tmp_path, r"missing transformer.h.2.input_layernorm.weight.*num_layers=3", hf_to_ms, src,
           str(tmp_path / "out.safetensors"))


def test_missing_config_json(tmp_path, hf_dir):
    os.remove(os.path.join(hf_dir, "config.json"))
    refuse(tmp_path, r"no config.json at", hf_to_ms, hf_dir, str(tmp_path / "out.safetensors"), exc=ConfigError)


def test_truncated_shard(tmp_path, hf_dir):
    shard = os.path.join(hf_dir, "model-00002-of-00006.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    refuse(tmp_path, rf"model-00002-of-00006.safetensors is truncated: its header describes {size} bytes but the "
                     rf"file has {size - 100}", hf_to_ms, hf_dir, str(tmp_path / "out.safetensors"))


def test_missing_shard(tmp_path, hf_dir):
    os.remove(os.path.join(hf_dir, "model-00003-of-00006.safetensors"))
    refuse(tmp_path, r"names shard\(s\) that are not there: model-00003-of-00006.safetensors", hf_to_ms, hf_dir,
           str(tmp_path / "out.safetensors"))


def test_occupied_outputs(tmp_path, hf_dir):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    refuse(tmp_path, r"out.safetensors already holds a checkpoint .*pass --overwrite", hf_to_ms, hf_dir, str(out),
           allowed=("hf", "out.safetensors"))
    assert out.read_bytes() == b"old"
    hf_to_ms(hf_dir, str(out), overwrite=True, progress=False)
    assert len(SafetensorsFile(str(out)).names()) == 23

    occupied = tmp_path / "hf_out"
    occupied.mkdir()
    (occupied / "model.safetensors").write_bytes(b"old")
    refuse(tmp_path, r"hf_out already holds a checkpoint \(model.safetensors\)", ms_to_hf, str(out), str(occupied),
           allowed=("hf", "out.safetensors", "hf_out"))
    assert os.listdir(occupied) == ["model.safetensors"]
    ms_to_hf(str(out), str(occupied), overwrite=True, progress=False)
    assert "model.safetensors" not in os.listdir(occupied) and "config.json" in os.listdir(occupied)
    assert_nothing_written(tmp_path, ("hf", "out.safetensors", "hf_out"))

    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "layout.json").write_text("{}")
    refuse(tmp_path, r"layout already holds a checkpoint \(layout.json\)", reshard, str(out), str(tmp_path / "layout"),
           tp=2, allowed=("hf", "out.safetensors", "hf_out", "layout"))


def test_bad_output_name(tmp_path, hf_dir):
    refuse(tmp_path, r"must end in .safetensors or .ckpt", hf_to_ms, hf_dir, str(tmp_path / "out.bin"))


def test_failure_mid_conversion_leaves_nothing(tmp_path, hf_dir, monkeypatch):
    real_read = SafetensorsFile.read
    calls = []

    def failing_read(self, name, rows=None):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk went away")
        return real_read(self, name, rows)

    monkeypatch.setattr(SafetensorsFile, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        hf_to_ms(hf_dir, str(tmp_path / "out.safetensors"), progress=False)
    calls.clear()
    monkeypatch.setattr(SafetensorsFile, "read", real_read)
    good = hf_to_ms(hf_dir, str(tmp_path / "good.safetensors"), progress=False)
    monkeypatch.setattr(SafetensorsFile, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        ms_to_hf(good, str(tmp_path / "hf_out"), shard_size="100KB", progress=False)
    assert_nothing_written(tmp_path, ("hf", "good.safetensors"))


@pytest.fixture
def ms_file(tmp_path, hf_dir):
    return hf_to_ms(hf_dir, str(tmp_path / "ms.safetensors"), progress=False)


def test_ms2hf_needs_a_matching_config(tmp_path, ms_file):
    from safetensors.numpy import save_file

    bare = str(tmp_path / "bare.safetensors")  # the same tensors without the config metadata
    save_file({n: SafetensorsFile(ms_file).read(n) for n in SafetensorsFile(ms_file).names()}, bare)
    allowed = ("hf", "ms.safetensors", "bare.safetensors")
    refuse(tmp_path, r"bare.safetensors carries no model config; pass --config", ms_to_hf, bare,
           str(tmp_path / "out"), allowed=allowed)
    refuse(tmp_path, r"the given config does not match the one stored in .*ms.safetensors: hidden_size: checkpoint "
                     r"64 vs given 3072", ms_to_hf, ms_file, str(tmp_path / "out"), config="telechat2_3b",
           allowed=allowed)
    refuse(tmp_path, r"is neither a config.json path nor a size name", ms_to_hf, bare, str(tmp_path / "out"),
           config="no_such_size", exc=ConfigError, allowed=allowed)
    refuse(tmp_path, r"missing model.layers.2.attention_norm.weight", ms_to_hf, bare, str(tmp_path / "out"),
           config=CFG.replace(num_layers=3), allowed=allowed)


def test_reshard_refusals(tmp_path, ms_file):
    allowed = ("hf", "ms.safetensors")
    refuse(tmp_path, r"num_heads 4 of model checkpoint is not divisible by tp=3", reshard, ms_file,
           str(tmp_path / "l"), tp=3, exc=ConfigError, allowed=allowed)
    refuse(tmp_path, r"layer_counts \[2, 1\] sum to 3, but the model has 2 layers", reshard, ms_file,
           str(tmp_path / "l"), pp=2, layer_counts=[2, 1], exc=ConfigError, allowed=allowed)
    refuse(tmp_path, r"2 layers cannot fill 3 pipeline stages", reshard, ms_file, str(tmp_path / "l"), pp=3,
           exc=ConfigError, allowed=allowed)
    refuse(tmp_path, r"is a single file, which holds the full checkpoint \(tp=1, pp=1\); got tp=2", reshard, ms_file,
           str(tmp_path / "l.safetensors"), tp=2, allowed=allowed)


def test_damaged_layout_directory(tmp_path, ms_file):
    layout = reshard(ms_file, str(tmp_path / "layout"), tp=2, pp=2, progress=False)
    os.remove(os.path.join(layout, "tp1_pp1", "model.safetensors"))
    allowed = ("hf", "ms.safetensors", "layout")
    refuse(tmp_path, r"rank file tp1_pp1/model.safetensors is missing", reshard, layout, str(tmp_path / "merged.safetensors"),
           allowed=allowed)
    with open(os.path.join(layout, "layout.json")) as f:
        meta = json.load(f)
    meta["layer_counts"] = [2, 0]
    with open(os.path.join(layout, "layout.json"), "w") as f:
        json.dump(meta, f)
    refuse(tmp_path, r"layout.json is not a valid layout: ConfigError: layer_counts \[2, 0\]", reshard, layout,
           str(tmp_path / "merged.safetensors"), allowed=allowed)
