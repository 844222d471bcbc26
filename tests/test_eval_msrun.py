"""`run_eval` under msrun on CPU (2 workers): data parallel (subjects split, results gathered on rank 0 with
the MindSpore all-gather) and tensor parallel (the parallelized model behind the same adapter) give the
single-process predictions. This file is also the msrun worker (`python test_eval_msrun.py OUT_DIR DATA_DIR TOKENIZER`).

Model: tiny architecture, real vocabulary (131072), random weights (std 0.2), real tokenizer; C-Eval val,
official protocol, 5-shot, the first 6 questions of 3 subjects.
"""
import json
import os
import sys

import numpy as np
import pytest

SUBJECTS = ["discrete_mathematics", "logic", "middle_school_geography"]
TASKS = ("single0", "dp2", "tp2")


def _settings(out_dir: str, task: str, data_dir: str, tokenizer: str):
    from telechat2_ms.settings import load_settings

    overrides = [f"--output_dir={os.path.join(out_dir, task)}", f"--tokenizer={tokenizer}", "--eval.benchmark=ceval",
                 f"--eval.data_dir={data_dir}", "--eval.split=val", "--eval.num_fewshot=5",
                 f"--eval.subjects={','.join(SUBJECTS)}", "--eval.batch_size=4"]
    if task == "dp2":
        overrides.append("--parallel_config.data_parallel=2")
    if task == "tp2":
        overrides.append("--parallel_config.model_parallel=2")
    return load_settings(None, overrides)


def worker(out_dir: str, data_dir: str, tokenizer_path: str) -> None:
    """Every rank: 'single<rank>' (world 1, its own output dir), then 'dp2' and 'tp2' through run_eval."""
    import mindspore as ms

    from telechat2_ms.build import synchronous_cpu_runtime
    from telechat2_ms.config import get_config
    from telechat2_ms.evaluate.model_adapter import mindspore_next_token_logits
    from telechat2_ms.evaluate.runner import evaluate, options_from_settings, run_eval
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.parallel import comm
    from telechat2_ms.parallel.dims import ParallelDims
    from telechat2_ms.parallel.parallelize import parallelize_telechat2
    from telechat2_ms.tokenizer import Telechat2Tokenizer
    from tests.torch_reference import randomize_biases_and_norms

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    rank, world = comm.init_distributed()
    tokenizer = Telechat2Tokenizer(tokenizer_path)
    encode = lambda text: tokenizer.encode(text, parse_special=False)

    def build():
        model = Telechat2ForCausalLM(get_config("tiny", vocab_size=131072, initializer_range=0.2), seed=0)
        randomize_biases_and_norms(model)
        return model

    # The single-process reference (no communication) on every rank, so no rank waits long in a collective.
    options = options_from_settings(_settings(out_dir, f"single{rank}", data_dir, tokenizer_path))
    evaluate(options, mindspore_next_token_logits(build()), encode, progress=False, model_tag={"model": "tiny"})
    summary = run_eval(_settings(out_dir, "dp2", data_dir, tokenizer_path), build(), tokenizer)
    with open(os.path.join(out_dir, f"dp2_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"world": world, "returned": sorted(summary)}, f)
    parallel = parallelize_telechat2(build(), ParallelDims(tp=2))
    run_eval(_settings(out_dir, "tp2", data_dir, tokenizer_path), parallel.model, tokenizer)


def _subject_questions(out_dir, task, subject):
    path = os.path.join(out_dir, task, "eval", "ceval_val_official_5shot", "subjects", f"{subject}.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["questions"]


@pytest.mark.msrun
def test_run_eval_data_and_tensor_parallel_match_one_process(shared_dir, tokenizer_115b_path, tmp_path):
    from tests.msrun.launcher import run_msrun

    result = run_msrun(os.path.abspath(__file__), [str(tmp_path), str(shared_dir / "data"), tokenizer_115b_path],
                       workers=2, timeout=420, workdir=str(tmp_path))
    assert result.rc == 0, f"msrun rc={result.rc} timed_out={result.timed_out}\n{result.all_logs()[-6000:]}"
    ranks = [json.load(open(tmp_path / f"dp2_rank{r}.json")) for r in range(2)]
    assert ranks[0]["world"] == 2 and "overall" in ranks[0]["returned"] and ranks[1]["returned"] == ["rank", "subjects"]
    totals = {}
    for task in TASKS:
        with open(tmp_path / task / "eval" / "ceval_val_official_5shot" / "results.json", encoding="utf-8") as f:
            totals[task] = json.load(f)
        assert sorted(totals[task]["subjects"]) == SUBJECTS
    for subject in SUBJECTS:
        single, dp2, tp2 = (_subject_questions(tmp_path, t, subject) for t in TASKS)
        assert _subject_questions(tmp_path, "single1", subject) == single  # deterministic across processes
        assert dp2 == single  # same model and batches on another rank: bit-identical
        assert [q["pred"] for q in tp2] == [q["pred"] for q in single]
        diff = np.abs(np.array([q["logprobs"] for q in tp2]) - np.array([q["logprobs"] for q in single]))
        assert diff.max() < 1e-4, f"{subject}: tp2 vs single max |logprob diff| {diff.max():.2e}"
    assert totals["dp2"]["overall"] == totals["single0"]["overall"] == totals["tp2"]["overall"]


if __name__ == "__main__":
    worker(*sys.argv[1:4])
