"""MindFormers-style MindRecord datasets, read and written with `mindspore.mindrecord`.

MindFormers' TeleChat2 preprocessing (research/telechat2/telechat_preprocess.py) writes one row per packed
training sequence, schema "lm-schema" with two columns:
    input_ids  int32 [L]   the tokens (MindFormers left-pads its packs with <_pad> to L = its seq_length + 1)
    labels     int32 [L]   input_ids where the token is a target, -100 (IGNORE_TOKEN_ID) everywhere else
In this project's terms a row is a sample: ids = input_ids and target mask = (labels != -100), a label having to
equal its input id. Rows are not shifted: the model predicts token p from tokens < p in both projects, so a row
of L tokens trains the same targets here with `seq_length` L as it does in MindFormers with seq_length L - 1.

Reading: a `.mindrecord` file given as (or in a data mix of) `train.train_dataset`, or to `python -m
telechat2_ms.data --input`, is imported row by row into a preprocessed dataset (data/dataset.py); rows longer
than `seq_length` are refused with the length to set. Writing: `python -m telechat2_ms.data --output
NAME.mindrecord` writes a dataset's samples (in its data-mix order) as such rows, right-padded to its
seq_length with the pad id and label -100, so MindFormers trains on data prepared here. The file and its `.db`
index are written in a temporary directory and moved into place (MindRecord records its file name inside the
.db, so the name is kept; the .db moves first, so a reader never finds a data file without its index).
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator

import numpy as np

from telechat2_ms.data.sft import Sample
from telechat2_ms.data.sources import DataError

IGNORE_TOKEN_ID = -100
COLUMNS = ("input_ids", "labels")
SCHEMA = {name: {"type": "int32", "shape": [-1]} for name in COLUMNS}
SCHEMA_NAME = "lm-schema"


def read_mindrecord(path: str, seq_length: int, vocab_size: int, pad_id: int) -> Iterator[Sample]:
    """The rows of a MindRecord file as samples (module docstring), without their trailing padding (pad ids that
    are no target, as `write_mindrecord` pads); DataError naming the file and row."""
    from mindspore.mindrecord import FileReader

    if not os.path.isfile(path + ".db"):
        raise DataError(f"{path}: its MindRecord index {os.path.basename(path)}.db is missing beside it")
    try:
        reader = FileReader(path)
        fields = reader.schema()
    except Exception as err:  # MindSpore raises RuntimeError / ValueError with long internal messages
        raise DataError(f"cannot read MindRecord file {path}: {str(err).strip().splitlines()[-1]}") from None
    missing = [name for name in COLUMNS if name not in fields]
    if missing:
        reader.close()
        raise DataError(f"{path}: MindRecord columns {sorted(fields)} lack {missing} (MindFormers' language-model "
                        "schema has input_ids and labels)")
    try:
        for row, item in enumerate(reader.get_next()):
            where = f"{path} row {row}"
            ids = np.asarray(item["input_ids"]).reshape(-1)
            labels = np.asarray(item["labels"]).reshape(-1)
            if ids.shape != labels.shape:
                raise DataError(f"{where}: input_ids has {ids.size} tokens, labels {labels.size}")
            if ids.size > seq_length:
                raise DataError(f"{where} has {ids.size} tokens, more than seq_length {seq_length} (MindFormers writes "
                                f"rows of its seq_length + 1); set seq_length={ids.size}")
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise DataError(f"{where}: token ids must lie in [0, {vocab_size}) (the tokenizer's vocabulary), "
                                f"found {int(ids.min())}..{int(ids.max())}")
            targets = labels != IGNORE_TOKEN_ID
            wrong = np.flatnonzero(targets & (labels != ids))
            if wrong.size:
                p = int(wrong[0])
                raise DataError(f"{where}: labels[{p}] = {int(labels[p])} is neither input_ids[{p}] = {int(ids[p])} "
                                f"nor {IGNORE_TOKEN_ID}; only unshifted labels (MindFormers' layout) can be read")
            content = np.flatnonzero((ids != pad_id) | targets)  # the trailing rest is padding
            kept = int(content[-1]) + 1 if content.size else 0
            yield Sample(ids[:kept].astype(np.int32), targets[:kept].astype(np.uint8), where)
    finally:
        reader.close()


def check_mindrecord_output(path: str, overwrite: bool) -> None:
    """Refuse a MindRecord output path that is not `*.mindrecord`, has no parent directory, or whose file or .db
    index exists already."""
    if not path.endswith(".mindrecord"):
        raise DataError(f"{path}: a MindRecord output must end in .mindrecord")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f"output {path}: parent directory {parent} does not exist")
    for existing in (path, path + ".db"):
        if os.path.lexists(existing) and (not overwrite or os.path.isdir(existing)):
            raise DataError(f"output {existing} exists" + ("" if os.path.isdir(existing) else
                                                            "; pass --overwrite to replace it"))


def write_mindrecord(dataset, path: str, overwrite: bool = False) -> int:
    """Write a TokenDataset's order entries as MindFormers rows (module docstring); returns the row count."""
    from mindspore.mindrecord import FileWriter

    from telechat2_ms.formats.atomic import make_temp_dir

    check_mindrecord_output(path, overwrite)
    tmp = make_temp_dir(path)
    try:
        inside = os.path.join(tmp, os.path.basename(path))
        writer = FileWriter(inside, shard_num=1, overwrite=True)
        writer.add_schema(SCHEMA, SCHEMA_NAME)
        length = dataset.seq_length
        for entry in range(len(dataset)):
            ids, mask = dataset.sample(entry)
            row = np.full(length, dataset.pad_id, np.int32)
            row[:ids.size] = ids
            labels = np.full(length, IGNORE_TOKEN_ID, np.int32)
            labels[:ids.size] = np.where(mask.astype(bool), ids, IGNORE_TOKEN_ID)
            writer.write_raw_data([{"input_ids": row, "labels": labels}])
        writer.commit()
        os.replace(inside + ".db", path + ".db")
        os.replace(inside, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(dataset)
