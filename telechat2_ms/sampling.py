"""Next-token selection inside the graph: repetition penalty, temperature, top-k, top-p, greedy.

Order as HF's logits processors: repetition penalty, then temperature, top-k, top-p. Randomness comes from the
host as one uniform number per row, so a compiled step is deterministic given the seed and never recompiles.
Shapes: B batch, V vocab, K candidates (top_k, or V when top_k is 0).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


def apply_repetition_penalty(logits, seen, penalty: float):
    """logits [B,V] fp32, seen [B,V] bool: tokens already in the sequence get logit/p if positive, logit*p if not."""
    if penalty == 1.0:
        return logits
    penalised = ops.where(logits > 0, logits / penalty, logits * penalty)
    return ops.where(seen, penalised, logits)


def greedy_tokens(logits):
    """logits [B,V] -> each row's argmax [B] int32 (the greedy choice; also computed inside the compiled decode
    step for serving's greedy rows)."""
    return ops.cast(ops.argmax(logits, -1), ms.int32)


class TokenSampler(nn.Cell):
    """(logits [B,V] fp32, seen [B,V] bool, uniform [B] fp32 in [0,1)) -> next token ids [B] int32."""

    def __init__(self, vocab_size: int, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0):
        super().__init__()
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.do_sample = do_sample
        self.temperature = float(temperature)
        self.num_candidates = min(top_k, vocab_size) if top_k > 0 else vocab_size
        self.top_p = float(top_p)
        self.repetition_penalty = float(repetition_penalty)

    def construct(self, logits, seen, uniform):
        logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if not self.do_sample:
            return greedy_tokens(logits)
        values, indices = ops.topk(logits / self.temperature, self.num_candidates)  # [B,K] sorted descending
        probs = ops.softmax(values, -1)
        cumulative = ops.cumsum(probs, -1)
        keep = (cumulative - probs) < self.top_p  # the first candidate is always kept
        probs = ops.where(keep, probs, ops.zeros_like(probs))
        cumulative = ops.cumsum(probs, -1)  # [B,K]
        threshold = ops.expand_dims(uniform, -1) * cumulative[:, -1:]
        choice = ops.reduce_sum(ops.cast(cumulative <= threshold, ms.int32), -1)  # inverse CDF
        choice = ops.minimum(choice, self.num_candidates - 1)
        return ops.cast(ops.gather_elements(indices, 1, ops.expand_dims(choice, -1))[:, 0], ms.int32)
