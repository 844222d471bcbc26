"""Mixture of experts on the one model code (fp32, CPU), against independent references:
- Qwen2-MoE against transformers' own Qwen2MoeForCausalLM (shared expert on, layer 1 dense via mlp_only_layers):
  logits <= 1e-4 on a left-padded batch (real positions), 32 greedy tokens identical to HF `generate`, the
  load-balancing loss equal to transformers' load_balancing_loss_func x router_aux_loss_coef (rel 1e-5);
- TeleChat2-MoE against the TeleChat2 reference (LlamaForCausalLM, tests/torch_reference.py) whose MLPs are
  tests/torch_reference.RoutedMoE, the routing of families.md written there independently (renormalised top-k,
  expert down bias, each expert on its own tokens): logits <= 1e-4, the aux loss 0.01 * E * sum_i f_i * P_i per
  layer (f over the k*N assignments) within 1e-6 relative (fp32 summation order);
- gradients of the whole MoE block (router, experts, down biases, shared expert and its gate) equal torch
  autograd's (max abs difference <= 1e-5 x the gradient's largest magnitude, at least 1) and a central finite difference of the router weight (rel 2e-3, fp32 steps);
- the training loss of an MoE model adds the aux loss.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mindspore as ms  # noqa: E402
from mindspore import Tensor, ops  # noqa: E402

from telechat2_ms.config import ConfigError, ModelConfig, get_config  # noqa: E402
from telechat2_ms.generate import GenerationConfig, Generator  # noqa: E402
from telechat2_ms.model import Telechat2ForCausalLM, to_tensor_ids  # noqa: E402
from tests.torch_reference import (RoutedMoE, ms_state_numpy, qwen2_moe_reference,  # noqa: E402
                                   randomize_biases_and_norms, telechat2_moe_reference)

ATOL = 1e-4
QWEN = get_config("qwen2_moe_tiny", initializer_range=0.25)
TELE = get_config("telechat2_moe_tiny", initializer_range=0.25)


def padded_batch(cfg, seed=0, length=12):
    rng = np.random.default_rng(seed)
    ids = rng.integers(13, cfg.vocab_size, (3, length))
    mask = np.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ids[mask == 0] = cfg.pad_token_id
    return ids, mask


def our_aux(model, ids, mask):
    mask = None if mask is None else to_tensor_ids(mask)
    position_ids, allowed, inv_freq, mscale = model.prepare_inputs(to_tensor_ids(ids), mask)
    _, _, aux = model.model(to_tensor_ids(ids), position_ids, allowed, inv_freq, mscale, with_aux=True)
    return float(aux.asnumpy())


@pytest.fixture(scope="module")
def qwen_pair():
    model = Telechat2ForCausalLM(QWEN, seed=0)
    randomize_biases_and_norms(model, 1)
    names = {p.name for p in model.get_parameters()}
    assert {"model.layers.0.feed_forward.routed_experts.router.dense.weight",
            "model.layers.0.feed_forward.routed_experts.ffn.w1.weight",
            "model.layers.0.feed_forward.shared_experts_gate.weight", "model.layers.1.feed_forward.w1.weight"} <= names
    return model, qwen2_moe_reference(QWEN, ms_state_numpy(model))


def test_qwen2_moe_logits_and_aux_loss_match_transformers(qwen_pair):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    model, ref = qwen_pair
    ids, mask = padded_batch(QWEN)
    ours = model(to_tensor_ids(ids), to_tensor_ids(mask)).asnumpy()
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_router_logits=True)
    assert np.abs(ours - out.logits.numpy())[mask > 0].max() <= ATOL
    # transformers' loss over every row (no attention mask: the rows our trainer's loss sees), x the coefficient
    assert len(out.router_logits) == 2  # layers 0 and 2; layer 1 is dense
    theirs = float(load_balancing_loss_func(out.router_logits, QWEN.num_experts, QWEN.num_experts_per_tok)
                   ) * QWEN.router_aux_loss_coef
    assert our_aux(model, ids, mask) == pytest.approx(theirs, rel=1e-5)


def test_qwen2_moe_greedy_tokens_match_transformers_generate(qwen_pair):
    model, ref = qwen_pair
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(13, QWEN.vocab_size, n))) for n in (7, 4, 11)]
    ours = Generator(model, max_length=64, use_jit=True).generate(
        prompts, GenerationConfig(max_new_tokens=32, do_sample=False, repetition_penalty=1.0, eos_token_id=-1,
                          pad_token_id=QWEN.pad_token_id))
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=QWEN.pad_token_id)
        assert tokens == theirs[0, len(prompt):].tolist()


def test_telechat2_moe_matches_the_routing_reference():
    model = Telechat2ForCausalLM(TELE, seed=0)
    randomize_biases_and_norms(model, 1)  # includes the experts' down biases [E, H]
    state = ms_state_numpy(model)
    assert state["model.layers.0.feed_forward.ffn.w2.bias"].shape == (TELE.num_experts, TELE.hidden_size)
    assert state["model.layers.0.feed_forward.router.dense.weight"].shape == (TELE.num_experts, TELE.hidden_size)
    ref = telechat2_moe_reference(TELE, state)
    ids, mask = padded_batch(TELE, seed=3)
    ours = model(to_tensor_ids(ids), to_tensor_ids(mask)).asnumpy()
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.abs(ours - theirs)[mask > 0].max() <= ATOL
    # families.md: per layer, P_i = mean_t p(t, i), f_i = (1 / (k N)) sum_t sum_j [topk_j(t) == i], 0.01 E sum f P
    E, k, expected = TELE.num_experts, TELE.num_experts_per_tok, 0.0
    for i in TELE.sparse_layers:
        probs, top_i = ref.model.layers[i].mlp.calls[-1]
        N = probs.shape[0]
        f = np.array([(top_i.numpy() == e).sum() for e in range(E)]) / (k * N)
        expected += 0.01 * E * float((f * probs.numpy().mean(0)).sum())
    assert our_aux(model, ids, mask) == pytest.approx(expected, rel=1e-6)


def moe_block_case(cfg, seed=0):
    """Our MoE block of layer 0 (random, biases non-zero) and the torch reference holding its weights."""
    model = Telechat2ForCausalLM(cfg, seed=seed)
    randomize_biases_and_norms(model, seed + 1)
    block = model.model.layers[0].feed_forward
    prefix = "model.layers.0.feed_forward."
    state = {n: p.asnumpy() for n, p in block.parameters_and_names(prefix[:-1])}
    ref = RoutedMoE(state, prefix, cfg.num_experts_per_tok, cfg.norm_topk_prob,
                    shared=bool(cfg.shared_expert_ffn_hidden_size))
    return block, ref


@pytest.mark.parametrize("name", ["telechat2_moe_tiny", "qwen2_moe_tiny"])
def test_moe_block_gradients_match_torch_autograd(name):
    cfg = get_config(name, initializer_range=0.25)
    block, ref = moe_block_case(cfg)
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (2, 5, cfg.hidden_size)).astype(np.float32)
    probe = rng.normal(0, 1, (2, 5, cfg.hidden_size)).astype(np.float32)
    params = [p for p in block.trainable_params()]

    def loss(inp):
        out, _, _ = block(inp)
        return (out * Tensor(probe)).sum()

    ours = ms.grad(loss, grad_position=0, weights=params)(Tensor(x))
    ref_loss = (ref(torch.from_numpy(x).requires_grad_()) * torch.from_numpy(probe)).sum()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    names = {"router.dense.weight": "router", "ffn.w1.weight": "w1", "ffn.w3.weight": "w3", "ffn.w2.weight": "w2",
             "ffn.w2.bias": "b2", "shared_experts.w1.weight": "s1", "shared_experts.w3.weight": "s3",
             "shared_experts.w2.weight": "s2", "shared_experts_gate.weight": "gate"}
    checked = 0
    for param, grad in zip(params, ours[1]):
        short = param.name.split("feed_forward.")[1].replace("routed_experts.", "")
        theirs = ref_params[names[short]].grad.numpy()
        assert np.abs(grad.asnumpy() - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), param.name
        checked += 1
    assert checked == len(ref_params)
    # the router's gradient is not zero: it flows through the top-k weights
    router = [g for p, g in zip(params, ours[1]) if "router" in p.name][0].asnumpy()
    assert np.abs(router).max() > 1e-3


def test_router_gradient_matches_finite_differences():
    cfg = TELE
    block, _ = moe_block_case(cfg, seed=2)
    router = [p for p in block.trainable_params() if "router" in p.name][0]
    rng = np.random.default_rng(7)
    x = Tensor(rng.normal(0, 1, (1, 6, cfg.hidden_size)).astype(np.float32))
    probe = Tensor(rng.normal(0, 1, (1, 6, cfg.hidden_size)).astype(np.float32))

    def loss():
        out, _, _ = block(x)
        return float((out * probe).sum().asnumpy())

    grad = ms.grad(lambda inp: (block(inp)[0] * probe).sum(), grad_position=None, weights=[router])(x)[0].asnumpy()
    base = router.asnumpy().copy()
    eps = 1e-2
    for e, h in [(0, 0), (1, 3), (3, 7), (2, 11)]:
        plus, minus = base.copy(), base.copy()
        plus[e, h] += eps
        minus[e, h] -= eps
        router.set_data(Tensor(plus))
        up = loss()
        router.set_data(Tensor(minus))
        down = loss()
        router.set_data(Tensor(base))
        assert (up - down) / (2 * eps) == pytest.approx(grad[e, h], rel=2e-3, abs=1e-5)


def test_training_loss_adds_the_aux_loss():
    from telechat2_ms.train.loss import CausalLMLoss

    model = Telechat2ForCausalLM(TELE, seed=0)
    ids, _ = padded_batch(TELE, seed=4)
    mask = np.ones(ids.shape, np.float32)
    denominator = Tensor(np.float32(mask[:, 1:].sum()))
    with_aux = float(CausalLMLoss(model, *ids.shape)(to_tensor_ids(ids), Tensor(mask), denominator).asnumpy())
    plain = float(CausalLMLoss(model, *ids.shape, aux_weight=0.0)(to_tensor_ids(ids), Tensor(mask),
                                                                 denominator).asnumpy())
    aux = our_aux(model, ids, None)
    assert aux > 0 and with_aux == pytest.approx(plain + aux, rel=1e-6)


def test_moe_config_checks_and_hf_round_trip():
    assert get_config("telechat2_39b_a12b").num_parameters() == pytest.approx(39.3e9, rel=1e-2)
    assert get_config("qwen2_57b_a14b").num_parameters() == pytest.approx(57.4e9, rel=1e-2)
    assert QWEN.sparse_layers == (0, 2)
    assert ModelConfig.from_hf_config(QWEN.to_hf_config()).architecture() == QWEN.architecture()
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        QWEN.replace(num_experts_per_tok=5)
    with pytest.raises(ConfigError, match="moe_ffn_hidden_size"):
        QWEN.replace(moe_ffn_hidden_size=0)
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelConfig.from_hf_config(dict(QWEN.to_hf_config(), mlp_only_layers=[7]))


def test_train_step_accumulates_the_weighted_aux_loss_and_resets_it():
    from telechat2_ms.train.loss import CausalLMLoss, cast_batch
    from telechat2_ms.train.optim import AdamW
    from telechat2_ms.train.step import TrainStep

    model = Telechat2ForCausalLM(TELE, seed=0)
    params = list(model.trainable_params())
    step = TrainStep(CausalLMLoss(model, 3, 12, aux_weight=0.5), params, AdamW(params), use_jit=True)
    batches = [padded_batch(TELE, seed=s)[0] for s in (5, 6)]
    auxes = [our_aux(model, ids, None) for ids in batches]
    one = Tensor(np.float32(1.0))
    for ids in batches:
        mask = np.ones(ids.shape, np.float32)
        step.micro_step(*cast_batch(ids, mask), Tensor(np.float32(22.0)), one)
    assert float(step.take_aux_loss().asnumpy()) == pytest.approx(0.5 * sum(auxes), rel=1e-5)
    assert float(step.take_aux_loss().asnumpy()) == 0.0


def test_training_an_moe_model_logs_its_aux_loss(tmp_path):
    import json
    import re

    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import Trainer

    lines = []
    out = str(tmp_path / "out")
    settings = load_settings(None, ["--model=telechat2_moe_tiny", "--seq_length=64", "--train.train_dataset=demo:64",
                                    "--train.truncation=drop", "--train.batch_size=4", "--train.grad_accum_steps=2",
                                    "--train.total_steps=3", "--train.log_steps=1", f"--output_dir={out}"])
    Trainer(settings, printer=lines.append).train()
    with open(f"{out}/metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    # 2 sparse layers x coefficient 0.01 x E * sum_i f_i P_i, which lies in (0, E] (sum f = sum P = 1)
    assert len(records) == 3
    assert all(0 < r["aux_loss"] <= 0.02 * TELE.num_experts and r["aux_loss"] < r["loss"] for r in records)
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 3 and all(re.search(r"\| aux_loss \d\.\d{4}", line) for line in progress), progress


def _routed_block(cfg, seed=0):
    from telechat2_ms.layers import ParamInit, RoutedExperts

    block = RoutedExperts(cfg, ParamInit(seed, 0.25))
    rng = np.random.default_rng(seed + 1)
    for name, p in block.parameters_and_names():
        if name.endswith("bias"):
            p.set_data(Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    return block


def test_capacity_factor_keeps_each_experts_first_tokens_in_token_order():
    """moe_capacity_factor c: expert e takes at most C = ceil(c * k * N / E) of the tokens that chose it, the first
    ones in token order; a dropped (token, expert) pair contributes nothing. Against numpy of that rule (1e-5)."""
    import dataclasses

    cfg = dataclasses.replace(TELE, moe_capacity_factor=0.75)  # C = ceil(0.75 * 2 * 24 / 4) = 9
    block = _routed_block(cfg)
    x = np.random.default_rng(3).standard_normal((24, cfg.hidden_size)).astype(np.float32)
    out = block.route(Tensor(x))[0].asnumpy()
    state = {n: p.asnumpy() for n, p in block.parameters_and_names()}
    logits = x @ state["router.dense.weight"].T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, -1, kind="stable")[:, :cfg.num_experts_per_tok]
    weights = np.take_along_axis(probs, top, -1)
    weights /= weights.sum(-1, keepdims=True)  # TeleChat2-MoE renormalises
    capacity, want, kept = 9, np.zeros_like(x), 0
    for e in range(cfg.num_experts):
        chosen = [t for t in range(len(x)) if e in top[t]][:capacity]
        kept += len(chosen)
        for t in chosen:
            w1, w3 = state["ffn.w1.weight"][e], state["ffn.w3.weight"][e]
            gate, up = x[t] @ w1.T, x[t] @ w3.T
            y = (gate / (1 + np.exp(-gate)) * up) @ state["ffn.w2.weight"][e].T + state["ffn.w2.bias"][e]
            want[t] += weights[t, list(top[t]).index(e)] * y
    assert kept < 2 * len(x)  # some pairs were dropped
    assert np.abs(out - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_capacity_that_drops_nothing_equals_the_dropless_block_also_compiled():
    """With c = E / k every expert has a slot for every token: the capacity path (gather, experts on their slots,
    segment sum) gives the dropless output and gradients (1e-5), in PyNative and under ms.jit."""
    import dataclasses

    full = dataclasses.replace(TELE, moe_capacity_factor=TELE.num_experts / TELE.num_experts_per_tok)
    dropless, capped = _routed_block(TELE), _routed_block(full)
    x = Tensor(np.random.default_rng(4).standard_normal((2, 10, TELE.hidden_size)).astype(np.float32))
    results = []

    def loss_of(block):
        def loss(x):
            return ops.reduce_sum(block(x)[0] ** 2)
        return loss

    for block in (dropless, capped):
        params = ms.ParameterTuple(block.trainable_params())
        loss = loss_of(block)
        for step in (ms.value_and_grad(loss, 0, params), ms.jit(ms.value_and_grad(loss, 0, params))):
            value, (dx, grads) = step(x)
            results.append([value.asnumpy(), dx.asnumpy()] + [g.asnumpy() for g in grads])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(a).max())


def test_capacity_factor_is_a_run_setting_refused_for_a_dense_model(tmp_path):
    import run_telechat2

    args = ["--run_mode=finetune", "--train.train_dataset=demo:8", "--seq_length=64", "--moe_capacity_factor=1.25",
            "--dry_run"]
    assert run_telechat2.main(args + ["--model=telechat2_moe_tiny"]) == 0
    assert run_telechat2.main(args) == 2  # tiny is dense
