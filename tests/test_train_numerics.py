"""Numerics of the training pieces: learning-rate schedule, AdamW against torch.optim.AdamW, the masked loss
against a numpy reference, gradient accumulation against one big batch, fp16 loss scaling, recompute."""
import dataclasses
import math

import numpy as np
import pytest

from mindspore import Parameter, Tensor

from telechat2_ms.config import get_config
from telechat2_ms.layers import Attention, use_training_kernels
from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.settings import load_settings
from telechat2_ms.train import Trainer
from telechat2_ms.train.engine import apply_recompute
from telechat2_ms.train.loss import CausalLMLoss, cast_batch
from telechat2_ms.train.optim import AdamW, DynamicLossScaler, clip_coefficient, learning_rate_at
from telechat2_ms.train.step import TrainStep

TINY = get_config("tiny")


def test_learning_rate_schedule():
    lr = [learning_rate_at(s, 1e-3, 1e-4, warmup_steps=10, total_steps=110) for s in range(1, 111)]
    assert lr[0] == pytest.approx(1e-4) and lr[4] == pytest.approx(5e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[59] == pytest.approx(0.5 * (1e-3 + 1e-4))  # half way through the cosine
    assert lr[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    assert learning_rate_at(1, 1e-3, 0.0, warmup_steps=0, total_steps=1) == pytest.approx(0.0)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 3), "b": (5,)}  # b is 1-D: no weight decay
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    params = [Parameter(Tensor(init[n]), name=n) for n in shapes]
    opt = AdamW(params, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    t_params = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in init.items()}
    t_opt = torch.optim.AdamW([{"params": [t_params["w"]], "weight_decay": 0.1},
                               {"params": [t_params["b"]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 6):
        lr = 1e-2 * (0.5 if step > 3 else 1.0)
        for group in t_opt.param_groups:
            group["lr"] = lr
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        opt(tuple(Tensor(grads[n]) for n in shapes), *opt.step_scalars(lr, step, 1.0))
        for n in shapes:
            t_params[n].grad = torch.tensor(grads[n])
        t_opt.step()
        for p in params:
            np.testing.assert_allclose(p.asnumpy(), t_params[p.name].detach().numpy(), rtol=1e-6, atol=1e-7)
    assert set(opt.state_tensors()) == {"exp_avg.w", "exp_avg.b", "exp_avg_sq.w", "exp_avg_sq.b"}


def test_adamw_with_zero_learning_rate_keeps_parameters():
    """lr 0 (a cosine schedule ending at min_learning_rate 0) must leave the weights as they are, not NaN."""
    init = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    param = Parameter(Tensor(init), name="w")
    opt = AdamW([param], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    opt((Tensor(np.ones((4, 3), np.float32)),), *opt.step_scalars(0.0, 1, 1.0))
    np.testing.assert_array_equal(param.asnumpy(), init)


def test_loss_matches_numpy_reference():
    model = Telechat2ForCausalLM(TINY, seed=3)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    mask = (rng.random((2, 16)) < 0.6).astype(np.float32)
    loss_net = CausalLMLoss(model, 2, 16)
    loss = float(loss_net(*cast_batch(ids, mask), Tensor(np.float32(7.0))).asnumpy())
    logits = model(Tensor(ids)).asnumpy().astype(np.float64)[:, :-1]  # [2,15,V]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None].astype(np.int64), -1)[..., 0]
    assert loss == pytest.approx(float((nll * mask[:, 1:]).sum() / 7.0), rel=1e-5)


def test_grad_accumulation_equals_one_big_batch():
    rng = np.random.default_rng(2)
    ids = rng.integers(0, TINY.vocab_size, (4, 16)).astype(np.int32)
    mask = (rng.random((4, 16)) < 0.7).astype(np.float32)
    denominator = Tensor(np.float32(mask[:, 1:].sum()))
    one = Tensor(np.float32(1.0))
    grads = []
    for batch in (4, 2):
        model = Telechat2ForCausalLM(TINY, seed=4)
        params = list(model.trainable_params())
        step = TrainStep(CausalLMLoss(model, batch, 16), params, AdamW(params), use_jit=False)
        loss = sum(float(step.micro_step(*cast_batch(ids[i:i + batch], mask[i:i + batch]), denominator, one).asnumpy())
                   for i in range(0, 4, batch))
        grads.append((loss, [a.asnumpy().copy() for a in step.accum], float(step.grad_norm().asnumpy())))
    (loss_a, acc_a, norm_a), (loss_b, acc_b, norm_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6) and norm_a == pytest.approx(norm_b, rel=1e-5)
    for a, b in zip(acc_a, acc_b):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("use_jit", [False, True])
def test_each_optimizer_step_accumulates_only_its_own_gradients(use_jit):
    """The first micro-step of an optimizer step replaces the accumulators' values (no clearing after an update
    or a skipped step): after an update, and after a skipped step (zero_grads), two micro-steps give the same
    gradients and norm as a new TrainStep over the same parameters."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, TINY.vocab_size, (4, 16)).astype(np.int32)
    mask = (rng.random((4, 16)) < 0.7).astype(np.float32)
    denominator = Tensor(np.float32(mask[:, 1:].sum()))
    one = Tensor(np.float32(1.0))
    model = Telechat2ForCausalLM(TINY, seed=4)
    params = list(model.trainable_params())
    loss_net = CausalLMLoss(model, 2, 16)
    step = TrainStep(loss_net, params, AdamW(params, weight_decay=0.1), use_jit=use_jit)

    def two_micro_steps(train_step):
        for i in (0, 2):
            train_step.micro_step(*cast_batch(ids[i:i + 2], mask[i:i + 2]), denominator, one)
        return [a.asnumpy().copy() for a in train_step.accum], float(train_step.grad_norm().asnumpy())

    first, _ = two_micro_steps(step)
    step.apply_update(*step.optimizer.step_scalars(1e-2, 1, 1.0))
    after_update, norm = two_micro_steps(step)
    step.zero_grads()
    after_skip, norm_skip = two_micro_steps(step)
    fresh, fresh_norm = two_micro_steps(TrainStep(loss_net, params, AdamW(params), use_jit=use_jit))
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(first, fresh))  # the update moved the gradients
    assert norm == pytest.approx(fresh_norm, rel=1e-6) and norm_skip == pytest.approx(fresh_norm, rel=1e-6)
    for a, b, c in zip(after_update, after_skip, fresh):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(b, c, rtol=1e-6, atol=1e-9)


def _state(step):
    """Copies of a TrainStep's parameters and AdamW moments."""
    tensors = list(step.params) + list(step.optimizer.exp_avg) + list(step.optimizer.exp_avg_sq)
    return [p.asnumpy().copy() for p in tensors]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("grad_clip", [0.0, 10.0, 1.0])  # no clipping; the norm (2.4-4.7) below it; clipped
def test_one_graph_step_equals_the_accumulating_graphs(use_jit, grad_clip):
    """TrainStep.step with one micro-batch (forward, backward, norm, clip and AdamW in one graph) gives the loss,
    norm, parameters and moments of micro_step + grad_norm + apply_update with the host's clip coefficient,
    over three optimizer steps. The clip coefficient is computed in fp32 in the graph and in float64 on the
    host, so the two may round it one ulp apart: parameters and moments agree within 1e-6 (measured: bit for bit
    unclipped, within 1.4e-7 clipped; parameters move by ~1e-3 a step)."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    mask = (rng.random((2, 16)) < 0.7).astype(np.float32)
    batch = [cast_batch(ids, mask)]
    denominator, one = Tensor(np.float32(mask[:, 1:].sum())), Tensor(np.float32(1.0))
    steps = []
    for _ in range(2):  # the same initial weights
        model = Telechat2ForCausalLM(TINY, seed=4)
        params = list(model.trainable_params())
        steps.append(TrainStep(CausalLMLoss(model, 2, 16), params, AdamW(params, weight_decay=0.1), use_jit=use_jit))
    whole, graphs = steps
    norms = []
    for t in (1, 2, 3):
        loss_a, norm_a, applied = whole.step(batch, denominator, 1.0, grad_clip, 1e-3, t)
        loss_b = float(graphs.micro_step(*batch[0], denominator, one).asnumpy())
        norm_b = float(graphs.grad_norm().asnumpy())
        graphs.apply_update(*graphs.optimizer.step_scalars(1e-3, t, clip_coefficient(norm_b, grad_clip)))
        assert applied and loss_a == pytest.approx(loss_b, rel=1e-6) and norm_a == pytest.approx(norm_b, rel=1e-6)
        norms.append(norm_a)
        for a, b in zip(_state(whole), _state(graphs)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    clipped = 0 < grad_clip < min(norms)
    assert clipped == (grad_clip == 1.0) and max(norms) < 10.0  # the cases are what they say
    assert whole._accumulation is None  # a step of one micro-batch creates no gradient accumulators


@pytest.mark.parametrize("use_jit", [False, True])
def test_one_graph_step_skips_a_non_finite_step(use_jit):
    """A step whose loss is not finite (an infinite loss scale) updates nothing: the branch in the graph."""
    model = Telechat2ForCausalLM(TINY, seed=4)
    params = list(model.trainable_params())
    step = TrainStep(CausalLMLoss(model, 1, 16), params, AdamW(params, weight_decay=0.1), use_jit=use_jit)
    ids = np.random.default_rng(8).integers(0, TINY.vocab_size, (1, 16)).astype(np.int32)
    batch = [cast_batch(ids, np.ones((1, 16), np.float32))]
    before = _state(step)
    loss, norm, applied = step.step(batch, Tensor(np.float32(15.0)), math.inf, 1.0, 1e-2, 1)
    assert not applied and not math.isfinite(norm)
    for a, b in zip(before, _state(step)):
        np.testing.assert_array_equal(a, b)
    loss, norm, applied = step.step(batch, Tensor(np.float32(15.0)), 1.0, 1.0, 1e-2, 1)
    assert applied and math.isfinite(loss) and math.isfinite(norm)
    assert any((a != b).any() for a, b in zip(before, _state(step)))


def test_dynamic_loss_scaler():
    scaler = DynamicLossScaler(True, init_scale=8.0, growth_interval=2)
    scaler.update(False)
    assert scaler.scale == 4.0
    scaler.update(True)
    scaler.update(True)
    assert scaler.scale == 8.0
    for _ in range(10):
        scaler.update(False)
    assert scaler.scale == 1.0
    off = DynamicLossScaler(False, init_scale=8.0)
    off.update(False)
    assert off.scale == 1.0


SMALL = ["--seq_length=48", "--train.train_dataset=demo:120", "--train.truncation=drop", "--train.batch_size=2",
         "--train.learning_rate=3e-3", "--train.warmup_steps=0"]


def test_fp16_compute_with_loss_scaling_skips_overflow_steps():
    """fp16 matmuls on CPU: a too large loss scale overflows fp16, the step is skipped (parameters untouched)
    and the scale halves until the gradients are finite (2^16 here); then the parameters move."""
    fp16 = Trainer(load_settings(None, SMALL + ["--output_dir=fp16", "--compute_dtype=float16",
                                                "--train.total_steps=3", "--train.loss_scale=262144"]),
                   printer=lambda line: None)
    before = {n: p.asnumpy().copy() for n, p in fp16.model.parameters_and_names()}
    first = fp16.train_step()
    assert first["skipped"] and first["grad_norm"] is None and math.isfinite(first["loss"])
    assert first["loss_scale"] == 262144.0 and fp16.engine.scaler.scale == 131072.0
    for n, p in fp16.model.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), before[n])
    records = [fp16.train_step() for _ in range(2)]
    assert [r["skipped"] for r in records] == [True, False]
    assert [r["loss_scale"] for r in records] == [131072.0, 65536.0]
    assert math.isfinite(records[1]["loss"]) and math.isfinite(records[1]["grad_norm"])
    assert any((p.asnumpy() != before[n]).any() for n, p in fp16.model.parameters_and_names())


@pytest.mark.slow
def test_fp16_training_tracks_fp32():
    runs = {}
    for dtype in ("float16", "float32"):
        trainer = Trainer(load_settings(None, SMALL + [f"--output_dir={dtype}", f"--compute_dtype={dtype}",
                                                       "--train.total_steps=5", "--train.loss_scale=1024"]),
                          printer=lambda line: None)
        runs[dtype] = trainer.train()["losses"]
    np.testing.assert_allclose(runs["float16"], runs["float32"], rtol=2e-3)


def _recompute_grads(mode, ids, mask, compiled=False, training_kernels=True, config=TINY, views=False):
    """Loss and gradients of one compiled micro-step; `compiled`: use_training_kernels' compiled forms (the
    heads features-first); `views`: the heads as strided views instead (its form for LoRA's projections)."""
    model = Telechat2ForCausalLM(config, seed=5)
    apply_recompute(model, mode)
    if training_kernels:
        use_training_kernels(model, compiled)
    if views:
        for _, cell in model.cells_and_names():
            if isinstance(cell, Attention):
                cell.features_first, cell.head_views = False, True
    params = list(model.trainable_params())
    step = TrainStep(CausalLMLoss(model, *ids.shape), params, AdamW(params), use_jit=True)
    loss = float(step.micro_step(*cast_batch(ids, mask), Tensor(np.float32(20.0)), Tensor(np.float32(1.0))).asnumpy())
    return loss, [a.asnumpy().copy() for a in step.accum]


def test_full_recompute_gives_the_same_gradients():
    rng = np.random.default_rng(6)
    ids = rng.integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones((2, 16), np.float32)
    loss_ref, grads_ref = _recompute_grads("none", ids, mask)
    loss, grads = _recompute_grads("full", ids, mask)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_the_training_softmax_gives_the_same_loss_and_gradients():
    """A model's attention runs MindSpore's softmax until use_training_kernels (the trainer) switches it to
    kernels.LastAxisSoftmax (a custom bprop; forward-only graphs stay on the plain one, which the bprop slows):
    the compiled training step gives the same loss either way and gradients within 1e-5."""
    model = Telechat2ForCausalLM(TINY, seed=5)
    cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, Attention)]
    assert cells and not any(cell.grad_softmax or cell.head_views or cell.features_first for cell in cells)
    use_training_kernels(model, compiled=False)
    assert all(cell.grad_softmax and not cell.head_views and not cell.features_first for cell in cells)
    rng = np.random.default_rng(8)
    ids = rng.integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones((2, 16), np.float32)
    loss_ref, grads_ref = _recompute_grads("none", ids, mask, training_kernels=False)
    loss, grads = _recompute_grads("none", ids, mask)
    assert loss == loss_ref
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_head_views_give_the_same_loss_and_gradients():
    """The compiled training step with the heads split and merged by strided views (the trainer's form where
    the projections are LoRA's) equals the one with Transposes: the same loss and gradients."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, TINY.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones((2, 16), np.float32)
    loss_ref, grads_ref = _recompute_grads("none", ids, mask)
    loss, grads = _recompute_grads("none", ids, mask, views=True)
    assert loss == loss_ref
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("size", ["tiny", "qwen2_tiny"])
def test_features_first_heads_give_the_same_loss_and_gradients(size):
    """The compiled training step with the heads features-first ([B*h,d,S], what the trainer compiles for plain
    projections and one kv head per query head; several rows through batched matmuls with the weights tiled over
    the rows) equals the heads-first one with Transposes: TeleChat2 (fused wk_v) and Qwen2 (separate k/v with
    biases, tied embeddings, a sliding-window layer; here without GQA), batches of 1 to 3 rows, zeros in the
    loss mask. The fp32 sums run in another order (the projections as W x^T), so: loss to 1e-6, gradients to
    1e-5 of each tensor's largest entry."""
    config = get_config(size)
    if config.num_kv_heads != config.num_heads:
        config = dataclasses.replace(config, num_kv_heads=config.num_heads)
    model = Telechat2ForCausalLM(config, seed=5)
    use_training_kernels(model, compiled=True)
    cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, Attention)]
    assert cells and all(cell.features_first for cell in cells)
    rng = np.random.default_rng(9)
    for rows in (1, 2, 3):
        ids = rng.integers(0, config.vocab_size, (rows, 16)).astype(np.int32)
        mask = np.ones((rows, 16), np.float32)
        mask[-1, :3] = 0.0
        loss_ref, grads_ref = _recompute_grads("none", ids, mask, config=config)
        loss, grads = _recompute_grads("none", ids, mask, compiled=True, config=config)
        assert loss == pytest.approx(loss_ref, rel=1e-6)
        for a, b in zip(grads, grads_ref):
            assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("size", ["tiny", "qwen2_tiny"])
def test_features_first_rows_keep_their_own_positions_and_masks(size):
    """The features-first form of several rows (Attention._features_first) against the heads-first one on one
    attention layer, op by op: rows with their own positions (rotary tables; one row's spaced two apart) and their
    own masks (a left-padded row, a row attending to a sliding window) give the same outputs to 1e-5 of the
    largest; swapping two rows' tables or masks changes them by more than 100x that (rows mixed up would show)."""
    config = dataclasses.replace(get_config(size), num_kv_heads=get_config(size).num_heads)
    model = Telechat2ForCausalLM(config, seed=3)
    cell = model.model.layers[0].attention
    rng = np.random.default_rng(4)
    batch, seq = 3, 12
    x = Tensor(rng.standard_normal((batch, seq, config.hidden_size)).astype(np.float32))
    positions = np.stack([np.maximum(np.arange(seq) - 4, 0), np.arange(seq), 2 * np.arange(seq)]).astype(np.int32)
    allowed = np.tril(np.ones((seq, seq), bool))[None, None].repeat(batch, 0)
    allowed[0, 0, :, :4] = False  # row 0 left-padded by 4
    allowed[2, 0] &= np.triu(np.ones((seq, seq), bool), -3)  # row 2: a window of 4 keys
    allowed[0, 0, :4, 0] = True  # pads attend to something (as the model's masks make them)
    ids = Tensor(np.zeros((batch, seq), np.int32))
    _, _, inv_freq, mscale = model.prepare_inputs(ids)
    cos, sin = model.model.rotary(Tensor(positions), inv_freq, mscale)  # [B,1,S,d]

    def run(features_first, cos, sin, allowed):
        cell.features_first = features_first
        return cell(x, cos, sin, Tensor(allowed))[0].asnumpy()

    expected = run(False, cos, sin, allowed)
    tolerance = 1e-5 * np.max(np.abs(expected))
    assert np.max(np.abs(run(True, cos, sin, allowed) - expected)) <= tolerance
    swapped = [0, 2, 1]
    assert np.max(np.abs(run(True, cos[swapped], sin[swapped], allowed) - expected)) > 100 * tolerance
    assert np.max(np.abs(run(True, cos, sin, allowed[swapped]) - expected)) > 100 * tolerance


def test_lora_projections_and_gqa_keep_the_heads_first():
    """LoRA's projections are not plain Linear layers, and GQA would need a broadcasting batched matmul: the
    compiled forms keep the heads first there, as views."""
    from telechat2_ms.train.lora import apply_lora

    lora = Telechat2ForCausalLM(dataclasses.replace(TINY, num_kv_heads=TINY.num_heads), seed=5)  # MHA
    apply_lora(lora, 2, 4.0, ["wq"])
    gqa = Telechat2ForCausalLM(get_config("qwen2_tiny"), seed=5)
    for model in (lora, gqa):
        use_training_kernels(model, compiled=True)
        cells = [cell for _, cell in model.cells_and_names() if isinstance(cell, Attention)]
        assert cells and all(cell.head_views and not cell.features_first for cell in cells)


@pytest.mark.slow
def test_recompute_gives_the_same_training():
    """full / selective recompute only trade compute for memory: losses and parameters stay the same."""
    results = {}
    for mode in ("none", "full", "selective"):
        trainer = Trainer(load_settings(None, SMALL + [f"--output_dir={mode}", f"--train.recompute={mode}",
                                                       "--train.total_steps=3"]), printer=lambda line: None)
        losses = trainer.train()["losses"]
        results[mode] = (losses, trainer.model.lm_head.weight.asnumpy().copy())
    for mode in ("full", "selective"):
        np.testing.assert_allclose(results[mode][0], results["none"][0], rtol=1e-6)
        np.testing.assert_allclose(results[mode][1], results["none"][1], rtol=1e-5, atol=1e-7)


def test_gradient_clipping_on_pretraining_data(shared_dir):
    """Global-norm clipping: after one AdamW step from zero moments, exp_avg = (1 - beta1) * clipped gradients,
    whose global norm is grad_clip. Runs the pretraining path (jsonl {"text"}) end to end."""
    data = shared_dir / "data" / "pretrain" / "pretrain_example.jsonl"
    trainer = Trainer(load_settings(None, ["--seq_length=64", f"--train.train_dataset={data}",
                                           "--train.data_format=pretrain", "--train.batch_size=2",
                                           "--train.grad_clip=0.05", "--train.total_steps=1", "--jit=false",
                                           "--output_dir=clip"]), printer=lambda line: None)
    assert trainer.dataset.kind == "pretrain" and trainer.dataset.num_samples > 100
    record = trainer.train_step()
    assert record["grad_norm"] > 0.5  # far above the clip
    exp_avg = [p.asnumpy() for name, p in trainer.engine.optimizer.state_tensors().items() if name.startswith("exp_avg.")]
    norm = math.sqrt(sum(float((m.astype(np.float64) ** 2).sum()) for m in exp_avg))
    assert norm == pytest.approx(0.1 * 0.05, rel=1e-4)
    assert record["tokens"] == 2 * 64


def test_generation_with_a_model_in_the_training_forms_equals_a_fresh_one():
    """use_training_kernels' features-first heads return the layer's K/V as [k,d,S]; the Generator's prefill
    writes them into the cache heads first, so it switches them back: the same K/V cache and greedy tokens as a
    fresh model (the tiny random model's tokens hardly depend on the cache, so the caches are compared)."""
    from telechat2_ms.generate import GenerationConfig, Generator

    mha = dataclasses.replace(TINY, num_kv_heads=TINY.num_heads)
    trained_forms, fresh = Telechat2ForCausalLM(mha, seed=5), Telechat2ForCausalLM(mha, seed=5)
    use_training_kernels(trained_forms, compiled=True)
    assert all(cell.features_first for _, cell in trained_forms.cells_and_names() if isinstance(cell, Attention))
    gen = GenerationConfig(max_new_tokens=6, repetition_penalty=1.0, eos_token_id=-1, pad_token_id=TINY.pad_token_id)
    prompts = [[20, 31, 42, 53, 64]]  # one row: the prefill would take the features-first form
    generators = [Generator(model, 16) for model in (trained_forms, fresh)]
    tokens = [generator.generate(prompts, gen) for generator in generators]
    assert tokens[0] == tokens[1]
    caches = [[p.asnumpy() for p in generator._steps[1][0].cache_params] for generator in generators]
    for got, want in zip(*caches):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
