"""Pipeline parallelism: the 1F1B schedule and its executor.

`one_f_one_b(stage, pp, m)` is the per-stage order of forward (F) and backward (B) micro-batch steps:
pp-1-stage warm-up forwards, then alternating F/B, then the remaining backwards, so a stage holds at
most pp-stage micro-batches in flight. `timetable(pp, m)` places those orders on lockstep ticks (one step
per stage per tick, a message sent in tick t is usable from tick t+1); every rank computes the same table,
so all pipeline ranks know which micro-batch each message carries.

`run_pipeline` executes one stage's part of the table. After each tick in which any stage sent something,
the pipeline group does one exchange: activations go to the next stage, gradients to the previous one
(comm.all_gather of [to_next, to_prev], then each stage picks its neighbours' blocks; on CPU that is the
AllReduce emulation, there being no Send/Recv). A stage's forward runs without autograd; its backward
recomputes the forward under `ms.grad` of sum(output * incoming gradient) (full activation recompute:
MindSpore PyNative cannot keep several pending vjp closures alive at once, measured). A single stage (no
pipeline) needs no such split: each micro-batch's loss and gradients come from one value_and_grad pass, so
train.recompute (none / selective / full, Cell.recompute on the layers) decides there as in one process.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, ops

from telechat2_ms.parallel import comm

Step = Tuple[str, int]  # ("F" | "B", micro-batch index)


def one_f_one_b(stage: int, pp: int, micro_batches: int) -> List[Step]:
    """The 1F1B order of one stage."""
    warmup = min(pp - 1 - stage, micro_batches)
    order: List[Step] = [("F", i) for i in range(warmup)]
    forward, backward = warmup, 0
    while forward < micro_batches:
        order += [("F", forward), ("B", backward)]
        forward, backward = forward + 1, backward + 1
    order += [("B", i) for i in range(backward, micro_batches)]
    return order


def timetable(pp: int, micro_batches: int) -> List[List[Optional[Step]]]:
    """ticks[t][stage] = the step that stage runs at tick t (None = idle)."""
    orders = [one_f_one_b(s, pp, micro_batches) for s in range(pp)]
    position = [0] * pp
    done: Dict[Tuple[str, int, int], int] = {}  # (kind, stage, micro-batch) -> tick
    never = 1 << 30
    ticks: List[List[Optional[Step]]] = []
    while any(position[s] < len(orders[s]) for s in range(pp)):
        tick = len(ticks)
        row: List[Optional[Step]] = []
        for s in range(pp):
            if position[s] == len(orders[s]):
                row.append(None)
                continue
            kind, i = orders[s][position[s]]
            if kind == "F":
                ready = s == 0 or done.get(("F", s - 1, i), never) < tick
            else:
                ready = done.get(("F", s, i), never) < tick and (
                    s == pp - 1 or done.get(("B", s + 1, i), never) < tick)
            if ready:
                row.append((kind, i))
                done[(kind, s, i)] = tick
                position[s] += 1
            else:
                row.append(None)
        if all(step is None for step in row):
            raise RuntimeError(f"pipeline timetable deadlocked at tick {tick} (pp={pp}, m={micro_batches})")
        ticks.append(row)
    return ticks


class StageFunctions:
    """What one stage computes for micro-batch i (built by parallelize.TelechatParallel):
    forward(i, x) -> output (hidden states, or the micro-batch loss on the last stage; x is None on the
    first stage), params: the stage's trainable parameters; `local_loss()`: a loss term the last forward of a
    stage before the last one computed from its own layers (an MoE stage's load-balancing share) or None, whose
    gradient the stage's backward adds to the one flowing back from the next stage."""

    def __init__(self, forward: Callable[[int, Optional[Tensor]], Tensor], params: Sequence,
                 activation_shape: Tuple[int, ...], activation_dtype=ms.float32,
                 local_loss: Optional[Callable[[], Optional[Tensor]]] = None):
        self.forward = forward
        self.params = list(params)
        self.activation_shape = tuple(activation_shape)
        self.activation_dtype = activation_dtype
        self.local_loss = local_loss or (lambda: None)


def run_pipeline(stage_fns: StageFunctions, group: comm.Group, micro_batches: int):
    """Run this stage's 1F1B steps. Returns (sum of micro-batch losses on the last stage else None,
    gradients of the stage parameters summed over micro-batches). A single stage takes each micro-batch's loss
    and gradients in one pass (activations kept, or recomputed as the layers' Cell.recompute marks say)."""
    if group.size == 1:
        return _single_stage(stage_fns, micro_batches)
    pp, stage = group.size, max(group.rank, 0)
    first, last = stage == 0, stage == pp - 1
    grads: List = []  # summed over micro-batches; the first micro-batch's gradients start it
    inputs: Dict[int, Tensor] = {}  # micro-batch -> received activation
    grads_in: Dict[int, Tensor] = {}  # micro-batch -> received gradient of our output
    total_loss = None
    zeros = ops.zeros(stage_fns.activation_shape, stage_fns.activation_dtype)
    table = timetable(pp, micro_batches)
    for tick, row in enumerate(table):
        to_next, to_prev = None, None
        step = row[stage]
        if step is not None and step[0] == "F":
            i = step[1]
            out = stage_fns.forward(i, None if first else inputs[i])
            if last:
                total_loss = out if total_loss is None else total_loss + out
            else:
                to_next = out
        elif step is not None:
            i = step[1]
            x = None if first else inputs.pop(i)
            sens = ops.ones((), ms.float32) if last else grads_in.pop(i)

            def surrogate(x_in, i=i, sens=sens):
                value = (ops.cast(stage_fns.forward(i, x_in), ms.float32) * sens).sum()
                extra = None if last else stage_fns.local_loss()
                return value if extra is None else value + extra

            if first:
                weight_grads = ms.grad(lambda: surrogate(None), grad_position=None, weights=stage_fns.params)()
            else:
                dx, weight_grads = ms.grad(surrogate, grad_position=0, weights=stage_fns.params)(x)
                to_prev = dx
            accumulate(grads, weight_grads)
        if pp > 1 and _anyone_sends(table[tick], pp):
            from_prev, from_next = _exchange(to_next, to_prev, zeros, group)
            previous = table[tick][stage - 1] if stage > 0 else None
            following = table[tick][stage + 1] if stage < pp - 1 else None
            if previous is not None and previous[0] == "F":
                inputs[previous[1]] = from_prev
            if following is not None and following[0] == "B":
                grads_in[following[1]] = from_next
    return total_loss, grads


def _single_stage(stage_fns: StageFunctions, micro_batches: int):
    total_loss, grads = None, []
    for i in range(micro_batches):
        def loss_of(i=i):
            return ops.cast(stage_fns.forward(i, None), ms.float32)

        loss, weight_grads = ms.value_and_grad(loss_of, None, weights=stage_fns.params)()
        total_loss = loss if total_loss is None else total_loss + loss
        accumulate(grads, weight_grads)
    return total_loss, grads


def accumulate(total: List, more: Sequence) -> None:
    """total += more, tensor by tensor in place of the list (an empty `total` takes `more`), so that at most one
    extra gradient tensor is alive at a time beyond the two sets."""
    if not total:
        total.extend(more)
        return
    for i, g in enumerate(more):
        total[i] = total[i] + g


def _anyone_sends(row: List[Optional[Step]], pp: int) -> bool:
    return any(step is not None and ((step[0] == "F" and s < pp - 1) or (step[0] == "B" and s > 0))
               for s, step in enumerate(row))


def _exchange(to_next, to_prev, zeros, group: comm.Group):
    """One collective per tick: every stage contributes [to_next, to_prev] (zeros when idle) and picks
    (activation from stage-1, gradient from stage+1)."""
    mine = ops.stack([zeros if t is None else ops.cast(t, zeros.dtype) for t in (to_next, to_prev)], 0)
    everyone = comm.all_gather(ops.expand_dims(mine, 0), group, dim=0)  # [pp, 2, *shape]
    stage, pp = group.rank, group.size
    from_prev = everyone[stage - 1][0] if stage > 0 else zeros
    from_next = everyone[stage + 1][1] if stage < pp - 1 else zeros
    return from_prev, from_next
