"""ParallelDims validation and rank/group maps, the 1F1B timetable, and the whole parallel training path
in one process (world of 1: every collective is the identity) against the plain model."""
import numpy as np
import pytest

import mindspore as ms

from telechat2_ms.build import synchronous_cpu_runtime
from telechat2_ms.config import ConfigError, get_config
from telechat2_ms.parallel.dims import ParallelDims
from telechat2_ms.parallel.pipeline import one_f_one_b, timetable
from telechat2_ms.settings import ParallelSettings


def test_world_size_and_degrees_are_checked():
    assert ParallelDims(dp=2, tp=2, pp=2, micro_batch_num=2).world == 8
    with pytest.raises(ConfigError, match=r"= 4, but the world has 8"):
        ParallelDims(dp=2, tp=2, world=8)
    with pytest.raises(ConfigError, match="tp must be a positive|parallel tp must be a positive integer"):
        ParallelDims(tp=0)
    with pytest.raises(ConfigError, match="micro_batch_num \\(2\\) must be >= pipeline_stage \\(4\\)"):
        ParallelDims(pp=4, micro_batch_num=2)
    with pytest.raises(ConfigError, match="use_seq_parallel with context_parallel"):
        ParallelDims(tp=2, cp=2, sp=True)
    with pytest.raises(ConfigError, match="msrun started 2"):
        ParallelDims(tp=4).check_world(2)


def test_model_divisibility_messages():
    tiny = get_config("tiny")  # 4 heads, 2 kv heads, vocab 1024, ffn 160, 2 layers
    ParallelDims(tp=2, pp=2, micro_batch_num=2).check_model(tiny)
    ParallelDims(tp=4).check_model(tiny)  # 2 kv heads at tp4: a copy of each on 2 ranks (parallel/plan.py)
    with pytest.raises(ConfigError, match="num_kv_heads 4 .* not divisible by tp=6, nor tp by it"):
        ParallelDims(tp=6).check_model(get_config("tiny", num_heads=12, num_kv_heads=4, hidden_size=192))
    ParallelDims(tp=2).check_model(get_config("qwen2_tiny"))  # tied embeddings under tensor parallel
    ParallelDims(pp=2, micro_batch_num=2).check_model(get_config("qwen2_tiny"))  # and across stages (a copy)
    with pytest.raises(ConfigError, match="2 layers cannot fill 4 pipeline stages"):
        ParallelDims(pp=4, micro_batch_num=4).check_model(tiny)
    with pytest.raises(ConfigError, match="sum to 3"):
        ParallelDims(pp=2, micro_batch_num=2, pipeline_layer_counts=(1, 2)).check_model(tiny)
    big = get_config("telechat2_35b")
    assert ParallelDims(pp=4, micro_batch_num=4, pipeline_layer_counts=(15, 17, 17, 15)).stage_layer_ranges(
        big.num_layers) == [(0, 15), (15, 32), (32, 49), (49, 64)]


def test_batch_checks():
    with pytest.raises(ConfigError, match="divisible by 2 x context_parallel"):
        ParallelDims(cp=2).check_batch(2, 6)
    with pytest.raises(ConfigError, match="not divisible by micro_batch_num 4"):
        ParallelDims(dp=2, pp=2, micro_batch_num=4).check_batch(4, 16)
    with pytest.raises(ConfigError, match="batch size 3 is not divisible by data_parallel 2"):
        ParallelDims(dp=2).check_batch(3, 16)


def test_from_settings():
    dims = ParallelDims.from_settings(ParallelSettings(data_parallel=2, model_parallel=4, pipeline_stage=2,
                                                       micro_batch_num=4, use_seq_parallel=True), world=16)
    assert (dims.dp, dims.tp, dims.pp, dims.micro_batch_num, dims.seq_parallel) == (2, 4, 2, 4, True)


def test_rank_coordinates_and_groups():
    dims = ParallelDims(dp=2, tp=2, pp=2, cp=2, micro_batch_num=2)  # 16 ranks, tp fastest
    assert dims.coords(0) == (0, 0, 0, 0)
    assert dims.coords(13) == (1, 1, 0, 1)
    assert all(dims.rank_of(*dims.coords(r)) == r for r in range(16))
    assert dims.group_ranks("tp", 5) == [4, 5]
    assert dims.group_ranks("cp", 5) == [5, 7]
    assert dims.group_ranks("dp", 5) == [1, 5]
    assert dims.group_ranks("pp", 5) == [5, 13]
    assert dims.group_ranks("grad", 5) == [1, 3, 5, 7]
    assert dims.group_ranks("embed", 5) == [5, 13]  # first and last stage at the same dp, cp, tp
    three = ParallelDims(pp=3, micro_batch_num=3)
    assert [three.group_ranks("embed", r) for r in range(3)] == [[0, 2], [1], [0, 2]]  # the middle stage: alone
    for kind in ("tp", "cp", "dp", "pp", "grad", "embed"):
        groups = dims.all_groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(16))  # a partition of the world


@pytest.mark.parametrize("pp,m", [(1, 3), (2, 4), (4, 4), (4, 8), (3, 5)])
def test_one_f_one_b_timetable(pp, m):
    table = timetable(pp, m)
    assert len(table) == 2 * (m + pp - 1)  # the 1F1B makespan with unit-time steps
    for stage in range(pp):
        steps = [row[stage] for row in table if row[stage] is not None]
        assert steps == one_f_one_b(stage, pp, m)
        in_flight, peak = 0, 0
        for kind, _ in steps:
            in_flight += 1 if kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == min(pp - stage, m)  # 1F1B memory bound
    done = {}
    for tick, row in enumerate(table):  # dependencies: activations forward, gradients backward
        for stage, step in enumerate(row):
            if step is None:
                continue
            kind, i = step
            if kind == "F" and stage > 0:
                assert done[("F", stage - 1, i)] < tick
            if kind == "B" and stage < pp - 1:
                assert done[("B", stage + 1, i)] < tick
            done[(kind, stage, i)] = tick


def test_single_process_parallel_step_matches_plain_model():
    """World of 1 with 2 micro-batches: the parallel code path (vocab-parallel embedding/CE, region norms,
    pipeline executor with recompute, global-norm clipping) gives the plain model's loss, gradient norm and
    clipped SGD update."""
    from telechat2_ms.train.optim import clip_coefficient
    from telechat2_ms.parallel.parallelize import parallelize_telechat2
    from tests.msrun import parallel_cases as pc

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    ref_loss, ref_norm, reference = pc.reference_step()
    assert ref_norm > pc.CLIP  # the clip is active
    initial = pc.initial_state()
    parallel = parallelize_telechat2(pc.build_model(), ParallelDims(micro_batch_num=2))
    loss, grads = parallel.forward_backward(*pc.make_batch())
    norm = parallel.grad_norm(grads)
    pc.sgd_step(parallel.params, pc.clipped_grads(grads, clip_coefficient(norm, pc.CLIP)), pc.LR)
    state = parallel.local_state()
    assert abs(loss - ref_loss) / ref_loss <= 1e-5
    assert abs(norm - ref_norm) / ref_norm <= 1e-5
    assert sorted(state) == sorted(reference)
    for name, want in reference.items():
        assert pc.max_update_diff(state[name], want, initial[name]) <= 1e-4, name


def test_single_process_adamw_step_matches_plain_model():
    """nn.AdamWeightDecay over the parallel parameters and gradients equals AdamW on the plain model."""
    from mindspore import nn

    from telechat2_ms.parallel.parallelize import parallelize_telechat2
    from tests.msrun import parallel_cases as pc

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    plain = pc.build_model()
    optimizer = nn.AdamWeightDecay(plain.trainable_params(), learning_rate=1e-3, weight_decay=0.1)
    loss_fn = pc.reference_loss_fn(plain)
    _, grads = ms.value_and_grad(loss_fn, None, weights=plain.trainable_params())()
    optimizer(grads)
    reference = {name: p.asnumpy() for name, p in plain.parameters_and_names()}

    parallel = parallelize_telechat2(pc.build_model(), ParallelDims())
    par_optimizer = nn.AdamWeightDecay(parallel.params, learning_rate=1e-3, weight_decay=0.1)
    _, par_grads = parallel.forward_backward(*pc.make_batch())
    par_optimizer(tuple(par_grads))
    state = parallel.local_state()
    for name, want in reference.items():
        assert pc.max_rel_diff(state[name], want) <= 1e-5, name


def test_parallel_adamw_in_one_process_matches_trainer_adamw():
    """ParallelAdamW (world 1, so no sharding) equals train/optim.AdamW over two clipped steps."""
    from telechat2_ms.parallel.parallelize import parallelize_telechat2
    from tests.msrun import parallel_cases as pc

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    ref_losses, ref_norms, reference = pc.reference_adamw()
    parallel = parallelize_telechat2(pc.build_model(), ParallelDims(optimizer_shard=True))
    a = pc.ADAMW
    optimizer = pc.make_adamw(parallel)
    for step in range(1, pc.ADAMW_STEPS + 1):
        loss, norm = pc.adamw_step(parallel, pc.make_batch(), optimizer, step)
        assert abs(loss - ref_losses[step - 1]) / ref_losses[step - 1] <= 1e-5
        assert abs(norm - ref_norms[step - 1]) / ref_norms[step - 1] <= 1e-5
    state = parallel.local_state()
    for name, want in reference.items():
        assert pc.max_rel_diff(state[name], want) <= 1e-4, name


def test_trainer_batches_become_next_token_batches():
    from telechat2_ms.train.engine import next_token_batch

    ids = np.array([[5, 6, 7]])
    mask = np.array([[0, 1, 1]], np.float32)
    inputs, labels, loss_mask = next_token_batch(ids, mask)
    assert inputs.tolist() == [[5, 6, 7]] and labels.tolist() == [[6, 7, 0]]
    assert loss_mask.tolist() == [[1, 1, 0]]


def test_parallel_engine_step_without_targets_is_finite():
    """A step whose rows were all truncated before their answers (loss mask all zero) has loss 0 and makes no
    update, as in the local engine; it used to divide 0 by 0 (NaN, found on the 3B cut under tp2)."""
    from types import SimpleNamespace

    from telechat2_ms.parallel.parallelize import parallelize_telechat2
    from telechat2_ms.train.engine import ParallelEngine
    from tests.msrun import parallel_cases as pc

    ms.set_device("CPU")
    synchronous_cpu_runtime()
    parallel = parallelize_telechat2(pc.build_model(), ParallelDims())
    before = parallel.local_state()
    from telechat2_ms.train.optim import DynamicLossScaler

    engine = SimpleNamespace(parallel=parallel, optimizer=pc.make_adamw(parallel), scaler=DynamicLossScaler(False),
                             settings=SimpleNamespace(train=SimpleNamespace(grad_clip=1.0)))
    ids = pc.make_batch()[0]
    record = ParallelEngine.step(engine, [(ids, np.zeros(ids.shape, np.float32))], 1, 1e-2)
    assert record["loss"] == 0.0 and record["grad_norm"] == 0.0 and not record["skipped"]
    after = parallel.local_state()
    assert all(np.array_equal(before[k], after[k]) for k in before if "norm" in k or "bias" in k)
