"""TeleChat2 chat template (spec 5.3) in plain Python and as Jinja, plus tool-call parsing.

`render_chat(messages, tools, add_generation_prompt, template=None)` is the one entry point:
- `template=None` renders the built-in TeleChat2 format with `render_telechat2` (pure Python);
- a Jinja string (a tokenizer_config.json `chat_template`) is rendered the way HF transformers does it:
  sandboxed environment, `trim_blocks`/`lstrip_blocks`, `tojson` = json.dumps(x, ensure_ascii=False)
  (non-ASCII kept, no HTML escaping, key order kept) and `raise_exception` available.
`TELECHAT2_JINJA_TEMPLATE` is the same format written as Jinja; the tests check that both renderings and a
literal expected string agree byte for byte.

Format summary (spec 5.3): `<_system>` + system prompt (first message if its role is "system", else the
TeleChat default) + "\n", or, with tools, + the tools header; then per message `<_user>`+content,
`<_bot>`+content+tool calls+`<_end>\n`, tool results wrapped in `<tool_response>`; `<_bot>` if
add_generation_prompt. No `<_start>` anywhere.

`parse_tool_calls(text)` extracts `<tool_call>{json}</tool_call>` blocks from generated text. Malformed
blocks raise `ToolCallParseError` (a ValueError naming the block) by default; `strict=False` skips them.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

DEFAULT_SYSTEM_PROMPT = (
    "你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院"
    "（TeleAI）研发的人工智能助手。"
)
# Tools header pieces, verbatim from the reference template (ASCII comma after 问题, full-width elsewhere).
TOOLS_HEADER_OPEN = (
    "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n"
)
TOOLS_HEADER_CLOSE = (
    "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
    "下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n"
)

ROLES = ("system", "user", "bot", "assistant", "tool")

# The same format as render_telechat2, written as a Jinja chat template that can be pasted into a
# tokenizer_config.json (HF conventions: `messages`, `tools`, `add_generation_prompt`, HF's `tojson`).
# Only the strings inside {{ }} are output; `-` strips the layout whitespace between tags.
TELECHAT2_JINJA_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_text = messages[0]['content'] -%}
{%- else -%}
    {%- set system_text = '你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。' -%}
{%- endif -%}
{{- '<_system>' + system_text -}}
{%- if tools -%}
    {{- '\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n' -}}
    {%- for tool in tools -%}
        {{- tool | tojson -}}
        {{- '\n' -}}
    {%- endfor -%}
    {{- '</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。' -}}
    {{- '下方是一个调用模板：\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n' -}}
{%- else -%}
    {{- '\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- '<_user>' + message['content'] -}}
    {%- elif message['role'] in ['bot', 'assistant'] -%}
        {{- '<_bot>' -}}
        {%- if message['content'] -%}
            {{- message['content'] -}}
        {%- endif -%}
        {%- for call in (message['tool_calls'] or []) -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {%- if not loop.first -%}
                {{- '\n' -}}
            {%- endif -%}
            {{- '<tool_call>\n{"name": "' + (fn['name'] | string) + '", "arguments": ' -}}
            {{- fn['arguments'] | tojson -}}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<_end>\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}
            {{- '<_user><tool_response>\n' -}}
        {%- else -%}
            {{- '\n<tool_response>\n' -}}
        {%- endif -%}
        {{- message['content'] + '\n</tool_response>' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<_bot>' -}}
{%- endif -%}
"""


# ChatML, the Qwen2 format: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, the default system turn
# "You are a helpful assistant." when the conversation has none, `<|im_start|>assistant\n` as generation prompt;
# with tools, Hermes-style function calling as Qwen2.5's template writes it (the tool signatures inside
# <tools></tools> in the system turn, calls as <tool_call>{json}</tool_call> in assistant turns, results as
# <tool_response> blocks in one user turn). Used when a Qwen2 tokenizer_config.json has no chat_template.
CHATML_DEFAULT_SYSTEM = "You are a helpful assistant."
CHATML_JINJA_TEMPLATE = r"""
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system_text = messages[0]['content'] -%}
    {%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system_text = 'You are a helpful assistant.' -%}
    {%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system_text -}}
{%- if tools -%}
    {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
    {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in rest -%}
    {%- if message['role'] == 'tool' -%}
        {%- if loop.first or rest[loop.index0 - 1]['role'] != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}
        {%- if loop.last or rest[loop.index0 + 1]['role'] != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] -%}
        {{- '<|im_start|>assistant' -}}
        {%- if message['content'] -%}
            {{- '\n' + message['content'] -}}
        {%- endif -%}
        {%- for call in message['tool_calls'] -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' + (fn['arguments'] | tojson) + '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


class ChatTemplateError(ValueError):
    """A conversation or template cannot be rendered; the message names the offending message or block."""


class ToolCallParseError(ValueError):
    """A `<tool_call>` block in generated text is not the JSON object {"name": str, "arguments": {...}}."""


def hf_tojson(value: Any, indent: Optional[int] = None, separators=None, sort_keys: bool = False) -> str:
    """HF transformers' chat-template `tojson`: json.dumps with non-ASCII kept and no HTML escaping."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


# ---- message checks ------------------------------------------------------------------------------------
def _tool_call_function(call: Mapping[str, Any]) -> Mapping[str, Any]:
    """OpenAI style {"type": "function", "function": {...}} or flat {"name", "arguments"}."""
    return call["function"] if "function" in call else call


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Validate a conversation for the TeleChat2 template and return plain-dict copies.

    Raises ChatTemplateError naming the message for: an empty list, a non-dict message, an unknown role,
    a system message that is not the first one, non-string content (None is allowed for bot/assistant),
    and tool calls without a name. Tool-call arguments given as a JSON string (OpenAI wire format) are
    parsed to a dict so that they render as the object the model was trained on, not as a quoted string.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(f"message {i} is {type(msg).__name__}, expected a dict with role/content")
        role = msg.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"message {i} has role {role!r}; TeleChat2 accepts {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise ChatTemplateError(f"message {i}: a system message is only allowed first")
        content = msg.get("content")
        if role in ("bot", "assistant"):
            if content is not None and not isinstance(content, str):
                raise ChatTemplateError(f"message {i} ({role}): content must be a string or None")
        elif not isinstance(content, str):
            raise ChatTemplateError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        new = dict(msg)
        calls = msg.get("tool_calls")
        if calls:
            if role not in ("bot", "assistant"):
                raise ChatTemplateError(f"message {i} ({role}): only bot/assistant messages may carry tool_calls")
            new["tool_calls"] = [_normalize_tool_call(i, j, c) for j, c in enumerate(calls)]
        out.append(new)
    return out


def _normalize_tool_call(i: int, j: int, call: Any) -> Dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ChatTemplateError(f"message {i} tool_calls[{j}] must be a dict, got {type(call).__name__}")
    fn = _tool_call_function(call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatTemplateError(f"message {i} tool_calls[{j}] has no function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as err:
            raise ChatTemplateError(f"message {i} tool_calls[{j}] arguments are not valid JSON: {err}") from err
    new_fn = dict(fn, arguments=args)
    return dict(call, function=new_fn) if "function" in call else new_fn


# ---- the built-in template in Python ------------------------------------------------------------------
def tools_system_prompt(tools: Iterable[Any], system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """System text (without `<_system>`) that the template builds when tools are given; the official
    tool SFT data stores exactly this string in its "system" field."""
    return system + TOOLS_HEADER_OPEN + "".join(hf_tojson(t) + "\n" for t in tools) + TOOLS_HEADER_CLOSE


def render_telechat2(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]] = None,
                     add_generation_prompt: bool = True) -> str:
    """Render the TeleChat2 chat template (spec 5.3) byte for byte, without Jinja."""
    messages = normalize_messages(messages)
    system = messages[0]["content"] if messages[0]["role"] == "system" else DEFAULT_SYSTEM_PROMPT
    parts = ["<_system>", tools_system_prompt(tools, system) if tools else system + "\n"]
    for i, msg in enumerate(messages):
        role = msg["role"]
        if role == "user":
            parts.append("<_user>" + msg["content"])
        elif role in ("bot", "assistant"):
            parts.append("<_bot>" + (msg["content"] or ""))
            for j, call in enumerate(msg.get("tool_calls") or []):
                fn = _tool_call_function(call)
                parts.append(("\n" if j else "") + '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": '
                             + hf_tojson(fn["arguments"]) + "}\n</tool_call>")
            parts.append("<_end>\n")
        elif role == "tool":
            first_in_run = i == 0 or messages[i - 1]["role"] != "tool"
            parts.append(("<_user><tool_response>\n" if first_in_run else "\n<tool_response>\n")
                         + msg["content"] + "\n</tool_response>")
    if add_generation_prompt:
        parts.append("<_bot>")
    return "".join(parts)


# ---- Jinja rendering (tokenizer_config.json chat_template) --------------------------------------------
def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template raised: {message}")


def render_jinja(template: str, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]] = None,
                 add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render a Jinja chat template the way HF transformers does (sandboxed, trim/lstrip blocks, HF tojson,
    raise_exception). `extra` is passed to the template (bos_token, eos_token, ...)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = hf_tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt,
                               **extra)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from err


def select_template(template: Any, tools: Optional[Sequence[Any]]) -> Optional[str]:
    """A tokenizer_config `chat_template` may be a string or HF's list of {"name", "template"}; pick one
    ("tool_use" when tools are given and it exists, else "default")."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if tools and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
    raise ChatTemplateError(f"unsupported chat_template value of type {type(template).__name__}")


def render_chat(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]] = None,
                add_generation_prompt: bool = True, template: Any = None, **extra: Any) -> str:
    """Render with `template` (Jinja, from tokenizer_config.json) if given, else the built-in format.

    The built-in format validates and normalises the messages first (normalize_messages); a Jinja template
    gets the messages exactly as passed, as in HF transformers (it may accept other roles and must do its
    own checks, e.g. with raise_exception)."""
    template = select_template(template, tools)
    if template is None:
        return render_telechat2(messages, tools, add_generation_prompt)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    return render_jinja(template, messages, tools, add_generation_prompt, **extra)


def uses_tool_tokens(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]]) -> bool:
    """True if rendering this conversation emits <tool_call>/<tool_response> tokens."""
    if tools:
        return True
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages if isinstance(m, Mapping))


# ---- parsing model output ----------------------------------------------------------------------------
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, strict: bool = True) -> List[Dict[str, Any]]:
    """Extract tool calls from generated text (decode with skip_special_tokens=False so the tags survive).

    Each `<tool_call>...</tool_call>` block must hold a JSON object {"name": str, "arguments": object};
    arguments given as a JSON string are parsed, missing arguments become {}. Returns
    [{"name": ..., "arguments": dict}, ...] in text order.
    Malformed blocks (invalid JSON, not an object, no name, non-object arguments) and an unterminated
    trailing `<tool_call>` raise ToolCallParseError when strict (the default); with strict=False they are
    skipped.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_calls expects str, got {type(text).__name__}")
    calls = []
    for n, match in enumerate(_TOOL_CALL_RE.finditer(text)):
        try:
            calls.append(_parse_one_call(match.group(1)))
        except ToolCallParseError as err:
            if strict:
                raise ToolCallParseError(f"tool call block {n} {match.group(1)[:200]!r}: {err}") from None
    tail = _TOOL_CALL_RE.sub("", text)
    if strict and "<tool_call>" in tail:
        raise ToolCallParseError(f"unterminated <tool_call> block: {tail[tail.index('<tool_call>'):][:200]!r}")
    return calls


def _parse_one_call(body: str) -> Dict[str, Any]:
    try:
        obj = json.loads(body.strip())
    except json.JSONDecodeError as err:
        raise ToolCallParseError(f"invalid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ToolCallParseError(f"expected a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallParseError("missing or empty 'name'")
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as err:
            raise ToolCallParseError(f"'arguments' is a string that is not JSON ({err})") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolCallParseError(f"'arguments' must be a JSON object, got {type(args).__name__}")
    return {"name": name, "arguments": args}
