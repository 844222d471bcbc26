"""Training-step throughput of the parallel layouts on this CPU: one process, then dp2, tp2, tp2+sp, pp2 and cp2
under msrun (2 workers), each compiled (settings.jit: every pipeline stage's forward and backward one graph) and
PyNative (op by op), one after the other in one run, with the same total threads (one process: --threads; each of
the 2 workers: --threads / 2).

    GLOG_v=3 .venv/bin/python research/bench_parallel.py
    GLOG_v=3 .venv/bin/python research/bench_parallel.py --model tiny --seq 64 --layouts single tp2 --modes jit

Every run is the train run mode (the one trainer, train/trainer.py, on demo SFT data truncated to --seq) with the
same global batch of --batch sequences: one process takes them as one micro-batch, dp2 and pp2 as 2 x --batch/2
(pp2: 2 micro-batches through the 1F1B schedule). A run's tokens/s = batch x seq / the median step time of the
--steps steps after --warm-up untimed ones (default 6: the first compiles, and MindSpore's CPU kernels other than
the matmuls run their first 5 launches on one thread while they search their work split, ParallelLaunchAutoSearch;
research/bench_speed.py). Prints a table (tokens/s; the ratio to one process in the same mode; the
compiled / PyNative ratio of the layout) and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {  # name -> (workers, parallel_config arguments, sequences per micro-batch = batch / this)
    "single": (1, [], 1),
    "dp2": (2, ["--parallel_config.data_parallel=2"], 2),
    "tp2": (2, ["--parallel_config.model_parallel=2"], 1),
    "tp2_sp": (2, ["--parallel_config.model_parallel=2", "--parallel_config.use_seq_parallel=true"], 1),
    "pp2": (2, ["--parallel_config.pipeline_stage=2", "--parallel_config.micro_batch_num=2"], 2),
    "cp2": (2, ["--parallel_config.context_parallel=2"], 1),
}
MODES = ("jit", "pynative")


def worker(threads: int, train_args: List[str]) -> None:
    """One process of a run: set the thread count, then the one entry point (run_telechat2.py: under msrun it
    initialises communication and checks the layout against the world size)."""
    import mindspore as ms

    ms.device_context.cpu.op_tuning.threads_num(threads)
    sys.path.insert(0, REPO_ROOT)
    import run_telechat2

    sys.exit(run_telechat2.main(["--run_mode=finetune"] + train_args))


def train_args(args, layout: str, mode: str, output_dir: str) -> List[str]:
    _, parallel, split = LAYOUTS[layout]
    return [f"--model={args.model}", f"--train.train_dataset=demo:{4 * args.batch}",
            f"--seq_length={args.seq}", "--train.truncation=truncate", f"--train.batch_size={args.batch // split}",
            f"--train.total_steps={args.warm_up + args.steps}", f"--jit={'true' if mode == 'jit' else 'false'}",
            f"--output_dir={output_dir}"] + parallel


def run(args, layout: str, mode: str, port: int) -> Dict:
    """One layout in one mode -> {"step_times", "tokens_per_s"} or {"error"}."""
    workers = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory(prefix=f"bench_parallel_{layout}_{mode}_") as tmp:
        output_dir = os.path.join(tmp, "run")
        threads = args.threads if workers == 1 else max(args.threads // workers, 1)
        script = [os.path.abspath(__file__), "worker", str(threads)] + train_args(args, layout, mode,
                                                                                           output_dir)
        env = dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3"), OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        if workers == 1:
            command = [sys.executable] + script
        else:
            command = ["msrun", f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={port}",
                       f"--log_dir={os.path.join(tmp, 'msrun_log')}", "--join=True"] + script
        start = time.monotonic()
        try:
            done = subprocess.run(["timeout", str(args.timeout)] + command, cwd=tmp, env=env, capture_output=True,
                                  text=True)
        except OSError as e:
            return {"error": str(e)}
        metrics = os.path.join(output_dir, "metrics.jsonl")
        if done.returncode or not os.path.isfile(metrics):
            logs = os.path.join(tmp, "msrun_log")
            tail = "".join(open(os.path.join(logs, f), encoding="utf-8", errors="replace").read()[-1500:]
                           for f in sorted(os.listdir(logs))) if os.path.isdir(logs) else done.stderr[-3000:]
            return {"error": f"exit {done.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                    "log_tail": tail[-3000:]}
        with open(metrics, encoding="utf-8") as f:
            steps = [json.loads(line) for line in f if line.strip()]
    times = [s["step_time_s"] for s in steps]
    if len(times) < args.warm_up + args.steps:
        return {"error": f"{len(times)} steps logged, {args.warm_up + args.steps} expected"}
    timed = times[args.warm_up:]
    median = statistics.median(timed)
    return {"step_times": times, "median_step_s": median, "tokens_per_s": args.batch * args.seq / median,
            "wall_s": time.monotonic() - start, "losses": [s["loss"] for s in steps]}


def fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bench_100m", help="registry size (default bench_100m, ~100M parameters)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch", type=int, default=4, help="global batch in sequences, even (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per run (default 5)")
    p.add_argument("--warm-up", type=int, default=6,
                   help="untimed training steps first (default 6; the first compiles, see the module docstring)")
    p.add_argument("--threads", type=int, default=2, help="total CPU threads of a run (default 2)")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run before it is stopped (default 1800)")
    p.add_argument("--port", type=int, default=8150, help="msrun master port (default 8150)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "research", "results", "bench_parallel.json"))
    args = p.parse_args(argv)
    if args.batch < 2 or args.batch % 2 or args.steps < 1 or args.warm_up < 1 or args.threads < 1:
        p.error("--batch must be even and >= 2, --steps, --warm-up, --threads >= 1")

    from telechat2_ms.cpu import cpu_info

    cpu = cpu_info()[0]
    results: Dict[str, Dict[str, Dict]] = {}
    for layout in args.layouts:
        for mode in args.modes:
            print(f"running {layout} {mode} ...", flush=True)
            result = run(args, layout, mode, args.port)
            results.setdefault(layout, {})[mode] = result
            print(f"  {fmt(result.get('tokens_per_s'))} tok/s" if "error" not in result else
                  f"  failed: {result['error']}", flush=True)

    def speed(layout, mode):
        return results.get(layout, {}).get(mode, {}).get("tokens_per_s")

    print(f"\n{args.model}, {args.batch} x {args.seq} tokens per step, {args.threads} threads per run in total, "
          f"the median of {args.steps} steps after {args.warm_up} untimed; CPU: {cpu}")
    print("| layout | compiled tok/s | x one process | PyNative tok/s | x one process | compiled / PyNative |")
    print("|---|---|---|---|---|---|")
    for layout in args.layouts:
        jit, eager = speed(layout, "jit"), speed(layout, "pynative")
        ref_jit, ref_eager = speed("single", "jit"), speed("single", "pynative")
        print(f"| {layout} | {fmt(jit)} | {fmt(jit / ref_jit if jit and ref_jit else None, '.2f')} | {fmt(eager)} | "
              f"{fmt(eager / ref_eager if eager and ref_eager else None, '.2f')} | "
              f"{fmt(jit / eager if jit and eager else None, '.2f')} |")
    report = {"model": args.model, "seq": args.seq, "batch": args.batch, "steps": args.steps, "warm_up": args.warm_up,
              "threads": args.threads, "cpu": cpu, "date": time.strftime("%Y-%m-%d"), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":  # one process of a run (positional: msrun parses "--" options)
        worker(int(sys.argv[2]), sys.argv[3:])
    else:
        sys.exit(main())
