"""msrun worker: run several parallel checks in one job (one ~20 s msrun start-up for all of them).

Usage: python worker_parallel.py OUT_DIR TASK [TASK ...], TASK one of
  comm              every collective and region of comm.py against numpy (comm_checks.py)
  reference         rank 0 writes the single-process loss, gradient norm and parameters after one clipped
                    SGD step (OUT_DIR/reference.{json,npz}) and after the AdamW steps (reference_adamw.*)
  reference:MODEL   the same SGD reference for parallel_cases.model_config(MODEL) (reference_MODEL.*)
  train:LAYOUT      one clipped SGD step (or, for parallel_cases.ADAMW_LAYOUTS, the clipped AdamW steps
                    with dp-sharded states) under a layout of parallel_cases.LAYOUTS; each rank dumps its
                    loss, global gradient norm and local parameters to OUT_DIR/LAYOUT/rank{r}.{json,npz};
                    LAYOUT_jit: the same step compiled (parallel_cases.COMPILED_LAYOUTS)
  trainer:LAYOUT    the train run mode (the one Trainer, parallel engine) under a layout of
                    parallel_cases.TRAINER_LAYOUTS or MOE_TRAINER_LAYOUTS (from pc.save_moe_init's model); OUT_DIR/trainer_LAYOUT/ (its output dir) and
                    OUT_DIR/trainer/LAYOUT/rank{r}.json (its summary)
  predict:dp2       run_predict (predict.py) under dp2: replica r answers prompts r, r+2, ..., rank 0 prints
                    them all in order; OUT_DIR/predict/rank{r}.json
  predict:moe_tp2   run_predict of an MoE model (pc.save_moe_init) under tp2; OUT_DIR/predict_moe_tp2/rank{r}.json
  chat:tp2          run_chat (predict.py) under tp2 with typed lines on rank 0, plus the object
                    broadcast/gather of parallel/ranks.py; OUT_DIR/chat/rank{r}.json
  generate:LAYOUT   greedy generation under tp2 / pp2 / tp2_pp2 and in one process;
                    OUT_DIR/generate_LAYOUT/rank{r}.json
  load:tp2          per-rank shards of a convert/reshard.py layout, and a full checkpoint sliced at load
                    time, equal the shards cut from the in-memory model; OUT_DIR/load/rank{r}.json
  crash:RANK        that rank raises (to test that a failing worker fails the job without a hang)
Each task writes its own files, so a failure stays attributable; an exception is written to
OUT_DIR/errors/rank{r}.txt and re-raised so msrun exits non-zero.
"""
import json
import os
import sys
import time
import traceback

import numpy as np

import mindspore as ms

import parallel_cases as pc
from comm_checks import run_comm_checks
from telechat2_ms.build import synchronous_cpu_runtime
from telechat2_ms.parallel import comm
from telechat2_ms.parallel.dims import ParallelDims
from telechat2_ms.parallel.parallelize import parallelize_telechat2


def task_reference(out_dir: str, rank: int, model: str = "") -> None:
    if rank != 0:
        return
    if model:  # another family: the SGD reference only, OUT_DIR/reference_MODEL.{json,npz}
        name = model  # MODEL@LAYOUT: an MoE model's reference with its aux loss per global micro-batch of LAYOUT
        model, _, layout = model.partition("@")
        groups = pc.aux_groups(layout) if layout else None
        gradients = {}
        loss, norm, state = pc.reference_step(model, gradients, groups)
        np.savez(os.path.join(out_dir, f"reference_{name}.npz"), **state)
        np.savez(os.path.join(out_dir, f"reference_{name}_grads.npz"), **gradients)
        aux = pc.reference_aux_loss(model, groups) if pc.model_config(model).num_experts else None
        with open(os.path.join(out_dir, f"reference_{name}.json"), "w", encoding="utf-8") as f:
            json.dump({"loss": loss, "norm": norm, "aux_loss": aux}, f)
        return
    loss, norm, state = pc.reference_step()
    np.savez(os.path.join(out_dir, "reference.npz"), **state)
    with open(os.path.join(out_dir, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"loss": loss, "norm": norm}, f)
    losses, norms, state = pc.reference_adamw()
    np.savez(os.path.join(out_dir, "reference_adamw.npz"), **state)
    with open(os.path.join(out_dir, "reference_adamw.json"), "w", encoding="utf-8") as f:
        json.dump({"loss": losses[0], "losses": losses, "norms": norms}, f)


def task_train(out_dir: str, rank: int, layout: str) -> None:
    from telechat2_ms.train.optim import ParallelAdamW, clip_coefficient

    dims = ParallelDims(**pc.LAYOUTS[layout])
    start = time.monotonic()
    parallel = pc.parallelize_layout(layout)
    batch = pc.make_batch()
    if layout in pc.ADAMW_LAYOUTS:
        optimizer = pc.make_adamw(parallel)
        steps = [pc.adamw_step(parallel, batch, optimizer, step) for step in range(1, pc.ADAMW_STEPS + 1)]
        # the same steps with replicated optimizer states: sharding must not change a single bit of the math
        replicated = pc.parallelize_layout(layout)
        replicated_opt = ParallelAdamW(replicated.params, replicated.groups.grad, False, pc.ADAMW["beta1"],
                                       pc.ADAMW["beta2"], pc.ADAMW["eps"], pc.ADAMW["weight_decay"])
        for step in range(1, pc.ADAMW_STEPS + 1):
            pc.adamw_step(replicated, batch, replicated_opt, step)
        other = replicated.local_state()
        extra = {"losses": [s[0] for s in steps], "norms": [s[1] for s in steps],
                 "state_elements": optimizer.state_elements, "replicated_state_elements": replicated_opt.state_elements,
                 "param_sizes": [int(np.prod(p.shape)) for p in parallel.params],
                 "max_diff_vs_replicated": max(pc.max_rel_diff(v, other[k]) for k, v in parallel.local_state().items())}
        loss = steps[0][0]
    else:
        loss, grads = parallel.forward_backward(*batch)
        norm = parallel.grad_norm(grads)
        os.makedirs(os.path.join(out_dir, layout), exist_ok=True)
        np.savez(os.path.join(out_dir, layout, f"rank{rank}_grads.npz"),
                 **{p.name: g.asnumpy() for p, g in zip(parallel.params, grads)})
        pc.sgd_step(parallel.params, pc.clipped_grads(grads, clip_coefficient(norm, pc.CLIP)), pc.LR)
        from telechat2_ms.parallel.experts import ExpertParallelFFN

        extra = {"norms": [norm], "aux_losses": parallel.aux_losses,
                 "dispatch": sorted({"all_to_all" if cell.routed else "all_gather" for _, cell in
                                     parallel.model.cells_and_names() if isinstance(cell, ExpertParallelFFN)})}
    if parallel.groups.embed.size > 1:  # tied embeddings over stages: the bytes of the embedding or of its copy
        import hashlib

        held = [p for p in parallel.model.get_parameters()
                if p.name == "model.tok_embeddings.embedding_weight" or getattr(p, "tied_copy", False)]
        extra["tied_sha256"] = hashlib.sha256(held[0].asnumpy().tobytes()).hexdigest()
    pc.save_rank_result(out_dir, layout, rank, parallel.groups.coords, loss, parallel.local_state(),
                        time.monotonic() - start, **extra)


def task_trainer(out_dir: str, rank: int, layout: str) -> None:
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    resumed = layout.endswith("_resume")  # 3 steps saving each, then a second run resumed from step 2
    if resumed:
        layout = layout[:-len("_resume")]
    if layout in pc.MOE_TRAINER_LAYOUTS:  # from a saved MoE model (pc.save_moe_init: rank 0 writes, all wait)
        both, parallel = pc.MOE_TRAINER_LAYOUTS[layout]
        if rank == 0:
            pc.save_moe_init(out_dir)
        comm.all_reduce(ms.Tensor(np.ones(1, np.float32)), comm.world_group())
        both = both + [f"--load_checkpoint={pc.moe_init_path(out_dir)}"]
    else:
        both, parallel = pc.TRAINER_LAYOUTS[layout]
    if resumed:
        first = os.path.join(out_dir, f"trainer_{layout}_saving")
        run_train(load_settings(None, pc.TRAIN_ARGS + both + parallel + [
            f"--output_dir={first}", "--train.save_steps=1", "--train.keep_checkpoint_max=0"]))
        settings = load_settings(None, pc.TRAIN_ARGS + both + parallel + [
            f"--output_dir={os.path.join(out_dir, f'trainer_{layout}_resume')}",
            f"--train.resume_from={os.path.join(first, 'checkpoints', 'step_00000002')}"])
        layout = layout + "_resume"
    else:
        settings = load_settings(None, pc.TRAIN_ARGS + both + parallel +
                                 [f"--output_dir={os.path.join(out_dir, f'trainer_{layout}')}"])
    summary = run_train(settings)
    os.makedirs(os.path.join(out_dir, "trainer", layout), exist_ok=True)
    with open(os.path.join(out_dir, "trainer", layout, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)


def task_predict(out_dir: str, rank: int, layout: str = "dp2") -> None:
    """predict:dp2 (tiny TeleChat2, replicas split the prompts) or predict:moe_tp2 (pc.save_moe_init's MoE model,
    attention and every expert split over tp2)."""
    import io

    from telechat2_ms.predict import run_predict
    from telechat2_ms.settings import load_settings

    printed = io.StringIO()
    if layout == "moe_tp2":
        if rank == 0 and not os.path.isdir(pc.moe_init_path(out_dir)):
            pc.save_moe_init(out_dir)
        comm.all_reduce(ms.Tensor(np.ones(1, np.float32)), comm.world_group())
        args = [f"--load_checkpoint={pc.moe_init_path(out_dir)}", "--parallel_config.model_parallel=2"]
    else:
        args = ["--parallel_config.data_parallel=2"]
    answers = run_predict(load_settings(None, pc.PREDICT_ARGS + args), printed)
    where = "predict" if layout == "dp2" else f"predict_{layout}"
    os.makedirs(os.path.join(out_dir, where), exist_ok=True)
    with open(os.path.join(out_dir, where, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"answers": answers, "printed": printed.getvalue()}, f, ensure_ascii=False)


def task_chat(out_dir: str, rank: int) -> None:
    import io

    from telechat2_ms.parallel.ranks import gather_objects
    from telechat2_ms.predict import run_chat
    from telechat2_ms.settings import load_settings

    settings = load_settings(None, pc.CHAT_ARGS + ["--parallel_config.model_parallel=2"])
    printed = io.StringIO()
    history = run_chat(settings, io.StringIO(pc.CHAT_INPUT) if rank == 0 else None, printed)
    result = {"history": history, "printed": printed.getvalue(), "gathered": gather_objects({"rank": rank})}
    os.makedirs(os.path.join(out_dir, "chat"), exist_ok=True)
    with open(os.path.join(out_dir, "chat", f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


def task_generate(out_dir: str, rank: int, layout: str) -> None:
    """Greedy generation in one process and under `layout` (tp2, pp2 or tp2_pp2: parallel/generation.py; and
    qwen2_kv1_tp2: a tiny Qwen2 with one kv head, a copy on each rank, and a sliding-window layer)."""
    from telechat2_ms.generate import GenerationConfig, Generator

    prompts = [[1, 15, 27, 300, 42], [1, 99, 7]]
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=3)
    model = pc.LAYOUT_MODELS.get(layout, "tiny")
    single = Generator(pc.build_model(model), max_length=16, use_jit=False).generate(prompts, gen)
    dims = ParallelDims(**pc.GENERATE_LAYOUTS[layout])
    parallel = parallelize_telechat2(pc.build_model(model), dims)
    generator = Generator(parallel.model, max_length=16, use_jit=False,
                          pipeline=parallel if dims.pp > 1 else None)
    tokens = generator.generate(prompts, gen)
    os.makedirs(os.path.join(out_dir, f"generate_{layout}"), exist_ok=True)
    with open(os.path.join(out_dir, f"generate_{layout}", f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"single": single, "parallel": tokens}, f)


def task_load(out_dir: str, rank: int) -> None:
    from safetensors.numpy import save_file

    from convert.reshard import reshard
    from telechat2_ms.checkpoint import RandomWeights, SafetensorsWeights, open_weights, resolve_checkpoint

    dims = ParallelDims(tp=2)
    full_path, layout_dir = os.path.join(out_dir, "full.safetensors"), os.path.join(out_dir, "layout_tp2")
    if rank == 0:
        save_file(pc.initial_state(), full_path)
        reshard(full_path, layout_dir, tp=2, pp=1, config=pc.build_model().config, progress=False)
    comm.all_reduce(ms.Tensor(np.zeros(1, np.float32)), comm.world_group())  # barrier: files written
    want = parallelize_telechat2(pc.build_model(), dims).local_state()
    from_layout = parallelize_telechat2(pc.build_zero_model(), dims,
                                        weights=open_weights(resolve_checkpoint(layout_dir))).local_state()
    from_full = parallelize_telechat2(pc.build_zero_model(), dims,
                                      weights=SafetensorsWeights(full_path)).local_state()
    skeleton = pc.build_zero_model()  # the seeded initialisation replayed tensor by tensor (build.py, no checkpoint)
    from_seed = parallelize_telechat2(skeleton, dims, weights=RandomWeights(skeleton, pc.SEED)).local_state()
    result = {"names_equal": sorted(want) == sorted(from_full) == sorted(from_layout) == sorted(from_seed)}
    result["layout_max_abs"] = max(float(np.max(np.abs(v - want[k]))) for k, v in from_layout.items())
    result["full_max_abs"] = max(float(np.max(np.abs(v - want[k]))) for k, v in from_full.items())
    result["seed_max_abs"] = max(float(np.max(np.abs(v - want[k]))) for k, v in from_seed.items())
    os.makedirs(os.path.join(out_dir, "load"), exist_ok=True)
    with open(os.path.join(out_dir, "load", f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def main(out_dir: str, tasks) -> None:
    device = os.environ.get("TELECHAT2_TEST_DEVICE", "CPU")  # Ascend: the native collectives (HCCL)
    ms.set_device(device)
    if device == "CPU":
        synchronous_cpu_runtime()
    else:
        ms.runtime.launch_blocking()
    rank, _ = comm.init_distributed()
    for task in tasks:
        kind, _, arg = task.partition(":")
        try:
            if kind == "comm":
                run_comm_checks(out_dir)
            elif kind == "reference":
                task_reference(out_dir, rank, arg)
            elif kind == "train":
                task_train(out_dir, rank, arg)
            elif kind == "load":
                task_load(out_dir, rank)
            elif kind == "generate":
                task_generate(out_dir, rank, arg)
            elif kind == "trainer":
                task_trainer(out_dir, rank, arg)
            elif kind == "predict":
                task_predict(out_dir, rank, arg or "dp2")
            elif kind == "chat":
                task_chat(out_dir, rank)
            elif kind == "crash":
                if rank == int(arg):
                    raise RuntimeError(f"deliberate crash on rank {rank}")
                comm.all_reduce(ms.Tensor(np.ones(4, np.float32)), comm.world_group())  # others block here
            else:
                raise ValueError(f"unknown task {task!r}")
            print(f"rank {rank}: task {task} done", flush=True)
        except Exception:
            os.makedirs(os.path.join(out_dir, "errors"), exist_ok=True)
            with open(os.path.join(out_dir, "errors", f"rank{rank}.txt"), "a", encoding="utf-8") as f:
                f.write(f"task {task}:\n{traceback.format_exc()}\n")
            raise


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
