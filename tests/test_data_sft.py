"""SFT data (spec 6.1-6.2): token layout and loss mask of real records, packing, and bad-input errors.

The expected sequences are assembled here span by span from the spec: special ids <_system>=6, <_user>=4,
<_bot>=5, <_end>=2, <tool_call>=9, </tool_call>=10, <tool_response>=11, </tool_response>=12, and E(x) = one
sentencepiece call per text chunk between special tokens (spec 5.2). Targets (mask 1): each <_user>, and each
bot span from <_bot> through <_end> inclusive.
"""
import json
import re

import numpy as np
import pytest

from telechat2_ms.data.sft import SftEncoder, official_loss_mask, parse_sft_record, read_sft_records
from telechat2_ms.data.sources import DataError
from telechat2_ms.tokenizer import Telechat2Tokenizer

SYSTEM, USER, BOT, END = 6, 4, 5, 2
TAGS = {"<tool_call>": 9, "</tool_call>": 10, "<tool_response>": 11, "</tool_response>": 12}


def chunks(tok, text):
    """E(text): split at the tool tags, one sentencepiece call per remaining chunk."""
    out = []
    for part in re.split("(" + "|".join(map(re.escape, TAGS)) + ")", text):
        if part in TAGS and tok.has_tool_tokens:
            out.append(TAGS[part])
        elif part:
            out += tok._sp.encode(part)
    return out


def expected(tok, record, header):
    """(ids, mask) built span by span; header = the system ids."""
    ids, mask = list(header), [0] * len(header)
    newline = tok._sp.encode("\n")
    for turn in record["dialog"]:
        body = chunks(tok, turn["content"])
        if turn["role"] == "user":
            ids += [USER] + body
            mask += [1] + [0] * len(body)
        else:
            ids += [BOT] + body + [END] + newline
            mask += [1] * (len(body) + 2) + [0] * len(newline)
    return ids, mask


def first_record(shared_dir, name, multiturn=None):
    with open(shared_dir / "data" / "sft" / name, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            record = json.loads(line)
            if multiturn is None or record["multiturn"] == multiturn:
                return record, line_no
    raise AssertionError(f"no record in {name}")


def encode_one(tok, record, seq_length=8192, where="x:1"):
    encoder = SftEncoder(tok, seq_length)
    samples = list(encoder.encode_records([parse_sft_record(record, where)]))
    assert len(samples) == 1
    return samples[0].ids.tolist(), samples[0].mask.tolist()


def test_single_turn_real_record(shared_dir, tokenizer_115b_path):
    tok = Telechat2Tokenizer(tokenizer_115b_path)
    record, _ = first_record(shared_dir, "demo_single.jsonl")
    assert not record["multiturn"] and not record["tool"]
    ids, mask = encode_one(tok, record)
    newline = [126136, 29]  # ids("\n") of the real tokenizer (spec 5.2)
    header = [SYSTEM] + tok._sp.encode(record["system"]) + newline  # packed layout: system, then ids("\n")
    want_ids, want_mask = expected(tok, record, header)
    assert ids == want_ids
    assert mask == want_mask
    # spot checks on the spans
    assert ids[:1] == [SYSTEM] and ids[len(header) - 2:len(header)] == newline and ids[-3:] == [END] + newline
    answer = tok._sp.encode(record["dialog"][1]["content"])
    assert sum(mask) == 1 + 1 + len(answer) + 1  # <_user>, <_bot>, the answer, <_end>
    bot = ids.index(BOT)
    assert mask[bot:bot + len(answer) + 2] == [1] * (len(answer) + 2) and mask[ids.index(USER)] == 1


def test_multi_turn_real_record(shared_dir, tokenizer_115b_path):
    tok = Telechat2Tokenizer(tokenizer_115b_path)
    record, _ = first_record(shared_dir, "demo_multi.jsonl")
    assert record["multiturn"] and len(record["dialog"]) >= 4
    ids, mask = encode_one(tok, record)
    # chat-template layout: "<_system>" + system + "\n" is one text chunk (system already ends in "\n")
    header = [SYSTEM] + tok._sp.encode(record["system"] + "\n")
    want_ids, want_mask = expected(tok, record, header)
    assert ids == want_ids and mask == want_mask
    turns = len(record["dialog"]) // 2
    assert ids.count(USER) == ids.count(BOT) == ids.count(END) == turns
    assert [mask[i] for i, t in enumerate(ids) if t in (USER, BOT, END)] == [1] * (3 * turns)
    assert ids[-3:] == [END, 126136, 29]  # the template ends every bot turn with "<_end>\n"


def test_tool_real_record(shared_dir):
    tok = Telechat2Tokenizer.demo()  # has <tool_call>.. </tool_response> as ids 9-12 like the 3B/7B tokenizer
    record, _ = first_record(shared_dir, "demo_tool.jsonl", multiturn=True)
    assert record["tool"]
    ids, mask = encode_one(tok, record, seq_length=100000)
    header = [SYSTEM] + chunks(tok, record["system"] + "\n")
    want_ids, want_mask = expected(tok, record, header)
    assert ids == want_ids and mask == want_mask
    ids_a, mask_a = np.array(ids[len(header):]), np.array(mask[len(header):])
    # after the header: tool calls are in bot turns (targets), tool responses in user turns (not targets)
    assert (mask_a[ids_a == 9] == 1).all() and (mask_a[ids_a == 10] == 1).all() and (ids_a == 9).sum() >= 1
    assert (mask_a[ids_a == 11] == 0).all() and (mask_a[ids_a == 12] == 0).all() and (ids_a == 11).sum() >= 1
    # the system prompt's tool tags are encoded as tags too, and never targets
    assert sum(mask[:len(header)]) == 0 and 9 in header


def test_every_shared_file_encodes(shared_dir):
    tok = Telechat2Tokenizer.demo()
    encoder = SftEncoder(tok, 4096, truncation="truncate")
    for path in sorted((shared_dir / "data" / "sft").glob("*.jsonl")):
        for sample in encoder.encode_records(read_sft_records(str(path))):
            assert len(sample.ids) <= 4096 and sample.mask.sum() > 0
    assert encoder.stats.records == 1800


def _single(system, q, a):
    return {"system": system, "dialog": [{"role": "user", "content": q}, {"role": "bot", "content": a}],
            "multiturn": False, "tool": False}


def test_packing_groups_by_system_and_starts_a_new_pack_when_full():
    tok = Telechat2Tokenizer.demo()
    records = [_single("S1\n", "What is 1 plus 2?", "3."), _single("S2\n", "Hello!", "Hi!"),
               _single("S1\n", "What is 2 plus 2?", "4.")]
    header = [SYSTEM] + tok.encode("S1\n") + tok.encode("\n")
    d1 = [USER] + tok.encode("What is 1 plus 2?") + [BOT] + tok.encode("3.") + [END] + tok.encode("\n")
    d3 = [USER] + tok.encode("What is 2 plus 2?") + [BOT] + tok.encode("4.") + [END] + tok.encode("\n")
    parsed = [parse_sft_record(r, f"f:{i + 1}") for i, r in enumerate(records)]
    roomy = list(SftEncoder(tok, 512).encode_records(parsed))
    assert [s.ids.tolist() for s in roomy][0] == header + d1 + d3  # one S1 pack, emitted at the end
    assert len(roomy) == 2 and roomy[1].ids[0] == SYSTEM
    tight = list(SftEncoder(tok, len(header) + len(d1) + 2).encode_records(parsed))
    # d3 does not fit after d1: the S1 pack is emitted without its trailing "\n" and d3 starts a new pack
    assert [s.ids.tolist() for s in tight] == [header + d1[:-2], header + d3,
                                               [SYSTEM] + tok.encode("S2\n") + tok.encode("\n") + [USER]
                                               + tok.encode("Hello!") + [BOT] + tok.encode("Hi!") + [END]
                                               + tok.encode("\n")]
    assert all(official_loss_mask(s.ids, USER, BOT, END).tolist() == s.mask.tolist() for s in tight)


def test_loss_mask_rule_on_a_hand_made_sequence():
    #        sys  q   U  q  B  a  a  E  nl U  q  B  a  E
    ids = [6, 50, 4, 51, 5, 52, 53, 2, 13, 4, 54, 5, 55, 2]
    assert official_loss_mask(np.array(ids), 4, 5, 2).tolist() == [0, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1]
    # truncated inside the last answer: its span runs to the end
    assert official_loss_mask(np.array(ids[:13]), 4, 5, 2).tolist()[-3:] == [0, 1, 1]


def test_too_long_sample_policies(tmp_path):
    tok = Telechat2Tokenizer.demo()
    long_answer = " ".join(["plim zorb quax"] * 40)
    record = {"system": "S\n", "dialog": [{"role": "user", "content": "q1"}, {"role": "bot", "content": "a1"},
                                          {"role": "user", "content": "q2"}, {"role": "bot", "content": long_answer}],
              "multiturn": True, "tool": False}
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    full_ids, full_mask = encode_one(tok, record, seq_length=100000)
    assert len(full_ids) > 64
    with pytest.raises(DataError, match=r"long.jsonl:1: sample has \d+ tokens, more than seq_length 64"):
        list(SftEncoder(tok, 64).encode_records(read_sft_records(str(path))))
    truncate = SftEncoder(tok, 64, "truncate")
    (sample,) = truncate.encode_records(read_sft_records(str(path)))
    assert sample.ids.tolist() == full_ids[:64] and sample.mask.tolist() == full_mask[:64]
    assert truncate.stats.truncated == [f"{path}:1"]
    drop = SftEncoder(tok, 64, "drop")
    assert list(drop.encode_records(read_sft_records(str(path)))) == []
    assert drop.stats.dropped == [f"{path}:1"]


@pytest.mark.parametrize("line, message", [
    ('{"system": "s", "dialog": [}', r"bad.jsonl:3: invalid JSON at column \d+"),
    ('[1, 2]', r"bad.jsonl:3: expected a JSON object per line, got list"),
    ('{"system": "s", "dialog": [{"role": "bot", "content": "a"}]}', r"bad.jsonl:3: dialog\[0\] has role 'bot'"),
    ('{"system": "s", "dialog": [{"role": "user", "content": "q"}]}', r"bad.jsonl:3: the dialog ends with a user"),
    ('{"dialog": [{"role": "user", "content": "q"}]}', r"bad.jsonl:3: 'system' must be a string"),
    ('{"system": "s", "dialog": [{"role": "user", "content": 5}, {"role": "bot", "content": "a"}]}',
     r"bad.jsonl:3: dialog\[0\] \(user\) content must be a string"),
    ('{"system": "s", "dialog": [{"role": "user", "content": "q<_bot>"}, {"role": "bot", "content": "a"}]}',
     r"bad.jsonl:3: found 1 <_user>, 2 <_bot> and 1 <_end> tokens"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps(_single("S\n", "q", "a"))
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")  # line 2 is blank, line 3 is bad
    with pytest.raises(DataError, match=message):
        list(SftEncoder(Telechat2Tokenizer.demo(), 512).encode_records(read_sft_records(str(path))))
