"""Apply a parallel layout to a plain Telechat2ForCausalLM (torchtitan / gpt-fast style: the model files
contain no parallel code; this module rewrites the model in place).

`parallelize_telechat2(model, dims)` applies, in order:
1. pipeline split: layers outside this stage's range, and the embedding (not first stage) or the final
   norm and lm_head (not last stage), are replaced by empty placeholders; parameter names keep their
   global layer index (`model.layers.{i}...`) on every stage; with tied embeddings over several stages the
   last stage's lm_head holds a copy of the embedding (kept equal through the embed group, never saved);
2. tensor (+ sequence) parallel, by parallel/plan.TP_PLAN over the decoder-layer cells: column-parallel
   wq, wk_v, w1, w3; row-parallel wo, w2; region-entry norms; vocab-parallel embedding and lm_head. Each
   new cell gets this rank's slice from `weights.shard(name, tp, tp_rank)` (checkpoint.Weights: read slice by
   slice from a checkpoint, or cut from the model's own values), in definition order;
3. context parallel: each attention's core becomes RingAttention over the cp group (zig-zag layout).
So the model may be a lazy skeleton (build.py): the cells of other stages and the full-width cells are
dropped before their weights are ever materialised. It returns a `TelechatParallel`: forward + backward
of one step (1F1B over micro-batches, gradient reduction over data/context replicas), the global gradient
norm, and this rank's state; its `.model` is a drop-in for generation when only tp is used.

Training data: every rank passes the same global batch (numpy); each rank takes its dp rows, its zig-zag
cp positions and splits them into micro-batches. The loss is MindFormers': sum(ce * mask) / sum(mask)
over the global batch, so every layout reproduces the single-process loss and gradients.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms.parallel import comm
from telechat2_ms.parallel.data_parallel import global_grad_norm, reduce_gradients
from telechat2_ms.parallel.dims import ParallelDims, ParallelGroups, build_groups
from telechat2_ms.parallel.experts import GlobalAuxLoss, apply_expert_parallel, expert_range, use_static_dispatch
from telechat2_ms.layers import fill_parameter
from telechat2_ms.parallel.layers import (ColumnParallelLinear, RegionEntryNorm, RowParallelLinear,
                                          VocabParallelCrossEntropy, VocabParallelEmbedding, VocabParallelHead, mark_kv_copy,
                                          mark_tied_copy)
from telechat2_ms.parallel.pipeline import StageFunctions, run_pipeline
from telechat2_ms.parallel.plan import TP_PLAN, kv_replicas, shard_tensor
from telechat2_ms.parallel.ring_attention import RingAttention, default_scale, zigzag_positions
from telechat2_ms.config import ConfigError
from telechat2_ms.model import layer_masks, mask_tensors
from telechat2_ms.rope import rope_inputs

EMBEDDING = "model.tok_embeddings.embedding_weight"


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


def _find_submodule(root: nn.Cell, path: str) -> Optional[nn.Cell]:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


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


def apply_tensor_parallel(model, weights, groups: ParallelGroups, layer_range: Tuple[int, int]) -> None:
    """Swap in this rank's tensor-parallel cells, their slices read from `weights` (checkpoint.Weights) in
    definition order: embedding, layers, final norm, lm_head."""
    dims, tp_group = groups.dims, groups.tp
    tp, tp_rank, sp = dims.tp, groups.coords.tp, dims.seq_parallel
    dtype = model.compute_dtype

    kv_heads = model.config.num_kv_heads

    def shard(name):
        return weights.shard(name, tp, tp_rank, kv_heads)

    if not isinstance(model.model.tok_embeddings, Absent):
        model.model.tok_embeddings = VocabParallelEmbedding(shard(EMBEDDING),
                                                            tp_group, sp, dtype)
    for i in range(*layer_range):
        layer, prefix = model.model.layers[i], f"model.layers.{i}."
        for path, style in TP_PLAN.items():
            name = prefix + path
            if layer.sparse and path.startswith(("ffn_norm", "feed_forward.")):  # parallel/experts.py's
                if path == "ffn_norm":  # the MoE block's input is not a tp region: a plain, whole norm
                    fill_parameter(layer.ffn_norm.weight, weights.full(name + ".weight"))
                continue
            original = _find_submodule(layer, path)
            if original is None:  # a cell of another family's layout (wk_v vs wk / wv)
                continue
            if style == "colwise":
                cell = ColumnParallelLinear(shard(name + ".weight"), dtype,
                                            shard(name + ".bias") if original.has_bias else None)
                copies = kv_replicas(name + ".weight", tp, kv_heads)
                if copies > 1:  # this rank holds one of `copies` copies of its kv head (plan.py)
                    for param in cell.get_parameters():
                        mark_kv_copy(param, copies)
            elif style == "rowwise":
                weight = shard(name + ".weight")
                bias = weights.full(name + ".bias") if _get_submodule(layer, path).has_bias else None
                cell = RowParallelLinear(weight, bias, tp_group, sp, dtype)
            else:
                norm = _get_submodule(layer, path)
                cell = RegionEntryNorm(shard(name + ".weight"), norm.eps, tp_group, sp, norm.use_fused)
            _set_submodule(layer, path, cell)
    if not isinstance(model.lm_head, Absent):
        norm = model.model.norm_out
        model.model.norm_out = RegionEntryNorm(shard("model.norm_out.weight"), norm.eps, tp_group, sp,
                                               norm.use_fused)
        if model.config.tie_word_embeddings and not isinstance(model.model.tok_embeddings, Absent):
            # pp = 1: the embedding's own Parameter serves as the head
            model.lm_head = VocabParallelHead(None, tp_group, dtype, tied_to=model.model.tok_embeddings)
        elif model.config.tie_word_embeddings:
            # the last of several stages: a copy of the embedding's shard (Megatron's word-embedding copy), read
            # from the same weights, its gradient summed with the embedding's over the embed group, so both stay equal
            model.lm_head = VocabParallelHead(shard(EMBEDDING), tp_group, dtype)
            mark_tied_copy(model.lm_head.weight)
        else:
            model.lm_head = VocabParallelHead(shard("lm_head.weight"), tp_group, dtype)


def apply_context_parallel(model, groups: ParallelGroups, layer_range: Tuple[int, int]) -> None:
    """Each attention's core (`attend`) becomes RingAttention over the cp group; the attention mask is
    implied by the zig-zag layout (causal, no padding)."""
    for i in range(*layer_range):
        attention = model.model.layers[i].attention
        attention.ring = RingAttention(groups.cp, default_scale(attention.head_dim))


def _rename_parameters(model: nn.Cell) -> None:
    """Parameter.name = its path (MindFormers names), also for cells swapped in after construction."""
    for name, param in model.parameters_and_names():
        param.name = name


def parallelize_telechat2(model, dims: ParallelDims, weights=None,
                          groups: Optional[ParallelGroups] = None) -> "TelechatParallel":
    """Rewrite `model` (a plain Telechat2ForCausalLM, possibly a lazy skeleton) for this rank of `dims`, its
    weights from `weights` (a checkpoint.Weights or a name -> full array mapping; None: the model's own
    values, which must then be real). Call comm.init_distributed() first (not needed for a world of 1)."""
    from telechat2_ms.checkpoint import ArrayWeights, Weights, check_state_matches

    dims.check_model(model.config)
    groups = groups or build_groups(dims, tied=model.config.tie_word_embeddings,
                                    experts=bool(model.config.num_experts))
    if weights is None:
        weights = ArrayWeights(dict(model.parameters_and_names()), "the model's own weights")
    elif not isinstance(weights, Weights):
        weights = ArrayWeights(weights)
    check_state_matches({name: tuple(p.shape) for name, p in model.parameters_and_names()}, weights.shapes(),
                        weights.path)
    stage = groups.coords.pp
    layer_range = apply_pipeline_split(model, dims, stage)
    apply_tensor_parallel(model, weights, groups, layer_range)
    if model.config.num_experts:
        apply_expert_parallel(model, weights, groups, layer_range)
    if dims.cp > 1:
        apply_context_parallel(model, groups, layer_range)
    _rename_parameters(model)
    return TelechatParallel(model, groups, layer_range)


def apply_lora_adapters(parallel: "TelechatParallel", draws, rank: int, alpha: float) -> List[str]:
    """LoRA on this rank's projections (parallel/layers._LoRA), the rest frozen; returns the adapter names.
    `draws`: (projection path, initial A [r, in]) for every layer and target in order (train/lora.lora_a_draws,
    the single-process initialisation); this stage keeps its layers' draws and this tp rank its slice of them."""
    model, dims, tp_rank = parallel.model, parallel.dims, parallel.groups.coords.tp
    first, end = parallel.layer_range
    for path, lora_a in draws:
        layer = int(path.split(".")[2])
        if not first <= layer < end:
            continue
        if kv_replicas(path + ".weight", dims.tp, model.config.num_kv_heads) > 1:
            raise ConfigError(f"LoRA on {path}: its kv heads are copied over tp={dims.tp} ranks, which LoRA under "
                              "msrun does not support; leave wk_v out of train.lora_targets")
        cell = _get_submodule(model.model.layers[layer], path.split(".", 3)[3])
        a = lora_a if isinstance(cell, ColumnParallelLinear) else shard_tensor(path + ".lora_a", lora_a, dims.tp,
                                                                               tp_rank)
        cell.add_lora(a, np.zeros((cell.out_features, rank), np.float32), alpha / rank)
    _rename_parameters(model)
    names = []
    for name, param in model.parameters_and_names():
        param.requires_grad = name.endswith((".lora_a", ".lora_b"))
        if param.requires_grad:
            names.append(name)
    return names


def merged_state(model) -> Dict[str, object]:
    """This rank's checkpoint tensors with every LoRA adapter folded into its projection's slice (the names of
    the plain model, as train/lora.merged_state gives in one process)."""
    from telechat2_ms.checkpoint import model_state

    state = {}
    for name, param in model_state(model).items():
        if name.endswith((".lora_a", ".lora_b")):
            continue
        cell = _find_submodule(model, name[:-len(".weight")]) if name.endswith(".weight") else None
        state[name] = cell.merged_weight() if getattr(cell, "has_lora", False) else param
    return state


class StageForward(nn.Cell):
    """One micro-batch through this rank's pipeline stage, from Tensors only, so that it compiles under ms.jit:
    cell(x, (ids, labels, mask, position_ids, inv_freq, mscale, allowed, tokens, aux_weight)) -> (out, local, share).
    x: the previous stage's activations (the first stage embeds ids instead); out: the activations for the next
    stage, or on the last stage the micro-batch loss sum(ce * mask) / tokens (+ local); share: the MoE
    load-balancing share of this stage's layers over the global micro-batch (parallel/experts.py; 0 without sparse
    layers), local = share x aux_weight. Holds the model's cells without renaming their parameters."""

    def __init__(self, parallel: "TelechatParallel"):
        super().__init__(auto_prefix=False)
        model = parallel.model
        self.backbone, self.head = model.model, model.lm_head
        self.layer_range = parallel.layer_range
        self.first, self.last = parallel.first_stage, parallel.last_stage
        self.sparse = any(model.model.layers[i].sparse for i in range(*parallel.layer_range))
        self.aux = GlobalAuxLoss(model.config, parallel.groups.grad)
        self.cross_entropy = VocabParallelCrossEntropy(parallel.groups.tp)

    def construct(self, x, inputs):
        ids, labels, mask, position_ids, inv_freq, mscale, allowed, tokens, aux_weight = inputs
        cos, sin = self.backbone.rotary(position_ids, inv_freq, mscale)  # [mb,1,S_local,d]
        h = self.backbone.tok_embeddings(ids) if self.first else x  # [mb, S_local(/tp), H]
        stats = ()
        for i in range(self.layer_range[0], self.layer_range[1]):
            layer = self.backbone.layers[i]
            if layer.sparse:
                h, _, assigned, mass = layer(h, cos, sin, allowed)
                stats = stats + ((assigned, mass),)
            else:
                h, _ = layer(h, cos, sin, allowed)
        share = self.aux(stats, position_ids.shape[0] * position_ids.shape[1]) if self.sparse else \
            ops.zeros((), ms.float32)
        local = share * aux_weight
        if not self.last:
            return h, local, ops.stop_gradient(share)
        local_logits = self.head.local_logits(self.backbone.norm_out(h))  # [mb, S_local, V/tp]
        ce = self.cross_entropy(ops.reshape(local_logits, (-1, local_logits.shape[-1])), labels)  # [mb*S_local]
        return (ce * mask).sum() / tokens + local, local, ops.stop_gradient(share)


class TelechatParallel:
    """A parallelized model, its groups and the forward + backward of one step of its layout."""

    def __init__(self, model, groups: ParallelGroups, layer_range: Tuple[int, int]):
        self.model = model
        self.groups = groups
        self.dims = groups.dims
        self.layer_range = layer_range
        self.stage = groups.coords.pp
        self.first_stage = self.stage == 0
        self.last_stage = self.stage == self.dims.pp - 1
        self.aux_losses: List[float] = []
        self.compiled = False  # run each stage's forward and backward as compiled graphs (settings.jit)
        self._stage_fns: Optional[StageFunctions] = None
        config = model.config
        self.expert_range = (expert_range(config.num_experts, self.dims.ep, groups.ep.rank) if config.num_experts
                             else (0, 0))  # the experts this rank holds

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
    def forward_backward(self, input_ids: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray,
                         tokens: Optional[float] = None, aux_weight: Optional[float] = None):
        """Global [B, S] inputs, next-token labels and loss mask -> (global loss, this rank's gradients,
        reduced over replicas; same order as `params`). The loss is divided by `tokens` (the targets of a
        whole accumulated step), default the targets of this batch. A mixture-of-experts model adds the
        load-balancing loss of every global micro-batch x `aux_weight` (default 1 / micro_batch_num: their mean;
        parallel/experts.py), each pipeline stage that of its own layers."""
        dims, groups, cfg = self.dims, self.groups, self.model.config
        batch, seq = input_ids.shape
        dims.check_batch(batch, seq)
        ids_mb = [Tensor(a.astype(np.int32)) for a in self._micro_batches(input_ids)]
        labels_mb = [Tensor(a.reshape(-1).astype(np.int32)) for a in self._micro_batches(labels)]
        mask_mb = [Tensor(a.reshape(-1).astype(np.float32)) for a in self._micro_batches(loss_mask)]
        tokens = (comm.all_reduce(Tensor(np.float32(self.local_batch(loss_mask).sum())), groups.grad)
                  if tokens is None else Tensor(np.float32(tokens)))
        micro = batch // dims.dp // dims.micro_batch_num
        local_seq = seq // dims.cp
        positions = (zigzag_positions(seq, groups.coords.cp, dims.cp) if dims.cp > 1
                     else np.arange(seq, dtype=np.int32))
        inv_freq, mscale = rope_inputs(seq, cfg.head_dim, cfg)  # NTK from the global length
        position_ids = Tensor(np.broadcast_to(positions, (micro, local_seq)).astype(np.int32))
        # [1,1,S,S] (not cp; sliding-window layers get their pair, model.layer_masks, which settings refuse with cp)
        masks = layer_masks(cfg, np.tril(np.ones((local_seq, local_seq), bool))[None, None], np.arange(local_seq),
                            local_seq)
        allowed = mask_tensors(masks)
        aux_weight = 1.0 / dims.micro_batch_num if aux_weight is None else aux_weight
        step_inputs = (position_ids, inv_freq, mscale, allowed, tokens, Tensor(np.float32(aux_weight)))
        stage_fns = self._stage_functions((micro, local_seq // dims.tp if dims.seq_parallel else local_seq,
                                           cfg.hidden_size))
        stage_fns.begin(lambda i: (ids_mb[i], labels_mb[i], mask_mb[i]) + step_inputs)
        loss, grads = run_pipeline(stage_fns, groups.pp, dims.micro_batch_num)
        aux_shares = stage_fns.shares  # micro-batch -> this rank's aux share (read once the step is done)
        self.aux_losses = []  # the load-balancing loss of each micro-batch (MoE; before aux_weight), every stage's
        earlier_stages = 0.0  # what the stages before the last added to the loss (their layers' aux shares)
        if cfg.num_experts:  # every rank of the layout takes part (a stage may hold no sparse layer)
            shares = np.array([float(aux_shares[i].asnumpy()) * groups.grad.size if i in aux_shares else 0.0
                               for i in range(dims.micro_batch_num)], np.float32)  # this stage's, whole batch
            if dims.pp > 1:
                mine = 0.0 if self.last_stage else float(shares.sum()) * aux_weight
                both = comm.all_reduce(Tensor(np.array([*shares, mine], np.float32)), groups.pp).asnumpy()
                shares, earlier_stages = both[:-1], float(both[-1])
            self.aux_losses = [float(v) for v in shares]
        grads = reduce_gradients(self.params, grads, groups.grad, groups.tp, groups.expert_grad)
        self._sum_tied_gradients(grads)
        return self._global_loss(loss) + earlier_stages, grads

    def _stage_functions(self, activation_shape) -> StageFunctions:
        """This stage's forward / backward, built at the first step (after LoRA has set which parameters train).
        Compiled with context parallel too, unless RingAttention's ring steps are HCCL sends (Ascend: MindSpore
        sends them op by op only); a compiled MoE layer dispatches by all-gather (shapes independent of the
        routing)."""
        compiled = self.compiled and (self.dims.cp == 1 or not comm.uses_send_recv())
        if self._stage_fns is None:
            if compiled and self.model.config.num_experts:
                use_static_dispatch(self.model)
            self._stage_fns = StageFunctions(StageForward(self), self.params, activation_shape,
                                             self.model.compute_dtype, self.first_stage, self.last_stage, compiled)
        self._stage_fns.activation_shape = tuple(activation_shape)
        return self._stage_fns

    def _sum_tied_gradients(self, grads) -> None:
        """Tied embeddings over several stages: the embedding (first stage) and its copy in lm_head (last stage)
        each get the sum of both gradients, so the two stay equal after every update."""
        if self.groups.embed.size == 1:
            return
        for i, p in enumerate(self.params):
            if p.name == EMBEDDING or getattr(p, "tied_copy", False):
                grads[i] = comm.all_reduce(grads[i], self.groups.embed)

    def _global_loss(self, local_loss) -> float:
        """Sum the replicas' loss shares and hand the value from the last stage to every stage."""
        loss = local_loss if local_loss is not None else Tensor(np.float32(0.0))
        loss = comm.all_reduce(loss, self.groups.grad)
        loss = comm.broadcast(loss, self.groups.pp, root=self.dims.pp - 1)
        return float(loss.asnumpy())

    def grad_norm(self, grads) -> float:
        """Global gradient norm over every shard and stage (replicas counted once; data_parallel.py)."""
        return global_grad_norm(self.params, grads, self.groups)

    def local_state(self) -> Dict[str, np.ndarray]:
        """name -> this rank's (sharded) parameter values (what its checkpoint file holds: no tied copy)."""
        from telechat2_ms.checkpoint import model_state

        return {name: p.asnumpy() for name, p in model_state(self.model).items()}
