"""Pipeline parallelism: the 1F1B schedule and its executor.

`one_f_one_b(stage, pp, m)` is the per-stage order of forward (F) and backward (B) micro-batch steps:
pp-1-stage warm-up forwards, then alternating F/B, then the remaining backwards, so a stage holds at
most pp-stage micro-batches in flight. `timetable(pp, m)` places those orders on lockstep ticks (one step
per stage per tick, a message sent in tick t is usable from tick t+1); every rank computes the same table,
so all pipeline ranks know which micro-batch each message carries.

`run_pipeline` executes one stage's part of the table. After each tick in which any stage sent something,
the pipeline group does one exchange (comm.neighbour_exchange): activations go to the next stage, gradients to
the previous one (HCCL sends on Ascend; on CPU an all-gather of every stage's [to_next, to_prev] from which each
stage picks its neighbours' blocks, there being no Send/Recv). A stage's forward runs without autograd; its backward
recomputes the forward under `ms.grad` of sum(output * incoming gradient) (full activation recompute:
MindSpore PyNative cannot keep several pending vjp closures alive at once, measured). Each of these runs as one
compiled graph with settings.jit (StageFunctions). A single stage (no
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
    """What one stage computes, from `cell` (parallelize.StageForward): cell(x, inputs) -> (out, local, share)
    with x the previous stage's activations (a placeholder on the first stage), inputs a tuple of Tensors; out the
    activations for the next stage, or on the last stage the micro-batch loss; local a loss term of the stage's own
    layers (an MoE stage's load-balancing share) that a stage before the last adds to its backward; share a value
    to record (stop_gradient). `begin(inputs)` starts a step: inputs(i) gives micro-batch i's inputs. With `compiled` the forward, the
    backward and the single-stage value_and_grad each run as one ms.jit graph (compiled once per input shape);
    without, op by op (PyNative). Both compute the same values: one function, two ways to run it.

        forward(i, x) -> out                       the F step (no autograd); records shares[i]
        backward(i, x, sens) -> (dx or None, grads) the B step: gradients of sum(out * sens) (+ local), the
                                                   forward recomputed inside
        value_and_grad(i) -> (loss, grads)         a single stage: loss and gradients in one pass"""

    def __init__(self, cell, params: Sequence, activation_shape: Tuple[int, ...], activation_dtype=ms.float32,
                 first: bool = True, last: bool = True, compiled: bool = False):
        self.params = list(params)
        self.inputs: Callable[[int], tuple] = lambda i: ()
        self.activation_shape = tuple(activation_shape)
        self.activation_dtype = activation_dtype
        self.first = first
        self.compiled = compiled
        self.shares: Dict[int, Tensor] = {}
        self.placeholder = ops.zeros((1,), ms.float32)  # the first stage's x
        weights = ms.ParameterTuple(self.params)

        def forward(x, inputs):
            out, _, share = cell(x, inputs)
            return out, share

        def surrogate(x, sens, inputs):
            out, local, _ = cell(x, inputs)
            value = (ops.cast(out, ms.float32) * sens).sum()
            return value if last else value + local

        def loss(inputs):
            out, _, share = cell(self.placeholder, inputs)
            return ops.cast(out, ms.float32), share

        wrap = ms.jit if compiled else (lambda fn: fn)
        self._forward = wrap(forward)
        self._backward = wrap(ms.grad(surrogate, grad_position=None if first else 0, weights=weights))
        self._value_and_grad = wrap(ms.value_and_grad(loss, None, weights=weights, has_aux=True))

    def begin(self, inputs: Callable[[int], tuple]) -> None:
        """A new step: `inputs(i)` gives micro-batch i's inputs; the recorded shares are cleared."""
        # mutable: a compiled function takes a plain tuple argument as a constant (new Tensors, a new graph per call)
        self.inputs = (lambda i: ms.mutable(inputs(i))) if self.compiled else inputs
        self.shares = {}

    def forward(self, i: int, x: Optional[Tensor]) -> Tensor:
        out, self.shares[i] = self._forward(self.placeholder if x is None else x, self.inputs(i))
        return out

    def backward(self, i: int, x: Optional[Tensor], sens: Tensor):
        if self.first:
            return None, self._backward(self.placeholder, sens, self.inputs(i))
        dx, grads = self._backward(x, sens, self.inputs(i))
        return dx, grads

    def value_and_grad(self, i: int):
        (loss, self.shares[i]), grads = self._value_and_grad(self.inputs(i))
        return loss, grads


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
            to_prev, weight_grads = stage_fns.backward(i, x, sens)
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
        loss, weight_grads = stage_fns.value_and_grad(i)
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
    """One exchange per tick: every stage sends (zeros when idle) and gets (activation from stage-1, gradient
    from stage+1)."""
    return comm.neighbour_exchange(*(zeros if t is None else ops.cast(t, zeros.dtype) for t in (to_next, to_prev)),
                                   group)
