"""Batched generation with a preallocated KV cache and a compiled decode step.

Flow: left-pad the prompts -> one prefill forward (no cache; its K/V fill slots 0..P-1 of a cache of
`max_length` slots) -> decode steps of one token each, all with the same static shapes, so the compiled step
(`ms.jit`) is built once. Each sequence's positions start at 0 at its first real token (left pads do not
shift positions) and pad keys are masked, so a padded row generates what it would alone. Rotary tables follow
the dynamic NTK rule for the total key length at each step (spec 4.2); cached keys keep their rotation.
Generation stops at `<_end>` (eos) per row, or after max_new_tokens. Sampling runs in the graph
(telechat2_ms/sampling.py); the host only sees the sampled token ids.
Shapes: B batch, P padded prompt length, T = max_length cache slots, k kv heads, d head dim, V vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.rope import ntk_parameters
from telechat2_ms.sampling import TokenSampler


class GenerationError(ValueError):
    """Bad generation input (empty prompt, prompt longer than the context, ...)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.85
    repetition_penalty: float = 1.03
    seed: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 3

    @classmethod
    def from_settings(cls, settings, eos_token_id: int = 2, pad_token_id: int = 3) -> "GenerationConfig":
        return cls(settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_k,
                   settings.top_p, settings.repetition_penalty, settings.seed, eos_token_id, pad_token_id)


class PrefillStep(nn.Cell):
    """Full forward over the padded prompt: returns last-position logits [B,V] and per-layer K/V [B,k,P,d]."""

    def __init__(self, model: Telechat2ForCausalLM):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head

    def construct(self, input_ids, position_ids, allowed, inv_freq, mscale):
        hidden, kvs = self.model(input_ids, position_ids, allowed, inv_freq, mscale)
        logits = ops.cast(self.lm_head(hidden[:, -1:]), ms.float32)[:, 0]  # [B,V]
        return logits, kvs


class DecodeStep(nn.Cell):
    """One token per row against the cache: (token [B,1], position [B,1], allowed [B,1,1,T], inv_freq, mscale,
    write_slot [1,T] one-hot, caches) -> (logits [B,V] fp32, updated caches)."""

    def __init__(self, model: Telechat2ForCausalLM):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head

    def construct(self, token, position, allowed, inv_freq, mscale, write_slot, caches):
        hidden, caches = self.model(token, position, allowed, inv_freq, mscale, caches, write_slot)
        return ops.cast(self.lm_head(hidden), ms.float32)[:, 0], caches


class SampleStep(nn.Cell):
    """Sampler plus the bookkeeping of which tokens each row has produced (for the repetition penalty)."""

    def __init__(self, sampler: TokenSampler, vocab_size: int):
        super().__init__()
        self.sampler = sampler
        self.vocab_size = vocab_size

    def construct(self, logits, seen, uniform):
        token = self.sampler(logits, seen, uniform)  # [B]
        seen = ops.logical_or(seen, ops.one_hot(token, self.vocab_size, ms.Tensor(1.0), ms.Tensor(0.0)) > 0)
        return token, seen


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """-> ids [B,P] int32, mask [B,P] int32 (1 real), positions [B,P] int32 (0 at each row's first real token)."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    return ids, mask, positions


class Generator:
    """Generates continuations for batches of token-id prompts with one model and a fixed cache size.

    `max_length` is the context: padded prompt + new tokens must fit in it. The compiled steps are kept
    between calls (same batch size and settings reuse them)."""

    def __init__(self, model: Telechat2ForCausalLM, max_length: int, use_jit: bool = True):
        if max_length <= 0:
            raise GenerationError(f"max_length must be positive, got {max_length}")
        self.model = model
        self.cfg = model.config
        self.max_length = max_length
        self.use_jit = use_jit
        self.prefill = PrefillStep(model)
        self.decode = DecodeStep(model)
        self._sample_steps = {}
        if use_jit:
            self._prefill_fn = ms.jit(self.prefill.construct)
            self._decode_fn = ms.jit(self.decode.construct)
        else:
            self._prefill_fn, self._decode_fn = self.prefill, self.decode

    def _sampler(self, gen: GenerationConfig):
        key = (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty)
        if key not in self._sample_steps:
            step = SampleStep(TokenSampler(self.cfg.vocab_size, *key), self.cfg.vocab_size)
            self._sample_steps[key] = ms.jit(step.construct) if self.use_jit else step
        return self._sample_steps[key]

    def _rope(self, key_length: int):
        params = ntk_parameters(key_length, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.base_seqlen,
                                self.cfg.training_seqlen)
        return Tensor(params.inv_freq), Tensor(np.float32(params.mscale))

    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        if len(prompts) == 0:
            raise GenerationError("no prompts given")
        if max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be positive, got {max_new_tokens}")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise GenerationError(f"prompt {i} is empty")
            bad = [t for t in prompt if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_length:
            raise GenerationError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the context of "
                f"{self.max_length} tokens (seq_length); shorten the prompt or lower max_new_tokens")

    def generate(self, prompts: Sequence[Sequence[int]], gen: Optional[GenerationConfig] = None,
                 on_tokens: Optional[Callable[[np.ndarray], None]] = None) -> List[List[int]]:
        """Token-id prompts -> generated ids per prompt (without the prompt, without the final `<_end>`).
        `on_tokens(tokens [B])` is called after each step (rows already finished get the pad id)."""
        gen = gen or GenerationConfig(eos_token_id=self.cfg.eos_token_id, pad_token_id=self.cfg.pad_token_id)
        self.check_prompts(prompts, gen.max_new_tokens)
        batch, slots = len(prompts), self.max_length
        ids, mask, positions = left_pad(prompts, gen.pad_token_id)
        prompt_len = ids.shape[1]
        sample = self._sampler(gen)
        rng = np.random.default_rng(gen.seed)

        # prefill: causal over the prompt, pad keys masked
        causal = np.tril(np.ones((prompt_len, prompt_len), bool))
        allowed = causal[None, None] & (mask[:, None, None, :] > 0)  # [B,1,P,P]
        logits, kvs = self._prefill_fn(Tensor(ids), Tensor(positions), Tensor(allowed), *self._rope(prompt_len))
        pad = ((0, 0), (0, 0), (0, slots - prompt_len), (0, 0))
        caches = tuple((_pad_cache(k, pad), _pad_cache(v, pad)) for k, v in kvs)  # [B,k,T,d] each

        seen = np.zeros((batch, self.cfg.vocab_size), bool)
        for row, prompt in enumerate(prompts):
            seen[row, np.asarray(prompt)] = True
        seen = Tensor(seen)
        key_valid = np.zeros((batch, slots), bool)
        key_valid[:, :prompt_len] = mask > 0
        next_position = positions[:, -1:] + 1  # [B,1]
        finished = np.zeros(batch, bool)
        outputs: List[List[int]] = [[] for _ in range(batch)]
        slot_ids = np.arange(slots)

        for step in range(gen.max_new_tokens):
            uniform = Tensor(rng.random(batch, dtype=np.float32))
            token, seen = sample(logits, seen, uniform)
            token = token.asnumpy()
            token = np.where(finished, gen.pad_token_id, token)
            for row in np.nonzero(~finished)[0]:
                if token[row] == gen.eos_token_id:
                    finished[row] = True
                else:
                    outputs[row].append(int(token[row]))
            if on_tokens is not None:
                on_tokens(token)
            if finished.all() or step == gen.max_new_tokens - 1:
                break
            slot = prompt_len + step  # the new token's cache slot
            key_valid[:, slot] = True
            allowed = (key_valid & (slot_ids <= slot))[:, None, None, :]  # [B,1,1,T]
            write_slot = (slot_ids == slot).astype(np.float32)[None]  # [1,T]
            logits, caches = self._decode_fn(Tensor(token.reshape(batch, 1).astype(np.int32)), Tensor(next_position),
                                             Tensor(allowed), *self._rope(slot + 1), Tensor(write_slot),
                                             ms.mutable(caches))  # mutable: a tuple input must not recompile
            next_position = next_position + 1
        return outputs


def _pad_cache(x, pad):
    return ops.pad(x, tuple(v for pair in reversed(pad) for v in pair))
