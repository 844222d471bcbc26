"""Rank-level helpers for a run under msrun: a barrier, and small JSON objects between ranks (prompts typed
on rank 0 sent to every rank, answers and eval results gathered). Bytes travel as exact float32 values
(CPU collectives accept only float types; integers below 2**24 are exact in float32).
"""
from __future__ import annotations

import json
from typing import Any, List

import numpy as np

from telechat2_ms.parallel import comm


class PeerLost(RuntimeError):
    """A collective came back without every rank's part (a rank died: the CPU backend does not always raise)."""


def barrier() -> None:
    """Wait until every rank gets here: a one-element all-reduce of ones over the world, whose sum must be the
    world size (a dead peer can make the CPU collective return early; then this raises PeerLost)."""
    from mindspore import Tensor

    world = comm.get_world_size()
    total = float(comm.all_reduce(Tensor(np.ones(1, np.float32)), comm.world_group()).asnumpy()[0])
    if total != world:
        raise PeerLost(f"a barrier of {world} ranks counted {total:g}: a rank has died (see its msrun log)")


# ---- small objects between ranks (prompts typed on rank 0, answers gathered on rank 0) -----------------

def _encode(obj: Any) -> np.ndarray:
    data = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    if data.size >= 2 ** 24:
        raise ValueError(f"object of {data.size} bytes is too large to send exactly (limit 2**24)")
    return data


def broadcast_object(obj: Any, root: int = 0) -> Any:
    """Rank `root`'s JSON-serialisable `obj` on every rank (bytes travel as exact float32 values)."""
    from mindspore import Tensor

    group = comm.world_group()
    if group.size == 1:
        return obj
    data = _encode(obj) if group.rank == root else np.zeros(0, np.uint8)
    length = int(comm.broadcast(Tensor(np.array([data.size], np.float32)), group, root).asnumpy()[0])
    buffer = np.zeros(max(length, 1), np.float32)
    buffer[:data.size] = data
    got = comm.broadcast(Tensor(buffer), group, root).asnumpy()[:length]
    return json.loads(got.astype(np.uint8).tobytes().decode("utf-8"))


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's JSON-serialisable `obj`, in rank order, on every rank."""
    from mindspore import Tensor

    group = comm.world_group()
    if group.size == 1:
        return [obj]
    data = _encode(obj)
    lengths = comm.all_gather(Tensor(np.array([data.size], np.float32)), group, 0).asnumpy().astype(np.int64)
    buffer = np.zeros((1, max(int(lengths.max()), 1)), np.float32)  # [1, longest]
    buffer[0, :data.size] = data
    gathered = comm.all_gather(Tensor(buffer), group, 0).asnumpy()  # [world, longest]
    return [json.loads(gathered[i, :lengths[i]].astype(np.uint8).tobytes().decode("utf-8"))
            for i in range(group.size)]
