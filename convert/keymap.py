"""The HF <-> MindSpore key map of each family, its derived inverse, expected shapes and fused layouts.

`KEY_MAPS[family]` lists every parameter once as (HF template, MindFormers template, shape from ModelConfig,
optional condition on the config); `{layer}` stands for the decoder layer index. `KEY_MAP` is TeleChat2's;
Qwen2's maps transformers' names (`model.layers.N.self_attn.q_proj`, ...) to the names MindFormers'
research/qwen2 uses (`wq`/`wk`/`wv` with biases, `wo`, `feed_forward.w1/w2/w3`); with tied embeddings its
`lm_head.weight` is absent on both sides (HF's save_pretrained writes the shared matrix once). Both directions
read this table: `hf_to_ms_name` matches the HF side and formats the MindSpore side, `ms_to_hf_names` does the
opposite; there is no second, hand-written table.

Mixture of experts: a rule's `layers` condition says which decoder layers hold it (the dense FFN in dense layers,
the MoE block in sparse ones: ModelConfig.is_sparse). HF stores one tensor per expert (`{expert}` in the
template: `mlp.local_experts.{e}.gate_proj` for TeleChat2-MoE, `mlp.experts.{e}.gate_proj` for Qwen2-MoE);
MindSpore stacks them in expert order as MindFormers does (`feed_forward.ffn.w1` [E, F, H], the down bias
`ffn.w2.bias` [E, H]), so those rules are a rename plus a stack. MindFormers' convert_gmm step stores the stacked
weights transposed for its GroupedMatmul, [E, in, out] (`gmm=True` here; GMM_METADATA marks such a file). Both frameworks store Linear weights as [out, in], so every mapping is a pure rename
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


def _router(c: ModelConfig) -> Shape:
    return (c.num_experts, c.hidden_size)  # [E, H]


def _expert_in(c: ModelConfig) -> Shape:
    return (c.moe_ffn_hidden_size, c.hidden_size)  # one expert's [Fe, H]


def _expert_out(c: ModelConfig) -> Shape:
    return (c.hidden_size, c.moe_ffn_hidden_size)  # one expert's [H, Fe]


def _shared_in(c: ModelConfig) -> Shape:
    return (c.shared_expert_ffn_hidden_size, c.hidden_size)  # [Fs, H]


def _shared_out(c: ModelConfig) -> Shape:
    return (c.hidden_size, c.shared_expert_ffn_hidden_size)  # [H, Fs]


def _shared_gate(c: ModelConfig) -> Shape:
    return (1, c.hidden_size)  # [1, H]


def _shared(c: ModelConfig) -> bool:
    return c.shared_expert_ffn_hidden_size > 0


def _unshared(c: ModelConfig) -> bool:
    return c.shared_expert_ffn_hidden_size == 0


def _dense_layer(c: ModelConfig, layer: int) -> bool:
    return not c.is_sparse(layer)


def _sparse_layer(c: ModelConfig, layer: int) -> bool:
    return c.is_sparse(layer)


@dataclass(frozen=True)
class KeyRule:
    hf: str
    ms: Optional[str]  # None: a deliberate drop (HF only, recomputed from the config)
    shape: Optional[Callable[[ModelConfig], Shape]]
    when: Optional[Callable[[ModelConfig], bool]] = None  # the parameter exists only for such configs
    layers: Optional[Callable[[ModelConfig, int], bool]] = None  # ... and only in such decoder layers

    @property
    def stacked(self) -> bool:
        """One HF tensor per expert (`{expert}` in the HF template), stacked on the MindSpore side: [E, *shape]."""
        return "{expert}" in self.hf


def _moe_rules(hf_layer: str, mlp: str, router: str, experts: str, ms_moe: str,
               when: Optional[Callable[[ModelConfig], bool]] = None) -> Tuple[KeyRule, ...]:
    """The routed experts of a sparse layer: router [E, H] and expert e's gate/up/down (+ down bias when the
    config has one) <-> `{ms_moe}router.dense.weight` and the stacked `{ms_moe}ffn.w1/w3/w2` [E, ...]."""
    ms = _MS_L + "feed_forward." + ms_moe
    expert = hf_layer + mlp + experts + ".{expert}."
    bias = (lambda c: c.down_bias and (when is None or when(c)))
    return (
        KeyRule(hf_layer + mlp + router + ".weight", ms + "router.dense.weight", _router, when, _sparse_layer),
        KeyRule(expert + "gate_proj.weight", ms + "ffn.w1.weight", _expert_in, when, _sparse_layer),
        KeyRule(expert + "up_proj.weight", ms + "ffn.w3.weight", _expert_in, when, _sparse_layer),
        KeyRule(expert + "down_proj.weight", ms + "ffn.w2.weight", _expert_out, when, _sparse_layer),
        KeyRule(expert + "down_proj.bias", ms + "ffn.w2.bias", _hidden, bias, _sparse_layer),
    )


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
    KeyRule(_HF_L + "mlp.gate_proj.weight", _MS_L + "feed_forward.w1.weight", _ffn_in, None, _dense_layer),
    KeyRule(_HF_L + "mlp.up_proj.weight", _MS_L + "feed_forward.w3.weight", _ffn_in, None, _dense_layer),
    KeyRule(_HF_L + "mlp.down_proj.weight", _MS_L + "feed_forward.w2.weight", _ffn_out, None, _dense_layer),
    KeyRule(_HF_L + "mlp.down_proj.bias", _MS_L + "feed_forward.w2.bias", _hidden, None, _dense_layer),
    # TeleChat2-MoE (39B-A12B): router and local experts, MindFormers' feed_forward.router / stacked ffn
    *_moe_rules(_HF_L, "mlp.", "router", "local_experts", ""),
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
    KeyRule(_Q_L + "mlp.gate_proj.weight", _MS_L + "feed_forward.w1.weight", _ffn_in, None, _dense_layer),
    KeyRule(_Q_L + "mlp.up_proj.weight", _MS_L + "feed_forward.w3.weight", _ffn_in, None, _dense_layer),
    KeyRule(_Q_L + "mlp.down_proj.weight", _MS_L + "feed_forward.w2.weight", _ffn_out, None, _dense_layer),
    # Qwen2-MoE: router `gate` and experts; with a shared expert, MindFormers' qwen2_moe names
    # (feed_forward.routed_experts.*, feed_forward.shared_experts.*, feed_forward.shared_experts_gate)
    *_moe_rules(_Q_L, "mlp.", "gate", "experts", "routed_experts.", _shared),
    *_moe_rules(_Q_L, "mlp.", "gate", "experts", "", _unshared),
    KeyRule(_Q_L + "mlp.shared_expert.gate_proj.weight", _MS_L + "feed_forward.shared_experts.w1.weight", _shared_in,
            _shared, _sparse_layer),
    KeyRule(_Q_L + "mlp.shared_expert.up_proj.weight", _MS_L + "feed_forward.shared_experts.w3.weight", _shared_in,
            _shared, _sparse_layer),
    KeyRule(_Q_L + "mlp.shared_expert.down_proj.weight", _MS_L + "feed_forward.shared_experts.w2.weight",
            _shared_out, _shared, _sparse_layer),
    KeyRule(_Q_L + "mlp.shared_expert_gate.weight", _MS_L + "feed_forward.shared_experts_gate.weight", _shared_gate,
            _shared, _sparse_layer),
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
    text = re.escape(template).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
    return re.compile(text.replace(re.escape("{expert}"), r"(?P<expert>\d+)") + r"\Z")


@dataclass(frozen=True)
class Match:
    """Where a name lands on the other side: `name` (None: a deliberate drop) and, for one expert's HF tensor,
    its index in the stacked MindSpore tensor."""

    name: Optional[str]
    expert: Optional[int] = None


class _Translator:
    """Maps names matching one side's templates to the other side; built from (src, dst, rule) triples. A
    stacked MindSpore name maps to its HF template with `{expert}` left in (see `ms_to_hf_names`)."""

    def __init__(self, triples: Iterable[Tuple[str, Optional[str], KeyRule]]):
        self._rules = [(_pattern(src), dst, rule) for src, dst, rule in triples]

    def __call__(self, name: str, cfg: ModelConfig) -> Optional[Match]:
        """The Match, or None for a name no rule knows (layer and expert indices must exist in `cfg`)."""
        for pattern, dst, rule in self._rules:
            m = pattern.match(name)
            if m is None or (rule.when is not None and not rule.when(cfg)):
                continue
            found = m.groupdict()
            layer = found.get("layer")
            if layer is not None and (int(layer) >= cfg.num_layers or
                                      (rule.layers is not None and not rule.layers(cfg, int(layer)))):
                return None
            expert = found.get("expert")
            if expert is not None and int(expert) >= cfg.num_experts:
                return None
            if dst is None:
                return Match(None)
            target = dst.replace("{layer}", layer) if layer is not None else dst
            return Match(target, None if expert is None else int(expert))
        return None


def _check_bijective() -> None:
    """No template appears twice on one side unless the repeats hold for different configs (`when`)."""
    for family, rules in KEY_MAPS.items():
        for side in ("hf", "ms"):
            keys = [(getattr(r, side), r.when) for r in rules if getattr(r, side) is not None]
            if len(keys) != len(set(keys)):
                raise AssertionError(f"the {family} key map repeats a {side} template")


_check_bijective()
_HF_TO_MS = {f: _Translator((r.hf, r.ms, r) for r in rules) for f, rules in KEY_MAPS.items()}
# the derived inverses
_MS_TO_HF = {f: _Translator((r.ms, r.hf, r) for r in rules if r.ms is not None) for f, rules in KEY_MAPS.items()}


def hf_to_ms_name(name: str, cfg: ModelConfig) -> Optional[Match]:
    """The MindSpore name an HF tensor goes to (with its expert index when it is one expert's), None if unknown."""
    return _HF_TO_MS[cfg.family](name, cfg)


def ms_to_hf_names(name: str, cfg: ModelConfig) -> List[Match]:
    """The HF tensors a MindSpore tensor holds: one, or one per expert of a stacked tensor (expert index set);
    empty for a name no rule knows."""
    found = _MS_TO_HF[cfg.family](name, cfg)
    if found is None:
        return []
    if "{expert}" not in found.name:
        return [found]
    return [Match(found.name.replace("{expert}", str(e)), e) for e in range(cfg.num_experts)]


def _rules(cfg: ModelConfig) -> List[KeyRule]:
    return [r for r in KEY_MAPS[cfg.family] if r.ms is not None and (r.when is None or r.when(cfg))]


# ---- expected names and shapes ----------------------------------------------------------------------------
Template = Tuple[str, Shape, Optional[Callable[[ModelConfig, int], bool]]]


def _expand(templates: Sequence[Template], cfg: ModelConfig) -> Dict[str, Shape]:
    """Canonical order: leading global names, then layer by layer (each layer's own names: dense or sparse),
    then trailing global names; `{expert}` templates expand to experts 0..E-1."""
    out: Dict[str, Shape] = {}
    per_layer = [t for t in templates if "{layer}" in t[0]]
    done_layers = False
    for template, shape, _ in templates:
        if "{layer}" not in template:
            out[template] = shape
        elif not done_layers:
            for i in range(cfg.num_layers):
                for t, s, layers in per_layer:
                    if layers is not None and not layers(cfg, i):
                        continue
                    name = t.replace("{layer}", str(i))
                    if "{expert}" in name:
                        out.update((name.replace("{expert}", str(e)), s) for e in range(cfg.num_experts))
                    else:
                        out[name] = s
            done_layers = True
    return out


def expected_hf(cfg: ModelConfig) -> Dict[str, Shape]:
    """Every HF name with its shape, in canonical order."""
    return _expand([(r.hf, r.shape(cfg), r.layers) for r in _rules(cfg)], cfg)


GMM_METADATA = ("expert_layout", "gmm")  # the safetensors metadata entry of a grouped-matmul layout file


def is_gmm_weight(name: str) -> bool:
    """A stacked expert weight that MindFormers' convert_gmm transposes ([E, out, in] -> [E, in, out])."""
    return ".ffn.w" in name and name.endswith(".weight") and ".feed_forward." in name


def expected_ms(cfg: ModelConfig, fused: bool = False, gmm: bool = False) -> Dict[str, Shape]:
    """Every MindSpore name with its shape, in canonical order (fused layouts take the first part's place;
    stacked expert tensors are [E, *one expert's shape], with `gmm` their weights [E, in, out])."""
    def stacked(rule: KeyRule) -> Shape:
        out, *rest = rule.shape(cfg)
        if gmm and rest:
            return (cfg.num_experts, rest[0], out)
        return (cfg.num_experts, out, *rest)

    if gmm and not cfg.num_experts:
        raise ConversionError(f"the grouped-matmul layout is for mixture-of-experts weights; {cfg.name} has no experts")
    templates: List[Template] = [(r.ms, stacked(r) if r.stacked else r.shape(cfg), r.layers) for r in _rules(cfg)]
    if fused:
        if cfg.family != "telechat2" or cfg.num_experts:
            raise ConversionError(f"the fused inference layouts are TeleChat2 dense's; a {cfg.name} checkpoint has "
                                  f"none")
        for fusion in FUSIONS:
            names = [t for t, _, _ in templates]
            first = names.index(fusion.parts[0])
            templates[first] = (fusion.fused, fusion.shape(cfg), None)
            templates = [t for t in templates if t[0] not in fusion.parts[1:]]
    return _expand(templates, cfg)


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
