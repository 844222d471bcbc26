"""TeleChat2 chat template (spec 5.3): Python and Jinja renderings against hand-written expected strings,
HF-style tojson, message validation, and tool-call parsing. CPU only, no MindSpore."""
import pytest

from telechat2_ms.chat_template import (DEFAULT_SYSTEM_PROMPT, TELECHAT2_JINJA_TEMPLATE, ChatTemplateError,
                                        ToolCallParseError, hf_tojson, normalize_messages, parse_tool_calls,
                                        render_chat, render_jinja, render_telechat2, select_template)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询城市天气 (<city> & unit)",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                       "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "北京今天天气如何？"},
    {"role": "assistant", "content": "我来查询。",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "北京", "unit": "c"}}}]},
    {"role": "tool", "content": '{"temp": 21, "sky": "晴"}'},
    {"role": "assistant", "content": "北京今天晴，21度。"},
    {"role": "user", "content": "谢谢！"},
]
# Written by hand from spec 5.3 (not produced by the code under test).
EXPECTED_TOOL_PROMPT = (
    "<_system>You are a weather bot."
    "\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,以下是可用工具详情：\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "查询城市天气 (<city> & unit)", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, '
    '"required": ["city"]}}}\n'
    "</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，并用<tool_call></tool_call>包含。"
    "下方是一个调用模板：\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n\n"
    "<_user>北京今天天气如何？"
    "<_bot>我来查询。<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\", \"unit\": \"c\"}}\n"
    "</tool_call><_end>\n"
    "<_user><tool_response>\n{\"temp\": 21, \"sky\": \"晴\"}\n</tool_response>"
    "<_bot>北京今天晴，21度。<_end>\n"
    "<_user>谢谢！"
    "<_bot>"
)
EXPECTED_PLAIN_PROMPT = (
    "<_system>你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院"
    "（TeleAI）研发的人工智能助手。\n"
    "<_user>你好<_bot>你好！<_end>\n"
    "<_user>1+1=?<_bot>"
)


def both(messages, tools=None, add_generation_prompt=True):
    """(python rendering, jinja rendering) of the built-in template."""
    py = render_telechat2(messages, tools, add_generation_prompt)
    jj = render_jinja(TELECHAT2_JINJA_TEMPLATE, normalize_messages(messages), tools, add_generation_prompt)
    return py, jj


def test_tool_conversation_matches_literal():
    py, jj = both(TOOL_CONVERSATION, [WEATHER_TOOL])
    assert py == EXPECTED_TOOL_PROMPT
    assert jj == EXPECTED_TOOL_PROMPT
    assert render_chat(TOOL_CONVERSATION, [WEATHER_TOOL], template=TELECHAT2_JINJA_TEMPLATE) == EXPECTED_TOOL_PROMPT


def test_default_system_prompt_without_tools():
    msgs = [{"role": "user", "content": "你好"}, {"role": "bot", "content": "你好！"},
            {"role": "user", "content": "1+1=?"}]
    py, jj = both(msgs)
    assert py == jj == EXPECTED_PLAIN_PROMPT
    assert DEFAULT_SYSTEM_PROMPT.endswith("研发的人工智能助手。")


def test_generation_prompt_and_given_system_without_tools():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    py, jj = both(msgs, add_generation_prompt=False)
    assert py == jj == "<_system>S\n<_user>q<_bot>a<_end>\n"
    py, jj = both(msgs, tools=[])  # an empty tool list is "no tools"
    assert py == jj == "<_system>S\n<_user>q<_bot>a<_end>\n<_bot>"


def test_several_tool_calls_and_consecutive_tool_results():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "bot", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": 1}},
                                                        {"name": "g", "arguments": '{"y": [1, 2]}'}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    expected = ("<_system>" + DEFAULT_SYSTEM_PROMPT + "\n<_user>q<_bot>"
                "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n"
                "<tool_call>\n{\"name\": \"g\", \"arguments\": {\"y\": [1, 2]}}\n</tool_call><_end>\n"
                "<_user><tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><_bot>")
    py, jj = both(msgs)
    assert py == jj == expected


def test_tool_message_first_opens_a_user_turn():
    py, jj = both([{"role": "tool", "content": "r"}], add_generation_prompt=False)
    assert py == jj == "<_system>" + DEFAULT_SYSTEM_PROMPT + "\n<_user><tool_response>\nr\n</tool_response>"


def test_hf_tojson_keeps_non_ascii_and_does_not_html_escape():
    assert hf_tojson({"b": "<é&'>", "a": [1, None, True]}) == '{"b": "<é&\'>", "a": [1, null, true]}'


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "s"}], "only allowed first"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "", "tool_calls": [{"arguments": {}}]}],
     "no function name"),
    ([{"role": "bot", "content": "", "tool_calls": [{"name": "f", "arguments": "{bad"}]}], "not valid JSON"),
    ("hello", "non-empty list"),
])
def test_invalid_conversations_raise(messages, needle):
    with pytest.raises(ChatTemplateError, match=needle):
        render_telechat2(messages)


def test_jinja_raise_exception_and_template_selection():
    with pytest.raises(ChatTemplateError, match="no system allowed"):
        render_chat([{"role": "user", "content": "x"}], template="{{ raise_exception('no system allowed') }}")
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    assert select_template(named, None) == "D"
    assert select_template(named, [WEATHER_TOOL]) == "T"
    assert render_chat([{"role": "user", "content": "x"}], template="{{ messages[0].content }}|{{ bos_token }}",
                       bos_token="<_start>") == "x|<_start>"


def test_parse_tool_calls():
    text = ("先查一下。\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n</tool_call>\n"
            "<tool_call>{\"name\": \"now\"}</tool_call>"
            "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}\n</tool_call>")
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "北京"}},
                                      {"name": "now", "arguments": {}},
                                      {"name": "f", "arguments": {"a": 1}}]
    assert parse_tool_calls("no calls here") == []


@pytest.mark.parametrize("bad, needle", [
    ("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>", "invalid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "expected a JSON object"),
    ("<tool_call>{\"arguments\": {}}</tool_call>", "missing or empty 'name'"),
    ("<tool_call>{\"name\": \"f\", \"arguments\": [1]}</tool_call>", "must be a JSON object"),
    ("<tool_call>\n{\"name\": \"f\", \"argum", "unterminated"),
])
def test_malformed_tool_calls_raise_or_are_skipped(bad, needle):
    good = "<tool_call>{\"name\": \"ok\", \"arguments\": {}}</tool_call>"
    with pytest.raises(ToolCallParseError, match=needle):
        parse_tool_calls(good + bad)
    assert parse_tool_calls(good + bad, strict=False) == [{"name": "ok", "arguments": {}}]
