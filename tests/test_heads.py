"""The three non-LM heads against HF's Llama heads holding the same backbone weights (fp32, CPU)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Tensor  # noqa: E402

from telechat2_ms.config import get_config  # noqa: E402
from telechat2_ms.model import (Telechat2ForQuestionAnswering, Telechat2ForSequenceClassification,  # noqa: E402
                                Telechat2ForTokenClassification, to_tensor_ids)
from tests.torch_reference import llama_reference, ms_state_numpy  # noqa: E402

CFG = get_config("tiny", initializer_range=0.1)


def _reference(head_cls, ms_model, extra):
    """HF head class with the MindSpore backbone's weights (via the causal-LM reference) and head weights."""
    state = ms_state_numpy(ms_model)
    state["lm_head.weight"] = np.zeros((CFG.vocab_size, CFG.hidden_size), np.float32)
    causal = llama_reference(CFG, state)
    conf = causal.config
    conf.num_labels = extra["num_labels"]
    conf.pad_token_id = CFG.pad_token_id
    ref = head_cls(conf).eval()
    ref.base_model.load_state_dict(causal.model.state_dict())
    ref.base_model.rotary_emb = causal.model.rotary_emb  # keeps the fp16-rounded tables
    for name, array in extra["weights"].items():
        ref.get_parameter(name).data = torch.from_numpy(array)
    return ref


def _ids():
    ids = np.random.default_rng(0).integers(13, CFG.vocab_size, (2, 9))
    ids[1, 6:] = CFG.pad_token_id  # right padding: the sequence head pools the last real token
    return ids


def test_sequence_classification_pools_last_real_token():
    model = Telechat2ForSequenceClassification(CFG, num_labels=3, seed=1)
    score = model.score.weight.asnumpy()
    ref = _reference(transformers.LlamaForSequenceClassification, model,
                     {"num_labels": 3, "weights": {"score.weight": score}})
    ids = _ids()
    ours = model(to_tensor_ids(ids)).asnumpy()
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert ours.shape == (2, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_token_classification_and_question_answering():
    model = Telechat2ForTokenClassification(CFG, num_labels=5, seed=2)
    model.score.bias.set_data(Tensor(np.linspace(-1, 1, 5).astype(np.float32)))
    ref = _reference(transformers.LlamaForTokenClassification, model,
                     {"num_labels": 5, "weights": {"score.weight": model.score.weight.asnumpy(),
                                                   "score.bias": model.score.bias.asnumpy()}})
    ids = _ids()[:1]
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(model(to_tensor_ids(ids)).asnumpy(), theirs, atol=1e-5)

    qa = Telechat2ForQuestionAnswering(CFG, seed=3)
    qa.qa_outputs.bias.set_data(Tensor(np.array([0.5, -0.5], np.float32)))
    ref = _reference(transformers.LlamaForQuestionAnswering, qa,
                     {"num_labels": 2, "weights": {"qa_outputs.weight": qa.qa_outputs.weight.asnumpy(),
                                                   "qa_outputs.bias": qa.qa_outputs.bias.asnumpy()}})
    start, end = qa(to_tensor_ids(ids))
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids))
    np.testing.assert_allclose(start.asnumpy(), out.start_logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(end.asnumpy(), out.end_logits.numpy(), atol=1e-5)
