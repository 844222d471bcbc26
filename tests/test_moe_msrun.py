"""Expert parallelism under msrun on CPU (parallel/experts.py), compared with one process, for both MoE families:
TeleChat2-MoE (4 experts, top-2 renormalised, expert down biases) and Qwen2-MoE (shared expert, a dense layer).
The training step dispatches tokens by all-to-all (comm.AllToAllRows, emulated on CPU), the compiled generation
steps by all-gather + reduce-scatter (parallel/experts.py).

Layouts (tests/msrun/parallel_cases.py): the experts split over ep2 inside dp2 (2 workers; each rank holds 2 of
the 4 experts and runs them over both ranks' tokens), every expert also split over tp2 (ep2 x tp2, 4 workers), and
TeleChat2-MoE under plain dp2 (every expert on both replicas), and TeleChat2-MoE with capacity factor 1 (tokens
dropped; the ep block is the whole batch, so each expert keeps the tokens one process keeps); and TeleChat2-MoE
under pipeline stages, pp2 (2 workers) and dp2 x ep2 x pp2 (4), each stage adding the load-balancing loss of its
own layers per global micro-batch (the reference takes it over the same rows, pc.aux_groups). Each runs one clipped SGD step on the fixed batch
(tests/msrun/worker_parallel.py task train:LAYOUT) and must give the single-process results, fp32:
- the loss (token loss + load-balancing loss) and the global gradient norm within rel. 1e-5 (LOSS_TOL);
- the load-balancing loss itself within rel. 1e-5 (the statistics summed over the global batch);
- every gradient (reduced over the replicas; expert shards gathered over ep and tp, the others over tp) within
  1e-5 of the largest magnitude of its tensor (GRAD_TOL), and the parameters after the step within rel. 1e-4.
  (The dense layouts' check of the parameter *updates* does not fit here: the MoE models' weights are drawn with
  std 0.25, so that routing is uneven and the load-balancing loss visible, and one ulp of such a weight is 1e-4
  of the last layer's updates; the gradients are compared directly instead.)
And greedy generation under ep2 (both ranks decoding the same prompts, the experts split) prints the
single-process tokens. The train run mode (the one Trainer, its parallel engine, AdamW, clipping) under dp2 x ep2
and dp2 x ep2 x tp2 equals the single-process Trainer over 3 steps: losses, aux losses and gradient norms (rel.
1e-5), and its layout checkpoint (every expert gathered into the rank files) merged by convert/reshard.py equals
the single-process model.safetensors (rel. 1e-4; updates 1e-3, AdamW's as in test_parallel_msrun.py). The
predict run mode under tp2 answers as one process.
"""
import json
import os

import numpy as np
import pytest

from tests.msrun import parallel_cases as pc
from tests.test_parallel_msrun import ADAMW_UPDATE_TOL, LOSS_TOL, PARAM_TOL, _explain, run_worker_job

GRAD_TOL = 1e-5

# the layouts whose step also runs compiled (LAYOUT_jit) in each job, checked against the PyNative step
COMPILED = {2: ("moe_ep2", "qwen2_moe_ep2", "moe_pp2", "moe_cap_ep2", "moe_dp2"),
            4: ("moe_ep2_pp2", "moe_cap_ep2_tp2", "moe_ep2_tp2", "qwen2_moe_ep2_tp2")}
JOBS = {
    2: ["reference:moe", "reference:qwen2_moe", "reference:moe_cap", "reference:moe@moe_pp2", "train:moe_pp2",
        "train:moe_cap_ep2", "train:moe_dp2", "train:moe_ep2", "train:qwen2_moe_ep2",
        "generate:moe_ep2", "generate:qwen2_moe_ep2", "trainer:moe_ep2", "predict:moe_tp2",
        "trainer:moe_ep2_resume"] + [f"train:{name}_jit" for name in COMPILED[2]],
    4: ["reference:moe", "reference:qwen2_moe", "reference:moe_cap", "reference:moe@moe_ep2_pp2", "train:moe_ep2_pp2",
        "train:moe_cap_ep2_tp2", "train:moe_ep2_tp2", "train:qwen2_moe_ep2_tp2", "trainer:moe_ep2_tp2"] +
       [f"train:{name}_jit" for name in COMPILED[4]],
}

pytestmark = pytest.mark.msrun


@pytest.fixture(scope="module")
def moe_job2(tmp_path_factory):
    return run_worker_job(tmp_path_factory, "moe_msrun2", JOBS[2], 2)


@pytest.fixture(scope="module")
def moe_job4(tmp_path_factory):
    return run_worker_job(tmp_path_factory, "moe_msrun4", JOBS[4], 4)


def _check_layout(job, layout):
    out, result = job
    if not os.path.exists(os.path.join(out, layout)):
        pytest.fail(f"layout {layout} produced no result\n{_explain(result, out)}")
    model = pc.LAYOUT_MODELS[layout]
    name = f"{model}@{layout}" if layout in pc.GROUPED_AUX_LAYOUTS else model
    with open(os.path.join(out, f"reference_{name}.json"), encoding="utf-8") as f:
        reference = json.load(f)
    assert min(reference["aux_loss"]) > 0 and reference["norm"] > pc.CLIP  # a visible aux loss; clipping active
    losses, params = pc.merge_layout(out, layout)
    _, grads = pc.merge_layout(out, layout, "_grads")
    want_params = dict(np.load(os.path.join(out, f"reference_{name}.npz")))
    want_grads = dict(np.load(os.path.join(out, f"reference_{name}_grads.npz")))
    assert sorted(params) == sorted(want_params) and sorted(grads) == sorted(want_grads)
    for rank, loss in enumerate(losses):
        info = pc.rank_info(out, layout, rank)
        assert abs(loss - reference["loss"]) / reference["loss"] <= LOSS_TOL, (layout, rank, loss, reference)
        assert abs(info["norms"][0] - reference["norm"]) / reference["norm"] <= LOSS_TOL, (layout, rank, info)
        assert info["dispatch"] == (["all_to_all"] if pc.LAYOUTS[layout].get("ep", 1) > 1 else ["all_gather"]), info
        aux = info["aux_losses"]  # one per global micro-batch, every pipeline stage's layers summed
        assert len(aux) == len(reference["aux_loss"]), (layout, rank, aux, reference)
        for got, want in zip(aux, reference["aux_loss"]):
            assert abs(got - want) / want <= LOSS_TOL, (layout, rank, aux, reference)
    for name, want in want_grads.items():
        assert grads[name].shape == want.shape, (layout, name)
        assert np.abs(grads[name] - want).max() <= GRAD_TOL * np.abs(want).max(), (layout, name)
        assert pc.max_rel_diff(params[name], want_params[name]) <= PARAM_TOL, (layout, name)


@pytest.mark.parametrize("layout", ["moe_ep2", "qwen2_moe_ep2", "moe_dp2", "moe_cap_ep2", "moe_pp2"])
def test_expert_parallel_two_processes_match_single_process(moe_job2, layout):
    _check_layout(moe_job2, layout)


@pytest.mark.parametrize("layout", ["moe_ep2_tp2", "qwen2_moe_ep2_tp2", "moe_cap_ep2_tp2", "moe_ep2_pp2"])
def test_expert_and_tensor_parallel_four_processes_match_single_process(moe_job4, layout):
    _check_layout(moe_job4, layout)


@pytest.mark.parametrize("layout, job", [(name, f"moe_job{n}") for n, names in COMPILED.items() for name in names])
def test_compiled_step_equals_pynative_step(layout, job, request):
    """The compiled step (each stage's forward and backward as ms.jit graphs; the experts dispatched by all-gather,
    static shapes) gives the PyNative step's (all-to-all) loss, gradient norm, aux losses and parameters."""
    out, result = request.getfixturevalue(job)
    if not os.path.exists(os.path.join(out, layout + "_jit")):
        pytest.fail(f"layout {layout}_jit produced no result\n{_explain(result, out)}")
    pc.check_compiled(out, layout)
    if pc.LAYOUTS[layout].get("ep", 1) > 1:  # ep1 layouts hold every expert: no dispatch
        assert pc.rank_info(out, layout + "_jit", 0)["dispatch"] == ["all_gather"]


@pytest.mark.parametrize("layout", ["moe_ep2", "qwen2_moe_ep2"])
def test_greedy_generation_under_expert_parallel_equals_single_process(moe_job2, layout):
    out, result = moe_job2
    for rank in range(2):
        path = os.path.join(out, f"generate_{layout}", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            tokens = json.load(f)
        assert len(tokens["single"][0]) == 8
        assert tokens["parallel"] == tokens["single"]


@pytest.mark.parametrize("layout, job", [("moe_ep2", "moe_job2"), ("moe_ep2_tp2", "moe_job4")])
def test_train_run_mode_under_expert_parallel_equals_single_process_trainer(layout, job, request, tmp_path):
    from safetensors.numpy import load_file

    from convert.reshard import merge
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    out, result = request.getfixturevalue(job)
    both, _ = pc.MOE_TRAINER_LAYOUTS[layout]
    single_args = pc.TRAIN_ARGS + both + [f"--load_checkpoint={pc.moe_init_path(out)}"]
    summary = run_train(load_settings(None, single_args + [f"--output_dir={tmp_path / 'single'}"]))
    with open(summary["metrics_file"], encoding="utf-8") as f:
        single = [json.loads(line) for line in f if line.strip()]
    assert len(single) == 3 and single[0]["grad_norm"] > 0.5 and single[0]["aux_loss"] > 0  # clipping active
    path = os.path.join(out, "trainer", layout, "rank0.json")
    assert os.path.exists(path), _explain(result, out)
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    with open(info["metrics_file"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for got, want in zip(records, single, strict=True):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert abs(got[key] - want[key]) / abs(want[key]) <= LOSS_TOL, (layout, key, got, want)
    merged = load_file(merge(info["checkpoint"], str(tmp_path / "merged.safetensors"), progress=False))
    want = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    initial = load_file(os.path.join(pc.moe_init_path(out), "model.safetensors"))
    assert sorted(merged) == sorted(want)
    for name in want:
        assert merged[name].shape == want[name].shape, name
        assert pc.max_rel_diff(merged[name], want[name]) <= PARAM_TOL, name
        update_diff = pc.max_update_diff(merged[name], want[name], initial[name])
        assert update_diff <= ADAMW_UPDATE_TOL, (name, update_diff)


def test_expert_parallel_training_resumes_exactly_and_its_checkpoint_resumes_in_one_process(moe_job2, tmp_path):
    """Under dp2 x ep2: a run resumed from another run's step-2 checkpoint (the experts' weights and AdamW moments
    gathered into the rank files, each rank taking its experts back) takes step 3 as the uninterrupted run does
    (rel. 1e-6: the same layout and arithmetic); and one process resumed from that layout checkpoint takes step 3
    as the single-process run does (LOSS_TOL)."""
    from safetensors.numpy import load_file

    from convert.reshard import merge
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    out, result = moe_job2
    paths = [os.path.join(out, "trainer", name, "rank0.json") for name in ("moe_ep2", "moe_ep2_resume")]
    assert all(os.path.exists(p) for p in paths), _explain(result, out)
    whole, resumed = (json.load(open(p, encoding="utf-8")) for p in paths)
    assert resumed["first_step"] == 3 and len(resumed["losses"]) == 1
    step3 = [json.loads(line) for line in open(resumed["metrics_file"], encoding="utf-8") if line.strip()][-1]
    want = [json.loads(line) for line in open(whole["metrics_file"], encoding="utf-8") if line.strip()][-1]
    assert step3["step"] == want["step"] == 3
    for key in ("loss", "aux_loss", "grad_norm", "lr"):
        assert abs(step3[key] - want[key]) <= 1e-6 * abs(want[key]), (key, step3, want)
    a = load_file(merge(resumed["checkpoint"], str(tmp_path / "resumed.safetensors"), progress=False))
    b = load_file(merge(whole["checkpoint"], str(tmp_path / "whole.safetensors"), progress=False))
    assert sorted(a) == sorted(b) and all(pc.max_rel_diff(a[n], b[n]) <= 1e-6 for n in b)
    # one process, resumed from the ep2 run's step-2 checkpoint, against one process's own 3 steps
    both, _ = pc.MOE_TRAINER_LAYOUTS["moe_ep2"]
    args = pc.TRAIN_ARGS + both + [f"--load_checkpoint={pc.moe_init_path(out)}"]
    single = run_train(load_settings(None, args + [f"--output_dir={tmp_path / 'single'}"]))
    step2 = os.path.join(out, "trainer_moe_ep2_saving", "checkpoints", "step_00000002")
    continued = run_train(load_settings(None, args + [f"--output_dir={tmp_path / 'continued'}",
                                                      f"--train.resume_from={step2}"]))
    assert continued["first_step"] == 3
    assert abs(continued["losses"][-1] - single["losses"][-1]) <= LOSS_TOL * abs(single["losses"][-1])


def test_predict_run_mode_under_tensor_parallel_equals_single_process(moe_job2):
    """`--run_mode predict` of an MoE model under tp2 (attention and every expert split; rank 0 prints) answers
    as one process does."""
    import io

    from telechat2_ms.predict import run_predict
    from telechat2_ms.settings import load_settings

    out, result = moe_job2
    printed = io.StringIO()
    answers = run_predict(load_settings(None, pc.PREDICT_ARGS + [f"--load_checkpoint={pc.moe_init_path(out)}"]),
                          printed)
    assert len(answers) == 3 and all(answers)
    for rank in range(2):
        path = os.path.join(out, "predict_moe_tp2", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert info["answers"] == answers
        assert info["printed"] == (printed.getvalue() if rank == 0 else "")


def test_jobs_exit_cleanly(moe_job2, moe_job4):
    for out, result in (moe_job2, moe_job4):
        assert result.rc == 0 and not result.timed_out, _explain(result, out)
