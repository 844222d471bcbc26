"""End to end on the real val split with the real tokenizer: the MindSpore model through the evaluator's
adapter gives deterministic results and the same per-question predictions as the PyTorch reference (HF
LlamaForCausalLM with the same weights, reference_equivalence.md) fed the same left-padded prompts.

The tiny architecture with the real vocabulary (131072) and random weights (std 0.2: with the default 0.02
the last hidden state barely depends on the question and every prediction is the same letter); the first 8
questions of two subjects per benchmark, 5-shot, the default ('official') protocols.
"""
import json
import os

import numpy as np
import pytest

from telechat2_ms.evaluate.model_adapter import left_pad, mindspore_next_token_logits
from telechat2_ms.evaluate.runner import EvalOptions, evaluate, run_dir_of

CASES = {"mmlu": ["abstract_algebra", "college_chemistry"], "ceval": ["discrete_mathematics", "middle_school_geography"]}
LOGPROB_ATOL = 1e-4  # fp32 MindSpore vs fp32 torch; measured max difference is reported by the assertion


@pytest.fixture(scope="module")
def models():
    import mindspore as ms
    import torch

    from telechat2_ms.build import synchronous_cpu_runtime
    from telechat2_ms.config import get_config
    from telechat2_ms.model import Telechat2ForCausalLM
    from tests.torch_reference import llama_reference, ms_state_numpy, randomize_biases_and_norms

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    cfg = get_config("tiny", vocab_size=131072, initializer_range=0.2)
    model = Telechat2ForCausalLM(cfg, seed=0)
    randomize_biases_and_norms(model)
    ref = llama_reference(cfg, ms_state_numpy(model))

    def torch_next_token_logits(batch):
        ids, mask, pos = (torch.from_numpy(a.astype(np.int64)) for a in left_pad(batch, pad_id=3))
        with torch.no_grad():
            out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        return out.logits[:, -1].float().numpy()  # [B,V]

    return mindspore_next_token_logits(model, pad_id=3), torch_next_token_logits


def questions(out_dir, benchmark, subject):
    opts = EvalOptions(benchmark=benchmark, split="val", output_dir=str(out_dir))
    with open(os.path.join(run_dir_of(opts), "subjects", f"{subject}.json"), encoding="utf-8") as f:
        return json.load(f)["questions"]


@pytest.mark.parametrize("benchmark", sorted(CASES))
def test_mindspore_matches_torch_reference_on_real_val(shared_dir, models, encode, tmp_path, benchmark):
    ms_fn, torch_fn = models
    run = lambda fn, out: evaluate(
        EvalOptions(benchmark=benchmark, data_dir=str(shared_dir / "data"), split="val", num_fewshot=5,
                    subjects=CASES[benchmark], batch_size=4, limit=8, output_dir=str(tmp_path / out)),
        fn, encode, progress=False)
    first, again, reference = run(ms_fn, "ms"), run(ms_fn, "ms_again"), run(torch_fn, "torch")
    assert first["overall"] == again["overall"] == reference["overall"]
    preds = []
    for subject in CASES[benchmark]:
        ms_q, again_q, ref_q = (questions(tmp_path / d, benchmark, subject) for d in ("ms", "ms_again", "torch"))
        assert ms_q == again_q  # deterministic: identical predictions and log-probs, bit for bit
        assert [q["pred"] for q in ms_q] == [q["pred"] for q in ref_q]
        assert all(q["shots"] == 5 for q in ms_q)
        diff = np.abs(np.array([q["logprobs"] for q in ms_q]) - np.array([q["logprobs"] for q in ref_q]))
        assert diff.max() < LOGPROB_ATOL, f"{subject}: max |logprob diff| {diff.max():.2e}"
        preds += [q["pred"] for q in ms_q]
    assert len(set(preds)) >= 3  # the comparison is not between two constant predictors


def test_run_eval_single_process_with_the_demo_tokenizer(shared_dir, tmp_path):
    """The newcomer's path: built-in tiny model and demo tokenizer through run_eval (settings -> outputs)."""
    import mindspore as ms

    from telechat2_ms.config import get_config
    from telechat2_ms.evaluate import run_eval
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.settings import load_settings
    from telechat2_ms.tokenizer import Telechat2Tokenizer

    ms.set_device("CPU")
    settings = load_settings(None, [f"--output_dir={tmp_path}", "--eval.benchmark=mmlu", "--eval.split=val",
                                    f"--eval.data_dir={shared_dir / 'data'}", "--eval.protocol=lm_eval",
                                    "--eval.num_fewshot=2", "--eval.subjects=college_chemistry,global_facts"])
    summary = run_eval(settings, Telechat2ForCausalLM(get_config("tiny"), seed=0), Telechat2Tokenizer.demo())
    assert summary["complete"] and summary["overall"]["n"] == 8 + 10
    assert summary["categories"]["STEM"]["n"] == 8 and summary["categories"]["other"]["n"] == 10
    assert summary["model"]["model"] == "tiny" and summary["num_fewshot"] == 2
    for path in summary["outputs"].values():
        assert os.path.exists(path)
    assert sorted(summary["outputs"]) == ["json", "markdown"]
