"""One run of run_telechat2.py under msrun: communication set-up, the parallel layout from the settings,
the parallelized model with its weights, and rank-0-only output.

    rank, world = start(settings)                # comm.init_distributed() when msrun launched us
    run = build_run(settings, purpose)           # -> ParallelRun(model, tokenizer, dims, rank, ...)

Without msrun (world 1) and with a trivial `parallel_config`, `build_run` is runtime.model_and_tokenizer:
the single-process path is unchanged. Under msrun the degrees come from `parallel_config` and must multiply
to the number of processes; the model is built once per rank and cut to this rank's shards
(parallelize_telechat2), with its weights from
- a layout directory written by `python -m convert reshard FULL OUT --tp T --pp P` (OUT/layout.json,
  OUT/tp{t}_pp{p}/model.safetensors): each rank reads only its own file;
- a full checkpoint: a .safetensors file is read lazily, tensor by tensor, and sliced at load time
  (parallel/loading.FullCheckpoint); a .ckpt is read whole on every rank, then sliced;
- nothing: the seeded random initialisation of the single-process run (same seed -> same weights).
msrun also runs the script in its scheduler process (MS_ROLE=MS_SCHED): there communication.init() serves
the cluster and the process ends without returning, as MindSpore does it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np

from telechat2_ms.config import ConfigError, ModelConfig
from telechat2_ms.parallel import comm
from telechat2_ms.parallel.dims import ParallelDims

# what each run mode can run: generation and eval need the whole model on every rank of a replica
PURPOSES = {
    "generate": "data_parallel x model_parallel",  # predict, chat
    "eval": "data_parallel x model_parallel",
    "train": "every layout",
}


def start(settings) -> tuple:
    """Initialise communication when launched by msrun; returns (rank, world)."""
    rank, world = comm.init_distributed()
    p = settings.parallel_config
    degrees = p.data_parallel * p.model_parallel * p.pipeline_stage * p.context_parallel
    if world == 1 and degrees > 1:
        raise ConfigError(f"parallel_config asks for {degrees} processes (data_parallel {p.data_parallel} x "
                          f"model_parallel {p.model_parallel} x pipeline_stage {p.pipeline_stage} x "
                          f"context_parallel {p.context_parallel}) but this is a single process; launch with "
                          f"`msrun --worker_num={degrees} --local_worker_num={degrees} run_telechat2.py ...`")
    if world > 1:
        ParallelDims.from_settings(p, world)  # the degrees must multiply to the world size
    return rank, world


def run_dims(settings, world: Optional[int] = None, purpose: str = "train") -> ParallelDims:
    """ParallelDims from settings.parallel_config, checked against the world size and the run mode."""
    world = comm.get_world_size() if world is None else world
    p = settings.parallel_config
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; expected one of {sorted(PURPOSES)}")
    if purpose in ("generate", "eval") and (p.pipeline_stage > 1 or p.context_parallel > 1):
        raise ConfigError(f"run_mode {'predict/chat' if purpose == 'generate' else 'eval'} runs "
                          f"{PURPOSES[purpose]}; set parallel_config.pipeline_stage and context_parallel to 1 "
                          f"(got {p.pipeline_stage} and {p.context_parallel})")
    dims = ParallelDims.from_settings(p, world)
    if purpose in ("generate", "eval"):  # sequence parallel, micro-batches, optimizer sharding: training only
        dims = ParallelDims(dp=dims.dp, tp=dims.tp, world=dims.world)
    return dims


@dataclass
class ParallelRun:
    """The model and tokenizer of this rank, and where the rank sits. `parallel` is the TelechatParallel
    (None for a plain single-process run); `replica` / `replicas` are the data-parallel coordinates."""

    model: Any
    tokenizer: Any
    dims: ParallelDims
    rank: int
    world: int
    parallel: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replica(self) -> int:
        return self.dims.coords(self.rank).dp if self.world > 1 else 0

    @property
    def replicas(self) -> int:
        return self.dims.dp


def layout_dir_of(path: str) -> Optional[str]:
    """`path` when it is a convert/reshard layout directory (holds layout.json), else None."""
    if path and os.path.isdir(path) and os.path.isfile(os.path.join(path, "layout.json")):
        return path
    return None


def _layout_config(layout_dir: str) -> ModelConfig:
    with open(os.path.join(layout_dir, "layout.json"), encoding="utf-8") as f:
        layout = json.load(f)
    if layout.get("fused_qkv"):
        raise ConfigError(f"{layout_dir} holds the fused inference layout (w_qkv / w_gate_hidden); reshard an "
                          "unfused checkpoint for the parallel model")
    return ModelConfig.from_hf_config(layout["model_config"], name=os.path.basename(os.path.abspath(layout_dir)))


def full_weights(path: str):
    """name -> full numpy array of a checkpoint file or directory (lazy for .safetensors)."""
    from telechat2_ms.checkpoint import read_checkpoint, resolve_checkpoint_file
    from telechat2_ms.parallel.loading import FullCheckpoint

    file = resolve_checkpoint_file(path)
    if file.endswith(".safetensors"):
        return FullCheckpoint(file)
    return {name: p.asnumpy() for name, p in read_checkpoint(file).items()}


def _check_names(model, weights, source: str) -> None:
    from telechat2_ms.checkpoint import CheckpointError

    want, have = {n for n, _ in model.parameters_and_names()}, set(weights)
    if want != have:
        raise CheckpointError(f"{source} does not match the model: missing {sorted(want - have)[:5]}, "
                              f"unexpected {sorted(have - want)[:5]}")


def parallel_model(settings, dims: ParallelDims, tokenizer: bool = True) -> tuple:
    """(TelechatParallel for this rank with its weights, tokenizer or None, ModelConfig)."""
    from telechat2_ms import runtime
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.parallel.loading import load_rank_checkpoint
    from telechat2_ms.parallel.parallelize import parallelize_telechat2

    layout_dir = layout_dir_of(settings.load_checkpoint)
    cfg = _layout_config(layout_dir) if layout_dir else runtime.resolve_model_config(settings)
    tok = runtime.build_tokenizer(settings, cfg) if tokenizer else None
    dims.check_model(cfg)
    model = Telechat2ForCausalLM(cfg, compute_dtype=settings.compute_dtype, seed=settings.train.seed,
                                 use_fused=settings.use_fused_kernels, init_zeros=bool(settings.load_checkpoint))
    if layout_dir:
        parallel = parallelize_telechat2(model, dims)
        load_rank_checkpoint(parallel, layout_dir)
    elif settings.load_checkpoint:
        weights = full_weights(settings.load_checkpoint)
        _check_names(model, weights, settings.load_checkpoint)
        parallel = parallelize_telechat2(model, dims, weights=weights)
    else:
        parallel = parallelize_telechat2(model, dims)
    return parallel, tok, cfg


def build_run(settings, purpose: str) -> ParallelRun:
    """This rank's model (parallelized when the world or the layout asks for it) and tokenizer."""
    from telechat2_ms import runtime

    rank, world = comm.get_rank(), comm.get_world_size()
    dims = run_dims(settings, world, purpose)
    if world == 1:
        model, tokenizer = runtime.model_and_tokenizer(settings)
        return ParallelRun(model, tokenizer, dims, rank, world)
    parallel, tokenizer, _ = parallel_model(settings, dims)
    return ParallelRun(parallel.model, tokenizer, dims, rank, world, parallel)


def barrier() -> None:
    """Wait until every rank gets here (a one-element all-reduce over the world)."""
    from mindspore import Tensor

    comm.all_reduce(Tensor(np.zeros(1, np.float32)), comm.world_group()).asnumpy()


# ---- small objects between ranks (prompts typed on rank 0, answers gathered on rank 0) -----------------

def _encode(obj: Any) -> np.ndarray:
    data = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    if data.size >= 2 ** 24:
        raise ValueError(f"object of {data.size} bytes is too large to send exactly (limit 2**24)")
    return data


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """Rank `root`'s JSON-serialisable `obj` on every rank (bytes travel as exact float32 values)."""
    from mindspore import Tensor

    group = comm.world_group()
    if group.size == 1:
        return obj
    data = _encode(obj) if group.rank == root else np.zeros(0, np.uint8)
    length = int(comm.broadcast(Tensor(np.array([data.size], np.float32)), group, root).asnumpy()[0])
    buffer = np.zeros(max(length, 1), np.float32)
    buffer[:data.size] = data
    got = comm.broadcast(Tensor(buffer), group, root).asnumpy()[:length]
    return json.loads(got.astype(np.uint8).tobytes().decode("utf-8"))


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's JSON-serialisable `obj`, in rank order, on every rank."""
    from mindspore import Tensor

    group = comm.world_group()
    if group.size == 1:
        return [obj]
    data = _encode(obj)
    lengths = comm.all_gather(Tensor(np.array([data.size], np.float32)), group, 0).asnumpy().astype(np.int64)
    buffer = np.zeros((1, max(int(lengths.max()), 1)), np.float32)  # [1, longest]
    buffer[0, :data.size] = data
    gathered = comm.all_gather(Tensor(buffer), group, 0).asnumpy()  # [world, longest]
    return [json.loads(gathered[i, :lengths[i]].astype(np.uint8).tobytes().decode("utf-8"))
            for i in range(group.size)]
