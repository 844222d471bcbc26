"""Every collective and autograd region of telechat2_ms.parallel.comm against numpy, inside an msrun job
(task `comm` of worker_parallel.py, 2 or 4 workers).

Layout dp=world/2 x tp=2, so the tp and dp groups are real sub-groups when world = 4. Each check's max abs
error goes to OUT_DIR/comm_rank{r}.json; the test asserts all are exactly 0 (sums of at most 4 small
integers are exact in fp32).
"""
import json
import os

import numpy as np

import mindspore as ms
from mindspore import Tensor

from telechat2_ms.parallel import comm
from telechat2_ms.parallel.dims import ParallelDims, build_groups


def rank_data(rank: int, shape=(2, 4, 3)) -> np.ndarray:
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 100 * rank).astype(np.float32)


def run_comm_checks(out_dir: str) -> None:
    rank, world = comm.get_rank(), comm.get_world_size()
    dims = ParallelDims(dp=world // 2, tp=2)
    groups = build_groups(dims)
    errors = {}

    for kind in ("tp", "dp"):
        group = getattr(groups, kind)
        if group.size == 1:
            continue
        mine = rank_data(rank)
        others = [rank_data(r) for r in group.ranks]
        x = Tensor(mine)
        checks = {
            "all_reduce": (comm.all_reduce(x, group), sum(others)),
            "all_reduce_max": (comm.all_reduce(x, group, "max"), np.maximum.reduce(others)),
            "all_gather_d1": (comm.all_gather(x, group, 1), np.concatenate(others, 1)),
            "all_gather_d-1": (comm.all_gather(x, group, -1), np.concatenate(others, -1)),
            "reduce_scatter_d1": (comm.reduce_scatter(x, group, 1),
                                  np.split(sum(others), group.size, 1)[group.rank]),
            "broadcast_root1": (comm.broadcast(x, group, 1), others[1]),
            "ring_shift+1": (comm.ring_shift(x, group, 1), others[(group.rank - 1) % group.size]),
            "ring_shift-1": (comm.ring_shift(x, group, -1), others[(group.rank + 1) % group.size]),
            "split_d1": (comm.split(x, group, 1), np.split(mine, group.size, 1)[group.rank]),
        }
        # the pipeline's step: x forward, 2x back; zeros past the chain's ends
        from_prev, from_next = comm.neighbour_exchange(x, x * 2, group)
        me, zero = group.rank, np.zeros_like(mine)
        checks["neighbour_exchange_from_prev"] = (from_prev, others[me - 1] if me > 0 else zero)
        checks["neighbour_exchange_from_next"] = (from_next, 2 * others[me + 1] if me < group.size - 1 else zero)
        # autograd regions: d/dx sum(w * f(x)) with a rank-dependent w
        w_full = rank_data(rank, (2, 4 * group.size, 3)) * 0.5
        w_same = rank_data(rank) * 0.5
        all_w_full = [rank_data(r, (2, 4 * group.size, 3)) * 0.5 for r in group.ranks]
        all_w_same = [rank_data(r) * 0.5 for r in group.ranks]
        regions = {
            "copy_to": (comm.CopyToRegion(group), w_same, sum(all_w_same)),
            "reduce_from": (comm.ReduceFromRegion(group), w_same, w_same),
            "gather_from": (comm.GatherFromRegion(group, 1), w_full, np.split(w_full, group.size, 1)[group.rank]),
            "gather_from_sp": (comm.GatherFromSPRegion(group, 1), w_full,
                               np.split(sum(all_w_full), group.size, 1)[group.rank]),
            "reduce_scatter_to_sp": (comm.ReduceScatterToSPRegion(group, 1), w_same[:, : 4 // group.size],
                                     np.concatenate([w[:, : 4 // group.size] for w in all_w_same], 1)),
        }
        for name, (cell, w, expected_grad) in regions.items():
            weight = Tensor(w)
            grad = ms.grad(lambda t: (cell(t) * weight).sum())(x)
            checks[f"grad_{name}"] = (grad, expected_grad)
        # all-to-all of uneven row counts (some 0): member r sends (r + 2 d) % 3 rows to member d
        counts = [[(r + 2 * d) % 3 for d in range(group.size)] for r in range(group.size)]
        rows = [np.arange(3 * sum(c), dtype=np.float32).reshape(sum(c), 3) + 100 * r for r, c in enumerate(counts)]
        me, send = group.rank, counts[group.rank]
        recv = comm.exchange_counts(send, group)
        pieces = [np.split(rows[r], np.cumsum(counts[r])[:-1]) for r in range(group.size)]  # [sender][receiver]
        want = np.concatenate([pieces[r][me] for r in range(group.size)])
        checks["exchange_counts"] = (Tensor(np.array(recv, np.float32)),
                                     np.array([counts[r][me] for r in range(group.size)], np.float32))
        checks["all_to_all"] = (comm.all_to_all(Tensor(rows[me]), send, recv, group), want)
        # its gradient: d/dx sum(w * all_to_all(x)), w the receiver's rank-dependent weights -> each row's receiver's
        weight_rows = [np.split(rank_data(d, (sum(counts[r][d] for r in range(group.size)), 3)),
                            np.cumsum([counts[r][d] for r in range(group.size)])[:-1]) for d in range(group.size)]
        cell, weight = comm.AllToAllRows(group), Tensor(np.concatenate(weight_rows[me]))
        send_t, recv_t = Tensor(np.array(send, np.int32)), Tensor(np.array(recv, np.int32))
        grad = ms.grad(lambda t: (cell(t, send_t, recv_t) * weight).sum())(Tensor(rows[me]))
        checks["grad_all_to_all"] = (grad, np.concatenate([weight_rows[d][me] for d in range(group.size)]))
        for name, (got, want) in checks.items():
            got = got.asnumpy()
            err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
            errors[f"{kind}:{name}"] = err

    with open(os.path.join(out_dir, f"comm_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "world": world, "groups": {k: list(getattr(groups, k).ranks)
                                                              for k in ("tp", "dp")}, "errors": errors}, f)
    print(f"rank {rank}: {len(errors)} checks, max error {max(errors.values(), default=0.0)}")
