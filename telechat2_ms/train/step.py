"""The compiled pieces of one optimizer step: forward+backward into gradient accumulators, gradient norm,
AdamW update.

    loss_k = micro_step(ids_k, mask_k, denominator, loss_scale)   for each of the grad_accum_steps batches
    norm   = grad_norm()                                           of the accumulated (still scaled) gradients
    apply_update(lr, step_size, bc2_sqrt, coef)  or  zero_grads()  (a non-finite norm skips the update)

The accumulators are fp32 Parameters (`grad_accum.<name>`), so the state between the calls lives on the
device and no gradient tuple crosses the Python boundary. The first micro-step of an optimizer step writes its
gradients into them and the later ones add theirs (two compiled graphs, the second only with accumulation), so
neither apply_update nor zero_grads clears them (on bench_100m on CPU the clearing cost 123 ms of a ~2.8 s
step). Every input is a Tensor of fixed shape and dtype
(scalars are 0-d fp32 Tensors, never Python floats), so each function compiles once: there are no tuple
inputs that would need `ms.mutable`. With use_jit=False the same functions run in PyNative (debugging).
The host computes coef = (1 / loss_scale) * min(1, grad_clip / (norm + 1e-6)) from the returned norm, as
torch's clip_grad_norm_ does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, ops

from telechat2_ms.kernels import squared_sum
from telechat2_ms.train.optim import AdamW


class TrainStep:
    def __init__(self, loss_net, params: Sequence[Parameter], optimizer: AdamW, use_jit: bool = True):
        self.loss_net = loss_net
        self.params = ms.ParameterTuple(params)
        self.accum = ms.ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"grad_accum.{p.name}",
                                                  requires_grad=False) for p in params])
        self.optimizer = optimizer
        # the MoE load-balancing part of the loss, summed over the micro-steps since `take_aux_loss`
        self.aux_total = Parameter(Tensor(np.zeros((), np.float32)), name="aux_loss_total", requires_grad=False)
        accum, aux_total = self.accum, self.aux_total

        def scaled_loss(ids, mask, denominator, loss_scale):
            loss, aux = loss_net.loss_and_aux(ids, mask, denominator)
            return loss * loss_scale, aux

        grad_fn = ms.value_and_grad(scaled_loss, None, self.params, has_aux=True)

        def micro_step_into(add: bool):
            def micro_step(ids, mask, denominator, loss_scale):
                """ids [B,S] int32, mask [B,S] fp32, denominator [] fp32, loss_scale [] fp32 -> loss [] (unscaled);
                the gradients added to the accumulators (`add`) or replacing their values."""
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
            total = squared_sum(accum[0])
            for i in range(1, len(accum)):
                total = total + squared_sum(accum[i])
            return ops.sqrt(total)

        def apply_update(lr, step_size, bc2_sqrt, coef):
            """AdamW step with gradients accum * coef."""
            return optimizer(tuple(accum), lr, step_size, bc2_sqrt, coef)

        def take_aux_loss():
            """The load-balancing loss summed since the last call [], and reset."""
            total = aux_total + 0.0
            ops.assign(aux_total, ops.zeros_like(aux_total))
            return total

        wrap = ms.jit if use_jit else (lambda fn: fn)
        self.take_aux_loss = wrap(take_aux_loss)
        self._micro_steps = (wrap(micro_step_into(False)), wrap(micro_step_into(True)))
        self._accumulating = False  # the accumulators hold this optimizer step's gradients so far
        self.grad_norm = wrap(grad_norm)
        self._apply_update = wrap(apply_update)

    def micro_step(self, ids, mask, denominator, loss_scale):
        """Forward + backward of one micro-batch into the accumulators -> its loss [] (unscaled)."""
        loss = self._micro_steps[self._accumulating](ids, mask, denominator, loss_scale)
        self._accumulating = True
        return loss

    def apply_update(self, lr, step_size, bc2_sqrt, coef):
        """The AdamW update with the accumulated gradients times coef; the next micro-step starts a new sum."""
        done = self._apply_update(lr, step_size, bc2_sqrt, coef)
        self._accumulating = False
        return done

    def zero_grads(self) -> None:
        """Drop the accumulated gradients (a skipped step): the next micro-step starts a new sum."""
        self._accumulating = False
