"""TeleChat2 architecture config and the one size registry.

`ModelConfig` holds architecture numbers only (no run settings, no sampling). `CONFIGS` is the single place
where sizes live; the converter, the entry point and the tests all read it. A real HF `config.json`
(`n_layer`, `n_head`, `num_key_value_heads`, `ffn_hidden_size`, `layer_norm_epsilon`, ...) loads with
`ModelConfig.from_hf_config` and gives the same numbers as the registry (spec sections 2.1-2.2).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


class ConfigError(ValueError):
    """A config (size name, YAML key, HF config.json) is wrong; the message says which and why."""


# the fields two configs must agree on to describe the same weights and numerics
ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
               "rms_norm_eps", "training_seqlen", "base_seqlen")


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
    rope_theta: float = 10000.0  # hard-coded 10000 in the official code
    rope_fp16_tables: bool = True  # round cos/sin to fp16 as the official code does (spec 10.5)
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    name: str = field(default="custom", compare=False)

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
        per_layer = H * H + 2 * self.kv_dim * H + H * H + H + 3 * H * F + H + 2 * H
        return 2 * V * H + L * per_layer + H

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

        if hf.get("tie_word_embeddings"):
            raise ConfigError("tie_word_embeddings=true is not a TeleChat2 checkpoint (lm_head is untied)")
        if hf.get("apply_residual_connection_post_layernorm"):
            raise ConfigError("apply_residual_connection_post_layernorm=true is not supported")
        if hf.get("embed_layernorm"):
            raise ConfigError("embed_layernorm=true is not supported (false in every released TeleChat2)")
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
            initializer_range=pick("initializer_range", default=0.02, kind=float),
            bos_token_id=pick("bos_token_id", default=1),
            eos_token_id=pick("eos_token_id", default=2),
            pad_token_id=pick("pad_token_id", default=3),
            name=name,
        )

    def to_hf_config(self) -> Dict[str, Any]:
        """The HF `config.json` dict for this architecture (Telechat2 remote-code field names)."""
        return {
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
        }


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


def get_config(name: str, **overrides) -> ModelConfig:
    """Look up a size by name (`tiny`, `telechat2_7b`, ...); `overrides` replace fields."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown model size {name!r}; known sizes: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name]
    return cfg.replace(**overrides) if overrides else cfg
