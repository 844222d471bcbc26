"""The blockwise causal attention (kernels.BlockwiseAttention: blocks of query rows, each against its causal
prefix of keys, the blocks above the diagonal skipped, a bprop that recomputes each block) against the dense
path (kernels.attention without it), fp32 on CPU.

Block length is shrunk (ATTENTION_BLOCK 8) so that small shapes cross many block boundaries, with a sequence that
is not a multiple of the block. Compared: the output on every query row that may attend to a key (a left-padding
query row sees none: the dense path averages all S keys there, the blockwise one the keys of its visited blocks,
and nothing reads either), and the gradients of q, k, v through a loss that weights only those rows, in PyNative
and under ms.jit (the compiled training step), and its op-by-op form (`eager`: one head at a time, the
Generator's prefill); causal with left padding, a sliding window, GQA. Tolerance 1e-5 of each tensor's largest
magnitude (fp32 summation order differs between the two paths). Then whole models: tiny
TeleChat2 and tiny Qwen2 (sliding-window layer) logits on a padded batch, the tiny model's training-loss
gradients (compiled), blockwise vs dense (layers.use_blockwise_attention); and greedy generation of a prompt long
enough for the blockwise prefill equals the dense model's tokens.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from telechat2_ms import kernels
from telechat2_ms.config import get_config
from telechat2_ms.layers import use_blockwise_attention
from telechat2_ms.model import Telechat2ForCausalLM

TOL = 1e-5
RNG = np.random.default_rng(7)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)


def _masks(batch: int, seq: int, pad: int, window: int = 0) -> np.ndarray:
    allowed = np.tril(np.ones((seq, seq), bool))[None, None].repeat(batch, 0)
    allowed[1, :, :, :pad] = False  # left padding on row 1
    if window:
        idx = np.arange(seq)
        allowed &= (idx[None, :] > idx[:, None] - window)[None, None]
    return allowed


def _close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    assert np.abs(got - want).max() <= TOL * np.abs(want).max(), (what, np.abs(got - want).max())


@pytest.mark.parametrize("jit, eager", [(False, False), (True, False), (False, True)], ids=["pynative", "jit", "eager"])
@pytest.mark.parametrize("heads, kv_heads, seq, pad, window", [
    (4, 2, 37, 5, 0),   # GQA, 5 blocks (the last one 5 long), left padding
    (2, 2, 24, 0, 6),   # sliding window of 6: whole visited blocks masked for later queries
    (3, 1, 16, 9, 0),   # multi-query, padding past the first block
])
def test_blockwise_equals_dense_forward_and_gradients(small_blocks, jit, eager, heads, kv_heads, seq, pad, window):
    batch, dim = 2, 16
    q, k, v = (Tensor(RNG.normal(size=(batch, h, seq, dim)).astype(np.float32)) for h in (heads, kv_heads, kv_heads))
    allowed = _masks(batch, seq, pad, window)
    rows = allowed.any(-1)[:, :, :, None]  # [B,1,S,1]: query rows with a visible key
    weight = Tensor(RNG.normal(size=(batch, heads, seq, dim)).astype(np.float32) * rows)
    mask = Tensor(allowed)
    blockwise = kernels.BlockwiseAttention(eager)  # eager: the op-by-op form (the Generator's prefill)

    def dense_loss(q, k, v):
        return (kernels.attention(q, k, v, mask) * weight).sum()

    def block_loss(q, k, v):
        return (kernels.attention(q, k, v, mask, False, blockwise) * weight).sum()

    if jit:
        dense_loss, block_loss = ms.jit(dense_loss), ms.jit(block_loss)
    want = kernels.attention(q, k, v, mask).asnumpy()
    got = kernels.attention(q, k, v, mask, False, blockwise).asnumpy()
    _close(got * rows, want * rows, "output")
    want_grads = ms.grad(dense_loss, (0, 1, 2))(q, k, v)
    got_grads = ms.grad(block_loss, (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got_grads, want_grads):
        _close(g.asnumpy(), w.asnumpy(), f"d{name}")


def test_blocks_of_query_rows_bound_the_scores_held_at_once():
    """512 query rows per block while rows x keys stays within ATTENTION_MAX_SCORES (2^23 per head: 32 MiB fp32),
    fewer beyond; the bprop's written-out rule equals attention_block."""
    block = kernels.BlockwiseAttention()
    assert block._bounds(1024) == [(0, 512), (512, 1024)]
    assert block._bounds(1100)[-1] == (1024, 1100)
    assert kernels.attention_block(16384) == 512 and kernels.attention_block(32768) == 256
    for seq in (1024, 8192, 32768, 100000):
        assert block._bounds(seq)[0][1] == kernels.attention_block(seq)
        assert kernels.attention_block(seq) * seq <= kernels.ATTENTION_MAX_SCORES


@pytest.mark.parametrize("name", ["tiny", "qwen2_tiny"])
def test_model_logits_blockwise_equal_dense(monkeypatch, name):
    """A padded batch through the whole model: logits of the real positions, blockwise (block 8) vs dense."""
    cfg = get_config(name)
    model = Telechat2ForCausalLM(cfg, seed=0)
    seq = 40
    ids = RNG.integers(4, cfg.vocab_size, size=(2, seq)).astype(np.int32)
    mask = np.ones((2, seq), np.int32)
    mask[1, :7] = 0
    inputs = (Tensor(ids), Tensor(mask))
    want = model(*inputs).asnumpy()
    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    use_blockwise_attention(model)
    got = model(*inputs).asnumpy()
    real = mask.astype(bool)
    _close(got[real], want[real], f"{name} logits")


def test_training_gradients_blockwise_equal_dense(monkeypatch):
    """The training loss's parameter gradients (train/loss.CausalLMLoss, compiled as the one-process step is)."""
    from telechat2_ms.train.loss import CausalLMLoss

    cfg = get_config("tiny")
    seq = 32
    ids = Tensor(RNG.integers(4, cfg.vocab_size, size=(2, seq)).astype(np.int32))
    loss_mask = Tensor(np.ones((2, seq), np.float32))
    denominator = Tensor(np.float32(2 * (seq - 1)))

    def grads(blockwise):
        model = Telechat2ForCausalLM(cfg, seed=1)
        use_blockwise_attention(model, blockwise)
        net = CausalLMLoss(model, 2, seq)
        params = net.trainable_params()
        fn = ms.jit(ms.value_and_grad(net, None, params))
        loss, g = fn(ids, loss_mask, denominator)
        return float(loss.asnumpy()), [x.asnumpy() for x in g]

    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    want_loss, want = grads(False)
    got_loss, got = grads(True)
    assert abs(got_loss - want_loss) <= TOL * abs(want_loss)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g, w, f"gradient {i}")


def test_long_prompt_generation_is_blockwise_and_equals_dense(monkeypatch):
    """generate.Generator runs a prompt of >= 2 blocks through the PyNative blockwise prefill (its eager form):
    the same greedy tokens as the model with dense attention (a Generator without jit and blockwise switched off)."""
    from telechat2_ms.generate import GenerationConfig, Generator

    monkeypatch.setattr(kernels, "ATTENTION_BLOCK", 8)
    cfg = get_config("tiny")
    prompts = [RNG.integers(4, cfg.vocab_size, size=30).tolist(), RNG.integers(4, cfg.vocab_size, size=21).tolist()]
    gen = GenerationConfig(max_new_tokens=6, repetition_penalty=1.0, eos_token_id=-1, pad_token_id=cfg.pad_token_id)
    calls = []
    original = kernels.BlockwiseAttention.construct

    def counted(self, q, k, v, allowed):
        calls.append((q.shape[2], self.eager))
        return original(self, q, k, v, allowed)

    monkeypatch.setattr(kernels.BlockwiseAttention, "construct", counted)
    got = Generator(Telechat2ForCausalLM(cfg, seed=2), 40).generate(prompts, gen)
    assert calls and set(calls) == {(30, True)}  # the prefill (one call per layer) went blockwise, eager
    dense_model = Telechat2ForCausalLM(cfg, seed=2)
    dense = Generator(dense_model, 40, use_jit=False)
    use_blockwise_attention(dense_model, False)
    assert dense.generate(prompts, gen) == got
