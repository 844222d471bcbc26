"""The one settings validation and `--dry_run`: every shipped YAML passes its run mode's checks at the world
size its layout needs; bad layouts are refused before any model or data work, naming the setting; every key
is documented; the batch arithmetic has one meaning (settings.global_batch, the cost model, the YAML
comments)."""
import re

import pytest

import run_telechat2
from telechat2_ms import cost_model as cm
from telechat2_ms.config import get_config
from telechat2_ms.settings import degrees, describe_keys, global_batch, load_settings

from tests.conftest import REPO_ROOT

YAMLS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
ATLAS_FINETUNE = [p for p in YAMLS if p.stem == "finetune" and p.parent.name != "tiny"]


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Any model build or data preparation fails the test: validation must come first."""
    import telechat2_ms.build as build
    import telechat2_ms.data.dataset as dataset

    def refuse(*args, **kwargs):
        raise AssertionError("a model or the data was built before the settings were validated")

    monkeypatch.setattr(build, "build_model", refuse)
    monkeypatch.setattr(dataset, "prepare_dataset", refuse)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_passes_validation_and_its_dry_run(path, capsys, nothing_is_built):
    settings = load_settings(str(path))
    world = degrees(settings)
    assert run_telechat2.main(["--config", str(path), "--dry_run", f"--world_size={world}"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"dry run: {settings.run_mode} of {settings.model}" in out and f"world {world}:" in out
    assert "per-rank parameter shapes" in out and "cost model" in out
    assert out.rstrip().endswith("dry run: settings valid; nothing was built or loaded")


@pytest.mark.parametrize("path", ATLAS_FINETUNE, ids=lambda p: p.parent.name)
def test_atlas_finetune_yamls_keep_their_stated_global_batch_and_memory(path, capsys):
    text = path.read_text(encoding="utf-8")
    found = re.search(r"Global batch: .* = (\d+) sequences of (\d+) tokens", text)
    stated, seq = int(found.group(1)), int(found.group(2))
    settings = load_settings(str(path))
    assert global_batch(settings) == stated
    lay = cm.layout_from_settings(settings)  # the cost model reads the same batch arithmetic
    assert lay.dp * lay.micro_batches * lay.micro_batch_size * lay.grad_accum == stated
    assert run_telechat2.main(["--config", str(path), "--dry_run", f"--world_size={degrees(settings)}"]) == 0
    out = capsys.readouterr().out
    memory = float(re.search(r"\(telechat2_ms/cost_model\.py[^)]*\): (\d+\.\d) GiB", text).group(1))
    assert f"memory {memory:.1f} GiB of 58 GiB usable (fits)" in out
    assert settings.seq_length == seq and f"= {stated} sequences of {seq} tokens per step" in out


BAD_LAYOUTS = [
    # (overrides, world, the message naming the setting)
    (["--parallel_config.model_parallel=2"], 4, r"= 2, but the world has 4 processes"),
    (["--parallel_config.data_parallel=2"], 1, r"parallel_config asks for 2 processes \(data_parallel 2"),
    (["--parallel_config.model_parallel=3"], 3, r"num_heads 4 of model tiny is not divisible by tp=3"),
    (["--model=qwen2_7b", "--parallel_config.model_parallel=7"], 7,
     r"num_kv_heads 4 of model qwen2_7b is not divisible by tp=7, nor tp by it"),
    (["--parallel_config.pipeline_stage=3", "--parallel_config.micro_batch_num=3"], 3,
     r"2 layers cannot fill 3 pipeline stages"),
    (["--parallel_config.pipeline_stage=2", "--parallel_config.micro_batch_num=2",
      "--parallel_config.pipeline_layer_counts=[1,2]"], 2, r"pipeline_layer_counts \[1, 2\] sum to 3"),
    (["--parallel_config.pipeline_stage=2"], 2, r"micro_batch_num \(1\) must be >= pipeline_stage \(2\)"),
    (["--parallel_config.context_parallel=2", "--seq_length=66"], 2,
     r"seq_length 66 must be divisible by 2 x context_parallel \(4\)"),
    (["--parallel_config.model_parallel=2", "--parallel_config.use_seq_parallel=true", "--seq_length=65"], 2,
     r"seq_length 65 must be divisible by model_parallel 2 with use_seq_parallel"),
    (["--train.batch_size=0"], 1, r"train.batch_size must be at least 1"),
    (["--train.learning_rate=1e-4", "--train.min_learning_rate=5e-4"], 1,
     r"train.min_learning_rate 0.0005 is above train.learning_rate 0.0001"),
    (["--train.beta2=1"], 1, r"train.beta2 must be in \[0, 1\), got 1.0"),
    (["--train.eps=nan"], 1, r"train.eps must be >= 0, got nan"),
    (["--parallel_config.model_parallel=4", "--train.lora_rank=4"], 4,
     r"train.lora_targets: LoRA on wk_v with kv heads copied over tensor-parallel ranks"),
    (["--run_mode=serve", "--parallel_config.data_parallel=2"], 2, r"serve runs tensor parallel only"),
    (["--run_mode=serve", "--parallel_config.pipeline_stage=2"], 2, r"serve runs tensor parallel only"),
    (["--run_mode=serve", "--serve.max_batch=0"], 1, r"serve.max_batch must be at least 1"),
    (["--run_mode=serve", "--serve.port=70000"], 1, r"serve.port must be in 1..65535"),
    # mixture of experts: expert parallelism lives inside data parallel; what is not built is refused by name
    (["--parallel_config.data_parallel=2", "--parallel_config.expert_parallel=2"], 2,
     r"parallel_config.expert_parallel is 2 but tiny has no experts"),
    (["--model=telechat2_moe_tiny", "--parallel_config.data_parallel=2", "--parallel_config.expert_parallel=3"], 2,
     r"expert_parallel \(3\) must divide data_parallel \(2\)"),
    (["--model=telechat2_moe_tiny", "--parallel_config.data_parallel=3", "--parallel_config.expert_parallel=3"], 3,
     r"parallel_config.expert_parallel \(3\) must divide num_experts \(4\)"),
    (["--model=qwen2_moe_tiny", "--parallel_config.pipeline_stage=2", "--parallel_config.micro_batch_num=2"], 2,
     r"pipeline_stage 2: qwen2_moe_tiny's load-balancing loss is taken over every layer at once"),
    (["--model=telechat2_moe_tiny", "--parallel_config.context_parallel=2"], 2,
     r"context_parallel 2 with experts is not built yet"),
    (["--model=telechat2_moe_tiny", "--parallel_config.data_parallel=2", "--parallel_config.expert_parallel=2",
      "--parallel_config.optimizer_shard=true"], 2, r"optimizer_shard with expert_parallel > 1 is not built"),
    (["--model=telechat2_moe_tiny", "--parallel_config.data_parallel=2", "--train.lora_rank=4"], 2,
     r"train.lora_rank: LoRA on a mixture-of-experts model under msrun is not built"),
    (["--run_mode=predict", "--model=telechat2_moe_tiny", "--parallel_config.data_parallel=2"], 2,
     r"predict, chat, eval and serve run under tensor parallel only"),
]


@pytest.mark.parametrize("overrides, world, message", BAD_LAYOUTS, ids=[m for _, _, m in BAD_LAYOUTS])
def test_bad_layout_is_refused_before_anything_is_built(overrides, world, message, capsys, nothing_is_built):
    args = ["--run_mode=finetune", "--train.train_dataset=/nonexistent/data.jsonl", "--seq_length=64"]
    args += overrides + (["--dry_run", f"--world_size={world}"] if world > 1 else [])
    assert run_telechat2.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_what_generation_and_eval_run(capsys):
    """predict / chat: data x tensor x pipeline parallel; eval: data x tensor parallel."""
    assert run_telechat2.main(["--run_mode=eval", "--parallel_config.pipeline_stage=2", "--dry_run",
                               "--world_size=2"]) == 2
    assert "set parallel_config.pipeline_stage and context_parallel to 1" in capsys.readouterr().err
    assert run_telechat2.main(["--run_mode=predict", "--parallel_config.context_parallel=2", "--dry_run",
                               "--world_size=2"]) == 2
    assert "set parallel_config.context_parallel to 1" in capsys.readouterr().err
    assert run_telechat2.main(["--run_mode=predict", "--parallel_config.pipeline_stage=2", "--dry_run",
                               "--world_size=2"]) == 0
    assert "stage 1: layers 1..1 (1), ranks 1..1" in capsys.readouterr().out


def test_world_size_is_only_for_a_dry_run(capsys):
    assert run_telechat2.main(["--world_size=2"]) == 2
    assert "--world_size is for --dry_run" in capsys.readouterr().err


def test_every_settings_key_is_documented():
    keys = describe_keys()
    assert len(keys) > 60 and "train.batch_size" in keys and "parallel_config.micro_batch_num" in keys
    undocumented = [k for k, doc in keys.items() if len(doc.strip()) < 8]
    assert not undocumented
    assert "[float32 | float16 | bfloat16]" in keys["compute_dtype"]


def test_one_meaning_of_the_global_batch():
    settings = load_settings(None, ["--parallel_config.data_parallel=2", "--parallel_config.micro_batch_num=4",
                                    "--parallel_config.pipeline_stage=2", "--train.grad_accum_steps=3",
                                    "--train.batch_size=5"])
    assert global_batch(settings) == 2 * 4 * 3 * 5
    lay = cm.layout_from_settings(load_settings(None, ["--run_mode=finetune", "--compute_dtype=bfloat16",
                                                       "--parallel_config.data_parallel=2",
                                                       "--parallel_config.micro_batch_num=4",
                                                       "--train.batch_size=5"]))
    assert (lay.dp, lay.micro_batches, lay.micro_batch_size) == (2, 4, 5)
    cfg = get_config("tiny")
    assert cm.step_time(cfg, lay).tokens_per_step == 2 * 4 * 5 * lay.seq_length


def test_tied_embeddings_across_pipeline_stages_pass_and_count_the_copy(capsys, nothing_is_built):
    """Qwen2-0.5B (tied) at pp2: the dry run passes, and the last stage's parameter count holds the copy of the
    embedding in lm_head, as the cost model counts it."""
    args = ["--run_mode=finetune", "--model=qwen2_0_5b", "--parallel_config.pipeline_stage=2",
            "--parallel_config.micro_batch_num=2", "--train.train_dataset=demo:8", "--dry_run", "--world_size=2"]
    assert run_telechat2.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    counted = [int(n.replace(",", "")) for n in re.findall(r"stage \d: .*?, ([\d,]+) parameters per rank", out)]
    cfg = get_config("qwen2_0_5b")
    assert counted == cm.stage_params_per_device(cfg, cm.Layout(pp=2, micro_batches=2))
    assert counted[1] - counted[0] == cfg.hidden_size  # 12 layers each, the embedding or its copy, the final norm
