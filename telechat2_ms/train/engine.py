"""The two step engines behind the one trainer (train/trainer.py): what a training step computes, and which
files a checkpoint of it holds. Both take the step's batches as the trainer reads them and return the same
record.

    engine.step(batches, step, lr) -> {"loss", "grad_norm", "skipped", "loss_scale"}
    engine.write_files(directory)       this rank's share of a checkpoint (every rank calls it)
    engine.restore(path)                the weights and optimizer state of a checkpoint
    engine.check_files(directory)       rank 0, before publishing: every rank's share is there

`batches` holds grad_accum_steps arrays (ids [R, S], target mask [R, S]) with R = data_parallel x
micro_batch_num x batch_size rows, replica r's rows in block r (the sampler's order); the loss of a step is
sum(ce * mask) / (targets of the whole step), so every layout computes the single-process loss.

LocalEngine (one process): micro-batches of batch_size rows through train/step.TrainStep.step (one compiled
graph for a step of one micro-batch; several: gradients summed into fp32 accumulators), global-norm clipping,
AdamW (train/optim.py), dynamic loss scaling
for float16, LoRA, recompute. Checkpoint: model.safetensors (LoRA merged in), optimizer.safetensors,
lora.safetensors.
ParallelEngine (msrun, any dp x tp(+sp) x pp x cp layout): parallel/parallelize.TelechatParallel's
forward_backward per accumulation step (1F1B over micro_batch_num micro-batches, gradients reduced over
replicas; with settings.jit each stage's forward and backward run as compiled graphs, except under cp), the
global norm over every shard, ParallelAdamW (states sharded over dp with optimizer_shard), the
same dynamic loss scaling for float16 (the global norm decides, so an overflow on any rank skips the step on
every rank), LoRA with the adapters sharded with their projections, and train.recompute as in one process when
there is one pipeline stage (several stages always rerun each stage's forward in its backward).
Checkpoint: a per-rank layout directory (formats/layout.py; the dp = cp = 0 ranks write their files): per
(tp, stage) the weights (LoRA merged in), AdamW's two moments under the parameters' names and in the same slices
(sharded states are gathered over the replicas while they are written) and a LoRA run's adapters. So it merges
with `python -m convert merge`, loads in one process or under any layout, and resumes under any layout with the
same global batch: weights and moments are read through checkpoint.LayoutWeights (merged and cut again when tp
or the pipeline split differ), each replica keeping its slice of the moments with optimizer_shard; a resumed
LoRA run takes its base weights from load_checkpoint as the original run did. `training_checkpoint` reads a
checkpoint of either engine, so a run also resumes across world sizes.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

import mindspore as ms

from telechat2_ms import checkpoint as ckpt
from telechat2_ms.train.optim import AdamW, DynamicLossScaler, ParallelAdamW, clip_coefficient

OPTIMIZER_FILE = "optimizer.safetensors"
LORA_FILE = "lora.safetensors"
Batch = Tuple[np.ndarray, np.ndarray]


def apply_recompute(model, mode: str) -> None:
    for layer in model.model.layers:
        if mode == "full":
            layer.recompute()
        elif mode == "selective":
            layer.attention.recompute()


def _load_named(params: Dict[str, Any], file: str) -> None:
    """Load exactly these named Parameters from a checkpoint file (strict names and shapes)."""
    ckpt.load_weights(_Named(params), ckpt.SafetensorsWeights(file))


class _Named:
    """A name -> Parameter dict seen as a model by checkpoint.load_weights."""

    def __init__(self, params: Dict[str, Any]):
        self.params = params

    def parameters_and_names(self):
        return [(name, p) for name, p in self.params.items()]


class LocalEngine:
    """One process; see the module docstring."""

    def __init__(self, plan, from_resume: bool):
        from telechat2_ms.build import build_model, build_skeleton
        from telechat2_ms.layers import use_training_kernels
        from telechat2_ms.train.loss import CausalLMLoss
        from telechat2_ms.train.lora import apply_lora
        from telechat2_ms.settings import global_batch
        from telechat2_ms.train.step import TrainStep

        settings = plan.settings
        t = settings.train
        self.settings, self.plan = settings, plan
        # weights: a resumed full fine-tune reads them from its checkpoint (restore), else the build layer
        self.model = build_skeleton(plan, lazy=True) if from_resume and not t.lora_rank else build_model(plan)[0]
        self.lora_names: List[str] = []
        if t.lora_rank:
            self.lora_names = apply_lora(self.model, t.lora_rank, t.lora_alpha, t.lora_targets, seed=t.seed)
        apply_recompute(self.model, t.recompute)
        use_training_kernels(self.model, compiled=settings.jit)  # the compiled step's forms
        named = [(name, p) for name, p in self.model.parameters_and_names() if p.requires_grad]
        self.param_names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = AdamW(self.params, t.beta1, t.beta2, t.eps, t.weight_decay, names=self.param_names)
        self.micro_batch = t.batch_size
        micro_steps = global_batch(settings) // t.batch_size  # micro-batches of one optimizer step
        self.step_fns = TrainStep(CausalLMLoss(self.model, t.batch_size, settings.seq_length, 1.0 / micro_steps),
                                  self.params, self.optimizer, settings.jit)
        self.scaler = DynamicLossScaler(settings.compute_dtype == "float16", t.loss_scale, t.loss_scale_window)

    @property
    def trainable_parameters(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.params)

    def step(self, batches: Sequence[Batch], step: int, lr: float) -> Dict[str, Any]:
        from telechat2_ms.train.loss import cast_batch, count_targets

        t = self.settings.train
        targets = sum(count_targets(mask) for _, mask in batches)
        denominator = ms.Tensor(np.float32(max(targets, 1)))
        pieces = [cast_batch(ids[start:start + self.micro_batch], mask[start:start + self.micro_batch])
                  for ids, mask in batches for start in range(0, ids.shape[0], self.micro_batch)]
        loss, norm, finite = self.step_fns.step(pieces, denominator, self.scaler.scale, t.grad_clip, lr, step)
        record = {"loss": loss, "grad_norm": norm, "skipped": not finite, "loss_scale": self.scaler.scale}
        if self.model.config.num_experts:  # the load-balancing part of `loss`
            record["aux_loss"] = float(self.step_fns.take_aux_loss().asnumpy())
        self.scaler.update(finite)
        return record

    def state(self) -> Dict[str, Any]:
        return {"loss_scaler": self.scaler.state_dict(), "layout": self.plan.dims.describe()}

    def write_files(self, directory: str) -> None:
        from telechat2_ms.train.lora import lora_state, merged_state

        ckpt.save_tensors(merged_state(self.model), os.path.join(directory, ckpt.MODEL_FILE))
        ckpt.save_tensors(self.optimizer.state_tensors(), os.path.join(directory, OPTIMIZER_FILE))
        if self.lora_names:
            ckpt.save_tensors(lora_state(self.model), os.path.join(directory, LORA_FILE))

    def check_files(self, directory: str) -> None:
        if not os.path.isfile(os.path.join(directory, ckpt.MODEL_FILE)):
            raise ckpt.CheckpointError(f"{directory}: {ckpt.MODEL_FILE} was not written")

    def restore(self, path: str, state: Dict[str, Any]) -> None:
        """Weights, moments and loss scale of checkpoint `path`, written by this engine or under msrun (its
        tensors merged as they are read)."""
        from telechat2_ms.layers import fill_parameter
        from telechat2_ms.train.lora import lora_state

        if self.lora_names:  # base weights come from load_checkpoint (or the seed) as in the original run
            _load_named(lora_state(self.model), os.path.join(path, LORA_FILE))
            _load_named(self.optimizer.state_tensors(), os.path.join(path, OPTIMIZER_FILE))
        else:
            weights, moments = training_checkpoint(path)
            ckpt.load_weights(self.model, weights)
            shapes = {name: tuple(p.shape) for name, p in zip(self.param_names, self.params)}
            for which, source in moments.items():
                ckpt.check_state_matches(shapes, source.shapes(), source.path)
                for name, moment in zip(self.param_names, getattr(self.optimizer, which)):
                    fill_parameter(moment, source.full(name))
        self.scaler.load_state_dict(state["loss_scaler"])


def next_token_batch(ids: np.ndarray, mask: np.ndarray):
    """Trainer batch (ids [B,S], target mask [B,S]: mask[p] = 1 when token p is a target) -> (input_ids,
    labels, loss_mask), all [B,S]: labels[p] = ids[p + 1], loss_mask[p] = mask[p + 1], 0 at the last position."""
    pad = np.zeros((ids.shape[0], 1), ids.dtype)
    labels = np.concatenate([ids[:, 1:], pad], 1)  # [B,S]
    loss_mask = np.concatenate([mask[:, 1:], np.zeros((mask.shape[0], 1), mask.dtype)], 1)  # [B,S]
    return ids.astype(np.int32), labels.astype(np.int32), loss_mask.astype(np.float32)


class ParallelEngine:
    """This rank's shard of a dp x tp(+sp) x pp x cp layout; see the module docstring."""

    def __init__(self, plan, resume_path: str = ""):
        from telechat2_ms.build import build_model
        from telechat2_ms.layers import use_training_kernels

        self.settings, self.plan = plan.settings, plan
        t = self.settings.train
        # only this rank's stage and shards; a resumed run reads them from its checkpoint (any layout), but a
        # resumed LoRA run its base weights as the original run did (the checkpoint's are merged)
        weights = training_checkpoint(resume_path)[0] if resume_path and not t.lora_rank else None
        self.model, self.parallel = build_model(plan, weights=weights)
        use_training_kernels(self.model, compiled=False)
        self.parallel.compiled = self.settings.jit  # each stage's forward / backward one graph
        self.lora_names: List[str] = []
        if t.lora_rank:  # adapters sharded with their projections, the single-process initialisation
            from telechat2_ms.parallel.parallelize import apply_lora_adapters
            from telechat2_ms.train.lora import lora_a_draws

            self.lora_names = apply_lora_adapters(self.parallel, lora_a_draws(plan.config, t.lora_rank,
                                                                              t.lora_targets, t.seed),
                                                  t.lora_rank, t.lora_alpha)
        if plan.dims.pp == 1:  # pipeline stages always rerun their forward in backward (parallel/pipeline.py)
            apply_recompute(self.model, t.recompute)
        self.params = self.parallel.params
        self.optimizer = ParallelAdamW(self.params, self.parallel.groups.grad, plan.dims.optimizer_shard, t.beta1,
                                       t.beta2, t.eps, t.weight_decay)
        self.scaler = DynamicLossScaler(self.settings.compute_dtype == "float16", t.loss_scale, t.loss_scale_window)

    @property
    def trainable_parameters(self) -> int:
        """Parameters this rank holds."""
        return sum(int(np.prod(p.shape)) for p in self.params)

    def step(self, batches: Sequence[Batch], step: int, lr: float) -> Dict[str, Any]:
        from telechat2_ms.parallel.pipeline import accumulate

        shifted = [next_token_batch(ids, mask) for ids, mask in batches]
        # the whole step, every replica; a step without targets (truncated before its answer) has loss 0, not 0/0
        targets = max(float(sum(loss_mask.sum() for _, _, loss_mask in shifted)), 1.0)
        scale = self.scaler.scale  # float16: the loss (so every gradient) is scaled by it; 1 otherwise
        # MoE: the mean load-balancing loss of the step's global micro-batches (parallel/experts.py)
        aux_weight = 1.0 / (len(shifted) * self.parallel.dims.micro_batch_num)
        loss, grads, aux = 0.0, [], 0.0
        for batch in shifted:
            part, part_grads = self.parallel.forward_backward(*batch, tokens=targets / scale,
                                                              aux_weight=aux_weight * scale)
            loss += part / scale
            aux += sum(self.parallel.aux_losses) * aux_weight
            accumulate(grads, part_grads)
            del part_grads
        # the norm is global (all-reduced over tp and pp; replicas hold the same reduced gradients), so an
        # overflow on any rank makes it non-finite on every rank and every rank skips the step
        norm = self.parallel.grad_norm(grads) / scale
        finite = math.isfinite(norm) and math.isfinite(loss)
        if finite:
            self.optimizer.step(grads, lr, step, clip_coefficient(norm, self.settings.train.grad_clip) / scale)
        record = {"loss": loss, "grad_norm": norm, "skipped": not finite, "loss_scale": scale}
        if self.parallel.model.config.num_experts:  # the load-balancing part of `loss`
            record["aux_loss"] = aux
        self.scaler.update(finite)
        return record

    def state(self) -> Dict[str, Any]:
        return {"layout": self.plan.dims.describe(), "loss_scaler": self.scaler.state_dict()}

    def write_files(self, directory: str) -> None:
        """The dp = cp = 0 ranks write their rank file; rank 0 the layout.json."""
        from telechat2_ms.formats.atomic import atomic_file
        from telechat2_ms.formats.layout import layout_dict, rank_file, shard_metadata, write_layout
        from telechat2_ms.formats.safetensors_io import write_arrays

        dims, coords = self.plan.dims, self.parallel.groups.coords
        ranges = dims.stage_layer_ranges(self.plan.config.num_layers)
        writes = coords.dp == 0 and coords.cp == 0
        meta = dict(shard_metadata(dims.tp, coords.tp, dims.pp, coords.pp, ranges[coords.pp]),
                    **{ckpt.CONFIG_METADATA_KEY: _config_json(self.plan.config)})
        # a mixture-of-experts model's expert shards are gathered over the ep group (every member takes part): rank
        # files hold every expert, as a (tp, pp) layout does, whatever the ep of the run
        from telechat2_ms.parallel.experts import gather_experts
        from telechat2_ms.parallel.parallelize import merged_state

        state = gather_experts(merged_state(self.parallel.model), self.parallel.groups.ep)
        if writes:
            path = os.path.join(directory, rank_file(coords.tp, coords.pp))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_file(path, overwrite=True) as tmp:  # one tensor on the host at a time
                write_arrays(tmp, state, meta)  # LoRA folded in, as in one process
        del state
        for which in ParallelAdamW.MOMENTS:  # every replica takes part (sharded states are gathered)
            path = os.path.join(directory, rank_file(coords.tp, coords.pp, moment_file(which)))
            self._write_moments(which, path if writes else None, meta)
        if writes and self.lora_names:  # the adapters themselves, to resume (model.safetensors is merged)
            params = dict(self.parallel.model.parameters_and_names())
            path = os.path.join(directory, rank_file(coords.tp, coords.pp, LORA_FILE))
            with atomic_file(path, overwrite=True) as tmp:
                write_arrays(tmp, {name: params[name] for name in self.lora_names}, meta)
        if self.parallel.groups.coords == (0, 0, 0, 0):
            write_layout(directory, layout_dict(dims.tp, ranges, self.plan.config.to_hf_config(), False,
                                                {"layout": dims.describe()}))

    def _write_moments(self, which: str, path, meta) -> None:
        """AdamW moment `which` of this rank's parameters under their names (the tied copy of an embedding
        has the embedding's, which its first stage writes), one tensor on the host at a time; `path` None: only
        take part in the gathers of sharded states."""
        from telechat2_ms.formats.atomic import atomic_file
        from telechat2_ms.formats.safetensors_io import SafetensorsWriter, TensorInfo

        from telechat2_ms.parallel import comm

        ep = self.parallel.groups.ep
        saved = [(i, p) for i, p in enumerate(self.params) if not getattr(p, "tied_copy", False)]

        def moment(i, p):  # an expert shard's gathered over ep, as its weights are
            full = self.optimizer.full_moment(which, i)
            return comm.all_gather(full, ep, 0) if getattr(p, "expert_shard", False) else full

        if path is None:
            for i, p in saved:
                moment(i, p)
            return
        shapes = [(p.name, TensorInfo("F32", (p.shape[0] * ep.size,) + tuple(p.shape[1:]) if getattr(
            p, "expert_shard", False) else tuple(p.shape))) for _, p in saved]
        with atomic_file(path, overwrite=True) as tmp:
            writer = SafetensorsWriter(tmp, shapes, meta)
            try:
                for i, p in saved:
                    writer.write(p.name, moment(i, p).asnumpy())
                writer.close()
            finally:
                writer.abort()

    def check_files(self, directory: str) -> None:
        """Every (tp, stage) rank file and layout.json are in place (a rank killed during the save leaves its file
        missing; the barrier before this does not always notice a dead peer on CPU)."""
        from telechat2_ms.formats.layout import LAYOUT_NAME, SHARD_FILE, rank_file

        dims = self.plan.dims
        files = (SHARD_FILE,) + tuple(moment_file(which) for which in ParallelAdamW.MOMENTS) + \
            ((LORA_FILE,) if self.lora_names else ())
        wanted = [LAYOUT_NAME] + [rank_file(t, s, f) for s in range(dims.pp) for t in range(dims.tp) for f in files]
        missing = [name for name in wanted if not os.path.isfile(os.path.join(directory, name))]
        if missing:
            raise ckpt.CheckpointError(f"{directory}: {', '.join(missing)} not written (a rank failed during the "
                                       "save); the checkpoint is not published")

    def restore(self, path: str, state: Dict[str, Any]) -> None:
        """The loss scale, a LoRA run's adapters and the optimizer moments of checkpoint `path` (its weights were
        read when the model was built), from any layout: each tensor is read as the weights are."""
        from telechat2_ms.layers import fill_parameter
        from telechat2_ms.parallel.parallelize import EMBEDDING

        self.scaler.load_state_dict(state["loss_scaler"])
        dims, coords = self.plan.dims, self.parallel.groups.coords
        if self.lora_names:  # the adapters of a LoRA run (its base weights came from load_checkpoint or the seed)
            ref = ckpt.resolve_checkpoint(path)
            if ref.kind != "layout":
                raise ckpt.CheckpointError(f"{path} holds a one-process LoRA run's adapters; resume it in one process")
            adapters = ckpt.LayoutWeights(ref, LORA_FILE)
            for p in self.params:
                fill_parameter(p, adapters.shard(p.name, dims.tp, coords.tp, self.plan.config.num_kv_heads))
        experts = self.parallel.expert_range
        for which, source in training_checkpoint(path)[1].items():
            for i, p in enumerate(self.params):
                name = EMBEDDING if getattr(p, "tied_copy", False) else p.name
                moment = source.shard(name, dims.tp, coords.tp, self.plan.config.num_kv_heads)
                if getattr(p, "expert_shard", False):  # this rank's experts (the files hold them all)
                    moment = moment[experts[0]:experts[1]]
                self.optimizer.load_moment(which, i, moment)


def moment_file(which: str) -> str:
    """The per-rank file of AdamW moment `which` in a parallel training checkpoint."""
    return f"{which}.safetensors"


def training_checkpoint(path: str):
    """(weights, {moment: its tensors under the parameters' names}) of a training checkpoint written by either
    engine: a per-rank layout (model / exp_avg / exp_avg_sq rank files) or one process's model.safetensors and
    optimizer.safetensors (`exp_avg.<name>`). Both read whole tensors or one rank's slices (checkpoint.Weights)."""
    ref = ckpt.resolve_checkpoint(path)
    if ref.kind == "layout":
        return ckpt.LayoutWeights(ref), {w: ckpt.LayoutWeights(ref, moment_file(w)) for w in ParallelAdamW.MOMENTS}
    optimizer = ckpt.SafetensorsWeights(os.path.join(path, OPTIMIZER_FILE))
    return (ckpt.SafetensorsWeights(os.path.join(path, ckpt.MODEL_FILE)),
            {w: ckpt.PrefixedWeights(optimizer, w + ".") for w in ParallelAdamW.MOMENTS})


def _config_json(cfg) -> str:
    import json

    return json.dumps(cfg.to_hf_config(), sort_keys=True)
