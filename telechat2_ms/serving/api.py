"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, /health.

Request fields: model, messages (system / user / assistant / tool; text content or text parts), tools
(type "function"), tool_choice ("auto" or "none"), temperature (0: greedy), top_p, max_tokens (or
max_completion_tokens), stop, seed, stream (+ stream_options.include_usage), n (1 only), and the extra
fields TeleChat2.5's README sends: repetition_penalty, top_k, skip_special_tokens. A field left out takes the
`generate:` settings (TeleChat2's generation_config: greedy unless do_sample, repetition_penalty 1.03);
temperature > 0 turns sampling on. /v1/completions' max_tokens defaults to 16, as OpenAI's does.
Tool calls are parsed from the model's `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks
(chat_template.parse_tool_calls); finish_reason is then "tool_calls". Streams are server-sent events
ending in `data: [DONE]`; with tools, text inside a tool-call block is held back and each call arrives as
one `tool_calls` delta when its block closes.
Errors: an OpenAI-style body {"error": {"message", "type", "param", "code"}}: 400 for a bad request (it
names the field), 404 for an unknown model, 429 when the waiting queue is full, 500 when generation fails.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from telechat2_ms import chat_template as ct
from telechat2_ms.serving.engine import Event, QueueFull, Request, SamplingParams, Scheduler

ROLES = ("system", "user", "assistant", "tool")
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[Dict[str, Any]] = None
    n: int = 1
    skip_special_tokens: Optional[bool] = None
    # OpenAI fields that would change the answer and are not built: a request that sets them is refused
    # (_check_unsupported) rather than answered as if they were absent
    logprobs: Optional[Union[bool, int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None


class ChatRequest(_Common):
    messages: List[Any]
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    max_completion_tokens: Optional[int] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[Dict[str, Any]] = None


class CompletionRequest(_Common):
    prompt: Union[str, List[int], List[str]]
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


def _check_unsupported(body: _Common) -> None:
    """A 400 naming the first OpenAI field set to something this server does not do."""
    no_logprobs = "log probabilities are not returned by this server"
    not_built = [
        ("logprobs", body.logprobs is not None and body.logprobs is not False, no_logprobs),
        ("top_logprobs", bool(getattr(body, "top_logprobs", None)), no_logprobs),
        ("presence_penalty", bool(body.presence_penalty), "not built; use repetition_penalty"),
        ("frequency_penalty", bool(body.frequency_penalty), "not built; use repetition_penalty"),
        ("logit_bias", bool(body.logit_bias), "not built"),
        ("response_format", (getattr(body, "response_format", None) or {}).get("type", "text") != "text",
         "only {'type': 'text'} is built (no constrained decoding)"),
        ("echo", getattr(body, "echo", False), "not built"),
        ("best_of", (getattr(body, "best_of", None) or 1) != 1, "must be 1; send one request per completion"),
        ("suffix", bool(getattr(body, "suffix", None)), "not built (no fill-in-the-middle)"),
    ]
    for name, asked, why in not_built:
        if asked:
            raise ApiError(400, f"{name}: {why} (got {getattr(body, name)!r})", name)


def _now() -> int:
    return int(time.time())


def _check_model(body: _Common, served: str) -> None:
    if body.model != served:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {served!r} "
                            "(GET /v1/models)", "model", "model_not_found")


def _messages(body: ChatRequest) -> List[Dict[str, Any]]:
    """OpenAI messages -> the chat template's (text parts joined); names the message that is wrong."""
    if not body.messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, msg in enumerate(body.messages):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role is {role!r}; use one of {', '.join(ROLES)}",
                           f"messages[{i}].role")
        content = msg.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content[{j}] must be a text part "
                                        "({'type': 'text', 'text': ...}); other part types are not supported",
                                   f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and not (role == "assistant" and msg.get("tool_calls")):
            raise ApiError(400, f"messages[{i}] ({role}) has no content", f"messages[{i}].content")
        if content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        new = {"role": role, "content": content}
        if msg.get("tool_calls"):
            new["tool_calls"] = msg["tool_calls"]
        out.append(new)
    return out


def _tools(body: ChatRequest) -> Optional[List[Dict[str, Any]]]:
    choice = body.tool_choice
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported (use 'auto' or 'none': the model decides "
                            "whether to call a tool)", "tool_choice")
    if not body.tools or choice == "none":
        return None
    for i, tool in enumerate(body.tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                                "'parameters': {...}}}}}", f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           f"tools[{i}].function.parameters")
    return body.tools


class Server:
    """The API state: the scheduler, the tokenizer, the served name and the generation defaults."""

    def __init__(self, scheduler: Scheduler, tokenizer, served_model: str, defaults, system_prompt=None):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.served_model = served_model
        self.defaults = defaults  # GenerateSettings
        self.system_prompt = system_prompt
        self.created = _now()

    # ---- request -> (prompt ids, sampling) -------------------------------------------------------------
    def sampling(self, body: _Common, prompt_len: int, default_max: int, keep_special: bool) -> SamplingParams:
        d = self.defaults
        _check_unsupported(body)
        if body.n != 1:
            raise ApiError(400, f"n must be 1 (got {body.n}); send one request per completion", "n")
        temperature = d.temperature if body.temperature is None else body.temperature
        do_sample = d.do_sample if body.temperature is None else body.temperature > 0
        if body.temperature is not None and body.temperature < 0:
            raise ApiError(400, f"temperature must be >= 0, got {body.temperature}", "temperature")
        top_p = d.top_p if body.top_p is None else body.top_p
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        top_k = d.top_k if body.top_k is None else body.top_k
        if top_k < 0 and top_k != -1:
            raise ApiError(400, f"top_k must be >= 0 (or -1: all tokens), got {top_k}", "top_k")
        penalty = d.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty
        if penalty <= 0:
            raise ApiError(400, f"repetition_penalty must be > 0, got {penalty}", "repetition_penalty")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        context = self.scheduler.max_length
        if max_tokens is None:
            max_tokens = max(min(default_max, context - prompt_len), 1)
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if prompt_len + max_tokens > context:
            raise ApiError(400, f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                                f"more than the context of {context} tokens (seq_length)",
                           "max_tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
        skip = (not keep_special) if body.skip_special_tokens is None else bool(body.skip_special_tokens)
        if keep_special:  # tool-call tags must survive decoding; parsed out afterwards
            skip = False
        return SamplingParams(max_tokens, do_sample, float(temperature), 0 if top_k == -1 else int(top_k),
                              float(top_p), float(penalty), body.seed, tuple(stop), skip)

    def chat_prompt(self, body: ChatRequest) -> Tuple[List[int], Optional[list]]:
        messages = _messages(body)
        tools = _tools(body)
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        except (ct.ChatTemplateError, ValueError) as err:
            raise ApiError(400, f"messages: {err}", "messages") from None
        return ids, tools

    def completion_prompt(self, body: CompletionRequest) -> List[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request (got a list of several)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt is empty", "prompt")
            return self.tokenizer.encode(prompt)
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        bad = [t for t in prompt if not 0 <= t < self.scheduler.cfg.vocab_size]
        if bad:
            raise ApiError(400, f"prompt has token ids outside the vocabulary: {bad[:5]}", "prompt")
        return list(prompt)

    # ---- running one request ---------------------------------------------------------------------------
    def start(self, prompt: List[int], params: SamplingParams) -> Tuple[Request, "asyncio.Queue[Event]"]:
        loop = asyncio.get_running_loop()
        events: "asyncio.Queue[Event]" = asyncio.Queue()

        def emit(event: Event) -> None:  # from the scheduler thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed (shutting down): nobody is listening
                request.cancel()

        request = Request(prompt, params, emit, self.tokenizer)
        try:
            self.scheduler.submit(request)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry later", None, "queue_full",
                           "rate_limit_error") from None
        return request, events


def _usage(event: Event) -> Dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _split_tool_calls(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """Generated text -> (content outside the tool-call blocks or None, OpenAI tool_calls)."""
    try:
        calls = ct.parse_tool_calls(text)
    except ct.ToolCallParseError:
        return text, []  # not a well-formed call: the text is the answer
    if not calls:
        return text, []
    content = ct._TOOL_CALL_RE.sub("", text).strip()
    return (content or None), [_openai_call(call) for call in calls]


def _openai_call(call: Dict[str, Any]) -> Dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


class _ToolStream:
    """Splits streamed text into content deltas and complete tool calls (text inside a block is held back)."""

    def __init__(self):
        self.buffer = ""
        self.calls = 0

    def push(self, text: str, final: bool = False) -> Tuple[str, List[Dict[str, Any]]]:
        self.buffer += text
        content, calls = [], []
        while True:
            start = self.buffer.find(TOOL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self.buffer, TOOL_OPEN)
                content.append(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            content.append(self.buffer[:start])
            end = self.buffer.find(TOOL_CLOSE, start)
            if end < 0:
                self.buffer = self.buffer[start:]
                if final:  # an unterminated block: it was text after all
                    content.append(self.buffer)
                    self.buffer = ""
                break
            block = self.buffer[start:end + len(TOOL_CLOSE)]
            self.buffer = self.buffer[end + len(TOOL_CLOSE):]
            _, parsed = _split_tool_calls(block)
            if parsed:
                for call in parsed:
                    calls.append(dict(call, index=self.calls))
                    self.calls += 1
            else:
                content.append(block)
        return "".join(content), calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="TeleChat2 on MindSpore", version="1")

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                            None, "invalid_json").response()
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return ApiError(400, f"{loc or 'body'}: {first.get('msg', 'invalid')}", loc or None).response()

    @app.get("/health")
    async def health():
        return dict(status="ok", **server.scheduler.stats())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.served_model, "object": "model",
                                            "created": server.created, "owned_by": "telechat2_ms"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HttpRequest):
        _check_model(body, server.served_model)
        prompt, tools = server.chat_prompt(body)
        params = server.sampling(body, len(prompt), server.defaults.max_new_tokens, keep_special=bool(tools))
        request, events = server.start(prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", _now()
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_chat_stream(server, request, events, rid, created, bool(tools), include_usage),
                                     media_type="text/event-stream")
        text, last = await _collect(request, events, http)
        content, calls = _split_tool_calls(text) if tools else (text, [])
        message: Dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.served_model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": "tool_calls" if calls else last.finish_reason}],
                "usage": _usage(last)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HttpRequest):
        _check_model(body, server.served_model)
        prompt = server.completion_prompt(body)
        params = server.sampling(body, len(prompt), 16, keep_special=False)
        request, events = server.start(prompt, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", _now()
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_completion_stream(server, request, events, rid, created, include_usage),
                                     media_type="text/event-stream")
        text, last = await _collect(request, events, http)
        return {"id": rid, "object": "text_completion", "created": created, "model": server.served_model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}],
                "usage": _usage(last)}

    return app


async def _collect(request: Request, events: "asyncio.Queue[Event]", http: HttpRequest) -> Tuple[str, Event]:
    """Wait for a request's events; a client that disconnects cancels it (its row is freed)."""
    parts = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    request.cancel()
                    raise ApiError(499, "client disconnected", None, "client_closed")
                continue
            parts.append(event.text)
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {event.error}", None, "generation_error", "server_error")
                return "".join(parts), event
    except asyncio.CancelledError:
        request.cancel()
        raise


def _sse(obj: Dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _events(request: Request, events: "asyncio.Queue[Event]"):
    """The request's events; cancels the request when the consumer stops early (client gone)."""
    finished = False
    try:
        while True:
            event = await events.get()
            finished = event.finish_reason is not None
            yield event
            if finished:
                return
    finally:
        if not finished:
            request.cancel()


async def _chat_stream(server: Server, request, events, rid: str, created: int, tools: bool, include_usage: bool):
    def chunk(delta: Dict[str, Any], finish: Optional[str] = None) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.served_model,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    split = _ToolStream() if tools else None
    called = False
    async for event in _events(request, events):
        final = event.finish_reason is not None
        if event.finish_reason == "error":
            yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                  "param": None, "code": "generation_error"}})
            break
        text, calls = split.push(event.text, final) if split else (event.text, [])
        if text:
            yield chunk({"content": text})
        for call in calls:
            called = True
            yield chunk({"tool_calls": [call]})
        if final:
            yield chunk({}, "tool_calls" if called else event.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": server.served_model, "choices": [], "usage": _usage(event)})
    yield "data: [DONE]\n\n"


async def _completion_stream(server: Server, request, events, rid: str, created: int, include_usage: bool):
    def chunk(text: str, finish: Optional[str] = None) -> str:
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": server.served_model,
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

    async for event in _events(request, events):
        if event.finish_reason == "error":
            yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                  "param": None, "code": "generation_error"}})
            break
        if event.text or event.finish_reason:
            yield chunk(event.text, event.finish_reason)
        if event.finish_reason is not None and include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": server.served_model,
                        "choices": [], "usage": _usage(event)})
    yield "data: [DONE]\n\n"
