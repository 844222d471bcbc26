"""Parallel training resumes (run_telechat2.py under msrun on CPU, tiny TeleChat2, 2 or 4 workers).

Every run below is the same run (demo SFT data, seq 64, global batch 2, 5 clipped AdamW steps, a checkpoint
after every step): only the layout and how often it is killed differ.
- Killed and resumed, per layout (tp2; dp2 with optimizer_shard, pp2 and tp2 x pp2 on 4 workers are `slow`, about
  1-2 minutes each, to keep the default run within CI's time): the whole job is
  killed with SIGKILL while checkpoint 2 is being written (its temporary directory exists), resumed, killed again
  mid-run (once checkpoint 3 is published, during step 4), and resumed to the end. Every step's loss (the last
  record of each step in metrics.jsonl) and the final checkpoint's files (weights and both AdamW moments, every
  rank file) equal the uninterrupted run's bit for bit.
- Onto a new layout: checkpoint 2 of the uninterrupted tp2 x pp2 run resumes under tp2, and checkpoint 2 of the
  pp2 run under dp2 with optimizer_shard. The losses of steps 3..5 equal those of the old layout's own run
  within 1e-5 (another reduction order), and the final weights and moments, merged from either layout's rank
  files by `convert merge` (`--file exp_avg.safetensors` for a moment), agree within 1e-4 of each tensor's
  largest value.
- Across world sizes: tp2's checkpoint 2 continues in one process, and a one-process run's checkpoint 2 under tp2,
  with the same criteria.
- A LoRA run under tp2 resumes bit for bit. Bad resumes (a checkpoint missing one rank's file, a checkpoint of
  another model) end in one error line and write nothing.
"""
import json
import os

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from telechat2_ms import checkpoint as ckpt

pytestmark = pytest.mark.msrun

ARGS = ["--run_mode=finetune", "--train.train_dataset=demo:64", "--seq_length=64", "--train.truncation=truncate",
        "--train.batch_size=1", "--train.learning_rate=1e-2", "--train.min_learning_rate=1e-3", "--train.eps=1e-6",
        "--train.grad_clip=0.5", "--jit=false", "--train.save_steps=1", "--train.keep_checkpoint_max=0",
        "--train.total_steps=5"]
# layout -> (workers, its parallel_config); global batch 2 everywhere
LAYOUTS = {
    "tp2": (2, ["--parallel_config.model_parallel=2", "--parallel_config.micro_batch_num=2"]),
    "pp2": (2, ["--parallel_config.pipeline_stage=2", "--parallel_config.micro_batch_num=2"]),
    "dp2_zero": (2, ["--parallel_config.data_parallel=2", "--parallel_config.optimizer_shard=true"]),
    "tp2_pp2": (4, ["--parallel_config.model_parallel=2", "--parallel_config.pipeline_stage=2",
                    "--parallel_config.micro_batch_num=2"]),
}
FILES = ("model.safetensors", "exp_avg.safetensors", "exp_avg_sq.safetensors")
LOSS_TOL, STATE_TOL = 1e-5, 1e-4
SCRIPT = str(REPO_ROOT / "run_telechat2.py")


def _run(layout, out, work, *extra, kill_when=None):
    from tests.msrun.launcher import run_msrun

    workers, parallel = LAYOUTS[layout]
    os.makedirs(work, exist_ok=True)
    return run_msrun(SCRIPT, ARGS + parallel + [f"--output_dir={out}", *extra], workers=workers, timeout=300,
                     workdir=str(work), kill_when=kill_when)


def _losses(out):
    """step -> loss, the last record of each step (a resumed run rewrites what its checkpoint had not seen)."""
    losses = {}
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                losses[record["step"]] = record["loss"]
    return losses


def _final(out):
    return dict(ckpt.list_checkpoints(os.path.join(out, "checkpoints")))[5]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """layout -> the output directory of its uninterrupted run (run on first use)."""
    done = {}

    def get(layout):
        if layout not in done:
            base = tmp_path_factory.mktemp(f"uninterrupted_{layout}")
            result = _run(layout, base / "out", base / "work")
            assert result.rc == 0, result.all_logs()[-4000:]
            done[layout] = str(base / "out")
        return done[layout]

    return get


@pytest.mark.parametrize("layout", ["tp2", pytest.param("dp2_zero", marks=pytest.mark.slow),
                                    pytest.param("pp2", marks=pytest.mark.slow),
                                    pytest.param("tp2_pp2", marks=pytest.mark.slow)])
def test_killed_twice_and_resumed_equals_the_uninterrupted_run(layout, uninterrupted, tmp_path):
    reference = uninterrupted(layout)
    out, root = tmp_path / "out", tmp_path / "out" / "checkpoints"

    def writing_checkpoint_2():
        try:
            return any(n.startswith(".tmp-step_00000002") for n in os.listdir(root))
        except FileNotFoundError:
            return False

    def checkpoint_3_published():
        return os.path.isfile(root / "step_00000003" / "trainer_state.json")

    first = _run(layout, out, tmp_path / "w1", kill_when=writing_checkpoint_2)
    assert first.killed, f"the job ended before checkpoint 2 was written (rc {first.rc})\n{first.all_logs()[-3000:]}"
    listed = [step for step, _ in ckpt.list_checkpoints(str(root))]
    assert listed and max(listed) <= 2, listed  # checkpoint 2 may have been published before the kill landed
    second = _run(layout, out, tmp_path / "w2", "--train.resume=true", kill_when=checkpoint_3_published)
    assert second.killed, f"the resumed job ended before the kill (rc {second.rc})\n{second.all_logs()[-3000:]}"
    # it resumed (run.json counts the resumptions; its stdout died in its buffer with the SIGKILL)
    with open(out / "run.json", encoding="utf-8") as f:
        assert json.load(f)["resumed"] == 1
    third = _run(layout, out, tmp_path / "w3", "--train.resume=true")
    assert third.rc == 0, third.all_logs()[-4000:]
    assert "resumed from" in third.worker_log(0) and "at step 3" in third.worker_log(0)

    want, got = _losses(reference), _losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5] and got == want  # bit for bit: the same float every step
    final, expected = _final(out), _final(reference)
    rank_dirs = sorted(d for d in os.listdir(expected) if d.startswith("tp"))
    assert rank_dirs == sorted(d for d in os.listdir(final) if d.startswith("tp"))
    for rank_dir in rank_dirs:
        for name in FILES:
            with open(os.path.join(expected, rank_dir, name), "rb") as a, \
                    open(os.path.join(final, rank_dir, name), "rb") as b:
                assert a.read() == b.read(), (layout, rank_dir, name)
    assert not [n for n in os.listdir(root) if n.startswith(".")]  # no temporary left


def _merged(checkpoint, file, target):
    """{name: full tensor} of one per-rank file kind of a layout checkpoint, merged by the converter
    (`python -m convert merge --file ...`)."""
    from safetensors.numpy import load_file

    from convert.reshard import merge

    return load_file(merge(checkpoint, str(target), progress=False, file=file))


@pytest.mark.parametrize("old, new", [("tp2_pp2", "tp2"), ("pp2", "dp2_zero")])
def test_resume_onto_a_new_layout_continues_the_old_run(old, new, uninterrupted, tmp_path):
    reference = uninterrupted(old)
    start = dict(ckpt.list_checkpoints(os.path.join(reference, "checkpoints")))[2]
    out = tmp_path / "out"
    result = _run(new, out, tmp_path / "w", f"--train.resume_from={start}")
    assert result.rc == 0, result.all_logs()[-4000:]
    log = result.worker_log(0)
    assert "resuming a checkpoint written under" in log and "resharded" in log
    want, got = _losses(reference), _losses(out)
    assert sorted(got) == [3, 4, 5]
    for step in got:
        assert abs(got[step] - want[step]) <= LOSS_TOL * abs(want[step]), (step, got[step], want[step])
    for file in FILES:
        a = _merged(_final(reference), file, tmp_path / f"old_{file}")
        b = _merged(_final(out), file, tmp_path / f"new_{file}")
        assert sorted(a) == sorted(b)
        for name in a:
            scale = max(float(np.max(np.abs(a[name]))), 1e-30)
            assert float(np.max(np.abs(a[name] - b[name]))) <= STATE_TOL * scale, (file, name)


def _one_process_run(out, *extra):
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    return run_train(load_settings(None, ARGS + ["--parallel_config.micro_batch_num=2", f"--output_dir={out}",
                                                 *extra]))


def _one_process_state(checkpoint):
    """{file kind: {name: tensor}} of a one-process training checkpoint, read with safetensors itself."""
    from safetensors.numpy import load_file

    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    optimizer = load_file(os.path.join(checkpoint, "optimizer.safetensors"))
    state = {"model.safetensors": weights}
    for which in ("exp_avg", "exp_avg_sq"):
        state[f"{which}.safetensors"] = {n[len(which) + 1:]: a for n, a in optimizer.items()
                                         if n.startswith(which + ".")}
    return state


def _assert_close_states(a, b):
    for file in FILES:
        assert sorted(a[file]) == sorted(b[file]), file
        for name in a[file]:
            scale = max(float(np.max(np.abs(a[file][name]))), 1e-30)
            assert float(np.max(np.abs(a[file][name] - b[file][name]))) <= STATE_TOL * scale, (file, name)


def _layout_state(checkpoint, tmp):
    tmp.mkdir()
    return {file: _merged(checkpoint, file, tmp / f"merged_{file}") for file in FILES}


def test_a_tp2_checkpoint_resumes_in_one_process_and_a_one_process_checkpoint_under_tp2(uninterrupted, tmp_path):
    """The world size changes too: checkpoint 2 of the tp2 run continues in one process, and checkpoint 2 of a
    one-process run continues under tp2 (msrun); each gives the losses of steps 3..5 of the run it came from
    within 1e-5, and final weights and moments within 1e-4."""
    reference = uninterrupted("tp2")
    start = dict(ckpt.list_checkpoints(os.path.join(reference, "checkpoints")))[2]
    summary = _one_process_run(tmp_path / "one", f"--train.resume_from={start}")
    want = _losses(reference)
    assert sorted(_losses(tmp_path / "one")) == [3, 4, 5]
    for step, got in _losses(tmp_path / "one").items():
        assert abs(got - want[step]) <= LOSS_TOL * abs(want[step]), (step, got, want[step])
    _assert_close_states(_layout_state(_final(reference), tmp_path / "a"), _one_process_state(summary["checkpoint"]))

    single = _one_process_run(tmp_path / "single")
    start = dict(ckpt.list_checkpoints(os.path.join(tmp_path / "single", "checkpoints")))[2]
    result = _run("tp2", tmp_path / "tp2", tmp_path / "w", f"--train.resume_from={start}")
    assert result.rc == 0, result.all_logs()[-4000:]
    assert "resuming a checkpoint written under dp1 tp1 pp1" in result.worker_log(0)
    want, got = _losses(tmp_path / "single"), _losses(tmp_path / "tp2")
    assert sorted(got) == [3, 4, 5]
    for step in got:
        assert abs(got[step] - want[step]) <= LOSS_TOL * abs(want[step]), (step, got[step], want[step])
    _assert_close_states(_one_process_state(single["checkpoint"]), _layout_state(_final(tmp_path / "tp2"), tmp_path / "b"))


def test_bad_resumes_are_refused_with_one_line_and_nothing_written(uninterrupted, tmp_path, capsys):
    """A checkpoint missing one rank's file, and a checkpoint of another model, are refused naming the file or
    what differs; the refused run leaves no checkpoint behind. (A layout that does not divide the model is refused
    by the settings check before anything: tests/test_settings_validation.py.)"""
    import shutil

    import run_telechat2

    start = dict(ckpt.list_checkpoints(os.path.join(uninterrupted("tp2"), "checkpoints")))[2]
    broken = tmp_path / "broken_step"
    shutil.copytree(start, broken)
    os.remove(broken / "tp1_pp0" / "exp_avg.safetensors")
    args = ARGS + ["--parallel_config.micro_batch_num=2", f"--train.resume_from={broken}"]
    assert run_telechat2.main(args + [f"--output_dir={tmp_path / 'a'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "tp1_pp0/exp_avg.safetensors is missing" in err
    assert not os.path.exists(tmp_path / "a" / "checkpoints") or not os.listdir(tmp_path / "a" / "checkpoints")

    assert run_telechat2.main(ARGS + ["--model=qwen2_tiny", "--parallel_config.micro_batch_num=2",
                                      f"--train.resume_from={start}", f"--output_dir={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "cannot resume from" in err and "model: recorded 'tiny', now 'qwen2_tiny'" in err
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


def test_a_lora_run_resumes_exactly_under_msrun(tmp_path):
    """LoRA under tp2: checkpoint 2 resumed (base weights from the seed as in the original run, the adapters and
    their moments from the checkpoint's per-rank lora / moment files) repeats steps 3..5 of the uninterrupted
    run bit for bit, every final rank file included (merged weights, adapters, moments)."""
    lora = "--train.lora_rank=4"
    full = _run("tp2", tmp_path / "full", tmp_path / "w1", lora)
    assert full.rc == 0, full.all_logs()[-4000:]
    start = dict(ckpt.list_checkpoints(os.path.join(tmp_path / "full", "checkpoints")))[2]
    part = _run("tp2", tmp_path / "part", tmp_path / "w2", lora, f"--train.resume_from={start}")
    assert part.rc == 0, part.all_logs()[-4000:]
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(got) == [3, 4, 5] and all(got[step] == want[step] for step in got)
    expected, final = _final(tmp_path / "full"), _final(tmp_path / "part")
    for rank_dir in ("tp0_pp0", "tp1_pp0"):
        for name in FILES + ("lora.safetensors",):
            with open(os.path.join(expected, rank_dir, name), "rb") as a, \
                    open(os.path.join(final, rank_dir, name), "rb") as b:
                assert a.read() == b.read(), (rank_dir, name)
