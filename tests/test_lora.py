"""LoRA: adapters start as a no-op, merged logits equal unmerged logits, only adapters train, the merged
checkpoint loads into a plain model, and a LoRA run resumes from its adapters."""
import numpy as np
import pytest

from mindspore import Tensor

from telechat2_ms import checkpoint as ckpt
from telechat2_ms.config import get_config
from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.settings import load_settings
from telechat2_ms.train import Trainer
from telechat2_ms.train.lora import LoRALinear, apply_lora, lora_state, merge_lora, merged_state

TINY = get_config("tiny")
TARGETS = ["wq", "wk_v", "wo", "w1", "w3", "w2"]
IDS = Tensor(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12)).astype(np.int32))


def test_wrapping_keeps_names_and_starts_as_the_base_model():
    model = Telechat2ForCausalLM(TINY, seed=1)
    base_logits = model(IDS).asnumpy()
    base_names = [n for n, _ in model.parameters_and_names()]
    names = apply_lora(model, rank=4, alpha=8.0, targets=TARGETS)
    assert len(names) == 2 * 6 * TINY.num_layers
    assert "model.layers.1.feed_forward.w2.lora_b" in names
    assert isinstance(model.model.layers[0].attention.wk_v, LoRALinear)
    assert [n for n, _ in model.parameters_and_names() if n in base_names] == base_names  # same names, same order
    assert sorted(n for n, p in model.parameters_and_names() if p.requires_grad) == sorted(names)
    np.testing.assert_array_equal(model(IDS).asnumpy(), base_logits)  # B = 0: exactly the base model
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(Telechat2ForCausalLM(TINY), 4, 8.0, ["lm_head"])


def test_merged_logits_equal_lora_logits_and_names_are_plain_again():
    model = Telechat2ForCausalLM(TINY, seed=2)
    apply_lora(model, rank=4, alpha=8.0, targets=TARGETS, seed=3)
    rng = np.random.default_rng(4)
    for name, param in lora_state(model).items():  # give every adapter a non-zero update
        if name.endswith("lora_b"):
            param.set_data(Tensor(rng.normal(0, 0.05, param.shape).astype(np.float32)))
    lora_logits = model(IDS).asnumpy()
    state = merged_state(model)
    assert merge_lora(model) == 6 * TINY.num_layers
    merged_logits = model(IDS).asnumpy()
    assert np.abs(lora_logits - Telechat2ForCausalLM(TINY, seed=2)(IDS).asnumpy()).max() > 1e-2  # adapters matter
    np.testing.assert_allclose(merged_logits, lora_logits, rtol=1e-5, atol=2e-6)
    plain = dict(Telechat2ForCausalLM(TINY).parameters_and_names())
    assert [n for n, _ in model.parameters_and_names()] == list(plain)
    for name, param in model.parameters_and_names():  # merged_state (used for checkpoints) == merge_lora
        np.testing.assert_array_equal(np.asarray(state[name].asnumpy()), param.asnumpy(), err_msg=name)


def test_lora_training_changes_only_adapters_and_resumes():
    base = Telechat2ForCausalLM(TINY, seed=11)
    ckpt.save_model(base, "base", config=TINY)  # fine-tune from a checkpoint, not from the seed
    args = ["--load_checkpoint=base", "--seq_length=48", "--train.train_dataset=demo:120", "--train.truncation=drop", "--train.batch_size=2",
            "--train.learning_rate=1e-2", "--train.warmup_steps=0", "--train.lora_rank=4", "--train.lora_alpha=8",
            "--train.total_steps=4", "--train.save_steps=2", "--output_dir=lora"]
    trainer = Trainer(load_settings(None, args), printer=lambda line: None)
    before = {n: p.asnumpy().copy() for n, p in trainer.model.parameters_and_names()}
    np.testing.assert_array_equal(before["lm_head.weight"], base.lm_head.weight.asnumpy())
    summary = trainer.train()
    changed = {n for n, p in trainer.model.parameters_and_names() if (p.asnumpy() != before[n]).any()}
    assert changed and all(n.endswith((".lora_a", ".lora_b")) for n in changed)
    assert {n for n in changed if n.endswith(".lora_b")} == {n for n in before if n.endswith(".lora_b")}
    # the checkpoint's model.safetensors is the merged model: a plain model loads it and matches the LoRA logits
    plain = Telechat2ForCausalLM(TINY)
    ckpt.load_checkpoint_into(plain, summary["checkpoint"])
    np.testing.assert_allclose(plain(IDS).asnumpy(), trainer.model(IDS).asnumpy(), rtol=1e-5, atol=2e-6)
    # resume from step 2: base from the seed, adapters and AdamW moments from the checkpoint
    resumed = Trainer(load_settings(None, args + ["--train.resume_from=lora/checkpoints/step_00000002",
                                                  "--output_dir=lora_resumed"]), printer=lambda line: None)
    assert resumed.train()["losses"] == summary["losses"][2:]
    for (name, a), (_, b) in zip(trainer.model.parameters_and_names(), resumed.model.parameters_and_names()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=name)
