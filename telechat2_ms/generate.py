"""Batched generation with preallocated in-place KV caches and compiled prefill / decode steps.

Flow: left-pad the prompts -> one prefill forward (no cache) whose K/V are scattered into slots 0..P-1 of
per-layer cache Parameters of `max_length` slots -> decode steps of one token each that scatter their K/V
into the next slot in place (no copy of the cache) and attend over all slots. Every step has static shapes
and only Tensor inputs, so each compiled step (`ms.jit`) is built once per batch size (the prefill once per
prompt length). Each sequence's positions start at 0 at its first real token (left pads do not shift
positions) and pad keys are masked, so a padded row generates what it would alone. Rotary tables follow the
dynamic NTK rule for the total key length at each step (spec 4.2); cached keys keep their rotation.
Generation stops at `<_end>` (eos) per row, or after max_new_tokens. Sampling runs in the graph
(telechat2_ms/sampling.py); the host only reads the sampled token ids (one [B] int32 array per step).
`PrefillStep` / `DecodeStep` are the functional form (caches as tensors in and out), kept for tests and tools.
Shapes: B batch, P padded prompt length, T = max_length cache slots, k kv heads, d head dim, V vocab.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms import kernels
from telechat2_ms.layers import Attention, kv_cache, update_rows, use_blockwise_attention, write_prompts
from telechat2_ms.model import Telechat2ForCausalLM, layer_masks, mask_tensors
from telechat2_ms.rope import rope_parameters
from telechat2_ms.sampling import TokenSampler, greedy_tokens


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
    stop_token_ids: Tuple[int, ...] = ()  # further ids that end a row (ChatML: <|im_end|> and <|endoftext|>)

    @classmethod
    def from_settings(cls, settings, eos_token_id: int = 2, pad_token_id: int = 3,
                      stop_token_ids: Sequence[int] = ()) -> "GenerationConfig":
        return cls(settings.max_new_tokens, settings.do_sample, settings.temperature, settings.top_k,
                   settings.top_p, settings.repetition_penalty, settings.seed, eos_token_id, pad_token_id,
                   tuple(sorted(set(stop_token_ids) - {eos_token_id})))


def last_logits(lm_head, hidden):
    """hidden [B,S,H] -> the last position's logits [B,V] fp32. The head's [B,1,V] output is reshaped, not
    indexed: on CPU a StridedSlice [B,1,V] -> [B,V] costs ~29 ns an element (138 ms at B=32 over the 151,936
    Qwen2 vocabulary, more than the head's matmul), the reshape 2 ms."""
    logits = ops.cast(lm_head(hidden[:, -1:]), ms.float32)  # [B,1,V]
    return ops.reshape(logits, (logits.shape[0], logits.shape[2]))


class PrefillStep(nn.Cell):
    """Full forward over the padded prompt: returns last-position logits [B,V] and per-layer K/V [B,k,P,d]."""

    def __init__(self, model: Telechat2ForCausalLM):
        super().__init__()
        self.model = model.model
        self.lm_head = model.lm_head

    def construct(self, input_ids, position_ids, allowed, inv_freq, mscale):
        hidden, kvs = self.model(input_ids, position_ids, allowed, inv_freq, mscale)
        logits = last_logits(self.lm_head, hidden)  # [B,V]
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
        return last_logits(self.lm_head, hidden), caches


class CachedSteps(nn.Cell):
    """Prefill and decode for one batch size against per-layer K/V cache Parameters, updated in place.

    Cache layout (telechat2_ms/layers.py, in-place form): layer i's keys and values are Parameters
    `kv_cache.{i}.key` / `.value` [B*k,T,d] (layers.kv_cache), row b*k + h. `prefill` writes slots 0..P-1 (zeros
    after them) and `construct` (one decode step) writes slot `slot` ([1], or [B,1]: each row its own); both
    return last-position logits [B,V] fp32. `prefill_rows` runs prompts packed into one sequence into their rows and
    `head_rows` the head over the last positions of several (serving/engine.py).
    Steps that may be compiled: experts split over ep dispatch with shapes independent of the routing."""

    def __init__(self, model: Telechat2ForCausalLM, batch: int, slots: int):
        super().__init__()
        if model.config.num_experts:
            from telechat2_ms.parallel.experts import use_static_dispatch

            use_static_dispatch(model)
        self.model = model.model
        self.lm_head = model.lm_head
        for _, cell in self.model.cells_and_names():  # the prefill writes its K/V heads-first into the cache
            if isinstance(cell, Attention):
                cell.features_first = False
        head_dim = model.config.head_dim
        self.kv_heads = self.model.layers[0].attention.local_kv_heads  # local count under tensor parallel
        self.cache_params = ms.ParameterTuple(
            [kv_cache(batch * layer.attention.local_kv_heads, slots, head_dim, model.compute_dtype,
                      f"kv_cache.{i}.{part}") for i, layer in enumerate(self.model.layers) for part in ("key", "value")])
        self.num_layers = len(self.model.layers)

    def _caches(self):
        """Per layer (keys, values): a step whose mask has fewer slots than the cache reads only those."""
        return tuple((self.cache_params[2 * i], self.cache_params[2 * i + 1]) for i in range(self.num_layers))

    def prefill(self, input_ids, position_ids, allowed, inv_freq, mscale, first_row):
        """input_ids/position_ids [c,P], allowed [c,1,P,P], first_row [] int32 -> logits [c,V]; the K/V of the c
        prompts land in slots 0..P-1 of cache rows first_row .. first_row + c - 1, zeros after them (Generator prefills a batch
        prefill_rows_per_call rows at a time)."""
        hidden, kvs = self.model(input_ids, position_ids, allowed, inv_freq, mscale)
        for i in range(self.num_layers):
            self._write_prompt_kv(i, kvs[i], first_row)
        return last_logits(self.lm_head, hidden)  # [c,V]

    def prefill_in_place(self, input_ids, position_ids, allowed, inv_freq, mscale, first_row):
        """`prefill` op by op (never compiled: Generator's uncompiled and long-prompt prefills), each layer's K/V
        written into the cache as soon as the layer has run rather than all held to the end (bench_100m, 32768
        tokens: 2.4 GiB)."""
        hidden, _ = self.model(input_ids, position_ids, allowed, inv_freq, mscale,
                               kv_sink=lambda i, kv: self._write_prompt_kv(i, kv, first_row))
        return last_logits(self.lm_head, hidden)  # [c,V]

    def _write_prompt_kv(self, i, kv, first_row):
        """Layer i's prefill K/V [c,k,P,d] into slots 0..P-1 of its cache rows from first_row (write_prompts)."""
        write_prompts(self.cache_params[2 * i], kv[0], first_row)
        write_prompts(self.cache_params[2 * i + 1], kv[1], first_row)

    def prefill_rows(self, input_ids, position_ids, allowed, inv_freq, mscale, index):
        """Prompts packed into one sequence, each into its cache row: input_ids/position_ids [1,P], allowed
        [1,1,P,P] (each prompt causal within itself), index [k*P,2] int32 (the cache row and slot of every
        (head, token) pair, head-major) -> the final hidden states [P,H] (the head runs once over the last
        position of every prompt admitted together: head_rows)."""
        hidden, kvs = self.model(input_ids, position_ids, allowed, inv_freq, mscale)
        dim = kvs[0][0].shape[-1]
        for i in range(self.num_layers):
            for part in range(2):
                new = ops.cast(ops.reshape(kvs[i][part], (-1, dim)), self.cache_params[2 * i + part].dtype)
                update_rows(self.cache_params[2 * i + part], index, new)
        return ops.reshape(hidden, (hidden.shape[1], hidden.shape[2]))

    def head_rows(self, hidden):
        """hidden [n,H] -> (logits [n,V] fp32, greedy tokens [n] int32)."""
        logits = last_logits(self.lm_head, ops.expand_dims(hidden, 1))
        return logits, greedy_tokens(logits)

    def construct(self, token, position, allowed, inv_freq, mscale, slot):
        """token/position [B,1] int32, allowed [B,1,1,W] (W <= T: attention over each row's first W slots, which
        must hold every slot the row attends), slot [1] or [B,1] int32 -> logits [B,V] fp32."""
        hidden, _ = self.model(token, position, allowed, inv_freq, mscale, self._caches(), slot)
        return last_logits(self.lm_head, hidden)  # [B,V]

    def decode_rows(self, token, position, allowed, inv_freq, mscale, slot):
        """construct, and each row's greedy token in the same graph (serving/engine.py: greedy rows need no
        sampler call) -> (logits [B,V] fp32, greedy tokens [B] int32; TokenSampler's argmax)."""
        logits = self.construct(token, position, allowed, inv_freq, mscale, slot)
        return logits, greedy_tokens(logits)


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


PREFILL_TOKENS = 512  # prompt tokens per prefill call: a batch of longer prompts is prefilled a few rows at a time


def prefill_rows_per_call(batch: int, prompt_len: int) -> int:
    """Rows of the batch one prefill call takes: the largest divisor of `batch` whose rows hold at most
    PREFILL_TOKENS tokens (at least one row; a divisor, so every call has one shape and compiles once). A
    compiled CPU graph keeps memory per row it runs (bench_100m, 512 tokens: about 0.26 GiB a row, 2.38 GiB for
    8 rows at once, 0.55 GiB for one), and a row at a time runs as fast (README Performance: peak memory)."""
    fits = max(1, PREFILL_TOKENS // prompt_len)
    return max(d for d in range(1, min(batch, fits) + 1) if batch % d == 0)


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

    `max_length` is the context: padded prompt + new tokens must fit in it. The compiled steps and their
    caches are kept between calls, per batch size (the `max_cached_batches` most recent ones).
    After each `generate`, `last_timing` holds wall seconds of its phases: `prefill` (prompt in, first token
    on the host) and `decode` (the remaining steps)."""

    def __init__(self, model: Telechat2ForCausalLM, max_length: int, use_jit: bool = True,
                 max_cached_batches: int = 2, pipeline=None):
        if max_length <= 0:
            raise GenerationError(f"max_length must be positive, got {max_length}")
        self.model = model
        use_blockwise_attention(model, eager=True)  # long prompts' prefill (uncompiled): memory O(P x rows per block)
        self.pipeline = pipeline  # a TelechatParallel with pipeline_stage > 1: parallel/generation.py
        self.cfg = model.config
        self.max_length = max_length
        self.use_jit = use_jit
        self.max_cached_batches = max_cached_batches
        self._sample_steps = {}
        self._steps = {}  # batch -> (CachedSteps, prefill fn, decode fn)
        self._rope_tensors = {}
        self.last_timing = {}

    def _cached_steps(self, batch: int):
        """(prefill fn, decode fn) with in-place caches for this batch size; compiled once per batch size."""
        if batch not in self._steps:
            while len(self._steps) >= self.max_cached_batches:
                self._steps.pop(next(iter(self._steps)))  # oldest first: frees its caches
            if self.pipeline is not None:
                from telechat2_ms.parallel.generation import PipelineCachedSteps

                steps = PipelineCachedSteps(self.pipeline, batch, self.max_length)
                self._steps[batch] = (steps, steps.prefill, steps)
            elif self.use_jit:
                steps = CachedSteps(self.model, batch, self.max_length)
                self._steps[batch] = (steps, ms.jit(steps.prefill), ms.jit(steps.construct))
            else:
                steps = CachedSteps(self.model, batch, self.max_length)
                self._steps[batch] = (steps, steps.prefill_in_place, steps)
        return self._steps[batch][1:]

    def _sampler(self, gen: GenerationConfig):
        key = (gen.do_sample, gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty)
        if key not in self._sample_steps:
            step = SampleStep(TokenSampler(self.cfg.vocab_size, *key), self.cfg.vocab_size)
            self._sample_steps[key] = ms.jit(step.construct) if self.use_jit else step
        return self._sample_steps[key]

    def _rope(self, key_length: int):
        """(inv_freq [d/2], mscale []) Tensors for `key_length` keys; they only change when the NTK alpha or
        mscale does, so the Tensors are made once per distinct value."""
        params = rope_parameters(key_length, self.cfg)
        key = (params.alpha, params.mscale)
        if key not in self._rope_tensors:
            self._rope_tensors[key] = (Tensor(params.inv_freq), Tensor(np.float32(params.mscale)))
        return self._rope_tensors[key]

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
        start = time.perf_counter()
        batch, slots = len(prompts), self.max_length
        ids, mask, positions = left_pad(prompts, gen.pad_token_id)
        prompt_len = ids.shape[1]
        sample = self._sampler(gen)
        prefill, decode = self._cached_steps(batch)
        if prompt_len >= 2 * kernels.ATTENTION_BLOCK and self.pipeline is None:
            # uncompiled: MindSpore's compiled CPU graph keeps the outputs of its transposes and broadcasts, for every
            # block (8192 tokens on bench_100m: 10.0 GiB at 258 tok/s compiled, 2.1-3.0 GiB at 192-198 tok/s here;
            # README)
            prefill = self._steps[batch][0].prefill_in_place
        share = self._steps[batch][0].share_token if self.pipeline is not None else None
        rng = np.random.default_rng(gen.seed)

        # prefill: causal over the prompt, pad keys masked; its K/V fill cache slots 0..P-1
        allowed = np.tri(prompt_len, dtype=bool)[None, None] & (mask[:, None, None, :] > 0)  # [B,1,P,P]
        rows = batch if self.pipeline is not None else prefill_rows_per_call(batch, prompt_len)
        pieces = []
        for first in range(0, batch, rows):  # `rows` prompts per call into their cache rows
            part = slice(first, first + rows)
            pieces.append(prefill(Tensor(ids[part]), Tensor(positions[part]),
                                  mask_tensors(layer_masks(self.cfg, allowed[part], np.arange(prompt_len), prompt_len),
                                               share=True),
                                  *self._rope(prompt_len), Tensor(np.int32(first))))
        logits = pieces[0] if len(pieces) == 1 else ops.concat(pieces, 0)  # [B,V]
        del allowed  # P x P per row (32768 tokens: 1 GiB), not needed by the decode steps

        seen = np.zeros((batch, self.cfg.vocab_size), bool)
        for row, prompt in enumerate(prompts):
            seen[row, np.asarray(prompt)] = True
        seen = Tensor(seen)
        key_valid = np.zeros((batch, 1, 1, slots), bool)  # [B,1,1,T]: slots holding a real token so far
        key_valid[:, 0, 0, :prompt_len] = mask > 0
        next_position = positions[:, -1:] + 1  # [B,1]
        finished = np.zeros(batch, bool)
        outputs: List[List[int]] = [[] for _ in range(batch)]
        first_token_at = None

        for step in range(gen.max_new_tokens):
            uniform = Tensor(rng.random(batch, dtype=np.float32))
            token, seen = sample(logits, seen, uniform)
            token = token.asnumpy()  # the one device -> host transfer of a step
            if share is not None:  # pipeline: the last stage's token on every stage
                token = share(token)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            token = np.where(finished, gen.pad_token_id, token)
            for row in np.nonzero(~finished)[0]:
                if token[row] == gen.eos_token_id or token[row] in gen.stop_token_ids:
                    finished[row] = True
                else:
                    outputs[row].append(int(token[row]))
            if on_tokens is not None:
                on_tokens(token)
            if finished.all() or step == gen.max_new_tokens - 1:
                break
            slot = prompt_len + step  # the new token's cache slot; later slots stay masked
            key_valid[:, 0, 0, slot] = True
            masks = mask_tensors(layer_masks(self.cfg, key_valid.copy(), [slot], slots))
            logits = decode(Tensor(token.reshape(batch, 1).astype(np.int32)), Tensor(next_position),
                            masks, *self._rope(slot + 1), Tensor(np.array([slot], np.int32)))
            next_position = next_position + 1
        self.last_timing = {"prefill": first_token_at - start, "decode": time.perf_counter() - first_token_at}
        return outputs
