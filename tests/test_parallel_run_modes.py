"""run_telechat2.py itself under msrun: `--run_mode predict --parallel_config.model_parallel=2` on the tiny
model prints (on rank 0 only) the same greedy answers as one process.

The weights are a random tiny checkpoint saved as one .safetensors file (read by the single process) and
resharded to a tp2 layout with convert/reshard.py (each msrun rank reads only its tp{t}_pp0 file), so the
job also covers loading per-rank files and the layout's model config. Greedy decoding of a random model
is sensitive to the last bit of the logits, so equal answers mean the tp2 logits match to ~1e-6.
Plus the argument checks that need no msrun (single process).
"""
import os
import re

import pytest

import run_telechat2
from tests.msrun.launcher import run_msrun

SCRIPT = os.path.abspath(run_telechat2.__file__)
PROMPTS = ["What is 3 plus 4?", "你好"]
COMMON = ["--run_mode", "predict", "--seq_length=128", "--generate.max_new_tokens=12"]


def _answers(text):
    return re.findall(r"^### answer: (.*)$", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from convert.reshard import reshard
    from telechat2_ms.checkpoint import save_model
    from telechat2_ms.config import get_config
    from telechat2_ms.model import Telechat2ForCausalLM

    out = tmp_path_factory.mktemp("ckpt")
    cfg = get_config("tiny")
    save_model(Telechat2ForCausalLM(cfg, seed=11), str(out / "full"), cfg)
    reshard(str(out / "full" / "model.safetensors"), str(out / "layout_tp2"), tp=2, pp=1, config=cfg,
            progress=False)
    return out


@pytest.mark.msrun
def test_predict_tp2_under_msrun_prints_the_single_process_answers(checkpoints, tmp_path, capsys):
    assert run_telechat2.main(COMMON + [f"--load_checkpoint={checkpoints / 'full'}",
                                        "--predict_data", *PROMPTS]) == 0
    single = _answers(capsys.readouterr().out)
    assert len(single) == 2 and all(single), single

    result = run_msrun(SCRIPT, COMMON + ["--parallel_config.model_parallel=2",
                                         f"--load_checkpoint={checkpoints / 'layout_tp2'}",
                                         "--predict_data", *PROMPTS],
                       workers=2, timeout=300, workdir=str(tmp_path))
    assert result.rc == 0 and not result.timed_out, result.all_logs()[-6000:]
    assert _answers(result.worker_log(0)) == single, result.worker_log(0)[-3000:]
    assert _answers(result.worker_log(1)) == []  # only rank 0 prints


def test_parallel_config_without_msrun_is_refused(capsys):
    assert run_telechat2.main(COMMON + ["--parallel_config.model_parallel=2"]) == 2
    err = capsys.readouterr().err
    assert "msrun --worker_num=2" in err and "model_parallel 2" in err


def test_generation_refuses_pipeline_and_context_parallel():
    from telechat2_ms.config import ConfigError
    from telechat2_ms.config import get_config
    from telechat2_ms.settings import load_settings, validate

    def run_dims(settings, world, purpose):
        settings.run_mode = {"generate": "predict", "eval": "eval"}[purpose]
        return validate(settings, world, get_config("tiny"))

    for key in ("pipeline_stage", "context_parallel"):
        settings = load_settings(None, [f"--parallel_config.{key}=2"])
        with pytest.raises(ConfigError, match="pipeline_stage and context_parallel to 1"):
            run_dims(settings, world=2, purpose="eval")
    settings = load_settings(None, ["--parallel_config.context_parallel=2"])
    with pytest.raises(ConfigError, match="set parallel_config.context_parallel to 1"):
        run_dims(settings, world=2, purpose="generate")
    dims = run_dims(load_settings(None, ["--parallel_config.pipeline_stage=2"]), world=2, purpose="generate")
    assert (dims.pp, dims.micro_batch_num) == (2, 2)  # generation runs the stages in turn
    settings = load_settings(None, ["--parallel_config.model_parallel=2"])
    with pytest.raises(ConfigError, match="the world has 4 processes"):
        run_dims(settings, world=4, purpose="generate")
    dims = run_dims(load_settings(None, ["--parallel_config.model_parallel=2", "--parallel_config.use_seq_parallel=true",
                                         "--parallel_config.data_parallel=2"]), world=4, purpose="eval")
    assert (dims.dp, dims.tp, dims.sp) == (2, 2, False)


def test_broadcast_and_gather_objects_in_one_process():
    from telechat2_ms.parallel.ranks import broadcast_object, gather_objects

    assert broadcast_object({"line": "你好"}) == {"line": "你好"}
    assert gather_objects([1, "a"]) == [[1, "a"]]
