"""Qwen2 on the one model code against transformers' own Qwen2ForCausalLM (fp32, CPU), with every switch
of the family on: q/k/v biases, separate k/v, GQA, tied embeddings, plain RoPE at base 1e6 in fp32, and the
last layer attending within a 6-token window at sequences of 12 to 44 tokens (so the window is active).

Tolerances: logits max abs difference <= 1e-4 on a left-padded batch (real positions); 32 greedy tokens
identical to HF `generate`; prefill + cached decode equal one full forward (<= 1e-5)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from telechat2_ms.config import get_config  # noqa: E402
from telechat2_ms.generate import GenerationConfig, Generator  # noqa: E402
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids  # noqa: E402
from tests.torch_reference import ms_state_numpy, qwen2_reference, randomize_biases_and_norms  # noqa: E402

ATOL = 1e-4
CFG = get_config("qwen2_tiny", initializer_range=0.25)


@pytest.fixture(scope="module")
def pair():
    model = Telechat2ForCausalLM(CFG, seed=0)
    randomize_biases_and_norms(model, 1)
    names = {p.name for p in model.get_parameters()}
    assert "lm_head.weight" not in names and "model.layers.0.attention.wk.bias" in names  # tied; Qwen2 names
    assert "model.layers.0.attention.wo.bias" not in names and "model.layers.0.feed_forward.w2.bias" not in names
    return model, qwen2_reference(CFG, ms_state_numpy(model))


def test_logits_match_hf_qwen2_on_padded_batch_with_sliding_window(pair):
    model, ref = pair
    rng = np.random.default_rng(0)
    ids = rng.integers(13, CFG.vocab_size, (3, 12))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = CFG.pad_token_id
    ours = model(to_tensor_ids(ids), to_tensor_ids(mask)).asnumpy()
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(ours - theirs)[mask > 0].max() <= ATOL
    # the window matters at this length: without it the last layer's output differs
    unwindowed = Telechat2ForCausalLM(CFG.replace(sliding_window=0, sliding_layers=()), seed=0)
    for p, q in zip(unwindowed.get_parameters(), model.get_parameters()):
        p.set_data(q.data)
    assert np.abs(unwindowed(to_tensor_ids(ids), to_tensor_ids(mask)).asnumpy() - ours)[mask > 0].max() > 1e-2


def test_greedy_tokens_match_hf_generate(pair):
    model, ref = pair
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(13, CFG.vocab_size, n))) for n in (7, 4, 11)]
    ours = Generator(model, max_length=64, use_jit=True).generate(
        prompts, GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=-1, pad_token_id=CFG.pad_token_id))
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=CFG.pad_token_id)
        assert out == theirs[0, len(prompt):].tolist()


def test_left_padded_generation_equals_single_prompts(pair):
    model, _ = pair
    generator = Generator(model, max_length=64, use_jit=False)
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(13, CFG.vocab_size, n))) for n in (9, 3)]
    gen = GenerationConfig(max_new_tokens=12, eos_token_id=-1, pad_token_id=CFG.pad_token_id)
    batch = generator.generate(prompts, gen)
    assert batch == [generator.generate([p], gen)[0] for p in prompts]


def test_cached_decode_equals_full_forward(pair):
    """Prefill 5 tokens, then 9 single-token steps against the cache (window masks from model.layer_masks)
    == one full forward of 14 tokens, max abs diff <= 1e-5 (model of initializer range 0.02, logits ~1)."""
    import mindspore as ms
    from mindspore import Tensor

    from telechat2_ms.generate import DecodeStep, PrefillStep
    from telechat2_ms.model import layer_masks, mask_tensors
    from telechat2_ms.rope import rope_inputs

    model = Telechat2ForCausalLM(get_config("qwen2_tiny"), seed=0)
    randomize_biases_and_norms(model, 1)
    ids = np.random.default_rng(3).integers(13, CFG.vocab_size, (2, 14)).astype(np.int32)
    full = model(to_tensor_ids(ids)).asnumpy()
    prefill, decode = PrefillStep(model), DecodeStep(model)
    P, T, S = 5, 16, 14
    pos = np.tile(np.arange(S, dtype=np.int32), (2, 1))
    allowed = np.tril(np.ones((P, P), bool))[None, None].repeat(2, 0)
    logits, kvs = prefill(Tensor(ids[:, :P]), Tensor(pos[:, :P]), mask_tensors(layer_masks(CFG, allowed, np.arange(P), P)),
                          *rope_inputs(P, CFG.head_dim, CFG))
    got = [logits.asnumpy()]
    caches = tuple((ms.ops.pad(k, (0, 0, 0, T - P)), ms.ops.pad(v, (0, 0, 0, T - P))) for k, v in kvs)
    for slot in range(P, S):
        allowed = np.broadcast_to(np.arange(T) <= slot, (2, 1, 1, T)).copy()
        write = (np.arange(T) == slot).astype(np.float32)[None]
        logits, caches = decode(Tensor(ids[:, slot:slot + 1]), Tensor(pos[:, slot:slot + 1]),
                                mask_tensors(layer_masks(CFG, allowed, [slot], T)), *rope_inputs(slot + 1, CFG.head_dim, CFG),
                                Tensor(write), caches)
        got.append(logits.asnumpy())
    assert np.abs(np.stack(got, 1) - full[:, P - 1:]).max() <= 1e-5
