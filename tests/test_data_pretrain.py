"""Pretraining data: ids(text) + <_end> per line, concatenated and cut into seq_length chunks (spec 6.2)."""
import json

import numpy as np
import pytest

from telechat2_ms.data.pretrain import encode_pretrain_file
from telechat2_ms.data.sources import DataError
from telechat2_ms.tokenizer import Telechat2Tokenizer


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def test_real_pretrain_example_is_eos_joined_and_chunked(shared_dir, tokenizer_115b_path):
    tok = Telechat2Tokenizer(tokenizer_115b_path)
    path = shared_dir / "data" / "pretrain" / "pretrain_example.jsonl"
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    stream = [i for text in texts for i in tok.encode(text) + [2]]
    seq = 1024
    samples = list(encode_pretrain_file(str(path), tok, seq))
    assert len(samples) == len(stream) // seq  # the remainder shorter than seq_length is dropped (OFF-DS)
    np.testing.assert_array_equal(np.concatenate([s.ids for s in samples]), stream[:len(samples) * seq])
    assert all(s.mask.all() and len(s.ids) == seq for s in samples)
    assert (np.concatenate([s.ids for s in samples]) == 2).sum() == stream[:len(samples) * seq].count(2) >= 10


def test_small_file_becomes_one_short_sample(tmp_path):
    tok = Telechat2Tokenizer.demo()
    path = _write(tmp_path / "p.jsonl", ["zorb plim", "", "quax"])
    (sample,) = encode_pretrain_file(path, tok, 512)
    assert sample.ids.tolist() == tok.encode("zorb plim") + [2] + [2] + tok.encode("quax") + [2]
    assert sample.mask.tolist() == [1] * len(sample.ids)


def test_chunk_boundaries(tmp_path):
    tok = Telechat2Tokenizer.demo()
    texts = [f"item {i} is red" for i in range(30)]
    stream = [i for t in texts for i in tok.encode(t) + [2]]
    chunks = list(encode_pretrain_file(_write(tmp_path / "p.jsonl", texts), tok, 16))
    assert [c.ids.tolist() for c in chunks] == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]


def test_missing_text_field_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a"}\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"p.jsonl:2: pretraining lines need a string field 'text', got no text field"):
        list(encode_pretrain_file(str(path), Telechat2Tokenizer.demo(), 16))
