"""TeleChat2 decoder and its four heads (causal LM, sequence / token classification, extractive QA).

One model for training and inference: the same cells run a full forward (training, scoring) and the
prefill / decode steps of generation (telechat2_ms/generate.py passes a KV cache). Parameter names are
MindFormers' (`model.tok_embeddings.embedding_weight`, `model.layers.{i}...`, `model.norm_out.weight`,
`lm_head.weight`). Shapes: B batch, S tokens, H hidden, V vocab, T key length.

Conventions of the official code that this reproduces (spec 1, 4, 10): positions are 0..S-1 for the whole
input unless `position_ids` is given (left pads count); pad keys are masked with dtype-min; the rotary
tables follow the dynamic NTK rule for the key length of the call.
"""
from __future__ import annotations

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from telechat2_ms import kernels
from telechat2_ms.config import ModelConfig
from telechat2_ms.layers import DecoderLayer, Embedding, Linear, ParamInit, RMSNorm
from telechat2_ms.rope import RotaryEmbedding, rope_inputs

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown compute dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def window_keys(q_slots, key_len: int, window: int) -> np.ndarray:
    """[S, T] bool: key slot t within the sliding window of query slot q (HF: t > q - window)."""
    return np.arange(key_len)[None, :] > np.asarray(q_slots).reshape(-1, 1) - window


def layer_masks(cfg: ModelConfig, allowed, q_slots, key_len: int):
    """What the decoder's `allowed` input is for `cfg`: `allowed` [B,1,S,T] itself, or, when some layers
    attend within a sliding window, the pair (allowed, allowed and within the window of each query slot).
    q_slots: [S] (every row's queries sit in the same slots) or [B,S] (each row its own)."""
    if not cfg.sliding_layers:
        return allowed
    q_slots = np.asarray(q_slots)
    rows = q_slots.shape[0] if q_slots.ndim == 2 else 1
    near = window_keys(q_slots, key_len, cfg.sliding_window).reshape(rows, 1, -1, key_len)  # [1 or B,1,S,T]
    if isinstance(allowed, np.ndarray):
        return allowed, allowed & near
    return allowed, ops.logical_and(allowed, Tensor(near))


def mask_tensors(masks, share: bool = False):
    """layer_masks' numpy mask, or its pair, as Tensor(s). The pair is `ms.mutable`: a compiled function takes a
    plain tuple argument as a constant and compiles again for every new value (a Qwen2 model with a sliding
    window recompiled its decode step every token, ~3 s a token on qwen2_tiny). `share`: the Tensors use the
    arrays' memory (ms.from_numpy) instead of a copy (a prefill's P x P mask: 1 GiB at 32768 tokens); the
    arrays must then stay unchanged while the Tensors are in use."""
    convert = (lambda m: ms.from_numpy(np.ascontiguousarray(m))) if share else Tensor
    return ms.mutable(tuple(convert(m) for m in masks)) if isinstance(masks, tuple) else convert(masks)


def causal_allowed(attention_mask, seq_len: int):
    """attention_mask [B,S] (1 real, 0 pad) or None -> allowed [B,1,S,S] bool (causal and key not pad)."""
    causal = ops.tril(ops.ones((seq_len, seq_len), ms.int32)) > 0  # [S,S]
    causal = ops.reshape(causal, (1, 1, seq_len, seq_len))
    if attention_mask is None:
        return causal
    keys = ops.reshape(attention_mask > 0, (attention_mask.shape[0], 1, 1, seq_len))  # [B,1,1,S]
    return ops.logical_and(causal, keys)


class Telechat2Model(nn.Cell):
    """input_ids [B,S] -> final-norm hidden states [B,S,H] (plus per-layer K/V for the cache)."""

    def __init__(self, cfg: ModelConfig, init: ParamInit, compute_dtype=ms.float32, use_fused: bool = False):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, init, compute_dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, init, compute_dtype, use_fused, sliding=i in cfg.sliding_layers,
                                                sparse=cfg.is_sparse(i)) for i in range(cfg.num_layers)])
        self.norm_out = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_fused)
        self.rotary = RotaryEmbedding(cfg.rope_fp16_tables)

    def construct(self, input_ids, position_ids, allowed, inv_freq, mscale, caches=None, write_slots=None,
                  with_aux=False, kv_sink=None):
        """position_ids [B,S]; allowed [B,1,S,T] (or, with sliding layers, the pair of `layer_masks`);
        inv_freq [d/2]; mscale []; caches: tuple of (k, v) per layer [B,k,T,d] or None. Returns (hidden
        [B,S,H], tuple of per-layer (k, v)), and with `with_aux` also the MoE load-balancing loss [] (aux_loss;
        0 for a dense model). Op by op only, `kv_sink(i, (k, v))` takes each layer's K/V as soon as the layer has
        run and the tuple returned holds what it returns instead (None: the K/V are not all alive at once)
        (generate.CachedSteps.prefill_in_place)."""
        cos, sin = self.rotary(position_ids, inv_freq, mscale)  # [B,1,S,d]
        h = self.tok_embeddings(input_ids)  # [B,S,H]
        new_caches = ()
        stats = ()
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if layer.sparse:
                h, kv, assigned, mass = layer(h, cos, sin, allowed, cache, write_slots)
                stats = stats + ((assigned, mass),)
            else:
                h, kv = layer(h, cos, sin, allowed, cache, write_slots)
            if kv_sink is not None:
                kv = kv_sink(i, kv)
            new_caches = new_caches + (kv,)
        if with_aux:
            return self.norm_out(h), new_caches, aux_loss(self.config, stats, input_ids.shape[0] * input_ids.shape[1])
        return self.norm_out(h), new_caches


def aux_loss(cfg: ModelConfig, stats, tokens: int):
    """The MoE load-balancing loss [] fp32 from each sparse layer's (assignments [E], probability mass [E])
    over `tokens` rows (families.md 3), times cfg.router_aux_loss_coef:
      per_layer (MindFormers, TeleChat2-MoE): sum over layers of E * sum_i f_i * P_i, f_i = assignments_i / (k*N)
        (so sum_i f_i = 1), P_i = mass_i / N;
      global (transformers' load_balancing_loss_func, Qwen2-MoE): E * sum_i F_i * Q_i with F_i and Q_i the
        assignments and mass summed over the layers and divided by layers * N (F sums to k).
    Every row counts, padding included (transformers without an attention mask)."""
    total = ops.zeros((), ms.float32)
    if not stats:
        return total
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    if cfg.aux_loss == "per_layer":
        for assigned, mass in stats:
            total = total + E * ops.reduce_sum((assigned / (k * tokens)) * (mass / tokens))
    else:
        rows = len(stats) * tokens
        assigned = stats[0][0]
        mass = stats[0][1]
        for more_assigned, more_mass in stats[1:]:
            assigned = assigned + more_assigned
            mass = mass + more_mass
        total = E * ops.reduce_sum((assigned / rows) * (mass / rows))
    return total * cfg.router_aux_loss_coef


class Telechat2PreTrainedModel(nn.Cell):
    """Shared set-up of the four heads: the backbone lives at `self.model`; `prepare_inputs` turns the
    user-facing (input_ids, attention_mask, position_ids) into the backbone's tensors."""

    def __init__(self, cfg: ModelConfig, compute_dtype="float32", seed: int = 0, use_fused: bool = False,
                 init_zeros: bool = False):
        super().__init__()
        self.config = cfg
        self.compute_dtype = resolve_dtype(compute_dtype)
        self.init = ParamInit(seed, cfg.initializer_range, zeros=init_zeros)
        self.model = Telechat2Model(cfg, self.init, self.compute_dtype, use_fused)

    def prepare_inputs(self, input_ids, attention_mask=None, position_ids=None):
        """Defaults of the official forward: positions 0..S-1, causal + key-padding mask, NTK tables for S keys."""
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = ops.broadcast_to(ops.arange(0, seq, dtype=ms.int32).reshape(1, seq), (batch, seq))
        inv_freq, mscale = rope_inputs(seq, self.config.head_dim, self.config)
        allowed = layer_masks(self.config, causal_allowed(attention_mask, seq), np.arange(seq), seq)
        return position_ids, allowed, inv_freq, mscale

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """[B,S] -> final hidden states [B,S,H] of a full (cache-free) forward."""
        position_ids, allowed, inv_freq, mscale = self.prepare_inputs(input_ids, attention_mask, position_ids)
        hidden, _ = self.model(input_ids, position_ids, allowed, inv_freq, mscale)
        return hidden


class Telechat2ForCausalLM(Telechat2PreTrainedModel):
    """Causal LM: logits [B,S,V] fp32 from `lm_head` [V,H] (no bias); with tie_word_embeddings (Qwen2-0.5B /
    1.5B) lm_head is the embedding matrix itself (one Parameter, saved once as
    model.tok_embeddings.embedding_weight)."""

    def __init__(self, cfg: ModelConfig, compute_dtype="float32", seed: int = 0, use_fused: bool = False,
                 init_zeros: bool = False):
        super().__init__(cfg, compute_dtype, seed, use_fused, init_zeros)
        if cfg.tie_word_embeddings:
            self.lm_head = TiedHead(self.model.tok_embeddings, cfg.vocab_size, self.compute_dtype)
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, self.init, self.compute_dtype)

    def logits(self, hidden):
        """hidden [B,S,H] -> logits [B,S,V] fp32."""
        return ops.cast(self.lm_head(hidden), ms.float32)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids))


class TiedHead(nn.Cell):
    """hidden [..., H] -> [..., V] with the embedding's matrix (no Parameter of its own)."""

    def __init__(self, embedding: Embedding, vocab_size: int, compute_dtype=ms.float32):
        super().__init__()
        self.embedding = [embedding]  # a list: not a sub-cell, so its Parameter is not listed twice
        self.out_features, self.compute_dtype = vocab_size, compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        weight = kernels.cast_to(self.embedding[0].embedding_weight, self.compute_dtype)
        lead = x.shape[:-1]
        y = self.matmul(ops.reshape(ops.cast(x, self.compute_dtype), (-1, x.shape[-1])), weight)
        return ops.reshape(y, lead + (self.out_features,))


def last_token_index(input_ids, pad_token_id: int):
    """Index of the last non-pad token per row (right padding) -> [B] int32; rows without pads give S-1."""
    seq = input_ids.shape[1]
    not_pad = ops.cast(input_ids != pad_token_id, ms.int32)
    positions = ops.arange(0, seq, dtype=ms.int32).reshape(1, seq)
    return ops.reduce_max(not_pad * positions, 1)


class Telechat2ForSequenceClassification(Telechat2PreTrainedModel):
    """Sequence classification (HF convention): `score` [num_labels, H] (no bias) applied to the hidden state
    of the last non-pad token -> logits [B, num_labels]."""

    def __init__(self, cfg: ModelConfig, num_labels: int, **kwargs):
        super().__init__(cfg, **kwargs)
        self.num_labels = num_labels
        self.score = Linear(cfg.hidden_size, num_labels, False, self.init, self.compute_dtype)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)  # [B,S,H]
        index = last_token_index(input_ids, self.config.pad_token_id)  # [B]
        pooled = ops.gather_elements(hidden, 1, ops.broadcast_to(index.reshape(-1, 1, 1), (hidden.shape[0], 1, hidden.shape[2])))
        return ops.cast(self.score(pooled[:, 0]), ms.float32)  # [B, num_labels]


class Telechat2ForTokenClassification(Telechat2PreTrainedModel):
    """Token classification: `score` [num_labels, H] with bias on every position -> logits [B,S,num_labels]."""

    def __init__(self, cfg: ModelConfig, num_labels: int, **kwargs):
        super().__init__(cfg, **kwargs)
        self.num_labels = num_labels
        self.score = Linear(cfg.hidden_size, num_labels, True, self.init, self.compute_dtype)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        return ops.cast(self.score(self.hidden_states(input_ids, attention_mask, position_ids)), ms.float32)


class Telechat2ForQuestionAnswering(Telechat2PreTrainedModel):
    """Extractive QA: `qa_outputs` [2, H] with bias -> (start_logits [B,S], end_logits [B,S])."""

    def __init__(self, cfg: ModelConfig, **kwargs):
        super().__init__(cfg, **kwargs)
        self.qa_outputs = Linear(cfg.hidden_size, 2, True, self.init, self.compute_dtype)

    def construct(self, input_ids, attention_mask=None, position_ids=None):
        logits = ops.cast(self.qa_outputs(self.hidden_states(input_ids, attention_mask, position_ids)), ms.float32)
        return logits[..., 0], logits[..., 1]


def to_tensor_ids(ids) -> Tensor:
    """list of lists / numpy -> int32 Tensor [B,S]."""
    return Tensor(np.asarray(ids, dtype=np.int32))
