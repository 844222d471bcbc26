"""A converted HF checkpoint gives the PyTorch reference's logits in the MindSpore model (fp32, CPU).

Random tiny HF checkpoint (TeleChat2 names, non-trivial norms and biases) -> hf2ms -> MindSpore
Telechat2ForCausalLM via telechat2_ms.checkpoint.load_checkpoint_into. The reference is HF
LlamaForCausalLM (tests/torch_reference.py, mapping of reference_equivalence.md) loaded from the HF
directory that ms2hf writes back; its tensors are renamed here with the spec 3.2 table, written out
independently of convert.keymap. Tolerance: max |logit difference| <= 1e-5 (measured 1.8e-7).
"""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from convert.hf_to_ms import hf_to_ms  # noqa: E402
from convert.ms_to_hf import ms_to_hf  # noqa: E402
from convert.random_hf import make_random_hf  # noqa: E402
from telechat2_ms.checkpoint import load_checkpoint_into  # noqa: E402
from telechat2_ms.config import ModelConfig, get_config  # noqa: E402
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids  # noqa: E402
from tests.torch_reference import llama_reference  # noqa: E402

ATOL = 1e-5
# spec 3.2, HF suffix -> MindFormers suffix (per layer), and the three global names
SPEC_LAYER = {"input_layernorm.weight": "attention_norm.weight", "self_attention.query.weight": "attention.wq.weight",
              "self_attention.key_value.weight": "attention.wk_v.weight",
              "self_attention.dense.weight": "attention.wo.weight", "self_attention.dense.bias": "attention.wo.bias",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
              "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
              "mlp.down_proj.bias": "feed_forward.w2.bias"}
SPEC_GLOBAL = {"transformer.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
               "transformer.ln_f.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}


def read_hf_as_spec_names(directory):
    """{MindFormers name: float32 numpy} from a HF directory, renamed with the spec table above."""
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for fname in files:
        for name, tensor in safetensors_torch.load_file(os.path.join(directory, fname)).items():
            if name in SPEC_GLOBAL:
                new = SPEC_GLOBAL[name]
            else:
                _, _, layer, suffix = name.split(".", 3)  # transformer.h.{i}.{suffix}
                new = f"model.layers.{layer}.{SPEC_LAYER[suffix]}"
            state[new] = tensor.float().numpy()
    return state


@pytest.mark.parametrize("code", ["F32", "BF16"])
def test_converted_checkpoint_matches_torch_reference(tmp_path, code):
    cfg = get_config("tiny")
    src = make_random_hf(str(tmp_path / "hf"), cfg, code, seed=7)
    ms_file = hf_to_ms(src, str(tmp_path / "tiny.safetensors"), progress=False)
    model = Telechat2ForCausalLM(cfg, init_zeros=True)
    loaded = load_checkpoint_into(model, ms_file)
    assert len(loaded) == 23

    back = ms_to_hf(ms_file, str(tmp_path / "hf_back"), progress=False)
    state = read_hf_as_spec_names(back)
    original = read_hf_as_spec_names(src)
    assert all(state[n].tobytes() == original[n].tobytes() for n in original)
    reference = llama_reference(ModelConfig.from_hf_config(back), state)

    ids = np.random.default_rng(0).integers(13, cfg.vocab_size, (2, 16))
    ours = model(to_tensor_ids(ids)).asnumpy()  # [B,S,V] fp32
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    assert ours.shape == theirs.shape == (2, 16, cfg.vocab_size)
    assert np.abs(theirs).max() > 0.1  # a real signal, not near-zero logits
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=ATOL)
