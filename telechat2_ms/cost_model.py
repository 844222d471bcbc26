"""Memory and step-time cost model for TeleChat2 on Atlas 800T A2 (Ascend 910B), and a check against
MindFormers' published fine-tune throughputs.

What it predicts, per device, for a model size (telechat2_ms.config) and a parallel `Layout`
(dp, tp, pp, cp, sequence parallel, micro-batches, micro-batch size, sequence length, recompute,
optimizer-state sharding, dtype):
  * memory: weights, gradients, optimizer states, activations (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", adapted to SwiGLU, GQA, FlashAttention, an
    fp32 residual stream and the 1F1B in-flight micro-batch count), the logits/loss working set, the KV
    cache for inference and a stated framework overhead; layouts over the usable HBM are flagged;
  * step time and tokens/s per device: FLOPs (6N per token plus causal attention, plus recompute),
    TP/SP collectives, pipeline bubble and point-to-point sends, data-parallel gradient reduction and the
    AdamW update, over the bandwidths stated in `ATLAS_800T_A2`.

One constant is fitted: `efficiency`, the fraction of the cube peak reached on model compute. It is
solved so that the 7B MindFormers layout reproduces its published 2950 tokens/s/p; the 35B and 115B
figures are then predictions (held out), and their errors are what the check reports.

Run from the repository root:
    python -m telechat2_ms.cost_model --all
    python -m telechat2_ms.cost_model --config configs/telechat2_7b/finetune.yaml
    python -m telechat2_ms.cost_model --model telechat2_115b --dp 8           # an ad-hoc layout
(`python telechat2_ms/cost_model.py ...` works too once the project is pip-installed.)
"""
from __future__ import annotations

import functools
import math
import pathlib
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from telechat2_ms.config import ConfigError, ModelConfig, get_config
from telechat2_ms.parallel.plan import stage_layer_ranges
from telechat2_ms.settings import TRAIN_RUN_MODES, RunSettings, load_settings

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
RECOMPUTE_MODES = ("none", "selective", "full")


# ---- hardware ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """Per-device figures of one accelerator type. Bandwidths are bytes/s in one direction."""

    name: str
    peak_flops: float  # dense fp16/bf16 cube FLOP/s
    hbm_bytes: float
    reserved_bytes: float  # HBM the framework's pool never gets (driver, runtime, HCCL, fragmentation slack)
    hbm_bandwidth: float  # used only for the memory-bound AdamW update
    devices_per_node: int
    hccs_link_bandwidth: float  # one full-mesh link between two NPUs of a node
    roce_port_bandwidth: float  # the one RoCE port each NPU owns, for inter-node traffic
    collective_efficiency: float  # achieved fraction of line rate for large collectives / sends

    @property
    def usable_bytes(self) -> float:
        return self.hbm_bytes - self.reserved_bytes


# Atlas 800T A2: 8 Ascend 910B NPUs per node.
# * Peak: Ascend910B2 CANN platform config (https://gitcode.com/W4termy/runtime/blob/master/src/platform/
#   platform_config/Ascend910B2C.ini) lists cube_core_cnt=24, cube_freq=1800 (MHz) and a 16x16x16 cube,
#   i.e. 24 * 4096 MAC * 2 FLOP * 1.8e9 = 353.9 TFLOPS fp16/bf16. Public figures for the 910B family range
#   from 280 TFLOPS (https://ai.gitee.com/docs/compute/clusters_gpu/ascend_gpu) to ~320 TFLOPS
#   (https://boardor.com/blog/huawei-ascend-910b-outperforms-h20-910c-approaches-h100) and 376 TFLOPS per
#   910C die (http://news.43b.com.cn/a/619517.html), depending on SKU (910B1/B2/B3). The fitted efficiency
#   absorbs the SKU: only the reported MFU depends on this number, not the predicted tokens/s.
# * HBM: 64 GB HBM2e per 910B (https://ai.gitee.com/docs/compute/clusters_gpu/ascend_gpu); npu-smi reports
#   65536 MB, so 64 GiB. Reserved 6 GiB: MindFormers caps its pool at max_device_memory 58GB on this machine
#   (telechat2 finetune yamls, spec section 7.1); we keep the same budget.
# * HCCS: 8-NPU full mesh, each NPU directly linked to the 7 others, 56 GB/s per link quoted from
#   unofficial sources, 392 GB/s aggregate (https://www.meemx.com/p/hccl-contest-log-overall). Not stated
#   whether 56 GB/s is per direction; we take it as bidirectional, 28 GB/s each way (the slower reading).
# * RoCE: 8 NPU network ports per Atlas 800T A2 node, one per NPU (https://www.hiascend.com/document/detail/
#   zh/mindcluster/730/deployer/deployerug/deployer_0025.html); 200 Gb/s each (issue 7 brief; the same
#   200 Gbps RDMA per die is published for 910C in http://news.43b.com.cn/a/619517.html) = 25 GB/s.
# * Collective efficiency 0.8: large-message collectives reach ~80% of line rate (NCCL maintainers: 450 GB/s
#   NVLink line rate, ~370 GB/s effective, https://github.com/NVIDIA/nccl-tests/issues/212). Assumed for HCCL.
# * HBM bandwidth 1.6 TB/s: assumption (not found in a stored public spec); it only prices the AdamW update.
ATLAS_800T_A2 = Hardware(
    name="Atlas 800T A2 (Ascend 910B, 8 NPUs/node)",
    peak_flops=24 * 16 ** 3 * 2 * 1.8e9,
    hbm_bytes=64 * GIB,
    reserved_bytes=6 * GIB,
    hbm_bandwidth=1.6e12,
    devices_per_node=8,
    hccs_link_bandwidth=28e9,
    roce_port_bandwidth=200e9 / 8,
    collective_efficiency=0.8,
)

# Framework overhead inside the pool (assumption): 1 GiB for HCCL buffers and kernel workspaces plus 5%
# allocator fragmentation on top of activations and the logits working set.
OVERHEAD_FIXED_BYTES = 1 * GIB
OVERHEAD_FRAGMENTATION = 0.05
# FlashAttentionScore keeps softmax_max and softmax_sum of shape (B, N, S, 8) fp32 for backward
# (https://www.mindspore.cn/docs/en/stable/api_python/ops/mindspore.ops.flash_attention_score.html):
# 2 * 8 * 4 = 64 bytes per (token, head).
FA_STATS_BYTES_PER_TOKEN_HEAD = 64
# Activation bytes per decoder layer measured on the CPU (research/bench_recompute_memory.py, 2026-12-04, AMD EPYC,
# MindSpore 2.10 PyNative, fp32, plain kernels): hidden 256, 4 heads, ffn 768, batch 2, seq 1024; slope of peak
# RSS over 2 -> 10 layers less the layer's weights, gradient accumulators and AdamW moments (4 x 3149824 bytes;
# up to one more copy, the gradients being produced, may remain in). Under ms.jit the CPU runtime keeps the
# outputs of transposes and broadcasts, so there recompute saves nothing: 527392768 / 712345088 / 713286144 bytes
# per layer. Since kernels.tiled (2026-12-05) PyNative keeps 93.9 / 39.1 / 4.1 MiB (the tiled operands saved for
# the backward; README, recompute memory), 17-22% over these figures and the formula: left open.
MEASURED_CPU_LAYER_ACTIVATION = {
    "shapes": {"hidden_size": 256, "num_heads": 4, "ffn_hidden_size": 768, "vocab_size": 512,
               "micro_batch_size": 2, "seq_length": 1024},
    "layer_param_bytes": 3149824,
    "none": 80624128, "selective": 33594880, "full": 586752,
}


# ---- layout -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """One parallel layout. Devices = dp * tp * pp * cp; ranks are ordered tp (innermost), cp, dp, pp."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False  # Megatron sequence parallelism inside the TP group
    micro_batches: int = 1  # pipeline micro-batches per step (MindFormers micro_batch_num)
    micro_batch_size: int = 1  # sequences per micro-batch (train.batch_size)
    grad_accum: int = 1  # optimizer step every grad_accum pipeline flushes
    seq_length: int = 8192
    recompute: str = "none"  # none | selective | full
    optimizer_shard: bool = False  # shard fp32 master weights + AdamW m, v over dp*cp (ZeRO-1)
    compute_dtype: str = "bfloat16"
    fused_kernels: bool = True  # use_fused_kernels: FlashAttentionScore etc. (Ascend); False: the plain kernels
    layer_counts: Tuple[int, ...] = ()  # layers per pipeline stage; empty = even split
    pp_interleave: int = 1  # virtual stages per device (MindFormers pp_interleave_num; ours has none)
    mode: str = "train"  # train | infer
    infer_batch: int = 1  # sequences decoded together (infer mode; serve: serve.max_batch rows of KV cache)
    prefill_batch: int = 0  # sequences prefilled together (0: infer_batch; serve prefills one prompt at a time)
    ep: int = 1  # expert parallel (mixture of experts): experts split over blocks of ep data-parallel ranks
    # how an MoE layer's experts see the tokens: "dense", each token sent (all-to-all) to the ep ranks holding one
    # of its experts and every expert of a rank run on every token it received, weighted by 0 where not chosen
    # (this project's training path: parallel/experts.py, no grouped-matmul kernel yet); "routed", each token only
    # on its k experts (grouped matmul and all-to-all, MindFormers), capacity_factor x the routed work
    moe_dispatch: str = "dense"
    capacity_factor: float = 1.0

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def describe(self) -> str:
        parts = [f"dp{self.dp}{f' ep{self.ep}' if self.ep > 1 else ''} tp{self.tp} pp{self.pp} cp{self.cp}"]
        if self.sp:
            parts.append("sp")
        if self.mode == "train":
            parts.append(f"mb{self.micro_batches}x{self.micro_batch_size}")
            if self.grad_accum > 1:
                parts.append(f"ga{self.grad_accum}")
            if self.pp_interleave > 1:
                parts.append(f"vpp{self.pp_interleave}")
            parts.append(self.recompute)
            if self.optimizer_shard and self.dp * self.cp > 1:
                parts.append("zero1")
        else:
            parts.append(f"infer b{self.infer_batch}")
        return " ".join(parts)


def validate(cfg: ModelConfig, lay: Layout) -> None:
    """Raise ConfigError naming the first field of `lay` that cannot work for `cfg`."""
    for key in ("dp", "tp", "pp", "cp", "micro_batches", "micro_batch_size", "grad_accum", "seq_length",
                "pp_interleave", "infer_batch"):
        if int(getattr(lay, key)) < 1:
            raise ConfigError(f"layout.{key} must be >= 1, got {getattr(lay, key)}")
    if lay.mode not in ("train", "infer"):
        raise ConfigError(f"layout.mode must be train or infer, got {lay.mode!r}")
    if lay.recompute not in RECOMPUTE_MODES:
        raise ConfigError(f"layout.recompute must be one of {RECOMPUTE_MODES}, got {lay.recompute!r}")
    if lay.compute_dtype not in DTYPE_BYTES:
        raise ConfigError(f"layout.compute_dtype must be one of {sorted(DTYPE_BYTES)}, got {lay.compute_dtype!r}")
    if cfg.num_heads % lay.tp:
        raise ConfigError(f"tp={lay.tp} does not divide num_heads={cfg.num_heads}")
    if cfg.num_kv_heads % lay.tp and lay.tp % cfg.num_kv_heads:  # whole kv heads, or copies (plan.check_tp)
        raise ConfigError(f"tp={lay.tp} neither divides nor is a multiple of num_kv_heads={cfg.num_kv_heads}")
    if cfg.ffn_hidden_size % lay.tp or cfg.vocab_size % lay.tp:
        raise ConfigError(f"tp={lay.tp} must divide ffn_hidden_size and vocab_size")
    if lay.ep < 1 or lay.dp % lay.ep or (cfg.num_experts or 1) % lay.ep or (lay.ep > 1 and not cfg.num_experts):
        raise ConfigError(f"ep={lay.ep} must divide dp={lay.dp} and num_experts={cfg.num_experts}")
    if cfg.num_experts and (cfg.moe_ffn_hidden_size % lay.tp or cfg.shared_expert_ffn_hidden_size % lay.tp):
        raise ConfigError(f"tp={lay.tp} must divide the expert widths")
    if lay.moe_dispatch not in ("dense", "routed") or lay.capacity_factor <= 0:
        raise ConfigError(f"layout.moe_dispatch must be dense or routed (capacity_factor > 0), got "
                          f"{lay.moe_dispatch!r}, {lay.capacity_factor}")
    if lay.seq_length % (2 * lay.cp if lay.cp > 1 else 1):
        raise ConfigError(f"seq_length={lay.seq_length} must split into 2*cp={2 * lay.cp} zig-zag chunks")
    if lay.sp and (lay.seq_length // lay.cp) % lay.tp:
        raise ConfigError(f"sequence parallel needs seq_length/cp divisible by tp={lay.tp}")
    if lay.pp > 1 and lay.mode == "train" and lay.micro_batches < lay.pp:
        raise ConfigError(f"micro_batches={lay.micro_batches} < pp={lay.pp}: the pipeline would never fill")
    stage_layers(cfg, lay)  # raises on bad layer_counts


def stage_layers(cfg: ModelConfig, lay: Layout) -> List[int]:
    """Decoder layers held by each pipeline stage (summed over its virtual stages): the parallel plan's
    split (parallel/plan.stage_layer_ranges: pipeline_layer_counts, else even with the first stages taking
    one more)."""
    counts = [end - first for first, end in stage_layer_ranges(cfg.num_layers, lay.pp, list(lay.layer_counts) or None,
                                                                "pipeline_layer_counts")]
    if min(counts) < lay.pp_interleave:
        raise ConfigError(f"pipeline_layer_counts {counts}: every stage needs at least pp_interleave="
                          f"{lay.pp_interleave} layers")
    return counts


def layout_from_settings(settings: RunSettings) -> Layout:
    """The layout a YAML run describes (parallel_config, train.* and seq_length)."""
    pc = settings.parallel_config
    train = settings.run_mode in TRAIN_RUN_MODES
    return Layout(
        dp=pc.data_parallel, tp=pc.model_parallel, pp=pc.pipeline_stage, cp=pc.context_parallel,
        sp=pc.use_seq_parallel, micro_batches=pc.micro_batch_num if train else 1,
        micro_batch_size=settings.train.batch_size if train else 1,
        grad_accum=settings.train.grad_accum_steps if train else 1,
        seq_length=settings.seq_length, recompute=settings.train.recompute if train else "none",
        optimizer_shard=pc.optimizer_shard, compute_dtype=settings.compute_dtype,
        fused_kernels=settings.use_fused_kernels, layer_counts=tuple(pc.pipeline_layer_counts), mode="train" if train else "infer",
        infer_batch=settings.serve.max_batch if settings.run_mode == "serve" else 1,
        prefill_batch=1, ep=pc.expert_parallel,
    )


# ---- parameters -------------------------------------------------------------------------------------

def kv_local_dim(cfg: ModelConfig, tp: int) -> int:
    """Width of K (and of V) on one TP rank; kv heads are replicated when tp > num_kv_heads."""
    return max(cfg.num_kv_heads // tp, 1) * cfg.head_dim


def layer_params_per_device(cfg: ModelConfig, tp: int, layer: int = 0, ep: int = 1) -> int:
    """wq, wo, w1, w2, w3 split over tp; k and v split (or replicated) by kv head; q/k/v biases (Qwen2) split
    like their projections; wo/w2 biases (TeleChat2) and the two RMSNorm weights replicated, as
    parallel/plan.py shards them; an MoE layer (ModelConfig.is_sparse) holds the whole router, E/ep experts split
    over tp with their down biases whole, and Qwen2-MoE's tp-split shared expert with its whole gate. With tp=1
    and ep=1 this is the per-layer count of ModelConfig.num_parameters."""
    H, qd, kd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, kv_local_dim(cfg, tp)
    count = 2 * H * qd // tp + 2 * kd * H + 2 * H + H * int(cfg.out_bias)
    if cfg.qkv_bias:
        count += qd // tp + 2 * kd
    if not cfg.is_sparse(layer):
        return count + 3 * H * cfg.ffn_hidden_size // tp + H * int(cfg.down_bias)
    E, Fe, Fs = cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.shared_expert_ffn_hidden_size
    count += E * H + E // ep * (3 * H * Fe // tp + H * int(cfg.down_bias))
    return count + (3 * H * Fs // tp + H if Fs else 0)


def stage_params_per_device(cfg: ModelConfig, lay: Layout) -> List[int]:
    """Parameters one device of each stage holds: its layers, the vocab-parallel embedding on stage 0,
    the vocab-parallel lm_head and the final norm on the last stage (a tied lm_head is the embedding itself
    with one stage, a copy of it with several)."""
    vh = cfg.vocab_size * cfg.hidden_size // lay.tp
    counts, first = [], 0
    for i, n_layers in enumerate(stage_layers(cfg, lay)):
        n = sum(layer_params_per_device(cfg, lay.tp, layer, lay.ep) for layer in range(first, first + n_layers))
        first += n_layers
        if i == 0:
            n += vh
        if i == lay.pp - 1:
            n += (0 if cfg.tie_word_embeddings and lay.pp == 1 else vh) + cfg.hidden_size
        counts.append(n)
    return counts


# ---- memory -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemoryReport:
    """Bytes on one device of the worst pipeline stage."""

    stage: int
    weights: float  # compute-dtype copy used by the matmuls
    grads: float  # fp32 gradients
    optimizer: float  # fp32 master weights + AdamW m and v (sharded over dp*cp when optimizer_shard)
    activations: float  # saved for backward (train) or the prefill working set (infer)
    logits: float  # lm_head output + fp32 loss working set (last stage)
    kv_cache: float
    overhead: float

    @property
    def total(self) -> float:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits + self.kv_cache
                + self.overhead)

    def fits(self, hw: Hardware = ATLAS_800T_A2) -> bool:
        return self.total <= hw.usable_bytes


def layer_activation_bytes(cfg: ModelConfig, lay: Layout, recompute: str, layer: int = 0) -> float:
    """Bytes one layer keeps for backward, per micro-batch, on one device, as this project's layers and
    train.recompute do it (train/engine.apply_recompute).

    Korthikanti et al. count 34·sbh (+5·a·s²b for the score matrix) for a GPT layer. Our layer instead keeps,
    with T = b·s/cp tokens, a = compute-dtype bytes, fp32 residual stream (as MindFormers' res_dtype):
      attention (TP-split): Q, O (a·T·H each), K, V (a·T·kv each) and, with the fused kernels (Ascend),
      FlashAttentionScore's softmax statistics (64 bytes per token and head; no s² term); with the plain
      kernels (the CPU) instead the fp32 probabilities [b, n, s, s], q/sqrt(d), and RoPE's inputs and rotated
      halves of q and k;
      SwiGLU (TP-split): gate, up, silu(gate) and their product (a·T·F each);
      norm region: the two fp32 residual inputs of the RMSNorms (4·T·H each) and the two norm outputs
      (a·T·H each); split over tp only with sequence parallelism.
    selective: the attention block is recomputed in backward, so the layer keeps none of its attention
      tensors (its input, the first norm output, is counted in the norm region). This is not MindFormers'
      select_recompute, which recomputes the norms and the SwiGLU product and keeps the attention.
    full: only the fp32 layer input is stored (split over tp with sequence parallelism).
    Checked against the CPU in PyNative, plain kernels, fp32 (research/bench_recompute_memory.py: the slope
    of peak RSS over the layer count; MEASURED_CPU_LAYER_ACTIVATION holds its figures, and
    tests/test_cost_model.py holds this formula to them).
    An MoE layer (`layer` sparse) keeps, instead of the SwiGLU's four tensors per token, four per (token, expert)
    pair it computes (`expert_pairs_per_token`: E with the dense dispatch, k x capacity_factor routed) of the
    expert width, the pairs' outputs (a·H each) and the block's tokens as the experts see them (dense: the
    ep-gathered tokens; routed: the dispatched copies), the fp32 router logits and probabilities (8·E per token)
    and the shared expert's SwiGLU (not measured: an estimate by the same accounting).
    """
    H, F, tp = cfg.hidden_size, cfg.ffn_hidden_size, lay.tp
    a = DTYPE_BYTES[lay.compute_dtype]
    T = lay.micro_batch_size * lay.seq_length / lay.cp
    seq_split = tp if lay.sp else 1
    if recompute == "full":
        return 4 * T * H / seq_split
    norm_region = 2 * 4 * T * H + 2 * a * T * H
    tp_region = 4 * a * T * F / tp
    if cfg.is_sparse(layer):
        pairs = expert_pairs_per_token(cfg, lay)
        seen = expert_rows_per_token(cfg, lay)  # tokens (copies) the experts read, per token
        tp_region = (4 * a * T * (pairs * cfg.moe_ffn_hidden_size + cfg.shared_expert_ffn_hidden_size) / tp
                     + a * T * H * (pairs + seen) + 8 * T * cfg.num_experts)
    if recompute == "none":
        kv = kv_local_dim(cfg, tp)
        tp_region += T * (2 * a * H / tp + 2 * a * kv)
        if lay.fused_kernels:
            tp_region += T * FA_STATS_BYTES_PER_TOKEN_HEAD * cfg.num_heads / tp
        else:
            keys = lay.seq_length / lay.cp
            tp_region += T * (4 * keys * cfg.num_heads / tp + 3 * a * H / tp + 2 * a * kv)
    return tp_region + norm_region / seq_split


def expert_rows_per_token(cfg: ModelConfig, lay: Layout) -> float:
    """Rows an MoE layer's experts receive per token of a device (all-to-all): dense dispatch, one per ep rank
    holding one of the token's k experts, ep x (1 - C(E - E/ep, k) / C(E, k)) under uniform routing; routed,
    one per chosen expert, k x the capacity factor."""
    if lay.moe_dispatch == "dense":
        E, k = cfg.num_experts, cfg.num_experts_per_tok
        return lay.ep * (1.0 - math.comb(E - E // lay.ep, k) / math.comb(E, k))
    return cfg.num_experts_per_tok * lay.capacity_factor


def expert_pairs_per_token(cfg: ModelConfig, lay: Layout) -> float:
    """(token, expert) pairs an MoE layer computes per token: the E/ep experts of a rank on every row it received
    (dense dispatch), or k x the capacity factor (routed)."""
    if lay.moe_dispatch == "dense":
        return cfg.num_experts / lay.ep * expert_rows_per_token(cfg, lay)
    return cfg.num_experts_per_tok * lay.capacity_factor


def stage_layer_activation_bytes(cfg: ModelConfig, lay: Layout, stage: int, recompute: str) -> float:
    """The mean of layer_activation_bytes over the stage's layers (dense and MoE layers differ)."""
    first, end = stage_layer_ranges(cfg.num_layers, lay.pp, list(lay.layer_counts) or None,
                                    "pipeline_layer_counts")[stage]
    return sum(layer_activation_bytes(cfg, lay, recompute, i) for i in range(first, end)) / (end - first)


def in_flight_layer_units(lay: Layout, stage: int, n_layers: int) -> float:
    """Layer-activations (in units of one layer for one micro-batch) a stage holds at its peak under
    1F1B: min(m, pp - stage) micro-batches of its layers; with interleaving (Megatron's schedule) the
    warm-up runs 2·(pp-stage-1) + (v-1)·pp + 1 virtual-stage chunks of n_layers/v layers each."""
    p, v, m = lay.pp, lay.pp_interleave, lay.micro_batches
    if p == 1:
        return float(n_layers)
    if v == 1:
        return float(min(m, p - stage) * n_layers)
    chunks = min(m * v, 2 * (p - stage - 1) + (v - 1) * p + 1)
    return chunks * n_layers / v


def _train_stage_memory(cfg: ModelConfig, lay: Layout, stage: int, n_params: int, n_layers: int) -> MemoryReport:
    a = DTYPE_BYTES[lay.compute_dtype]
    shard = lay.dp * lay.cp if lay.optimizer_shard else 1
    acts = in_flight_layer_units(lay, stage, n_layers) * stage_layer_activation_bytes(cfg, lay, stage, lay.recompute)
    if lay.recompute == "full":  # the layer being recomputed in backward materialises all its activations
        acts += max(layer_activation_bytes(cfg, lay, "none", i) for i in range(cfg.num_layers))
    logits = 0.0
    if stage == lay.pp - 1:  # bf16 logits + fp32 logits + fp32 softmax/grad of one micro-batch, vocab-split
        T = lay.micro_batch_size * lay.seq_length / lay.cp
        logits = T * cfg.vocab_size / lay.tp * (a + 4 + 4)
    overhead = OVERHEAD_FIXED_BYTES + OVERHEAD_FRAGMENTATION * (acts + logits)
    return MemoryReport(stage=stage, weights=a * n_params, grads=4.0 * n_params,
                        optimizer=12.0 * n_params / shard, activations=acts, logits=logits, kv_cache=0.0,
                        overhead=overhead)


def _infer_stage_memory(cfg: ModelConfig, lay: Layout, stage: int, n_params: int, n_layers: int) -> MemoryReport:
    a = DTYPE_BYTES[lay.compute_dtype]
    H, F, tp = cfg.hidden_size, cfg.ffn_hidden_size, lay.tp
    kv = kv_local_dim(cfg, tp)
    T = lay.infer_batch * lay.seq_length / lay.cp  # every row's cache at full length
    kv_cache = 2 * n_layers * T * kv * a  # K and V, post-RoPE, compute dtype (spec 8.2)
    T = (lay.prefill_batch or lay.infer_batch) * lay.seq_length / lay.cp  # a full-length prefill
    # Largest live set during one prefill layer: fp32 residual, norm output, Q, K, V, attention output,
    # gate/up/product; logits only for the last position of each sequence (spec 8.2), fp32.
    if cfg.num_experts:  # the widest FFN working set: an MoE layer's (token, expert) pairs and shared expert
        ffn = 3 * a * (expert_pairs_per_token(cfg, lay) * cfg.moe_ffn_hidden_size
                       + cfg.shared_expert_ffn_hidden_size) / tp + a * H * expert_pairs_per_token(cfg, lay)
        ffn = max(ffn, 3 * a * F / tp) if len(cfg.sparse_layers) < cfg.num_layers else ffn
    else:
        ffn = 3 * a * F / tp
    acts = T * (4 * H + a * H + 2 * a * H / tp + 2 * a * kv + ffn)
    logits = lay.infer_batch * cfg.vocab_size / tp * 4 if stage == lay.pp - 1 else 0.0
    overhead = OVERHEAD_FIXED_BYTES + OVERHEAD_FRAGMENTATION * (acts + logits)
    return MemoryReport(stage=stage, weights=a * n_params, grads=0.0, optimizer=0.0, activations=acts,
                        logits=logits, kv_cache=kv_cache, overhead=overhead)


def memory_by_stage(cfg: ModelConfig, lay: Layout) -> List[MemoryReport]:
    validate(cfg, lay)
    build = _train_stage_memory if lay.mode == "train" else _infer_stage_memory
    return [build(cfg, lay, i, n_params, n_layers)
            for i, (n_params, n_layers) in enumerate(zip(stage_params_per_device(cfg, lay), stage_layers(cfg, lay)))]


def memory_per_device(cfg: ModelConfig, lay: Layout) -> MemoryReport:
    """The stage whose devices need the most memory."""
    return max(memory_by_stage(cfg, lay), key=lambda r: r.total)


# ---- FLOPs ------------------------------------------------------------------------------------------

def matmul_params_per_layer(cfg: ModelConfig, layer: int = 0, experts_per_token: Optional[float] = None) -> float:
    """Weights one token meets in layer `layer`'s matmuls: attention, and the dense FFN or, in an MoE layer, the
    router, `experts_per_token` experts (default k: the model's own FLOPs) and the shared expert with its gate."""
    H, F = cfg.hidden_size, cfg.ffn_hidden_size
    attention = 2 * H * H + 2 * cfg.kv_dim * H
    if not cfg.is_sparse(layer):
        return attention + 3 * H * F
    k = cfg.num_experts_per_tok if experts_per_token is None else experts_per_token
    shared = 3 * H * cfg.shared_expert_ffn_hidden_size + (H if cfg.shared_expert_ffn_hidden_size else 0)
    return attention + cfg.num_experts * H + k * 3 * H * cfg.moe_ffn_hidden_size + shared


def layer_forward_flops_per_token(cfg: ModelConfig, seq_length: int, layer: int = 0,
                                  experts_per_token: Optional[float] = None) -> float:
    """2 FLOPs per weight, plus causal attention: QK^T and PV are 2·s·H each over the full square; the
    causal mask halves it (FlashAttention skips masked blocks): 2·s·H."""
    return 2.0 * matmul_params_per_layer(cfg, layer, experts_per_token) + 2.0 * seq_length * cfg.hidden_size


def model_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token without recompute: 6·N (N = layer matmul weights a token meets, an MoE layer's
    k experts, + lm_head; the embedding lookup is not a matmul) + 3 x causal attention forward."""
    return 3.0 * (sum(layer_forward_flops_per_token(cfg, seq_length, i) for i in range(cfg.num_layers))
                  + 2.0 * cfg.hidden_size * cfg.vocab_size)


# ---- time -------------------------------------------------------------------------------------------

def _expert_params_per_device(cfg: ModelConfig, lay: Layout, first: int, end: int) -> int:
    """The expert-shard parameters (split over ep) one device of the stage holding layers [first, end) keeps."""
    per_layer = cfg.num_experts // lay.ep * (3 * cfg.hidden_size * cfg.moe_ffn_hidden_size // lay.tp
                                             + cfg.hidden_size * int(cfg.down_bias)) if cfg.num_experts else 0
    return sum(per_layer for i in range(first, end) if cfg.is_sparse(i))


def _collective_time(nbytes: float, group: int, spans_nodes: bool, hw: Hardware, kind: str) -> float:
    """All-gather / reduce-scatter ('half') or all-reduce ('full') of a tensor of `nbytes` (gathered size).
    Inside a node the group uses its full mesh (each rank sends (g-1) chunks of nbytes/g on g-1 links in
    parallel); across nodes a ring through each device's RoCE port."""
    if group == 1:
        return 0.0
    if spans_nodes:
        t = (group - 1) / group * nbytes / (hw.roce_port_bandwidth * hw.collective_efficiency)
    else:
        t = nbytes / group / (hw.hccs_link_bandwidth * hw.collective_efficiency)
    return 2 * t if kind == "full" else t


@dataclass(frozen=True)
class TimeReport:
    """One optimizer step; seconds unless named otherwise."""

    step_time: float
    compute: float  # critical-path compute (all micro-batches on the slowest stage)
    tp_comm: float  # TP/SP collectives on the critical path
    ep_comm: float  # MoE dispatch and combine over the ep block (and their tp all-reduces), critical path
    cp_comm: float  # ring-attention sends not hidden behind attention
    pp_comm: float  # pipeline point-to-point sends on the critical path
    bubble: float  # pipeline fill/drain
    dp_comm: float  # gradient reduce(-scatter) and parameter all-gather, not overlapped
    optimizer: float  # AdamW update
    tokens_per_step: int
    tokens_per_s_per_device: float
    mfu: float  # model FLOPs (no recompute) / peak


def step_time(cfg: ModelConfig, lay: Layout, efficiency: Optional[float] = None,
              hw: Hardware = ATLAS_800T_A2) -> TimeReport:
    """Step time of a training layout. Assumptions: no overlap of communication with compute (except
    ring attention with the attention it feeds); bf16/fp16 compute at `efficiency` x peak."""
    validate(cfg, lay)
    if lay.mode != "train":
        raise ConfigError("step_time models training layouts; this layout is mode='infer'")
    if DTYPE_BYTES[lay.compute_dtype] != 2:
        raise ConfigError("the time model covers float16/bfloat16 compute only (cube peak)")
    eff = calibrated_efficiency() if efficiency is None else efficiency
    flops_per_s = hw.peak_flops * eff
    a, H, s, tp, cp = 2, cfg.hidden_size, lay.seq_length, lay.tp, lay.cp
    T = lay.micro_batch_size * s / cp  # tokens of one micro-batch on one device's sequence shard
    dpn = hw.devices_per_node
    mult = 4.0 if lay.recompute == "full" else 3.0  # fwd + bwd (2x fwd) [+ recomputed fwd]
    layers = stage_layers(cfg, lay)
    params = stage_params_per_device(cfg, lay)

    # TP/SP: per layer 4 collectives forward (all-gather/reduce-scatter around attention and MLP, or two
    # all-reduces = same volume), 4 backward (+2 re-gathers of the sequence-sharded norm outputs for the
    # weight gradients with SP), +4 for a recomputed forward; each moves a tensor of a·T·H bytes.
    tp_spans = tp * cp > dpn
    half_ops_per_layer = 4 + 4 + (2 if lay.sp else 0) + (4 if lay.recompute == "full" else 0)
    t_half = _collective_time(a * T * H, tp, tp_spans, hw, "half")
    # Ring attention: (cp-1) K/V block sends forward, K/V + dK/dV backward (x4/3 with full recompute),
    # hidden behind the attention compute of the same layer when shorter. Sends here and for the pipeline below
    # are point to point, one block per step over one link: what comm.ring_shift / comm.neighbour_exchange do
    # on Ascend (HCCL batch_isend_irecv); the all-gather they fall back to elsewhere would move `size` blocks.
    kv = kv_local_dim(cfg, tp)
    cp_bw = (hw.roce_port_bandwidth if tp * cp > dpn else hw.hccs_link_bandwidth) * hw.collective_efficiency
    cp_bytes = (mult * (cp - 1) * 2 * a * T * kv) if cp > 1 else 0.0
    attn_time = mult * T * 2.0 * s * H / tp / flops_per_s if cp > 1 else 0.0
    cp_exposed = max(0.0, cp_bytes / cp_bw - attn_time)
    # Pipeline: one activation send forward and one gradient send backward per micro-batch and virtual
    # stage, a·T·H/tp bytes (sequence- or scatter-split); inter-node as soon as the job spans nodes.
    p2p_bw = (hw.roce_port_bandwidth if lay.devices > dpn else hw.hccs_link_bandwidth) * hw.collective_efficiency
    p2p = 2 * lay.pp_interleave * a * T * H / tp / p2p_bw if lay.pp > 1 else 0.0

    # MoE layers: the dispatch and combine over the ep block, forward, backward (and a recomputed forward): two
    # all-to-alls of the rows the experts receive (expert_rows_per_token); each device sends (ep-1)/ep of them,
    # inside a node over its ep-1 links at once, across nodes through its port. Dense dispatch also all-reduces
    # the experts' partial sums over tp ([rows, H]; forward, and the input and routing-weight gradients backward).
    moe_passes = 3 if lay.recompute == "full" else 2  # forward-like passes: forward, backward (+ recompute)
    ep_spans = tp * cp * lay.ep > dpn
    rows = expert_rows_per_token(cfg, lay) if cfg.num_experts else 0.0
    link = (hw.roce_port_bandwidth if ep_spans else hw.hccs_link_bandwidth * max(lay.ep - 1, 1))
    moe_layer_comm = 2 * a * rows * T * H * (lay.ep - 1) / lay.ep / (link * hw.collective_efficiency)
    if lay.moe_dispatch == "dense":
        moe_layer_comm += _collective_time(a * rows * T * H, tp, tp_spans, hw, "full")
    moe_layer_comm *= moe_passes
    ranges = stage_layer_ranges(cfg.num_layers, lay.pp, list(lay.layer_counts) or None, "pipeline_layer_counts")
    pairs = expert_pairs_per_token(cfg, lay) if cfg.num_experts else None

    per_stage, comp, tpc, epc = [], [], [], []
    for i, n_layers in enumerate(layers):
        stage_range = range(*ranges[i])
        flops = T * mult * sum(layer_forward_flops_per_token(cfg, s, j, pairs) for j in stage_range) / tp
        moe_comm = sum(moe_layer_comm for j in stage_range if cfg.is_sparse(j))
        half_ops = n_layers * half_ops_per_layer
        if i == lay.pp - 1:
            flops += T * 3.0 * 2.0 * H * cfg.vocab_size / tp
            half_ops += 2  # gather before lm_head, scatter of its input gradient
        if i == 0:
            half_ops += 2  # vocab-parallel embedding all-reduce
        c, t = flops / flops_per_s, half_ops * t_half
        comp.append(c)
        tpc.append(t)
        epc.append(moe_comm)
        per_stage.append(c + t + moe_comm + n_layers * cp_exposed + p2p)
    m, v = lay.micro_batches, lay.pp_interleave
    slow = max(range(lay.pp), key=lambda i: per_stage[i])
    # 1F1B: the slowest stage paces the steady state; fill and drain pass once through the others.
    fill_drain = (sum(per_stage) - per_stage[slow]) / v
    pipe = m * per_stage[slow] + fill_drain

    # Data parallel over dp*cp (an expert shard's replicas: dp/ep x cp): reduce-scatter fp32 grads + all-gather bf16 weights (ZeRO-1) or an fp32
    # all-reduce; after backward, not overlapped. Then AdamW reads p, g, m, v (fp32) and writes p, m, v and
    # the bf16 copy: 30 bytes per parameter it owns.
    g = lay.dp * cp
    dp_spans = tp * cp * lay.dp > dpn
    dp_t, opt_t = [], []
    expert_share = [_expert_params_per_device(cfg, lay, *ranges[i]) for i in range(lay.pp)]
    for n, experts in zip(params, expert_share):
        if lay.ep > 1:  # the expert shards reduce over fewer replicas (ZeRO with ep: not built, validate refuses)
            t = (_collective_time(4.0 * (n - experts), g, dp_spans, hw, "full")
                 + _collective_time(4.0 * experts, g // lay.ep, dp_spans, hw, "full"))
            dp_t.append(t)
            opt_t.append(30.0 * n / hw.hbm_bandwidth)
            continue
        if lay.optimizer_shard:
            t = (_collective_time(4.0 * n, g, dp_spans, hw, "half")
                 + _collective_time(2.0 * n, g, dp_spans, hw, "half"))
        else:
            t = _collective_time(4.0 * n, g, dp_spans, hw, "full")
        dp_t.append(t)
        opt_t.append(30.0 * n / (g if lay.optimizer_shard else 1) / hw.hbm_bandwidth)
    dp_comm, opt = max(dp_t), max(opt_t)

    total = lay.grad_accum * pipe + dp_comm + opt
    tokens = lay.dp * lay.grad_accum * m * lay.micro_batch_size * s
    tps = tokens / total / lay.devices
    return TimeReport(
        step_time=total, compute=lay.grad_accum * m * comp[slow], tp_comm=lay.grad_accum * m * tpc[slow],
        ep_comm=lay.grad_accum * m * epc[slow],
        cp_comm=lay.grad_accum * m * layers[slow] * cp_exposed, pp_comm=lay.grad_accum * m * p2p,
        bubble=lay.grad_accum * fill_drain, dp_comm=dp_comm, optimizer=opt, tokens_per_step=tokens,
        tokens_per_s_per_device=tps, mfu=model_flops_per_token(cfg, s) * tps / hw.peak_flops)


# ---- check against MindFormers ----------------------------------------------------------------------

# MindFormers' telechat2 finetune layouts (spec 7.1: research/telechat2/telechat2-*/finetune_telechat_*.yaml):
# runner batch_size 1, seq 8192, sequence parallel, parallel optimizer on. 35B offset [-1,1,1,-1] over
# 16 layers/stage; 115B offset matrix over 3 virtual stages of 4 layers -> 10,11,12,13,13,13,13,11 layers,
# select_recompute (no extra matmul FLOPs). MindFormers overlaps some communication (fine_grain_interleave);
# this model does not, which is part of the reported error.
MINDFORMERS_LAYOUTS: Dict[str, Layout] = {
    "telechat2_7b": Layout(dp=8, tp=1, pp=1, sp=True, micro_batches=1, recompute="full", optimizer_shard=True),
    "telechat2_35b": Layout(dp=1, tp=4, pp=4, sp=True, micro_batches=32, recompute="full", optimizer_shard=True,
                            layer_counts=(15, 17, 17, 15)),
    "telechat2_115b": Layout(dp=8, tp=8, pp=8, sp=True, micro_batches=8, recompute="selective",
                             optimizer_shard=True, layer_counts=(10, 11, 12, 13, 13, 13, 13, 11), pp_interleave=3),
    # TeleChat2-39B-A12B (families.md 3): dp128 ep2 mp4 pp2, routed experts with capacity factor 1.2 (MindFormers'
    # grouped matmul and all-to-all). Not in families.md, assumed: seq 8192, sequence parallel and full recompute
    # as its dense fine-tunes, 16 micro-batches, the optimizer not sharded (our model has no ZeRO with ep)
    "telechat2_39b_a12b": Layout(dp=128, ep=2, tp=4, pp=2, sp=True, micro_batches=16, recompute="full",
                                 moe_dispatch="routed", capacity_factor=1.2),
}
# MindFormers README "模型性能", Atlas 800T A2, seq 8192, finetune tokens/s/p (spec 9.1).
PUBLISHED_TOKENS_PER_S: Dict[str, float] = {"telechat2_7b": 2950.0, "telechat2_35b": 516.0, "telechat2_115b": 158.0,
                                            "telechat2_39b_a12b": 865.0}
CALIBRATION_MODEL = "telechat2_7b"


@functools.lru_cache(maxsize=None)
def calibrated_efficiency(model: str = CALIBRATION_MODEL) -> float:
    """The one fitted constant: the efficiency at which `model`'s MindFormers layout gives its published
    tokens/s/p (bisection; throughput rises monotonically with efficiency)."""
    cfg, lay, target = get_config(model), MINDFORMERS_LAYOUTS[model], PUBLISHED_TOKENS_PER_S[model]
    lo, hi = 0.01, 1.0
    if step_time(cfg, lay, hi).tokens_per_s_per_device < target:
        raise ConfigError(f"{model}: {target} tokens/s/p is above what the model allows at 100% of peak")
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if step_time(cfg, lay, mid).tokens_per_s_per_device < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def validation_rows() -> List[Dict[str, object]]:
    """Predicted vs published throughput for each MindFormers layout."""
    rows = []
    for model, lay in MINDFORMERS_LAYOUTS.items():
        cfg = get_config(model)
        pred = step_time(cfg, lay).tokens_per_s_per_device
        pub = PUBLISHED_TOKENS_PER_S[model]
        rows.append({"model": model, "layout": lay.describe(), "cards": lay.devices, "published": pub,
                     "predicted": pred, "error": pred / pub - 1.0,
                     "role": "fit" if model == CALIBRATION_MODEL else "held out",
                     "memory": memory_per_device(cfg, lay)})
    return rows


# ---- shipped YAMLs and printing ---------------------------------------------------------------------

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
ATLAS_SIZES = ("telechat2_7b", "telechat2_35b", "telechat2_115b", "telechat2_39b_a12b")
ATLAS_TASKS = ("finetune", "predict")


def shipped_atlas_configs() -> List[pathlib.Path]:
    return [REPO_ROOT / "configs" / size / f"{task}.yaml" for size in ATLAS_SIZES for task in ATLAS_TASKS]


def evaluate_config(path) -> Dict[str, object]:
    """Load a YAML strictly and return its layout, memory report and (training) time report."""
    settings = load_settings(str(path))
    cfg = get_config(settings.model)
    lay = layout_from_settings(settings)
    mem = memory_per_device(cfg, lay)
    time = step_time(cfg, lay) if lay.mode == "train" else None
    path = pathlib.Path(path).resolve()
    name = str(path.relative_to(REPO_ROOT)) if REPO_ROOT in path.parents else str(path)
    return {"name": name, "model": settings.model, "layout": lay, "memory": mem, "time": time}


def _gib(x: float) -> str:
    return f"{x / GIB:6.1f}"


def format_table(entries: Sequence[Dict[str, object]], hw: Hardware = ATLAS_800T_A2) -> str:
    head = (f"{'config':40s} {'cards':>5s} {'layout':34s} {'weight':>6s} {'grads':>6s} {'optim':>6s} "
            f"{'activ':>6s} {'logits':>6s} {'kv':>6s} {'ovhd':>6s} {'total':>6s} {'fits':>4s} "
            f"{'step_s':>7s} {'tok/s/card':>10s} {'MFU':>5s}")
    lines = [head, "-" * len(head)]
    for e in entries:
        lay, mem, t = e["layout"], e["memory"], e["time"]
        timing = (f"{t.step_time:7.2f} {t.tokens_per_s_per_device:10.0f} {100 * t.mfu:4.1f}%" if t
                  else f"{'-':>7s} {'-':>10s} {'-':>5s}")
        lines.append(f"{e['name'][-40:]:40s} {lay.devices:5d} {lay.describe()[:34]:34s} {_gib(mem.weights)} "
                     f"{_gib(mem.grads)} {_gib(mem.optimizer)} {_gib(mem.activations)} {_gib(mem.logits)} "
                     f"{_gib(mem.kv_cache)} {_gib(mem.overhead)} {_gib(mem.total)} "
                     f"{'yes' if mem.fits(hw) else 'NO':>4s} {timing}")
    lines.append(f"(GiB per device, worst pipeline stage; fits = total <= {hw.usable_bytes / GIB:.0f} GiB usable "
                 f"= {hw.hbm_bytes / GIB:.0f} GiB HBM - {hw.reserved_bytes / GIB:.0f} GiB reserved)")
    return "\n".join(lines)


def format_time_breakdown(entries: Sequence[Dict[str, object]]) -> str:
    """Where a training step's seconds go (critical path; no overlap assumed)."""
    head = (f"{'config':40s} {'step_s':>7s} {'compute':>7s} {'tp/sp':>7s} {'ep':>6s} {'cp':>6s} {'p2p':>6s} "
            f"{'bubble':>7s} {'dp':>6s} {'adamw':>6s} {'tokens/step':>11s}")
    lines = [head, "-" * len(head)]
    for e in entries:
        t = e["time"]
        if t is None:
            continue
        lines.append(f"{e['name'][-40:]:40s} {t.step_time:7.2f} {t.compute:7.2f} {t.tp_comm:7.2f} {t.ep_comm:6.2f} "
                     f"{t.cp_comm:6.2f} "
                     f"{t.pp_comm:6.2f} {t.bubble:7.2f} {t.dp_comm:6.2f} {t.optimizer:6.3f} {t.tokens_per_step:11d}")
    return "\n".join(lines)


def format_validation(hw: Hardware = ATLAS_800T_A2) -> str:
    eff = calibrated_efficiency()
    lines = [f"Check vs MindFormers published finetune throughput (Atlas 800T A2, seq 8192); fitted constant: "
             f"efficiency = {eff:.3f} of {hw.peak_flops / 1e12:.1f} TFLOPS, fit on {CALIBRATION_MODEL} only",
             f"{'model':16s} {'cards':>5s} {'MindFormers layout':44s} {'published':>9s} {'predicted':>9s} "
             f"{'error':>7s}  role      mem(our impl)"]
    for r in validation_rows():
        mem = r["memory"]
        lines.append(f"{r['model']:16s} {r['cards']:5d} {r['layout']:44s} {r['published']:9.0f} "
                     f"{r['predicted']:9.1f} {100 * r['error']:+6.1f}%  {r['role']:8s}  "
                     f"{mem.total / GIB:5.1f} GiB {'fits' if mem.fits(hw) else 'does not fit'}")
    return "\n".join(lines)


def _adhoc_layout(args) -> Tuple[str, Layout]:
    lay = Layout(dp=args.dp, tp=args.tp, pp=args.pp, cp=args.cp, sp=args.sp, micro_batches=args.micro_batches,
                 micro_batch_size=args.micro_batch_size, seq_length=args.seq, recompute=args.recompute,
                 optimizer_shard=args.optimizer_shard, compute_dtype=args.dtype, mode=args.mode, ep=args.ep,
                 moe_dispatch=args.moe_dispatch, capacity_factor=args.capacity_factor)
    return args.model, lay


def main(argv: Optional[Sequence[str]] = None) -> int:
    from telechat2_ms.cli import ArgumentParser, add_debug_flag, report_errors

    p = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_debug_flag(p)
    p.add_argument("--config", action="append", default=[], help="YAML run config (repeatable)")
    p.add_argument("--all", action="store_true", help="every shipped Atlas YAML + the MindFormers check")
    p.add_argument("--model", help="ad-hoc layout: model size (e.g. telechat2_115b)")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--ep", type=int, default=1, help="expert parallel (mixture-of-experts models), inside dp")
    p.add_argument("--moe-dispatch", choices=("dense", "routed"), default="dense",
                   help="dense: every expert on every token (this project's path); routed: the k chosen experts")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="routed dispatch: capacity x the routed work")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none")
    p.add_argument("--optimizer-shard", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    args = p.parse_args(argv)
    paths = shipped_atlas_configs() if args.all else [pathlib.Path(c) for c in args.config]
    if not paths and not args.model:
        p.error("give --config, --all or --model")
    return report_errors(lambda: _report(args, paths), debug=args.debug)


def _report(args, paths) -> int:
    entries = [evaluate_config(path) for path in paths]
    if args.model:
        name, lay = _adhoc_layout(args)
        cfg = get_config(name)
        entries.append({"name": f"{name} (ad hoc)", "layout": lay, "memory": memory_per_device(cfg, lay),
                        "time": step_time(cfg, lay) if lay.mode == "train" else None})
    hw = ATLAS_800T_A2
    print(f"Hardware: {hw.name}: {hw.peak_flops / 1e12:.1f} TFLOPS bf16 peak, {hw.hbm_bytes / GIB:.0f} GiB HBM, "
          f"HCCS {hw.hccs_link_bandwidth / 1e9:.0f} GB/s/link/direction, RoCE {hw.roce_port_bandwidth / 1e9:.0f} "
          f"GB/s/NPU, collective efficiency {hw.collective_efficiency}")
    print(format_table(entries, hw))
    if any(e["time"] is not None for e in entries):
        print()
        print(format_time_breakdown(entries))
    if args.all:
        print()
        print(format_validation(hw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
