"""On-disk datasets (memory-mapped arrays + index.json), the preprocessing cache, data-mix resampling and the
seeded, data-parallel, resumable sampler."""
import json
import os

import numpy as np
import pytest

from telechat2_ms.data.dataset import TokenDataset, build_dataset, mix_order, prepare_dataset
from telechat2_ms.data.sampler import ShardedSampler
from telechat2_ms.data.sft import SftEncoder, read_sft_records
from telechat2_ms.data.sources import DataError, Source, resolve_sources
from telechat2_ms.data.demo_corpus import write_sft_jsonl
from telechat2_ms.tokenizer import Telechat2Tokenizer


@pytest.fixture
def demo_jsonl(tmp_path):
    return write_sft_jsonl(str(tmp_path / "demo.jsonl"), 60)


def test_dataset_round_trip_matches_the_encoder(demo_jsonl):
    tok = Telechat2Tokenizer.demo()
    expected = list(SftEncoder(tok, 256).encode_records(read_sft_records(demo_jsonl)))
    ds = build_dataset([Source(demo_jsonl)], "ds", tok, 256)
    again = TokenDataset("ds")
    assert len(again) == again.num_samples == len(expected)
    for i, sample in enumerate(expected):
        ids, mask = again.sample(i)
        np.testing.assert_array_equal(ids, sample.ids)
        np.testing.assert_array_equal(mask, sample.mask)
    ids, mask = again.batch([2, 0])
    assert ids.shape == mask.shape == (2, 256) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[1, :len(expected[0].ids)], expected[0].ids)
    assert (ids[1, len(expected[0].ids):] == tok.pad_id).all() and mask[1, len(expected[0].ids):].sum() == 0
    np.testing.assert_array_equal(again.lengths([0, 2]), [len(expected[0].ids), len(expected[2].ids)])
    index = json.load(open("ds/index.json", encoding="utf-8"))
    assert index["num_tokens"] == sum(len(s.ids) for s in expected)
    assert index["num_target_tokens"] == sum(int(s.mask[1:].sum()) for s in expected)
    assert sorted(os.listdir("ds")) == ["index.json", "input_ids.bin", "lengths.bin", "loss_mask.bin", "order.bin"]
    assert ds.kind == "sft" and not [d for d in os.listdir(".") if d.startswith(".building")]


def test_prepare_dataset_caches_and_checks(demo_jsonl):
    tok = Telechat2Tokenizer.demo()
    first = prepare_dataset(demo_jsonl, tok, 256, cache_root="cache")
    assert os.path.dirname(first.directory) == "cache" and len(os.listdir("cache")) == 1
    mtime = os.path.getmtime(os.path.join(first.directory, "index.json"))
    second = prepare_dataset(demo_jsonl, tok, 256, cache_root="cache")  # reused, not rebuilt
    assert second.directory == first.directory
    assert os.path.getmtime(os.path.join(second.directory, "index.json")) == mtime
    assert prepare_dataset(demo_jsonl, tok, 128, "sft", "drop", cache_root="cache").directory != first.directory
    # a preprocessed directory can be passed directly, but must fit the run
    assert len(prepare_dataset(first.directory, tok, 256)) == len(first)
    with pytest.raises(DataError, match="has seq_length 256, the run uses 512"):
        prepare_dataset(first.directory, tok, 512)
    with pytest.raises(DataError, match="holds sft data, the run expects pretrain"):
        prepare_dataset(first.directory, tok, 256, "pretrain")


def test_data_mix_resamples_by_weight(tmp_path):
    a = write_sft_jsonl(str(tmp_path / "a.jsonl"), 20, seed=1)
    b = write_sft_jsonl(str(tmp_path / "b.jsonl"), 20, seed=2)
    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"a.jsonl": 2.5, "b.jsonl": 0.5}), encoding="utf-8")
    sources = resolve_sources(str(mix))
    assert [(os.path.basename(s.path), s.weight) for s in sources] == [("a.jsonl", 2.5), ("b.jsonl", 0.5)]
    ds = build_dataset(sources, "mixed", Telechat2Tokenizer.demo(), 512, mix_seed=7)
    n_a, n_b = [s["samples"] for s in ds.index["sources"]]
    order = np.fromfile("mixed/order.bin", np.int64)
    assert len(order) == int(2.5 * n_a) + int(0.5 * n_b)
    from_a = order[order < n_a]
    assert np.bincount(from_a, minlength=n_a).min() >= 2  # every a sample at least twice (cycling)
    assert len(set(order[order >= n_a].tolist())) == int(0.5 * n_b)  # half of b, no repeats
    np.testing.assert_array_equal(mix_order([n_a, n_b], [2.5, 0.5], 7), order)
    assert not np.array_equal(mix_order([n_a, n_b], [2.5, 0.5], 8), order)
    mix.write_text(json.dumps({"a.jsonl": 0}), encoding="utf-8")
    with pytest.raises(DataError, match="weight of 'a.jsonl' must be a positive number"):
        resolve_sources(str(mix))


def test_sampler_is_seeded_sharded_and_resumable():
    full = ShardedSampler(10, batch_size=4, rank=0, world=1, seed=3)
    stream = [full.next_batch() for _ in range(5)]  # 20 ids: two epochs
    assert sorted(sum(stream[:2], []) + stream[2][:2]) == list(range(10))  # epoch 1 is a permutation
    assert sum(stream, [])[:10] != list(range(10))  # shuffled
    ranks = [ShardedSampler(10, batch_size=2, rank=r, world=2, seed=3) for r in range(2)]
    for step in range(5):  # rank r gets the r-th half of each global batch of 4, never the same ids
        got = [s.next_batch() for s in ranks]
        assert got[0] + got[1] == stream[step]
    assert all(s.consumed == 20 for s in ranks)
    resumed = ShardedSampler(10, batch_size=4, seed=3)
    resumed.load_state_dict({"consumed": 8, "seed": 3, "num_entries": 10, "global_batch": 4})
    assert [resumed.next_batch() for _ in range(3)] == stream[2:]
    with pytest.raises(ValueError, match="num_entries=11, this run has 10"):
        resumed.load_state_dict({"consumed": 8, "seed": 3, "num_entries": 11})
    assert ShardedSampler(10, 4, seed=4).next_batch() != stream[0]
    with pytest.raises(ValueError, match="rank 2 is not in a data-parallel world of size 2"):
        ShardedSampler(10, 2, rank=2, world=2)


def test_source_resolution_errors(tmp_path, demo_jsonl):
    assert [s.path for s in resolve_sources(str(tmp_path))] == [os.path.abspath(demo_jsonl)]
    os.makedirs("nothing")
    with pytest.raises(DataError, match="training data directory nothing holds no .jsonl files"):
        resolve_sources("nothing")
    both = resolve_sources(f"{demo_jsonl},{demo_jsonl}")
    assert len(both) == 2


def test_preprocessing_cli(demo_jsonl, capsys):
    from telechat2_ms.data.__main__ import main

    assert main(["--input", demo_jsonl, "--output", "pre", "--seq_length", "256"]) == 0
    assert "TokenDataset('pre', kind=sft" in capsys.readouterr().out
    assert len(prepare_dataset("pre", Telechat2Tokenizer.demo(), 256)) == TokenDataset("pre").num_samples
    assert main(["--input", demo_jsonl, "--output", "pre", "--seq_length", "256"]) == 2
    assert "dataset directory pre already exists" in capsys.readouterr().err
