"""The training loss: masked next-token cross-entropy over a padded [B,S] batch (spec 1.5, 6.2).

    loss = sum_{b, p >= 1} mask[b, p] * -log softmax(logits[b, p - 1])[ids[b, p]]  /  denominator

mask[b, p] = 1 marks token p as a target (data/sft.py, data/pretrain.py). The denominator is passed in: the
number of targets of the whole optimizer step (all micro-batches of a gradient-accumulation step), so summing
micro-batch losses and gradients gives exactly the loss of one big batch (OFF-DS divides by the mask sum,
MindFormers by the mask sum + 1e-8; with the count of the whole step both are the same up to that 1e-8).
Logits are fp32 (the model casts them) and log-softmax runs in fp32.
"""
from __future__ import annotations

import numpy as np

from mindspore import Tensor, nn, ops


class CausalLMLoss(nn.Cell):
    """construct(input_ids [B,S] int32, loss_mask [B,S] fp32, denominator [] fp32) -> loss [] fp32.

    The rotary tables, positions and causal mask are fixed for one (batch, seq_length) and built once.
    Right padding needs no attention mask: causal attention never lets a real token see a later pad.
    A mixture-of-experts model adds its load-balancing loss (model.aux_loss, over this micro-batch's rows)
    times `aux_weight`: 1 / the micro-batches of one optimizer step, so a step's loss holds their mean."""

    def __init__(self, model, batch_size: int, seq_length: int, aux_weight: float = 1.0):
        super().__init__(auto_prefix=False)  # keep the model's parameter names (no "model." prefix)
        self.model = model
        dummy = Tensor(np.zeros((batch_size, seq_length), np.int32))
        self.position_ids, self.allowed, self.inv_freq, self.mscale = model.prepare_inputs(dummy)
        self.aux_weight = float(aux_weight)

    def token_loss(self, logits, input_ids, loss_mask, denominator):
        log_probs = ops.log_softmax(logits[:, :-1], -1)  # [B,S-1,V]: position p-1 predicts token p
        targets = ops.expand_dims(input_ids[:, 1:], -1)  # [B,S-1,1]
        nll = -ops.gather_elements(log_probs, 2, targets)[..., 0]  # [B,S-1]
        return ops.reduce_sum(nll * loss_mask[:, 1:]) / denominator

    def loss_and_aux(self, input_ids, loss_mask, denominator):
        """(the training loss [], the weighted load-balancing part of it []: 0 for a dense model)."""
        hidden, _, aux = self.model.model(input_ids, self.position_ids, self.allowed, self.inv_freq, self.mscale,
                                          None, None, True)
        weighted = aux * self.aux_weight
        return self.token_loss(self.model.logits(hidden), input_ids, loss_mask, denominator) + weighted, weighted

    def construct(self, input_ids, loss_mask, denominator):
        return self.loss_and_aux(input_ids, loss_mask, denominator)[0]


def count_targets(loss_mask: np.ndarray) -> int:
    """Number of predicted tokens in a [B,S] mask (position 0 is never predicted)."""
    return int(np.asarray(loss_mask)[:, 1:].sum())


def cast_batch(ids: np.ndarray, mask: np.ndarray):
    """numpy batch -> (input_ids int32 Tensor, loss_mask fp32 Tensor)."""
    return Tensor(np.ascontiguousarray(ids, np.int32)), Tensor(np.ascontiguousarray(mask, np.float32))

