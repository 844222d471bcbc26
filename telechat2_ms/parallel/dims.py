"""ParallelDims: the degrees of parallelism of one run, validated, and the rank <-> coordinate map.

Rank order (tp fastest, then cp, dp, pp), as in Megatron, so a tensor-parallel group is a block of
neighbouring ranks (one node) and pipeline stages are the outermost split:

    rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

Groups: `tp` (same pp, dp, cp), `cp` (same pp, dp, tp), `dp` (same pp, cp, tp), `pp` (same dp, cp, tp) and
`grad` = dp x cp (same pp, tp): the replicas whose gradients are summed after a step.

Expert parallelism (mixture-of-experts models) lives inside data parallel, as in MindFormers: `ep` divides dp,
and each block of `ep` consecutive dp ranks (`ep` group: same pp, cp, tp) splits the experts of every sparse
layer, rank i of the block holding experts [i*E/ep, (i+1)*E/ep); tokens reach their experts over that group.
The replicas of one expert shard are the `expert_grad` group: the grad-group members with the same index in
their block (dp / ep of them, x cp), over which expert gradients are summed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

from telechat2_ms.config import ConfigError, ModelConfig
from telechat2_ms.parallel.plan import check_tp, stage_layer_ranges


def check_experts(cfg: ModelConfig, dims: "ParallelDims") -> None:
    """What expert parallelism and a mixture-of-experts model under msrun need (ConfigError naming the setting)."""
    if dims.ep > 1 and not cfg.num_experts:
        raise ConfigError(f"parallel_config.expert_parallel is {dims.ep} but {cfg.name} has no experts")
    if cfg.num_experts % dims.ep:
        raise ConfigError(f"parallel_config.expert_parallel ({dims.ep}) must divide num_experts ({cfg.num_experts})")
    if cfg.moe_ffn_hidden_size % dims.tp:
        raise ConfigError(f"model_parallel ({dims.tp}) must divide moe_ffn_hidden_size ({cfg.moe_ffn_hidden_size})")
    if dims.ep > 1 and dims.optimizer_shard:
        raise ConfigError("parallel_config.optimizer_shard with expert_parallel > 1 is not built (the expert shards' "
                          "replicas are not the data-parallel group); set optimizer_shard to false")
    if dims.pp > 1 and cfg.aux_loss == "global":
        raise ConfigError(f"parallel_config.pipeline_stage {dims.pp}: {cfg.name}'s load-balancing loss is taken over "
                          f"every layer at once (transformers' load_balancing_loss_func), which pipeline stages do not "
                          f"share yet; set pipeline_stage to 1")
    unsupported = [f"{key} {value}" for key, value in (("context_parallel", dims.cp),) if value > 1] + (
        ["use_seq_parallel"] if dims.seq_parallel else [])
    if unsupported:
        raise ConfigError(f"parallel_config: a mixture-of-experts model runs under data, expert, model and pipeline "
                          f"parallel; {', '.join(unsupported)} with experts is not built yet")

GROUP_KINDS = ("tp", "cp", "dp", "pp", "grad", "embed", "ep", "expert_grad")


class RankCoords(NamedTuple):
    pp: int
    dp: int
    cp: int
    tp: int


@dataclass(frozen=True)
class ParallelDims:
    """dp x tp x pp x cp processes; `sp` shards norm/residual regions on the sequence over the tp group;
    `micro_batch_num` micro-batches per step (pipeline); `pipeline_layer_counts` layers per stage
    (empty = even split); `optimizer_shard` shards optimizer states over the dp group; `ep` splits the experts of
    a mixture-of-experts model over blocks of ep data-parallel ranks."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False
    micro_batch_num: int = 1
    pipeline_layer_counts: Tuple[int, ...] = field(default_factory=tuple)
    optimizer_shard: bool = False
    world: Optional[int] = None  # None: dp*tp*pp*cp (checked against the real world size by `check_world`)
    ep: int = 1

    def __post_init__(self):
        for key in ("dp", "tp", "pp", "cp", "micro_batch_num", "ep"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel {key} must be a positive integer, got {value!r}")
        object.__setattr__(self, "pipeline_layer_counts", tuple(int(c) for c in self.pipeline_layer_counts))
        product = self.dp * self.tp * self.pp * self.cp
        if self.world is None:
            object.__setattr__(self, "world", product)
        elif product != self.world:
            raise ConfigError(
                f"data_parallel ({self.dp}) x model_parallel ({self.tp}) x pipeline_stage ({self.pp}) x "
                f"context_parallel ({self.cp}) = {product}, but the world has {self.world} processes")
        if self.sp and self.cp > 1:
            raise ConfigError("use_seq_parallel with context_parallel > 1 is not supported (MindFormers makes "
                              "them mutually exclusive too); set use_seq_parallel: false")
        if self.pp > 1 and self.micro_batch_num < self.pp:
            raise ConfigError(f"micro_batch_num ({self.micro_batch_num}) must be >= pipeline_stage ({self.pp}) "
                              "for the 1F1B schedule to fill the pipeline")
        if self.dp % self.ep:
            raise ConfigError(f"expert_parallel ({self.ep}) must divide data_parallel ({self.dp}): experts are split "
                              f"over blocks of data-parallel ranks")
        if self.pipeline_layer_counts and len(self.pipeline_layer_counts) != self.pp:
            raise ConfigError(f"pipeline_layer_counts {list(self.pipeline_layer_counts)} has "
                              f"{len(self.pipeline_layer_counts)} entries; pipeline_stage is {self.pp}")

    # ---- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings, world: Optional[int] = None) -> "ParallelDims":
        """From telechat2_ms.settings.ParallelSettings (YAML `parallel_config`)."""
        return cls(dp=settings.data_parallel, tp=settings.model_parallel, pp=settings.pipeline_stage,
                   cp=settings.context_parallel, sp=bool(settings.use_seq_parallel),
                   micro_batch_num=settings.micro_batch_num,
                   pipeline_layer_counts=tuple(settings.pipeline_layer_counts),
                   optimizer_shard=bool(settings.optimizer_shard), world=world,
                   ep=getattr(settings, "expert_parallel", 1))

    @property
    def seq_parallel(self) -> bool:
        """Sequence parallelism is active (it is a no-op without tensor parallelism)."""
        return self.sp and self.tp > 1

    def check_world(self, world_size: int) -> None:
        if self.world != world_size:
            raise ConfigError(f"parallel layout needs {self.world} processes (dp {self.dp} x tp {self.tp} x "
                              f"pp {self.pp} x cp {self.cp}) but msrun started {world_size}")

    # ---- validation against a model and a batch ----------------------------------------------------------
    def check_model(self, cfg: ModelConfig) -> None:
        """Raise ConfigError when `cfg` cannot be split this way (tp rules and stage ranges: parallel/plan.py)."""
        check_tp(cfg, self.tp)
        self.stage_layer_ranges(cfg.num_layers)
        if self.ep > 1 or (cfg.num_experts and self.world > 1):
            check_experts(cfg, self)

    def check_batch(self, batch_size: int, seq_length: int) -> None:
        """Global batch [batch_size, seq_length] tokens (inputs, after the label shift)."""
        per_replica, rest = divmod(batch_size, self.dp)
        if rest:
            raise ConfigError(f"batch size {batch_size} is not divisible by data_parallel {self.dp}")
        if per_replica % self.micro_batch_num:
            raise ConfigError(f"per-replica batch {per_replica} (batch {batch_size} / data_parallel {self.dp}) "
                              f"is not divisible by micro_batch_num {self.micro_batch_num}")
        if self.cp > 1 and seq_length % (2 * self.cp):
            raise ConfigError(f"seq_length {seq_length} must be divisible by 2 x context_parallel "
                              f"({2 * self.cp}) for the zig-zag split")
        if self.seq_parallel and (seq_length // self.cp) % self.tp:
            raise ConfigError(f"seq_length {seq_length} must be divisible by model_parallel {self.tp} "
                              "with use_seq_parallel")

    def stage_layer_ranges(self, num_layers: int) -> List[Tuple[int, int]]:
        """[(first, end)] global layer range per pipeline stage (parallel/plan.py's rule)."""
        return stage_layer_ranges(num_layers, self.pp, list(self.pipeline_layer_counts) or None,
                                  "pipeline_layer_counts")

    # ---- ranks and groups ---------------------------------------------------------------------------------
    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside a world of {self.world}")
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return RankCoords(pp_rank, dp_rank, cp_rank, tp_rank)

    def rank_of(self, pp: int = 0, dp: int = 0, cp: int = 0, tp: int = 0) -> int:
        return ((pp * self.dp + dp) * self.cp + cp) * self.tp + tp

    def group_ranks(self, kind: str, rank: int) -> List[int]:
        """Global ranks of `rank`'s group of `kind` (one of GROUP_KINDS), in group order."""
        c = self.coords(rank)
        if kind == "tp":
            return [self.rank_of(c.pp, c.dp, c.cp, t) for t in range(self.tp)]
        if kind == "cp":
            return [self.rank_of(c.pp, c.dp, x, c.tp) for x in range(self.cp)]
        if kind == "dp":
            return [self.rank_of(c.pp, d, c.cp, c.tp) for d in range(self.dp)]
        if kind == "pp":
            return [self.rank_of(p, c.dp, c.cp, c.tp) for p in range(self.pp)]
        if kind == "grad":
            return [self.rank_of(c.pp, d, x, c.tp) for d in range(self.dp) for x in range(self.cp)]
        if kind == "ep":
            block = c.dp - c.dp % self.ep
            return [self.rank_of(c.pp, d, c.cp, c.tp) for d in range(block, block + self.ep)]
        if kind == "expert_grad":
            return [self.rank_of(c.pp, d, x, c.tp) for d in range(c.dp % self.ep, self.dp, self.ep)
                    for x in range(self.cp)]
        if kind == "embed":  # tied embeddings: the first stage's embedding and the last stage's copy of it
            if self.pp == 1 or 0 < c.pp < self.pp - 1:
                return [rank]
            return [self.rank_of(0, c.dp, c.cp, c.tp), self.rank_of(self.pp - 1, c.dp, c.cp, c.tp)]
        raise ValueError(f"unknown group kind {kind!r}; expected one of {GROUP_KINDS}")

    def all_groups(self, kind: str) -> List[List[int]]:
        """Every distinct group of `kind` (each rank appears in exactly one)."""
        seen: Dict[Tuple[int, ...], None] = {}
        for rank in range(self.world):
            seen.setdefault(tuple(self.group_ranks(kind, rank)), None)
        return [list(g) for g in seen]

    def describe(self) -> str:
        return (f"dp{self.dp}{f' (ep{self.ep})' if self.ep > 1 else ''} tp{self.tp}{'+sp' if self.seq_parallel else ''} "
                f"pp{self.pp} cp{self.cp} "
                f"(world {self.world}, micro_batch_num {self.micro_batch_num})")


class ParallelGroups(NamedTuple):
    """This process's communication groups for a layout (comm.Group objects)."""

    dims: ParallelDims
    coords: RankCoords
    tp: object
    cp: object
    dp: object
    pp: object
    grad: object
    embed: object  # first and last pipeline stage of a model with tied embeddings (else this rank alone)
    ep: object  # the expert-parallel block this rank splits the experts with
    expert_grad: object  # the replicas of this rank's expert shard


def build_groups(dims: ParallelDims, rank: Optional[int] = None, tied: bool = False,
                 experts: bool = False) -> ParallelGroups:
    """Create (as a member) this rank's tp/cp/dp/pp/grad groups, with `tied` (tie_word_embeddings) the embed group
    that keeps the last stage's copy of the embedding equal to the first stage's, and with `experts` (a
    mixture-of-experts model) the ep and expert_grad groups (each the group made before it with the same ranks,
    if there is one). In a single process every group has size 1."""
    from telechat2_ms.parallel import comm

    rank = comm.get_rank() if rank is None else rank
    dims.check_world(comm.get_world_size())
    groups, by_ranks = {}, {}
    for kind in GROUP_KINDS:
        wanted = (kind != "embed" or tied) and (kind not in ("ep", "expert_grad") or experts)
        ranks = tuple(dims.group_ranks(kind, rank)) if wanted else (rank,)
        if kind in ("ep", "expert_grad") and ranks in by_ranks:
            groups[kind] = by_ranks[ranks]
            continue
        groups[kind] = by_ranks[ranks] = comm.new_group(ranks, kind)
    return ParallelGroups(dims=dims, coords=dims.coords(rank), **groups)
