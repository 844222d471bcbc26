"""Pretraining and fine-tuning loop: `run_train(settings)` for the `train` and `finetune` run modes.

One optimizer step (train/step.py for the compiled parts):
    for each of grad_accum_steps micro-batches [batch_size, seq_length] from the sampler:
        forward + backward of loss * loss_scale, gradients summed into fp32 accumulators
    (the loss of every micro-batch is divided by the target count of the whole step: train/loss.py)
    norm = global gradient norm / loss_scale;  non-finite -> skip the update, halve the scale (fp16)
    clip to train.grad_clip (global norm), AdamW with warmup + cosine learning rate (train/optim.py)
then logging (train/metrics.py) and, every save_steps steps and at the end, an atomic checkpoint
(train/checkpointing.py) that the run resumes from exactly: model (or LoRA adapters), AdamW moments, step
(hence learning rate and bias corrections), data position and loss-scaler state. There are no random ops in
a step (TeleChat2 has no dropout; LoRA dropout is not implemented) and the data order is a pure function of
(seed, position), so this state is all the randomness there is: a resumed run repeats the uninterrupted run
bit for bit on the same machine.

Precision: parameters, gradients and optimizer state are fp32; `compute_dtype` float16 (CPU or Ascend) or
bfloat16 (Ascend only) casts the matmuls, with dynamic loss scaling for float16.
Memory: `train.recompute` full (every decoder layer recomputed in backward) or selective (only each
layer's attention block, whose [B, n, S, S] scores dominate activation memory), via Cell.recompute().
Scope: one process (data, tensor, pipeline and context parallel training runs through
telechat2_ms.parallel); the sampler already shards by (rank, world).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

import mindspore as ms

from telechat2_ms import checkpoint as ckpt
from telechat2_ms import runtime
from telechat2_ms.config import ConfigError
from telechat2_ms.data.dataset import TokenDataset, prepare_dataset
from telechat2_ms.data.sampler import ShardedSampler
from telechat2_ms.data.sft import TRUNCATION_POLICIES
from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.settings import RunSettings
from telechat2_ms.train import checkpointing as ckpts
from telechat2_ms.train.lora import LORA_TARGETS, apply_lora, lora_state, merged_state
from telechat2_ms.train.loss import CausalLMLoss, cast_batch, count_targets
from telechat2_ms.train.metrics import MetricsLogger
from telechat2_ms.train.optim import AdamW, DynamicLossScaler, clip_coefficient, learning_rate_at
from telechat2_ms.train.step import TrainStep

STATE_VERSION = 1
RECOMPUTE_MODES = ("none", "full", "selective")
Callback = Callable[[str, "Trainer", Dict[str, Any]], None]


def check_train_settings(settings: RunSettings) -> None:
    """Refuse settings the trainer cannot run, naming the key."""
    t = settings.train
    positive = {"train.batch_size": t.batch_size, "train.total_steps": t.total_steps,
                "train.grad_accum_steps": t.grad_accum_steps, "train.log_steps": t.log_steps}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if settings.seq_length < 2:
        raise ConfigError(f"seq_length must be at least 2 for training, got {settings.seq_length}")
    if t.save_steps < 0 or t.warmup_steps < 0:
        raise ConfigError("train.save_steps and train.warmup_steps must be >= 0")
    if t.data_format not in ("sft", "pretrain"):
        raise ConfigError(f"train.data_format must be sft or pretrain, got {t.data_format!r}")
    if t.recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"train.recompute must be one of {RECOMPUTE_MODES}, got {t.recompute!r}")
    if t.truncation not in TRUNCATION_POLICIES:
        raise ConfigError(f"train.truncation must be one of {TRUNCATION_POLICIES}, got {t.truncation!r}")
    if t.lora_rank < 0:
        raise ConfigError(f"train.lora_rank must be >= 0, got {t.lora_rank}")
    bad = sorted(set(t.lora_targets) - set(LORA_TARGETS))
    if t.lora_rank and bad:
        raise ConfigError(f"train.lora_targets: unknown {bad}; choose from {sorted(LORA_TARGETS)}")
    if settings.compute_dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"compute_dtype must be float32, float16 or bfloat16, got {settings.compute_dtype!r}")
    if settings.compute_dtype == "bfloat16" and settings.device_target == "CPU":
        raise ConfigError("compute_dtype bfloat16 has no CPU kernels; use float32 or float16 on CPU")
    if settings.use_fused_kernels and settings.device_target == "CPU":
        raise ConfigError("use_fused_kernels needs Ascend (the fused kernels have no CPU version)")
    p = settings.parallel_config
    degrees = p.data_parallel * p.model_parallel * p.pipeline_stage * p.context_parallel
    if degrees != 1:
        raise ConfigError(f"the single-process trainer got parallel_config with {degrees} ranks "
                          f"(dp {p.data_parallel}, mp {p.model_parallel}, pp {p.pipeline_stage}, "
                          f"cp {p.context_parallel}); multi-rank training runs through telechat2_ms.parallel")


def resolve_train_dataset(spec: str, output_dir: str, data_format: str) -> str:
    """"demo" / "demo:N": write N (default 2000) generated demo dialogs to output_dir/demo_data/ (once)."""
    if spec != "demo" and not spec.startswith("demo:"):
        return spec
    if data_format != "sft":
        raise ConfigError("train.train_dataset=demo holds SFT dialogs; set train.data_format=sft")
    from telechat2_ms.demo_corpus import write_sft_jsonl

    try:
        num = int(spec.split(":", 1)[1]) if ":" in spec else 2000
    except ValueError:
        raise ConfigError(f"train.train_dataset: expected demo or demo:N, got {spec!r}") from None
    path = os.path.join(output_dir, "demo_data", f"demo_sft_{num}.jsonl")
    if not os.path.isfile(path):
        tmp = f"{path}.{os.getpid()}.partial"
        write_sft_jsonl(tmp, num)
        os.replace(tmp, path)
    return path


def apply_recompute(model: Telechat2ForCausalLM, mode: str) -> None:
    for layer in model.model.layers:
        if mode == "full":
            layer.recompute()
        elif mode == "selective":
            layer.attention.recompute()


class Trainer:
    """Builds tokenizer, data, model, optimizer and compiled step from RunSettings; `train()` runs it."""

    def __init__(self, settings: RunSettings, callbacks: Sequence[Callback] = (),
                 printer: Callable[[str], None] = print):
        check_train_settings(settings)
        self.settings, self.callbacks, self.printer = settings, list(callbacks), printer
        t = settings.train
        self.output_dir = settings.output_dir
        os.makedirs(self.output_dir, exist_ok=True)
        self.resume_path = ckpts.resolve_resume(self.output_dir, t.resume, t.resume_from)
        if ms.get_context("device_target") != settings.device_target:  # run_telechat2.py has set it already
            ms.set_device(settings.device_target)

        self.config = runtime.resolve_model_config(settings)  # the checkpoint's config.json, else `model`
        self.tokenizer = runtime.build_tokenizer(settings, self.config)
        data_spec = resolve_train_dataset(t.train_dataset, self.output_dir, t.data_format)
        self.dataset: TokenDataset = prepare_dataset(data_spec, self.tokenizer, settings.seq_length, t.data_format,
                                                     t.truncation, t.seed, os.path.join(self.output_dir, "data_cache"))
        self.sampler = ShardedSampler(len(self.dataset), t.batch_size, rank=0, world=1, seed=t.seed)

        # weights: from the resumed checkpoint (full fine-tune), else load_checkpoint, else random from the seed
        from_resume = bool(self.resume_path) and not t.lora_rank
        load_base = bool(settings.load_checkpoint) and not from_resume
        self.model = Telechat2ForCausalLM(self.config, settings.compute_dtype, seed=t.seed,
                                          use_fused=settings.use_fused_kernels, init_zeros=load_base or from_resume)
        if load_base:
            ckpt.load_checkpoint_into(self.model, settings.load_checkpoint)
        self.lora_names: List[str] = []
        if t.lora_rank:
            self.lora_names = apply_lora(self.model, t.lora_rank, t.lora_alpha, t.lora_targets, seed=t.seed)
        apply_recompute(self.model, t.recompute)
        named = [(name, p) for name, p in self.model.parameters_and_names() if p.requires_grad]
        self.param_names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = AdamW(self.params, t.beta1, t.beta2, t.eps, t.weight_decay, names=self.param_names)
        self.loss_net = CausalLMLoss(self.model, t.batch_size, settings.seq_length)
        self.step_fns = TrainStep(self.loss_net, self.params, self.optimizer, settings.jit)
        self.scaler = DynamicLossScaler(settings.compute_dtype == "float16", t.loss_scale, t.loss_scale_window)
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsLogger(self.output_dir, t.total_steps, t.log_steps, printer)
        self.last_checkpoint: Optional[str] = None
        if self.resume_path:
            self.load_state(self.resume_path)
            self.last_checkpoint = self.resume_path
        else:
            existing = ckpts.list_checkpoints(ckpts.checkpoint_root(self.output_dir))
            if existing:
                printer(f"warning: {self.output_dir} already holds checkpoints up to step {existing[-1][0]}; this "
                        "fresh run replaces them as it saves (use --train.resume=true to continue that run)")

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        t = self.settings.train
        return {"format_version": STATE_VERSION, "step": self.step, "sampler": self.sampler.state_dict(),
                "loss_scaler": self.scaler.state_dict(), "seed": t.seed, "tokens_seen": self.tokens_seen,
                "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
                "seq_length": self.settings.seq_length, "total_steps": t.total_steps,
                "lora": {"rank": t.lora_rank, "alpha": t.lora_alpha, "targets": list(t.lora_targets)}
                if t.lora_rank else None,
                "base_checkpoint": _abspath(self.settings.load_checkpoint), "dataset": self.dataset.directory,
                "model": self.config.name}

    def save_checkpoint(self, before_rename=None) -> str:
        files = {ckpts.MODEL_FILE: merged_state(self.model), ckpts.OPTIMIZER_FILE: self.optimizer.state_tensors()}
        if self.lora_names:
            files[ckpts.LORA_FILE] = lora_state(self.model)
        path = ckpts.save_training_checkpoint(ckpts.checkpoint_root(self.output_dir), self.step, files,
                                              self.state_dict(), self.config, self.settings,
                                              self.settings.train.keep_checkpoint_max, before_rename)
        self.last_checkpoint = path
        self._emit("checkpoint", {"step": self.step, "path": path})
        return path

    def load_state(self, path: str) -> None:
        state = ckpts.read_trainer_state(path)
        mine = self.state_dict()
        for key in ("seed", "batch_size", "grad_accum_steps", "seq_length", "lora"):
            if state.get(key) != mine[key]:
                raise ckpt.CheckpointError(f"cannot resume from {path}: it was trained with {key}={state.get(key)!r}, "
                                           f"this run has {mine[key]!r}")
        if self.lora_names:  # base weights come from load_checkpoint (or the seed) as in the original run
            if state.get("base_checkpoint") != mine["base_checkpoint"]:
                raise ckpt.CheckpointError(f"cannot resume LoRA from {path}: its base was "
                                           f"{state.get('base_checkpoint')!r}, this run loads "
                                           f"{mine['base_checkpoint']!r}")
            _load_named(lora_state(self.model), os.path.join(path, ckpts.LORA_FILE))
        else:
            ckpt.load_checkpoint_into(self.model, os.path.join(path, ckpts.MODEL_FILE))
        _load_named(self.optimizer.state_tensors(), os.path.join(path, ckpts.OPTIMIZER_FILE))
        self.sampler.load_state_dict(state["sampler"])
        self.scaler.load_state_dict(state["loss_scaler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.printer(f"resumed from {path} at step {self.step} ({self.sampler.consumed} samples consumed)")

    # ---- the loop ------------------------------------------------------------------------------------
    def _emit(self, event: str, info: Dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(event, self, info)

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step (module docstring); returns its metrics record."""
        t = self.settings.train
        start = time.perf_counter()
        step = self.step + 1
        batches = []
        tokens = 0
        for _ in range(t.grad_accum_steps):
            entries = self.sampler.next_batch()
            ids, mask = self.dataset.batch(entries)
            tokens += int(self.dataset.lengths(entries).sum())
            batches.append((ids, mask))
        targets = sum(count_targets(mask) for _, mask in batches)
        denominator = ms.Tensor(np.float32(max(targets, 1)))
        scale = ms.Tensor(np.float32(self.scaler.scale))
        loss = 0.0
        for ids, mask in batches:
            loss += float(self.step_fns.micro_step(*cast_batch(ids, mask), denominator, scale).asnumpy())
        norm = float(self.step_fns.grad_norm().asnumpy()) / self.scaler.scale
        finite = math.isfinite(norm) and math.isfinite(loss)
        lr = learning_rate_at(step, t.learning_rate, t.min_learning_rate, t.warmup_steps, t.total_steps)
        if finite:
            clip = clip_coefficient(norm, t.grad_clip)
            self.step_fns.apply_update(*self.optimizer.step_scalars(lr, step, clip / self.scaler.scale))
        else:
            self.step_fns.zero_grads()
        record = {"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                  "grad_norm": norm if math.isfinite(norm) else None, "tokens": tokens,
                  "loss_scale": self.scaler.scale, "skipped": not finite,
                  "consumed_samples": self.sampler.consumed}
        self.scaler.update(finite)
        self.step = step
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - start
        record.update(step_time_s=elapsed, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0)
        return record

    def train(self) -> Dict[str, Any]:
        t = self.settings.train
        self.metrics.start(self.step)
        first_step = self.step
        n_params = sum(int(np.prod(p.shape)) for p in self.params)
        self.printer(f"training {self.config.name} ({'LoRA rank %d, ' % t.lora_rank if t.lora_rank else ''}"
                     f"{n_params:,} trainable parameters) on {self.dataset} for steps {first_step + 1}.."
                     f"{t.total_steps}, global batch {t.batch_size * t.grad_accum_steps} x {self.settings.seq_length}")
        started = time.perf_counter()
        losses = []
        while self.step < t.total_steps:
            record = self.train_step()
            losses.append(record["loss"])
            self.metrics.log(record)
            self._emit("step_end", record)
            if t.save_steps and self.step % t.save_steps == 0:
                self.save_checkpoint()
        if self.last_checkpoint is None or ckpts.checkpoint_step(self.last_checkpoint) != self.step:
            self.save_checkpoint()
        curve = self.metrics.plot(self.output_dir)
        summary = {"steps": self.step, "first_step": first_step + 1, "losses": losses,
                   "final_loss": losses[-1] if losses else None, "checkpoint": self.last_checkpoint,
                   "metrics_file": self.metrics.path, "loss_curve": curve, "output_dir": self.output_dir,
                   "dataset": self.dataset.directory, "tokens_seen": self.tokens_seen,
                   "elapsed_s": time.perf_counter() - started}
        self._emit("train_end", summary)
        self.printer(f"done: {self.step} steps, final loss {summary['final_loss']}, checkpoint {self.last_checkpoint}, "
                     f"loss curve {curve}")
        return summary


def _abspath(path: str) -> str:
    return os.path.abspath(path) if path else ""


def _load_named(params: Dict[str, Any], file: str) -> None:
    """Load exactly these named Parameters from a checkpoint file (strict names and shapes)."""
    state = ckpt.read_checkpoint(file)
    ckpt.check_state_matches({n: tuple(p.shape) for n, p in params.items()},
                             {n: tuple(v.shape) for n, v in state.items()}, file)
    for name, param in params.items():
        param.set_data(ms.Tensor(state[name]))


def run_train(settings: RunSettings, callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
    """Entry point of the `train` (pretrain data) and `finetune` (SFT data) run modes; returns the summary
    of Trainer.train (steps, losses, final_loss, checkpoint, metrics_file, loss_curve, ...)."""
    return Trainer(settings, callbacks).train()
