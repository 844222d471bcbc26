"""The one build layer: from settings to this rank's model and tokenizer, for every run mode, world 1 or N.

    plan = plan_run(settings, world)     # resolve the checkpoint once, its config, the validated layout
    run = build_run(plan)                # this rank's model (its shard only) + tokenizer

A checkpoint path travels: `--load_checkpoint` -> `checkpoint.resolve_checkpoint` (one `CheckpointRef`: its
kind, the weights file or layout directory, the stored config, the tokenizer directory) -> `plan_run`
(the config decides the architecture; `settings.validate` checks the layout against it) -> `build_run`:
a lazy skeleton of the model (parameters without storage, layers.ParamInit(zeros=True)), then
- one process: every parameter filled from `checkpoint.open_weights(ref)`, tensor by tensor (a layout
  directory's slices merged as they are read);
- under msrun: `parallel.parallelize_telechat2(skeleton, dims, weights)` keeps this pipeline stage's layers
  and creates this rank's tensor-parallel cells from the reader's slices (a full .safetensors file is read
  slice by slice; a layout directory of the same layout gives this rank its own file, one of another layout
  is merged and cut again tensor by tensor), so no rank ever holds the full model;
- no checkpoint: the seeded random initialisation of one process (under msrun replayed tensor by tensor,
  each rank keeping only its slices, so every layout starts from the single-process weights).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from telechat2_ms.checkpoint import CheckpointRef, open_weights, resolve_checkpoint
from telechat2_ms.config import CONFIGS, ConfigError, ModelConfig, get_config
from telechat2_ms.parallel.dims import ParallelDims
from telechat2_ms.settings import PURPOSES, RunSettings, validate


@dataclass
class RunPlan:
    """Everything decided before anything is built."""

    settings: RunSettings
    ref: CheckpointRef
    config: ModelConfig
    dims: ParallelDims
    world: int
    purpose: str


def model_config(settings: RunSettings, ref: CheckpointRef) -> ModelConfig:
    """The checkpoint's stored config when it has one (refused if it contradicts a named size), else the
    registry size `settings.model`; with the run's moe_capacity_factor."""
    if ref.config is None:
        return _with_run_settings(get_config(settings.model), settings)
    if settings.model != "tiny" and settings.model in CONFIGS:
        named = get_config(settings.model)
        if named.architecture() != ref.config.architecture():
            raise ConfigError(f"the config stored with {ref.path} does not match model '{settings.model}': "
                              f"{ref.config.architecture()} vs {named.architecture()}")
    return _with_run_settings(ref.config, settings)


def _with_run_settings(cfg: ModelConfig, settings: RunSettings) -> ModelConfig:
    if settings.moe_capacity_factor and not cfg.num_experts:
        raise ConfigError(f"moe_capacity_factor is {settings.moe_capacity_factor} but {cfg.name} has no experts")
    if not settings.moe_capacity_factor:
        return cfg
    return replace(cfg, moe_capacity_factor=float(settings.moe_capacity_factor))


def plan_run(settings: RunSettings, world: int, purpose: Optional[str] = None) -> RunPlan:
    """Resolve the checkpoint (headers and config files only) and validate the settings against it, for
    `purpose` (train | generate | eval; default the run mode's)."""
    ref = resolve_checkpoint(settings.load_checkpoint)
    cfg = model_config(settings, ref)
    if ref.missing:
        raise ConfigError(ref.missing)
    purpose = purpose or PURPOSES[settings.run_mode]
    dims = validate(settings, world, cfg, purpose)
    return RunPlan(settings, ref, cfg, dims, world, purpose)


@dataclass
class BuiltRun:
    """This rank's model and tokenizer and where the rank sits. `parallel` is the TelechatParallel (None in
    one process); `replica` / `replicas` are the data-parallel coordinates."""

    model: Any
    tokenizer: Any
    plan: RunPlan
    rank: int = 0
    parallel: Any = None

    @property
    def dims(self) -> ParallelDims:
        return self.plan.dims

    @property
    def world(self) -> int:
        return self.plan.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def replica(self) -> int:
        return self.dims.coords(self.rank).dp if self.world > 1 else 0

    @property
    def replicas(self) -> int:
        return self.dims.dp


def build_skeleton(plan: RunPlan, lazy: bool):
    """Telechat2ForCausalLM at full shape; `lazy`: its weight matrices hold no storage until loaded."""
    from telechat2_ms.model import Telechat2ForCausalLM

    s = plan.settings
    return Telechat2ForCausalLM(plan.config, compute_dtype=s.compute_dtype, seed=s.train.seed,
                                use_fused=s.use_fused_kernels, init_zeros=lazy)


def comm_rank() -> int:
    from telechat2_ms.parallel import comm

    return comm.get_rank()


def build_model(plan: RunPlan, groups=None, weights=None):
    """-> (model, TelechatParallel or None) for this rank; see the module docstring. `weights` (msrun): read
    them from there instead of the run's load_checkpoint (a resumed training checkpoint)."""
    from telechat2_ms.checkpoint import load_weights
    from telechat2_ms.config import TELECHAT_DEFAULT_THETA
    from telechat2_ms.rope import describe_rope

    if plan.config.family == "telechat2" and plan.config.rope_theta != TELECHAT_DEFAULT_THETA and \
            (groups is None or groups.coords == (0, 0, 0, 0)) and comm_rank() == 0:
        print(describe_rope(plan.config))  # not the official code's hard-coded 10000: say so
    if plan.world == 1:
        if plan.ref.kind == "none":
            return build_skeleton(plan, lazy=False), None
        model = build_skeleton(plan, lazy=True)
        load_weights(model, open_weights(plan.ref))
        return model, None
    from telechat2_ms.checkpoint import RandomWeights
    from telechat2_ms.parallel.parallelize import parallelize_telechat2

    skeleton = build_skeleton(plan, lazy=True)
    if weights is None:
        weights = (RandomWeights(skeleton, plan.settings.train.seed) if plan.ref.kind == "none"
                   else open_weights(plan.ref))
    parallel = parallelize_telechat2(skeleton, plan.dims, weights=weights, groups=groups)
    return parallel.model, parallel


def build_tokenizer(plan: RunPlan):
    """The tokenizer named in settings (file or directory), else the checkpoint directory's (tokenizer.model,
    tokenizer.json or vocab.json + merges.txt), else the built-in demo tokenizer (which only fits vocab-1024
    models such as `tiny`)."""
    from telechat2_ms.tokenizer import load_tokenizer, tokenizer_kind

    path = plan.settings.tokenizer
    if not path and plan.ref.tokenizer_dir and tokenizer_kind(plan.ref.tokenizer_dir):
        path = plan.ref.tokenizer_dir
    tokenizer = load_tokenizer(path or None)
    if tokenizer.vocab_size > plan.config.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                          f"{plan.config.vocab_size}; pass the tokenizer that belongs to the checkpoint with "
                          "--tokenizer=PATH")
    return tokenizer


def build_run(plan: RunPlan, tokenizer: bool = True, groups=None) -> BuiltRun:
    """This rank's model (its shard only) and the tokenizer."""
    from telechat2_ms.parallel import comm

    tok = build_tokenizer(plan) if tokenizer else None
    model, parallel = build_model(plan, groups)
    return BuiltRun(model, tok, plan, comm.get_rank(), parallel)


def synchronous_cpu_runtime() -> None:
    """MindSpore's host work on CPU done by the calling thread, before the first kernel runs. Without
    `MS_DEV_HOST_BLOCKING_RUN=1` MindSpore 2.10 hands each compiled graph run to a queue thread and the caller
    waits for it in a busy loop (`AsyncRQueue::Wait`, reading a tensor's value), which takes a core from the
    kernels: on 2 cores the bench_100m training step's backward matmuls ran at ~130 GFLOP/s against the forward's
    ~300, and its forward + backward took 2.9 s instead of 1.95-2.2 s (README Performance).
    `launch_blocking` makes PyNative synchronous (3.5x faster on small machines, errors where they happen)."""
    import os

    import mindspore as ms

    os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
    ms.runtime.launch_blocking()


def setup_device(settings: RunSettings) -> None:
    """Select the device; on CPU, MindSpore's host work in the calling thread (synchronous_cpu_runtime). The
    settings are already validated."""
    import mindspore as ms

    from telechat2_ms import kernels

    ms.set_device(settings.device_target)
    if settings.device_target == "CPU":
        synchronous_cpu_runtime()
    else:  # the matmul form chosen for oneDNN's CPU kernels (kernels.weight_matmul) is not for other devices
        kernels.SWAP_ROWS = ()


def from_settings(settings: RunSettings, world: Optional[int] = None, tokenizer: bool = True) -> BuiltRun:
    """plan_run + build_run for the current process (tests, tools)."""
    from telechat2_ms.parallel import comm

    return build_run(plan_run(settings, comm.get_world_size() if world is None else world), tokenizer)
