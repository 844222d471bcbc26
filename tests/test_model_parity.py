"""The MindSpore TeleChat2 against the independent PyTorch reference (HF LlamaForCausalLM with the
TeleChat2 mapping, tests/torch_reference.py), fp32 on CPU.

Tolerances: logits max abs difference <= 1e-4 (measured ~2e-7 on tiny); greedy tokens identical."""
import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from telechat2_ms.config import get_config  # noqa: E402
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids  # noqa: E402
from tests.torch_reference import llama_reference, ms_state_numpy, randomize_biases_and_norms  # noqa: E402

ATOL = 1e-4


def _padded_batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(13, vocab, (3, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    ids[mask == 0] = 3
    return ids, mask


def _compare(cfg, seed=0):
    model = Telechat2ForCausalLM(cfg, seed=seed)
    randomize_biases_and_norms(model, seed + 1)
    ref = llama_reference(cfg, ms_state_numpy(model))
    ids, mask = _padded_batch(cfg.vocab_size, seed)
    ours = model(to_tensor_ids(ids), to_tensor_ids(mask)).asnumpy()
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)  # official: 0..S-1, pads included
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=positions).logits.numpy()
    return ours, theirs, mask


def test_tiny_logits_match_reference_on_padded_batch():
    cfg = get_config("tiny")
    ours, theirs, mask = _compare(cfg)
    assert ours.shape == (3, 12, cfg.vocab_size)
    real = mask > 0
    assert np.abs(ours - theirs)[real].max() <= ATOL
    # pad query rows attend to nothing real; they still match because both mask with dtype-min
    assert np.abs(ours - theirs).max() <= ATOL


def test_mha_variant_matches_reference():
    cfg = get_config("tiny", num_kv_heads=4, initializer_range=0.1)
    ours, theirs, mask = _compare(cfg, seed=3)
    assert np.abs(ours - theirs)[mask > 0].max() <= ATOL


@pytest.mark.parametrize("size", ["telechat2_3b", "telechat2_7b", "telechat2_35b", "telechat2_115b"])
def test_one_layer_at_real_shapes_matches_reference(size):
    """Real hidden / heads / kv heads / ffn sizes, one layer, vocab cut to 512 so it fits in memory."""
    cfg = get_config(size, num_layers=1, vocab_size=512)
    ours, theirs, mask = _compare(cfg, seed=5)
    diff = np.abs(ours - theirs)[mask > 0].max()
    scale = np.abs(theirs).max()
    gc.collect()
    assert diff <= ATOL, f"{size}: max abs logit diff {diff:.3g} (logit scale {scale:.3g})"
