"""The one trainer of the `train` and `finetune` run modes, in one process or under msrun.

    Trainer(settings).train()      # run_train(settings)

The trainer owns everything but the step: the run plan (build.plan_run: settings validated against the
checkpoint's config and the world size), tokenizer and data (rank 0 tokenizes and caches first), the data
order, the learning-rate schedule, metrics and the loss curve (rank 0), checkpoint cadence and retention
(`keep_checkpoint_max`), run_settings.yaml and resume. The step is the engine's (train/engine.py):
LocalEngine in one process, ParallelEngine under msrun.

One optimizer step reads grad_accum_steps batches of data_parallel x micro_batch_num x batch_size rows
(settings.global_batch) from the sampler; every rank reads the same rows and the parallel engine gives each
replica its block. The learning rate is warmup + cosine (train/optim.py).

Checkpoints (every save_steps and at the end): `<output_dir>/checkpoints/step_XXXXXXXX/` with the engine's
files, trainer_state.json (step, data position, loss-scaler state, seed, ...), config.json and
run_settings.yaml, written to a temporary sibling and renamed into place (train/checkpointing.py), then all
but the newest keep_checkpoint_max are removed. A run resumes from one exactly: there are no random ops in a
step (no dropout; LoRA dropout is not implemented) and the data order is a pure function of (seed,
position), so a resumed run repeats the uninterrupted run bit for bit on the same machine, in one process
and under msrun. A checkpoint written under msrun also resumes under another layout (the same global batch;
its weights and optimizer states are resharded as they are read, train/engine.py).

Precision: parameters, gradients and optimizer state are fp32; `compute_dtype` float16 (CPU or Ascend) or
bfloat16 (Ascend only) casts the matmuls, with dynamic loss scaling for float16 (one process).
Memory: `train.recompute` full (every decoder layer recomputed in backward) or selective (only each
layer's attention block, whose [B, n, S, S] scores dominate activation memory), via Cell.recompute().
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

from telechat2_ms import checkpoint as ckpt
from telechat2_ms.config import ConfigError
from telechat2_ms.parallel import comm
from telechat2_ms.settings import RunSettings, global_batch
from telechat2_ms.train import checkpointing as ckpts

STATE_VERSION = 1
Callback = Callable[[str, "Trainer", Dict[str, Any]], None]


def resolve_train_dataset(spec: str, output_dir: str, data_format: str) -> str:
    """"demo" / "demo:N": write N (default 2000) generated demo dialogs to output_dir/demo_data/ (once)."""
    if spec != "demo" and not spec.startswith("demo:"):
        return spec
    if data_format != "sft":
        raise ConfigError("train.train_dataset=demo holds SFT dialogs; set train.data_format=sft")
    from telechat2_ms.data.demo_corpus import write_sft_jsonl
    from telechat2_ms.formats.atomic import atomic_file

    try:
        num = int(spec.split(":", 1)[1]) if ":" in spec else 2000
    except ValueError:
        raise ConfigError(f"train.train_dataset: expected demo or demo:N, got {spec!r}") from None
    path = os.path.join(output_dir, "demo_data", f"demo_sft_{num}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, overwrite=True) as tmp:
            write_sft_jsonl(tmp, num)
    return path


class Trainer:
    """Builds the plan, tokenizer, data and step engine from RunSettings; `train()` runs it."""

    def __init__(self, settings: RunSettings, callbacks: Sequence[Callback] = (),
                 printer: Callable[[str], None] = print, plan=None):
        from telechat2_ms.build import build_tokenizer, plan_run
        from telechat2_ms.data.sampler import ShardedSampler
        from telechat2_ms.train.engine import LocalEngine, ParallelEngine
        from telechat2_ms.train.metrics import MetricsLogger

        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self.plan = plan or plan_run(settings, self.world, "train")
        self.settings, self.callbacks = settings, list(callbacks)
        self.printer = printer if self.rank == 0 else (lambda text: None)
        t = settings.train
        self.output_dir = settings.output_dir
        self.config = self.plan.config
        # before anything is built: the output directory's owner, the resumed run's identity (outputs.py)
        self.resume_path = ckpts.resolve_resume(self.output_dir, t.resume, t.resume_from)
        self.identity = run_identity(settings, self.plan)
        self.lock, self.run_id = self._claim_output_dir()
        self.tokenizer = build_tokenizer(self.plan)
        self.dataset = self._prepare_data()
        self.sampler = ShardedSampler(len(self.dataset), global_batch(settings) // t.grad_accum_steps, rank=0,
                                      world=1, seed=t.seed)
        self.engine = (ParallelEngine(self.plan, self.resume_path or "") if self.world > 1
                       else LocalEngine(self.plan, from_resume=bool(self.resume_path)))
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsLogger(self.output_dir, t.total_steps, t.log_steps, printer) if self.rank == 0 else None
        self.last_checkpoint: Optional[str] = None
        if self.resume_path:
            self.load_state(self.resume_path)
            self.last_checkpoint = self.resume_path

    def _claim_output_dir(self):
        """Rank 0 takes the output directory's lock and records (or checks) the run there; every rank gets
        the run id, or the same refusal."""
        from telechat2_ms.outputs import OutputLock, claim_run

        lock, outcome = None, {}
        if self.rank == 0:
            try:
                lock = OutputLock(self.output_dir).acquire()
                recorded = ckpts.read_trainer_state(self.resume_path) if self.resume_path else None
                claim = claim_run(self.output_dir, self.identity, recorded, self.settings.overwrite,
                                  resumed_from=self.resume_path or "")
                outcome = {"run_id": claim.run_id}
                if claim.replaced:
                    self.printer(f"--overwrite: removed the earlier run's {', '.join(claim.replaced)} from "
                                 f"{self.output_dir}")
            except ConfigError as err:
                if lock is not None:
                    lock.release()
                outcome = {"error": str(err)}
        if self.world > 1:
            from telechat2_ms.parallel.ranks import broadcast_object

            outcome = broadcast_object(outcome)
        if "error" in outcome:
            raise ConfigError(outcome["error"])
        return lock, outcome["run_id"]

    @property
    def model(self):
        return self.engine.model

    def _prepare_data(self):
        """Tokenize (and cache) the training data; rank 0 first, the others then find it in the cache."""
        from telechat2_ms.data.dataset import prepare_dataset

        t = self.settings.train

        def prepare():
            spec = resolve_train_dataset(t.train_dataset, self.output_dir, t.data_format)
            return prepare_dataset(spec, self.tokenizer, self.settings.seq_length, t.data_format, t.truncation,
                                   t.seed, os.path.join(self.output_dir, "data_cache"))

        if self.world == 1:
            return prepare()
        from telechat2_ms.parallel.ranks import barrier

        dataset = prepare() if self.rank == 0 else None
        barrier()
        return dataset if self.rank == 0 else prepare()

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        t = self.settings.train
        return {"format_version": STATE_VERSION, "step": self.step, "sampler": self.sampler.state_dict(),
                **self.engine.state(), "seed": t.seed, "tokens_seen": self.tokens_seen,
                "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
                "seq_length": self.settings.seq_length, "total_steps": t.total_steps,
                "lora": {"rank": t.lora_rank, "alpha": t.lora_alpha, "targets": list(t.lora_targets)}
                if t.lora_rank else None,
                "base_checkpoint": _abspath(self.settings.load_checkpoint), "dataset": self.dataset.directory,
                "model": self.config.name, "run_id": self.run_id, "identity": self.identity}

    def save_checkpoint(self, before_rename=None) -> str:
        """Every rank calls it (module docstring)."""
        barrier = None
        if self.world > 1:
            from telechat2_ms.parallel.ranks import barrier
        path = ckpts.save_training_checkpoint(ckpt.checkpoint_root(self.output_dir), self.step,
                                              self.engine.write_files, self.state_dict(), self.config,
                                              self.settings, self.settings.train.keep_checkpoint_max,
                                              before_rename, is_main=self.rank == 0, barrier=barrier,
                                              run_id=self.run_id, check_files=self.engine.check_files)
        self.last_checkpoint = path
        self._emit("checkpoint", {"step": self.step, "path": path})
        return path

    def load_state(self, path: str) -> None:
        """The engine's weights and optimizer state and the data position of checkpoint `path` (whose run
        identity _claim_output_dir has compared)."""
        state = ckpts.read_trainer_state(path)
        written_under = state.get("layout")
        if written_under and written_under != self.plan.dims.describe():
            self.printer(f"resuming a checkpoint written under {written_under} on {self.plan.dims.describe()}: "
                         "weights and optimizer states are resharded as they are read")
        self.engine.restore(path, state)
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.printer(f"resumed from {path} at step {self.step} ({self.sampler.consumed} samples consumed)")

    # ---- the loop ------------------------------------------------------------------------------------
    def _emit(self, event: str, info: Dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(event, self, info)

    def train_step(self) -> Dict[str, Any]:
        """One optimizer step (module docstring); returns its metrics record."""
        from telechat2_ms.train.optim import learning_rate_at

        t = self.settings.train
        start = time.perf_counter()
        step = self.step + 1
        batches, tokens = [], 0
        for _ in range(t.grad_accum_steps):
            entries = self.sampler.next_batch()
            batches.append(self.dataset.batch(entries))
            tokens += int(self.dataset.lengths(entries).sum())
        lr = learning_rate_at(step, t.learning_rate, t.min_learning_rate, t.warmup_steps, t.total_steps)
        result = self.engine.step(batches, step, lr)
        record = {"step": step, "loss": _finite_or_none(result["loss"]), "lr": lr,
                  "grad_norm": _finite_or_none(result["grad_norm"]), "tokens": tokens,
                  "loss_scale": result["loss_scale"], "skipped": result["skipped"],
                  "consumed_samples": self.sampler.consumed}
        if "aux_loss" in result:
            record["aux_loss"] = _finite_or_none(result["aux_loss"])
        self.step = step
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - start
        record.update(step_time_s=elapsed, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0)
        return record

    def train(self) -> Dict[str, Any]:
        try:
            return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """Release the output directory (train() does at its end)."""
        if self.lock is not None:
            self.lock.release()

    def _train(self) -> Dict[str, Any]:
        t = self.settings.train
        if self.metrics:
            self.metrics.start(self.step)
        first_step = self.step
        where = f" under {self.plan.dims.describe()}" if self.world > 1 else ""
        held = "this rank holds" if self.world > 1 else "trainable"
        self.printer(f"training {self.config.name}{where} ({'LoRA rank %d, ' % t.lora_rank if t.lora_rank else ''}"
                     f"{self.engine.trainable_parameters:,} parameters {held}) on {self.dataset} for steps "
                     f"{first_step + 1}..{t.total_steps}, global batch {global_batch(self.settings)} x "
                     f"{self.settings.seq_length}")
        started = time.perf_counter()
        losses = []
        while self.step < t.total_steps:
            record = self.train_step()
            losses.append(record["loss"])
            if self.metrics:
                self.metrics.log(record)
            self._emit("step_end", record)
            if t.save_steps and self.step % t.save_steps == 0:
                self.save_checkpoint()
        if self.last_checkpoint is None or ckpt.checkpoint_step(self.last_checkpoint) != self.step:
            self.save_checkpoint()
        curve = self.metrics.plot(self.output_dir) if self.metrics else None
        summary = {"steps": self.step, "first_step": first_step + 1, "losses": losses,
                   "final_loss": losses[-1] if losses else None, "checkpoint": self.last_checkpoint,
                   "metrics_file": self.metrics.path if self.metrics else None, "loss_curve": curve,
                   "output_dir": self.output_dir, "dataset": self.dataset.directory,
                   "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - started}
        self._emit("train_end", summary)
        self.printer(f"done: {self.step} steps, final loss {summary['final_loss']}, checkpoint {self.last_checkpoint}, "
                     f"loss curve {curve}")
        return summary


def run_identity(settings: RunSettings, plan) -> Dict[str, Any]:
    """What makes two training runs the same run (outputs.py): a resumed run must match it."""
    t = settings.train
    return _as_json({"model": plan.config.name, "architecture": plan.config.architecture(),
            "base_checkpoint": _abspath(settings.load_checkpoint), "run_mode": settings.run_mode,
            "train_dataset": t.train_dataset if t.train_dataset.startswith("demo") else _abspath(t.train_dataset),
            "data_format": t.data_format, "truncation": t.truncation, "seq_length": settings.seq_length,
            "seed": t.seed, "batch_size": t.batch_size, "grad_accum_steps": t.grad_accum_steps,
            "global_batch": global_batch(settings), "layout": plan.dims.describe(),
            "compute_dtype": settings.compute_dtype,
            "lora": {"rank": t.lora_rank, "alpha": t.lora_alpha, "targets": list(t.lora_targets)}
            if t.lora_rank else None})


def _as_json(value):
    """`value` as it reads back from trainer_state.json / run.json (tuples become lists), so a recorded
    identity compares equal to the current one."""
    return json.loads(json.dumps(value))


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def _abspath(path: str) -> str:
    return os.path.abspath(path) if path else ""


def run_train(settings: RunSettings, callbacks: Sequence[Callback] = (), plan=None) -> Dict[str, Any]:
    """Entry point of the `train` (pretrain data) and `finetune` (SFT data) run modes; returns the summary
    of Trainer.train (steps, losses, final_loss, checkpoint, metrics_file, loss_curve, ...)."""
    return Trainer(settings, callbacks, plan=plan).train()
