"""Serving benchmark: this port's `--run_mode serve` against HF `transformers serve --continuous-batching`, the
same weights on this CPU, one server after the other in one run, driven by the same openai-client load.

    pip install -e ".[test,bench]"    # transformers serve needs accelerate
    .venv/bin/python research/bench_serve.py --workdir /tmp/bench_serve          # about 15 minutes, 2 GB of disk

The model is a random Qwen2 (transformers' Qwen2ForCausalLM, fp32; TeleChat2 is remote code in HF, so HF's
server cannot load it) with the real 151,936-piece Qwen2 vocabulary and ChatML template; this port serves its
conversion (`python -m convert hf2ms`). For each concurrency (1, 8, 32) the load generator keeps that many
streamed chat requests in flight (fixed prompts of 20 to 200 tokens, greedy, max_tokens fixed), and records per
request the time to the first content chunk (TTFT) and the time per output token after it (TPOT); output
tokens/s is the completion tokens (from `usage`) of all requests over the wall time; latency / token is a
request's whole time over its completion tokens (the one per-token figure that stays meaningful for a server
that sends its text in few chunks: the table counts content chunks against tokens). Prints a table and
writes results.json. Run it with nothing else running on the machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS = os.path.join(os.path.dirname(REPO), "shared", "reference", "qwen2", "qwen.tiktoken")
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
WORDS = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hum about rivers, mountains "
         "and the long history of small towns near the sea").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(directory: str, args) -> None:
    """A random Qwen2 in the HF layout with a tokenizer.json from the real Qwen2 ranks and the ChatML template."""
    import torch
    import transformers
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    sys.path.insert(0, REPO)
    from telechat2_ms.chat_template import CHATML_JINJA_TEMPLATE
    from telechat2_ms.tokenizer_bpe import QWEN2_PATTERN

    conf = transformers.Qwen2Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=args.ffn,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
                                    max_position_embeddings=4096,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(conf).save_pretrained(directory)
    tok = TikTokenConverter(vocab_file=RANKS, pattern=QWEN2_PATTERN, extra_special_tokens=list(SPECIAL)).converted()
    tok.normalizer = normalizers.NFC()
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in SPECIAL.items()},
                   "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML_JINJA_TEMPLATE}, f)
    with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643, "do_sample": False}, f)


def prompts(n: int) -> List[str]:
    """n fixed prompts of 20 to 200 words."""
    out = []
    for i in range(n):
        length = 20 + (i * 37) % 181
        out.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)))
    return out


def wait_up(base: str, proc, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    raise RuntimeError("server did not come up")


def one_request(client, model: str, prompt: str, max_tokens: int, extra: Dict) -> Dict[str, float]:
    start = time.perf_counter()
    first = None
    tokens = None
    chunks = 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if first is None:
                first = time.perf_counter()
        if getattr(chunk, "usage", None) is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    tokens = tokens if tokens is not None else chunks
    first = first or end
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens, "end": end,
            "chunks": chunks, "per_token": (end - start) / max(tokens, 1)}


def load(base: str, model: str, concurrency: int, requests: int, max_tokens: int, extra: Dict) -> Dict:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
    texts = prompts(requests)
    for text in texts:  # warm-up, both servers alike: every prompt length once (this port compiles one prefill
        one_request(client, model, text, 2, extra)  # per length bucket; either allocates on first use)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda t: one_request(client, model, t, max_tokens, extra), texts))
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results]

    def p99(values):
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]

    return {"concurrency": concurrency, "requests": requests, "output_tokens": sum(r["tokens"] for r in results),
            "content_chunks": sum(r["chunks"] for r in results),
            "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_median_s": statistics.median(ttft), "ttft_p99_s": p99(ttft),
            "tpot_median_s": statistics.median(tpot), "tpot_p99_s": p99(tpot),
            "latency_per_token_median_s": statistics.median(r["per_token"] for r in results)}


def serve(name: str, command: List[str], base: str, model: str, args, log_path: str, extra: Dict) -> List[Dict]:
    env = dict(os.environ, GLOG_v="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["timeout", str(args.timeout)] + command, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=os.path.dirname(log_path))
    try:
        wait_up(base, proc)
        rows = []
        for c in args.concurrency:
            row = load(base, model, c, max(args.requests_per_level, 2 * c), args.max_tokens, extra)
            row["server"] = name
            print(f"{name:22s} c={c:<3d} {row['tokens_per_s']:8.1f} tok/s  TTFT med {row['ttft_median_s']:.3f} s "
                  f"p99 {row['ttft_p99_s']:.3f} s  TPOT med {row['tpot_median_s'] * 1000:.1f} ms "
                  f"p99 {row['tpot_p99_s'] * 1000:.1f} ms  ({row['output_tokens']} tokens in {row['content_chunks']} "
                  f"chunks, {row['wall_s']:.1f} s)",
                  flush=True)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_description() -> str:
    from telechat2_ms.cpu import cpu_info

    model, flags = cpu_info()
    vector = " ".join(sorted(x for x in flags if x.startswith(("avx", "amx"))))
    return f"{model} ({os.cpu_count()} cores; {vector})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/bench_serve")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-level", type=int, default=16, help="requests per concurrency (at least 2 x c)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=1024, help="this port's context (KV cache slots per row)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds each server may live")
    p.add_argument("--servers", default="telechat2_ms,transformers")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    hf_dir = os.path.join(args.workdir, "qwen2_bench")
    ms_file = os.path.join(args.workdir, "qwen2_bench_ms.safetensors")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        make_model(hf_dir, args)
    if not os.path.isfile(ms_file):
        subprocess.run([sys.executable, "-m", "convert", "hf2ms", hf_dir, ms_file, "--no-progress"], check=True,
                       cwd=REPO, env=dict(os.environ, GLOG_v="3"))
    print(f"CPU: {cpu_description()}", flush=True)
    rows = []
    if "telechat2_ms" in args.servers:
        port = free_port()
        command = [sys.executable, os.path.join(REPO, "run_telechat2.py"), "--run_mode", "serve",
                   "--load_checkpoint", ms_file, "--tokenizer", hf_dir, "--seq_length", str(args.seq_length),
                   "--serve.port", str(port), "--serve.max_batch", str(max(args.concurrency)),
                   "--serve.served_model_name", "bench", "--serve.prefill_tokens", "4096"]
        rows += serve("telechat2_ms", command, f"http://127.0.0.1:{port}", "bench", args,
                      os.path.join(args.workdir, "telechat2_ms.log"), {"repetition_penalty": 1.0})
    if "transformers" in args.servers:
        port = free_port()
        transformers_cli = os.path.join(os.path.dirname(sys.executable), "transformers")
        command = [transformers_cli, "serve", hf_dir, "--continuous-batching", "--device", "cpu", "--dtype",
                   "float32", "--port", str(port), "--host", "127.0.0.1"]
        rows += serve("transformers serve (cb)", command, f"http://127.0.0.1:{port}", hf_dir, args,
                      os.path.join(args.workdir, "transformers.log"), {})
    by = {(r["server"], r["concurrency"]): r for r in rows}
    print("\n| concurrency | server | output tok/s | TTFT median / p99 (s) | TPOT median / p99 (ms) | "
          "latency / token median (ms) | content chunks / tokens |")
    print("|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        for name in ("telechat2_ms", "transformers serve (cb)"):
            r = by.get((name, c))
            if r:
                print(f"| {c} | {name} | {r['tokens_per_s']:.1f} | {r['ttft_median_s']:.3f} / {r['ttft_p99_s']:.3f} | "
                      f"{r['tpot_median_s'] * 1000:.1f} / {r['tpot_p99_s'] * 1000:.1f} | "
                      f"{r['latency_per_token_median_s'] * 1000:.1f} | {r['content_chunks']} / {r['output_tokens']} |")
        ours, ref = by.get(("telechat2_ms", c)), by.get(("transformers serve (cb)", c))
        if ours and ref:
            tpot_ratio = (f"{ours['tpot_median_s'] / ref['tpot_median_s']:.2f}x"
                          if ref["tpot_median_s"] > 0 else "n/a")
            print(f"| {c} | ours / HF | {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x | | {tpot_ratio} | "
                  f"{ours['latency_per_token_median_s'] / ref['latency_per_token_median_s']:.2f}x | |")
    out = os.path.join(args.workdir, "results.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"cpu": cpu_description(), "args": vars(args), "rows": rows}, f, indent=2)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
