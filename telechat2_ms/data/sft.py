"""TeleChat2 SFT data: the official jsonl records tokenized, packed and loss-masked as in spec 6.1-6.2.

Record (one jsonl line): {"system": str, "dialog": [{"role": "user"|"bot", "content": str}, ...],
"multiturn": bool, "tool": bool} (+ ignored extras such as "id", "source"). The dialog must alternate
user, bot, user, bot, ... and end with a bot turn. `ids(x)` below is one tokenizer call on x (special-token
text such as <tool_call> becomes its id; every chunk gets its own sentencepiece dummy prefix).

Token layout (the official DeepSpeed recipe, OFF-DS):
- single-turn rows (multiturn == tool == false) are packed, grouped by identical system prompt:
      [<_system>] + ids(system) + ids("\n")  then per dialog, per turn:
      user -> [<_user>] + ids(content);   bot -> [<_bot>] + ids(content) + [<_end>] + ids("\n")
  A pack is emitted when the next dialog would not fit in seq_length; it is emitted without its trailing
  ids("\n"), except the last pack of each system group, which keeps it.
- multi-turn and tool rows are one sample each, rendered with the chat template (spec 5.3) as
  apply_chat_template([{"role": "system", "content": system}] + dialog, add_generation_prompt=False):
      "<_system>" + system + "\n" + "<_user>" + q + "<_bot>" + a + "<_end>\n" + ...
  Note the record's system text already ends in "\n" (or "\n\n" with tools), so both layouts carry the
  official pipeline's extra newline after the system prompt; the chat template at inference has one fewer.

Loss mask (OFF-DS collator, chosen over MindFormers' answer-only mask, spec 10.11): with b_i, u_i, e_i the
positions of the i-th <_bot>, <_user>, <_end> in a sample, mask[b_i .. e_i] = 1 (inclusive) and mask[u_i] = 1.
So the targets are each <_bot>, all answer tokens, each <_end> and each <_user>; system text, questions and
the "\n" after <_end> are not. mask[p] = 1 means "token p is predicted from tokens < p" (the loss uses
mask[1:] against logits[:-1]). If truncation removed the last <_end>, the mask runs to the end of the sample.

Other families (a tokenizer whose `family` is not "telechat2", e.g. Qwen2's ChatML): every record is one
sample, rendered by the tokenizer's chat template and tokenized once; the targets are each answer and its
end-of-turn token (SftEncoder.template_sample). Nothing is packed.

Deviations from OFF-DS, on purpose:
- a dialog that does not fit into the current pack starts the next pack (OFF-DS silently drops it);
- a sample longer than seq_length follows `truncation` (TrainSettings.truncation):
  "error" (default: DataError naming file, line and length), "truncate" (keep the first seq_length tokens,
  as the OFF-DS collator does) or "drop" (skip it and count it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from telechat2_ms.data.sources import DataError, iter_jsonl

LOG = logging.getLogger(__name__)
TRUNCATION_POLICIES = ("error", "truncate", "drop")
USER_ROLES = ("user",)
BOT_ROLES = ("bot", "assistant")


@dataclass
class SftRecord:
    system: str
    dialog: List[Dict[str, str]]
    multiturn: bool
    tool: bool
    where: str  # "file:line", for error messages

    @property
    def packed(self) -> bool:
        """Single-turn, tool-free rows are packed (spec 6.2)."""
        return not self.multiturn and not self.tool


@dataclass
class Sample:
    """One training sequence before padding: ids [L] int32 and loss mask [L] uint8 (L <= seq_length)."""

    ids: np.ndarray
    mask: np.ndarray
    where: str = ""


@dataclass
class PackStats:
    records: int = 0
    packed_dialogs: int = 0
    samples: int = 0
    truncated: List[str] = field(default_factory=list)  # "file:line" of truncated records / packs
    dropped: List[str] = field(default_factory=list)


def parse_sft_record(obj: Mapping[str, Any], where: str) -> SftRecord:
    """Validate one jsonl object; DataError names `where` and the bad field."""
    system = obj.get("system")
    if not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string, got {type(system).__name__}")
    dialog = obj.get("dialog")
    if not isinstance(dialog, list) or not dialog:
        raise DataError(f"{where}: 'dialog' must be a non-empty list of {{'role', 'content'}} turns")
    for key in ("multiturn", "tool"):
        if key in obj and not isinstance(obj[key], bool):
            raise DataError(f"{where}: '{key}' must be true or false, got {obj[key]!r}")
    turns = []
    for i, turn in enumerate(dialog):
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: dialog[{i}] must be an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        expected = USER_ROLES if i % 2 == 0 else BOT_ROLES
        if role not in expected:
            raise DataError(f"{where}: dialog[{i}] has role {role!r}; turns must alternate user, bot, user, bot ...")
        if not isinstance(content, str):
            raise DataError(f"{where}: dialog[{i}] ({role}) content must be a string, got {type(content).__name__}")
        turns.append({"role": "user" if i % 2 == 0 else "bot", "content": content})
    if len(turns) % 2:
        raise DataError(f"{where}: the dialog ends with a user turn; it must end with a bot answer")
    return SftRecord(system, turns, bool(obj.get("multiturn", False)), bool(obj.get("tool", False)), where)


def read_sft_records(path: str) -> Iterator[SftRecord]:
    for line_no, obj in iter_jsonl(path):
        yield parse_sft_record(obj, f"{path}:{line_no}")


def official_loss_mask(ids: np.ndarray, user_id: int, bot_id: int, end_id: int, where: str = "") -> np.ndarray:
    """OFF-DS loss mask of one (untruncated) sample, see the module docstring. ids [L] -> mask [L] uint8."""
    ids = np.asarray(ids)
    users = np.flatnonzero(ids == user_id)
    bots = np.flatnonzero(ids == bot_id)
    ends = list(np.flatnonzero(ids == end_id))
    n_ends = len(ends)
    if n_ends + 1 == len(bots) and len(bots) == len(users):  # truncated inside the last answer
        ends.append(len(ids) - 1)  # its span runs to the end
    if len(ends) != len(bots) or len(users) < len(bots):
        raise DataError(f"{where}: found {len(users)} <_user>, {len(bots)} <_bot> and {n_ends} <_end> tokens; "
                        "every bot turn needs one of each (does some content contain special-token text?)")
    mask = np.zeros(len(ids), np.uint8)
    for u, b, e in zip(users, bots, ends):
        if not u < b <= e:
            raise DataError(f"{where}: special tokens out of order (<_user> at {u}, <_bot> at {b}, <_end> at {e})")
        mask[b:e + 1] = 1
        mask[u] = 1
    return mask


class SftEncoder:
    """Turns SftRecords into packed, loss-masked Samples for one tokenizer and seq_length."""

    def __init__(self, tokenizer, seq_length: int, truncation: str = "error"):
        if truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
        if seq_length < 2:
            raise ValueError(f"seq_length must be at least 2 for training, got {seq_length}")
        self.tok = tokenizer
        self.seq_length = seq_length
        self.truncation = truncation
        self.template_only = getattr(tokenizer, "family", "telechat2") != "telechat2"
        if not self.template_only:
            self.user_id, self.bot_id, self.end_id = tokenizer.user_id, tokenizer.bot_id, tokenizer.eos_id
            self.system_id = tokenizer.system_id
            self.newline = tokenizer.encode("\n")
        self.stats = PackStats()
        self._warned_tools = False

    # ---- token layouts ------------------------------------------------------------------------------
    def header_ids(self, system: str) -> List[int]:
        """[<_system>] + ids(system) + ids("\\n") (packed layout)."""
        return [self.system_id] + self.tok.encode(system) + self.newline

    def dialog_ids(self, dialog: List[Dict[str, str]]) -> List[int]:
        """Per turn: [<_user>] + ids(q), or [<_bot>] + ids(a) + [<_end>] + ids("\\n") (packed layout)."""
        ids: List[int] = []
        for turn in dialog:
            if turn["role"] == "user":
                ids += [self.user_id] + self.tok.encode(turn["content"])
            else:
                ids += [self.bot_id] + self.tok.encode(turn["content"]) + [self.end_id] + self.newline
        return ids

    def conversation_ids(self, record: SftRecord) -> List[int]:
        """Chat-template layout of a multi-turn / tool record."""
        if record.tool and not self.tok.has_tool_tokens and not self._warned_tools:
            LOG.warning("%s: tool data with a tokenizer that has no <tool_call>/<tool_response> tokens (%s): "
                        "the tags are encoded as plain text", record.where, self.tok.path)
            self._warned_tools = True
        messages = [{"role": "system", "content": record.system}] + record.dialog
        return self.tok.apply_chat_template(messages, add_generation_prompt=False)

    def template_sample(self, record: SftRecord) -> Tuple[List[int], np.ndarray]:
        """Another family's chat template (ChatML): the record rendered once and tokenized once; the targets
        are the tokens that start inside an answer, from the end of the generation prompt before it through
        its end-of-turn token (ChatML: the answer and <|im_end|>, not the "\n" after it)."""
        messages = ([{"role": "system", "content": record.system}] if record.system else []) + [
            {"role": "assistant" if t["role"] == "bot" else "user", "content": t["content"]} for t in record.dialog]
        render = self.tok.apply_chat_template
        text = render(messages, add_generation_prompt=False, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:i], add_generation_prompt=True, tokenize=False) if i else ""
            through = render(messages[:i + 1], add_generation_prompt=False, tokenize=False)
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise DataError(f"{record.where}: the chat template does not render a conversation as the "
                                "concatenation of its turns, so answers cannot be located for the loss mask")
            spans.append((len(before), len(through.rstrip("\n"))))
        ids, offsets = self.tok.encode_with_offsets(text)
        mask = np.zeros(len(ids), np.uint8)
        for t, (start, _) in enumerate(offsets):
            mask[t] = any(a <= start < b for a, b in spans)
        return ids, mask

    # ---- samples ------------------------------------------------------------------------------------
    def _sample(self, ids: List[int], where: str, mask: Optional[np.ndarray] = None) -> Optional[Sample]:
        """Loss-mask `ids` (unless given) and apply the truncation policy; None if dropped."""
        arr = np.asarray(ids, np.int32)
        if mask is None:
            mask = official_loss_mask(arr, self.user_id, self.bot_id, self.end_id, where)
        if len(arr) > self.seq_length:
            if self.truncation == "error":
                raise DataError(f"{where}: sample has {len(arr)} tokens, more than seq_length {self.seq_length}; "
                                "set train.truncation to 'truncate' (keep the first seq_length tokens) or "
                                "'drop' (skip such samples), or raise seq_length")
            if self.truncation == "drop":
                self.stats.dropped.append(where)
                return None
            self.stats.truncated.append(where)
            arr, mask = arr[:self.seq_length], mask[:self.seq_length]
        self.stats.samples += 1
        return Sample(arr, mask, where)

    def encode_records(self, records: Iterable[SftRecord]) -> Iterator[Sample]:
        """Samples in order: unpacked rows as they come, packs when full; remaining packs at the end in order
        of first appearance of their system prompt."""
        groups: Dict[str, Tuple[List[int], List[int], List[str]]] = {}  # system -> (header, buffer, wheres)
        n_newline = 0 if self.template_only else len(self.newline)
        for record in records:
            self.stats.records += 1
            if self.template_only:  # one sample per record, not packed
                ids, mask = self.template_sample(record)
                sample = self._sample(ids, record.where, mask)
                if sample is not None:
                    yield sample
                continue
            if not record.packed:
                sample = self._sample(self.conversation_ids(record), record.where)
                if sample is not None:
                    yield sample
                continue
            if record.system not in groups:
                header = self.header_ids(record.system)
                groups[record.system] = (header, list(header), [])
            header, buffer, wheres = groups[record.system]
            dialog = self.dialog_ids(record.dialog)
            self.stats.packed_dialogs += 1
            if len(header) + len(dialog) > self.seq_length:  # does not fit even alone
                if wheres:
                    yield self._sample(buffer[:-n_newline], _span(wheres))
                    del wheres[:]
                    buffer[:] = header
                sample = self._sample(header + dialog, record.where)
                if sample is not None:
                    yield sample
                continue
            if len(buffer) + len(dialog) > self.seq_length:
                yield self._sample(buffer[:-n_newline], _span(wheres))
                del wheres[:]
                buffer[:] = header
            buffer += dialog
            wheres.append(record.where)
        for header, buffer, wheres in groups.values():
            if wheres:
                yield self._sample(buffer, _span(wheres))


def _span(wheres: List[str]) -> str:
    return wheres[0] if len(wheres) == 1 else f"{wheres[0]} .. {wheres[-1]} (pack of {len(wheres)} dialogs)"


def encode_sft_file(path: str, encoder: SftEncoder) -> Iterator[Sample]:
    """All samples of one jsonl file (packing groups do not cross files, as in OFF-DS)."""
    return encoder.encode_records(read_sft_records(path))
