"""research/bench_speed.py end to end at the tiny size: both workers run, the table and JSON come out, and the
two frameworks generate the same greedy tokens (a check that they ran the same model). No timing is
asserted (machines are noisy); the figures themselves come from running the script (README Performance)."""
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research", "bench_speed.py")


def test_bench_speed_runs_both_frameworks_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--size", "tiny", "--prompt-len", "16", "--new-tokens", "6",
                           "--batches", "1", "2", "--train-seq", "16", "--train-batches", "1", "2", "--repeats", "1",
                           "--warm-up", "2", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, GLOG_v="3"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| prefill b2 x 16" in proc.stdout and "| train step b2 x 16" in proc.stdout
    report = json.loads(out.read_text())
    assert [row["measure"] for row in report["rows"]] == [
        "prefill b1 x 16", "prefill b2 x 16", "decode b1, 6 new after 16", "decode b2, 6 new after 16",
        "train step b1 x 16", "train step b2 x 16, port 2 x b1"]  # the port's default micro-batch: 1 row
    for row in report["rows"]:
        for side in ("port_tokens_per_s", "torch_tokens_per_s"):
            assert row[side]["runs"] == 1 and row[side]["median"] > 0
        assert row["ratio"] > 0
        for side in ("port", "torch"):  # each measure's own process: its peak RSS, its fraction of the roofline
            assert row["peak_rss_bytes"][side] > 0 and 0 < row["roofline"][side]
    # four processes a side, one per measure: every generation and training process is its own
    assert sorted(report["worker_wall_s"]) == ["generate:1", "generate:2", "train:1", "train:2"]
    assert report["greedy_tokens_agree"] == 6
    assert report["warm_up"] == 2 and "1 runs each after 2 untimed" in proc.stdout
    limits = report["limits"]
    assert limits["matmul_flops"] > 1e9 and set(limits["read_bandwidth"]) >= {"1"}
    assert limits["kernels"]["port"].startswith("oneDNN ") and "not seen" not in limits["kernels"]["port"]
    assert "sgemm" in limits["kernels"]["torch"]
    assert "CPU: " in proc.stdout and "GFLOP/s" in proc.stdout and report["cpu"]["model"]


def test_bench_speed_refuses_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--new-tokens", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--new-tokens must be >= 2" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--size", "telechat2_8b"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model size 'telechat2_8b'" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--train-batches", "1", "4", "--port-micro-batch", "3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--train-batches [4] are not multiples of --port-micro-batch 3" in proc.stderr
    assert "Traceback" not in proc.stderr
