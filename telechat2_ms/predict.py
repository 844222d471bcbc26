"""The `predict` and `chat` run modes.

predict: each text in `predict_data` is wrapped in the TeleChat2 chat template (system prompt + user turn +
`<_bot>`; `prompt_format: raw` sends the text as-is, special tokens parsed, e.g. MindFormers'
"<_start><_user>...<_bot>"), generated as one left-padded batch, and printed; a single prompt streams its
text as it is produced. chat: an interactive loop with multi-turn history (tools off); `/clear` forgets the
history, `/exit` (or end of input) quits.

Under msrun (telechat2_ms/build.py) the model is tensor-parallel within a replica and only rank 0
prints; with data_parallel > 1 the replicas split the predict prompts (replica r takes prompts r, r+dp, ...)
and the answers are gathered in order; in chat, rank 0 reads the input and sends each line to every rank.
"""
from __future__ import annotations

import io
import sys
from typing import Dict, List, Optional, TextIO

from telechat2_ms.generate import GenerationConfig, GenerationError, Generator
from telechat2_ms.parallel.ranks import broadcast_object, gather_objects
from telechat2_ms.settings import RunSettings

DEMO_PROMPTS = ["What is 3 plus 4?", "你好"]


def encode_prompt(tokenizer, text: str, settings: RunSettings, history: Optional[List[Dict]] = None) -> List[int]:
    if settings.prompt_format == "raw":
        return tokenizer.encode(text)
    # no system prompt set: the template's own default (TeleChat2's, or ChatML's "You are a helpful assistant.")
    system = [] if settings.system_prompt is None else [{"role": "system", "content": settings.system_prompt}]
    messages = system + list(history or []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _generation_config(settings: RunSettings, tokenizer) -> GenerationConfig:
    return GenerationConfig.from_settings(settings.generate, tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_ids)


class _Streamer:
    """Prints the text of row 0 as tokens arrive."""

    def __init__(self, tokenizer, out: TextIO):
        self.decoder = tokenizer.incremental_decoder()
        self.out = out
        self.stop = tokenizer.stop_ids
        self.done = False

    def __call__(self, tokens):
        token = int(tokens[0])
        if self.done or token in self.stop:
            self.done = True
            return
        self.out.write(self.decoder.push(token))
        self.out.flush()

    def finish(self):
        self.out.write(self.decoder.finish() + "\n")
        self.out.flush()


def _generator(run, settings: RunSettings) -> Generator:
    pipeline = run.parallel if run.dims.pp > 1 else None  # pipeline stages run op by op
    return Generator(run.model, settings.seq_length, use_jit=settings.jit and pipeline is None, pipeline=pipeline)


def _build(settings: RunSettings, plan):
    from telechat2_ms.build import build_run, plan_run
    from telechat2_ms.parallel import comm

    return build_run(plan or plan_run(settings, comm.get_world_size(), "generate"))


def run_predict(settings: RunSettings, out: Optional[TextIO] = None, plan=None) -> List[str]:
    run = _build(settings, plan)
    out = (out or sys.stdout) if run.is_main else io.StringIO()  # only rank 0 prints
    tokenizer = run.tokenizer
    texts = [t for t in settings.predict_data] or DEMO_PROMPTS
    if any(not t.strip() for t in texts):
        raise GenerationError("predict_data holds an empty prompt")
    mine = list(range(run.replica, len(texts), run.replicas))  # this data-parallel replica's prompts
    prompts = [encode_prompt(tokenizer, texts[i], settings) for i in mine]
    generator = _generator(run, settings)
    gen = _generation_config(settings, tokenizer)
    stream = settings.generate.stream and len(texts) == 1
    streamer = _Streamer(tokenizer, out) if stream else None
    if stream:
        out.write(f"### prompt: {texts[0]}\n### answer: ")
    outputs = generator.generate(prompts, gen, on_tokens=streamer) if prompts else []
    answers = [tokenizer.decode(ids) for ids in outputs]
    if run.replicas > 1:
        by_index = {}
        for part in gather_objects(dict(zip(map(str, mine), answers))):
            by_index.update(part)
        answers = [by_index[str(i)] for i in range(len(texts))]
    if stream:
        streamer.finish()
    else:
        for text, answer in zip(texts, answers):
            out.write(f"### prompt: {text}\n### answer: {answer}\n")
    return answers


def run_chat(settings: RunSettings, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None,
             plan=None) -> List[Dict]:
    """Interactive multi-turn chat; returns the history when the input ends. Under msrun rank 0 reads
    `stdin` and prints; every rank generates each reply (the model's collectives need all of them)."""
    run = _build(settings, plan)
    stdin = stdin or sys.stdin
    out = (out or sys.stdout) if run.is_main else io.StringIO()
    tokenizer = run.tokenizer
    generator = _generator(run, settings)
    gen = _generation_config(settings, tokenizer)
    history: List[Dict] = []
    out.write("TeleChat2 chat. /clear forgets the conversation, /exit quits.\n")
    while True:
        out.write("user> ")
        out.flush()
        line = broadcast_object(stdin.readline() if run.is_main else None)
        if not line or line.strip() == "/exit":
            out.write("\n")
            return history
        text = line.rstrip("\n")
        if text.strip() == "/clear":
            history.clear()
            out.write("(history cleared)\n")
            continue
        if not text.strip():
            continue
        prompt = encode_prompt(tokenizer, text, settings, history)
        budget = settings.seq_length - gen.max_new_tokens
        while len(prompt) > budget and history:  # drop the oldest turns until the prompt fits
            history = history[2:]
            prompt = encode_prompt(tokenizer, text, settings, history)
        out.write("bot> ")
        streamer = _Streamer(tokenizer, out)
        try:
            ids = generator.generate([prompt], gen, on_tokens=streamer)[0]
        except GenerationError as err:
            out.write(f"\n(error: {err})\n")
            continue
        streamer.finish()
        history += [{"role": "user", "content": text}, {"role": "bot", "content": tokenizer.decode(ids)}]
