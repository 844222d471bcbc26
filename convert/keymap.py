"""The HF <-> MindSpore key map of each family, its derived inverse, expected shapes and fused layouts.

`KEY_MAPS[family]` lists every parameter once as (HF template, MindFormers template, shape from ModelConfig,
optional condition on the config); `{layer}` stands for the decoder layer index. `KEY_MAP` is TeleChat2's;
Qwen2's maps transformers' names (`model.layers.N.self_attn.q_proj`, ...) to the names MindFormers'
research/qwen2 uses (`wq`/`wk`/`wv` with biases, `wo`, `feed_forward.w1/w2/w3`); with tied embeddings its
`lm_head.weight` is absent on both sides (HF's save_pretrained writes the shared matrix once). Both directions read this table: `hf_to_ms_name` matches
the HF side and formats the MindSpore side, `ms_to_hf_name` does the opposite; there is no second,
hand-written table. Both frameworks store Linear weights as [out, in], so every mapping is a pure rename
(spec 3.2); `wk_v` keeps HF's per-kv-head interleaved [K_h; V_h] row order (spec 3.1, pitfall 10.1).

Optional fused inference layouts (spec 3.3) live on the MindSpore side only, as `FUSIONS`:
    w_qkv         = [wq; K_all; V_all]  [H + 2kd, H]  (K_all/V_all de-interleaved from wk_v)
    w_gate_hidden = [w1; w3]            [2F, H]
each with a named fuse function and its exact inverse split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from convert.errors import ConversionError
from telechat2_ms.config import ModelConfig

Shape = Tuple[int, ...]


def _vocab(c: ModelConfig) -> Shape:
    return (c.vocab_size, c.hidden_size)  # [V, H]


def _hidden(c: ModelConfig) -> Shape:
    return (c.hidden_size,)  # [H]


def _square(c: ModelConfig) -> Shape:
    return (c.hidden_size, c.hidden_size)  # [H, H]


def _key_value(c: ModelConfig) -> Shape:
    return (2 * c.kv_dim, c.hidden_size)  # [2kd, H]


def _ffn_in(c: ModelConfig) -> Shape:
    return (c.ffn_hidden_size, c.hidden_size)  # [F, H]


def _ffn_out(c: ModelConfig) -> Shape:
    return (c.hidden_size, c.ffn_hidden_size)  # [H, F]


def _kv(c: ModelConfig) -> Shape:
    return (c.kv_dim, c.hidden_size)  # [kd, H]


def _kv_bias(c: ModelConfig) -> Shape:
    return (c.kv_dim,)  # [kd]


def _untied(c: ModelConfig) -> bool:
    return not c.tie_word_embeddings


@dataclass(frozen=True)
class KeyRule:
    hf: str
    ms: Optional[str]  # None: a deliberate drop (HF only, recomputed from the config)
    shape: Optional[Callable[[ModelConfig], Shape]]
    when: Optional[Callable[[ModelConfig], bool]] = None  # the parameter exists only for such configs


_HF_L = "transformer.h.{layer}."
_MS_L = "model.layers.{layer}."
KEY_MAP: Tuple[KeyRule, ...] = (
    KeyRule("transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight", _vocab),
    KeyRule(_HF_L + "input_layernorm.weight", _MS_L + "attention_norm.weight", _hidden),
    KeyRule(_HF_L + "self_attention.query.weight", _MS_L + "attention.wq.weight", _square),
    KeyRule(_HF_L + "self_attention.key_value.weight", _MS_L + "attention.wk_v.weight", _key_value),
    KeyRule(_HF_L + "self_attention.dense.weight", _MS_L + "attention.wo.weight", _square),
    KeyRule(_HF_L + "self_attention.dense.bias", _MS_L + "attention.wo.bias", _hidden),
    KeyRule(_HF_L + "post_attention_layernorm.weight", _MS_L + "ffn_norm.weight", _hidden),
    KeyRule(_HF_L + "mlp.gate_proj.weight", _MS_L + "feed_forward.w1.weight", _ffn_in),
    KeyRule(_HF_L + "mlp.up_proj.weight", _MS_L + "feed_forward.w3.weight", _ffn_in),
    KeyRule(_HF_L + "mlp.down_proj.weight", _MS_L + "feed_forward.w2.weight", _ffn_out),
    KeyRule(_HF_L + "mlp.down_proj.bias", _MS_L + "feed_forward.w2.bias", _hidden),
    KeyRule("transformer.ln_f.weight", "model.norm_out.weight", _hidden),
    KeyRule("lm_head.weight", "lm_head.weight", _vocab),
    # rotary inverse frequencies that older transformers versions saved as persistent buffers
    KeyRule(_HF_L + "self_attention.rotary_emb.inv_freq", None, None),
)
_Q_L = "model.layers.{layer}."
QWEN2_KEY_MAP: Tuple[KeyRule, ...] = (
    KeyRule("model.embed_tokens.weight", "model.tok_embeddings.embedding_weight", _vocab),
    KeyRule(_Q_L + "input_layernorm.weight", _MS_L + "attention_norm.weight", _hidden),
    KeyRule(_Q_L + "self_attn.q_proj.weight", _MS_L + "attention.wq.weight", _square),
    KeyRule(_Q_L + "self_attn.q_proj.bias", _MS_L + "attention.wq.bias", _hidden),
    KeyRule(_Q_L + "self_attn.k_proj.weight", _MS_L + "attention.wk.weight", _kv),
    KeyRule(_Q_L + "self_attn.k_proj.bias", _MS_L + "attention.wk.bias", _kv_bias),
    KeyRule(_Q_L + "self_attn.v_proj.weight", _MS_L + "attention.wv.weight", _kv),
    KeyRule(_Q_L + "self_attn.v_proj.bias", _MS_L + "attention.wv.bias", _kv_bias),
    KeyRule(_Q_L + "self_attn.o_proj.weight", _MS_L + "attention.wo.weight", _square),
    KeyRule(_Q_L + "post_attention_layernorm.weight", _MS_L + "ffn_norm.weight", _hidden),
    KeyRule(_Q_L + "mlp.gate_proj.weight", _MS_L + "feed_forward.w1.weight", _ffn_in),
    KeyRule(_Q_L + "mlp.up_proj.weight", _MS_L + "feed_forward.w3.weight", _ffn_in),
    KeyRule(_Q_L + "mlp.down_proj.weight", _MS_L + "feed_forward.w2.weight", _ffn_out),
    KeyRule("model.norm.weight", "model.norm_out.weight", _hidden),
    KeyRule("lm_head.weight", "lm_head.weight", _vocab, _untied),
    KeyRule(_Q_L + "self_attn.rotary_emb.inv_freq", None, None),
)
KEY_MAPS: Dict[str, Tuple[KeyRule, ...]] = {"telechat2": KEY_MAP, "qwen2": QWEN2_KEY_MAP}


# ---- named reshapes for the fused layouts ---------------------------------------------------------------
def deinterleave_kv(wk_v: np.ndarray, cfg: ModelConfig) -> Tuple[np.ndarray, np.ndarray]:
    """[2kd, H] rows [K_h0; V_h0; K_h1; ...] -> K_all [kd, H], V_all [kd, H]."""
    k, d = cfg.num_kv_heads, cfg.head_dim
    heads = wk_v.reshape(k, 2, d, -1)  # [k, 2, d, H]
    return heads[:, 0].reshape(k * d, -1), heads[:, 1].reshape(k * d, -1)


def interleave_kv(k_all: np.ndarray, v_all: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Inverse of `deinterleave_kv`: K_all, V_all [kd, H] -> [2kd, H] per-head [K_h; V_h]."""
    k, d = cfg.num_kv_heads, cfg.head_dim
    pairs = np.stack([k_all.reshape(k, d, -1), v_all.reshape(k, d, -1)], axis=1)  # [k, 2, d, H]
    return pairs.reshape(2 * k * d, -1)


def fuse_qkv(cfg: ModelConfig, wq: np.ndarray, wk_v: np.ndarray) -> np.ndarray:
    """wq [H, H], wk_v [2kd, H] -> w_qkv [H + 2kd, H] = [wq; K_all; V_all]."""
    k_all, v_all = deinterleave_kv(wk_v, cfg)
    return np.concatenate([wq, k_all, v_all], axis=0)


def split_qkv(cfg: ModelConfig, w_qkv: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse of `fuse_qkv`."""
    h, kd = cfg.hidden_size, cfg.kv_dim
    return w_qkv[:h], interleave_kv(w_qkv[h:h + kd], w_qkv[h + kd:], cfg)


def fuse_gate_hidden(cfg: ModelConfig, w1: np.ndarray, w3: np.ndarray) -> np.ndarray:
    """w1 (gate) [F, H], w3 (up) [F, H] -> w_gate_hidden [2F, H] = [w1; w3]."""
    return np.concatenate([w1, w3], axis=0)


def split_gate_hidden(cfg: ModelConfig, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse of `fuse_gate_hidden`."""
    f = cfg.ffn_hidden_size
    return w[:f], w[f:]


@dataclass(frozen=True)
class Fusion:
    fused: str  # MindSpore template of the fused weight
    parts: Tuple[str, ...]  # MindSpore templates it replaces, in fuse-argument order
    shape: Callable[[ModelConfig], Shape]
    fuse: Callable[..., np.ndarray]
    split: Callable[[ModelConfig, np.ndarray], Tuple[np.ndarray, ...]]


FUSIONS: Tuple[Fusion, ...] = (
    Fusion(_MS_L + "attention.w_qkv.weight", (_MS_L + "attention.wq.weight", _MS_L + "attention.wk_v.weight"),
           lambda c: (c.hidden_size + 2 * c.kv_dim, c.hidden_size), fuse_qkv, split_qkv),
    Fusion(_MS_L + "feed_forward.w_gate_hidden.weight",
           (_MS_L + "feed_forward.w1.weight", _MS_L + "feed_forward.w3.weight"),
           lambda c: (2 * c.ffn_hidden_size, c.hidden_size), fuse_gate_hidden, split_gate_hidden),
)


# ---- template matching ------------------------------------------------------------------------------------
def _pattern(template: str) -> "re.Pattern[str]":
    return re.compile(re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)") + r"\Z")


class _Translator:
    """Maps names matching one side's templates to the other side; built from (src, dst, when) rules."""

    def __init__(self, pairs: Iterable[Tuple[str, Optional[str], Optional[Callable[[ModelConfig], bool]]]]):
        self._rules = [(_pattern(src), dst, when) for src, dst, when in pairs]

    def __call__(self, name: str, cfg: ModelConfig) -> Tuple[bool, Optional[str]]:
        """(known, target name or None for a deliberate drop); layer indices must be < num_layers."""
        for pattern, dst, when in self._rules:
            m = pattern.match(name)
            if m is None or (when is not None and not when(cfg)):
                continue
            layer = m.groupdict().get("layer")
            if layer is not None and int(layer) >= cfg.num_layers:
                return False, None
            return True, (dst.format(layer=layer) if dst is not None else None)
        return False, None


def _check_bijective() -> None:
    for family, rules in KEY_MAPS.items():
        for side in ("hf", "ms"):
            names = [getattr(r, side) for r in rules if getattr(r, side) is not None]
            if len(names) != len(set(names)):
                raise AssertionError(f"the {family} key map repeats a {side} template")


_check_bijective()
_HF_TO_MS = {f: _Translator((r.hf, r.ms, r.when) for r in rules) for f, rules in KEY_MAPS.items()}
# the derived inverses
_MS_TO_HF = {f: _Translator((r.ms, r.hf, r.when) for r in rules if r.ms is not None) for f, rules in KEY_MAPS.items()}


def hf_to_ms_name(name: str, cfg: ModelConfig) -> Tuple[bool, Optional[str]]:
    return _HF_TO_MS[cfg.family](name, cfg)


def ms_to_hf_name(name: str, cfg: ModelConfig) -> Tuple[bool, Optional[str]]:
    return _MS_TO_HF[cfg.family](name, cfg)


def _rules(cfg: ModelConfig) -> List[KeyRule]:
    return [r for r in KEY_MAPS[cfg.family] if r.ms is not None and (r.when is None or r.when(cfg))]


# ---- expected names and shapes ----------------------------------------------------------------------------
def _expand(templates: Sequence[Tuple[str, Shape]], num_layers: int) -> Dict[str, Shape]:
    """Canonical order: leading global names, then layer by layer, then trailing global names."""
    out: Dict[str, Shape] = {}
    per_layer = [(t, s) for t, s in templates if "{layer}" in t]
    done_layers = False
    for template, shape in templates:
        if "{layer}" not in template:
            out[template] = shape
        elif not done_layers:
            for i in range(num_layers):
                for t, s in per_layer:
                    out[t.format(layer=i)] = s
            done_layers = True
    return out


def expected_hf(cfg: ModelConfig) -> Dict[str, Shape]:
    """Every HF name with its shape, in canonical order."""
    return _expand([(r.hf, r.shape(cfg)) for r in _rules(cfg)], cfg.num_layers)


def expected_ms(cfg: ModelConfig, fused: bool = False) -> Dict[str, Shape]:
    """Every MindSpore name with its shape, in canonical order (fused layouts take the first part's place)."""
    templates: List[Tuple[str, Shape]] = [(r.ms, r.shape(cfg)) for r in _rules(cfg)]
    if fused:
        if cfg.family != "telechat2":
            raise ConversionError(f"the fused inference layouts are TeleChat2's; a {cfg.family} checkpoint has none")
        for fusion in FUSIONS:
            names = [t for t, _ in templates]
            first = names.index(fusion.parts[0])
            templates[first] = (fusion.fused, fusion.shape(cfg))
            templates = [(t, s) for t, s in templates if t not in fusion.parts[1:]]
    return _expand(templates, cfg.num_layers)


def is_fused(names: Iterable[str]) -> bool:
    """Whether a MindSpore checkpoint uses the fused layouts (any fused weight present)."""
    patterns = [_pattern(f.fused) for f in FUSIONS]
    return any(p.match(n) for n in names for p in patterns)


def fusion_of(name: str) -> Optional[Tuple[Fusion, str]]:
    """(Fusion, layer) if `name` is a fused MindSpore weight."""
    for fusion in FUSIONS:
        m = _pattern(fusion.fused).match(name)
        if m:
            return fusion, m.group("layer")
    return None


def _config_summary(cfg: ModelConfig) -> str:
    return (f"num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, num_heads={cfg.num_heads}, "
            f"num_kv_heads={cfg.num_kv_heads}, ffn_hidden_size={cfg.ffn_hidden_size}, vocab_size={cfg.vocab_size}")


def _few(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" ... ({len(names)} in all)" if len(names) > 4 else "")


def check_names_and_shapes(found: Mapping[str, Shape], expected: Mapping[str, Shape], what: str,
                           cfg: ModelConfig, unknown: Sequence[str] = ()) -> None:
    """Refuse unless `found` holds exactly the `expected` names with the expected shapes.

    `unknown` lists source names that no rule matched (reported first: they usually mean a wrong file)."""
    if unknown:
        raise ConversionError(f"{what}: unknown tensor name(s) {_few(list(unknown))}; not {cfg.family} weights "
                              f"for a config with {_config_summary(cfg)}")
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        raise ConversionError(f"{what}: {'; '.join(parts)}; the weights do not match the config "
                              f"({_config_summary(cfg)})")
    wrong = [f"{n} is {list(found[n])}, config implies {list(s)}" for n, s in expected.items()
             if tuple(found[n]) != tuple(s)]
    if wrong:
        raise ConversionError(f"{what}: shape mismatch: {'; '.join(wrong[:3])}"
                              f"{f' ... ({len(wrong)} in all)' if len(wrong) > 3 else ''}; the weights do not "
                              f"match the config ({_config_summary(cfg)})")


def fusion_part(name: str) -> Optional[Tuple[Fusion, str, int]]:
    """(Fusion, layer, index in fusion.parts) if `name` is one of the weights a fused layout replaces."""
    for fusion in FUSIONS:
        for index, part in enumerate(fusion.parts):
            m = _pattern(part).match(name)
            if m:
                return fusion, m.group("layer"), index
    return None
