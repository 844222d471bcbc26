"""Training data: official SFT jsonl and pretraining jsonl -> packed, loss-masked, memory-mapped datasets.

sources.py (jsonl reading, data mix), sft.py (spec 6.2 layout, packing and loss mask), pretrain.py (EOS-joined
chunks), dataset.py (on-disk storage and preprocessing cache), sampler.py (seeded, data-parallel sharding).
"""
from telechat2_ms.data.dataset import TokenDataset, build_dataset, prepare_dataset
from telechat2_ms.data.sampler import ShardedSampler
from telechat2_ms.data.sft import SftEncoder, official_loss_mask, parse_sft_record
from telechat2_ms.data.sources import DataError, Source, resolve_sources

__all__ = ["DataError", "ShardedSampler", "SftEncoder", "Source", "TokenDataset", "build_dataset",
           "official_loss_mask", "parse_sft_record", "prepare_dataset", "resolve_sources"]
