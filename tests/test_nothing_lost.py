"""Nothing lost, nothing mixed up (one test per case): an output directory belongs to one run (identity,
lock, --overwrite, retention of this run's checkpoints only), resume compares before building, rank files
are checked against their recorded position, eval results are keyed by everything that changes them,
interrupted writes are swept, metrics tolerate a torn last line, and every entry point reports an expected
failure as one `error:` line naming the file or setting."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from telechat2_ms.config import ConfigError
from telechat2_ms.settings import load_settings
from telechat2_ms.train import Trainer
from telechat2_ms.train import checkpointing as ckpts
from telechat2_ms import checkpoint as ckpt

TRAIN = ["--run_mode=finetune", "--seq_length=48", "--train.train_dataset=demo:60", "--train.truncation=drop",
         "--train.batch_size=2", "--train.warmup_steps=1", "--train.learning_rate=3e-3"]


def train(out, *extra, steps=4, save=2, keep=0):
    args = TRAIN + [f"--output_dir={out}", f"--train.total_steps={steps}", f"--train.save_steps={save}",
                    f"--train.keep_checkpoint_max={keep}", *extra]
    return Trainer(load_settings(None, args), printer=lambda line: None).train()


def steps_in(out):
    return [step for step, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(str(out)))]


def run_cli(*args, module=None, timeout=300):
    """An entry point as a user runs it: (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", module] if module else [sys.executable, str(REPO_ROOT / "run_telechat2.py")]
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_error_line(rc, stderr, *fragments):
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- one run per output directory ----------------------------------------------------------------------

def test_fresh_run_into_a_longer_runs_directory_is_refused_then_overwrite_replaces_it(tmp_path):
    out = tmp_path / "out"
    train(out, steps=6, save=2)
    assert steps_in(out) == [2, 4, 6]
    before = {name: os.path.getmtime(os.path.join(out, "checkpoints", name)) for name in os.listdir(out / "checkpoints")}
    with pytest.raises(ConfigError, match=r"output_dir .*out holds run [0-9a-f]{8} .*'s results \(checkpoints, "
                                          r"metrics.jsonl, loss_curve.png, training_curves.png\); continue it with "
                                          r"--train.resume=true"):
        train(out, steps=2, save=1, keep=1)
    assert {n: os.path.getmtime(os.path.join(out, "checkpoints", n)) for n in os.listdir(out / "checkpoints")} == before
    summary = train(out, "--overwrite", steps=2, save=1, keep=1)
    assert steps_in(out) == [2] and os.path.isdir(summary["checkpoint"])  # the new run's, none of the old
    assert summary["checkpoint"].endswith("step_00000002")
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    state = ckpts.read_trainer_state(summary["checkpoint"])
    with open(out / "run.json", encoding="utf-8") as f:
        assert json.load(f)["run_id"] == state["run_id"]


def test_retention_removes_only_this_runs_checkpoints(tmp_path):
    root = str(tmp_path / "checkpoints")
    files = {"model.safetensors": {"w": __import__("numpy").zeros(2, "float32")}}
    ckpts.save_training_checkpoint(root, 50, files, {"step": 50, "run_id": "other"})
    for step in (1, 2, 3):
        ckpts.save_training_checkpoint(root, step, files, {"step": step, "run_id": "mine"}, keep=2, run_id="mine")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3, 50]


def test_second_concurrent_run_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from telechat2_ms.outputs import OutputLock; lock = OutputLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)"), str(out)], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"output_dir .*out is in use by pid {holder.pid} on "):
            train(out)
        assert not os.path.exists(out / "metrics.jsonl") and not os.path.exists(out / "checkpoints")
    finally:
        holder.kill()
        holder.wait()
    train(out, steps=2)  # the kernel dropped the lock with the holder (kill -9 included)
    assert steps_in(out) == [2]


def test_resume_with_another_model_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(out, steps=2)
    import telechat2_ms.build as build_module

    def must_not_run(plan):
        raise AssertionError("the tokenizer/model was built before the run identity was compared")

    monkeypatch.setattr(build_module, "build_tokenizer", must_not_run)
    settings = load_settings(None, TRAIN + [f"--output_dir={out}", "--train.resume=true", "--train.total_steps=4",
                                            "--train.seed=7"])
    with pytest.raises(ConfigError, match=r"cannot resume from .*step_00000002: this run is not the one recorded "
                                          r"there \(seed: recorded 1234, now 7\)"):
        Trainer(settings)
    code, _, err = run_cli(*TRAIN, f"--output_dir={out}", "--train.resume", "--model", "telechat2_3b")
    assert_one_error_line(code, err, "cannot resume from", "model: recorded 'tiny', now 'telechat2_3b'")


def test_resume_from_another_runs_checkpoint_into_an_owned_directory_is_refused(tmp_path):
    train(tmp_path / "a", steps=2)
    train(tmp_path / "b", steps=2)
    a_ckpt = str(tmp_path / "a" / "checkpoints" / "step_00000002")
    with pytest.raises(ConfigError, match=r"output_dir .*b belongs to run [0-9a-f]{8}, not to run [0-9a-f]{8}"):
        train(tmp_path / "b", f"--train.resume_from={a_ckpt}", steps=4)


def test_checkpoint_directories_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        summary = train(tmp_path / "out", steps=2)
    finally:
        os.umask(old)
    assert os.stat(summary["checkpoint"]).st_mode & 0o755 == 0o755


# ---- metrics and data files ----------------------------------------------------------------------------

def test_torn_last_metrics_line_is_dropped_with_a_warning_and_resume_works(tmp_path, capsys):
    out = tmp_path / "out"
    train(out, steps=4, save=2)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 6.9')  # what a kill mid-append leaves
    summary = train(out, "--train.resume=true", steps=6, save=2)
    assert "dropped a torn last line" in capsys.readouterr().err
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
    assert summary["checkpoint"].endswith("step_00000006")


def test_damaged_metrics_line_before_the_end_names_the_file_and_line(tmp_path):
    out = tmp_path / "out"
    train(out, steps=4, save=2)
    lines = open(out / "metrics.jsonl", encoding="utf-8").read().splitlines()
    lines[1] = "{garbage"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, _, err = run_cli(*TRAIN, f"--output_dir={out}", "--train.resume", "--train.total_steps=6")
    assert_one_error_line(code, err, "metrics.jsonl:2: not a metrics record")


def test_invalid_utf8_in_jsonl_data_names_the_right_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"system": "", "dialog": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "ok"}]})
    path.write_bytes((good + "\n" + good + "\n").encode() + b'{"bad": "\xff"}\n' + (good + "\n").encode())
    code, _, err = run_cli("--run_mode=finetune", "--seq_length=48", f"--train.train_dataset={path}",
                           f"--output_dir={tmp_path / 'out'}", "--train.total_steps=1")
    assert_one_error_line(code, err, "data.jsonl:3", "UTF-8")


# ---- rank files ----------------------------------------------------------------------------------------

@pytest.fixture
def layout(tmp_path):
    from convert.hf_to_ms import hf_to_ms
    from convert.random_hf import make_random_hf
    from convert.reshard import reshard
    from telechat2_ms.config import get_config

    hf = make_random_hf(str(tmp_path / "hf"), get_config("tiny"), "F32")
    full = hf_to_ms(hf, str(tmp_path / "full.safetensors"), progress=False)
    return reshard(full, str(tmp_path / "layout"), tp=2, pp=1, progress=False)


def test_merge_of_swapped_rank_directories_is_refused_naming_both(tmp_path, layout):
    os.rename(os.path.join(layout, "tp0_pp0"), os.path.join(layout, "swap"))
    os.rename(os.path.join(layout, "tp1_pp0"), os.path.join(layout, "tp0_pp0"))
    os.rename(os.path.join(layout, "swap"), os.path.join(layout, "tp1_pp0"))
    code, _, err = run_cli("merge", layout, str(tmp_path / "merged.safetensors"), "--no-progress", module="convert")
    assert_one_error_line(code, err, "tp0_pp0/model.safetensors holds tp_rank 1 of tp 2",
                          "where layout.json puts tp_rank 0 of tp 2")
    assert not os.path.exists(tmp_path / "merged.safetensors")
    from telechat2_ms.checkpoint import CheckpointError, LayoutWeights, resolve_checkpoint

    with pytest.raises(CheckpointError, match="holds tp_rank 1 of tp 2"):
        LayoutWeights(resolve_checkpoint(layout)).shard("model.layers.0.attention.wq.weight", 2, 0)


# ---- eval results --------------------------------------------------------------------------------------

def _eval(shared_dir, out, data_dir, **kw):
    from tests.test_eval_runner import byte_encode, hashed_model
    from telechat2_ms.evaluate.runner import EvalOptions, evaluate

    calls = []
    options = EvalOptions(benchmark="ceval", data_dir=str(data_dir), split="val", num_fewshot=0,
                          subjects=["logic"], batch_size=8, output_dir=str(out), **kw)
    return evaluate(options, hashed_model(calls), byte_encode, progress=False), calls


def test_eval_rerun_with_other_data_is_refused_and_a_copy_of_the_same_data_is_reused(shared_dir, tmp_path):
    original = shared_dir / "data" / "ceval"
    copy = tmp_path / "copy" / "ceval"
    shutil.copytree(original, copy)
    first, calls = _eval(shared_dir, tmp_path / "out", original)
    assert sum(calls) == first["overall"]["n"]
    again, calls = _eval(shared_dir, tmp_path / "out", copy)  # the same files elsewhere: the same result
    assert calls == [] and again["overall"] == first["overall"]
    path = copy / "val" / "logic_val.csv"
    rows = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(rows[:-3]) + "\n", encoding="utf-8")  # other questions
    with pytest.raises(ValueError, match=r"logic.json holds a result made with other data than this run's; "
                                         r"choose another output_dir, or pass --overwrite"):
        _eval(shared_dir, tmp_path / "out", copy)
    rescored, calls = _eval(shared_dir, tmp_path / "out", copy, overwrite=True)
    assert sum(calls) == rescored["overall"]["n"] == first["overall"]["n"] - 3


# ---- interrupted writes --------------------------------------------------------------------------------

def test_orphans_of_interrupted_writes_are_removed_and_reported(tmp_path):
    from convert.random_hf import make_random_hf
    from telechat2_ms.config import get_config

    hf = make_random_hf(str(tmp_path / "hf"), get_config("tiny"), "F32")
    target = tmp_path / "out.safetensors"
    orphan = tmp_path / ".out.safetensors.tmp-999999999-0badf00d"  # no such pid: its writer is gone
    orphan.write_bytes(b"\0" * 3 * 2 ** 20)
    mine = tmp_path / f".out.safetensors.tmp-{os.getpid()}-0badf00d"  # a live writer's: left alone
    mine.write_bytes(b"x")
    code, out, err = run_cli("hf2ms", hf, str(target), "--no-progress", module="convert")
    assert code == 0, err
    assert f"warning: removed {orphan} (3.0 MiB), left by an interrupted write of {target}" in err
    assert not orphan.exists() and mine.exists() and target.exists()
    stale = tmp_path / "run" / "checkpoints" / ".tmp-step_00000002"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 2 ** 20)
    train(tmp_path / "run", "--overwrite", steps=2)
    assert not stale.exists()


# ---- one error line, one CLI syntax --------------------------------------------------------------------

def test_every_key_takes_both_cli_spellings_and_paths_with_spaces(tmp_path):
    code, out, err = run_cli("--dry_run", "--run_mode", "finetune", "--train.batch_size", "3",
                             "--parallel_config.micro_batch_num=2", "--seq_length", "64")
    assert code == 0, err
    assert "= 6 sequences of 64 tokens per step" in out
    spaced = tmp_path / "my tokenizer"
    code, _, err = run_cli("--tokenizer", str(spaced), "--predict_data", "hi")
    assert_one_error_line(code, err, f"{spaced}")
    code, _, err = run_cli("--train.batch_sise", "3")
    assert_one_error_line(code, err, "unrecognized arguments: --train.batch_sise", "did you mean --train.batch_size")


@pytest.mark.parametrize("name, content, fragments", [
    ("syntax.yaml", "model: [tiny\n", ["syntax.yaml: YAML syntax error at line 2"]),
    ("unknown.yaml", "modle: tiny\n", ["unknown.yaml: unknown config key 'modle'"]),
    ("binary.yaml", b"model: \xff\xfe\n", ["binary.yaml is not UTF-8 text"]),
])
def test_bad_yaml_is_one_line(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_error_line(*run_cli("--config", str(path), "--dry_run")[::2], *fragments)


def test_config_given_a_directory_is_one_line(tmp_path):
    assert_one_error_line(*run_cli("--config", str(tmp_path), "--dry_run")[::2], "is a directory; give a YAML file")


def test_unknown_eval_benchmark_is_named_as_such(tmp_path):
    from telechat2_ms.evaluate.runner import EvalOptions

    with pytest.raises(ValueError, match="unknown benchmark 'cmmlu'; expected one of ceval, mmlu"):
        EvalOptions(benchmark="cmmlu").validate()


def test_non_utf8_eval_csv_names_the_file_and_line(tmp_path, shared_dir):
    from telechat2_ms.evaluate.data import load_subject

    copy = tmp_path / "ceval"
    shutil.copytree(shared_dir / "data" / "ceval", copy)
    path = copy / "val" / "logic_val.csv"
    data = path.read_bytes().split(b"\n")
    data[2] = data[2] + b"\xff"
    path.write_bytes(b"\n".join(data))
    with pytest.raises(ValueError, match=r"logic_val.csv:3: not UTF-8 text"):
        load_subject(str(copy), "ceval", "logic", "val")


@pytest.mark.parametrize("damage, fragment", [
    ("index", "model.safetensors.index.json"),
    ("config_json", "config.json"),
    ("config_field", "config.json"),
    ("header", ".safetensors"),
    ("pickle", "pytorch_model.bin"),
])
def test_bad_hf_inputs_are_one_line(tmp_path, damage, fragment):
    from convert.random_hf import make_random_hf
    from telechat2_ms.config import get_config

    hf = make_random_hf(str(tmp_path / "hf"), get_config("tiny"), "F32", shard_bytes=120_000)
    if damage == "index":
        (tmp_path / "hf" / "model.safetensors.index.json").write_text('{"weight_map": ', encoding="utf-8")
    elif damage == "config_json":
        (tmp_path / "hf" / "config.json").write_text("{", encoding="utf-8")
    elif damage == "config_field":
        config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
        config["n_layer"] = "two"
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    elif damage == "header":
        shard = sorted(p for p in os.listdir(hf) if p.endswith(".safetensors"))[0]
        raw = bytearray((tmp_path / "hf" / shard).read_bytes())
        raw[8:20] = b'{"a": {"dty'
        (tmp_path / "hf" / shard).write_bytes(bytes(raw))
    else:
        for name in os.listdir(hf):
            if name.endswith((".safetensors", ".json")) and name != "config.json":
                os.remove(os.path.join(hf, name))
        import pickle

        (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))
    code, _, err = run_cli("hf2ms", hf, str(tmp_path / "out.safetensors"), "--no-progress", module="convert")
    assert_one_error_line(code, err, fragment)
    assert not os.path.exists(tmp_path / "out.safetensors")


def test_debug_flag_shows_the_traceback(tmp_path):
    code, _, err = run_cli("--config", str(tmp_path), "--dry_run", "--debug")
    assert code != 0 and "Traceback" in err and "ConfigError" in err


def test_a_non_finite_step_is_logged_as_nan_not_a_crash(tmp_path):
    """A skipped step stores loss / grad_norm as null; the progress line shows nan (it used to raise TypeError
    and end the run, found on the 3B cut under tp2)."""
    from telechat2_ms.train.metrics import MetricsLogger, read_metrics

    printed = []
    log = MetricsLogger(str(tmp_path), total_steps=2, printer=printed.append)
    log.start(0)
    line = log.log({"step": 1, "loss": None, "lr": 1e-4, "grad_norm": None, "tokens": 8, "loss_scale": 1.0,
                    "skipped": True, "consumed_samples": 1, "step_time_s": 0.5, "tokens_per_s": 16.0})
    assert "loss nan" in line and "grad_norm nan" in line and "skipped (non-finite gradients)" in line
    assert printed == [line] and read_metrics(log.path)[0]["loss"] is None


def test_retention_killed_while_deleting_lists_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Retention renames an old checkpoint aside before deleting it: a kill during the deletion (simulated: the
    deletion removes one file and dies) leaves only complete checkpoints listed. Found by the msrun kill -9
    test, where a checkpoint without its tp1 rank file was listed."""
    import numpy as np

    from telechat2_ms import checkpoint as ckpt
    from telechat2_ms.train import checkpointing

    root = str(tmp_path / "checkpoints")

    def save(step):
        return checkpointing.save_training_checkpoint(root, step, {"model.safetensors": {"w": np.zeros(2, np.float32)}},
                                                      {"step": step, "run_id": "r"}, keep=2, run_id="r")

    save(1)
    save(2)

    def dying_rmtree(path, ignore_errors=False):
        os.remove(os.path.join(path, "model.safetensors"))
        raise SystemExit("killed during the deletion")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", dying_rmtree)
    with pytest.raises(SystemExit):
        save(3)
    listed = ckpt.list_checkpoints(root)
    assert [s for s, _ in listed] == [2, 3]
    assert all(os.path.isfile(os.path.join(p, "model.safetensors")) for _, p in listed)
    monkeypatch.undo()
    save(4)  # the next save removes what the interrupted deletion left
    assert sorted(os.listdir(root)) == ["step_00000003", "step_00000004"]
