"""Rotary position embedding with TeleChat2's dynamic NTK-aware scaling and mscale (spec 4.1-4.2).

On every forward the official code recomputes its rotary tables from the total key length L:
    L      := max(L, training_seqlen)
    alpha  = max(2^ceil(log2(L / base_seqlen) + 1) - 1, 1)          -> 1, 3, 7, 15, 31, ...
    base'  = theta * alpha^(d / (d - 2))
    mscale = 1 if L <= training_seqlen else 0.1 * ln(L / training_seqlen) + 1
    cos, sin = fp16(cos(t * inv_freq)) * mscale   (the product rounded to fp16 again)
Inside the trained window this is plain RoPE (alpha = 1, mscale = 1) with fp16-rounded tables.

The host side (`ntk_parameters`, numpy) gives inv_freq [d/2] and mscale for a length; `RotaryEmbedding` turns
per-token positions into cos/sin tables inside the graph, so a compiled decode step takes them as inputs and
never recompiles when alpha changes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops


class NTKParameters(NamedTuple):
    alpha: int
    base: float  # base' = theta * alpha^(d/(d-2)), float64 as the official code computes it
    mscale: float
    inv_freq: np.ndarray  # [d/2] float32


def ntk_alpha(seq_len: int, base_seqlen: int, training_seqlen: int) -> int:
    """alpha = 2^(m+1) - 1 with m the smallest integer >= 0 such that base_seqlen * 2^m >= L (integer exact,
    equal to max(2^ceil(log2(L/base)+1) - 1, 1) without floating-point log)."""
    length = max(int(seq_len), int(training_seqlen))
    m = 0
    while base_seqlen * (1 << m) < length:
        m += 1
    return max((1 << (m + 1)) - 1, 1)


def ntk_mscale(seq_len: int, training_seqlen: int) -> float:
    length = max(int(seq_len), int(training_seqlen))
    ratio = length / training_seqlen
    return 1.0 if ratio <= 1 else 0.1 * math.log(ratio) + 1.0


def ntk_parameters(seq_len: int, head_dim: int, theta: float = 10000.0, base_seqlen: int = 8192,
                   training_seqlen: int = 8192) -> NTKParameters:
    """Rotary frequencies and attention scaling for a forward whose keys span `seq_len` positions."""
    if seq_len <= 0:
        raise ValueError(f"sequence length must be positive, got {seq_len}")
    alpha = ntk_alpha(seq_len, base_seqlen, training_seqlen)
    base = theta * alpha ** (head_dim / (head_dim - 2))
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
    return NTKParameters(alpha, base, ntk_mscale(seq_len, training_seqlen), inv_freq)


def rope_tables_numpy(positions: np.ndarray, params: NTKParameters, fp16_tables: bool = True):
    """Reference cos/sin tables [*positions.shape, d] in numpy, exactly as spec 4.2 step 5."""
    freqs = positions.astype(np.float32)[..., None] * params.inv_freq  # [..., d/2]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [..., d]
    cos, sin = np.cos(emb), np.sin(emb)
    if fp16_tables:
        cos = (cos.astype(np.float16).astype(np.float32) * np.float32(params.mscale)).astype(np.float16)
        sin = (sin.astype(np.float16).astype(np.float32) * np.float32(params.mscale)).astype(np.float16)
        return cos.astype(np.float32), sin.astype(np.float32)
    return cos * np.float32(params.mscale), sin * np.float32(params.mscale)


class RotaryEmbedding(nn.Cell):
    """position_ids [B,S] int, inv_freq [d/2] fp32, mscale [] fp32 -> cos, sin [B,1,S,d] fp32."""

    def __init__(self, fp16_tables: bool = True):
        super().__init__()
        self.fp16_tables = fp16_tables

    def _round(self, table, mscale):
        if self.fp16_tables:
            table = ops.cast(ops.cast(table, ms.float16), ms.float32)
            return ops.cast(ops.cast(table * mscale, ms.float16), ms.float32)
        return table * mscale

    def construct(self, position_ids, inv_freq, mscale):
        freqs = ops.expand_dims(ops.cast(position_ids, ms.float32), -1) * inv_freq  # [B,S,d/2]
        emb = ops.concat((freqs, freqs), -1)  # [B,S,d]
        cos = self._round(ops.cos(emb), mscale)
        sin = self._round(ops.sin(emb), mscale)
        return ops.expand_dims(cos, 1), ops.expand_dims(sin, 1)  # [B,1,S,d]


def rope_parameters(seq_len: int, cfg) -> NTKParameters:
    """The rotary parameters of a ModelConfig for a forward over `seq_len` keys: TeleChat2's dynamic NTK rule,
    or (rope_scaling none, Qwen2) plain RoPE at base rope_theta for every length (alpha 1, mscale 1)."""
    if cfg.rope_scaling == "none":
        return ntk_parameters(1, cfg.head_dim, cfg.rope_theta, base_seqlen=1, training_seqlen=1)
    return ntk_parameters(seq_len, cfg.head_dim, cfg.rope_theta, cfg.base_seqlen, cfg.training_seqlen)


def rope_inputs(seq_len: int, head_dim: int, cfg) -> tuple:
    """(inv_freq Tensor [d/2], mscale Tensor []) for a forward over `seq_len` keys, from a ModelConfig."""
    params = rope_parameters(seq_len, cfg)
    return Tensor(params.inv_freq), Tensor(np.float32(params.mscale))


def describe_rope(cfg) -> str:
    """One line: which rotary base and rule a config uses, and where the base came from."""
    if cfg.rope_scaling == "none":
        return f"rotary: plain RoPE, base {cfg.rope_theta:g} ({cfg.rope_theta_source}), fp32 tables"
    return (f"rotary: base {cfg.rope_theta:g} ({cfg.rope_theta_source}), dynamic NTK + mscale beyond "
            f"{cfg.training_seqlen} keys (base_seqlen {cfg.base_seqlen}), "
            f"{'fp16-rounded' if cfg.rope_fp16_tables else 'fp32'} tables")
