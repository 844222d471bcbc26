"""Fuzz-style: truncated and bit-flipped copies of real input files fed to the entry points that read them.
Every case must end in a one-line `error:` (exit 2, naming the file or setting; never `internal error`, never
a traceback) or in a correct result:

- a full .safetensors checkpoint (header bytes)  -> `python -m convert reshard F out.safetensors` (tp1 pp1);
  correct = the output holds exactly the tensors the `safetensors` library reads from the damaged input
- a HF directory's model.safetensors.index.json and config.json -> `python -m convert hf2ms`;
  correct = the same tensors as the undamaged conversion
- a layout directory's layout.json                -> `python -m convert merge`; correct = the original tensors
- an SFT jsonl (TeleChat2's demo_math.jsonl)     -> `python -m telechat2_ms.data`; correct = a dataset of at
  most as many records as the file has lines
- a C-Eval csv (logic, val)                       -> `run_telechat2.py --run_mode eval` (tiny model, 2
  questions); correct = a results.json
- a run-settings YAML (configs/telechat2_7b/finetune.yaml) -> `run_telechat2.py --config F --dry_run`

Mutations (seeded): truncation to 0, 1, 7 bytes, half and all but one byte; single-bit flips at 10 random
positions (inside the JSON header for safetensors, where a flip is not just another valid weight value).
Entry points are called in-process (their `main`, as the command line does).
"""
import json
import os
import random
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

import run_telechat2
from convert.__main__ import main as convert_main
from telechat2_ms.data.__main__ import main as data_main
from telechat2_ms.settings import settings_keys
from tests.conftest import REPO_ROOT

SEED = 1203


def mutations(data: bytes, flip_range=None):
    """(label, bytes) for the truncations and bit flips of `data`."""
    rng = random.Random(SEED + len(data))
    out = [(f"truncated to {n}", data[:n]) for n in sorted({0, 1, 7, len(data) // 2, len(data) - 1}) if n < len(data)]
    lo, hi = flip_range or (0, len(data))
    for _ in range(10):
        pos, bit = rng.randrange(lo, hi), rng.randrange(8)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << bit
        out.append((f"bit {bit} of byte {pos} flipped", bytes(flipped)))
    return out


def call(entry, argv, capsys):
    """-> (exit code, stderr) of an entry point; a one-line error is checked here."""
    capsys.readouterr()
    try:
        code = entry(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    if code != 0:
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from convert.hf_to_ms import hf_to_ms
    from convert.random_hf import make_random_hf
    from convert.reshard import reshard
    from telechat2_ms.config import get_config

    root = tmp_path_factory.mktemp("fuzz_ckpt")
    hf = make_random_hf(str(root / "hf"), get_config("tiny"), "F32", shard_bytes=120_000)
    full = hf_to_ms(hf, str(root / "full.safetensors"), progress=False)
    layout = reshard(full, str(root / "layout"), tp=2, pp=2, progress=False)
    return {"hf": hf, "full": full, "layout": layout, "tensors": load_file(full)}


def same(a, b):
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_damaged_safetensors_header(tmp_path, checkpoints, capsys):
    data = open(checkpoints["full"], "rb").read()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for i, (label, damaged) in enumerate(mutations(data, (0, header_end))):
        src, out = tmp_path / f"in{i}.safetensors", tmp_path / f"out{i}.safetensors"
        src.write_bytes(damaged)
        code, err = call(convert_main, ["reshard", str(src), str(out), "--no-progress"], capsys)
        if code == 0:
            assert same(load_file(str(out)), load_file(str(src))), label
        else:
            assert str(src) in err, (label, err)
            assert not out.exists()


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json"])
def test_damaged_hf_json(tmp_path, checkpoints, capsys, name):
    data = open(os.path.join(checkpoints["hf"], name), "rb").read()
    for i, (label, damaged) in enumerate(mutations(data)):
        hf = tmp_path / f"hf{i}"
        shutil.copytree(checkpoints["hf"], hf)
        (hf / name).write_bytes(damaged)
        out = tmp_path / f"out{i}.safetensors"
        code, err = call(convert_main, ["hf2ms", str(hf), str(out), "--no-progress"], capsys)
        if code == 0:
            assert same(load_file(str(out)), checkpoints["tensors"]), label
        else:
            assert str(hf) in err, (label, err)
            assert not out.exists()


def test_damaged_layout_json(tmp_path, checkpoints, capsys):
    data = open(os.path.join(checkpoints["layout"], "layout.json"), "rb").read()
    for i, (label, damaged) in enumerate(mutations(data)):
        layout = tmp_path / f"layout{i}"
        shutil.copytree(checkpoints["layout"], layout)
        (layout / "layout.json").write_bytes(damaged)
        out = tmp_path / f"out{i}.safetensors"
        code, err = call(convert_main, ["merge", str(layout), str(out), "--no-progress"], capsys)
        if code == 0:
            assert same(load_file(str(out)), checkpoints["tensors"]), label
        else:
            assert str(layout) in err, (label, err)
            assert not out.exists()


def test_damaged_sft_jsonl(tmp_path, shared_dir, capsys):
    lines = open(shared_dir / "data" / "sft" / "demo_math.jsonl", "rb").read().split(b"\n")[:6]
    data = b"\n".join(lines) + b"\n"
    for i, (label, damaged) in enumerate(mutations(data)):
        src, out = tmp_path / f"in{i}.jsonl", tmp_path / f"data{i}"
        src.write_bytes(damaged)
        code, err = call(data_main, ["--input", str(src), "--output", str(out), "--seq_length", "256",
                                     "--truncation", "truncate"], capsys)
        if code == 0:
            with open(out / "index.json", encoding="utf-8") as f:
                assert 0 < json.load(f)["sft"]["records"] <= damaged.count(b"\n") + 1, label
        else:
            assert str(src) in err or "no training" in err or "holds no" in err, (label, err)
            assert not out.exists()


def test_damaged_eval_csv(tmp_path, shared_dir, capsys):
    source = shared_dir / "data" / "ceval"
    data = open(source / "val" / "logic_val.csv", "rb").read()
    for i, (label, damaged) in enumerate(mutations(data)[::3]):  # every third: each case builds the tiny model
        root = tmp_path / f"d{i}" / "ceval"
        shutil.copytree(source, root)
        (root / "val" / "logic_val.csv").write_bytes(damaged)
        out = tmp_path / f"out{i}"
        code, err = call(run_telechat2.main, ["--run_mode", "eval", "--eval.data_dir", str(root), "--eval.subjects",
                                              "logic", "--eval.limit", "2", "--eval.num_fewshot", "0",
                                              "--seq_length", "512", "--output_dir", str(out), "--jit", "false"], capsys)
        if code == 0:
            assert (out / "eval" / "ceval_val_official_0shot" / "results.json").is_file(), label
        else:
            assert "logic_val.csv" in err or "eval.subjects" in err, (label, err)


def test_damaged_run_settings_yaml(tmp_path, capsys):
    data = open(REPO_ROOT / "configs" / "telechat2_7b" / "finetune.yaml", "rb").read()
    for i, (label, damaged) in enumerate(mutations(data)):
        path = tmp_path / f"run{i}.yaml"
        path.write_bytes(damaged)
        code, err = call(run_telechat2.main, ["--config", str(path), "--dry_run", "--world_size", "8"], capsys)
        if code != 0:  # names the file or a setting
            assert str(path) in err or any(key.rsplit(".", 1)[-1] in err for key in settings_keys()), (label, err)
