"""Preprocessed training data on disk (memory-mapped numpy arrays + a json index), built once and reused.

Layout of a dataset directory:
    index.json       format version, kind (sft | pretrain), seq_length, pad id, counts, sources, tokenizer hash
    input_ids.bin    int32 [N, S]  samples right-padded with the pad id to S = seq_length
    loss_mask.bin    uint8 [N, S]  1 where the token is a target (module docstrings of sft.py / pretrain.py)
    lengths.bin      int32 [N]     real tokens per sample
    order.bin        int64 [M]     the dataset as the sampler sees it: sample ids after data-mix resampling
The arrays are raw little-endian files opened with `numpy.memmap` (shapes in index.json), so a dataset of any
size costs no memory until a batch is read; samples are written while tokenizing (streaming).

Data mix (spec 6.1): a source with weight w and n samples contributes int(w * n) entries to `order`, taken by
cycling through seeded permutations of its samples (the newer OFF-DS `sample_data_by_weights`); weight 1
keeps every sample once, in order.

`prepare_dataset` turns `train.train_dataset` into a TokenDataset: a directory holding index.json is opened
as is; jsonl / MindRecord (data/mindrecord.py) / mix sources are preprocessed into
`<cache_root>/<kind>-<fingerprint>/` and reused while the files (path, size, mtime), tokenizer, seq_length,
truncation policy and mix seed are unchanged. Building
writes a temporary directory and renames it into place, so concurrent builders (several data-parallel ranks)
and interrupted builds never leave a half-written dataset behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from telechat2_ms.data.mindrecord import read_mindrecord
from telechat2_ms.data.pretrain import encode_pretrain_file
from telechat2_ms.data.sft import SftEncoder, encode_sft_file
from telechat2_ms.data.sources import DataError, Source, resolve_sources
from telechat2_ms.formats.atomic import make_temp_dir

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
KINDS = ("sft", "pretrain")
_ARRAYS = {"input_ids": np.int32, "loss_mask": np.uint8, "lengths": np.int32, "order": np.int64}


class TokenDataset:
    """A preprocessed dataset directory (see the module docstring). len() is the number of order entries."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise DataError(f"{directory} is not a preprocessed dataset (no {INDEX_FILE})")
        try:
            with open(index_path, encoding="utf-8") as f:
                self.index: Dict[str, Any] = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read {index_path}: {err}") from None
        if self.index.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{index_path}: format_version {self.index.get('format_version')!r}, expected "
                            f"{FORMAT_VERSION}; delete the directory to rebuild it")
        self.directory = directory
        self.kind: str = self.index["kind"]
        self.seq_length: int = int(self.index["seq_length"])
        self.pad_id: int = int(self.index["pad_id"])
        n, s, m = int(self.index["num_samples"]), self.seq_length, int(self.index["num_entries"])
        shapes = {"input_ids": (n, s), "loss_mask": (n, s), "lengths": (n,), "order": (m,)}
        self._arrays = {}
        for name, dtype in _ARRAYS.items():
            path = os.path.join(directory, name + ".bin")
            expected = int(np.prod(shapes[name])) * np.dtype(dtype).itemsize
            if not os.path.isfile(path) or os.path.getsize(path) != expected:
                raise DataError(f"{path} is missing or has the wrong size (expected {expected} bytes); "
                                "delete the dataset directory to rebuild it")
            self._arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shapes[name]) if expected else \
                np.zeros(shapes[name], dtype)

    def __len__(self) -> int:
        return int(self.index["num_entries"])

    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    def sample(self, entry: int) -> Tuple[np.ndarray, np.ndarray]:
        """(ids [L] int32, mask [L] uint8) of order entry `entry`, without padding."""
        i = int(self._arrays["order"][entry])
        length = int(self._arrays["lengths"][i])
        return np.array(self._arrays["input_ids"][i, :length]), np.array(self._arrays["loss_mask"][i, :length])

    def batch(self, entries: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
        """Padded (ids [B,S] int32, mask [B,S] uint8) for order entries."""
        rows = self._arrays["order"][np.asarray(entries, np.int64)]
        return np.array(self._arrays["input_ids"][rows]), np.array(self._arrays["loss_mask"][rows])

    def lengths(self, entries: Sequence[int]) -> np.ndarray:
        """Real (unpadded) lengths [B] of order entries."""
        return np.array(self._arrays["lengths"][self._arrays["order"][np.asarray(entries, np.int64)]])

    def __repr__(self) -> str:
        return (f"TokenDataset({self.directory!r}, kind={self.kind}, samples={self.num_samples}, "
                f"entries={len(self)}, seq_length={self.seq_length})")


# ---- building ------------------------------------------------------------------------------------------
class _Writer:
    """Streams padded samples into the .bin files of a directory."""

    def __init__(self, directory: str, seq_length: int, pad_id: int):
        self.seq_length, self.pad_id = seq_length, pad_id
        self.files = {name: open(os.path.join(directory, name + ".bin"), "wb")
                      for name in ("input_ids", "loss_mask", "lengths")}
        self.count = 0
        self.tokens = 0
        self.targets = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        row = np.full(self.seq_length, self.pad_id, np.int32)
        row[:len(ids)] = ids
        mrow = np.zeros(self.seq_length, np.uint8)
        mrow[:len(mask)] = mask
        self.files["input_ids"].write(row.tobytes())
        self.files["loss_mask"].write(mrow.tobytes())
        self.files["lengths"].write(np.int32(len(ids)).tobytes())
        self.count += 1
        self.tokens += len(ids)
        self.targets += int(mask[1:].sum())  # mask[0] can never be predicted

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def mix_order(counts: Sequence[int], weights: Sequence[float], seed: int) -> np.ndarray:
    """Order entries (sample ids) after resampling each source by its weight (module docstring)."""
    order, start = [], 0
    for source_id, (n, weight) in enumerate(zip(counts, weights)):
        ids = np.arange(start, start + n, dtype=np.int64)
        start += n
        if n == 0:
            continue
        if weight == 1.0:
            order.append(ids)
            continue
        total = int(n * weight)
        rng = np.random.default_rng([seed, source_id])
        cycles = [ids[rng.permutation(n)] for _ in range(-(-total // n))]
        order.append(np.concatenate(cycles)[:total])
    return np.concatenate(order) if order else np.zeros(0, np.int64)


def build_dataset(sources: Sequence[Source], out_dir: str, tokenizer, seq_length: int, kind: str = "sft",
                  truncation: str = "error", mix_seed: int = 0, extra_index: Optional[Dict[str, Any]] = None
                  ) -> TokenDataset:
    """Tokenize `sources` into a new dataset directory `out_dir` (must not exist; written atomically)."""
    if kind not in KINDS:
        raise DataError(f"data format must be one of {KINDS}, got {kind!r}")
    if os.path.exists(out_dir):
        raise DataError(f"dataset directory {out_dir} already exists")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(out_dir)
    try:
        writer = _Writer(tmp, seq_length, tokenizer.pad_id)
        counts, per_source = [], []
        encoder = SftEncoder(tokenizer, seq_length, truncation) if kind == "sft" else None
        try:
            for source in sources:
                before = writer.count
                if source.path.endswith(".mindrecord"):  # MindFormers' rows, tokenized already
                    samples = read_mindrecord(source.path, seq_length, tokenizer.vocab_size, tokenizer.pad_id)
                elif encoder is not None:
                    samples = encode_sft_file(source.path, encoder)
                else:
                    samples = encode_pretrain_file(source.path, tokenizer, seq_length)
                for sample in samples:
                    writer.add(sample.ids, sample.mask)
                counts.append(writer.count - before)
                per_source.append(dict(source.fingerprint(), samples=counts[-1]))
        finally:
            writer.close()
        order = mix_order(counts, [s.weight for s in sources], mix_seed)
        if len(order) == 0:
            detail = ""
            if encoder is not None and encoder.stats.dropped:
                detail = f" ({len(encoder.stats.dropped)} sample(s) longer than seq_length {seq_length} dropped)"
            raise DataError("empty dataset: no training samples in " + ", ".join(s.path for s in sources) + detail)
        order.tofile(os.path.join(tmp, "order.bin"))
        index = {
            "format_version": FORMAT_VERSION, "kind": kind, "seq_length": seq_length, "pad_id": tokenizer.pad_id,
            "num_samples": writer.count, "num_entries": int(len(order)), "num_tokens": writer.tokens,
            "num_target_tokens": writer.targets, "truncation": truncation, "mix_seed": mix_seed,
            "sources": per_source, "tokenizer": tokenizer_fingerprint(tokenizer),
        }
        if encoder is not None:
            stats = encoder.stats
            index["sft"] = {"records": stats.records, "packed_dialogs": stats.packed_dialogs,
                            "truncated": stats.truncated[:100], "num_truncated": len(stats.truncated),
                            "dropped": stats.dropped[:100], "num_dropped": len(stats.dropped)}
        index.update(extra_index or {})
        with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, ensure_ascii=False)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, INDEX_FILE)):  # not another builder's finished copy
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenDataset(out_dir)


def tokenizer_fingerprint(tokenizer) -> Dict[str, Any]:
    """sha256 of the tokenizer's files (`files`: tokenizer.model; or tokenizer.json / vocab.json + merges.txt)
    and its tokenizer_config settings."""
    digest = hashlib.sha256()
    for path in getattr(tokenizer, "files", [tokenizer.path]):
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(json.dumps(getattr(tokenizer, "config", {}), sort_keys=True, default=str).encode())
    return {"path": tokenizer.path, "sha256": digest.hexdigest(), "vocab_size": tokenizer.vocab_size}


def dataset_fingerprint(sources: Sequence[Source], tokenizer, seq_length: int, kind: str, truncation: str,
                        mix_seed: int) -> str:
    key = {"format_version": FORMAT_VERSION, "kind": kind, "seq_length": seq_length, "truncation": truncation,
           "mix_seed": mix_seed, "tokenizer": tokenizer_fingerprint(tokenizer)["sha256"],
           "sources": [s.fingerprint() for s in sources]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def prepare_dataset(spec: str, tokenizer, seq_length: int, kind: str = "sft", truncation: str = "error",
                    mix_seed: int = 0, cache_root: str = "./data_cache") -> TokenDataset:
    """`train.train_dataset` -> TokenDataset (module docstring). Checks seq_length and tokenizer agree."""
    if spec and os.path.isdir(spec) and os.path.isfile(os.path.join(spec, INDEX_FILE)):
        dataset = TokenDataset(spec)
        if dataset.seq_length != seq_length:
            raise DataError(f"preprocessed dataset {spec} has seq_length {dataset.seq_length}, the run uses "
                            f"{seq_length}; set seq_length={dataset.seq_length} or rebuild from the jsonl")
        if dataset.kind != kind:
            raise DataError(f"preprocessed dataset {spec} holds {dataset.kind} data, the run expects {kind} "
                            "(train.data_format)")
        expected = tokenizer_fingerprint(tokenizer)["sha256"]
        if dataset.index.get("tokenizer", {}).get("sha256") != expected:
            raise DataError(f"preprocessed dataset {spec} was built with another tokenizer "
                            f"({dataset.index.get('tokenizer', {}).get('path')}); rebuild it with {tokenizer.path}")
        return dataset
    sources = resolve_sources(spec)
    fingerprint = dataset_fingerprint(sources, tokenizer, seq_length, kind, truncation, mix_seed)
    directory = os.path.join(cache_root, f"{kind}-{fingerprint}")
    if os.path.isfile(os.path.join(directory, INDEX_FILE)):
        return TokenDataset(directory)
    return build_dataset(sources, directory, tokenizer, seq_length, kind, truncation, mix_seed)
