"""telechat2_ms.checkpoint: exact save/load round trip, config/settings beside the weights, strict key checks."""
import json
import os

import numpy as np
import pytest

import mindspore as ms

from telechat2_ms import checkpoint as ckpt
from telechat2_ms.config import get_config
from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.settings import load_settings

TINY = get_config("tiny")


def _params(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


def test_round_trip_is_exact_with_config_and_settings():
    src = Telechat2ForCausalLM(TINY, seed=1)
    settings = load_settings(None, ["--seq_length=32", "--train.learning_rate=0.001"])
    out = ckpt.save_model(src, "ck", config=TINY, settings=settings)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "run_settings.yaml"]
    dst = Telechat2ForCausalLM(TINY, seed=2)
    loaded = ckpt.load_checkpoint_into(dst, out)
    assert len(loaded) == 23
    a, b = _params(src), _params(dst)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert ckpt.load_model_config(out) == TINY
    assert ckpt.load_model_config(out).name == "tiny"
    again = load_settings(os.path.join(out, "run_settings.yaml"))
    assert again.seq_length == 32 and again.train.learning_rate == 0.001
    assert not [f for f in os.listdir(out) if "partial" in f]


@pytest.mark.parametrize("file_name", ["bf16.ckpt", "bf16.safetensors"])
def test_file_path_and_ckpt_format_and_dtype_cast(file_name):
    src = Telechat2ForCausalLM(TINY, seed=3)
    state = {name: ms.ops.cast(p, ms.bfloat16) for name, p in ckpt.model_state(src).items()}
    ckpt.save_tensors(state, file_name)  # .safetensors: one tensor at a time, BF16 bits exact
    dst = Telechat2ForCausalLM(TINY, seed=4)
    ckpt.load_checkpoint_into(dst, file_name)
    for name, value in _params(dst).items():
        assert value.dtype == np.float32
        expected = ms.ops.cast(state[name], ms.float32).asnumpy()
        np.testing.assert_array_equal(value, expected, err_msg=name)
    assert ckpt.load_model_config(file_name) is None


def test_missing_unknown_and_misshaped_keys_are_all_named():
    src = Telechat2ForCausalLM(TINY, seed=5)
    state = {n: ms.Tensor(p) for n, p in ckpt.model_state(src).items()}
    del state["lm_head.weight"]
    state["model.layers.9.attention.wq.weight"] = ms.Tensor(np.zeros((4, 4), np.float32))
    state["model.norm_out.weight"] = ms.Tensor(np.ones((63,), np.float32))
    ckpt.save_tensors(state, "bad.safetensors")
    dst = Telechat2ForCausalLM(TINY, seed=6)
    before = _params(dst)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint_into(dst, "bad.safetensors")
    msg = str(err.value)
    assert "bad.safetensors" in msg
    assert "1 parameter(s) missing from the checkpoint: lm_head.weight" in msg
    assert "1 unknown key(s) not in the model: model.layers.9.attention.wq.weight" in msg
    assert "model.norm_out.weight (checkpoint (63,), model (64,))" in msg
    for name, value in _params(dst).items():  # nothing was written
        np.testing.assert_array_equal(value, before[name])


def test_non_strict_allows_extra_keys_but_not_missing_ones():
    src = Telechat2ForCausalLM(TINY, seed=7)
    state = {n: ms.Tensor(p) for n, p in ckpt.model_state(src).items()}
    state["optimizer.step"] = ms.Tensor(np.zeros((1,), np.float32))
    ckpt.save_tensors(state, "extra.safetensors")
    dst = Telechat2ForCausalLM(TINY, seed=8)
    with pytest.raises(ckpt.CheckpointError, match="unknown key"):
        ckpt.load_checkpoint_into(dst, "extra.safetensors")
    ckpt.load_checkpoint_into(dst, "extra.safetensors", strict=False)
    np.testing.assert_array_equal(_params(dst)["lm_head.weight"], _params(src)["lm_head.weight"])


def test_clear_errors_for_bad_paths(tmp_path):
    model = Telechat2ForCausalLM(TINY)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found: nowhere"):
        ckpt.load_checkpoint_into(model, "nowhere")
    os.makedirs("empty")
    with pytest.raises(ckpt.CheckpointError, match="no .safetensors or .ckpt file"):
        ckpt.load_checkpoint_into(model, "empty")
    with open("junk.safetensors", "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint .*junk.safetensors"):
        ckpt.load_checkpoint_into(model, "junk.safetensors")


def test_config_from_converter_metadata():
    """A .safetensors written by convert/ carries its config in the `telechat2_config` metadata."""
    from safetensors.numpy import save_file

    model = Telechat2ForCausalLM(TINY, seed=9)
    save_file(_params(model), "conv.safetensors",
              metadata={"telechat2_config": json.dumps(TINY.to_hf_config())})
    cfg = ckpt.load_model_config("conv.safetensors")
    assert cfg == TINY
    ckpt.load_checkpoint_into(Telechat2ForCausalLM(cfg), "conv.safetensors")
