"""Data-parallel evaluation: which subjects a rank scores, and gathering the finished subjects on rank 0.

Rank layout: the `world` ranks form `data_parallel` replicas of `world // data_parallel` consecutive ranks
(the model-parallel ranks of one replica are consecutive, Megatron's order with tensor parallel innermost).
Every rank of a replica scores the same subjects in the same order (the model's collectives need that);
the first rank of a replica (its leader) saves and contributes the results. Subjects are spread over
replicas by size, largest first onto the least-loaded replica, so the split is deterministic and balanced.

The gather is a callable `gather_fn(obj) -> list of every rank's obj` (at least on rank 0), so the logic
is tested without msrun; `mindspore_gather_objects` is that callable over the world group.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

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


def mindspore_gather_objects(obj: Any) -> List[Any]:
    """All-gather of a JSON-serialisable object over the MindSpore world group (needs
    telechat2_ms.parallel.comm.init_distributed()). The UTF-8 bytes travel as float32 (CPU collectives
    accept only float types; integers below 2**24 are exact in float32, so nothing is rounded)."""
    from mindspore import Tensor

    from telechat2_ms.parallel import comm

    group = comm.world_group()
    data = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    if data.size >= 2 ** 24:
        raise ValueError(f"result payload of {data.size} bytes is too large to gather exactly (limit 2**24)")
    lengths = comm.all_gather(Tensor(np.array([data.size], np.float32)), group, dim=0).asnumpy()  # [world]
    lengths = lengths.astype(np.int64)
    buffer = np.zeros((1, max(int(lengths.max()), 1)), np.float32)  # [1, longest]
    buffer[0, :data.size] = data
    gathered = comm.all_gather(Tensor(buffer), group, dim=0).asnumpy()  # [world, longest]
    return [json.loads(gathered[i, :lengths[i]].astype(np.uint8).tobytes().decode("utf-8"))
            for i in range(group.size)]
