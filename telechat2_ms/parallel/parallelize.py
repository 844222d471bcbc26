"""Apply a parallel layout to a plain Telechat2ForCausalLM (torchtitan / gpt-fast style: the model files
contain no parallel code; this module rewrites the model in place).

`parallelize_telechat2(model, dims)` applies, in order:
1. pipeline split: layers outside this stage's range, and the embedding (not first stage) or the final
   norm and lm_head (not last stage), are replaced by empty placeholders; parameter names keep their
   global layer index (`model.layers.{i}...`) on every stage;
2. tensor (+ sequence) parallel, a table over the decoder-layer submodules (TP_PLAN): column-parallel
   wq, wk_v, w1, w3; row-parallel wo, w2; region-entry norms; vocab-parallel embedding and lm_head. The
   shards are cut from the full weights with telechat2_ms.shard_layout.shard_tensor (the same rules as
   the checkpoint resharder);
3. context parallel: each attention's core becomes RingAttention over the cp group (zig-zag layout).
It returns a `TelechatParallel` that runs training steps (1F1B over micro-batches, gradient reduction
over data/context replicas, global-norm clipping and AdamW with optional dp-sharded states: optimizer.py) and whose `.model` is a drop-in for generation when only tp is used.

Training data: every rank passes the same global batch (numpy); each rank takes its dp rows, its zig-zag
cp positions and splits them into micro-batches. The loss is MindFormers': sum(ce * mask) / sum(mask)
over the global batch, so every layout reproduces the single-process loss and gradients.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from mindspore import Tensor, nn, ops

from telechat2_ms.parallel import comm
from telechat2_ms.parallel.data_parallel import reduce_gradients, sgd_step
from telechat2_ms.parallel.dims import ParallelDims, ParallelGroups, build_groups
from telechat2_ms.parallel.layers import (ColumnParallelLinear, RegionEntryNorm, RowParallelLinear,
                                          VocabParallelEmbedding, VocabParallelHead,
                                          vocab_parallel_cross_entropy)
from telechat2_ms.parallel.optimizer import ParallelAdamW, global_grad_norm
from telechat2_ms.parallel.pipeline import StageFunctions, run_pipeline
from telechat2_ms.parallel.ring_attention import RingAttention, default_scale, zigzag_positions
from telechat2_ms.rope import rope_inputs
from telechat2_ms.shard_layout import shard_tensor
from telechat2_ms.train.optim import clip_coefficient

# decoder-layer submodule -> tensor-parallel style (weights from shard_layout.SHARD_TABLE)
TP_PLAN: Dict[str, str] = {
    "attention_norm": "region_norm",
    "attention.wq": "colwise",
    "attention.wk_v": "colwise",
    "attention.wo": "rowwise",
    "ffn_norm": "region_norm",
    "feed_forward.w1": "colwise",
    "feed_forward.w3": "colwise",
    "feed_forward.w2": "rowwise",
}


class Absent(nn.Cell):
    """Placeholder for a module that lives on another pipeline stage (holds no parameters)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def construct(self, *args):
        raise RuntimeError(f"{self.what} lives on another pipeline stage")


def _set_submodule(root: nn.Cell, path: str, cell: nn.Cell) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, leaf, cell)


def _get_submodule(root: nn.Cell, path: str) -> nn.Cell:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def apply_pipeline_split(model, dims: ParallelDims, stage: int) -> Tuple[int, int]:
    """Replace what other stages own by placeholders; returns this stage's (first, end) layer range."""
    first, end = dims.stage_layer_ranges(model.config.num_layers)[stage]
    for i in range(len(model.model.layers)):
        if not first <= i < end:
            model.model.layers[i] = Absent(f"layer {i}")
    if stage != 0:
        model.model.tok_embeddings = Absent("the embedding")
    if stage != dims.pp - 1:
        model.model.norm_out = Absent("the final norm")
        model.lm_head = Absent("lm_head")
    return first, end


def apply_tensor_parallel(model, weights: Mapping[str, np.ndarray], groups: ParallelGroups,
                          layer_range: Tuple[int, int]) -> None:
    """Swap in the tensor-parallel cells for this rank, cut from the full `weights`."""
    dims, tp_group = groups.dims, groups.tp
    tp, tp_rank, sp = dims.tp, groups.coords.tp, dims.seq_parallel
    dtype = model.compute_dtype

    def shard(name):
        if name not in weights:
            raise KeyError(f"weight {name} is missing from the full weights given to parallelize_telechat2")
        return shard_tensor(name, np.asarray(weights[name], np.float32), tp, tp_rank)

    for i in range(*layer_range):
        layer, prefix = model.model.layers[i], f"model.layers.{i}."
        for path, style in TP_PLAN.items():
            name = prefix + path
            if style == "colwise":
                cell = ColumnParallelLinear(shard(name + ".weight"), dtype)
            elif style == "rowwise":
                bias = np.asarray(weights[name + ".bias"], np.float32) if _get_submodule(layer, path).has_bias \
                    else None
                cell = RowParallelLinear(shard(name + ".weight"), bias, tp_group, sp, dtype)
            else:
                norm = _get_submodule(layer, path)
                cell = RegionEntryNorm(shard(name + ".weight"), norm.eps, tp_group, sp, norm.use_fused)
            _set_submodule(layer, path, cell)
    if not isinstance(model.model.tok_embeddings, Absent):
        model.model.tok_embeddings = VocabParallelEmbedding(shard("model.tok_embeddings.embedding_weight"),
                                                            tp_group, sp, dtype)
    if not isinstance(model.lm_head, Absent):
        norm = model.model.norm_out
        model.model.norm_out = RegionEntryNorm(shard("model.norm_out.weight"), norm.eps, tp_group, sp,
                                               norm.use_fused)
        model.lm_head = VocabParallelHead(shard("lm_head.weight"), tp_group, dtype)


def apply_context_parallel(model, groups: ParallelGroups, layer_range: Tuple[int, int]) -> None:
    """Each attention's core (`attend`) becomes RingAttention over the cp group; the attention mask is
    implied by the zig-zag layout (causal, no padding)."""
    for i in range(*layer_range):
        attention = model.model.layers[i].attention
        ring = RingAttention(groups.cp, default_scale(attention.head_dim))
        attention.ring = ring

        def attend(q, k, v, allowed, ring=ring):
            out, _ = ring(q, k, v)  # [B,n,S_local,d]
            batch, heads, seq, dim = out.shape
            return ops.cast(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (batch, seq, heads * dim)), q.dtype)

        attention.attend = attend


def _rename_parameters(model: nn.Cell) -> None:
    """Parameter.name = its path (MindFormers names), also for cells swapped in after construction."""
    for name, param in model.parameters_and_names():
        param.name = name


def parallelize_telechat2(model, dims: ParallelDims, weights: Optional[Mapping[str, np.ndarray]] = None,
                          groups: Optional[ParallelGroups] = None) -> "TelechatParallel":
    """Rewrite `model` (a plain Telechat2ForCausalLM holding the full weights, or `weights` name -> full
    array) for this rank of `dims`. Call comm.init_distributed() first (not needed for a world of 1)."""
    dims.check_model(model.config)
    groups = groups or build_groups(dims)
    if weights is None:
        weights = {name: p.asnumpy() for name, p in model.parameters_and_names()}
    stage = groups.coords.pp
    layer_range = apply_pipeline_split(model, dims, stage)
    apply_tensor_parallel(model, weights, groups, layer_range)
    if dims.cp > 1:
        apply_context_parallel(model, groups, layer_range)
    _rename_parameters(model)
    return TelechatParallel(model, groups, layer_range)


class TelechatParallel:
    """A parallelized model plus the training step of its layout."""

    def __init__(self, model, groups: ParallelGroups, layer_range: Tuple[int, int]):
        self.model = model
        self.groups = groups
        self.dims = groups.dims
        self.layer_range = layer_range
        self.stage = groups.coords.pp
        self.first_stage = self.stage == 0
        self.last_stage = self.stage == self.dims.pp - 1

    @property
    def params(self) -> List:
        return list(self.model.trainable_params())

    # ---- data ---------------------------------------------------------------------------------------------
    def local_batch(self, array: np.ndarray) -> np.ndarray:
        """This rank's rows (dp) and zig-zag positions (cp) of a global [B, S] array."""
        dims, c = self.dims, self.groups.coords
        rows = array.shape[0] // dims.dp
        local = array[c.dp * rows:(c.dp + 1) * rows]
        if dims.cp > 1:
            local = local[:, zigzag_positions(array.shape[1], c.cp, dims.cp)]
        return local

    def _micro_batches(self, array: np.ndarray) -> List[np.ndarray]:
        return np.split(self.local_batch(array), self.dims.micro_batch_num, axis=0)

    # ---- one step -----------------------------------------------------------------------------------------
    def forward_backward(self, input_ids: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray):
        """Global [B, S] inputs, next-token labels and loss mask -> (global loss, this rank's gradients,
        reduced over replicas; same order as `params`)."""
        dims, groups, cfg = self.dims, self.groups, self.model.config
        batch, seq = input_ids.shape
        dims.check_batch(batch, seq)
        ids_mb = [Tensor(a.astype(np.int32)) for a in self._micro_batches(input_ids)]
        labels_mb = [Tensor(a.reshape(-1).astype(np.int32)) for a in self._micro_batches(labels)]
        mask_mb = [Tensor(a.reshape(-1).astype(np.float32)) for a in self._micro_batches(loss_mask)]
        tokens = comm.all_reduce(Tensor(np.float32(self.local_batch(loss_mask).sum())), groups.grad)
        micro = batch // dims.dp // dims.micro_batch_num
        local_seq = seq // dims.cp
        positions = (zigzag_positions(seq, groups.coords.cp, dims.cp) if dims.cp > 1
                     else np.arange(seq, dtype=np.int32))
        inv_freq, mscale = rope_inputs(seq, cfg.head_dim, cfg)  # NTK from the global length
        position_ids = Tensor(np.broadcast_to(positions, (micro, local_seq)).astype(np.int32))
        allowed = Tensor(np.tril(np.ones((local_seq, local_seq), bool))[None, None])  # [1,1,S,S] (not cp)
        layers = [self.model.model.layers[i] for i in range(*self.layer_range)]
        backbone, head = self.model.model, self.model.lm_head

        def forward(i: int, h):
            cos, sin = backbone.rotary(position_ids, inv_freq, mscale)  # [mb,1,S_local,d]
            if self.first_stage:
                h = backbone.tok_embeddings(ids_mb[i])  # [mb, S_local(/tp), H]
            for layer in layers:
                h, _ = layer(h, cos, sin, allowed)
            if not self.last_stage:
                return h
            local_logits = head.local_logits(backbone.norm_out(h))  # [mb, S_local, V/tp]
            ce = vocab_parallel_cross_entropy(ops.reshape(local_logits, (-1, local_logits.shape[-1])),
                                              labels_mb[i], groups.tp)  # [mb*S_local]
            return (ce * mask_mb[i]).sum() / tokens

        act_seq = local_seq // dims.tp if dims.seq_parallel else local_seq
        stage_fns = StageFunctions(forward, self.params, (micro, act_seq, cfg.hidden_size))
        loss, grads = run_pipeline(stage_fns, groups.pp, dims.micro_batch_num)
        grads = reduce_gradients(self.params, grads, groups.grad, groups.tp)
        return self._global_loss(loss), grads

    def _global_loss(self, local_loss) -> float:
        """Sum the replicas' loss shares and hand the value from the last stage to every stage."""
        loss = local_loss if local_loss is not None else Tensor(np.float32(0.0))
        loss = comm.all_reduce(loss, self.groups.grad)
        loss = comm.broadcast(loss, self.groups.pp, root=self.dims.pp - 1)
        return float(loss.asnumpy())

    def train_step_sgd(self, input_ids, labels, loss_mask, learning_rate: float) -> float:
        loss, grads = self.forward_backward(input_ids, labels, loss_mask)
        sgd_step(self.params, grads, learning_rate)
        return loss

    def train_step(self, input_ids, labels, loss_mask, optimizer) -> float:
        """One step with a MindSpore optimizer built over `self.params` (e.g. nn.AdamWeightDecay; it is
        element-wise, so sharded parameters update exactly like their full tensors)."""
        loss, grads = self.forward_backward(input_ids, labels, loss_mask)
        optimizer(tuple(grads))
        return loss

    def grad_norm(self, grads) -> float:
        """Global gradient norm over every shard and stage (replicas counted once; parallel/optimizer.py)."""
        return global_grad_norm(self.params, grads, self.groups)

    def make_adamw(self, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0) -> ParallelAdamW:
        """AdamW over `params`, its states sharded over dp when dims.optimizer_shard is set."""
        return ParallelAdamW(self.params, self.groups.dp, self.dims.optimizer_shard, beta1, beta2, eps, weight_decay)

    def train_step_adamw(self, input_ids, labels, loss_mask, optimizer: ParallelAdamW, learning_rate: float,
                         step: int, grad_clip: float = 0.0) -> Tuple[float, float]:
        """One step: gradients, global-norm clipping to `grad_clip` (0: off), AdamW. -> (loss, grad norm)."""
        loss, grads = self.forward_backward(input_ids, labels, loss_mask)
        norm = self.grad_norm(grads)
        optimizer.step(grads, learning_rate, step, clip_coefficient(norm, grad_clip))
        return loss, norm

    def local_state(self) -> Dict[str, np.ndarray]:
        """name -> this rank's (sharded) parameter values."""
        return {name: p.asnumpy() for name, p in self.model.parameters_and_names()}
