"""Shard-only build, measured: peak RSS per rank of real-size runs against the bytes of that rank's shard.

    .venv/bin/python research/bench_shard_memory.py --workdir /tmp/shard_memory     # about 40 GB of disk

Writes a random TeleChat2-3B checkpoint in the HF layout (convert.random_hf, one tensor at a time), converts
it with `python -m convert hf2ms --dtype fp32` (12 GiB), and the same widths and vocabulary cut to 2 layers;
then runs, each as its own job on the CPU with nothing else running:
  predict of the full 3B in one process, under msrun with tp2, and with pp2;
  one training step (finetune, AdamW) of the 2-layer cut in one process and under msrun with tp2.
Every process reports its own peak RSS (ru_maxrss) from inside (run_telechat2.main, then getrusage), and the
table puts it beside the bytes its shard needs: this rank's parameters in fp32 (the per-rank shapes of
parallel/plan.py), times 4 when training (weights, gradient accumulators, AdamW's two moments). The
budget the issue sets: peak RSS <= shard bytes + 2 GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30
# the real TeleChat2 vocabulary (131072 pieces): random weights may generate any id of the model's vocabulary
TOKENIZER = os.path.join(os.path.dirname(REPO), "shared", "reference", "telechat2-115b", "tokenizer.model")
PREDICT = ["--run_mode=predict", "--predict_data=What colour is the zorb?", f"--tokenizer={TOKENIZER}",
           "--generate.max_new_tokens=4",
           "--seq_length=64", "--jit=false"]
TRAIN = ["--run_mode=finetune", "--train.train_dataset=demo:64", "--train.truncation=truncate", "--seq_length=256",
         "--train.batch_size=1", "--train.total_steps=1", "--train.keep_checkpoint_max=1", "--jit=false"]


def as_worker(report: str, args) -> int:
    """Inside one process (or one msrun rank): the run, then this process's peak RSS."""
    sys.path.insert(0, REPO)
    import run_telechat2
    from telechat2_ms.parallel import comm

    started = time.perf_counter()
    rc = run_telechat2.main(list(args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if os.environ.get("MS_ROLE") == "MS_SCHED":  # msrun runs the script as its scheduler too (rank id 0)
        return rc
    os.makedirs(report, exist_ok=True)
    with open(os.path.join(report, f"rank{comm.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump({"rc": rc, "peak_rss": peak, "seconds": time.perf_counter() - started}, f)
    return rc


def shard_bytes(checkpoint: str, tp: int, pp: int, training: bool) -> list:
    """fp32 bytes of each rank's parameters (x4 when training), rank = stage * tp + tp rank."""
    from telechat2_ms.checkpoint import SafetensorsWeights, stored_config
    from telechat2_ms.parallel.plan import param_stage, shard_shape, stage_layer_ranges

    cfg = stored_config(checkpoint)
    ranges = stage_layer_ranges(cfg.num_layers, pp)
    per_stage = [0] * pp
    for name, shape in SafetensorsWeights(checkpoint).shapes().items():
        count = 1
        for s in shard_shape(name, shape, tp):
            count *= s
        per_stage[param_stage(name, ranges)] += count
    factor = 16 if training else 4
    return [per_stage[r // tp] * factor for r in range(tp * pp)]


def run_case(name: str, workdir: str, checkpoint: str, args, tp: int = 1, pp: int = 1, timeout: int = 3600):
    report = os.path.join(workdir, "reports", name)
    shutil.rmtree(report, ignore_errors=True)
    run_dir = os.path.join(workdir, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    world = tp * pp
    run_args = list(args) + [f"--load_checkpoint={checkpoint}", f"--output_dir={os.path.join(run_dir, 'out')}",
                             f"--parallel_config.model_parallel={tp}", f"--parallel_config.pipeline_stage={pp}"]
    if pp > 1 and "--run_mode=finetune" in args:
        run_args.append(f"--parallel_config.micro_batch_num={pp}")
    worker = [os.path.abspath(__file__), "--as-worker", report, "--"] + run_args
    if world == 1:
        command = [sys.executable] + worker
    else:
        command = ["msrun", f"--worker_num={world}", f"--local_worker_num={world}", "--master_port=8129",
                   f"--log_dir={os.path.join(run_dir, 'msrun_log')}", "--join=True"] + worker
    env = dict(os.environ, GLOG_v="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    started = time.perf_counter()
    proc = subprocess.run(["timeout", str(timeout)] + command, cwd=run_dir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    ranks = []
    for r in range(world):
        path = os.path.join(report, f"rank{r}.json")
        ranks.append(json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else None)
    if proc.returncode != 0 or any(r is None or r["rc"] != 0 for r in ranks):
        print(f"{name}: failed (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
    return wall, ranks, proc.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/shard_memory")
    parser.add_argument("--as-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="predict_1,predict_tp2,predict_pp2,train_1,train_tp2")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.as_worker:
        return as_worker(args.as_worker, args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
    sys.path.insert(0, REPO)
    from convert.random_hf import make_random_hf
    from telechat2_ms.config import get_config

    os.makedirs(args.workdir, exist_ok=True)
    full = get_config("telechat2_3b")
    cut = full.replace(num_layers=2, name="telechat2_3b_2layers")
    files = {}
    for cfg in (full, cut):
        hf_dir = os.path.join(args.workdir, f"{cfg.name}_hf")
        ms_file = os.path.join(args.workdir, f"{cfg.name}_fp32.safetensors")
        if not os.path.isfile(ms_file):
            shutil.rmtree(hf_dir, ignore_errors=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from convert.random_hf import make_random_hf; from telechat2_ms.config import get_config; "
                            f"make_random_hf(sys.argv[2], get_config('telechat2_3b').replace(num_layers={cfg.num_layers}, "
                            f"name='{cfg.name}'), code='BF16')", REPO, hf_dir], check=True)
            subprocess.run([sys.executable, "-m", "convert", "hf2ms", hf_dir, ms_file, "--dtype", "fp32",
                            "--no-progress"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(hf_dir)
            print(f"wrote {ms_file} ({os.path.getsize(ms_file) / GIB:.2f} GiB) in {time.perf_counter() - started:.0f} s",
                  flush=True)
        files[cfg.name] = ms_file
    del make_random_hf
    cases = {
        "predict_1": (files[full.name], PREDICT, 1, 1), "predict_tp2": (files[full.name], PREDICT, 2, 1),
        "predict_pp2": (files[full.name], PREDICT, 1, 2), "train_1": (files[cut.name], TRAIN, 1, 1),
        "train_tp2": (files[cut.name], TRAIN, 2, 1),
    }
    rows = []
    for name in args.cases.split(","):
        checkpoint, run_args, tp, pp = cases[name]
        wall, ranks, _ = run_case(name, args.workdir, checkpoint, run_args, tp, pp)
        budgets = shard_bytes(checkpoint, tp, pp, name.startswith("train"))
        for r, (info, need) in enumerate(zip(ranks, budgets)):
            peak = info["peak_rss"] if info else float("nan")
            rows.append((name, r, peak, need, wall))
            print(f"{name:12s} rank {r}: peak RSS {peak / GIB:6.2f} GiB | shard {need / GIB:6.2f} GiB | budget "
                  f"{(need + 2 * GIB) / GIB:6.2f} GiB | {'ok' if peak <= need + 2 * GIB else 'OVER'} | "
                  f"job {wall:.0f} s", flush=True)
    print("\n| run | rank | peak RSS (GiB) | shard bytes (GiB) | shard + 2 GiB | within |")
    print("|---|---|---|---|---|---|")
    for name, r, peak, need, _ in rows:
        print(f"| {name} | {r} | {peak / GIB:.2f} | {need / GIB:.2f} | {(need + 2 * GIB) / GIB:.2f} | "
              f"{'yes' if peak <= need + 2 * GIB else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
