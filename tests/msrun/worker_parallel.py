"""msrun worker: run several parallel checks in one job (one ~20 s msrun start-up for all of them).

Usage: python worker_parallel.py OUT_DIR TASK [TASK ...], TASK one of
  comm              every collective and region of comm.py against numpy (comm_checks.py)
  reference         rank 0 writes the single-process loss and updated parameters (OUT_DIR/reference.npz)
  train:LAYOUT      one SGD step under a layout of parallel_cases.LAYOUTS; each rank dumps its loss and
                    local parameters to OUT_DIR/LAYOUT/rank{r}.{json,npz}
  generate:tp2      greedy generation under tp2 and in one process; OUT_DIR/generate/rank{r}.json
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
from telechat2_ms.parallel import comm
from telechat2_ms.parallel.dims import ParallelDims
from telechat2_ms.parallel.parallelize import parallelize_telechat2


def task_reference(out_dir: str, rank: int) -> None:
    if rank != 0:
        return
    loss, state = pc.reference_step()
    np.savez(os.path.join(out_dir, "reference.npz"), **state)
    with open(os.path.join(out_dir, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"loss": loss}, f)


def task_train(out_dir: str, rank: int, layout: str) -> None:
    dims = ParallelDims(**pc.LAYOUTS[layout])
    start = time.monotonic()
    parallel = parallelize_telechat2(pc.build_model(), dims)
    loss = parallel.train_step_sgd(*pc.make_batch(), pc.LR)
    pc.save_rank_result(out_dir, layout, rank, parallel.groups.coords, loss, parallel.local_state(),
                        time.monotonic() - start)


def task_generate(out_dir: str, rank: int) -> None:
    from telechat2_ms.generate import GenerationConfig, Generator

    prompts = [[1, 15, 27, 300, 42], [1, 99, 7]]
    gen = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=3)
    single = Generator(pc.build_model(), max_length=16, use_jit=False).generate(prompts, gen)
    parallel = parallelize_telechat2(pc.build_model(), ParallelDims(tp=2))
    tp_tokens = Generator(parallel.model, max_length=16, use_jit=False).generate(prompts, gen)
    os.makedirs(os.path.join(out_dir, "generate"), exist_ok=True)
    with open(os.path.join(out_dir, "generate", f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"single": single, "tp2": tp_tokens}, f)


def task_load(out_dir: str, rank: int) -> None:
    from safetensors.numpy import save_file

    from convert.reshard import reshard
    from telechat2_ms.parallel.loading import FullCheckpoint, load_rank_checkpoint

    dims = ParallelDims(tp=2)
    full_path, layout_dir = os.path.join(out_dir, "full.safetensors"), os.path.join(out_dir, "layout_tp2")
    if rank == 0:
        save_file(pc.initial_state(), full_path)
        reshard(full_path, layout_dir, tp=2, pp=1, config=pc.build_model().config, progress=False)
    comm.all_reduce(ms.Tensor(np.zeros(1, np.float32)), comm.world_group())  # barrier: files written
    want = parallelize_telechat2(pc.build_model(), dims).local_state()
    from_layout = parallelize_telechat2(pc.build_zero_model(), dims)
    load_rank_checkpoint(from_layout, layout_dir)
    from_full = parallelize_telechat2(pc.build_zero_model(), dims, weights=FullCheckpoint(full_path)).local_state()
    result = {"names_equal": sorted(want) == sorted(from_full) == sorted(from_layout.local_state())}
    result["layout_max_abs"] = max(float(np.max(np.abs(v - want[k]))) for k, v in from_layout.local_state().items())
    result["full_max_abs"] = max(float(np.max(np.abs(v - want[k]))) for k, v in from_full.items())
    os.makedirs(os.path.join(out_dir, "load"), exist_ok=True)
    with open(os.path.join(out_dir, "load", f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def main(out_dir: str, tasks) -> None:
    ms.set_device("CPU")
    ms.runtime.launch_blocking()
    rank, _ = comm.init_distributed()
    for task in tasks:
        kind, _, arg = task.partition(":")
        try:
            if kind == "comm":
                run_comm_checks(out_dir)
            elif kind == "reference":
                task_reference(out_dir, rank)
            elif kind == "train":
                task_train(out_dir, rank, arg)
            elif kind == "load":
                task_load(out_dir, rank)
            elif kind == "generate":
                task_generate(out_dir, rank)
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
