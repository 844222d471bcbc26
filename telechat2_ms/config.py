"""Architecture config of the decoder family (TeleChat2, TeleChat2.5, the 32K variants, Qwen2) and the one
size registry.

`ModelConfig` holds architecture numbers and switches only (no run settings, no sampling). One model code
serves every family; the switches are data: q/k/v biases and separate k/v projections (Qwen2) or the fused
per-head interleaved key_value (TeleChat2), output / down-projection biases (TeleChat2), tied embeddings
(Qwen2-0.5B/1.5B), the rotary base and rule (TeleChat2's dynamic NTK + mscale with fp16 tables, or plain
RoPE in fp32), per-layer sliding-window attention with HF's semantics. `CONFIGS` is the single place where
sizes live; the converter, the entry point and the tests all read it. A real HF `config.json` loads with
`ModelConfig.from_hf_config` (TeleChat2 fields `n_layer`, `n_head`, ... or Qwen2's `num_hidden_layers`, ...)
and gives the same numbers as the registry; a field this port cannot honour is refused by name
(`HF_FIELDS_IGNORED` lists the ones it ignores on purpose).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


class ConfigError(ValueError):
    """A config (size name, YAML key, HF config.json) is wrong; the message says which and why."""


# the fields two configs must agree on to describe the same weights and numerics
ARCH_FIELDS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
               "rms_norm_eps", "training_seqlen", "base_seqlen", "rope_theta", "rope_scaling", "rope_fp16_tables",
               "qkv_bias", "separate_kv", "out_bias", "down_bias", "tie_word_embeddings", "sliding_window",
               "sliding_layers", "num_experts", "num_experts_per_tok", "moe_ffn_hidden_size",
               "shared_expert_ffn_hidden_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
               "router_aux_loss_coef", "aux_loss")
AUX_LOSSES = ("per_layer", "global")
FAMILIES = ("telechat2", "qwen2")
ROPE_RULES = ("dynamic_ntk", "none")
TELECHAT_DEFAULT_THETA = 10000.0  # the official modeling code's hard-coded base
# config.json fields read by no one on purpose (they change nothing this port computes)
HF_FIELDS_IGNORED = ("architectures", "model_type", "auto_map", "transformers_version", "torch_dtype", "dtype",
                     "use_cache", "attention_dropout", "hidden_dropout", "flash_attn", "unk_token_id", "seq_length",
                     "max_position_embeddings (Qwen2: no absolute-position limit in the model)", "_name_or_path",
                     "use_mrope", "initializer_range (only the random initialisation)")


@dataclass(frozen=True)
class ModelConfig:
    """TeleChat2 decoder architecture. Shapes elsewhere use H=hidden_size, n=num_heads, k=num_kv_heads,
    d=head_dim=H/n, F=ffn_hidden_size, V=vocab_size, L=num_layers."""

    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    num_kv_heads: Optional[int] = None  # None -> num_heads (MHA); 115B uses 8 (GQA)
    vocab_size: int = 131072
    rms_norm_eps: float = 1e-5  # read from config.json: 115B uses 1e-8 (spec 10.3)
    training_seqlen: int = 8192  # mscale reference length (spec 4.2)
    base_seqlen: int = 8192  # NTK alpha reference length (spec 4.2)
    rope_theta: float = TELECHAT_DEFAULT_THETA  # TeleChat2: config.json's rope_theta when given (32K: 1e6)
    rope_fp16_tables: bool = True  # round cos/sin to fp16 as the official TeleChat2 code does (spec 10.5)
    rope_scaling: str = "dynamic_ntk"  # TeleChat2's NTK alpha + mscale beyond the window; none: plain RoPE
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    family: str = "telechat2"  # telechat2 | qwen2: the converter's key map, tokenizer and chat template
    qkv_bias: bool = False  # Qwen2: q, k, v projections with bias
    separate_kv: bool = False  # Qwen2: wk and wv; TeleChat2: one wk_v, rows per kv head [K_h; V_h]
    out_bias: bool = True  # TeleChat2: the attention output projection (dense / wo) has a bias
    down_bias: bool = True  # TeleChat2: the MLP down projection (w2) has a bias
    tie_word_embeddings: bool = False  # Qwen2-0.5B / 1.5B: lm_head is the embedding matrix
    sliding_window: int = 0  # keys within this many positions (HF: kv > q - window) on sliding layers; 0: none
    sliding_layers: Tuple[int, ...] = ()  # the layers that attend within the window
    # Mixture of experts (families.md 3); num_experts 0: every layer dense
    num_experts: int = 0  # routed experts of each sparse layer
    num_experts_per_tok: int = 0  # top-k
    moe_ffn_hidden_size: int = 0  # each expert's SwiGLU width (ffn_hidden_size stays the dense layers')
    shared_expert_ffn_hidden_size: int = 0  # Qwen2-MoE: a shared expert under a sigmoid gate; 0: none
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum 1 (TeleChat2-MoE yes, Qwen2-57B no)
    decoder_sparse_step: int = 1  # layer i is sparse iff (i + 1) % step == 0 and i not in mlp_only_layers (HF)
    mlp_only_layers: Tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added to the training loss
    # per_layer: sum over sparse layers of coef * E * sum_i f_i * P_i, f over the k*N assignments (MindFormers,
    # TeleChat2-MoE); global: transformers' load_balancing_loss_func over every sparse layer's tokens at once
    aux_loss: str = "per_layer"
    # a run setting, not the checkpoint's (settings.moe_capacity_factor): 0 dropless; c > 0: each expert takes at
    # most ceil(c * k * N / E) of the N tokens it sees, in token order, the rest of its tokens dropped (MindFormers)
    moe_capacity_factor: float = field(default=0.0, compare=False)
    name: str = field(default="custom", compare=False)
    rope_theta_source: str = field(default="the TeleChat2 default (config.json gives no rope_theta)", compare=False)

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.rope_scaling not in ROPE_RULES:
            raise ConfigError(f"rope_scaling must be one of {', '.join(ROPE_RULES)}, got {self.rope_scaling!r}")
        object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if self.num_experts < 0:
            raise ConfigError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), got "
                                  f"{self.num_experts_per_tok}")
            if self.moe_ffn_hidden_size <= 0:
                raise ConfigError(f"moe_ffn_hidden_size must be positive with experts, got {self.moe_ffn_hidden_size}")
            if self.decoder_sparse_step < 1:
                raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
            if self.moe_capacity_factor < 0:
                raise ConfigError(f"moe_capacity_factor must be >= 0 (0: dropless), got {self.moe_capacity_factor}")
            if self.aux_loss not in AUX_LOSSES:
                raise ConfigError(f"aux_loss must be one of {', '.join(AUX_LOSSES)}, got {self.aux_loss!r}")
        if self.sliding_layers and self.sliding_window <= 0:
            raise ConfigError(f"sliding_layers {list(self.sliding_layers)} need a positive sliding_window")
        if any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise ConfigError(f"sliding_layers {list(self.sliding_layers)} are not all layers of {self.num_layers}")

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` is an MoE layer (transformers' Qwen2-MoE rule)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def sparse_layers(self) -> Tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.is_sparse(i))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """k*d: width of K (and of V); key_value has 2*kv_dim output rows."""
        return self.num_kv_heads * self.head_dim

    def architecture(self) -> Dict[str, Any]:
        """The ARCH_FIELDS of this config (what a checkpoint's config is compared by)."""
        return {k: getattr(self, k) for k in ARCH_FIELDS}

    def replace(self, **changes) -> "ModelConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown model config key(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        H, F, V, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        biases = (H + 2 * self.kv_dim if self.qkv_bias else 0) + (H if self.out_bias else 0) + \
            (H if self.down_bias else 0)
        per_layer = H * H + 2 * self.kv_dim * H + H * H + 3 * H * F + 2 * H + biases
        E, Fm, Fs = self.num_experts, self.moe_ffn_hidden_size, self.shared_expert_ffn_hidden_size
        # a sparse layer swaps the dense SwiGLU for the router, E experts (with their down biases) and the
        # shared expert with its gate
        sparse_delta = (E * H + E * (3 * H * Fm + (H if self.down_bias else 0)) + (3 * H * Fs + H if Fs else 0)
                        - 3 * H * F - (H if self.down_bias else 0))
        return (1 if self.tie_word_embeddings else 2) * V * H + L * per_layer + H + \
            len(self.sparse_layers) * sparse_delta

    # ---- HF config.json <-> ModelConfig -------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, source: Any, name: str = "hf") -> "ModelConfig":
        """Build from a HF TeleChat2 `config.json` (a path, a directory holding it, or a dict)."""
        where = "config.json"
        if isinstance(source, (str, os.PathLike)):
            path = os.path.join(source, "config.json") if os.path.isdir(source) else source
            if not os.path.exists(path):
                raise ConfigError(f"no config.json at {path}")
            where = str(path)
            try:
                with open(path, encoding="utf-8") as f:
                    source = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(source, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(source).__name__}")
        hf = dict(source)

        pick = _picker(hf, where)
        model_type = hf.get("model_type")
        if model_type in ("qwen2", "qwen2_moe") or {"Qwen2ForCausalLM", "Qwen2MoeForCausalLM"} & set(
                hf.get("architectures") or []):
            return cls._from_qwen2(hf, pick, where, name)
        if model_type not in (None, "telechat", "telechat2"):
            raise ConfigError(f"{where}: model_type {model_type!r} is not a family this port runs (telechat, "
                              f"telechat2, qwen2, qwen2_moe)")
        if hf.get("tie_word_embeddings"):
            raise ConfigError(f"{where}: tie_word_embeddings=true is not a TeleChat2 checkpoint (lm_head is untied)")
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ConfigError(f"{where}: apply_residual_connection_post_layernorm=true is not supported")
        if hf.get("embed_layernorm"):
            raise ConfigError(f"{where}: embed_layernorm=true is not supported (false in every released TeleChat2)")
        scaling = hf.get("rope_scaling")
        if scaling is not None and not (isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                                        == "dynamic" and float(scaling.get("factor", 1.0)) == 1.0):
            raise ConfigError(f"{where}: rope_scaling {scaling!r} is not TeleChat2's dynamic NTK; this port honours "
                              "only absent or {\"rope_type\": \"dynamic\", \"factor\": 1.0} (the rule of spec 4.2)")
        theta = pick("rope_theta", default=None, required=False, kind=float)
        n_head = pick("n_head", "num_attention_heads")
        return cls(
            hidden_size=pick("hidden_size"),
            num_layers=pick("n_layer", "num_hidden_layers"),
            num_heads=n_head,
            num_kv_heads=pick("num_key_value_heads", default=n_head),
            ffn_hidden_size=pick("ffn_hidden_size", "intermediate_size"),
            vocab_size=pick("vocab_size"),
            rms_norm_eps=pick("layer_norm_epsilon", "rms_norm_eps", kind=float),
            training_seqlen=pick("training_seqlen", default=8192),
            base_seqlen=pick("base_seqlen", default=8192),
            rope_theta=TELECHAT_DEFAULT_THETA if theta is None else theta,
            rope_theta_source=(f"config.json rope_theta {theta:g}" if theta is not None else
                               f"the TeleChat2 default {TELECHAT_DEFAULT_THETA:g} (config.json gives no rope_theta)"),
            initializer_range=pick("initializer_range", default=0.02, kind=float),
            bos_token_id=pick("bos_token_id", default=1),
            eos_token_id=pick("eos_token_id", default=2),
            pad_token_id=pick("pad_token_id", default=3),
            name=name, **_read_moe(hf, pick, where, pick("n_layer", "num_hidden_layers"), "per_layer", 0.01),
        )

    @classmethod
    def _from_qwen2(cls, hf: Dict[str, Any], pick, where: str, name: str) -> "ModelConfig":
        """Qwen2 (transformers configuration_qwen2.py semantics, v4 and v5 field names)."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (Qwen2 uses silu)")
        rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
        rope_type = rope.get("rope_type", "default")
        scaling = hf.get("rope_scaling")
        if rope_type != "default" or scaling not in (None, {}):
            raise ConfigError(f"{where}: rope scaling {scaling or rope!r} is not supported for Qwen2 (plain RoPE "
                              "only); remove rope_scaling or use a config without it")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        layers = pick("num_hidden_layers")
        window = pick("sliding_window", default=None, required=False) if hf.get("use_sliding_window") else None
        layer_types = hf.get("layer_types")
        if layer_types is None:
            first_sliding = pick("max_window_layers", default=28)
            layer_types = ["sliding_attention" if window is not None and i >= first_sliding else "full_attention"
                           for i in range(layers)]
        if not isinstance(layer_types, list) or len(layer_types) != layers or \
                set(layer_types) - {"full_attention", "sliding_attention"}:
            raise ConfigError(f"{where}: layer_types must list full_attention / sliding_attention for each of the "
                              f"{layers} layers, got {layer_types!r}")
        sliding = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
        if sliding and not window:
            raise ConfigError(f"{where}: layer_types has sliding_attention layers but no sliding_window is in use "
                              "(use_sliding_window false or sliding_window null)")
        moe = _read_moe(hf, pick, where, layers, "global", 0.001)
        eos = hf.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        bos = pick("bos_token_id", default=151643, required=False)
        heads = pick("num_attention_heads")
        length = pick("max_position_embeddings", default=32768)
        return cls(
            family="qwen2", hidden_size=pick("hidden_size"), num_layers=layers, num_heads=heads,
            num_kv_heads=pick("num_key_value_heads", default=heads), ffn_hidden_size=pick("intermediate_size"),
            vocab_size=pick("vocab_size"), rms_norm_eps=pick("rms_norm_eps", kind=float),
            training_seqlen=length, base_seqlen=length, rope_theta=float(theta),
            rope_theta_source=f"config.json rope_theta {float(theta):g}", rope_scaling="none",
            rope_fp16_tables=False, qkv_bias=True, separate_kv=True, out_bias=False, down_bias=False,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), sliding_window=int(window or 0),
            sliding_layers=sliding if window else (),
            initializer_range=pick("initializer_range", default=0.02, kind=float), bos_token_id=bos,
            eos_token_id=int(eos) if eos is not None else bos,
            pad_token_id=pick("pad_token_id", default=bos, required=False), name=name, **moe)

    def to_hf_config(self) -> Dict[str, Any]:
        """The HF `config.json` dict for this architecture (Telechat2 remote-code field names, or Qwen2's)."""
        if self.family == "qwen2":
            return self._to_qwen2_config()
        extra = {"rope_theta": self.rope_theta} if self.rope_theta != TELECHAT_DEFAULT_THETA else {}
        return {**extra, 
            "architectures": ["Telechat2ForCausalLM"],
            "model_type": "telechat",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "ffn_hidden_size": self.ffn_hidden_size,
            "layer_norm_epsilon": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "apply_residual_connection_post_layernorm": False,
            "embed_layernorm": False,
            "tie_word_embeddings": False,
            "training_seqlen": self.training_seqlen,
            "base_seqlen": self.base_seqlen,
            "seq_length": self.training_seqlen,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "unk_token_id": 0,
            "flash_attn": False,
            "use_cache": True,
            **self._moe_fields(),
        }

    def _to_qwen2_config(self) -> Dict[str, Any]:
        first_sliding = min(self.sliding_layers) if self.sliding_layers else self.num_layers
        layer_types = ["sliding_attention" if i in self.sliding_layers else "full_attention"
                       for i in range(self.num_layers)]
        return {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "hidden_act": "silu",
            "max_position_embeddings": self.training_seqlen, "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps, "use_cache": True, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta, "rope_scaling": None,
            "use_sliding_window": bool(self.sliding_layers), "sliding_window": self.sliding_window or None,
            "max_window_layers": first_sliding, "layer_types": layer_types, "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            **({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "qkv_bias": True}
               if self.num_experts else {}),
            **self._moe_fields(),
        }

    def _moe_fields(self) -> Dict[str, Any]:
        """config.json's MoE fields (transformers' Qwen2-MoE names; TeleChat2-MoE's own config.json was not
        seen, so a TeleChat2 checkpoint carries the same names, read back by _read_moe)."""
        if not self.num_experts:
            return {}
        return {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_ffn_hidden_size,
                "shared_expert_intermediate_size": self.shared_expert_ffn_hidden_size,
                "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": self.decoder_sparse_step,
                "mlp_only_layers": list(self.mlp_only_layers), "router_aux_loss_coef": self.router_aux_loss_coef,
                "aux_loss": self.aux_loss}


# The size registry. Sources: OFF README model table, OFF-HF115 config.json, MF yamls (spec 2.2).
# eps: the 115B config.json says 1e-8; every MindFormers yaml and the remote-code default use 1e-5.
CONFIGS: Dict[str, ModelConfig] = {
    # CPU-sized, GQA (4 query heads share 2 kv heads) so both the MHA and GQA paths are exercised. Its
    # vocabulary is the built-in demo tokenizer's (telechat2_ms/assets), which keeps ids 0-12 of TeleChat2.
    "tiny": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=160,
                        vocab_size=1024, rms_norm_eps=1e-5, name="tiny"),
    # Benchmark size (research/bench_speed.py), not a released model: MHA with head dim 64 and ffn 8/3 H,
    # 12 layers of hidden 768 and a 16K vocabulary: 110M parameters.
    "bench_100m": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=2048,
                              vocab_size=16384, name="bench_100m"),
    # https://huggingface.co/Tele-AI/TeleChat2-3B/blob/main/config.json
    "telechat2_3b": ModelConfig(hidden_size=3072, num_layers=24, num_heads=24, ffn_hidden_size=6144,
                                name="telechat2_3b"),
    # https://huggingface.co/Tele-AI/TeleChat2-7B/blob/main/config.json
    "telechat2_7b": ModelConfig(hidden_size=4096, num_layers=30, num_heads=32, ffn_hidden_size=12288,
                                name="telechat2_7b"),
    # https://huggingface.co/Tele-AI/TeleChat2-35B/blob/main/config.json
    "telechat2_35b": ModelConfig(hidden_size=6144, num_layers=64, num_heads=48, ffn_hidden_size=20480,
                                 name="telechat2_35b"),
    # https://github.com/Tele-AI/TeleChat2/blob/main/model/115B/config.json (copy in ../shared/reference)
    "telechat2_115b": ModelConfig(hidden_size=8192, num_layers=96, num_heads=64, num_kv_heads=8,
                                  ffn_hidden_size=40960, rms_norm_eps=1e-8, name="telechat2_115b"),
}
# Qwen2 (../shared/docs/families.md 2; the official config.json of each size decides when given)
_QWEN2 = dict(family="qwen2", qkv_bias=True, separate_kv=True, out_bias=False, down_bias=False, rope_theta=1e6,
              rope_theta_source="Qwen2's config.json rope_theta 1e+06", rope_scaling="none", rope_fp16_tables=False, rms_norm_eps=1e-6, training_seqlen=32768,
              base_seqlen=32768, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
CONFIGS.update({
    # CPU-sized Qwen2 with every switch on: GQA, tied embeddings, the last layer within a 6-token window; the
    # ids of the demo tokenizer (tests use their own); not a released model
    "qwen2_tiny": ModelConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=160,
                              vocab_size=1024, tie_word_embeddings=True, sliding_window=6, sliding_layers=(2,),
                              name="qwen2_tiny", **dict(_QWEN2, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
    "qwen2_0_5b": ModelConfig(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, ffn_hidden_size=4864,
                              vocab_size=151936, tie_word_embeddings=True, name="qwen2_0_5b", **_QWEN2),
    "qwen2_1_5b": ModelConfig(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, ffn_hidden_size=8960,
                              vocab_size=151936, tie_word_embeddings=True, name="qwen2_1_5b", **_QWEN2),
    "qwen2_7b": ModelConfig(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, ffn_hidden_size=18944,
                            vocab_size=152064, name="qwen2_7b", **_QWEN2),
    "qwen2_72b": ModelConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_hidden_size=29568,
                             vocab_size=152064, name="qwen2_72b", **dict(_QWEN2, rms_norm_eps=1e-5)),
    # TeleChat2 32K (families.md 1): rope_theta 1e6 from config.json, trained and based at 32768
    "telechat2_7b_32k": ModelConfig(hidden_size=4096, num_layers=30, num_heads=32, ffn_hidden_size=12288,
                                    training_seqlen=32768, base_seqlen=32768, rope_theta=1e6,
                                    rope_theta_source="TeleChat2-32K's config.json rope_theta 1e+06", name="telechat2_7b_32k"),
    "telechat2_35b_32k": ModelConfig(hidden_size=6144, num_layers=64, num_heads=48, ffn_hidden_size=20480,
                                     training_seqlen=32768, base_seqlen=32768, rope_theta=1e6,
                                     rope_theta_source="TeleChat2-32K's config.json rope_theta 1e+06", name="telechat2_35b_32k"),
    # TeleChat2.5 (families.md 1): the TeleChat2 architecture and weight names, 35B MHA; its config.json was not
    # seen in a primary source, so the checkpoint's own config.json decides (these are the TeleChat2 shapes)
    "telechat2_5_35b": ModelConfig(hidden_size=6144, num_layers=64, num_heads=48, ffn_hidden_size=20480,
                                   name="telechat2_5_35b"),
    "telechat2_5_115b": ModelConfig(hidden_size=8192, num_layers=96, num_heads=64, num_kv_heads=8,
                                    ffn_hidden_size=40960, name="telechat2_5_115b"),
})
# Mixture of experts (families.md 3)
_TELECHAT2_MOE = dict(norm_topk_prob=True, router_aux_loss_coef=0.01, aux_loss="per_layer")
_QWEN2_MOE = dict(_QWEN2, norm_topk_prob=False, router_aux_loss_coef=0.001, aux_loss="global")
CONFIGS.update({
    # CPU-sized MoE of each family (not released models): TeleChat2-MoE's renormalised top-2 of 4 experts with
    # their down biases; Qwen2-MoE's top-2 of 4 with a shared expert, layer 1 dense (mlp_only_layers)
    "telechat2_moe_tiny": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=160,
                                      vocab_size=1024, num_experts=4, num_experts_per_tok=2, moe_ffn_hidden_size=48,
                                      name="telechat2_moe_tiny", **_TELECHAT2_MOE),
    "qwen2_moe_tiny": ModelConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=160,
                                  vocab_size=1024, num_experts=4, num_experts_per_tok=2, moe_ffn_hidden_size=48,
                                  shared_expert_ffn_hidden_size=96, mlp_only_layers=(1,), name="qwen2_moe_tiny",
                                  **dict(_QWEN2_MOE, bos_token_id=1, eos_token_id=2, pad_token_id=3)),
    # TeleChat2-39B-A12B: every layer MoE, 16 experts, top-4, expert FFN 6144 with down bias
    "telechat2_39b_a12b": ModelConfig(hidden_size=4096, num_layers=30, num_heads=32, ffn_hidden_size=6144,
                                      num_experts=16, num_experts_per_tok=4, moe_ffn_hidden_size=6144,
                                      name="telechat2_39b_a12b", **_TELECHAT2_MOE),
    # Qwen2-57B-A14B: 64 experts, top-8, shared expert 20480, no renormalisation; its config.json decides
    "qwen2_57b_a14b": ModelConfig(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                                  ffn_hidden_size=18944, vocab_size=151936, num_experts=64, num_experts_per_tok=8,
                                  moe_ffn_hidden_size=2560, shared_expert_ffn_hidden_size=20480,
                                  name="qwen2_57b_a14b", **_QWEN2_MOE),
})


def _read_moe(hf: Dict[str, Any], pick, where: str, layers: int, aux_loss: str, coef: float) -> Dict[str, Any]:
    """The MoE fields of a config.json (ModelConfig._moe_fields' names); {} without `num_experts`."""
    if not hf.get("num_experts"):
        return {}
    only = hf.get("mlp_only_layers") or []
    if not isinstance(only, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in only):
        raise ConfigError(f"{where}: mlp_only_layers must list layer indices below {layers}, got {only!r}")
    return dict(num_experts=pick("num_experts"), num_experts_per_tok=pick("num_experts_per_tok"),
                moe_ffn_hidden_size=pick("moe_intermediate_size"),
                shared_expert_ffn_hidden_size=pick("shared_expert_intermediate_size", default=0, required=False),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=pick("decoder_sparse_step", default=1), mlp_only_layers=tuple(only),
                router_aux_loss_coef=pick("router_aux_loss_coef", default=coef, kind=float),
                aux_loss=hf.get("aux_loss", aux_loss))


def _picker(hf: Dict[str, Any], where: str):
    """pick(*names, default, required, kind): the first of `names` present in config.json `hf`, converted to
    `kind` (int or float); ConfigError naming the file and field for a missing or mistyped one."""
    def pick(*names, default=None, required=True, kind=int):
        for n in names:
            if n in hf and hf[n] is not None:
                value = hf[n]
                try:
                    if isinstance(value, bool) or (kind is int and float(value) != int(value)):
                        raise ValueError
                    return kind(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: {n} must be {'an integer' if kind is int else 'a number'}, "
                                      f"got {value!r}") from None
        if required and default is None:
            raise ConfigError(f"{where} lacks {' / '.join(names)}")
        return default
    return pick


def get_config(name: str, **overrides) -> ModelConfig:
    """Look up a size by name (`tiny`, `telechat2_7b`, ...); `overrides` replace fields."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown model size {name!r}; known sizes: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg
