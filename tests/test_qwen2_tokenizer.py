"""Qwen2 tokenizer (telechat2_ms/tokenizer_bpe.py) on the real Qwen2 vocabulary (../shared/reference/qwen2):
ids equal `tiktoken`'s (the independent reference) for tokenizer.json and for vocab.json + merges.txt,
round trips, special tokens, streaming detokenization, ChatML as transformers renders it, Hermes tool calls.

The checkpoint-style files are made here from the ranks file with transformers' TikTokenConverter (the way a
Qwen2 tokenizer.json is built), with Qwen2's NFC normaliser and split pattern; no MindSpore."""
import json
import os
import unicodedata

import numpy as np
import pytest

from telechat2_ms.chat_template import CHATML_JINJA_TEMPLATE, parse_tool_calls
from telechat2_ms.tokenizer import TokenizerError, load_tokenizer
from telechat2_ms.tokenizer_bpe import CHATML_SPECIAL_TOKENS, QWEN2_PATTERN, ByteLevelBpeTokenizer

RANKS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "qwen2", "qwen.tiktoken")
pytestmark = pytest.mark.skipif(not os.path.isfile(RANKS), reason="../shared/reference/qwen2 not present")
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
TEXTS = [
    "Hello world",
    " Hello world",
    "北京今天天气如何？我们去颐和园吧。",
    "def f(x):\n    return x ** 2  # 平方\n\n\tprint(f(12345))",
    "Emoji 🤖🚀👩‍👩‍👧 and ÅÉÎ, ñ ü ß, Ελληνικά, русский, العربية, 日本語のテキスト",
    "  leading spaces, trailing   \n\n\r\n numbers 3.14159 1,000,000 and it's we're I'll",
    "<b>html</b> &amp; {\"json\": [1, 2, 3]} \\ back\\slash ~`!@#$%^&*()",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"json": dir with tokenizer.json, "merges": dir with vocab.json + merges.txt}, both with a Qwen2-Instruct
    style tokenizer_config.json (special tokens at 151643-151645, eos <|im_end|>, no chat_template)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=RANKS, pattern=QWEN2_PATTERN, extra_special_tokens=list(SPECIAL)).converted()
    tok.normalizer = normalizers.NFC()
    config = {"added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False}
                                       for t, i in SPECIAL.items()},
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    out = {}
    for kind in ("json", "merges"):
        d = tmp_path_factory.mktemp(kind)
        if kind == "json":
            tok.save(str(d / "tokenizer.json"))
        else:
            tok.model.save(str(d))  # vocab.json, merges.txt
        (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        out[kind] = str(d)
    return out


@pytest.fixture(scope="module")
def reference():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=load_tiktoken_bpe(RANKS),
                             special_tokens=SPECIAL)


@pytest.mark.parametrize("kind", ["json", "merges"])
def test_ids_equal_tiktoken(files, reference, kind):
    tok = load_tokenizer(files[kind])
    assert isinstance(tok, ByteLevelBpeTokenizer)
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]
    for text in TEXTS:
        text = unicodedata.normalize("NFC", text)  # Qwen2 normalises to NFC; tiktoken does not normalise
        assert tok.encode(text) == reference.encode_ordinary(text), text
        assert tok.decode(tok.encode(text)) == text


def test_nfc_normalisation_is_applied(files):
    tok = load_tokenizer(files["json"])
    decomposed = unicodedata.normalize("NFD", "café Å")
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))


def test_special_tokens_split_exactly(files, reference):
    tok = load_tokenizer(files["json"])
    text = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nhi<|im_end|><|endoftext|>"
    ids = tok.encode(text)
    assert ids == reference.encode(text, allowed_special="all")
    assert [i for i in ids if i >= 151643] == [151644, 151645, 151644, 151645, 151643]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\n你好\nassistant\nhi"
    plain = tok.encode(text, parse_special=False)  # untrusted text: the tags are ordinary text
    assert plain == reference.encode_ordinary(text) and max(plain) < 151643
    assert tok.bos_id is None and tok.encode("x") == tok.encode("x", add_bos=None)
    assert tok.eos_id == 151645 and tok.pad_id == 151643 and tok.stop_ids == {151643, 151645}
    assert tok.vocab_size == 151646


def test_streaming_never_splits_a_character(files):
    tok = load_tokenizer(files["json"])
    text = "流式输出🤖👩‍👩‍👧: ok 日本語 ñ"
    ids = tok.encode(text)
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # random ids, including byte tokens that form invalid UTF-8, and special ids: the stream equals decode
    rng = np.random.default_rng(0)
    byte_ids = [tok.token_to_id(c) for c in ("Ġ", "ð", "Ł", "¤", "ĸ", "Ã")]  # single-byte pieces
    for skip in (True, False):
        for _ in range(50):
            ids = [int(x) for x in rng.choice(byte_ids + [151644, 151645, 9707, 1879, 100], size=12)]
            decoder = tok.incremental_decoder(skip_special_tokens=skip)
            streamed = "".join(decoder.push(i) for i in ids) + decoder.finish()
            assert streamed == tok.decode(ids, skip_special_tokens=skip), ids


def test_chatml_matches_transformers_apply_chat_template(files):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(files["json"])
    hf = PreTrainedTokenizerFast(tokenizer_file=os.path.join(files["json"], "tokenizer.json"))
    hf.chat_template = CHATML_JINJA_TEMPLATE
    plain = [{"role": "user", "content": "hi"}]
    # written by hand from the ChatML format (families.md), not produced by the code under test
    assert tok.apply_chat_template(plain, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n")
    weather = {"type": "function", "function": {"name": "get_weather", "description": "天气 <city>",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    conversations = [
        (plain, None),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
          {"role": "assistant", "content": "2"}, {"role": "user", "content": "谢谢"}], None),
        ([{"role": "user", "content": "北京天气？"},
          {"role": "assistant", "content": "",
           "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}},
                          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "上海"}}}]},
          {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"temp": 25}'},
          {"role": "assistant", "content": "北京 21 度，上海 25 度。"}], [weather]),
    ]
    for messages, tools in conversations:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            theirs = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
            assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen) == tok.encode(theirs)
    with_tools = tok.apply_chat_template(conversations[2][0], tools=[weather], tokenize=False)
    assert "<tools>\n" + json.dumps(weather, ensure_ascii=False) + "\n</tools>" in with_tools
    assert with_tools.count("<|im_start|>user") == 2  # both tool results in one user turn


def test_hermes_tool_call_in_generated_text(files):
    tok = load_tokenizer(files["json"])
    answer = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    ids = tok.encode(answer) + [tok.eos_id]
    text = tok.decode(ids)
    assert parse_tool_calls(text) == [{"name": "get_weather", "arguments": {"city": "北京"}}]


def test_bad_tokenizer_files_are_refused_by_name(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.model, tokenizer.json or vocab.json"):
        load_tokenizer(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": {"type": "BPE"', encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot read the tokenizer at .*broken"):
        load_tokenizer(str(broken))
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    (only_vocab / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.json \\+ merges.txt"):
        load_tokenizer(str(only_vocab))


def test_default_special_tokens_follow_the_vocabulary(files, tmp_path):
    """vocab.json + merges.txt without tokenizer_config.json: the ChatML tokens get the ids after the vocabulary."""
    import shutil

    d = tmp_path / "bare"
    d.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(files["merges"], name), d / name)
    tok = load_tokenizer(str(d))
    assert [tok.token_to_id(t) for t in CHATML_SPECIAL_TOKENS] == [151643, 151644, 151645]
    assert tok.eos_id == 151643  # no config: <|endoftext|>; generation also stops at <|im_end|>
    assert tok.stop_ids == {151643, 151645}


def test_eval_letter_ids_follow_lm_eval_on_the_qwen2_vocabulary(files, reference):
    """encode(context + letter) minus encode(context), as lm-eval's _encode_pair, for every protocol; with
    tiktoken's ids: " A" after "Answer:" and "A" right after "答案：" are single tokens."""
    from telechat2_ms.evaluate.data import Question
    from telechat2_ms.evaluate.prompts import PROTOCOLS
    from telechat2_ms.evaluate.scoring import encode_pair

    tok = load_tokenizer(files["json"])
    q = Question("college_physics", "0", "什么是力？ What is force?", ("质量", "加速度", "推或拉", "速度"), "C")
    expected = {" ": [reference.encode_ordinary(" " + x) for x in "ABCD"],
                "": [reference.encode_ordinary(x) for x in "ABCD"]}
    for (benchmark, name), protocol in PROTOCOLS.items():
        context = protocol.context("college_physics", [q], q)
        got = [encode_pair(tok.encode, context, c)[1] for c in protocol.continuations()]
        assert got == expected[protocol.target_delimiter], (benchmark, name, got)
        assert all(len(ids) == 1 for ids in got)


def test_chatml_sft_masks_the_answers_and_their_end_tokens(files):
    from telechat2_ms.data.sft import SftEncoder, parse_sft_record

    tok = load_tokenizer(files["json"])
    record = parse_sft_record({"system": "Be brief.", "multiturn": True, "dialog": [
        {"role": "user", "content": "1+1?"}, {"role": "bot", "content": "2"},
        {"role": "user", "content": "再加一？"}, {"role": "bot", "content": " 三\n(3)"}]}, "mem:1")
    sample = next(SftEncoder(tok, 128).encode_records([record]))
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
            "2<|im_end|>\n<|im_start|>user\n再加一？<|im_end|>\n<|im_start|>assistant\n 三\n(3)<|im_end|>\n")
    assert sample.ids.tolist() == tok.encode(text)
    targets = [int(i) for i, m in zip(sample.ids, sample.mask) if m]
    assert tok.decode(targets, skip_special_tokens=False) == "2<|im_end|> 三\n(3)<|im_end|>"
    assert int(sample.mask[-1]) == 0  # the "\n" after the last <|im_end|>
