"""kill -9 at many points, then the next run: nothing half-written is ever taken for a result.

- Conversion (`python -m convert hf2ms`, ~95 MiB output): killed before the temporary appears, at random
  fractions of the output's size while it is written (seeded), and once it is complete. After every kill the
  target is absent or complete; the rerun of the same command succeeds, reports and removes the orphaned
  temporary, leaves no temporary behind, and writes the same bytes as an uninterrupted conversion.
- Training under msrun (tp2, a checkpoint every step, keep_checkpoint_max 2): killed at 5 points, the
  first while a checkpoint is being written (its `.tmp-step_*` directory exists). After every kill each
  listed checkpoint merges (rank files verified) and loads; each next run (--overwrite) starts clean; the
  last one runs to the end and leaves exactly the newest 2 checkpoints and no temporary (resuming after such
  kills: tests/test_parallel_resume.py).
"""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from telechat2_ms import checkpoint as ckpt

CONVERT_ENV = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO_ROOT))


def _temporaries(directory):
    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.join(root, n) for n in dirs + files if ".tmp-" in n or n.startswith(".tmp")]
    return found


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _convert(hf, target, *extra):
    return subprocess.run([sys.executable, "-m", "convert", "hf2ms", hf, target, "--no-progress", *extra],
                          capture_output=True, text=True, env=CONVERT_ENV, timeout=120)


def _kill_conversion_at(hf, target, fraction, expected_size):
    """Start the conversion; SIGKILL it once its temporary holds `fraction` of the output (None: as soon as
    the process runs; 'done': after it finished writing but as soon as the target exists)."""
    directory = os.path.dirname(target)
    proc = subprocess.Popen([sys.executable, "-m", "convert", "hf2ms", hf, target, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=CONVERT_ENV)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if fraction is None:
            time.sleep(0.2)  # importing: no temporary yet
            break
        if fraction == "done":
            if os.path.exists(target):
                break
        else:
            temps = [os.path.join(directory, n) for n in os.listdir(directory) if ".tmp-" in n]
            try:
                if temps and os.path.getsize(temps[0]) >= fraction * expected_size:
                    break
            except FileNotFoundError:
                pass
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_conversion_killed_at_random_points_then_rerun(tmp_path):
    from convert.random_hf import make_random_hf
    from telechat2_ms.config import get_config

    cfg = get_config("tiny").replace(hidden_size=512, ffn_hidden_size=1376, num_layers=6, num_heads=8,
                                     num_kv_heads=2, vocab_size=8192)
    hf = make_random_hf(str(tmp_path / "hf"), cfg, "F32", shard_bytes=20_000_000)
    reference = str(tmp_path / "reference.safetensors")
    assert _convert(hf, reference).returncode == 0
    size, want = os.path.getsize(reference), _sha(reference)
    rng = random.Random(20261203)
    points = [None] + sorted(rng.uniform(0.02, 0.98) for _ in range(5)) + ["done"]
    for i, point in enumerate(points):
        out_dir = tmp_path / f"kill{i}"
        out_dir.mkdir()
        target = str(out_dir / "model.safetensors")
        _kill_conversion_at(hf, target, point, size)
        if os.path.exists(target):  # killed after the rename: the target is the complete result
            assert _sha(target) == want, point
            rerun = _convert(hf, target, "--overwrite")
        else:
            rerun = _convert(hf, target)
        left = [n for n in os.listdir(out_dir) if ".tmp-" in n]
        assert rerun.returncode == 0, (point, rerun.stderr)
        orphans_before = [line for line in rerun.stderr.splitlines() if line.startswith("warning: removed")]
        assert all("left by an interrupted write of" in line for line in orphans_before)
        assert left == [], (point, left)  # the rerun swept what the kill left
        assert _sha(target) == want, point
        if isinstance(point, float):
            assert len(orphans_before) == 1, (point, rerun.stderr)  # the kill left one temporary: reported



TRAIN = ["--run_mode=train", "--train.train_dataset=demo:64", "--train.data_format=sft", "--seq_length=64",
         "--train.truncation=truncate", "--train.batch_size=2", "--train.learning_rate=1e-2", "--jit=false",
         "--parallel_config.model_parallel=2", "--train.save_steps=1", "--train.keep_checkpoint_max=2"]


@pytest.mark.msrun
def test_msrun_training_killed_at_five_points(tmp_path):
    from convert.reshard import merge
    from telechat2_ms.checkpoint import load_checkpoint_into
    from telechat2_ms.config import get_config
    from telechat2_ms.model import Telechat2ForCausalLM
    from tests.msrun.launcher import run_msrun

    out = tmp_path / "out"
    root = out / "checkpoints"
    script = str(REPO_ROOT / "run_telechat2.py")

    def saving():  # a checkpoint is being written right now
        try:
            return any(n.startswith(".tmp-") for n in os.listdir(root))
        except FileNotFoundError:
            return False

    def after(step):  # this job has saved checkpoint `step` (not the previous job's, which --overwrite removes)
        def condition():
            try:
                return any(s >= step and os.stat(p).st_mtime >= started[0] for s, p in ckpt.list_checkpoints(str(root)))
            except FileNotFoundError:
                return False
        return condition

    kill_points = [("during a checkpoint write", saving), ("after step 1", after(1)), ("after step 2", after(2)),
                   ("after step 3", after(3)), ("after step 5", after(5))]
    seen_mid_write, started = False, [0.0]
    for i, (label, condition) in enumerate(kill_points):
        started[0] = time.time()
        work = tmp_path / f"job{i}"
        work.mkdir()
        args = TRAIN + [f"--output_dir={out}", "--train.total_steps=40", "--overwrite"]
        result = run_msrun(script, args, workers=2, timeout=240, workdir=str(work), kill_when=condition)
        assert result.killed, f"{label}: the job ended before the kill point (rc {result.rc})\n{result.all_logs()[-3000:]}"
        if label == "during a checkpoint write":
            seen_mid_write = saving() or seen_mid_write
        listed = ckpt.list_checkpoints(str(root))
        for step, path in listed:  # every listed checkpoint is complete: merges (rank files verified) and loads
            merged = merge(path, str(tmp_path / f"merged{i}_{step}.safetensors"), progress=False)
            load_checkpoint_into(Telechat2ForCausalLM(get_config("tiny")), merged)
    assert seen_mid_write, "no kill point fell inside a checkpoint write"
    work = tmp_path / "final"
    work.mkdir()
    result = run_msrun(script, TRAIN + [f"--output_dir={out}", "--train.total_steps=6", "--overwrite"], workers=2,
                       timeout=240, workdir=str(work))
    assert result.rc == 0, result.all_logs()[-3000:]
    assert [s for s, _ in ckpt.list_checkpoints(str(root))] == [5, 6]  # keep_checkpoint_max under msrun
    assert _temporaries(out) == []
