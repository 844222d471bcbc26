"""Build the evaluator's `next_token_logits(batch) -> [N, V]` from a MindSpore Telechat2ForCausalLM.

The batch is left-padded with the pad id (3) so every row's last real token sits in the last column; the
attention mask hides the pads and `position_ids = clip(cumsum(mask) - 1, 0)` gives every row the positions
it would have unpadded (0 for the pads). Only the last column goes through `lm_head`, so a [B, S, V]
logits tensor (8 GiB for B=4, S=4096, V=131072 in fp32) is never built. Under tensor parallelism the model
does its own communication; this adapter just calls it.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, pad_to_multiple: int = 1) -> Tuple[np.ndarray, ...]:
    """Token lists -> (input_ids [B,S] int32, attention_mask [B,S] int32, position_ids [B,S] int32), left-padded
    to the longest row rounded up to `pad_to_multiple` (fewer distinct shapes for compiled graphs)."""
    if not batch or any(len(row) == 0 for row in batch):
        raise ValueError("left_pad needs a non-empty batch of non-empty token lists")
    longest = max(len(row) for row in batch)
    seq = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = np.full((len(batch), seq), pad_id, dtype=np.int32)  # [B,S]
    attention_mask = np.zeros((len(batch), seq), dtype=np.int32)  # [B,S]
    for i, row in enumerate(batch):
        input_ids[i, seq - len(row):] = row
        attention_mask[i, seq - len(row):] = 1
    position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int32)  # [B,S]
    return input_ids, attention_mask, position_ids


def mindspore_next_token_logits(model, pad_id: int = 3, pad_to_multiple: int = 1,
                                jit: bool = False) -> Callable[[List[List[int]]], np.ndarray]:
    """`next_token_logits` for a Telechat2ForCausalLM (anything with `hidden_states(ids, mask, pos)` ->
    [B,S,H] and `logits(hidden)` -> fp32 logits, or failing that `model(ids, mask, pos)` -> [B,S,V])."""
    import mindspore as ms
    from mindspore import Tensor, ops

    model.set_train(False)
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        def forward(input_ids, attention_mask, position_ids):
            hidden = model.hidden_states(input_ids, attention_mask, position_ids)  # [B,S,H]
            return ops.cast(model.logits(hidden[:, -1:, :]), ms.float32)[:, 0, :]  # [B,V]
    else:
        def forward(input_ids, attention_mask, position_ids):
            return ops.cast(model(input_ids, attention_mask, position_ids), ms.float32)[:, -1, :]  # [B,V]
    if jit:
        forward = ms.jit(forward)

    def next_token_logits(batch: List[List[int]]) -> np.ndarray:
        input_ids, attention_mask, position_ids = left_pad(batch, pad_id, pad_to_multiple)
        logits = forward(Tensor(input_ids), Tensor(attention_mask), Tensor(position_ids))  # [B,V]
        return logits.asnumpy()

    return next_token_logits
