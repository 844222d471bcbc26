"""The continuous-batching scheduler in process (no HTTP): requests that join and leave a running batch
generate exactly what generate.Generator (the predict path) gives each alone, also when rows need different
dynamic-NTK tables (prompts past training_seqlen) and with Qwen2's sliding-window layers."""
import queue

import numpy as np
import pytest

from telechat2_ms.config import get_config
from telechat2_ms.generate import GenerationConfig, Generator
from telechat2_ms.model import Telechat2ForCausalLM
from telechat2_ms.serving import engine
from telechat2_ms.serving.engine import QueueFull, Request, Runner, SamplingParams, Scheduler
from telechat2_ms.tokenizer import load_tokenizer

CONFIGS = {
    # training_seqlen 24: rows longer than 24 keys take NTK-scaled tables, shorter ones the plain ones
    "tiny_ntk": get_config("tiny", initializer_range=0.25, training_seqlen=24, base_seqlen=24),
    "qwen2_tiny": get_config("qwen2_tiny", initializer_range=0.25),  # a sliding-window layer (window 6)
}
MAX_LENGTH = 80


def _prompts(vocab):
    rng = np.random.default_rng(0)
    return [list(map(int, rng.integers(13, vocab, n))) for n in (5, 30, 12, 3, 40, 9)]


def _run(scheduler, tokenizer, prompts, max_tokens):
    """Submit every prompt at once, then start the scheduler (so that its first admission sees them all);
    -> the generated ids of each."""
    boxes = []
    for prompt, n in zip(prompts, max_tokens):
        box = queue.Queue()
        boxes.append(box)
        request = Request(prompt, SamplingParams(n, repetition_penalty=1.03), box.put, tokenizer)
        scheduler.submit(request)
        box.request = request
    scheduler.start()
    out = []
    for box in boxes:
        while True:
            event = box.get(timeout=120)
            if event.finish_reason is not None:
                assert event.finish_reason in ("stop", "length"), event
                out.append(box.request.generated)
                break
    return out


@pytest.mark.parametrize("layout", ["joining", "packed"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rows_joining_a_running_batch_generate_what_they_generate_alone(name, layout, monkeypatch):
    cfg = CONFIGS[name]
    model = Telechat2ForCausalLM(cfg, seed=0)
    tokenizer = load_tokenizer(None)
    prompts = _prompts(cfg.vocab_size)
    max_tokens = [20, 12, 30, 25, 8, 16]
    generator = Generator(model, MAX_LENGTH, use_jit=False)
    want = []
    for prompt, n in zip(prompts, max_tokens):
        gen = GenerationConfig(max_new_tokens=n, repetition_penalty=1.03, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id, stop_token_ids=tuple(tokenizer.stop_ids))
        ids = generator.generate([prompt], gen)[0]
        want.append(ids + ([] if len(ids) == n else [tokenizer.eos_id]))  # the scheduler keeps the end token
    # joining: 3 rows for 6 requests, later ones join while earlier ones decode; decode calls read 16, 32 or all
    # 81 slots per row, the fewest that hold the longest row of the call. packed: 6 rows, every prompt admitted
    # at once and prefilled in packs of at most 20 tokens (a longer prompt alone) and one RoPE table each
    if layout == "packed":
        monkeypatch.setattr(engine, "PACK_TOKENS", 20)
    rows, prefill_tokens = (3, 16) if layout == "joining" else (6, 200)
    runner = Runner(model, rows, MAX_LENGTH, use_jit=False, min_window=16, window_rows=1, prefill_bucket=8)
    assert runner.key_windows == [16, 32, MAX_LENGTH + 1]
    assert runner.prefill_lengths == ([8, 16, 24, 32, 48, 64, 96, 128, 192, 256] if layout == "joining"
                                      else [8, 16])
    windows, packs = [], []
    decode, prefill = runner.decode, runner.prefill
    runner.decode = lambda *args: windows.append(args[-1]) or decode(*args)
    runner.prefill = lambda rows, prompts, pad: packs.append([len(p) for p in prompts]) or prefill(rows, prompts, pad)
    scheduler = Scheduler(runner, tokenizer, queue_size=16, prefill_tokens=prefill_tokens)
    try:
        got = _run(scheduler, tokenizer, prompts, max_tokens)
        assert scheduler.steps < sum(len(g) for g in got)  # rows shared decode steps
    finally:
        scheduler.stop()
    assert got == want
    if layout == "joining":
        assert set(windows) == {16, 32, MAX_LENGTH + 1}, sorted(set(windows))  # rows of 5..48 slots
    else:  # prompts of 5, 30, 12, 3, 40 and 9 tokens
        tables = {runner.rope_key(len(p)) for p in prompts}
        assert len(tables) == (1 if name == "qwen2_tiny" else 3)  # tiny_ntk: the plain table, NTK at 30 and 40
        want_packs = {"qwen2_tiny": [[5, 12, 3], [30], [40], [9]], "tiny_ntk": [[5, 12, 3], [9], [30], [40]]}
        assert packs == want_packs[name]


def test_queue_bound_and_cancel_of_a_waiting_request():
    cfg = CONFIGS["tiny_ntk"]
    tokenizer = load_tokenizer(None)
    scheduler = Scheduler(Runner(Telechat2ForCausalLM(cfg, seed=0), 1, MAX_LENGTH, use_jit=False), tokenizer,
                          queue_size=2)
    boxes = [queue.Queue() for _ in range(3)]
    requests = [Request([20, 21, 22], SamplingParams(4), box.put, tokenizer) for box in boxes]
    scheduler.submit(requests[0])
    scheduler.submit(requests[1])
    with pytest.raises(QueueFull, match="serve.queue_size 2"):
        scheduler.submit(requests[2])
    requests[1].cancel()  # before the scheduler ever ran it
    scheduler.start()
    try:
        assert boxes[1].get(timeout=60).finish_reason == "cancelled"
        events = [boxes[0].get(timeout=60)]
        while events[-1].finish_reason is None:
            events.append(boxes[0].get(timeout=60))
        assert events[-1].finish_reason in ("stop", "length")
    finally:
        scheduler.stop()
    assert scheduler.stats()["cancelled"] == 1 and scheduler.stats()["waiting"] == 0
