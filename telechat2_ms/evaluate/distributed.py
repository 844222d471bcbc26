"""Data-parallel evaluation: which subjects a rank scores, and gathering the finished subjects on rank 0.

Rank layout: the `world` ranks form `data_parallel` replicas of `world // data_parallel` consecutive ranks
(the model-parallel ranks of one replica are consecutive, Megatron's order with tensor parallel innermost).
Every rank of a replica scores the same subjects in the same order (the model's collectives need that);
the first rank of a replica (its leader) saves and contributes the results. Subjects are spread over
replicas by size, largest first onto the least-loaded replica, so the split is deterministic and balanced.

The gather is a callable `gather_fn(obj) -> list of every rank's obj` (at least on rank 0), so the logic
is tested without msrun; under msrun it is telechat2_ms.parallel.ranks.gather_objects.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

GatherFn = Callable[[Any], Optional[List[Any]]]


def replica_of(rank: int, world: int, data_parallel: int) -> Tuple[int, bool]:
    """(data-parallel replica index of `rank`, whether it is the replica's leader)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    if data_parallel < 1 or world % data_parallel:
        raise ValueError(f"data_parallel={data_parallel} does not divide the number of ranks ({world})")
    group = world // data_parallel
    return rank // group, rank % group == 0


def split_subjects(subjects: Sequence[str], sizes: Mapping[str, int], replica: int, replicas: int) -> List[str]:
    """The subjects replica `replica` of `replicas` scores, in alphabetical order. Greedy by size
    (largest first, ties by name) onto the least-loaded replica (ties: lowest index)."""
    if not 0 <= replica < replicas:
        raise ValueError(f"replica {replica} is not in 0..{replicas - 1}")
    load = [0] * replicas
    owner: Dict[str, int] = {}
    for s in sorted(subjects, key=lambda s: (-int(sizes[s]), s)):
        target = min(range(replicas), key=lambda r: (load[r], r))
        owner[s] = target
        load[target] += int(sizes[s])
    return sorted(s for s in subjects if owner[s] == replica)


def gather_records(local: Dict[str, Any], rank: int, world: int, gather_fn: Optional[GatherFn]) -> Optional[Dict[str, Any]]:
    """Merge every rank's {subject: record} on rank 0 (None on the other ranks). Every rank must call it.
    A subject reported twice must carry the same record (model-parallel peers may both report)."""
    if world == 1:
        return dict(local)
    if gather_fn is None:
        raise ValueError(f"world size is {world} but no gather function was given")
    parts = gather_fn(local)
    if rank != 0:
        return None
    if parts is None or len(parts) != world:
        raise ValueError(f"gather returned {None if parts is None else len(parts)} parts for {world} ranks")
    merged: Dict[str, Any] = {}
    for source, part in enumerate(parts):
        for subject, record in part.items():
            if subject in merged and merged[subject] != record:
                raise ValueError(f"ranks disagree on the results of subject {subject!r} (rank {source})")
            merged[subject] = record
    return merged
