"""Distributed TeleChat2 under msrun on CPU (mccl), compared with one process.

Two msrun jobs (the ~20 s start-up is paid once per world size), each running several tasks of
tests/msrun/worker_parallel.py that write one result directory per task, so every test below reads
its own layout's files and fails on its own:
- 2 workers: reference, dp2, tp2, tp2+sp, pp2 (4 micro-batches, 1F1B), cp2 (RingAttention), tiny Qwen2 under tp2
  and pp2 (also with tied embeddings: a copy of the embedding on the last stage), greedy generation under tp2
  and pp2; loading a convert/reshard.py tp2 layout and slicing a full checkpoint at load time;
- 4 workers: every comm collective/region in real sub-groups (dp2 x tp2), reference, tp2 x pp2 (also tiny Qwen2
  with tied embeddings).
- chat under tp2 (typed lines on rank 0, broadcast to rank 1) equals run_chat in this process.
- predict under dp2 (the replicas split three prompts, rank 0 prints all answers in order) equals
  run_predict in this process.
- the train run mode under tp2, and under pp2 for a tied tiny Qwen2 (the one Trainer with its parallel engine: demo
  SFT data, 2 clipped AdamW steps) equals the single-process Trainer: losses and gradient norms (rel. 1e-5), the saved layout checkpoint merged by
  convert/reshard.py against the Trainer's model.safetensors (1e-4, updates 1e-3 as for AdamW below).
- AdamW with optimizer states sharded over dp (ZeRO-1): dp2 (2 workers) and dp2 x tp2+sp (4 workers), two
  steps, against the trainer's single-process AdamW (telechat2_ms/train/optim.py), and against the same
  layout with replicated states (max rel. diff <= 1e-7: the same element-wise math on the same gradients).
  AdamW divides by sqrt(v) + eps, so a gradient element near eps turns fp32 summation-order noise (~1e-9,
  the dp split) into update noise of up to lr / eps times it: these cases use eps 1e-3 (at 1e-6 one such
  element moved a parameter by 1.05e-4 on an AVX2 CPU), and their parameters and updates are held to
  1e-4 like every layout's. The trainer cases (eps 1e-6) hold updates to ADAMW_UPDATE_TOL 1e-3.
Criteria (fp32, tiny model; one SGD step at lr 0.5, or two AdamW steps at lr 1e-2; every step clipped to
global gradient norm 0.5, which the reference norm exceeds): loss and global gradient norm rel. diff
<= 1e-5; updated parameters (tp shards merged with plan.merge_shards, dp/cp replicas bitwise
equal) max rel. diff <= 1e-4, and so are the parameter *updates* (relative to each tensor's largest
update), which is the sharper check of the gradients.
A third job checks that a crashing worker fails the job (non-zero exit, its error in the log) in time.
"""
import json
import os

import numpy as np
import pytest

from tests.msrun.launcher import run_msrun
from tests.msrun import parallel_cases as pc

WORKER = os.path.join(os.path.dirname(__file__), "msrun", "worker_parallel.py")
LOSS_TOL, PARAM_TOL, ADAMW_UPDATE_TOL, SHARDED_VS_REPLICATED_TOL = 1e-5, 1e-4, 1e-3, 1e-7
# a step's update beyond one ulp of each stored parameter (parallel_cases.max_update_diff): measured on an AVX-512
# Xeon at most 1.0e-6 (SGD layouts) and 5.2e-6 (AdamW with dp-sharded states), where the update counted to the
# last ulp reached 1.0e-4 (cp2: one ulp of norm_out.weight, whose values sit just below 1.0)
UPDATE_TOL = 2e-5
# the layouts whose step also runs compiled (LAYOUT_jit) in each job, checked against the PyNative step
COMPILED = {2: ("dp2", "tp2", "tp2_sp", "pp2", "cp2", "dp2_zero", "qwen2_tp2", "qwen2_pp2", "qwen2_kv1_tp2", "qwen2_tied_tp2",
                "qwen2_tied_pp2"),
            4: ("tp2_pp2", "dp2_tp2_sp_zero", "qwen2_tied_tp2_pp2")}
JOBS = {
    2: ["reference", "reference:qwen2", "reference:qwen2_kv1", "reference:qwen2_tiny", "train:qwen2_tp2",
        "train:qwen2_pp2", "train:qwen2_kv1_tp2", "train:qwen2_tied_tp2", "train:qwen2_tied_pp2", "train:dp2", "train:tp2", "train:tp2_sp", "train:pp2", "train:cp2", "train:dp2_zero",
        "generate:tp2", "generate:pp2", "generate:qwen2_kv1_tp2", "generate:qwen2_tied_pp2", "load:tp2", "chat:tp2", "predict:dp2",
        "trainer:tp2", "trainer:qwen2_tied_pp2", "trainer:lora_tp2", "trainer:lora_pp2", "trainer:selective_tp2",
        "trainer:fp16_tp2", "trainer:fp16_pp2", "trainer:jit_pp2"] + [f"train:{name}_jit" for name in COMPILED[2]],
    4: ["comm", "reference", "reference:qwen2_tiny", "train:tp2_pp2", "train:qwen2_tied_tp2_pp2",
        "train:dp2_tp2_sp_zero", "generate:tp2_pp2"] + [f"train:{name}_jit" for name in COMPILED[4]],
}

pytestmark = pytest.mark.msrun


def run_worker_job(tmp_path_factory, tag: str, tasks, workers: int):
    """One msrun job of tests/msrun/worker_parallel.py running `tasks` -> (its output directory, MsrunResult)."""
    out = tmp_path_factory.mktemp(tag)
    result = run_msrun(WORKER, [str(out), *tasks], workers=workers, timeout=420, workdir=str(out))
    return str(out), result


def _run_job(tmp_path_factory, workers):
    return run_worker_job(tmp_path_factory, f"msrun{workers}", JOBS[workers], workers)


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
    model = pc.LAYOUT_MODELS.get(layout, "tiny")
    name = "reference_adamw" if layout in pc.ADAMW_LAYOUTS else "reference" if model == "tiny" else f"reference_{model}"
    reference = dict(np.load(os.path.join(out, f"{name}.npz")))
    with open(os.path.join(out, f"{name}.json"), encoding="utf-8") as f:
        ref_info = json.load(f)
    reference_loss = ref_info["loss"]
    assert ref_info["norms"][0] > pc.CLIP if "norms" in ref_info else ref_info["norm"] > pc.CLIP  # clip active
    ref_norms = ref_info.get("norms", [ref_info.get("norm")])
    initial = pc.initial_state(model)
    losses, merged = pc.merge_layout(out, layout)
    assert sorted(merged) == sorted(reference), f"{layout}: parameter names differ"
    for loss in losses:
        assert abs(loss - reference_loss) / abs(reference_loss) <= LOSS_TOL, (layout, loss, reference_loss)
    for rank in range(len(losses)):
        info = pc.rank_info(out, layout, rank)
        assert len(info["norms"]) == len(ref_norms)
        for got, want in zip(info["norms"], ref_norms):
            assert abs(got - want) / want <= LOSS_TOL, (layout, rank, "grad norm", got, want)
        for got, want in zip(info.get("losses", []), ref_info.get("losses", [])):
            assert abs(got - want) / abs(want) <= LOSS_TOL, (layout, rank, "loss", got, want)
        if layout in pc.ADAMW_LAYOUTS:  # each dp rank keeps the moments of half of each of its parameters
            assert info["state_elements"] == 2 * sum(-(-n // 2) for n in info["param_sizes"]), (layout, rank, info)
            assert info["replicated_state_elements"] == 2 * sum(info["param_sizes"])
            assert info["max_diff_vs_replicated"] <= SHARDED_VS_REPLICATED_TOL, (layout, rank, info)
    for name, want in reference.items():
        assert merged[name].shape == want.shape, (layout, name)
        assert pc.max_rel_diff(merged[name], want) <= PARAM_TOL, (layout, name)
        update_diff = pc.max_update_diff(merged[name], want, initial[name])
        assert update_diff <= UPDATE_TOL, (layout, name, update_diff)


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2_sp", "pp2", "cp2"])
def test_two_process_layout_matches_single_process(job2, layout):
    _check_layout(job2, layout)


@pytest.mark.parametrize("layout", ["qwen2_tp2", "qwen2_pp2", "qwen2_kv1_tp2", "qwen2_tied_tp2"])
def test_qwen2_two_process_layout_matches_single_process(job2, layout):
    """Tiny Qwen2 (q/k/v biases, separate k/v, 2 kv heads: 1 per rank under tp2, a sliding-window layer); and
    with 1 kv head under tp2, each rank holding a copy of it (gradients summed over the copies); and with tied
    embeddings under tp2 (one vocab-parallel Parameter for the embedding and the head)."""
    _check_layout(job2, layout)


def test_tp2_pp2_four_processes_matches_single_process(job4):
    _check_layout(job4, "tp2_pp2")


@pytest.mark.parametrize("layout, job", [("qwen2_tied_pp2", "job2"), ("qwen2_tied_tp2_pp2", "job4")])
def test_tied_embeddings_across_pipeline_stages_match_single_process(layout, job, request):
    """Tiny Qwen2 with tied embeddings under pp2 (and tp2 x pp2): the last stage's lm_head is a copy of the
    embedding whose gradient is summed with the embedding's; loss, norm and the updated embedding equal one
    process, no rank saves the copy (the merged names are the reference's), and after the step the copy is
    bitwise the first stage's embedding on every tp rank."""
    out, result = request.getfixturevalue(job)
    _check_layout((out, result), layout)
    dims = pc.ParallelDims(**pc.LAYOUTS[layout])
    by_tp = {}
    for rank in range(dims.world):
        info = pc.rank_info(out, layout, rank)
        by_tp.setdefault(dims.coords(rank).tp, set()).add(info["tied_sha256"])
    assert len(by_tp) == dims.tp and all(len(shas) == 1 for shas in by_tp.values()), by_tp


def test_adamw_with_dp_sharded_states_matches_single_process(job2):
    _check_layout(job2, "dp2_zero")


def test_adamw_sharded_states_dp2_tp2_sp_four_processes_matches_single_process(job4):
    _check_layout(job4, "dp2_tp2_sp_zero")


@pytest.mark.parametrize("layout, job", [(name, f"job{n}") for n, names in COMPILED.items() for name in names])
def test_compiled_step_equals_pynative_step(layout, job, request):
    """Each stage's forward and backward as ms.jit graphs (TelechatParallel.compiled, what settings.jit turns on
    under msrun) give the PyNative step's loss, gradient norm and updated parameters (rel. 1e-6)."""
    out, result = request.getfixturevalue(job)
    if not os.path.exists(os.path.join(out, layout + "_jit")):
        pytest.fail(f"layout {layout}_jit produced no result\n{_explain(result, out)}")
    pc.check_compiled(out, layout)


def test_chat_tp2_equals_single_process(job2):
    import io

    from telechat2_ms.predict import run_chat
    from telechat2_ms.settings import load_settings

    out, result = job2
    printed = io.StringIO()
    history = run_chat(load_settings(None, pc.CHAT_ARGS), io.StringIO(pc.CHAT_INPUT), printed)
    assert len(history) == 4 and all(turn["content"] for turn in history)
    for rank in range(2):
        path = os.path.join(out, "chat", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert info["history"] == history, rank
        assert info["printed"] == (printed.getvalue() if rank == 0 else "")  # only rank 0 prints
        assert info["gathered"] == [{"rank": 0}, {"rank": 1}]


def test_comm_collectives_in_subgroups(job4):
    out, result = job4
    for rank in range(4):
        path = os.path.join(out, f"comm_rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert len(info["errors"]) == 38
        bad = {k: v for k, v in info["errors"].items() if v != 0.0}
        assert not bad, f"rank {rank}: {bad}"  # integer-valued data: exact


@pytest.mark.ascend
def test_native_collectives_on_ascend(tmp_path):
    """The same checks on 4 NPUs, where comm uses HCCL's AllGather, ReduceScatter, Broadcast, AlltoAllV and
    batched send/recv (ring_shift, neighbour_exchange) (not run here: no NPU)."""
    out = str(tmp_path)
    result = run_msrun(WORKER, [out, "comm"], workers=4, timeout=420, workdir=out,
                       env={"TELECHAT2_TEST_DEVICE": "Ascend"})
    for rank in range(4):
        path = os.path.join(out, f"comm_rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            errors = json.load(f)["errors"]
        assert len(errors) == 38 and not {k: v for k, v in errors.items() if v != 0.0}, errors


@pytest.mark.parametrize("layout, job", [("tp2", "job2"), ("pp2", "job2"), ("tp2_pp2", "job4"),
                                         ("qwen2_kv1_tp2", "job2"), ("qwen2_tied_pp2", "job2")])
def test_greedy_generation_equals_single_process(layout, job, request):
    """Greedy tokens under tensor parallel, pipeline stages (parallel/generation.py) and both; a tied head on the
    last stage (qwen2_tied_pp2)."""
    out, result = request.getfixturevalue(job)
    for rank in range(2 if job == "job2" else 4):
        path = os.path.join(out, f"generate_{layout}", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            tokens = json.load(f)
        assert len(tokens["single"][0]) == 8
        assert tokens["parallel"] == tokens["single"]


def test_loading_sharded_and_full_checkpoints_tp2(job2):
    """A layout directory, a full file read slice by slice, and the seeded initialisation replayed tensor by
    tensor give each rank exactly the shards cut from the in-memory model (into a lazy skeleton)."""
    out, result = job2
    for rank in range(2):
        path = os.path.join(out, "load", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert info == {"names_equal": True, "layout_max_abs": 0.0, "full_max_abs": 0.0, "seed_max_abs": 0.0}


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


def test_predict_dp2_splits_prompts_and_equals_single_process(job2):
    import io

    from telechat2_ms.predict import run_predict
    from telechat2_ms.settings import load_settings

    out, result = job2
    printed = io.StringIO()
    answers = run_predict(load_settings(None, pc.PREDICT_ARGS), printed)
    assert len(answers) == 3 and all(answers)
    for rank in range(2):
        path = os.path.join(out, "predict", f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        assert info["answers"] == answers
        assert info["printed"] == (printed.getvalue() if rank == 0 else "")


@pytest.mark.parametrize("layout", [name for name in pc.TRAINER_LAYOUTS if name not in pc.FP16_TRAINER_LAYOUTS])
def test_train_run_mode_equals_single_process_trainer(job2, tmp_path, layout):
    """The train run mode under tp2 (tiny TeleChat2) and pp2 (tiny Qwen2 with tied embeddings: the last stage's
    copy of the embedding is not saved, so the layout checkpoint merges to the single-process names), and LoRA
    under tp2 and pp2 (adapters sharded with their projections; the merged checkpoint equals the single-process
    LoRA merge within 1e-6), and selective recompute under tp2 (one stage: train.recompute as in one process)."""
    from safetensors.numpy import load_file

    from convert.reshard import merge
    from telechat2_ms.config import get_config
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    out, result = job2
    both, _ = pc.TRAINER_LAYOUTS[layout]
    summary = run_train(load_settings(None, pc.TRAIN_ARGS + both + [f"--output_dir={tmp_path / 'single'}"]))
    with open(summary["metrics_file"], encoding="utf-8") as f:
        single_norms = [json.loads(line)["grad_norm"] for line in f if line.strip()]
    assert len(single_norms) == 2 and single_norms[0] > 0.5  # clipping at 0.5 is active
    infos = []
    for rank in range(2):
        path = os.path.join(out, "trainer", layout, f"rank{rank}.json")
        assert os.path.exists(path), _explain(result, out)
        with open(path, encoding="utf-8") as f:
            infos.append(json.load(f))
    for info in infos:
        for got, want in zip(info["losses"], summary["losses"], strict=True):
            assert abs(got - want) / abs(want) <= LOSS_TOL, (got, want)
    assert os.path.getsize(infos[0]["loss_curve"]) > 0 and infos[1]["loss_curve"] is None  # rank 0 plots
    assert os.path.getsize(os.path.join(infos[0]["output_dir"], "training_curves.png")) > 0
    with open(infos[0]["metrics_file"], encoding="utf-8") as f:
        norms = [json.loads(line)["grad_norm"] for line in f if line.strip()]
    for got, want in zip(norms, single_norms, strict=True):
        assert abs(got - want) / want <= LOSS_TOL, (got, want)
    merged_path = merge(infos[0]["checkpoint"], str(tmp_path / "merged.safetensors"), progress=False)
    merged = load_file(merged_path)
    want = load_file(os.path.join(summary["checkpoint"], "model.safetensors"))
    settings = load_settings(None, pc.TRAIN_ARGS + both)
    initial = {n: p.asnumpy() for n, p in Telechat2ForCausalLM(get_config(settings.model), seed=settings.train.seed)
               .parameters_and_names()}
    assert sorted(merged) == sorted(want)
    merged_tol = 1e-6 if layout.startswith("lora") else PARAM_TOL
    for name in want:
        assert pc.max_rel_diff(merged[name], want[name]) <= merged_tol, name
        update_diff = pc.max_update_diff(merged[name], want[name], initial[name])
        assert update_diff <= ADAMW_UPDATE_TOL, (name, update_diff)


def _metrics(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("layout", pc.FP16_TRAINER_LAYOUTS)
def test_fp16_loss_scaling_under_msrun_skips_what_one_process_skips(job2, tmp_path, layout):
    """float16 compute under tp2 and pp2 with a loss scale that overflows fp16: the same steps are skipped on every
    rank as in the single-process trainer (the global gradient norm decides), the scale halves the same way, and
    the steps taken give the single-process loss and norm within float16 rounding (2e-3, 1e-2: the row-parallel
    partial sums and their all-reduce round in float16)."""
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    out, result = job2
    both, _ = pc.TRAINER_LAYOUTS[layout]
    single = _metrics(run_train(load_settings(None, pc.TRAIN_ARGS + both + [f"--output_dir={tmp_path / 'single'}"]))
                      ["metrics_file"])
    skipped = [r["skipped"] for r in single]
    assert skipped[0] and not skipped[-1]  # both branches are exercised
    path = os.path.join(out, "trainer", layout, "rank0.json")
    assert os.path.exists(path), _explain(result, out)
    with open(path, encoding="utf-8") as f:
        parallel = _metrics(json.load(f)["metrics_file"])
    assert [r["skipped"] for r in parallel] == [r["skipped"] for r in single]
    assert [r["loss_scale"] for r in parallel] == [r["loss_scale"] for r in single]
    assert single[0]["loss_scale"] == 262144.0 and single[1]["loss_scale"] == 131072.0  # halved after the overflow
    for got, want in zip(parallel, single):
        assert abs(got["loss"] - want["loss"]) <= 2e-3 * abs(want["loss"]), (got, want)
        if not want["skipped"]:
            assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-2 * want["grad_norm"], (got, want)
        else:
            assert got["grad_norm"] is None
    with open(os.path.join(out, "trainer", layout, "rank1.json"), encoding="utf-8") as f:
        assert json.load(f)["steps"] == 4  # the other rank ran (and skipped) the same steps
