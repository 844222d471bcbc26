"""Tokenizer (spec 5.1-5.2, 10.13): exact ids on the real TeleChat2-115B tokenizer.model, exact round trips,
streaming decoding, clear errors, tokenizer_config.json handling, and the built-in demo tokenizer and corpus.
CPU only, no MindSpore."""
import json
import random
import shutil

import pytest

from telechat2_ms.data import demo_corpus
from telechat2_ms.chat_template import DEFAULT_SYSTEM_PROMPT, ChatTemplateError, parse_tool_calls
from telechat2_ms.tokenizer import (TOOL_TOKENS, Telechat2Tokenizer, TokenizerError, demo_tokenizer_path,
                                    load_tokenizer)

ROUND_TRIP_TEXTS = [
    "<_user>生抽与老抽的区别？<_bot>",
    " leading space",
    "  two  spaces, trailing space ",
    "\ttab first\tand\t\ttabs",
    "\n",
    "\n\nnewlines\n\n",
    " ",
    "def square(x):\n    return x ** 2  # 平方\n",
    "Mixed 中文 and English, 数字 12345 and emoji 😀🧪👩‍👩‍👧 and ñ ẞ 𝔘 ☃",
    "<_system>system text\n<_user> question with spaces <_bot>answer<_end>\n<_user>again<_bot>",
    "<_end><_end>",
    "a<_pad>b",
    "<_bot>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": \"值\"}}\n</tool_call><_end>",
]
WORDS = ["hello", "世界", " ", "  ", "\n", "\t", "😀", "x=1;", "数", "<_user>", "<_bot>", "<tool_call>", "ok"]


@pytest.fixture(scope="module")
def demo():
    return Telechat2Tokenizer.demo()


@pytest.fixture
def tok115(tokenizer_115b_path):
    return Telechat2Tokenizer(tokenizer_115b_path)


def stream(tok, ids, skip_special_tokens=True):
    dec = tok.incremental_decoder(skip_special_tokens)
    parts = [dec.push(i) for i in ids]
    return parts, dec.finish()


# ---- the real 115B tokenizer -------------------------------------------------------------------------
def test_spec_ids_115b(tok115):
    assert tok115.encode("<_user>生抽与老抽的区别？<_bot>") == [4, 25104, 127499, 126325, 73611, 29151, 126271, 5]
    assert tok115.encode("\n") == [126136, 29]
    assert tok115.encode("答案：A") == [9822, 126264, 126173]  # 'A' without the "▁" after 答案：
    assert tok115.encode("A") == [459]  # '▁A' alone
    assert tok115.encode("") == []


def test_115b_vocab_and_special_ids(tok115, tokenizer_115b_path):
    assert tok115.vocab_size == 131072
    assert (tok115.bos_id, tok115.eos_id, tok115.pad_id) == (1, 2, 3)
    assert (tok115.user_id, tok115.bot_id, tok115.system_id) == (4, 5, 6)
    assert tok115.token_to_id("▁A") == 459 and tok115.id_to_token(126173) == "A"
    assert not tok115.has_tool_tokens
    from_dir = Telechat2Tokenizer(tokenizer_115b_path.rsplit("/", 1)[0])  # directory with tokenizer_config.json
    assert from_dir.add_bos_token is False and from_dir.chat_template is None
    assert from_dir.encode("你好") == tok115.encode("你好") and from_dir.encode("你好")[0] != 1


def test_115b_special_strings_are_text_when_not_parsed(tok115):
    ids = tok115.encode("<_user>hi", parse_special=False)
    assert 4 not in ids and tok115.decode(ids) == "<_user>hi"
    # chunks are encoded separately: the text after a special token gets its own dummy prefix
    assert tok115.encode("<_user>hi") == [4] + tok115.encode("hi")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_115b(tok115, text):
    ids = tok115.encode(text)
    assert tok115.decode(ids, skip_special_tokens=False) == text
    parts, tail = stream(tok115, ids, skip_special_tokens=False)
    assert "".join(parts) + tail == text


def test_known_limit_u2581_becomes_space(tok115):
    """sentencepiece itself maps the character '▁' (U+2581) to a space; the only text that does not round trip."""
    assert tok115.decode(tok115.encode("a\u2581b")) == "a b"


def test_skip_special_tokens_joins_chunks_without_dummy_space(tok115):
    ids = tok115.encode("<_user> hi<_bot>there<_end>\n")
    assert tok115.decode(ids) == " hithere\n"
    assert tok115.decode(ids, skip_special_tokens=False) == "<_user> hi<_bot>there<_end>\n"


def test_random_word_soup_round_trips(tok115, demo):
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        for tok in (tok115, demo):
            ids = tok.encode(text)
            assert tok.decode(ids, skip_special_tokens=False) == text, (tok, text)


def test_incremental_decoder_matches_sentencepiece_on_random_ids(tok115):
    """Arbitrary id sequences (byte pieces, '▁' pieces, unk) stream to exactly sentencepiece's decode."""
    rng = random.Random(1)
    pool = [0, 126136, 390, 459, 126173, 29, 30] + list(range(134, 390)) + [rng.randrange(390, 131072)
                                                                          for _ in range(200)]
    for _ in range(2000):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        parts, tail = stream(tok115, ids)
        assert "".join(parts) + tail == tok115._sp.decode(ids), ids


def test_incremental_decoder_never_emits_half_characters(demo):
    ids = demo.encode("😀 ok 你好")  # the emoji is not in the demo vocab: ▁ + four byte-fallback pieces
    pieces = [demo.id_to_token(i) for i in ids]
    assert pieces[:5] == ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    parts, tail = stream(demo, ids)
    assert parts[:5] == ["", "", "", "", "😀"]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + tail == "😀 ok 你好" and tail == ""
    # a sequence cut inside a character is flushed as U+FFFD per byte, like sentencepiece
    assert stream(demo, ids[:3])[1] == "\ufffd\ufffd"


def test_errors(tmp_path, tokenizer_115b_path):
    with pytest.raises(TokenizerError, match="not found"):
        Telechat2Tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match="empty tokenizer path"):
        Telechat2Tokenizer("")
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        Telechat2Tokenizer(tmp_path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model \x00\xff" * 10)
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Telechat2Tokenizer(garbage)
    tok = Telechat2Tokenizer(tokenizer_115b_path)
    with pytest.raises(TokenizerError, match="no tool-call tokens"):
        tok.token_to_id("<tool_call>")
    with pytest.raises(TokenizerError, match="no tool-call tokens"):
        tok.tool_token_ids
    with pytest.raises(TokenizerError, match=r"outside the vocabulary \[0, 131072\)"):
        tok.decode([4, 131072])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.incremental_decoder().push(-1)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_tools_on_115b_tokenizer_raise_instead_of_inventing_ids(tok115):
    msgs = [{"role": "user", "content": "天气？"}]
    tools = [{"type": "function", "function": {"name": "w", "parameters": {}}}]
    with pytest.raises(TokenizerError, match="tool"):
        tok115.apply_chat_template(msgs, tools=tools)
    with pytest.raises(TokenizerError, match="tool"):
        tok115.apply_chat_template(msgs + [{"role": "tool", "content": "晴"}])
    text = tok115.apply_chat_template(msgs, tools=tools, tokenize=False)  # rendering alone is fine
    assert text.startswith("<_system>" + DEFAULT_SYSTEM_PROMPT + "\n\n# 可用工具")


def test_apply_chat_template_ids_115b(tok115):
    ids = tok115.apply_chat_template([{"role": "user", "content": "生抽与老抽的区别？"}])
    assert ids[0] == 6
    assert ids == [6] + tok115.encode(DEFAULT_SYSTEM_PROMPT + "\n") + [4, 25104, 127499, 126325, 73611, 29151,
                                                                      126271, 5]
    assert ids[-9] == 29  # the system chunk ends with the "\n" piece, no dummy prefix before <_user>


def test_tokenizer_config_json(tmp_path, tokenizer_115b_path):
    shutil.copy(tokenizer_115b_path, tmp_path / "tokenizer.model")
    config = {"add_bos_token": True, "eos_token": {"content": "<_end>"},
              "chat_template": "{% for m in messages %}{% if m.role == 'system' %}"
                               "{{ raise_exception('system not supported') }}{% endif %}"
                               "{{ '<_user>' + m.content }}{% endfor %}{% if add_generation_prompt %}<_bot>{% endif %}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = Telechat2Tokenizer(tmp_path)
    assert tok.encode("A") == [1, 459]
    assert tok.encode("A", add_bos=False) == [459]
    assert tok.apply_chat_template([{"role": "user", "content": "A"}], tokenize=False) == "<_user>A<_bot>"
    assert tok.apply_chat_template([{"role": "user", "content": "A"}]) == [1, 4, 459, 5]
    with pytest.raises(ChatTemplateError, match="system not supported"):
        tok.apply_chat_template([{"role": "system", "content": "s"}])
    (tmp_path / "tokenizer_config.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Telechat2Tokenizer(tmp_path)


# ---- the built-in demo tokenizer ---------------------------------------------------------------------
def test_demo_tokenizer_layout(demo):
    assert demo.vocab_size == 1024
    assert [demo.id_to_token(i) for i in range(13)] == [
        "<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>",
        "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    assert demo.has_tool_tokens and demo.tool_token_ids == dict(zip(TOOL_TOKENS, (9, 10, 11, 12)))
    assert (demo.bos_id, demo.eos_id, demo.pad_id, demo.user_id, demo.bot_id, demo.system_id) == (1, 2, 3, 4, 5, 6)
    assert [demo.id_to_token(i) for i in demo.encode("\n")] == ["▁", "\n"]
    assert [demo.id_to_token(i) for i in demo.encode("12")] == ["▁", "1", "2"]  # split_digits
    assert demo.decode(demo.encode("ＡＢ  x")) == "ＡＢ  x"  # identity normalizer, extra whitespace kept


def test_demo_tokenizer_trainer_settings(demo):
    pytest.importorskip("google.protobuf", reason="reading the model proto needs protobuf")
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    with open(demo.path, "rb") as f:
        proto.ParseFromString(f.read())
    assert proto.trainer_spec.model_type == proto.trainer_spec.BPE
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity"
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_demo(demo, text):
    ids = demo.encode(text)
    assert max(ids, default=0) < 1024
    assert demo.decode(ids, skip_special_tokens=False) == text
    parts, tail = stream(demo, ids, skip_special_tokens=False)
    assert "".join(parts) + tail == text


def test_demo_tool_tokens_are_single_ids(demo):
    ids = demo.encode("<_bot><tool_call>\n{}\n</tool_call><_end>")
    assert ids[:2] == [5, 9] and ids[-2:] == [10, 2]


def test_load_tokenizer_defaults_to_demo(tokenizer_115b_path):
    assert load_tokenizer(None).path == demo_tokenizer_path()
    assert load_tokenizer("").vocab_size == 1024
    assert load_tokenizer(tokenizer_115b_path).vocab_size == 131072


def test_demo_tokenizer_regenerates_bit_exactly():
    with open(demo_tokenizer_path(), "rb") as f:
        packaged = f.read()
    assert demo_corpus.train_demo_tokenizer_bytes() == packaged


# ---- the demo corpus ---------------------------------------------------------------------------------
def test_demo_sft_jsonl_layout(tmp_path, shared_dir, demo):
    path = demo_corpus.write_sft_jsonl(str(tmp_path / "demo.jsonl"), num=200)
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(records) == 200
    with open(shared_dir / "data" / "sft" / "demo_multi.jsonl", encoding="utf-8") as f:
        official = json.loads(f.readline())
    assert all(list(r) == list(official) == ["system", "dialog", "multiturn", "tool"] for r in records)
    assert records == demo_corpus.generate_dialogs(200)  # deterministic
    n_tool = 0
    for r in records:
        roles = [t["role"] for t in r["dialog"]]
        assert roles == ["user", "bot"] * (len(roles) // 2) and roles
        assert r["multiturn"] == (len(roles) > 2)
        if r["tool"]:
            n_tool += 1
            assert r["system"].startswith(DEFAULT_SYSTEM_PROMPT + "\n\n# 可用工具")
            call = parse_tool_calls(r["dialog"][1]["content"])
            assert call[0]["name"] == "lookup_item" and set(call[0]["arguments"]) == {"item"}
        else:
            assert r["system"] == DEFAULT_SYSTEM_PROMPT + "\n"
        msgs = [{"role": "system", "content": r["system"]}] + r["dialog"]
        ids = demo.apply_chat_template(msgs, add_generation_prompt=False)
        assert 0 not in ids  # the demo vocab covers its own corpus without <_unk>
        assert demo.decode(ids, skip_special_tokens=False) == demo.apply_chat_template(
            msgs, add_generation_prompt=False, tokenize=False)
    assert 5 <= n_tool <= 40


def test_demo_facts_are_consistent():
    """Each item has one colour in every dialog, so the facts are learnable."""
    seen = {}
    for r in demo_corpus.generate_dialogs(500, seed=7):
        for turn in r["dialog"]:
            text = turn["content"]
            if turn["role"] == "bot" and text.startswith("The ") and " is " in text and "lives" not in text:
                item, colour = text[4:-1].split(" is ")
                assert seen.setdefault(item, colour) == colour
    assert len(seen) >= 6
