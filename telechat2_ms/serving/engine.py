"""Continuous batching over one slot-based KV cache: requests join the running decode batch between steps.

The cache has `max_batch` rows of `max_length + 1` slots (generate.CachedSteps; the last slot of every row is a
scratch slot that is never attended). A request owns one row from admission to its end:
- admission (between two decode steps): the prompts admitted together are packed one after the other into
  sequences of at most PACK_TOKENS tokens (a longer prompt alone), each causal within itself with its own
  positions (and its own dynamic-NTK table: prompts whose tables differ go in different packs); a pack is
  padded at its end to one of Runner.prefill_lengths (so the compiled prefill is built once per length, not
  per total) and run as one batch-1 forward whose K/V are scattered into the prompts' rows, slots 0..n-1
  (CachedSteps.prefill_rows; pads into a scratch slot); the head then runs once over the last positions of
  every prompt admitted at that step (CachedSteps.head_rows) and each first token is sampled. At most
  `prefill_tokens` prompt tokens are admitted per step (at least one request), so newcomers do not stall
  the running rows for long.
- decode: one compiled step over the first n cache rows (n the smallest power of two holding every active
  row, rows being taken lowest first) and, from WINDOW_ROWS rows on, their first W slots only (W the smallest
  of Runner.key_windows that holds the longest row: powers of two from `min_window` up to half the slots,
  then all; short rows do not read and attend over the whole cache); one compiled step per (n, W); each row
  writes its own slot (its length so far), attends to its own valid slots, and has its own position and RoPE
  table (the dynamic NTK rule for its own key length; rows whose tables differ run in separate calls, the
  others writing into their scratch slot). Free rows compute on a pad token into their scratch slot.
- sampling: per row, with the row's own settings and seed (sampling.TokenSampler on the row's logits; the
  uniform draw from the request's own numpy Generator, as generate.Generator draws it). Greedy rows without a
  repetition penalty take the argmax the compiled step computed beside the logits (no sampler call).
- before serving, `Runner.warm_up` compiles the decode step for every row count and key window, the prefill
  for every pack length and the head for every row count, so no request waits for a compilation (3-4 s each
  at 100M parameters on CPU; prompts longer than PACK_TOKENS compile their length on first use).
- a row ends at an end-of-sequence / stop token, a stop string, max_tokens, or when its client is gone
  (cancel); its slot is free for the next waiting request at once.
Every decision is made by the scheduler thread; the model work it asks for goes through `Runner`, which under
msrun first broadcasts the call so that every rank steps the same batch (parallel/ranks.broadcast_object).
Shapes: B = max_batch rows, T = max_length + 1 slots, V vocab.
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, ops

from telechat2_ms.generate import CachedSteps
from telechat2_ms.model import layer_masks, mask_tensors
from telechat2_ms.rope import rope_parameters
from telechat2_ms.sampling import TokenSampler


HEARTBEAT_SECONDS = 10.0  # msrun: an idle scheduler still sends a call this often
# decode calls of fewer rows read every slot: gathering a window of a few rows' cache costs more than it saves
# (bench_serve model, 1025 slots: 1 row 31.5 ms whole vs 34.3 ms at 256 slots; 8 rows 45.6 vs 42.5 (256) and
# 52.2 (512); 32 rows 114.7 vs 89.8 (256) and 97.7 (512))
WINDOW_ROWS = 16
# prompts admitted together are packed into prefill sequences of at most this many tokens: one forward instead
# of one per prompt; the packed attention is dense over the whole pack, hence the bound (bench_serve model, its
# 64 prompts of 21-210 tokens admitted 32 at a time, scheduler in process: one forward per prompt 3.34 s, packs
# of <= 128 tokens 4.14 s, <= 256 2.72 s, <= 512 3.06 s)
PACK_TOKENS = 256


class QueueFull(Exception):
    """The waiting queue holds `queue_size` requests already."""


@dataclass
class SamplingParams:
    max_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    skip_special_tokens: bool = True

    @property
    def sampler_key(self) -> Tuple:
        if not self.do_sample:  # greedy ignores temperature / top-k / top-p
            return (False, 1.0, 0, 1.0, self.repetition_penalty)
        return (True, self.temperature, self.top_k, self.top_p, self.repetition_penalty)


@dataclass
class Event:
    """What a request's consumer receives: text as it is produced, then one final event."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # stop | length | cancelled | error (the last event only)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None


class _StopStrings:
    """Holds back the text that could be the start of a stop string; reports the text before a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def push(self, text: str) -> Tuple[str, bool]:
        """-> (text safe to emit, stopped)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        cut = max(len(self.pending) - self.keep, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Request:
    """One generation request; `emit(Event)` is called from the scheduler thread."""

    _ids = itertools.count()

    def __init__(self, prompt: Sequence[int], params: SamplingParams, emit: Callable[[Event], None], tokenizer):
        self.id = next(self._ids)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.emit = emit
        self.rng = np.random.default_rng(params.seed)
        self.decoder = tokenizer.incremental_decoder(params.skip_special_tokens)
        self.stops = _StopStrings(params.stop)
        self.generated: List[int] = []
        self.cancelled = False
        self.row: Optional[int] = None

    def cancel(self) -> None:
        """Thread-safe: the scheduler frees the request's row (or drops it from the queue) before its next step."""
        self.cancelled = True


class Runner:
    """The model work of the scheduler, on this process's model (a tensor-parallel shard under msrun)."""

    def __init__(self, model, max_batch: int, max_length: int, use_jit: bool, min_window: int = 256,
                 window_rows: int = WINDOW_ROWS, prefill_bucket: int = 32):
        self.model = model
        self.cfg = model.config
        self.batch, self.slots = max_batch, max_length + 1
        # the key windows of the decode calls: min_window, twice that, ... up to half the slots, then every slot
        self.key_windows = [min_window << i for i in range(self.slots.bit_length())
                            if 0 < min_window << i <= self.slots // 2] + [self.slots]
        self.window_rows = window_rows
        # the prefill's sequence lengths up to PACK_TOKENS: bucket x 1, 2, 3, 4, 6, 8, 12, ... (at most half
        # pads); longer prompts: multiples of PACK_TOKENS (or of the bucket, when larger)
        bucket = max(1, prefill_bucket)
        multiples = {1} | {m << i for m in (2, 3) for i in range(PACK_TOKENS.bit_length())}
        largest = max(PACK_TOKENS, bucket)
        self.prefill_lengths = sorted(bucket * m for m in multiples if bucket * m <= largest)
        self.steps = CachedSteps(model, max_batch, self.slots)
        self.prefill_fn = ms.jit(self.steps.prefill_rows) if use_jit else self.steps.prefill_rows
        self.head_fn = ms.jit(self.steps.head_rows) if use_jit else self.steps.head_rows
        self._prefilled: List[Tensor] = []  # last hidden states [n,H] of the prompts not yet through the head
        self.decode_fn = ms.jit(self.steps.decode_rows) if use_jit else self.steps.decode_rows
        self.use_jit = use_jit
        self._rope_tensors: Dict[Tuple[float, float], Tuple[Tensor, Tensor]] = {}

    def idle(self) -> None:
        """Nothing to do (the msrun heartbeat)."""

    def widths(self) -> List[int]:
        """The row counts of the decode calls (decode_rows of 1..max_batch)."""
        return sorted({decode_rows(n, self.batch) for n in range(1, self.batch + 1)})

    def windows(self, width: int) -> List[int]:
        """The key windows of a decode call of `width` rows (all slots below window_rows rows)."""
        return self.key_windows if width >= self.window_rows else [self.slots]

    def key_window(self, needed: int, width: int) -> int:
        """The slots a decode call of `width` rows reads per row: the smallest of its windows holding `needed`."""
        return next(w for w in self.windows(width) if w >= needed)

    def warm_up(self, log: Optional[Callable[[str], None]] = None) -> None:
        """Compile the decode step for every row count and key window, the head and the prefill before serving
        (every rank alike under msrun). Every row is free: the decode steps write a pad token into their scratch
        slots, which nothing attends, and the prefills write row 0."""
        if not self.use_jit:
            return
        start = time.monotonic()
        scratch = self.slots - 1
        calls = [(width, window) for width in self.widths() for window in self.windows(width)]
        for width, window in calls:
            self.decode([0] * width, [0] * width, [scratch] * width, [scratch] * width, 1, window)[1].asnumpy()
        for width in self.widths():
            self.head_fn(ops.zeros((width, self.cfg.hidden_size), self.model.compute_dtype))[1].asnumpy()
        for length in self.prefill_lengths:  # `length` one-token prompts into slot 0 of row 0, free before serving
            self.prefill([0] * length, [[0]] * length, 0)
        self._prefilled = []
        if log is not None:
            log(f"compiled the decode step for (rows, key slots) {', '.join(map(str, calls))}, the head for "
                f"{', '.join(map(str, self.widths()))} rows and the prefill of {', '.join(map(str, self.prefill_lengths))}"
                f" tokens in {time.monotonic() - start:.1f} s")

    def rope_key(self, key_length: int) -> Tuple[float, float]:
        params = rope_parameters(key_length, self.cfg)
        key = (params.alpha, params.mscale)
        if key not in self._rope_tensors:
            self._rope_tensors[key] = (Tensor(params.inv_freq), Tensor(np.float32(params.mscale)))
        return key

    def prefill_length(self, tokens: int) -> int:
        """The sequence length of a prefill of `tokens` tokens: the smallest of prefill_lengths that holds them,
        or the next multiple of the largest."""
        step = self.prefill_lengths[-1]
        return next((n for n in self.prefill_lengths if n >= tokens), -(-tokens // step) * step)

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> None:
        """Prompt i into cache row rows[i], slots 0..len-1, all in one forward of the prompts one after the
        other, padded at the end to prefill_length (the prompts share one dynamic-NTK table: rope_key of each
        length alike); their last hidden states wait for `head`."""
        lengths = np.array([len(p) for p in prompts])
        total = int(lengths.sum())
        padded = self.prefill_length(total)
        if len({self.rope_key(int(n)) for n in lengths}) != 1:
            raise ValueError("prompts packed into one prefill must share their RoPE table")
        segment = np.full(padded, -1)  # the prompt of each position (-1: a pad)
        segment[:total] = np.repeat(np.arange(len(prompts)), lengths)
        slot = np.full(padded, self.slots - 1)  # the cache slot of each position (pads: a scratch slot)
        slot[:total] = np.concatenate([np.arange(n) for n in lengths])
        ids = np.full((1, padded), pad_id, np.int32)
        ids[0, :total] = np.concatenate([np.asarray(p, np.int64) for p in prompts])
        allowed = (segment[:, None] == segment[None, :]) & np.tril(np.ones((padded, padded), bool))  # [P,P]
        row = np.asarray(rows)[np.maximum(segment, 0)]  # pads: the first prompt's row (its scratch slot)
        heads = self.steps.kv_heads
        cache_rows = row[None] * heads + np.arange(heads)[:, None]  # [k,P]
        index = np.stack(np.broadcast_arrays(cache_rows, slot[None]), -1).reshape(-1, 2)  # [k*P, 2] (row, slot)
        inv_freq, mscale = self._rope_tensors[self.rope_key(int(lengths[0]))]
        masks = mask_tensors(layer_masks(self.cfg, allowed[None, None], np.arange(padded), padded))
        hidden = self.prefill_fn(Tensor(ids), Tensor(np.where(segment < 0, 0, slot)[None].astype(np.int32)), masks,
                                 inv_freq, mscale, Tensor(index.astype(np.int32)))  # [P,H]
        self._prefilled.append(ops.gather(hidden, Tensor((np.cumsum(lengths) - 1).astype(np.int32)), 0))

    def head(self):
        """The head over the last positions of the prompts prefilled since the last call, in their order, in
        one call (one read of the [V,H] weights, 311 MB for Qwen2's vocabulary at hidden 512, instead of one per
        prompt; rows padded to decode_rows' count) -> (logits [n,V], argmax [n]) (device)."""
        hidden, self._prefilled = ops.concat(self._prefilled, 0), []
        count = hidden.shape[0]
        width = decode_rows(count, self.batch)
        if width > count:
            hidden = ops.concat([hidden, ops.zeros((width - count, hidden.shape[1]), hidden.dtype)], 0)
        return self.head_fn(hidden)  # [width,H]

    def decode(self, tokens, positions, write, starts, key_length: int, window: int):
        """One step for every row: tokens/positions [B], write [B] (each row's slot for this token), starts [B]
        (its first valid slot; slots start..write are attended), key_length (the RoPE tables' key count, the
        same table for every row of the call), window (one of key_windows: slots 0..window-1 are read, every
        row's start..write must lie in them; free rows write their scratch slot, outside it, and attend to
        nothing) -> (logits [B,V], each row's argmax [B]) (device)."""
        tokens, positions, write, starts = (np.asarray(a, np.int64) for a in (tokens, positions, write, starts))
        slots = np.arange(window)  # rows: the first len(tokens) cache rows (a power of two, or max_batch)
        allowed = ((slots[None] >= starts[:, None]) & (slots[None] <= write[:, None]))[:, None, None, :]  # [B,1,1,W]
        masks = mask_tensors(layer_masks(self.cfg, allowed, write[:, None], window))
        inv_freq, mscale = self._rope_tensors[self.rope_key(key_length)]
        return self.decode_fn(Tensor(tokens.reshape(-1, 1).astype(np.int32)),
                              Tensor(positions.reshape(-1, 1).astype(np.int32)), masks, inv_freq, mscale,
                              Tensor(write.reshape(-1, 1).astype(np.int32)))


class Scheduler:
    """The scheduler thread: a bounded waiting queue, `max_batch` rows, one decode step at a time."""

    def __init__(self, runner: Runner, tokenizer, queue_size: int = 64, prefill_tokens: int = 512,
                 broadcast: Optional[Callable[[Any], Any]] = None):
        self.runner = runner
        self.tokenizer = tokenizer
        self.cfg = runner.cfg
        self.queue_size = queue_size
        self.prefill_tokens = prefill_tokens
        self.broadcast = broadcast  # msrun: sends each model call to the other ranks first
        self.pad_id = tokenizer.pad_id
        self.end_ids = frozenset(tokenizer.stop_ids) | {tokenizer.eos_id}
        self._inbox: "queue.Queue[Request]" = queue.Queue()
        self._waiting: Deque[Request] = collections.deque()
        self._rows: List[Optional[Request]] = [None] * runner.batch
        self._lengths = np.zeros(runner.batch, np.int64)  # slots used (tokens in the cache, from slot 0)
        self._last = np.zeros(runner.batch, np.int64)  # each row's newest token (the next decode input)
        self._seen = np.zeros((runner.batch, self.cfg.vocab_size), bool)  # repetition penalty bookkeeping
        self._samplers: Dict[Tuple, TokenSampler] = {}
        self._lock = threading.Lock()
        self._pending = 0  # requests submitted and not yet admitted to a row
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.finished: Dict[str, int] = collections.Counter()  # finish reason -> requests

    # ---- the request side (any thread) ----------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.runner.slots - 1

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._pending >= self.queue_size:
                raise QueueFull(f"{self._pending} requests are waiting (serve.queue_size {self.queue_size})")
            self._pending += 1
        self._inbox.put(request)

    def stats(self) -> Dict[str, int]:
        return {"running": sum(r is not None for r in self._rows), "waiting": self._pending,
                "max_batch": self.runner.batch, "decode_steps": self.steps,
                **{reason: self.finished[reason] for reason in ("stop", "length", "cancelled", "error")}}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="telechat2-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the scheduler thread -------------------------------------------------------------------------------
    def _call(self, name: str, *args):
        if self.broadcast is not None:
            self.broadcast((name, args))
            self._last_broadcast = time.monotonic()
        return getattr(self.runner, name)(*args)

    def _loop(self) -> None:
        self._last_broadcast = time.monotonic()
        while not self._stop.is_set():
            busy = any(r is not None for r in self._rows) or self._waiting
            self._take_inbox(block=not busy)
            if self._stop.is_set():
                break
            if self.broadcast is not None and time.monotonic() - self._last_broadcast > HEARTBEAT_SECONDS:
                self._call("idle")  # the other ranks wait inside a collective: keep it from timing out
            try:
                self._admit()
                self._decode()
            except Exception as err:  # a failed step ends the requests it touched, the server keeps serving
                for row, req in enumerate(self._rows):
                    if req is not None:
                        self._finish(row, "error", error=f"{type(err).__name__}: {err}")
        for req in list(self._waiting):
            req.emit(Event(finish_reason="cancelled", prompt_tokens=len(req.prompt)))
        if self.broadcast is not None:
            self.broadcast(("stop", ()))

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        newcomers: List[int] = []
        try:
            self._admit_into(newcomers)
        finally:
            if newcomers:  # their first tokens, from one head call
                logits, greedy = self._call("head")
                self._sample_rows(newcomers, logits, greedy, list(range(len(newcomers))))

    def _admit_into(self, newcomers: List[int]) -> None:
        """Waiting requests into free rows, at most prefill_tokens prompt tokens (at least one request); their
        prompts prefilled in packs of one RoPE table and at most PACK_TOKENS tokens each (first fit in admission
        order); a row joins `newcomers` once its pack ran."""
        budget = self.prefill_tokens
        admitted: List[int] = []
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                self._dequeued()
                self.finished["cancelled"] += 1
                req.emit(Event(finish_reason="cancelled", prompt_tokens=len(req.prompt)))
                continue
            free = [row for row, r in enumerate(self._rows) if r is None]
            if not free or (admitted and len(req.prompt) > budget):
                break
            self._waiting.popleft()
            self._dequeued()
            row = free[0]
            req.row = row
            self._rows[row] = req
            self._lengths[row] = len(req.prompt)
            self._seen[row] = False
            self._seen[row, req.prompt] = True
            admitted.append(row)
            budget -= len(req.prompt)
        packs: Dict[Tuple[float, float], List[List[int]]] = {}
        for row in admitted:  # first fit
            table = packs.setdefault(self.runner.rope_key(int(self._lengths[row])), [])
            room = [pack for pack in table if self._lengths[pack + [row]].sum() <= PACK_TOKENS]
            if room:
                room[0].append(row)
            else:
                table.append([row])
        for pack in itertools.chain.from_iterable(packs.values()):
            self._call("prefill", pack, [self._rows[row].prompt for row in pack], self.pad_id)
            newcomers.extend(pack)

    def _dequeued(self) -> None:
        with self._lock:
            self._pending -= 1

    def _decode(self) -> None:
        for row, req in enumerate(self._rows):
            if req is not None and req.cancelled:
                self._finish(row, "cancelled")
        active = [row for row, r in enumerate(self._rows) if r is not None]
        if not active:
            return
        groups: Dict[Tuple[float, float], Tuple[int, List[int]]] = {}
        for row in active:  # rows whose dynamic-NTK tables agree share one call
            key_length = int(self._lengths[row]) + 1
            groups.setdefault(self.runner.rope_key(key_length), (key_length, []))[1].append(row)
        scratch = self.runner.slots - 1
        width = decode_rows(max(active) + 1, self.runner.batch)  # rows are taken lowest first: usually compact
        for key_length, rows in groups.values():
            tokens = np.full(width, self.pad_id, np.int64)
            write = np.full(width, scratch, np.int64)
            starts = np.full(width, scratch, np.int64)
            positions = np.zeros(width, np.int64)
            tokens[rows] = self._last[rows]
            write[rows] = self._lengths[rows]
            starts[rows] = 0
            positions[rows] = self._lengths[rows]
            window = self.runner.key_window(int(self._lengths[rows].max()) + 1, width)
            logits, greedy = self._call("decode", tokens.tolist(), positions.tolist(), write.tolist(),
                                        starts.tolist(), key_length, window)
            self._lengths[rows] += 1
            self._sample_rows(rows, logits, greedy, rows)
        self.steps += 1

    def _sampler(self, key: Tuple) -> TokenSampler:
        if key not in self._samplers:
            self._samplers[key] = TokenSampler(self.cfg.vocab_size, *key)
        return self._samplers[key]

    def _sample_rows(self, rows: Sequence[int], logits, greedy, at: Sequence[int]) -> None:
        """Sample the next token of each row from its line `at[i]` of logits [n, V] (device; greedy [n]: each
        line's argmax) and hand it to its request."""
        by_key: Dict[Tuple, List[Tuple[int, int]]] = {}
        for row, line in zip(rows, at):
            by_key.setdefault(self._rows[row].params.sampler_key, []).append((row, line))
        for key, pairs in by_key.items():
            group = [row for row, _ in pairs]
            lines = [line for _, line in pairs]
            do_sample, penalty = key[0], key[-1]
            if not do_sample and penalty == 1.0:  # plain greedy: the step's own argmax
                tokens = greedy.asnumpy()[lines]
            else:
                picked = logits if lines == list(range(logits.shape[0])) else ops.gather(
                    logits, Tensor(np.asarray(lines, np.int32)), 0)
                uniform = np.array([self._rows[r].rng.random(dtype=np.float32) for r in group], np.float32)
                seen = Tensor(self._seen[group]) if penalty != 1.0 else None
                tokens = self._sampler(key)(picked, seen, Tensor(uniform)).asnumpy()
            for row, token in zip(group, tokens):
                self._accept(row, int(token))

    def _accept(self, row: int, token: int) -> None:
        req = self._rows[row]
        self._seen[row, token] = True
        self._last[row] = token
        req.generated.append(token)
        if token in self.end_ids:
            self._finish(row, "stop")
            return
        text, stopped = req.stops.push(req.decoder.push(token))
        if stopped:
            self._finish(row, "stop", text, [token])
            return
        if len(req.generated) >= req.params.max_tokens or self._lengths[row] >= self.max_length:
            self._finish(row, "length", text, [token])
            return
        req.emit(Event(text=text, token_ids=[token]))

    def _finish(self, row: int, reason: str, text: str = "", tokens: Sequence[int] = (),
                error: Optional[str] = None) -> None:
        """End row `row`'s request; `text` / `tokens`: what its last token added. The row is free at once."""
        req = self._rows[row]
        self._rows[row] = None
        self.finished[reason] += 1
        ended_by_token = reason == "stop" and req.generated and req.generated[-1] in self.end_ids
        if reason == "length" or ended_by_token:  # flush held-back bytes and stop-string prefixes
            rest, stopped = req.stops.push(req.decoder.finish())
            text += rest + ("" if stopped else req.stops.flush())
        req.emit(Event(text=text, token_ids=list(tokens), finish_reason=reason, prompt_tokens=len(req.prompt),
                       completion_tokens=len(req.generated), error=error))


def decode_rows(needed: int, max_batch: int) -> int:
    """The decode call's row count: the smallest power of two >= needed, at most max_batch (one compiled
    step per count; a lone request does not pay for max_batch rows)."""
    width = 1
    while width < needed:
        width *= 2
    return min(width, max_batch)


def follow(runner: Runner, receive: Callable[[], Any]) -> None:
    """msrun ranks other than 0: run every model call rank 0's scheduler broadcasts, until it stops."""
    while True:
        name, args = receive()
        if name == "stop":
            return
        getattr(runner, name)(*args)
