"""A user's path end to end: an HF TeleChat2 directory -> `convert hf2ms` -> `run_telechat2.py predict`
with the converted file; the printed answer equals the PyTorch reference's greedy continuation."""
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from convert import hf_to_ms  # noqa: E402
from convert.random_hf import make_random_hf  # noqa: E402
from telechat2_ms.chat_template import DEFAULT_SYSTEM_PROMPT  # noqa: E402
from telechat2_ms.config import get_config  # noqa: E402
from telechat2_ms.predict import run_predict  # noqa: E402
from telechat2_ms.settings import load_settings  # noqa: E402
from telechat2_ms.tokenizer import load_tokenizer  # noqa: E402
from tests.torch_reference import llama_reference  # noqa: E402


def test_convert_then_predict_matches_reference(tmp_path):
    cfg = get_config("tiny", initializer_range=0.25)
    make_random_hf(str(tmp_path / "hf"), cfg, seed=11)
    out = tmp_path / "telechat2_tiny.safetensors"
    hf_to_ms(str(tmp_path / "hf"), str(out), progress=False)

    settings = load_settings(None, [f"--load_checkpoint={out}", "--predict_data=[\"你好，请介绍一下你自己\"]",
                                    "--generate.max_new_tokens=16", "--seq_length=256", "--jit=false"])
    answer = run_predict(settings, io.StringIO())[0]

    from safetensors.numpy import load_file
    state = {k: v.astype(np.float32) for k, v in load_file(str(out)).items()}
    ref = llama_reference(cfg, state)
    tokenizer = load_tokenizer(None)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                                            {"role": "user", "content": "你好，请介绍一下你自己"}])
    with torch.no_grad():
        ids = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.03,
                           eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    assert answer == tokenizer.decode(ids)
    assert len(ids) > 0
