"""Run settings: what a YAML in configs/ holds (never architecture numbers), loaded strictly, and the one
validation pass that every run goes through before anything is built.

Precedence: dataclass defaults < YAML < `--section.key=value` command-line overrides. Unknown keys and
values of the wrong type raise `ConfigError` naming the key. YAML key names follow MindFormers where one
exists (`parallel_config.data_parallel`, `model_parallel`, `pipeline_stage`, `micro_batch_num`,
`use_seq_parallel`, `context_parallel`, `load_checkpoint`, `output_dir`, `seq_length`). Every key is
documented where it is defined (`key(default, doc)`; `describe_keys()` lists them all).

The batch arithmetic (one meaning everywhere: trainer, parallel step, cost model, YAML comments):
    train.batch_size   sequences in one micro-batch of one data-parallel replica
    micro_batch_num    micro-batches per replica per accumulation step (the 1F1B pipeline's micro-batches)
    grad_accum_steps   accumulation steps per optimizer step
    global batch       = data_parallel x micro_batch_num x grad_accum_steps x batch_size sequences per step
(`global_batch(settings)`). In one process micro_batch_num and grad_accum_steps both accumulate gradients.

`validate(settings, world, cfg)` checks, in one place: run mode, enumerated keys, device and dtype, the
degrees against the world size, what each run mode allows, the model against the layout (heads, kv heads,
vocabulary and ffn divisible by tp, layers vs stages), and the batch and sequence arithmetic.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from telechat2_ms.config import ConfigError, ModelConfig

RUN_MODES = ("train", "finetune", "predict", "chat", "eval", "serve")
TRAIN_RUN_MODES = ("train", "finetune")
# what each run mode can run in parallel: generation and eval need the whole model on every rank of a replica
PURPOSES = {"train": "train", "finetune": "train", "predict": "generate", "chat": "generate", "eval": "eval",
            "serve": "serve"}
# training runs every layout; generation dp x tp x pp (stages in turn, parallel/generation.py); eval dp x tp
LORA_TARGET_NAMES = ("wq", "wk_v", "wo", "w1", "w2", "w3")


def key(default: Any, doc: str, choices: Optional[tuple] = None):
    """A settings field with its documentation (and, for enumerations, the allowed values)."""
    metadata = {"doc": doc}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, doc: str):
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class GenerateSettings:
    """Sampling (predict, chat). Defaults are TeleChat2's generation_config.json (spec 8.1), except
    max_new_tokens."""

    max_new_tokens: int = key(512, "tokens to generate at most (generation_config.json says 4096; 512 is the "
                                   "README / MindFormers demo value)")
    do_sample: bool = key(False, "sample with temperature / top_k / top_p; false: greedy")
    temperature: float = key(0.3, "sampling temperature (do_sample only)")
    top_k: int = key(5, "keep the k most likely tokens when sampling; 0 disables")
    top_p: float = key(0.85, "nucleus sampling mass; 1.0 disables")
    repetition_penalty: float = key(1.03, "penalty on tokens already in the sequence; 1.0 disables")
    seed: int = key(0, "sampling seed")
    stream: bool = key(True, "print text as it is produced (predict, chat)")


@dataclass
class ServeSettings:
    """`--run_mode serve`: the OpenAI-compatible server (telechat2_ms/serving). Requests that leave sampling
    fields out get the `generate:` section's; the context is seq_length."""

    host: str = key("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = key(8000, "TCP port")
    max_batch: int = key(8, "requests decoded together (rows of the KV cache; memory grows with it x seq_length)")
    queue_size: int = key(64, "requests waiting for a row at most; beyond it the server answers 429")
    served_model_name: str = key("", "the model id clients send and /v1/models lists; empty: the model's name")
    prefill_bucket: int = key(32, "the prefill's lengths are this many tokens times 1, 2, 3, 4, 6, 8, ... up to "
                                  "256 (prompts admitted together are packed into one forward up to 256 tokens), "
                                  "then multiples of the largest (one compiled prefill per length)")
    prefill_tokens: int = key(512, "prompt tokens admitted between two decode steps at most (at least one request)")
    key_window: int = key(256, "a decode step of 16 rows or more reads each row's first W cache slots: W the "
                               "smallest of this, twice this, ... up to half of seq_length+1, or all of them, that "
                               "holds its longest row (one compiled step per W)")
    warm_up: bool = key(True, "compile every decode, head and prefill shape before serving (false: each on its "
                              "first use, which that request then waits for: a faster start for tests and trials)")
    log_level: str = key("warning", "uvicorn's log level", ("critical", "error", "warning", "info", "debug"))


@dataclass
class ParallelSettings:
    """Degrees of parallelism; their product must equal the number of msrun workers."""

    data_parallel: int = key(1, "data-parallel replicas (training: gradients summed; predict/eval: prompts split)")
    model_parallel: int = key(1, "tensor parallel degree: heads, kv heads, ffn and vocabulary split over ranks")
    pipeline_stage: int = key(1, "pipeline stages (training only), 1F1B schedule")
    micro_batch_num: int = key(1, "micro-batches per replica per accumulation step (training); with "
                                  "pipeline_stage > 1 at least pipeline_stage. Global batch: see the module doc")
    use_seq_parallel: bool = key(False, "shard norm / residual regions on the sequence over the tensor-parallel "
                                        "group (training; no effect with model_parallel 1)")
    context_parallel: int = key(1, "context parallel degree (training): RingAttention over a zig-zag split")
    pipeline_layer_counts: List[int] = key([], "decoder layers per pipeline stage; empty: an even split, the first "
                                               "stages taking one more")
    optimizer_shard: bool = key(False, "shard the AdamW states over the data- and context-parallel replicas (training)")
    expert_parallel: int = key(1, "mixture-of-experts models: split the experts over blocks of this many "
                                  "data-parallel ranks (divides data_parallel and num_experts)")


@dataclass
class TrainSettings:
    """Training / fine-tuning (train and finetune run modes)."""

    train_dataset: str = key("", "jsonl file(s), a directory of jsonl, a data-mix .json, a MindFormers .mindrecord "
                                 "(input_ids + labels rows, data/mindrecord.py), a preprocessed dataset directory, "
                                 "or demo / demo:N (N generated demo dialogs, data/demo_corpus.py)")
    data_format: str = key("sft", "sft: TeleChat2 dialogs with the official loss mask; pretrain: plain text packed",
                           ("sft", "pretrain"))
    batch_size: int = key(1, "sequences per micro-batch per data-parallel replica (global batch: module doc)")
    learning_rate: float = key(3e-5, "peak learning rate (after warmup)")
    min_learning_rate: float = key(3e-6, "learning rate at the end of the cosine decay")
    warmup_steps: int = key(0, "linear warmup steps from 0 to learning_rate")
    total_steps: int = key(100, "optimizer steps of the run (the cosine decay ends here)")
    weight_decay: float = key(0.1, "AdamW decoupled weight decay")
    beta1: float = key(0.9, "AdamW beta1")
    beta2: float = key(0.95, "AdamW beta2")
    eps: float = key(1e-8, "AdamW epsilon")
    grad_clip: float = key(1.0, "clip the global gradient norm to this value; 0 disables")
    grad_accum_steps: int = key(1, "accumulation steps per optimizer step (global batch: module doc)")
    save_steps: int = key(0, "save a checkpoint every N steps; 0: only at the end")
    keep_checkpoint_max: int = key(2, "keep the newest N checkpoints of this output directory; 0 keeps all")
    resume: bool = key(False, "continue from the newest checkpoint in output_dir")
    log_steps: int = key(1, "print a progress line every N steps (metrics.jsonl gets every step)")
    seed: int = key(1234, "seed of the data order and of the random initialisation")
    recompute: str = key("none", "recompute activations in backward: none, full (every layer) or selective "
                                 "(attention only); with pipeline_stage > 1 every stage reruns its whole forward in "
                                 "backward whatever this says; on CPU it saves memory only with jit false (the CPU "
                                 "graph runtime keeps many intermediates)", ("none", "full", "selective"))
    lora_rank: int = key(0, "LoRA rank; 0: full fine-tune")
    lora_alpha: float = key(16.0, "LoRA scaling alpha (scale = alpha / rank)")
    lora_targets: List[str] = key(list(LORA_TARGET_NAMES), "projections that get LoRA adapters")
    truncation: str = key("error", "an SFT sample longer than seq_length: error, truncate (keep the start) or drop",
                          ("error", "truncate", "drop"))
    resume_from: str = key("", "a checkpoints/step_XXXXXXXX directory to resume from; empty: the newest one when "
                               "resume is true")
    loss_scale: float = key(65536.0, "initial dynamic loss scale (float16 compute only)")
    loss_scale_window: int = key(1000, "finite steps before the loss scale doubles (float16 compute only)")


@dataclass
class EvalSettings:
    """C-Eval / MMLU evaluation (eval run mode)."""

    benchmark: str = key("ceval", "ceval or mmlu", ("ceval", "mmlu"))
    data_dir: str = key("", "folder with dev/ val/ test/ csv files (or its parent holding ceval/ and mmlu/)")
    split: str = key("val", "dev, val or test (MMLU reports test; C-Eval test writes submission.json)",
                     ("dev", "val", "test"))
    protocol: str = key("official", "official (the benchmarks' own prompts) or lm_eval (lm-evaluation-harness)",
                        ("official", "lm_eval"))
    num_fewshot: int = key(5, "exemplars from dev, 0..5")
    subjects: List[str] = key([], "subjects to score; empty: all")
    batch_size: int = key(4, "sequences per forward call")
    max_length: int = key(4096, "tokens per sequence; longer prompts drop exemplars one at a time")
    add_bos: bool = key(False, "prepend <_start> to every prompt (TeleChat2's tokenizer adds none)")
    limit: int = key(0, "score only the first N questions of each subject (0: all); for smoke tests")


@dataclass
class RunSettings:
    """One run of run_telechat2.py."""

    model: str = key("tiny", "a size in telechat2_ms.config.CONFIGS (a checkpoint's stored config decides when "
                             "it has one)")
    run_mode: str = key("predict", "what to run", RUN_MODES)
    load_checkpoint: str = key("", "a checkpoint file, a directory holding one, a training output directory (its "
                                   "newest checkpoint) or a per-rank layout directory; empty: random init")
    tokenizer: str = key("", "tokenizer.model path or directory; empty: the checkpoint directory's, else the "
                             "built-in demo tokenizer")
    output_dir: str = key("./output", "where runs write checkpoints, metrics, eval results; one run owns it "
                                      "(run.json, a lock while it runs)")
    overwrite: bool = key(False, "let a new run remove what an earlier run left in output_dir (its checkpoints, "
                                 "metrics, eval results) instead of refusing")
    seq_length: int = key(8192, "context length (prompt + generated tokens) / training sequence length")
    compute_dtype: str = key("float32", "matmul dtype; bfloat16 needs Ascend", ("float32", "float16", "bfloat16"))
    device_target: str = key("CPU", "device", ("CPU", "Ascend", "GPU"))
    use_fused_kernels: bool = key(False, "Ascend fused attention / norm / rope kernels")
    jit: bool = key(True, "compile the hot paths (decode step, train step; under msrun each pipeline stage's "
                          "forward and backward; with context_parallel on Ascend op by op: HCCL sends)")
    moe_capacity_factor: float = key(0.0, "mixture-of-experts models: 0 dropless (every token reaches its k "
                                          "experts); c > 0: each expert takes at most ceil(c x k x tokens / "
                                          "experts) of the tokens it sees, in token order, the rest dropped "
                                          "(MindFormers' capacity_factor)")
    predict_data: List[str] = key([], "prompts for predict (empty: two demo prompts)")
    prompt_format: str = key("chat", "chat: TeleChat2 chat template with system prompt; raw: text as-is",
                             ("chat", "raw"))
    system_prompt: Optional[str] = key(None, "chat system prompt; null: the chat template's default (TeleChat2's, or ChatML's)")
    generate: GenerateSettings = section(GenerateSettings, "sampling (predict, chat)")
    parallel_config: ParallelSettings = section(ParallelSettings, "parallel layout (msrun)")
    train: TrainSettings = section(TrainSettings, "training (train, finetune)")
    eval: EvalSettings = section(EvalSettings, "evaluation (eval)")
    serve: ServeSettings = section(ServeSettings, "the OpenAI-compatible server (serve)")


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


def settings_keys(obj: Any = None, prefix: str = "") -> Dict[str, dataclasses.Field]:
    """Every leaf settings key (dotted) -> its dataclass field (with .type resolved to the annotation)."""
    obj = RunSettings() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    out: Dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(settings_keys(value, f"{prefix}{f.name}."))
        else:
            f.type = hints[f.name]
            out[prefix + f.name] = f
    return out


def _is_text(annotation: Any) -> bool:
    return annotation is str or (typing.get_origin(annotation) is typing.Union and str in typing.get_args(annotation))


def parse_override(text: str) -> Dict[str, Any]:
    """`--a.b=v` or `a.b=v` -> {'a': {'b': v}}: v taken as-is for a text key (a path may hold spaces or
    colons; `null` clears an optional one), else parsed as YAML (so 2 is int, true is bool, [a, b] a list)."""
    text = text[2:] if text.startswith("--") else text
    if "=" not in text:
        known = settings_keys().get(text)
        if known is not None and known.type is bool:
            return override(text, True)  # a bare boolean key means true, as on the command line
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    dotted, raw = text.split("=", 1)
    return override(dotted, raw)


def override(dotted: str, raw: Any) -> Dict[str, Any]:
    """{'a': {'b': value}} for key `a.b` given on the command line as `raw` (parse_override)."""
    known = settings_keys().get(dotted)
    if not isinstance(raw, str):
        value = raw
    elif known is not None and _is_text(known.type):
        value = None if raw == "null" and known.type is not str else raw
    else:
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # not YAML: the key's own check says what it expected
    out: Dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_settings(yaml_path: Optional[str] = None, overrides: Optional[List[Any]] = None) -> RunSettings:
    """Defaults < YAML file < overrides (`--key=value` texts, dotted keys for sections, or {dotted: value}
    mappings). ConfigError naming the file or key for anything wrong."""
    settings = RunSettings()
    if yaml_path:
        if os.path.isdir(yaml_path):
            raise ConfigError(f"--config {yaml_path} is a directory; give a YAML file (e.g. "
                              "configs/telechat2_7b/finetune.yaml)")
        try:
            with open(yaml_path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {yaml_path}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{yaml_path} is not UTF-8 text (byte {err.start}); give a YAML file") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{yaml_path}: YAML syntax error{at}: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{yaml_path}: top level must be a mapping")
        try:
            _apply(settings, data)
        except ConfigError as e:
            raise ConfigError(f"{yaml_path}: {e}") from None
    for item in overrides or []:
        if isinstance(item, str):
            _apply(settings, parse_override(item))
        else:
            for dotted, raw in item.items():
                _apply(settings, override(dotted, raw))
    return settings


def settings_to_dict(settings: RunSettings) -> Dict[str, Any]:
    return dataclasses.asdict(settings)


def describe_keys(obj: Any = None, prefix: str = "") -> Dict[str, str]:
    """Every settings key (dotted) -> its documentation (with the allowed values for enumerations)."""
    obj = RunSettings() if obj is None else obj
    out: Dict[str, str] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(describe_keys(value, f"{prefix}{f.name}."))
            continue
        doc = f.metadata.get("doc", "")
        if "choices" in f.metadata:
            doc += f" [{' | '.join(f.metadata['choices'])}]"
        out[prefix + f.name] = doc
    return out


# ---- the one validation pass ------------------------------------------------------------------------

def global_batch(settings: RunSettings) -> int:
    """Sequences per optimizer step: data_parallel x micro_batch_num x grad_accum_steps x batch_size."""
    p, t = settings.parallel_config, settings.train
    return p.data_parallel * p.micro_batch_num * t.grad_accum_steps * t.batch_size


def degrees(settings: RunSettings) -> int:
    """The number of processes parallel_config asks for."""
    p = settings.parallel_config
    return p.data_parallel * p.model_parallel * p.pipeline_stage * p.context_parallel


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")


def _check_device(settings: RunSettings) -> None:
    if settings.device_target == "CPU":
        if settings.compute_dtype == "bfloat16":
            raise ConfigError("compute_dtype bfloat16 has no CPU kernels in MindSpore 2.10; use float32 or float16 "
                              "on CPU (or device_target: Ascend)")
        if settings.use_fused_kernels:
            raise ConfigError("use_fused_kernels needs Ascend (the fused attention/norm/rope kernels have no CPU "
                              "version); set use_fused_kernels: false on CPU")


def check_enumerations(settings: RunSettings) -> None:
    """Enumerated keys (run mode, device, dtype, ...) and the device / dtype / kernel combination."""
    _check_choices(settings)
    _check_device(settings)


def _check_serve(settings: RunSettings) -> None:
    s = settings.serve
    for name in ("max_batch", "queue_size", "prefill_bucket", "prefill_tokens", "key_window"):
        if getattr(s, name) < 1:
            raise ConfigError(f"serve.{name} must be at least 1, got {getattr(s, name)}")
    if not 0 < s.port < 65536:
        raise ConfigError(f"serve.port must be in 1..65535, got {s.port}")


def _check_train(settings: RunSettings, world: int) -> None:
    t = settings.train
    for name in ("batch_size", "total_steps", "grad_accum_steps", "log_steps"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(t, name)}")
    for name in ("save_steps", "warmup_steps", "keep_checkpoint_max", "lora_rank"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if settings.seq_length < 2:
        raise ConfigError(f"seq_length must be at least 2 for training, got {settings.seq_length}")
    _check_optimizer(t)
    bad = sorted(set(t.lora_targets) - set(LORA_TARGET_NAMES))
    if t.lora_rank and bad:
        raise ConfigError(f"train.lora_targets: unknown {bad}; choose from {list(LORA_TARGET_NAMES)}")


def _check_optimizer(t) -> None:
    """AdamW's and the schedule's numbers, as torch.optim.AdamW checks them, and a decay that does not rise."""
    for name in ("learning_rate", "min_learning_rate", "weight_decay", "eps"):
        if not getattr(t, name) >= 0:  # NaN too
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    if t.min_learning_rate > t.learning_rate:
        raise ConfigError(f"train.min_learning_rate {t.min_learning_rate} is above train.learning_rate "
                          f"{t.learning_rate}: the cosine decay would raise the rate; set it at most learning_rate")


def validate(settings: RunSettings, world: int, cfg: ModelConfig, purpose: Optional[str] = None):
    """The one check of a run, before anything is built. -> the run's ParallelDims (for generation and eval
    only data x tensor parallel: sequence parallel, micro-batches and optimizer sharding are training's).
    `purpose` (train | generate | eval) defaults to the run mode's. Raises ConfigError naming the setting."""
    from telechat2_ms.parallel.dims import ParallelDims

    check_enumerations(settings)
    p = settings.parallel_config
    asked = degrees(settings)
    if world == 1 and asked > 1:
        raise ConfigError(f"parallel_config asks for {asked} processes (data_parallel {p.data_parallel} x "
                          f"model_parallel {p.model_parallel} x pipeline_stage {p.pipeline_stage} x "
                          f"context_parallel {p.context_parallel}) but this is a single process; launch with "
                          f"`msrun --worker_num={asked} --local_worker_num={asked} run_telechat2.py ...` "
                          f"(or --dry_run --world_size={asked})")
    if p.expert_parallel > 1 and not cfg.num_experts:
        raise ConfigError(f"parallel_config.expert_parallel is {p.expert_parallel} but {cfg.name} has no experts")
    purpose = purpose or PURPOSES[settings.run_mode]
    if cfg.num_experts and asked > 1 and purpose != "train" and p.data_parallel > 1:
        raise ConfigError(f"parallel_config.data_parallel: {cfg.name} is a mixture-of-experts model, which predict, "
                          f"chat, eval and serve run under tensor parallel only (data-parallel replicas answer "
                          f"different prompts, and experts split over them would have to step together); set "
                          f"data_parallel (and expert_parallel) to 1 (got {p.data_parallel})")
    if cfg.num_experts and asked > 1 and settings.train.lora_rank and purpose == "train":
        raise ConfigError(f"train.lora_rank: LoRA on a mixture-of-experts model under msrun is not built; train it "
                          f"in one process or set train.lora_rank to 0")
    if purpose not in ("train", "generate", "eval", "serve"):
        raise ValueError(f"unknown purpose {purpose!r}")
    if purpose == "serve":
        _check_serve(settings)
    if purpose == "eval" and (p.pipeline_stage > 1 or p.context_parallel > 1):
        raise ConfigError(f"eval runs data_parallel x model_parallel; set parallel_config.pipeline_stage and "
                          f"context_parallel to 1 (got {p.pipeline_stage} and {p.context_parallel})")
    if purpose == "generate" and p.context_parallel > 1:
        raise ConfigError(f"predict / chat run data_parallel x model_parallel x pipeline_stage; set "
                          f"parallel_config.context_parallel to 1 (got {p.context_parallel})")
    if purpose == "serve" and (p.data_parallel > 1 or p.pipeline_stage > 1 or p.context_parallel > 1):
        raise ConfigError(f"serve runs tensor parallel only (rank 0 serves HTTP, every rank steps the batch); set "
                          f"parallel_config.data_parallel, pipeline_stage and context_parallel to 1 (got "
                          f"{p.data_parallel}, {p.pipeline_stage} and {p.context_parallel}); for more throughput "
                          "start one server per group of cards")
    if purpose != "train":  # micro-batches, sequence parallel and optimizer sharding are training's
        p = dataclasses.replace(p, micro_batch_num=max(p.pipeline_stage, 1), use_seq_parallel=False,
                                optimizer_shard=False)
    if cfg.sliding_layers and p.context_parallel > 1:
        raise ConfigError(f"model {cfg.name} has sliding-window layers, which ring attention does not implement; "
                          "set parallel_config.context_parallel to 1")
    dims = ParallelDims.from_settings(p, world)  # positive degrees, product = world, sp vs cp, micro vs stages
    dims.check_model(cfg)  # heads, kv heads, vocabulary, ffn divisible by tp; layers vs stages
    if settings.seq_length < 1:
        raise ConfigError(f"seq_length must be positive, got {settings.seq_length}")
    if purpose == "train":
        _check_train(settings, world)
        dims.check_batch(p.data_parallel * p.micro_batch_num * settings.train.batch_size, settings.seq_length)
        t = settings.train
        if t.lora_rank and "wk_v" in t.lora_targets and cfg.num_kv_heads < p.model_parallel:
            raise ConfigError(f"train.lora_targets: LoRA on wk_v with kv heads copied over tensor-parallel ranks "
                              f"(num_kv_heads {cfg.num_kv_heads} < model_parallel {p.model_parallel}) is not "
                              "supported; leave wk_v out of train.lora_targets")
    return dims
