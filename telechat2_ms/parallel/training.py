"""The `train` / `finetune` run modes under msrun: train/trainer.py's data, schedule and metrics around
TelechatParallel's step (any dp x tp(+sp) x pp x cp layout) and ParallelAdamW (dp-sharded states with
parallel_config.optimizer_shard).

One optimizer step:
    grad_accum_steps batches of batch_size x data_parallel rows (the rows replica r would read are rows
    r*batch_size.. of each, the ShardedSampler order), arranged replica by replica into one global batch
    -> TelechatParallel.forward_backward (every rank passes the same global batch; each takes its dp rows,
    cp positions and micro_batch_num micro-batches; loss = sum(ce * mask) / targets of the whole step, as
    train/loss.py) -> global gradient norm (replicas counted once) -> clip to train.grad_clip -> AdamW
    with the warmup + cosine learning rate of train/optim.py.
The trainer's [B, S] batch with "mask[p] = 1: token p is a target" becomes next-token labels: labels[p] =
ids[p + 1], loss_mask[p] = mask[p + 1], and 0 for the last position, so the sequence keeps its length.

Checkpoints (every save_steps and at the end): `<output_dir>/parallel_checkpoints/step_XXXXXXXX/`, a
convert/reshard layout directory (layout.json + tp{t}_pp{p}/model.safetensors, written by the dp = cp = 0
ranks), so `--load_checkpoint=<that dir>` runs predict/eval under msrun with the same tp x pp, and
`python -m convert merge <that dir> model.safetensors` gives the single-process checkpoint. Not supported
on this path (refused with a ConfigError): resume (optimizer states are not saved), LoRA, selective
recompute, float16 loss scaling. Activations are always fully recomputed (each stage's backward reruns its
forward, parallel/pipeline.py), so `train.recompute` full and none both run that way. Only rank 0 prints and
writes metrics.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

from telechat2_ms.config import ConfigError
from telechat2_ms.parallel import comm
from telechat2_ms.parallel.session import barrier, parallel_model, run_dims
from telechat2_ms.train.optim import clip_coefficient

CHECKPOINT_DIR = "parallel_checkpoints"


def check_parallel_train_settings(settings) -> None:
    from telechat2_ms.settings import ParallelSettings
    from telechat2_ms.train.trainer import check_train_settings

    check_train_settings(dataclasses.replace(settings, parallel_config=ParallelSettings()))  # all but the layout
    t = settings.train
    unsupported = {"train.resume": t.resume or bool(t.resume_from), "train.lora_rank": t.lora_rank > 0,
                   "train.recompute selective": t.recompute == "selective",
                   "compute_dtype float16": settings.compute_dtype == "float16"}
    bad = [key for key, on in unsupported.items() if on]
    if bad:
        raise ConfigError(f"multi-process training does not support {', '.join(bad)} yet; run it in one process "
                          "or leave these at their defaults")


def next_token_batch(ids: np.ndarray, mask: np.ndarray):
    """Trainer batch (ids [B,S], target mask [B,S]) -> (input_ids, labels, loss_mask), all [B,S]."""
    pad = np.zeros((ids.shape[0], 1), ids.dtype)
    labels = np.concatenate([ids[:, 1:], pad], 1)  # [B,S]
    loss_mask = np.concatenate([mask[:, 1:], np.zeros((mask.shape[0], 1), mask.dtype)], 1)  # [B,S]
    return ids.astype(np.int32), labels.astype(np.int32), loss_mask.astype(np.float32)


def arrange_by_replica(batches: Sequence[np.ndarray], replicas: int) -> np.ndarray:
    """Micro-step batches of [replicas * b, ...] rows -> one batch whose replica r block is its rows of
    every micro-step, in order (TelechatParallel gives dp rank r the r-th contiguous block)."""
    blocks = [np.concatenate([np.split(b, replicas, 0)[r] for b in batches], 0) for r in range(replicas)]
    return np.concatenate(blocks, 0)


class ParallelTrainer:
    """Builds data, this rank's model shards and optimizer from RunSettings; `train()` runs it."""

    def __init__(self, settings, callbacks: Sequence[Callable] = (), printer: Callable[[str], None] = print):
        from telechat2_ms.data.dataset import prepare_dataset
        from telechat2_ms.data.sampler import ShardedSampler
        from telechat2_ms.train.metrics import MetricsLogger
        from telechat2_ms.train.trainer import resolve_train_dataset

        check_parallel_train_settings(settings)
        self.settings, self.callbacks = settings, list(callbacks)
        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self.printer = printer if self.rank == 0 else (lambda text: None)
        t = settings.train
        self.dims = run_dims(settings, self.world, "train")
        self.output_dir = settings.output_dir
        os.makedirs(self.output_dir, exist_ok=True)
        self.parallel, self.tokenizer, self.config = parallel_model(settings, self.dims)
        # rank 0 prepares (tokenizes, caches) the data first; the others then find it in the cache
        for turn in (0, 1):
            if (self.rank == 0) == (turn == 0):
                data_spec = resolve_train_dataset(t.train_dataset, self.output_dir, t.data_format)
                self.dataset = prepare_dataset(data_spec, self.tokenizer, settings.seq_length, t.data_format,
                                               t.truncation, t.seed, os.path.join(self.output_dir, "data_cache"))
            barrier()
        self.sampler = ShardedSampler(len(self.dataset), t.batch_size * self.dims.dp, rank=0, world=1, seed=t.seed)
        self.dims.check_batch(t.batch_size * self.dims.dp * t.grad_accum_steps, settings.seq_length)
        self.optimizer = self.parallel.make_adamw(t.beta1, t.beta2, t.eps, t.weight_decay)
        self.metrics = MetricsLogger(self.output_dir, t.total_steps, t.log_steps, self.printer) \
            if self.rank == 0 else None
        self.step = 0
        self.tokens_seen = 0
        self.last_checkpoint = None

    def train_step(self) -> Dict[str, Any]:
        from telechat2_ms.train.optim import learning_rate_at

        t = self.settings.train
        start = time.perf_counter()
        step = self.step + 1
        ids, masks, tokens = [], [], 0
        for _ in range(t.grad_accum_steps):
            entries = self.sampler.next_batch()
            batch_ids, batch_mask = self.dataset.batch(entries)
            tokens += int(self.dataset.lengths(entries).sum())
            ids.append(batch_ids)
            masks.append(batch_mask)
        batch = next_token_batch(arrange_by_replica(ids, self.dims.dp), arrange_by_replica(masks, self.dims.dp))
        loss, grads = self.parallel.forward_backward(*batch)
        norm = self.parallel.grad_norm(grads)
        finite = math.isfinite(norm) and math.isfinite(loss)
        lr = learning_rate_at(step, t.learning_rate, t.min_learning_rate, t.warmup_steps, t.total_steps)
        if finite:
            self.optimizer.step(grads, lr, step, clip_coefficient(norm, t.grad_clip))
        self.step = step
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - start
        return {"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                "grad_norm": norm if math.isfinite(norm) else None, "tokens": tokens, "loss_scale": 1.0,
                "skipped": not finite, "consumed_samples": self.sampler.consumed, "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}

    def save_checkpoint(self) -> str:
        """Write this step's layout directory (module docstring); every rank must call it."""
        from safetensors.numpy import save_file

        from convert.reshard import LAYOUT_FORMAT, LAYOUT_NAME, rank_file

        root = os.path.join(self.output_dir, CHECKPOINT_DIR)
        final = os.path.join(root, f"step_{self.step:08d}")
        tmp = os.path.join(root, f".tmp-step_{self.step:08d}")
        coords = self.parallel.groups.coords
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        if coords.dp == 0 and coords.cp == 0:
            path = os.path.join(tmp, rank_file(coords.tp, coords.pp))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({k: np.ascontiguousarray(v) for k, v in self.parallel.local_state().items()}, path)
        barrier()
        if self.rank == 0:
            dims = self.dims
            ranges = dims.stage_layer_ranges(self.config.num_layers)
            layout = {"format": LAYOUT_FORMAT, "tp": dims.tp, "pp": dims.pp,
                      "layer_counts": [end - first for first, end in ranges],
                      "layer_ranges": [list(r) for r in ranges], "layer_numbering": "global",
                      "rank_order": "rank = pp_stage * tp + tp_rank", "fused_qkv": False,
                      "files": {str(s * dims.tp + t): rank_file(t, s) for s in range(dims.pp) for t in range(dims.tp)},
                      "model_config": self.config.to_hf_config(),
                      "training": {"step": self.step, "tokens_seen": self.tokens_seen, "layout": dims.describe()}}
            with open(os.path.join(tmp, LAYOUT_NAME), "w", encoding="utf-8") as f:
                json.dump(layout, f, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        barrier()
        self.last_checkpoint = final
        self._emit("checkpoint", {"step": self.step, "path": final})
        return final

    def _emit(self, event: str, info: Dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(event, self, info)

    def train(self) -> Dict[str, Any]:
        t = self.settings.train
        if self.metrics:
            self.metrics.start(self.step)
        self.printer(f"training {self.config.name} under {self.dims.describe()} on {self.dataset} for "
                     f"{t.total_steps} steps, global batch {t.batch_size * self.dims.dp * t.grad_accum_steps} x "
                     f"{self.settings.seq_length}")
        started = time.perf_counter()
        losses: List[float] = []
        while self.step < t.total_steps:
            record = self.train_step()
            losses.append(record["loss"])
            if self.metrics:
                self.metrics.log(record)
            self._emit("step_end", record)
            if t.save_steps and self.step % t.save_steps == 0:
                self.save_checkpoint()
        if self.last_checkpoint is None or not self.last_checkpoint.endswith(f"step_{self.step:08d}"):
            self.save_checkpoint()
        curve = self.metrics.plot(self.output_dir) if self.metrics else None
        summary = {"steps": self.step, "losses": losses, "final_loss": losses[-1] if losses else None,
                   "checkpoint": self.last_checkpoint, "output_dir": self.output_dir,
                   "tokens_seen": self.tokens_seen, "elapsed_s": time.perf_counter() - started,
                   "metrics_file": self.metrics.path if self.metrics else None, "loss_curve": curve}
        self._emit("train_end", summary)
        self.printer(f"done: {self.step} steps, final loss {summary['final_loss']}, checkpoint {self.last_checkpoint}")
        return summary


def run_parallel_train(settings, callbacks: Sequence[Callable] = ()) -> Dict[str, Any]:
    """`run_train` under msrun (world > 1)."""
    return ParallelTrainer(settings, callbacks).train()
