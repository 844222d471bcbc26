"""MindFormers-style MindRecord data (telechat2_ms/data/mindrecord.py), read and written with mindspore.mindrecord.

- A file written the way MindFormers' research/telechat2/telechat_preprocess.py writes it (FileWriter, schema
  "lm-schema", int32 input_ids and labels, packs left-padded with <_pad>, labels -100 on pads and prompts) reads
  as samples whose ids are its input_ids and whose targets are exactly its non -100 labels.
- jsonl -> `python -m telechat2_ms.data --output x.mindrecord` -> `train.train_dataset=x.mindrecord` gives the
  same batches as the jsonl itself, and a few training steps on either give identical losses.
- Bad files end in one error naming the file and row: a row longer than seq_length (with the length to set),
  a label that is not its token, a missing .db index, missing columns.
"""
import os

import numpy as np
import pytest

from telechat2_ms.data.dataset import prepare_dataset
from telechat2_ms.data.demo_corpus import write_sft_jsonl
from telechat2_ms.data.mindrecord import IGNORE_TOKEN_ID, SCHEMA_NAME
from telechat2_ms.data.sources import DataError
from telechat2_ms.tokenizer import Telechat2Tokenizer

PAD, USER, BOT, END = 3, 4, 5, 6  # TeleChat2's <_pad>, <_user>, <_bot>, <_end> ids (the demo tokenizer keeps them)


def _mindformers_file(path, rows, schema=None):
    """rows: [(input_ids, labels)] written as MindFormers' preprocessing writes them."""
    from mindspore.mindrecord import FileWriter

    writer = FileWriter(str(path), 1)
    writer.add_schema(schema or {"input_ids": {"type": "int32", "shape": [-1]},
                                 "labels": {"type": "int32", "shape": [-1]}}, SCHEMA_NAME)
    for ids, labels in rows:
        writer.write_raw_data([{"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32)}])
    writer.commit()
    return str(path)


def _pack(question, answer, length):
    """One MindFormers pack: <_user> q <_bot> a <_end>, left-padded to `length`; labels on the answer and <_end>."""
    ids = [USER] + question + [BOT] + answer + [END]
    labels = [IGNORE_TOKEN_ID] * (len(question) + 2) + answer + [END]
    pads = length - len(ids)
    return [PAD] * pads + ids, [IGNORE_TOKEN_ID] * pads + labels


def test_a_mindformers_file_reads_as_its_rows_and_targets(tmp_path):
    tok = Telechat2Tokenizer.demo()
    rows = [_pack([100, 101, 102], [200, 201], 17), _pack([110], [210, 211, 212, 213], 17)]
    path = _mindformers_file(tmp_path / "mf.mindrecord", rows)
    dataset = prepare_dataset(path, tok, 17, "sft", cache_root=str(tmp_path / "cache"))
    assert len(dataset) == 2
    for entry, (ids, labels) in enumerate(rows):
        got_ids, got_mask = dataset.sample(entry)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_mask, np.asarray(labels) != IGNORE_TOKEN_ID)
    assert dataset.index["num_target_tokens"] == 3 + 5  # the answers and their <_end>
    again = prepare_dataset(path, tok, 17, "sft", cache_root=str(tmp_path / "cache"))
    assert again.directory == dataset.directory  # cached like a jsonl source


def test_jsonl_to_mindrecord_and_back_trains_the_same(tmp_path, capsys):
    from telechat2_ms.data.__main__ import main
    from telechat2_ms.settings import load_settings
    from telechat2_ms.train import run_train

    jsonl = write_sft_jsonl(str(tmp_path / "demo.jsonl"), 40)
    record = str(tmp_path / "demo.mindrecord")
    assert main(["--input", jsonl, "--output", record, "--seq_length", "64", "--truncation", "truncate"]) == 0
    assert f"wrote {record}:" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["demo.jsonl", "demo.mindrecord", "demo.mindrecord.db"]
    assert main(["--input", jsonl, "--output", record, "--seq_length", "64", "--truncation", "truncate"]) == 2
    err = capsys.readouterr().err  # an existing output is refused before any work, in one line
    assert err == f"error: output {record} exists; pass --overwrite to replace it\n"
    tok = Telechat2Tokenizer.demo()
    from_jsonl = prepare_dataset(jsonl, tok, 64, "sft", "truncate", cache_root=str(tmp_path / "c1"))
    from_record = prepare_dataset(record, tok, 64, "sft", cache_root=str(tmp_path / "c2"))
    assert len(from_jsonl) == len(from_record)
    for key in ("num_tokens", "num_target_tokens"):  # the written right-padding is not read back as tokens
        assert from_jsonl.index[key] == from_record.index[key], key
    entries = list(range(len(from_jsonl)))
    for a, b in zip(from_jsonl.batch(entries), from_record.batch(entries)):
        np.testing.assert_array_equal(a, b)
    args = ["--run_mode=finetune", "--seq_length=64", "--train.truncation=truncate", "--train.batch_size=2",
            "--train.total_steps=3", "--train.learning_rate=1e-2", "--jit=false"]
    losses = [run_train(load_settings(None, args + [f"--train.train_dataset={data}",
                                                     f"--output_dir={tmp_path / name}"]))["losses"]
              for name, data in (("from_jsonl", jsonl), ("from_record", record))]
    assert losses[0] == losses[1] and len(losses[0]) == 3


@pytest.mark.parametrize("case, message", [
    ("long", r"mf.mindrecord row 1 has 20 tokens, more than seq_length 17 .* set seq_length=20"),
    ("label", r"mf.mindrecord row 0: labels\[14\] = 7 is neither input_ids\[14\] = 200 nor -100"),
    ("no_db", r"its MindRecord index mf.mindrecord.db is missing"),
    ("columns", r"lack \['labels'\]"),
])
def test_bad_mindrecord_files_are_refused_naming_file_and_row(tmp_path, case, message):
    tok = Telechat2Tokenizer.demo()
    rows = [_pack([100, 101, 102], [200, 201], 17), _pack([110], [210], 20 if case == "long" else 17)]
    if case == "label":
        rows[0][1][14] = 7
    schema = {"input_ids": {"type": "int32", "shape": [-1]}, "other": {"type": "int32", "shape": [-1]}} \
        if case == "columns" else None
    if case == "columns":
        from mindspore.mindrecord import FileWriter

        writer = FileWriter(str(tmp_path / "mf.mindrecord"), 1)
        writer.add_schema(schema, SCHEMA_NAME)
        writer.write_raw_data([{"input_ids": np.asarray(rows[0][0], np.int32), "other": np.zeros(3, np.int32)}])
        writer.commit()
        path = str(tmp_path / "mf.mindrecord")
    else:
        path = _mindformers_file(tmp_path / "mf.mindrecord", rows)
    if case == "no_db":
        os.remove(path + ".db")
    with pytest.raises(DataError, match=message):
        prepare_dataset(path, tok, 17, "sft", cache_root=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")  # nothing half-built
