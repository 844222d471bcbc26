"""Generation: KV-cache decode equals the full forward, greedy output equals the PyTorch reference's
`generate`, padded batches equal single prompts, sampling controls, stop at <_end>, clear input errors."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from telechat2_ms.config import get_config
from telechat2_ms.generate import (DecodeStep, GenerationConfig, GenerationError, Generator, PrefillStep,
                                   left_pad)
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids
from telechat2_ms.rope import rope_inputs
from telechat2_ms.sampling import TokenSampler

CFG = get_config("tiny", initializer_range=0.25)  # larger weights: varied, well-separated greedy choices


@pytest.fixture(scope="module")
def model():
    from tests.torch_reference import randomize_biases_and_norms
    m = Telechat2ForCausalLM(CFG, seed=0)
    randomize_biases_and_norms(m)
    return m


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model, max_length=64, use_jit=True)


def _prompts():
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(13, CFG.vocab_size, n))) for n in (7, 4, 11)]


def test_prefill_then_decode_equals_full_forward():
    """Logits of prefill (5 tokens) + 7 single-token decode steps against the cache == one full forward,
    max abs diff <= 1e-5 on the tiny config with its own initialisation (logits of order 1; the larger-weight
    model of the other tests has logits of order 10 and differs by ~1e-5 from matmul blocking alone)."""
    from tests.torch_reference import randomize_biases_and_norms
    model = Telechat2ForCausalLM(get_config("tiny"), seed=0)
    randomize_biases_and_norms(model)
    ids = np.random.default_rng(1).integers(13, CFG.vocab_size, (2, 12)).astype(np.int32)
    full = model(to_tensor_ids(ids)).asnumpy()  # [2,12,V]
    prefill, decode = PrefillStep(model), DecodeStep(model)
    P, T = 5, 16
    pos = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    allowed = np.tril(np.ones((P, P), bool))[None, None].repeat(2, 0)
    logits, kvs = prefill(Tensor(ids[:, :P]), Tensor(pos[:, :P]), Tensor(allowed), *rope_inputs(P, CFG.head_dim, CFG))
    got = [logits.asnumpy()]
    caches = tuple((ms.ops.pad(k, (0, 0, 0, T - P)), ms.ops.pad(v, (0, 0, 0, T - P))) for k, v in kvs)
    for slot in range(P, 12):
        allowed = np.broadcast_to(np.arange(T) <= slot, (2, 1, 1, T)).copy()
        write = (np.arange(T) == slot).astype(np.float32)[None]
        logits, caches = decode(Tensor(ids[:, slot:slot + 1]), Tensor(pos[:, slot:slot + 1]), Tensor(allowed),
                                *rope_inputs(slot + 1, CFG.head_dim, CFG), Tensor(write), caches)
        got.append(logits.asnumpy())
    got = np.stack(got, 1)  # [2, 8, V]: predictions after positions 4..11
    assert np.abs(got - full[:, P - 1:]).max() <= 1e-5


@pytest.mark.parametrize("penalty", [1.0, 1.03])
def test_greedy_matches_reference_generate(generator, model, penalty):
    """32 greedy tokens per prompt, MindSpore batch of 3 (left padded) vs HF generate on each prompt alone."""
    torch = pytest.importorskip("torch")
    from tests.torch_reference import llama_reference, ms_state_numpy
    ref = llama_reference(CFG, ms_state_numpy(model))
    gen = GenerationConfig(max_new_tokens=32, do_sample=False, repetition_penalty=penalty, eos_token_id=-1)
    ours = generator.generate(_prompts(), gen)
    for prompt, out in zip(_prompts(), ours):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                  repetition_penalty=penalty, eos_token_id=None, pad_token_id=3)
        assert out == theirs[0, len(prompt):].tolist()
        assert len(out) == 32


def test_left_padded_batch_equals_single_prompts(generator):
    gen = GenerationConfig(max_new_tokens=12, eos_token_id=-1)
    batch = generator.generate(_prompts(), gen)
    singles = [generator.generate([p], gen)[0] for p in _prompts()]
    assert batch == singles


def test_a_batch_prefilled_a_few_rows_at_a_time_equals_one_call(model, monkeypatch):
    """With PREFILL_TOKENS below the batch's tokens, the 4 padded prompts (11 tokens each) are prefilled 1 or 2
    rows per call into their cache rows: the same greedy tokens as the whole batch in one call, and each
    row's as alone."""
    import telechat2_ms.generate as generate

    prompts = _prompts() + [_prompts()[0][::-1]]
    gen = GenerationConfig(max_new_tokens=10, eos_token_id=-1)
    whole = Generator(model, max_length=32, use_jit=True).generate(prompts, gen)
    for tokens_per_call in (11, 22):
        monkeypatch.setattr(generate, "PREFILL_TOKENS", tokens_per_call)
        assert generate.prefill_rows_per_call(4, 11) == tokens_per_call // 11
        split = Generator(model, max_length=32, use_jit=True)
        assert split.generate(prompts, gen) == whole, tokens_per_call
    assert [split.generate([p], gen)[0] for p in prompts] == whole


def test_op_by_op_prefill_leaves_the_cache_and_logits_of_the_compiled_one(model):
    """CachedSteps.prefill_in_place (the Generator's uncompiled and long-prompt prefill: each layer's K/V written
    as soon as the layer has run) against the compiled CachedSteps.prefill, two padded prompts into rows 1-2 of
    a 4-row cache: every cache Parameter and the logits equal to 1e-6 (K/V up to ~7; bit-identical on the
    2-core Xeon this was written on; a 0.1% error in the values written fails it by 5e-3), the other rows and
    the slots after the prompts zero."""
    from telechat2_ms.generate import CachedSteps
    from telechat2_ms.model import layer_masks, mask_tensors

    ids, mask, positions = left_pad(_prompts()[:2], CFG.pad_token_id)
    prompt_len = ids.shape[1]
    allowed = np.tri(prompt_len, dtype=bool)[None, None] & (mask[:, None, None, :] > 0)
    masks = mask_tensors(layer_masks(CFG, allowed, np.arange(prompt_len), prompt_len))
    args = (Tensor(ids), Tensor(positions), masks, *rope_inputs(prompt_len, CFG.head_dim, CFG), Tensor(np.int32(1)))
    compiled, op_by_op = CachedSteps(model, 4, 16), CachedSteps(model, 4, 16)
    want = ms.jit(compiled.prefill)(*args).asnumpy()
    got = op_by_op.prefill_in_place(*args).asnumpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    heads = compiled.kv_heads
    for a, b in zip(compiled.cache_params, op_by_op.cache_params):
        a, b = a.asnumpy(), b.asnumpy()
        assert np.abs(a[heads:3 * heads, :prompt_len]).max() > 0.1  # rows 1-2 hold the prompts' K/V
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=a.shape)
        assert not b[:heads].any() and not b[3 * heads:].any() and not b[:, prompt_len:].any()


def test_prefill_rows_per_call_divides_the_batch():
    from telechat2_ms.generate import PREFILL_TOKENS, prefill_rows_per_call

    assert prefill_rows_per_call(8, 512) == 1 and prefill_rows_per_call(8, 8192) == 1
    assert prefill_rows_per_call(8, PREFILL_TOKENS // 4) == 4
    assert prefill_rows_per_call(6, PREFILL_TOKENS // 5) == 3  # the largest divisor of 6 that fits 5 rows
    assert prefill_rows_per_call(3, 7) == 3


def test_stops_at_end_token(generator):
    free = generator.generate(_prompts()[:1], GenerationConfig(max_new_tokens=12, eos_token_id=-1))[0]
    eos = free[4]
    first = free.index(eos)
    stopped = generator.generate(_prompts()[:1], GenerationConfig(max_new_tokens=12, eos_token_id=eos))[0]
    assert stopped == free[:first]


def test_streaming_callback_sees_every_step(generator):
    seen = []
    out = generator.generate(_prompts()[:2], GenerationConfig(max_new_tokens=6, eos_token_id=-1),
                             on_tokens=lambda t: seen.append(t.tolist()))
    assert [s[0] for s in seen] == out[0] and [s[1] for s in seen] == out[1]


def test_sampling_is_seeded_and_top_k_one_is_greedy(generator):
    greedy = generator.generate(_prompts(), GenerationConfig(max_new_tokens=8, eos_token_id=-1, repetition_penalty=1.0))
    top1 = generator.generate(_prompts(), GenerationConfig(max_new_tokens=8, eos_token_id=-1, do_sample=True,
                                                           top_k=1, temperature=0.7, repetition_penalty=1.0))
    assert top1 == greedy
    sample = GenerationConfig(max_new_tokens=8, eos_token_id=-1, do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.5, seed=7)
    a, b = generator.generate(_prompts(), sample), generator.generate(_prompts(), sample)
    assert a == b
    assert a != greedy


def test_sampler_respects_top_k_top_p_and_penalty():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32))
    seen = np.zeros((2000, 4), bool)
    uniform = np.random.default_rng(0).random(2000, dtype=np.float32)
    run = lambda **kw: TokenSampler(4, **kw)(Tensor(logits), Tensor(seen), Tensor(uniform)).asnumpy()
    top2 = run(do_sample=True, temperature=1.0, top_k=2)
    assert set(top2) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.04
    top_p = run(do_sample=True, temperature=1.0, top_p=0.7)  # keeps 0.5 and 0.3 (0.5 < 0.7), drops the rest
    assert set(top_p) == {0, 1}
    everything = run(do_sample=True, temperature=1.0)
    assert abs(np.mean(everything == 3) - 0.05) < 0.02
    # penalty: a positive logit is divided, a negative one multiplied
    plain = np.array([[2.0, 1.9, -1.0, -1.05]], np.float32)
    mark = np.array([[True, False, True, False]])
    got = TokenSampler(4, repetition_penalty=1.1)(Tensor(plain), Tensor(mark), Tensor(np.zeros(1, np.float32)))
    assert got.asnumpy().tolist() == [1]


def test_left_pad_positions_start_at_each_prompt():
    ids, mask, pos = left_pad([[5, 6, 7], [8]], 3)
    assert ids.tolist() == [[5, 6, 7], [3, 3, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_bad_input_is_rejected_clearly(generator):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generator.generate([[5, 6], []], GenerationConfig(max_new_tokens=4))
    with pytest.raises(GenerationError, match="exceeds the context of 64 tokens"):
        generator.generate([list(range(13, 73))], GenerationConfig(max_new_tokens=8))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generator.generate([[5, 999999]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(GenerationError, match="no prompts"):
        generator.generate([], GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("family", ["telechat2", "qwen2_sliding_window"])
def test_decode_compiles_once_per_batch_size(model, family):
    """Static shapes and Tensor-only inputs: the prefill, decode and sampling steps compile during the first
    tokens of the first call; the remaining decode steps, and a second call with the same batch size and
    prompt length, compile nothing (MindSpore's jit cache does not grow). Also for a model with a
    sliding-window layer, whose steps take a pair of masks (qwen2_tiny)."""
    from mindspore.graph import api

    if family != "telechat2":
        model = Telechat2ForCausalLM(get_config("qwen2_tiny"), seed=0)
        assert model.config.sliding_layers
    generator = Generator(model, max_length=48, use_jit=True)
    sizes = []
    gen = GenerationConfig(max_new_tokens=12, eos_token_id=-1)
    out = generator.generate(_prompts()[:2], gen, on_tokens=lambda t: sizes.append(len(api.ms_compile_cache)))
    assert len(out[0]) == 12 and len(sizes) == 12
    assert sizes[2] == sizes[-1], sizes  # after the first decode step: no compilation per token
    generator.generate([p[::-1] for p in _prompts()[:2]], gen)
    assert len(api.ms_compile_cache) == sizes[-1]


@pytest.mark.parametrize("pairs", [3, 40])  # of 240 entries: 3 the two in-place scatters, 40 ScatterNdUpdate's copy
def test_in_place_cache_writes_are_exact(pairs):
    """layers.update_rows (compiled, as the steps run it) leaves exactly the new values at its (row, slot) pairs,
    bit for bit, whatever was there (inf, NaN, -0.0 on either side), and every other entry as it was;
    write_prompts fills slots 0..P-1 of its rows (some or all) and zeros after them; scatter_rows reads the first B rows'
    first W slots back as [B*k,W,d] (the slots first, then the rows, and the rows alone)."""
    from mindspore import ops
    from telechat2_ms.layers import kv_cache, scatter_rows, update_rows, write_prompts
    rng = np.random.default_rng(3)
    cache = kv_cache(6, 40, 4, ms.float32, "c")  # [6,40,4]: 240 (row, slot) entries
    old = rng.standard_normal((6, 40, 4)).astype(np.float32)
    old[0, 0, :3] = [np.inf, np.nan, -0.0]
    cache.set_data(Tensor(old))
    index = np.stack(np.unravel_index(rng.permutation(240)[:pairs], (6, 40)), 1).astype(np.int32)
    index[0] = (0, 0)
    values = rng.standard_normal((pairs, 4)).astype(np.float32)
    values[1, :3] = [-np.inf, np.nan, -0.0]
    def update(i, v):
        return update_rows(cache, i, v)

    def prompts(n, r):
        return write_prompts(cache, n, r)

    def decode(n, s):
        return scatter_rows(cache, n, s, 7)

    def whole(n, s):
        return scatter_rows(cache, n, s)

    ms.jit(update)(Tensor(index), Tensor(values))
    want = old.copy()
    want[index[:, 0], index[:, 1]] = values
    assert np.array_equal(cache.asnumpy().view(np.int32), want.view(np.int32))

    new = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)  # [B,k,P,d]: one prompt into batch row 1
    ms.jit(prompts)(Tensor(new), Tensor(np.int32(1)))
    want[2:4, :5], want[2:4, 5:] = new[0], 0.0
    assert np.array_equal(cache.asnumpy().view(np.int32), want.view(np.int32))

    step = rng.standard_normal((2, 2, 1, 4)).astype(np.float32)  # rows 0 and 1 of a 3-row cache, slot 5 and 6
    read = ms.jit(decode)(Tensor(step), Tensor(np.array([[5], [6]], np.int32)))
    want[[0, 1], 5], want[[2, 3], 6] = step[0, :, 0], step[1, :, 0]
    assert np.array_equal(cache.asnumpy().view(np.int32), want.view(np.int32))
    assert np.array_equal(read.asnumpy().view(np.int32), want[:4, :7].view(np.int32))
    assert ops.shape(read) == (4, 7, 4)
    read = ms.jit(whole)(Tensor(step[:1]), Tensor(np.array([7], np.int32)))  # row 0, slot 7, every slot
    want[[0, 1], 7] = step[0, :, 0]
    assert np.array_equal(cache.asnumpy().view(np.int32), want.view(np.int32))
    assert np.array_equal(read.asnumpy().view(np.int32), want[:2].view(np.int32))

    every = rng.standard_normal((3, 2, 5, 4)).astype(np.float32)  # every row at once (an Assign)
    ms.jit(prompts)(Tensor(every), Tensor(np.int32(0)))
    want[:, :5], want[:, 5:] = every.reshape(6, 5, 4), 0.0
    assert np.array_equal(cache.asnumpy().view(np.int32), want.view(np.int32))
