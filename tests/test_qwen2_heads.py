"""Qwen2 on the one model code, beyond the causal LM: the three other heads against transformers'
Qwen2For{SequenceClassification,TokenClassification,QuestionAnswering} holding the same weights, and one decoder
layer at the real Qwen2-7B and 72B widths (GQA 28/4 and 64/8 heads, q/k/v biases) against Qwen2ForCausalLM.

fp32 on CPU. Heads: max abs difference <= 1e-5 (tiny widths, as tests/test_heads.py for TeleChat2). Real widths:
logits of a 1-layer model with a 1024-token vocabulary, max abs difference <= 1e-4 relative to the largest logit
(the 18944- / 29568-wide FFN sums in another order than torch's)."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Tensor  # noqa: E402

from telechat2_ms.config import get_config  # noqa: E402
from telechat2_ms.model import (Telechat2ForCausalLM, Telechat2ForQuestionAnswering,  # noqa: E402
                                Telechat2ForSequenceClassification, Telechat2ForTokenClassification, to_tensor_ids)
from tests.torch_reference import ms_state_numpy, qwen2_reference, randomize_biases_and_norms  # noqa: E402

CFG = get_config("qwen2_tiny", initializer_range=0.1)


def _reference(head_cls, ms_model, num_labels, weights):
    """transformers' Qwen2 head class with the MindSpore backbone's weights and the given head weights."""
    state = ms_state_numpy(ms_model)
    causal = qwen2_reference(CFG, state)
    conf = causal.config
    conf.num_labels = num_labels
    ref = head_cls(conf).eval()
    ref.base_model.load_state_dict(causal.model.state_dict())
    for name, array in weights.items():
        ref.get_parameter(name).data = torch.from_numpy(array)
    return ref


def _ids():
    ids = np.random.default_rng(0).integers(13, CFG.vocab_size, (2, 12))  # longer than the 6-token window
    ids[1, 8:] = CFG.pad_token_id  # right padding: the sequence head pools the last real token
    return ids


def test_qwen2_sequence_classification_pools_last_real_token():
    model = Telechat2ForSequenceClassification(CFG, num_labels=3, seed=1)
    randomize_biases_and_norms(model, 2)
    ref = _reference(transformers.Qwen2ForSequenceClassification, model, 3,
                     {"score.weight": model.score.weight.asnumpy()})
    ids = _ids()
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    ours = model(to_tensor_ids(ids)).asnumpy()
    assert ours.shape == (2, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_qwen2_token_classification_and_question_answering():
    model = Telechat2ForTokenClassification(CFG, num_labels=5, seed=2)
    randomize_biases_and_norms(model, 3)
    model.score.bias.set_data(Tensor(np.linspace(-1, 1, 5).astype(np.float32)))
    ref = _reference(transformers.Qwen2ForTokenClassification, model, 5,
                     {"score.weight": model.score.weight.asnumpy(), "score.bias": model.score.bias.asnumpy()})
    ids = _ids()[:1]
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model(to_tensor_ids(ids)).asnumpy(), theirs, atol=1e-5)

    qa = Telechat2ForQuestionAnswering(CFG, seed=3)
    randomize_biases_and_norms(qa, 4)
    qa.qa_outputs.bias.set_data(Tensor(np.array([0.5, -0.5], np.float32)))
    ref = _reference(transformers.Qwen2ForQuestionAnswering, qa, 2,
                     {"qa_outputs.weight": qa.qa_outputs.weight.asnumpy(), "qa_outputs.bias": qa.qa_outputs.bias.asnumpy()})
    start, end = qa(to_tensor_ids(ids))
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids))
    np.testing.assert_allclose(start.asnumpy(), out.start_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(end.asnumpy(), out.end_logits.numpy(), atol=1e-5)


def _one_real_layer(size: str):
    """qwen2_7b / qwen2_72b cut to one layer and a 1024-token vocabulary (untied), with every bias random."""
    cfg = dataclasses.replace(get_config(size), num_layers=1, vocab_size=1024, tie_word_embeddings=False,
                              initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = Telechat2ForCausalLM(cfg, seed=5)
    randomize_biases_and_norms(model, 6)
    ids = np.random.default_rng(1).integers(13, 1024, (1, 16))
    ours = model(to_tensor_ids(ids)).asnumpy()
    ref = qwen2_reference(cfg, ms_state_numpy(model))
    del model
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    return ours, theirs


def test_one_layer_at_qwen2_7b_widths_matches_hf():
    ours, theirs = _one_real_layer("qwen2_7b")
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))


@pytest.mark.slow
def test_one_layer_at_qwen2_72b_widths_matches_hf():
    """About 11 GB of host memory (0.9 G parameters held by both frameworks); `pytest -m slow`."""
    ours, theirs = _one_real_layer("qwen2_72b")
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))
