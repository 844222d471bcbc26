"""The Atlas 800T A2 cost model (telechat2_ms/cost_model.py) and the Atlas YAMLs it validates. Pure arithmetic,
no MindSpore: hand-checkable memory and FLOP terms, the shipped layouts fit in 64 GB, a layout known not to
fit is flagged, and the throughput check against MindFormers' published figures stays within 25%."""
import math
import re

import numpy as np
import pytest

from telechat2_ms import cost_model as cm
from telechat2_ms.config import ConfigError, get_config
from telechat2_ms.settings import load_settings

GIB = 1024 ** 3
S = 8192

# spec 2.2 "params (my count)"; 115B exact from model.safetensors.index.json total_size / 4 (fp32 shards).
SPEC_PARAMS = {"telechat2_3b": 3.07e9, "telechat2_7b": 7.62e9, "telechat2_35b": 35.44e9, "telechat2_115b": 113.28e9}


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS))
def test_parameter_count_matches_config_and_spec(name):
    cfg = get_config(name)
    full = sum(cm.stage_params_per_device(cfg, cm.Layout()))
    assert full == cfg.num_parameters()
    assert full == pytest.approx(SPEC_PARAMS[name], rel=5e-3)
    # A pipeline split without TP only moves parameters between stages.
    pp = 2 if cfg.num_layers % 4 else 4
    assert sum(cm.stage_params_per_device(cfg, cm.Layout(pp=pp, micro_batches=pp))) == full


@pytest.mark.parametrize("name,tp,pp", [("telechat2_7b", 4, 2), ("telechat2_115b", 8, 1), ("telechat2_115b", 16, 1),
                                         ("qwen2_7b", 4, 2), ("qwen2_7b", 8, 1), ("qwen2_72b", 16, 4),
                                         ("qwen2_0_5b", 1, 1), ("qwen2_0_5b", 2, 2), ("qwen2_tiny", 4, 1)])
def test_per_device_parameters_equal_the_plan_shards(name, tp, pp):
    """The cost model counts per device what parallel/plan.py gives each rank (kv heads replicated when tp
    exceeds them: qwen2_7b at tp8, 115B at tp16; q/k/v biases; tied embeddings, with the last stage's copy
    under pp), read from the lazy skeleton."""
    cfg = get_config(name)
    assert cm.stage_params_per_device(cfg, cm.Layout(tp=tp, pp=pp, micro_batches=pp)) == _planned(cfg, tp, pp)


def _planned(cfg, tp, pp, ep=1):
    """Parameters per rank of each stage as parallel/plan.py shards the lazy skeleton's parameters."""
    from telechat2_ms.model import Telechat2ForCausalLM
    from telechat2_ms.parallel.plan import param_stages, rank_shape, stage_layer_ranges

    shapes = {n: tuple(p.shape) for n, p in Telechat2ForCausalLM(cfg, init_zeros=True).parameters_and_names()}
    ranges = stage_layer_ranges(cfg.num_layers, pp)
    planned = [0] * pp
    for n, shape in shapes.items():
        count = int(np.prod(rank_shape(n, shape, tp, cfg.num_kv_heads, ep)))
        for stage in param_stages(n, ranges, cfg.tie_word_embeddings):
            planned[stage] += count
    return planned


def test_115b_parameter_count_is_exact():
    assert get_config("telechat2_115b").num_parameters() == 453_131_665_408 // 4


def test_weight_memory_is_two_bytes_per_parameter_over_tp_pp():
    cfg = get_config("telechat2_7b")
    P = cfg.num_parameters()
    single = cm.memory_per_device(cfg, cm.Layout(mode="infer"))
    assert single.weights == 2 * P
    train = cm.memory_per_device(cfg, cm.Layout(dp=8, optimizer_shard=True))
    assert (train.weights, train.grads, train.optimizer) == (2 * P, 4 * P, 12 * P / 8)
    for r in cm.memory_by_stage(cfg, cm.Layout(tp=2, pp=2, micro_batches=2, mode="train")):
        # only the 4H replicated norm/bias weights per layer break the exact 1/(tp*pp) split
        assert r.weights == pytest.approx(2 * P / 4, rel=1e-3)
    H, F = cfg.hidden_size, cfg.ffn_hidden_size
    assert cm.layer_params_per_device(cfg, 2) == (2 * H * H + 3 * H * F) // 2 + 2 * (H // 2) * H + 4 * H


def test_activation_terms_by_hand():
    cfg = get_config("telechat2_7b")  # H 4096, F 12288, 32 heads, MHA
    H, F, a = 4096, 12288, 32
    none = cm.layer_activation_bytes(cfg, cm.Layout(), "none")
    # Q, O, K, V (bf16) + FA stats (64 B/token/head) + 4 SwiGLU tensors + 2 fp32 residuals + 2 norm outputs
    assert none == S * (2 * H + 2 * H + 2 * 2 * H + 64 * a + 4 * 2 * F + 2 * 4 * H + 2 * 2 * H)
    sel = cm.layer_activation_bytes(cfg, cm.Layout(), "selective")
    assert none - sel == S * (2 * H + 2 * H + 2 * 2 * H + 64 * a)  # the attention block is recomputed
    # the plain kernels (CPU) keep the fp32 probabilities, q/sqrt(d) and RoPE's inputs and rotated halves
    plain = cm.layer_activation_bytes(cfg, cm.Layout(fused_kernels=False), "none")
    assert plain - none == S * (4 * S * a - 64 * a + 3 * 2 * H + 2 * 2 * H)
    assert cm.layer_activation_bytes(cfg, cm.Layout(fused_kernels=False), "selective") == sel
    assert cm.layer_activation_bytes(cfg, cm.Layout(tp=4, sp=True), "full") == 4 * S * H / 4
    # with SP everything is split over tp; without it the norm region (12 bytes per token and H) is replicated
    sp = cm.layer_activation_bytes(cfg, cm.Layout(tp=4, sp=True), "none")
    no_sp = cm.layer_activation_bytes(cfg, cm.Layout(tp=4, sp=False), "none")
    assert sp == pytest.approx(none / 4)
    assert no_sp - sp == pytest.approx(S * 12 * H * (1 - 1 / 4))


@pytest.mark.parametrize("recompute", cm.RECOMPUTE_MODES)
def test_activation_per_layer_matches_the_cpu_measurement(recompute):
    """The formula at the shapes research/bench_recompute_memory.py measured (PyNative, plain kernels, fp32):
    within 5% or one layer's parameter bytes (the gradients being produced may be in the measured figure)."""
    measured = cm.MEASURED_CPU_LAYER_ACTIVATION
    shapes = dict(measured["shapes"])
    lay = cm.Layout(micro_batch_size=shapes.pop("micro_batch_size"), seq_length=shapes.pop("seq_length"),
                    compute_dtype="float32", fused_kernels=False)
    model = cm.layer_activation_bytes(get_config("tiny", **shapes), lay, recompute)
    assert abs(model - measured[recompute]) <= max(0.05 * measured[recompute], measured["layer_param_bytes"])


def test_in_flight_micro_batches_1f1b():
    lay = cm.Layout(pp=4, micro_batches=32)
    assert [cm.in_flight_layer_units(lay, i, 16) for i in range(4)] == [64, 48, 32, 16]
    # Megatron's interleaved warm-up on stage 0: 2*(pp-1) + (v-1)*pp + 1 chunks of layers/v layers ...
    vpp = cm.Layout(pp=8, micro_batches=16, pp_interleave=3)
    assert cm.in_flight_layer_units(vpp, 0, 12) == (2 * 7 + 2 * 8 + 1) * 12 / 3
    # ... capped by the m*v chunks that exist (MindFormers' 115B: 8 micro-batches x 3 chunks)
    assert cm.in_flight_layer_units(cm.Layout(pp=8, micro_batches=8, pp_interleave=3), 0, 12) == 8 * 12


def test_kv_cache_by_hand():
    big = get_config("telechat2_115b")  # GQA: 8 kv heads of 128, one per rank at tp8
    mem = cm.memory_per_device(big, cm.Layout(tp=8, mode="infer"))
    assert mem.kv_cache == 2 * 96 * S * 128 * 2
    small = cm.memory_per_device(get_config("telechat2_7b"), cm.Layout(mode="infer"))
    assert small.kv_cache == 2 * 30 * S * 4096 * 2


def test_flops_by_hand():
    cfg = get_config("telechat2_7b")
    H, F, L, V = 4096, 12288, 30, 131072
    N = L * (4 * H * H + 3 * H * F) + H * V  # layer matmul weights (MHA: wk_v is 2H x H) + lm_head
    assert cm.model_flops_per_token(cfg, S) == 6 * N + 3 * L * 2 * S * H


def test_known_misfit_is_flagged():
    big = get_config("telechat2_115b")
    mem = cm.memory_per_device(big, cm.Layout(dp=8, recompute="full", optimizer_shard=True))
    assert not mem.fits()
    assert mem.total > 800 * GIB
    # MindFormers' 7B layout relies on sharded weights/grads; with our ZeRO-1 it does not fit
    assert not cm.memory_per_device(get_config("telechat2_7b"), cm.MINDFORMERS_LAYOUTS["telechat2_7b"]).fits()


def test_bad_layouts_raise_config_error():
    cfg = get_config("telechat2_7b")
    with pytest.raises(ConfigError, match="num_heads"):
        cm.memory_per_device(cfg, cm.Layout(tp=3))
    with pytest.raises(ConfigError, match="pipeline_layer_counts"):
        cm.memory_per_device(cfg, cm.Layout(pp=2, micro_batches=2, layer_counts=(10, 10)))
    with pytest.raises(ConfigError, match="micro_batches"):
        cm.step_time(cfg, cm.Layout(pp=4, micro_batches=2))


@pytest.mark.parametrize("path", cm.shipped_atlas_configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_atlas_yaml_fits_and_matches_its_comment(path):
    settings = load_settings(str(path))  # strict: unknown keys raise
    assert settings.model == path.parent.name
    assert settings.run_mode == path.stem
    assert (settings.seq_length, settings.compute_dtype, settings.device_target) == (8192, "bfloat16", "Ascend")
    assert settings.use_fused_kernels
    entry = cm.evaluate_config(path)
    mem, lay = entry["memory"], entry["layout"]
    assert mem.fits()
    assert mem.total + cm.ATLAS_800T_A2.reserved_bytes <= 64 * GIB
    text = path.read_text(encoding="utf-8")
    stated = float(re.search(r"\(telechat2_ms/cost_model\.py[^)]*\): (\d+\.\d) GiB", text).group(1))
    assert stated == pytest.approx(mem.total / GIB, abs=0.05)
    workers = re.search(r"--worker_num=(\d+)", text)
    assert (int(workers.group(1)) if workers else 1) == lay.devices


def test_throughput_check_against_mindformers():
    assert cm.calibrated_efficiency() == pytest.approx(0.5881, abs=1e-3)
    rows = {r["model"]: r for r in cm.validation_rows()}
    # 39B-A12B: MindFormers' routed experts (capacity 1.2, all-to-all) on its dp128 ep2 mp4 pp2 layout, the
    # micro-batch count, recompute and sequence length assumed (cost_model.MINDFORMERS_LAYOUTS)
    expected = {"telechat2_7b": 2950.0, "telechat2_35b": 450.0, "telechat2_115b": 162.3, "telechat2_39b_a12b": 665.3}
    for model, value in expected.items():
        assert rows[model]["predicted"] == pytest.approx(value, rel=2e-3)
        assert abs(rows[model]["error"]) < 0.25
    assert [r["role"] for r in rows.values()] == ["fit", "held out", "held out", "held out"]


def test_shipped_finetune_throughputs():
    tps = {p.parent.name: cm.evaluate_config(p)["time"].tokens_per_s_per_device
           for p in cm.shipped_atlas_configs() if p.stem == "finetune"}
    assert tps == pytest.approx({"telechat2_7b": 2796, "telechat2_35b": 450, "telechat2_115b": 156.7,
                                 "telechat2_39b_a12b": 456.4}, rel=2e-3)


def test_cli_all_prints_tables(capsys):
    assert cm.main(["--all"]) == 0
    out = capsys.readouterr().out
    assert "configs/telechat2_115b/finetune.yaml" in out and "held out" in out
    assert cm.main(["--model", "telechat2_115b", "--dp", "8"]) == 0
    assert " NO " in capsys.readouterr().out


@pytest.mark.parametrize("name,tp,ep,pp", [("telechat2_39b_a12b", 1, 1, 1), ("telechat2_39b_a12b", 4, 8, 1),
                                            ("qwen2_57b_a14b", 4, 2, 1), ("qwen2_moe_tiny", 2, 2, 1),
                                            ("qwen2_moe_tiny", 1, 1, 3), ("telechat2_moe_tiny", 2, 4, 2)])
def test_moe_parameters_per_device_equal_the_plan_shards(name, tp, ep, pp):
    """Mixture of experts: per device, the whole router, E/ep experts split over tp (down biases whole), Qwen2's
    shared expert split over tp and its gate whole; dense layers (mlp_only_layers) as before; at tp = ep = 1 the
    total is ModelConfig.num_parameters (39B-A12B: 39.3e9, 57B-A14B: 57.4e9)."""
    cfg = get_config(name)
    planned = _planned(cfg, tp, pp, ep)
    lay = cm.Layout(dp=ep, ep=ep, tp=tp, pp=pp, micro_batches=pp)
    assert cm.stage_params_per_device(cfg, lay) == planned
    if tp == ep == pp == 1:
        assert sum(planned) == cfg.num_parameters()


def test_moe_flops_count_the_chosen_experts_and_the_dense_dispatch_its_extra_work():
    """6N counts the k experts a token meets (the model's own FLOPs: MFU); the time model prices what runs: with this
    port's dense dispatch every expert of an ep rank on each row sent to it (a token goes to each rank holding one
    of its k experts: under uniform routing 1 - C(E - E/ep, k) / C(E, k) of the tokens per rank), k x capacity
    routed; a dense model is unchanged by the MoE terms."""
    cfg = get_config("telechat2_39b_a12b")
    H, E, k, Fe = cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_ffn_hidden_size
    attention = 2 * H * H + 2 * cfg.kv_dim * H
    assert cm.matmul_params_per_layer(cfg) == attention + E * H + k * 3 * H * Fe
    assert cm.matmul_params_per_layer(cfg, 0, E) == attention + E * H + E * 3 * H * Fe
    lay = cm.Layout(dp=16, ep=8, tp=4, recompute="full")
    hit = 1 - math.comb(E - E // 8, k) / math.comb(E, k)  # 16 experts top-4 over ep8: 0.45
    assert cm.expert_rows_per_token(cfg, lay) == pytest.approx(8 * hit)
    assert cm.expert_pairs_per_token(cfg, lay) == pytest.approx(E * hit)
    assert cm.expert_pairs_per_token(cfg, cm.Layout(dp=16, recompute="full")) == E  # one rank holds every expert
    routed_lay = cm.Layout(dp=16, ep=8, tp=4, recompute="full", moe_dispatch="routed", capacity_factor=1.2)
    assert cm.expert_pairs_per_token(cfg, routed_lay) == pytest.approx(k * 1.2)
    dense, routed = cm.step_time(cfg, lay), cm.step_time(cfg, routed_lay)
    assert dense.compute > 1.2 * routed.compute and dense.mfu < routed.mfu
    assert dense.ep_comm > 0 and routed.ep_comm > 0
    qwen = get_config("qwen2_moe_tiny")  # layer 1 dense
    assert cm.matmul_params_per_layer(qwen, 1) == 2 * 64 * 64 + 2 * qwen.kv_dim * 64 + 3 * 64 * qwen.ffn_hidden_size


def test_moe_layouts_that_cannot_work_are_refused():
    cfg = get_config("telechat2_39b_a12b")
    with pytest.raises(ConfigError, match="ep=3 must divide dp=6 and num_experts=16"):
        cm.validate(cfg, cm.Layout(dp=6, ep=3))
    with pytest.raises(ConfigError, match="ep=2 must divide dp=1"):
        cm.validate(cfg, cm.Layout(ep=2))
    with pytest.raises(ConfigError, match="ep=2 must divide dp=2 and num_experts=0"):
        cm.validate(get_config("telechat2_7b"), cm.Layout(dp=2, ep=2))
