"""Pretraining data: jsonl {"text": ...} tokenized, EOS-joined and cut into seq_length chunks (spec 6.2).

Per file: ids = ids(text) + [<_end>] for every line, all concatenated in file order, then cut into chunks of
exactly seq_length tokens; the remainder shorter than seq_length is dropped, as OFF-DS `group_texts` does,
except when the whole file is shorter than one chunk: then it becomes one short (right-padded) sample.
Every real token is a target (mask 1); padding is not (OFF-DS would train on the pad id, a quirk this port
does not copy). There is no attention reset at document boundaries (spec 10.15).
"""
from __future__ import annotations

from typing import Iterator, List

import numpy as np

from telechat2_ms.data.sft import Sample
from telechat2_ms.data.sources import DataError, iter_jsonl


def read_texts(path: str) -> Iterator[tuple]:
    """(where, text) per line; DataError names file:line when "text" is missing or not a string."""
    for line_no, obj in iter_jsonl(path):
        text = obj.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_no}: pretraining lines need a string field 'text', "
                            f"got {type(text).__name__ if 'text' in obj else 'no text field'}")
        yield f"{path}:{line_no}", text


def encode_pretrain_file(path: str, tokenizer, seq_length: int) -> Iterator[Sample]:
    """Chunks of one file (see the module docstring)."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2 for training, got {seq_length}")
    eos = tokenizer.eos_id
    buffer: List[int] = []
    chunks = 0
    for _, text in read_texts(path):
        buffer += tokenizer.encode(text) + [eos]
        start = 0
        while len(buffer) - start >= seq_length:
            chunks += 1
            yield Sample(np.asarray(buffer[start:start + seq_length], np.int32), np.ones(seq_length, np.uint8),
                         f"{path} chunk {chunks}")
            start += seq_length
        del buffer[:start]
    if chunks == 0 and buffer:
        yield Sample(np.asarray(buffer, np.int32), np.ones(len(buffer), np.uint8), f"{path} (whole file)")
