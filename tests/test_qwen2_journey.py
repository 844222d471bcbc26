"""A Qwen2 user's commands end to end, as a user types them: a directory with transformers' save_pretrained
weights (tiny widths, the real 151,936-id vocabulary) and a tokenizer.json built from the real Qwen2 ranks
converts with `python -m convert hf2ms`, then `run_telechat2.py` predicts with it (ChatML prompt, stop at
<|im_end|>), fine-tunes on ChatML-rendered SFT data and resumes, and evaluates; every command exits 0."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.conftest import REPO_ROOT  # noqa: E402

from tests.conftest import QWEN2_RANKS as RANKS  # noqa: E402

CEVAL = REPO_ROOT.parent / "shared" / "data" / "ceval"
pytestmark = pytest.mark.skipif(not RANKS.is_file(), reason="../shared/reference/qwen2 not present")


def run(*args, module=None):
    command = [sys.executable, "-m", module] if module else [sys.executable, str(REPO_ROOT / "run_telechat2.py")]
    proc = subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_qwen2_convert_predict_finetune_resume_eval(qwen2_dir, tmp_path):
    ms_file = tmp_path / "qwen2_tiny.safetensors"
    run("hf2ms", qwen2_dir, ms_file, "--no-progress", module="convert")
    common = [f"--load_checkpoint={ms_file}", f"--tokenizer={qwen2_dir}", "--seq_length=64", "--jit=false"]

    out = run("--run_mode=predict", *common, "--predict_data=你好, who are you?", "--generate.max_new_tokens=5",
              f"--output_dir={tmp_path / 'predict'}")
    assert "### prompt: 你好, who are you?" in out and "### answer:" in out

    data = tmp_path / "sft.jsonl"
    rows = [{"system": "You are a helpful assistant.", "multiturn": False,
             "dialog": [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "bot", "content": str(a + b)}]}
            for a in range(6) for b in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train = common + [f"--train.train_dataset={data}", f"--output_dir={tmp_path / 'ft'}", "--train.batch_size=2",
                      "--train.save_steps=2", "--train.learning_rate=1e-3"]
    out = run("--run_mode=finetune", *train, "--train.total_steps=2")
    assert "step 2/2" in out and "loss nan" not in out
    out = run("--run_mode=finetune", *train, "--train.total_steps=4", "--train.resume=true")
    assert "steps 3..4" in out and "step 4/4" in out

    if CEVAL.is_dir():
        out = run("--run_mode=eval", *common, "--eval.benchmark=ceval", f"--eval.data_dir={CEVAL}",
                  "--eval.subjects=logic", "--eval.num_fewshot=1", f"--output_dir={tmp_path / 'eval'}")
        assert "logic" in out
