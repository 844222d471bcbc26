"""run_telechat2.py: predict and chat on the built-in tiny default, and clear errors on bad input."""
import io
import subprocess
import sys

import pytest

from telechat2_ms.generate import GenerationError
from telechat2_ms.predict import run_chat, run_predict
from telechat2_ms.settings import load_settings
from tests.conftest import REPO_ROOT

FAST = ["--generate.max_new_tokens=6", "--seq_length=512", "--jit=false"]


def test_main_job_runs_with_no_downloads_and_prints_text():
    """The README's main command (tiny default, no checkpoint, CPU) in a fresh process."""
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_telechat2.py"), "--predict_data", "你好",
                           "--generate.max_new_tokens=8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "### prompt: 你好" in proc.stdout
    answer = proc.stdout.split("### answer:")[1].strip()
    assert len(answer) > 0


def test_predict_batch_returns_one_answer_per_prompt():
    out = io.StringIO()
    settings = load_settings(None, FAST + ["--predict_data=[\"a\", \"bb\", \"ccc\"]"])
    answers = run_predict(settings, out)
    assert len(answers) == 3 and out.getvalue().count("### answer:") == 3


def test_chat_keeps_history_and_clears_it():
    settings = load_settings(None, FAST)
    history = run_chat(settings, io.StringIO("hello\nhow are you\n/clear\nagain\n/exit\n"), io.StringIO())
    assert [m["role"] for m in history] == ["user", "bot"]
    assert history[0]["content"] == "again"


def test_empty_prompt_and_too_long_prompt_are_refused():
    with pytest.raises(GenerationError, match="empty prompt"):
        run_predict(load_settings(None, FAST + ["--predict_data=[\"  \"]"]), io.StringIO())
    long_prompt = "word " * 600
    settings = load_settings(None, ["--seq_length=64", "--jit=false", "--generate.max_new_tokens=4"])
    settings.predict_data = [long_prompt]
    with pytest.raises(GenerationError, match="exceeds the context of 64 tokens"):
        run_predict(settings, io.StringIO())


@pytest.mark.parametrize("args,message", [
    (["--model=telechat2_8b"], "unknown model size 'telechat2_8b'"),
    (["--generate.topk=3"], "unrecognized arguments: --generate.topk=3 (did you mean --generate.top_k?)"),
    (["--load_checkpoint=/nonexistent/ckpt"], "does not exist"),
    (["--compute_dtype=bfloat16"], "bfloat16 has no CPU kernels"),
])
def test_cli_errors_are_one_clear_line(args, message):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "run_telechat2.py")] + args, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: ")


def test_checkpoint_config_that_contradicts_the_named_size_is_refused(tmp_path):
    import json
    from telechat2_ms.config import ConfigError, get_config
    from telechat2_ms.build import model_config
    from telechat2_ms.checkpoint import resolve_checkpoint

    def resolve_model_config(settings):
        return model_config(settings, resolve_checkpoint(settings.load_checkpoint))
    (tmp_path / "config.json").write_text(json.dumps(get_config("telechat2_7b").to_hf_config()))
    settings = load_settings(None, [f"--load_checkpoint={tmp_path}", "--model=telechat2_3b"])
    with pytest.raises(ConfigError, match="does not match model 'telechat2_3b'"):
        resolve_model_config(settings)
    settings = load_settings(None, [f"--load_checkpoint={tmp_path}", "--model=telechat2_7b"])
    assert resolve_model_config(settings) == get_config("telechat2_7b")


def test_training_output_dir_loads_its_latest_checkpoint(tmp_path):
    """`--load_checkpoint OUTPUT_DIR` picks checkpoints/step_<latest>; the predictions use those weights."""
    from telechat2_ms.checkpoint import save_model
    from telechat2_ms.config import ConfigError, get_config
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.checkpoint import resolve_checkpoint

    def resolve_checkpoint_path(path):
        return resolve_checkpoint(path).path
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="no finished checkpoint"):
        resolve_checkpoint_path(str(tmp_path))
    cfg = get_config("tiny")
    for step, seed in ((5, 1), (10, 2)):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        save_model(Telechat2ForCausalLM(cfg, seed=seed), str(folder), config=cfg)
        (folder / "trainer_state.json").write_text("{}")
    assert resolve_checkpoint_path(str(tmp_path)).endswith("step_00000010")
    settings = load_settings(None, FAST + [f"--load_checkpoint={tmp_path}", "--predict_data=[\"hi\"]"])
    via_dir = run_predict(settings, io.StringIO())
    settings = load_settings(None, FAST + [f"--load_checkpoint={tmp_path}/checkpoints/step_00000010",
                                           "--predict_data=[\"hi\"]"])
    assert run_predict(settings, io.StringIO()) == via_dir
    settings = load_settings(None, FAST + [f"--load_checkpoint={tmp_path}/checkpoints/step_00000005",
                                           "--predict_data=[\"hi\"]"])
    assert run_predict(settings, io.StringIO()) != via_dir
