"""Pipeline-parallel generation: the prefill and decode steps of generate.Generator over pipeline stages.

Each stage holds the KV caches of its own layers only (layout of generate.CachedSteps). One step runs the
stages in turn: stage 0 embeds the tokens and runs its layers; after stage k the hidden states [B,S,H] go
to stage k + 1 (comm.ring_shift over the pipeline group, which every stage joins; a stage ignores what it
receives once it has run); the last stage applies the final norm and lm_head. It samples the next token,
and `share_token` hands it from the last stage to every stage (a broadcast over the pipeline group), so all
stages feed the same token to the next step. Within a stage the tensor-parallel ranks run together as in
single-stage generation. The stages run one after another (no micro-batching of prompts): the pipeline
splits the weights, not the time. Runs op by op (PyNative), the collectives being Python-level calls.
Shapes: B batch, P prompt length, T cache slots, H hidden, V vocab, k local kv heads, d head dim.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from telechat2_ms.generate import last_logits
from telechat2_ms.layers import kv_cache, write_prompts
from telechat2_ms.parallel import comm


class PipelineCachedSteps:
    """generate.CachedSteps' interface (prefill, __call__ for one decode step) for one pipeline stage of a
    parallel/parallelize.TelechatParallel."""

    def __init__(self, parallel, batch: int, slots: int):
        model = parallel.model
        self.backbone, self.lm_head = model.model, model.lm_head
        self.group, self.stage, self.pp = parallel.groups.pp, parallel.stage, parallel.dims.pp
        self.first, self.last = parallel.first_stage, parallel.last_stage
        first, end = parallel.layer_range
        self.layers = [self.backbone.layers[i] for i in range(first, end)]
        cfg = model.config
        self.hidden_size, self.vocab_size, self.dtype = cfg.hidden_size, cfg.vocab_size, model.compute_dtype
        self.caches = [tuple(kv_cache(batch * layer.attention.local_kv_heads, slots, cfg.head_dim, self.dtype,
                                      f"kv_cache.{i}.{part}") for part in ("key", "value"))
                       for i, layer in zip(range(first, end), self.layers)]  # local kv heads under tensor parallel

    def _forward(self, ids, position_ids, allowed, inv_freq, mscale, slot=None):
        """-> last-position logits [B,V] fp32 on the last stage (zeros elsewhere). Without `slot` (prefill) the
        layers' K/V land in cache slots 0..P-1 (layers.write_prompts); with it (decode) attention runs over the caches."""
        batch, seq = ids.shape
        cos, sin = self.backbone.rotary(position_ids, inv_freq, mscale)  # [B,1,S,d]
        h = self.backbone.tok_embeddings(ids) if self.first else ops.zeros((batch, seq, self.hidden_size), self.dtype)
        for k in range(self.pp):
            if k == self.stage:
                for layer, (key, value) in zip(self.layers, self.caches):
                    if slot is None:
                        h, kv = layer(h, cos, sin, allowed)
                        write_prompts(key, kv[0])
                        write_prompts(value, kv[1])
                    else:
                        h, _ = layer(h, cos, sin, allowed, (key, value), slot)
            if k < self.pp - 1:
                h = comm.ring_shift(h, self.group)  # stage k's hidden states to stage k + 1
        if not self.last:
            return ops.zeros((batch, self.vocab_size), ms.float32)
        return last_logits(self.lm_head, self.backbone.norm_out(h[:, -1:]))  # [B,V]

    def prefill(self, input_ids, position_ids, allowed, inv_freq, mscale, first_row=None):
        """The whole batch at once (Generator does not split a pipeline's prefill: first_row is 0)."""
        return self._forward(input_ids, position_ids, allowed, inv_freq, mscale)

    def __call__(self, token, position, allowed, inv_freq, mscale, slot):
        return self._forward(token, position, allowed, inv_freq, mscale, slot)

    def share_token(self, token: np.ndarray) -> np.ndarray:
        """The last stage's sampled token ids [B] on every stage (ids below 2**24 are exact in float32)."""
        shared = comm.broadcast(Tensor(token.astype(np.float32)), self.group, root=self.pp - 1)
        return shared.asnumpy().astype(token.dtype)
