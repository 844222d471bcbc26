"""The parallel plan: how every TeleChat2 parameter is split for tensor parallel (tp) and placed on pipeline
stages (pp).

The single source of these rules: `SHARD_TABLE` says how each parameter is split, and `TP_PLAN` (which
cell of a decoder layer becomes column-parallel, row-parallel or a region-entry norm) is derived from it.
The checkpoint resharder (convert/reshard.py), the checkpoint readers (checkpoint.py) and
parallel/parallelize.py read them. Pure python + numpy, no MindSpore.

Tensor parallel follows Megatron (all weights are [out, in]):
- column-parallel (output rows split): wq, wk_v, w1, w3. wk_v rows are per-kv-head [K_h; V_h], so a
  contiguous 1/tp slice holds whole kv heads with their K and V rows (num_kv_heads % tp == 0).
- fewer kv heads than tp ranks (Qwen2-7B's 4 at tp8; tp % num_kv_heads == 0), as Megatron does: the kv
  projections (wk_v, or wk / wv and their biases) are replicated, rank r holding kv head r // (tp / k), which is
  the head its own query heads use; the `kv_heads` argument of shard_shape / shard_tensor / merge_shards turns
  this on. The copies get partial gradients (from their rank's query heads only), summed over the copies by
  parallel/data_parallel.reduce_gradients.
- row-parallel (input columns split): wo, w2; their biases are replicated (added once, after the
  all-reduce).
- vocab-parallel (vocab rows split): tok_embeddings.embedding_weight and lm_head (needs V % tp == 0).
- replicated: the RMSNorm weights.
- LoRA adapters (training under msrun, train/lora.py's A [r, in] and B [out, r]) follow their projection: of a
  column-parallel one B is split on its rows and A whole, of a row-parallel one A is split on its columns and B
  whole (parallel/layers._LoRA).
- fused inference layouts (spec 3.3, pitfall 10.18): rank r holds [q_r; K_r; V_r] of w_qkv and
  [w1_r; w3_r] of w_gate_hidden, i.e. the fused rows of its own column slices, never a slice of the
  global concatenation.
A shard is a plain slice, so `merge_shards(name, [shard_tensor(name, w, tp, r) for r in range(tp)])`
gives back `w` bit for bit, and resharding between layouts is a pure tensor operation.

Pipeline parallel: `stage_layer_ranges` gives each stage a contiguous block of layers (even split by
default, the first `num_layers % pp` stages taking one more; or explicit per-stage counts). The embedding
lives on the first stage, norm_out and lm_head on the last; a tied lm_head (Qwen2-0.5B/1.5B) is a copy of the
embedding on the last stage, which checkpoints do not hold (`param_stages`). Parameter names keep their global
layer index on every stage (as MindFormers' pipeline checkpoints do), so merging needs no renumbering.

Rank order for a (tp, pp) layout: rank = pp_stage * tp + tp_rank (tp fastest, as in parallel/dims.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from telechat2_ms.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class SplitRule:
    """How one parameter is split over tp ranks."""

    kind: str  # "replicate" | "rows" (split dim 0) | "cols" (split dim 1) | "fused_rows" (per-rank fused blocks)
    #          | "whole" (replicated, not a norm: MoE routers and gates) | "experts" (stacked experts split on `dim`)
    layout: str  # one-line layout comment: full -> per-rank shape
    dim: Optional[int] = None  # the split dimension of an "experts" rule

    def split_dim(self) -> Optional[int]:
        return {"rows": 0, "cols": 1, "fused_rows": 0, "experts": self.dim}.get(self.kind)

    @property
    def replicated(self) -> bool:
        return self.kind in ("replicate", "whole")


REPLICATE = SplitRule("replicate", "[H] -> [H] on every rank")
COLUMN = SplitRule("rows", "[out, in] -> [out/tp, in]")
KV_COLUMN = SplitRule("rows", "[2kd, H] -> [2kd/tp, H]: whole kv heads, each [K_h; V_h]")
VOCAB = SplitRule("rows", "[V, H] -> [V/tp, H]")
ROW = SplitRule("cols", "[out, in] -> [out, in/tp]")
COLUMN_BIAS = SplitRule("rows", "[out] -> [out/tp]: the bias of a column-parallel projection")
KV_SEPARATE = SplitRule("rows", "[kd, H] -> [kd/tp, H]: whole kv heads (Qwen2's wk, wv)")
KV_BIAS = SplitRule("rows", "[kd] -> [kd/tp]: the bias of wk / wv, whole kv heads")
FUSED_QKV = SplitRule("fused_rows", "[H+2kd, H] = [q; K; V] -> [q_r; K_r; V_r] of [(H+2kd)/tp, H]")
FUSED_GATE_HIDDEN = SplitRule("fused_rows", "[2F, H] = [w1; w3] -> [w1_r; w3_r] of [2F/tp, H]")
WHOLE = SplitRule("whole", "[E, H] / [1, H] on every rank: an MoE router or the shared expert's gate")
EXPERT_COLUMN = SplitRule("experts", "[E, F, H] -> [E, F/tp, H]: every expert's gate / up rows", 1)
EXPERT_ROW = SplitRule("experts", "[E, H, F] -> [E, H, F/tp]: every expert's down-projection columns", 2)
EXPERT_BIAS = SplitRule("whole", "[E, H] on every rank: the experts' down biases, added after the all-reduce")
LORA_A_OF_COLUMN = SplitRule("replicate", "[r, in] on every rank: LoRA A of a column-parallel projection")
LORA_B_OF_COLUMN = SplitRule("rows", "[out, r] -> [out/tp, r]: LoRA B of a column-parallel projection")
LORA_A_OF_ROW = SplitRule("cols", "[r, in] -> [r, in/tp]: LoRA A of a row-parallel projection")
LORA_B_OF_ROW = SplitRule("replicate", "[out, r] on every rank: LoRA B of a row-parallel projection")

# (parameter name, rule): the whole tensor-parallel plan; `{i}` stands for a decoder layer index
SHARD_TABLE: Tuple[Tuple[str, SplitRule], ...] = (
    ("model.tok_embeddings.embedding_weight", VOCAB),
    ("model.layers.{i}.attention_norm.weight", REPLICATE),
    ("model.layers.{i}.attention.wq.weight", COLUMN),
    ("model.layers.{i}.attention.wq.bias", COLUMN_BIAS),
    ("model.layers.{i}.attention.wk_v.weight", KV_COLUMN),
    ("model.layers.{i}.attention.wk.weight", KV_SEPARATE),
    ("model.layers.{i}.attention.wk.bias", KV_BIAS),
    ("model.layers.{i}.attention.wv.weight", KV_SEPARATE),
    ("model.layers.{i}.attention.wv.bias", KV_BIAS),
    ("model.layers.{i}.attention.w_qkv.weight", FUSED_QKV),
    ("model.layers.{i}.attention.wo.weight", ROW),
    ("model.layers.{i}.attention.wo.bias", REPLICATE),
    ("model.layers.{i}.ffn_norm.weight", REPLICATE),
    ("model.layers.{i}.feed_forward.w1.weight", COLUMN),
    ("model.layers.{i}.feed_forward.w3.weight", COLUMN),
    ("model.layers.{i}.feed_forward.w_gate_hidden.weight", FUSED_GATE_HIDDEN),
    ("model.layers.{i}.feed_forward.w2.weight", ROW),
    ("model.layers.{i}.feed_forward.w2.bias", REPLICATE),
    # mixture of experts (parallel/experts.py): the router whole, the stacked experts split inside every expert
    # as the dense FFN is (over ep they are split on dim 0: parallel/experts.expert_range); Qwen2-MoE's routed
    # experts sit under `routed_experts.`, its shared expert is a dense FFN
    *((f"model.layers.{{i}}.feed_forward.{prefix}{name}", rule)
      for prefix in ("", "routed_experts.")
      for name, rule in (("router.dense.weight", WHOLE), ("ffn.w1.weight", EXPERT_COLUMN),
                         ("ffn.w3.weight", EXPERT_COLUMN), ("ffn.w2.weight", EXPERT_ROW), ("ffn.w2.bias", EXPERT_BIAS))),
    ("model.layers.{i}.feed_forward.shared_experts.w1.weight", COLUMN),
    ("model.layers.{i}.feed_forward.shared_experts.w3.weight", COLUMN),
    ("model.layers.{i}.feed_forward.shared_experts.w2.weight", ROW),
    ("model.layers.{i}.feed_forward.shared_experts_gate.weight", WHOLE),
    ("model.norm_out.weight", REPLICATE),
    ("lm_head.weight", VOCAB),
    # LoRA adapters (training under msrun): they follow their projection
    ("model.layers.{i}.attention.wq.lora_a", LORA_A_OF_COLUMN),
    ("model.layers.{i}.attention.wq.lora_b", LORA_B_OF_COLUMN),
    ("model.layers.{i}.attention.wk_v.lora_a", LORA_A_OF_COLUMN),
    ("model.layers.{i}.attention.wk_v.lora_b", LORA_B_OF_COLUMN),
    ("model.layers.{i}.attention.wo.lora_a", LORA_A_OF_ROW),
    ("model.layers.{i}.attention.wo.lora_b", LORA_B_OF_ROW),
    ("model.layers.{i}.feed_forward.w1.lora_a", LORA_A_OF_COLUMN),
    ("model.layers.{i}.feed_forward.w1.lora_b", LORA_B_OF_COLUMN),
    ("model.layers.{i}.feed_forward.w3.lora_a", LORA_A_OF_COLUMN),
    ("model.layers.{i}.feed_forward.w3.lora_b", LORA_B_OF_COLUMN),
    ("model.layers.{i}.feed_forward.w2.lora_a", LORA_A_OF_ROW),
    ("model.layers.{i}.feed_forward.w2.lora_b", LORA_B_OF_ROW),
)
_COMPILED = tuple((re.compile(re.escape(p).replace(r"\{i\}", r"\d+") + r"\Z"), rule) for p, rule in SHARD_TABLE)
_LAYER_PREFIX = "model.layers.{i}."
_STYLE = {"rows": "colwise", "cols": "rowwise", "replicate": "region_norm"}
# decoder-layer cell -> tensor-parallel style, derived from the weights' rules (fused weights are for
# inference layouts and have no parallel cell): column-parallel for split output rows, row-parallel for split
# input columns, a region-entry norm for a replicated norm weight
TP_PLAN: Dict[str, str] = {
    p[len(_LAYER_PREFIX):-len(".weight")]: _STYLE[rule.kind]
    for p, rule in SHARD_TABLE
    if p.startswith(_LAYER_PREFIX) and p.endswith(".weight") and rule.kind in _STYLE
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def split_rule(name: str) -> SplitRule:
    """The rule for parameter `name`; ValueError for a name the table does not know."""
    for pattern, rule in _COMPILED:
        if pattern.match(name):
            return rule
    raise ValueError(f"parameter {name!r} has no tensor-parallel rule in telechat2_ms.parallel.plan.SHARD_TABLE")


def fused_sections(name: str, shape: Sequence[int]) -> List[int]:
    """Row counts of the parts of a fused weight, read from its full shape [rows, H]."""
    rows, hidden = shape[0], shape[1]
    if "w_qkv" in name:
        kd2 = rows - hidden  # rows = H + 2kd
        return [hidden, kd2 // 2, kd2 // 2]
    return [rows // 2, rows // 2]  # w_gate_hidden: [w1; w3]


def _check_divisible(name: str, size: int, tp: int, what: str) -> None:
    if size % tp:
        raise ValueError(f"parameter {name}: {what} {size} is not divisible by tp={tp}")


KV_RULES = (KV_COLUMN, KV_SEPARATE, KV_BIAS)


def kv_replicas(name: str, tp: int, kv_heads: int = 0) -> int:
    """How many tp ranks hold a copy of each kv head of parameter `name`: tp / kv_heads for a kv projection
    when kv_heads < tp, else 1 (`kv_heads` 0: unknown, whole heads are split)."""
    if not kv_heads or kv_heads >= tp or split_rule(name) not in KV_RULES:
        return 1
    if tp % kv_heads:
        raise ValueError(f"parameter {name}: tp={tp} is neither a divisor nor a multiple of num_kv_heads {kv_heads}")
    return tp // kv_heads


def kv_copy_rows(name: str, rows: int, tp: int, tp_rank: int, kv_heads: int = 0) -> Optional[Tuple[int, int]]:
    """(start, stop) rows of the whole kv head tp rank `tp_rank` holds a copy of (parameter `name` with `rows`
    rows in full), or None when its kv heads are split, not copied."""
    copies = kv_replicas(name, tp, kv_heads)
    if copies == 1:
        return None
    per_head, head = rows // kv_heads, tp_rank // copies
    return head * per_head, (head + 1) * per_head


def shard_shape(name: str, shape: Sequence[int], tp: int, kv_heads: int = 0) -> Tuple[int, ...]:
    """Per-rank shape of parameter `name` (full shape `shape`) under tensor parallel `tp` (`kv_heads`: the
    model's kv head count, for kv projections replicated when it is below tp)."""
    rule = split_rule(name)
    dim = rule.split_dim()
    shape = tuple(int(s) for s in shape)
    if dim is None:
        return shape
    if kv_replicas(name, tp, kv_heads) > 1:
        return (shape[0] // kv_heads,) + shape[1:]
    if rule.kind == "fused_rows":
        for part in fused_sections(name, shape):
            _check_divisible(name, part, tp, "fused part rows")
    _check_divisible(name, shape[dim], tp, f"dim {dim} size")
    return shape[:dim] + (shape[dim] // tp,) + shape[dim + 1:]


def is_expert_shard(name: str) -> bool:
    """A stacked expert weight or bias: split over the ep group on dim 0 (parallel/experts.py)."""
    try:
        rule = split_rule(name)
    except ValueError:
        return False
    return rule in (EXPERT_COLUMN, EXPERT_ROW, EXPERT_BIAS)


def rank_shape(name: str, shape: Sequence[int], tp: int, kv_heads: int = 0, ep: int = 1) -> Tuple[int, ...]:
    """The shape one rank holds: `shard_shape`, and an expert shard's E/ep experts under expert parallelism."""
    local = shard_shape(name, shape, tp, kv_heads)
    return (local[0] // ep,) + local[1:] if ep > 1 and is_expert_shard(name) else local


def full_shape(name: str, local: Sequence[int], tp: int, kv_heads: int = 0) -> Tuple[int, ...]:
    """Inverse of `shard_shape`: the full shape of parameter `name` from one rank's shape."""
    rule = split_rule(name)
    dim = rule.split_dim()
    local = tuple(int(s) for s in local)
    if dim is None:
        return local
    factor = kv_heads if kv_replicas(name, tp, kv_heads) > 1 else tp
    return local[:dim] + (local[dim] * factor,) + local[dim + 1:]


def shard_tensor(name: str, array: np.ndarray, tp: int, tp_rank: int, kv_heads: int = 0) -> np.ndarray:
    """The slice of the full tensor `array` that tp rank `tp_rank` of `tp` holds (contiguous; `array` itself
    when nothing is cut)."""
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} is outside tp={tp}")
    rule = split_rule(name)
    shard_shape(name, array.shape, tp, kv_heads)  # divisibility checks
    if rule.replicated or tp == 1:
        return np.ascontiguousarray(array)
    copy_rows = kv_copy_rows(name, array.shape[0], tp, tp_rank, kv_heads)
    if copy_rows is not None:
        return np.ascontiguousarray(array[copy_rows[0]:copy_rows[1]])
    if rule.kind == "fused_rows":
        offsets = np.cumsum([0] + fused_sections(name, array.shape))
        pieces = []
        for start, stop in zip(offsets[:-1], offsets[1:]):
            part = (stop - start) // tp
            pieces.append(array[start + tp_rank * part: start + (tp_rank + 1) * part])  # [part/tp, H]
        return np.concatenate(pieces, axis=0)
    dim = rule.split_dim()
    size = array.shape[dim] // tp
    index = [slice(None)] * array.ndim
    index[dim] = slice(tp_rank * size, (tp_rank + 1) * size)
    return np.ascontiguousarray(array[tuple(index)])


def merge_shards(name: str, arrays: Sequence[np.ndarray], kv_heads: int = 0) -> np.ndarray:
    """Inverse of `shard_tensor`: the full tensor from the shards of all tp ranks, in rank order."""
    tp = len(arrays)
    if tp == 0:
        raise ValueError(f"parameter {name}: no shards to merge")
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"parameter {name}: shards have different shapes {sorted(shapes)}")
    rule = split_rule(name)
    if rule.replicated:
        if any(arrays[0].tobytes() != a.tobytes() for a in arrays[1:]):  # bitwise (NaN-safe)
            raise ValueError(f"parameter {name} is replicated but its {tp} copies differ")
        return np.ascontiguousarray(arrays[0])
    rep = kv_replicas(name, tp, kv_heads)
    if rep > 1:  # one copy per kv head; the others must agree
        for r, a in enumerate(arrays):
            if a.tobytes() != arrays[r - r % rep].tobytes():
                raise ValueError(f"parameter {name}: tp ranks {r - r % rep} and {r} should hold the same kv head "
                                 "but differ")
        return np.concatenate([arrays[h * rep] for h in range(tp // rep)], axis=0)
    if rule.kind == "fused_rows":
        local = arrays[0].shape
        full = (local[0] * tp,) + tuple(local[1:])
        sections = [s // tp for s in fused_sections(name, full)]
        offsets = np.cumsum([0] + sections)
        parts = [np.concatenate([a[start:stop] for a in arrays], axis=0)  # [part, H]
                 for start, stop in zip(offsets[:-1], offsets[1:])]
        return np.concatenate(parts, axis=0)
    return np.concatenate(arrays, axis=rule.split_dim())


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """ConfigError unless `cfg` splits into `tp` ranks with whole heads, kv heads (or whole copies of them),
    vocab rows and ffn rows."""
    if tp < 1:
        raise ConfigError(f"tp must be >= 1, got {tp}")
    if cfg.num_heads % tp:
        raise ConfigError(f"num_heads {cfg.num_heads} of model {cfg.name} is not divisible by tp={tp}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ConfigError(f"num_kv_heads {cfg.num_kv_heads} of model {cfg.name} is not divisible by tp={tp}, nor "
                          f"tp by it (kv heads are split whole, or replicated when tp is a multiple)")
    for what, value in (("vocab_size", cfg.vocab_size), ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if value % tp:
            raise ConfigError(f"{what} {value} of model {cfg.name} is not divisible by tp={tp}")


def stage_layer_ranges(num_layers: int, pp: int, layer_counts: Optional[Sequence[int]] = None,
                       key: str = "layer_counts") -> List[Tuple[int, int]]:
    """[(first, end)] global layer range of each pipeline stage.

    Default: an even split, the first `num_layers % pp` stages taking one extra layer (the last stage
    also runs norm_out, lm_head and the loss). `layer_counts` gives the count per stage explicitly; `key` is its
    name in messages (the settings call it pipeline_layer_counts, layout.json layer_counts)."""
    if pp < 1:
        raise ConfigError(f"pp must be >= 1, got {pp}")
    if layer_counts is None:
        if num_layers < pp:
            raise ConfigError(f"{num_layers} layers cannot fill {pp} pipeline stages (each needs one layer)")
        base, extra = divmod(num_layers, pp)
        layer_counts = [base + (1 if s < extra else 0) for s in range(pp)]
    counts = [int(c) for c in layer_counts]
    if len(counts) != pp:
        raise ConfigError(f"{key} {counts} has {len(counts)} entries, expected one per stage (pp={pp})")
    if any(c < 1 for c in counts):
        raise ConfigError(f"{key} {counts}: every pipeline stage needs at least one layer")
    if sum(counts) != num_layers:
        raise ConfigError(f"{key} {counts} sum to {sum(counts)}, but the model has {num_layers} layers")
    starts = np.cumsum([0] + counts).tolist()
    return [(starts[s], starts[s + 1]) for s in range(pp)]


def layer_index(name: str) -> Optional[int]:
    """Global layer index in a parameter name, or None for the embedding / final norm / lm_head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def param_stage(name: str, ranges: Sequence[Tuple[int, int]]) -> int:
    """Pipeline stage holding parameter `name`: embedding on the first, norm_out/lm_head on the last."""
    layer = layer_index(name)
    if layer is None:
        return 0 if name.startswith("model.tok_embeddings.") else len(ranges) - 1
    for stage, (first, end) in enumerate(ranges):
        if first <= layer < end:
            return stage
    raise ValueError(f"parameter {name}: layer {layer} is outside the stage ranges {list(ranges)}")


def param_stages(name: str, ranges: Sequence[Tuple[int, int]], tied: bool = False) -> Tuple[int, ...]:
    """Pipeline stages holding a copy of parameter `name`: its `param_stage`, and with tied embeddings
    (`tied`) over several stages the last stage too, whose lm_head holds a copy of the embedding."""
    stage = param_stage(name, ranges)
    if tied and stage == 0 and len(ranges) > 1 and name.startswith("model.tok_embeddings."):
        return (0, len(ranges) - 1)
    return (stage,)
