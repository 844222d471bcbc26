"""The compiled pieces of one optimizer step.

`step(micro_batches, ...)` is the trainer's optimizer step (train/engine.LocalEngine, research/bench_speed):
- one micro-batch: a single compiled graph, `whole_step`: forward + backward, the global gradient norm, the
  clip coefficient min(1, grad_clip / (norm + 1e-6)) / loss_scale (torch's clip_grad_norm_ factor) and the AdamW
  update straight from the gradients, the update inside an in-graph branch taken only when the loss and the
  norm are finite (a skipped step leaves parameters and moments untouched). No gradient accumulators exist:
  on bench_100m (1 x 512, 2-core AVX-512 Xeon) the step takes 1.33-1.34 s at a peak RSS of 3.04 GiB
  against 1.40 s at 3.37 GiB as the three graphs below (the accumulators' 440 MB copy, a second pass over the
  gradients for the norm, three graph launches).
- several micro-batches (gradient accumulation), three kinds of graphs:
    loss_k = micro_step(ids_k, mask_k, denominator, loss_scale)   for each micro-batch
    norm   = grad_norm()                                           of the accumulated (still scaled) gradients
    apply_update(lr, step_size, bc2_sqrt, coef)  or  zero_grads()  (a non-finite norm skips the update)
  with coef = (1 / loss_scale) * min(1, grad_clip / (norm + 1e-6)) computed on the host.

The accumulators are fp32 Parameters (`grad_accum.<name>`, created on the first micro_step), so the state
between the calls lives on the device and no gradient tuple crosses the Python boundary. The first micro-step
of an optimizer step writes its gradients into them and the later ones add theirs (two compiled graphs, the
second only with accumulation), so neither apply_update nor zero_grads clears them (on bench_100m on CPU the
clearing cost 123 ms of a ~2.8 s step). Every input is a Tensor of fixed shape and dtype (scalars are 0-d fp32
Tensors, never Python floats), so each function compiles once: there are no tuple inputs that would need
`ms.mutable`. With use_jit=False the same functions run in PyNative (debugging).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from telechat2_ms.kernels import squared_sum
from telechat2_ms.train.optim import CLIP_EPS, AdamW, clip_coefficient


class _Accumulation(NamedTuple):
    """The gradient accumulators and the (compiled) functions over them."""
    accum: ms.ParameterTuple
    micro_steps: Tuple[Callable, Callable]  # the first micro-step of an optimizer step, a later one
    grad_norm: Callable
    apply_update: Callable


class TrainStep:
    def __init__(self, loss_net, params: Sequence[Parameter], optimizer: AdamW, use_jit: bool = True):
        self.loss_net = loss_net
        self.params = ms.ParameterTuple(params)
        self.optimizer = optimizer
        # the MoE load-balancing part of the loss, summed over the micro-steps since `take_aux_loss`
        self.aux_total = Parameter(Tensor(np.zeros((), np.float32)), name="aux_loss_total", requires_grad=False)
        aux_total = self.aux_total
        self._wrap = ms.jit if use_jit else (lambda fn: fn)

        def scaled_loss(ids, mask, denominator, loss_scale):
            loss, aux = loss_net.loss_and_aux(ids, mask, denominator)
            return loss * loss_scale, aux

        self._grad_fn = grad_fn = ms.value_and_grad(scaled_loss, None, self.params, has_aux=True)

        def whole_step(ids, mask, denominator, loss_scale, max_norm, lr, step_size, bc2_sqrt):
            """One optimizer step of one micro-batch (module docstring); max_norm [] is grad_clip (inf: no
            clipping; the factor is optim.clip_coefficient's, in the graph) -> (loss [], norm [] of the unscaled
            gradients)."""
            (loss, aux), grads = grad_fn(ids, mask, denominator, loss_scale)
            ops.assign_add(aux_total, ops.stop_gradient(aux))
            loss = loss / loss_scale
            norm = global_norm(grads) / loss_scale
            if ops.isfinite(loss) & ops.isfinite(norm):
                optimizer(grads, lr, step_size, bc2_sqrt, ops.minimum(max_norm / (norm + CLIP_EPS), 1.0) / loss_scale)
            return loss, norm

        def take_aux_loss():
            """The load-balancing loss summed since the last call [], and reset."""
            total = aux_total + 0.0
            ops.assign(aux_total, ops.zeros_like(aux_total))
            return total

        self._whole_step = self._wrap(whole_step)
        self.take_aux_loss = self._wrap(take_aux_loss)
        self._accumulation = None  # the accumulators and their graphs, built by the first micro_step
        self._accumulating = False  # the accumulators hold this optimizer step's gradients so far

    def step(self, micro_batches: Sequence[Tuple[Tensor, Tensor]], denominator: Tensor, loss_scale: float,
             grad_clip: float, lr: float, step: int) -> Tuple[float, float, bool]:
        """One optimizer step (1-based `step`) over micro_batches [(ids [b,S] int32, mask [b,S] fp32), ...] ->
        (loss, global norm of the unscaled gradients, whether the update was applied: loss and norm finite)."""
        if len(micro_batches) == 1:
            lr_t, step_size, bc2_sqrt, _ = self.optimizer.step_scalars(lr, step, 1.0)
            max_norm = Tensor(np.float32(grad_clip if grad_clip > 0 else np.inf))
            loss, norm = self._whole_step(*micro_batches[0], denominator, Tensor(np.float32(loss_scale)), max_norm,
                                          lr_t, step_size, bc2_sqrt)
            loss, norm = float(loss.asnumpy()), float(norm.asnumpy())
            return loss, norm, math.isfinite(loss) and math.isfinite(norm)
        scale = Tensor(np.float32(loss_scale))
        loss = sum(float(self.micro_step(ids, mask, denominator, scale).asnumpy()) for ids, mask in micro_batches)
        norm = float(self.grad_norm().asnumpy()) / loss_scale
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            self.apply_update(*self.optimizer.step_scalars(lr, step, clip_coefficient(norm, grad_clip) / loss_scale))
        else:
            self.zero_grads()
        return loss, norm, finite

    @property
    def accum(self) -> ms.ParameterTuple:
        """The gradient accumulators (fp32, one per parameter)."""
        return self._accumulators().accum

    def _accumulators(self) -> _Accumulation:
        """The accumulators and their functions, built on first use."""
        if self._accumulation is None:
            accum = ms.ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"grad_accum.{p.name}",
                                                 requires_grad=False) for p in self.params])
            grad_fn, aux_total, optimizer = self._grad_fn, self.aux_total, self.optimizer

            def micro_step_into(add: bool):
                def micro_step(ids, mask, denominator, loss_scale):
                    """ids [B,S] int32, mask [B,S] fp32, denominator [] fp32, loss_scale [] fp32 -> loss []
                    (unscaled); the gradients added to the accumulators (`add`) or replacing their values."""
                    (loss, aux), grads = grad_fn(ids, mask, denominator, loss_scale)
                    for i in range(len(accum)):
                        if add:
                            ops.assign_add(accum[i], ops.cast(grads[i], ms.float32))
                        else:
                            ops.assign(accum[i], ops.cast(grads[i], ms.float32))
                    ops.assign_add(aux_total, ops.stop_gradient(aux))
                    return loss / loss_scale
                return micro_step

            def grad_norm():
                """Global L2 norm [] of the accumulated gradients (scaled by the loss scale)."""
                return global_norm(accum)

            def apply_update(lr, step_size, bc2_sqrt, coef):
                """AdamW step with gradients accum * coef."""
                return optimizer(tuple(accum), lr, step_size, bc2_sqrt, coef)

            self._accumulation = _Accumulation(accum, (self._wrap(micro_step_into(False)),
                                                       self._wrap(micro_step_into(True))),
                                               self._wrap(grad_norm), self._wrap(apply_update))
        return self._accumulation

    def micro_step(self, ids, mask, denominator, loss_scale):
        """Forward + backward of one micro-batch into the accumulators -> its loss [] (unscaled)."""
        loss = self._accumulators().micro_steps[self._accumulating](ids, mask, denominator, loss_scale)
        self._accumulating = True
        return loss

    def grad_norm(self):
        """Global L2 norm [] of the accumulated gradients (still scaled by the loss scale)."""
        return self._accumulators().grad_norm()

    def apply_update(self, lr, step_size, bc2_sqrt, coef):
        """The AdamW update with the accumulated gradients times coef; the next micro-step starts a new sum."""
        done = self._accumulators().apply_update(lr, step_size, bc2_sqrt, coef)
        self._accumulating = False
        return done

    def zero_grads(self) -> None:
        """Drop the accumulated gradients (a skipped step): the next micro-step starts a new sum."""
        self._accumulating = False


def global_norm(tensors):
    """sqrt(sum of every element squared) [] over a tuple of tensors."""
    total = squared_sum(tensors[0])
    for i in range(1, len(tensors)):
        total = total + squared_sum(tensors[i])
    return ops.sqrt(total)
