"""Run settings: what a YAML in configs/ holds (never architecture numbers), loaded strictly.

Precedence: dataclass defaults < YAML < `--section.key=value` command-line overrides. Unknown keys and
values of the wrong type raise `ConfigError` naming the key. YAML key names follow MindFormers where one
exists (`parallel_config.data_parallel`, `model_parallel`, `pipeline_stage`, `micro_batch_num`,
`use_seq_parallel`, `context_parallel`, `load_checkpoint`, `output_dir`, `seq_length`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from telechat2_ms.config import ConfigError, ModelConfig, get_config


@dataclass
class GenerateSettings:
    """Sampling; defaults are the real TeleChat2 generation_config.json (spec 8.1)."""

    max_new_tokens: int = 512  # the config.json says 4096; 512 is the README/MindFormers demo value
    do_sample: bool = False  # greedy unless true
    temperature: float = 0.3
    top_k: int = 5  # 0 disables
    top_p: float = 0.85  # 1.0 disables
    repetition_penalty: float = 1.03  # 1.0 disables
    seed: int = 0
    stream: bool = True  # print text as it is produced (predict/chat)


@dataclass
class ParallelSettings:
    """Degrees of parallelism; their product must equal the number of msrun workers."""

    data_parallel: int = 1
    model_parallel: int = 1  # tensor parallel
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    use_seq_parallel: bool = False
    context_parallel: int = 1  # RingAttention
    pipeline_layer_counts: List[int] = field(default_factory=list)  # layers per stage; empty = even split
    optimizer_shard: bool = False  # shard AdamW states across data-parallel ranks


@dataclass
class TrainSettings:
    """Training / fine-tuning (train and finetune run modes)."""

    train_dataset: str = ""  # jsonl file(s), a directory of jsonl, a data-mix .json, a preprocessed dataset
    # directory, or "demo" / "demo:N" (N generated demo dialogs, telechat2_ms/demo_corpus.py)
    data_format: str = "sft"  # sft | pretrain
    batch_size: int = 1
    learning_rate: float = 3e-5
    min_learning_rate: float = 3e-6
    warmup_steps: int = 0
    total_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    save_steps: int = 0  # 0: only at the end
    keep_checkpoint_max: int = 2
    resume: bool = False
    log_steps: int = 1
    seed: int = 1234
    recompute: str = "none"  # none | full | selective
    lora_rank: int = 0  # 0: full fine-tune
    lora_alpha: float = 16.0
    lora_targets: List[str] = field(default_factory=lambda: ["wq", "wk_v", "wo", "w1", "w2", "w3"])
    truncation: str = "error"  # SFT sample longer than seq_length: error | truncate (keep the start) | drop
    resume_from: str = ""  # a checkpoints/step_XXXXXXXX directory; empty: the newest one when resume is true
    loss_scale: float = 65536.0  # initial dynamic loss scale (float16 compute only)
    loss_scale_window: int = 1000  # finite steps before the loss scale doubles


@dataclass
class EvalSettings:
    """C-Eval / MMLU evaluation (eval run mode)."""

    benchmark: str = "ceval"  # ceval | mmlu
    data_dir: str = ""
    split: str = "val"
    protocol: str = "official"  # official | lm_eval
    num_fewshot: int = 5
    subjects: List[str] = field(default_factory=list)  # empty = all
    batch_size: int = 4
    max_length: int = 4096
    add_bos: bool = False  # prepend <_start> to every prompt (TeleChat2's tokenizer adds none)
    limit: int = 0  # score only the first N questions of each subject (0 = all); for smoke tests


@dataclass
class RunSettings:
    """One run of run_telechat2.py."""

    model: str = "tiny"  # a size in telechat2_ms.config.CONFIGS (ignored when load_checkpoint has a config.json)
    run_mode: str = "predict"
    load_checkpoint: str = ""  # MindSpore checkpoint file or directory; empty: random init (tiny demo)
    tokenizer: str = ""  # tokenizer.model path or directory; empty: the built-in demo tokenizer
    output_dir: str = "./output"
    seq_length: int = 8192  # context length (prompt + generated tokens) / training sequence length
    compute_dtype: str = "float32"  # float32 | float16 | bfloat16 (bf16 needs Ascend)
    device_target: str = "CPU"  # CPU | Ascend | GPU
    use_fused_kernels: bool = False  # Ascend fused attention / norm / rope
    jit: bool = True  # compile the hot paths (decode step, train step)
    predict_data: List[str] = field(default_factory=list)  # prompts for predict (empty: two demo prompts)
    prompt_format: str = "chat"  # chat: TeleChat2 chat template with system prompt; raw: text as-is
    system_prompt: Optional[str] = None  # chat: None uses the TeleChat2 default system prompt
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    parallel_config: ParallelSettings = field(default_factory=ParallelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def model_config(self) -> ModelConfig:
        return get_config(self.model)


# ---- strict loading ---------------------------------------------------------------------------------

def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one leaf value against its dataclass annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner, key)
    if origin in (list, List):
        (inner,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            converted = annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return converted
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _apply(obj: Any, updates: Dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of settings, got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> Dict[str, Any]:
    """`--a.b=v` or `a.b=v` -> {'a': {'b': v}} with v parsed as YAML (so 2 is int, true is bool)."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: Dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_settings(yaml_path: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunSettings:
    """Defaults < YAML file < overrides (`--key=value`, dotted keys for sections)."""
    settings = RunSettings()
    if yaml_path:
        try:
            with open(yaml_path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {yaml_path}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: top level must be a mapping")
        try:
            _apply(settings, data)
        except ConfigError as e:
            raise ConfigError(f"{yaml_path}: {e}") from None
    for text in overrides or []:
        _apply(settings, parse_override(text))
    return settings


def settings_to_dict(settings: RunSettings) -> Dict[str, Any]:
    return dataclasses.asdict(settings)
