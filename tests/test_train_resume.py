"""Exact resume: 20 steps straight == 10 steps, SIGKILL, resume to 20 (same loss every step, same parameters);
atomic checkpoints; clear errors when there is nothing to resume from."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from telechat2_ms.checkpoint import CheckpointError, read_checkpoint
from telechat2_ms.settings import load_settings
from telechat2_ms.train import Trainer
from telechat2_ms.train import checkpointing as ckpts

ARGS = ["--seq_length=48", "--train.train_dataset=demo:120", "--train.truncation=drop", "--train.batch_size=2",
        "--train.grad_accum_steps=2", "--train.total_steps=20", "--train.save_steps=10", "--train.warmup_steps=3",
        "--train.learning_rate=3e-3", "--train.min_learning_rate=3e-4", "--train.keep_checkpoint_max=2"]

CHILD = r"""
import sys, time
from telechat2_ms.settings import load_settings
from telechat2_ms.train import Trainer

def hang_after_step_10_checkpoint(event, trainer, info):
    if event == "checkpoint" and info["step"] == 10:
        print("CHECKPOINT-10-WRITTEN", flush=True)
        time.sleep(300)  # the test kills the process here, mid-run

Trainer(load_settings(None, sys.argv[1:]), [hang_after_step_10_checkpoint], printer=lambda line: None).train()
"""


def _params(trainer):
    return {name: p.asnumpy().copy() for name, p in trainer.model.parameters_and_names()}


def _losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_resume_after_sigkill_is_exact(tmp_path):
    # the interrupted run: a real process, killed with SIGKILL after its step-10 checkpoint
    with open("child.py", "w", encoding="utf-8") as f:
        f.write(CHILD)
    env = dict(os.environ, GLOG_v="3")
    child = subprocess.Popen([sys.executable, "child.py", "--output_dir=resumed"] + ARGS, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 240
        output = []
        while time.time() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            output.append(line)
            if "CHECKPOINT-10-WRITTEN" in line:
                break
        assert output and "CHECKPOINT-10-WRITTEN" in output[-1], "".join(output)[-3000:]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert [s for s, _ in ckpts.list_checkpoints("resumed/checkpoints")] == [10]

    straight = Trainer(load_settings(None, ["--output_dir=straight"] + ARGS), printer=lambda line: None)
    straight_summary = straight.train()
    resumed = Trainer(load_settings(None, ["--output_dir=resumed", "--train.resume=true"] + ARGS),
                      printer=lambda line: None)
    assert resumed.step == 10 and resumed.sampler.consumed == 10 * 2 * 2
    resumed_summary = resumed.train()

    assert resumed_summary["first_step"] == 11 and len(resumed_summary["losses"]) == 10
    assert _losses("resumed") == _losses("straight")  # steps 1-10 from the killed run, 11-20 resumed
    assert [loss for _, loss in _losses("straight")] == straight_summary["losses"]
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name, value in straight.engine.optimizer.state_tensors().items():
        np.testing.assert_array_equal(value.asnumpy(), resumed.engine.optimizer.state_tensors()[name].asnumpy())
    # keep_checkpoint_max=2: steps 10 and 20 kept; the final checkpoint holds the final parameters
    assert [s for s, _ in ckpts.list_checkpoints("resumed/checkpoints")] == [10, 20]
    saved = read_checkpoint("resumed/checkpoints/step_00000020/model.safetensors")
    np.testing.assert_array_equal(saved["lm_head.weight"].asnumpy(), b["lm_head.weight"])


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path):
    root = "ck"
    good = ckpts.save_training_checkpoint(root, 10, {"model.safetensors": {"w": np.ones((2, 2), np.float32)}},
                                          {"step": 10})

    def crash(tmp_dir):
        assert os.path.isfile(os.path.join(tmp_dir, "trainer_state.json"))
        raise KeyboardInterrupt("killed while saving")

    with pytest.raises(KeyboardInterrupt):
        ckpts.save_training_checkpoint(root, 20, {"model.safetensors": {"w": np.zeros((2, 2), np.float32)}},
                                       {"step": 20}, before_rename=crash)
    assert ckpts.latest_checkpoint(root) == good
    assert sorted(os.listdir(root)) == ["step_00000010"]
    # what SIGKILL leaves behind (a half-written temporary directory) is ignored, then cleaned by the next save
    os.makedirs(os.path.join(root, ".tmp-step_00000020-abc"))
    os.makedirs(os.path.join(root, "step_00000030"))  # no trainer_state.json: incomplete
    assert ckpts.latest_checkpoint(root) == good
    ckpts.save_training_checkpoint(root, 20, {"model.safetensors": {"w": np.zeros((2, 2), np.float32)}}, {"step": 20},
                                   keep=1)
    assert sorted(os.listdir(root)) == ["step_00000020", "step_00000030"]
    np.testing.assert_array_equal(read_checkpoint(os.path.join(root, "step_00000020"))["w"].asnumpy(), 0)


def test_missing_checkpoint_to_resume_from_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="train.resume is true but there is no complete checkpoint under"):
        Trainer(load_settings(None, ["--output_dir=fresh", "--train.resume=true"] + ARGS))
    with pytest.raises(CheckpointError, match="train.resume_from: checkpoint directory not found: nowhere/step_1"):
        Trainer(load_settings(None, ["--output_dir=fresh", "--train.resume_from=nowhere/step_1"] + ARGS))
    os.makedirs("half/step_00000010")
    with pytest.raises(CheckpointError, match="is not a complete training checkpoint"):
        Trainer(load_settings(None, ["--output_dir=fresh", "--train.resume_from=half/step_00000010"] + ARGS))
