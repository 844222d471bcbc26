"""Distributed TeleChat2 under msrun on CPU (mccl), compared with one process.

Two msrun jobs (the ~20 s start-up is paid once per world size), each running several tasks of
tests/msrun/worker_parallel.py that write one result directory per task, so every test below reads
its own layout's files and fails on its own:
- 2 workers: reference, dp2, tp2, tp2+sp, pp2 (4 micro-batches, 1F1B), cp2 (RingAttention), greedy
  generation under tp2; loading a convert/reshard.py tp2 layout and slicing a full checkpoint at load time;
- 4 workers: every comm collective/region in real sub-groups (dp2 x tp2), reference, tp2 x pp2.
Criteria (fp32, tiny model, one SGD step, lr 0.5): loss rel. diff <= 1e-5; updated parameters (tp shards
merged with shard_layout.merge_shards, dp/cp replicas bitwise equal) max rel. diff <= 1e-4, and so are
the parameter *updates* (lr x gradient, relative to each tensor's largest update), which is the
sharper check of the gradients.
A third job checks that a crashing worker fails the job (non-zero exit, its error in the log) in time.
"""
import json
import os

import numpy as np
import pytest

from telechat2_ms.parallel.launcher import run_msrun
from tests.msrun import parallel_cases as pc

WORKER = os.path.join(os.path.dirname(__file__), "msrun", "worker_parallel.py")
LOSS_TOL, PARAM_TOL = 1e-5, 1e-4
JOBS = {
    2: ["reference", "train:dp2", "train:tp2", "train:tp2_sp", "train:pp2", "train:cp2", "generate:tp2",
        "load:tp2"],
    4: ["comm", "reference", "train:tp2_pp2"],
}

pytestmark = pytest.mark.msrun


def _run_job(tmp_path_factory, workers):
    out = tmp_path_factory.mktemp(f"msrun{workers}")
    result = run_msrun(WORKER, [str(out), *JOBS[workers]], workers=workers, timeout=420, workdir=str(out))
    return str(out), result


@pytest.fixture(scope="module")
def job2(tmp_path_factory):
    return _run_job(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def job4(tmp_path_factory):
    return _run_job(tmp_path_factory, 4)


def _explain(result, out):
    errors = os.path.join(out, "errors")
    text = "".join(open(os.path.join(errors, f), encoding="utf-8").read() for f in sorted(os.listdir(errors))) \
        if os.path.isdir(errors) else ""
    return f"msrun rc={result.rc} timed_out={result.timed_out}\n{text}\n{result.all_logs()[-4000:]}"


def _check_layout(job, layout):
    out, result = job
    if not os.path.exists(os.path.join(out, layout)):
        pytest.fail(f"layout {layout} produced no result\n{_explain(result, out)}")
    reference = dict(np.load(os.path.join(out, "reference.npz")))
    with open(os.path.join(out, "reference.json"), encoding="utf-8") as f:
        reference_loss = json.load(f)["loss"]
    initial = pc.initial_state()
    losses, merged = pc.merge_layout(out, layout)
    assert sorted(merged) == sorted(reference), f"{layout}: parameter names differ"
    for loss in losses:
        assert abs(loss - reference_loss) / abs(reference_loss) <= LOSS_TOL, (layout, loss, reference_loss)
    for name, want in reference.items():
        assert merged[name].shape == want.shape, (layout, name)
        assert pc.max_rel_diff(merged[name], want) <= PARAM_TOL, (layout, name)
        update_diff = pc.max_rel_diff(merged[name] - initial[name], want - initial[name])
        assert update_diff <= PARAM_TOL, (layout, name, update_diff)


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2_sp", "pp2", "cp2"])
def test_two_process_layout_matches_single_process(job2, layout):
    _check_layout(job2, layout)


def test_tp2_pp2_four_processes_matches_single_process(job4):
    _check_layout(job4, "tp2_pp2")


def test_comm_collectives_in_subgroups(job4):
    out, result = job4
    for rank in range(4):
        path = os.path.join(out, f"comm_rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert len(info["errors"]) == 28
        bad = {k: v for k, v in info["errors"].items() if v != 0.0}
        assert not bad, f"rank {rank}: {bad}"  # integer-valued data: exact


def test_greedy_generation_tp2_equals_single_process(job2):
    out, result = job2
    for rank in range(2):
        path = os.path.join(out, "generate", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            tokens = json.load(f)
        assert len(tokens["single"][0]) == 8
        assert tokens["tp2"] == tokens["single"]


def test_loading_sharded_and_full_checkpoints_tp2(job2):
    out, result = job2
    for rank in range(2):
        path = os.path.join(out, "load", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert info == {"names_equal": True, "layout_max_abs": 0.0, "full_max_abs": 0.0}


def test_jobs_exit_cleanly(job2, job4):
    for out, result in (job2, job4):
        assert result.rc == 0 and not result.timed_out, _explain(result, out)


def test_crashing_worker_fails_the_job_without_hanging(tmp_path):
    result = run_msrun(WORKER, [str(tmp_path), "crash:1"], workers=2, timeout=150, workdir=str(tmp_path),
                       cluster_time_out=30)
    assert not result.timed_out, f"msrun hung for {result.seconds:.0f} s after a worker crashed"
    assert result.rc != 0
    assert "deliberate crash on rank 1" in result.worker_log(1)
    assert result.seconds < 150
