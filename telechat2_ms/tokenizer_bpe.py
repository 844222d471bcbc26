"""Byte-level BPE tokenizers (Qwen2) through HF `tokenizers`; the same interface as tokenizer.Telechat2Tokenizer.

A checkpoint directory holds `tokenizer.json` (loaded as it is) or `vocab.json` + `merges.txt` (assembled the
way transformers' Qwen2Tokenizer does: NFC normalisation, Qwen2's split pattern with single digits, byte-level
mapping without a prefix space, the ChatML special tokens after the vocabulary), plus an optional
`tokenizer_config.json` (special tokens in `added_tokens_decoder`, eos / pad / bos tokens, `chat_template`).
No BOS is added (Qwen2 has none); the chat template defaults to ChatML (chat_template.CHATML_JINJA_TEMPLATE).

Decoding: `decode` is the library's. `IncrementalBpeDecoder` streams the same text: each ordinary id is its
bytes (the byte-level alphabet reversed), fed to an incremental UTF-8 decoder with the "replace" rule, so a
character split across ids is held back until its last byte arrives and never printed in halves. A skipped
special id is dropped from the byte run (as `decode` drops it before joining); a written one ends the run.
"""
from __future__ import annotations

import codecs
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from telechat2_ms import chat_template as ct
from telechat2_ms.tokenizer import TokenizerBase, TokenizerError, read_tokenizer_config, token_content

# transformers' Qwen2Tokenizer pre-tokenizer pattern (digits one at a time)
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _byte_decoder() -> Dict[str, int]:
    """The GPT-2 byte-level alphabet reversed: character -> byte (printable bytes stand for themselves, the
    others are shifted to U+0100 and up, in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class ByteLevelBpeTokenizer(TokenizerBase):
    """A Qwen2-style tokenizer. `path`: a tokenizer.json file, or a directory holding tokenizer.json or
    vocab.json + merges.txt, optionally tokenizer_config.json."""

    family = "chatml"

    def __init__(self, path: Union[str, os.PathLike]):
        path = os.fspath(path)
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        config = read_tokenizer_config(directory) if os.path.isdir(path) else {}
        self.config = config
        self._tok = self._load(path, config)
        self.path = path
        json_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.files = [json_file] if os.path.isfile(json_file) else [os.path.join(path, "vocab.json"),
                                                                    os.path.join(path, "merges.txt")]
        self.chat_template = config.get("chat_template")
        added = self._tok.get_added_tokens_decoder()  # id -> AddedToken
        self._special_ids = {i for i, t in added.items() if t.special}
        self._special_text = {i: t.content for i, t in added.items()}
        self._bytes = _byte_decoder()
        names = {name: token_content(config.get(name)) for name in ("bos_token", "eos_token", "pad_token")}
        self._eos_token = names["eos_token"] or "<|endoftext|>"
        self._pad_token = names["pad_token"] or "<|endoftext|>"
        self._bos_token = names["bos_token"]  # None for Qwen2
        for token in (self._eos_token, self._pad_token):
            self.token_to_id(token)  # named in the message when missing
        self.add_bos_token = bool(config.get("add_bos_token", False)) and self._bos_token is not None
        self.has_tool_tokens = True  # <tool_call> is plain text or an added token: always encodable

    @staticmethod
    def _load(path: str, config: Mapping[str, Any]):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            if os.path.isfile(file):
                return Tokenizer.from_file(file)
            vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            if not (os.path.isfile(vocab) and os.path.isfile(merges)):
                raise TokenizerError(f"{path} holds neither tokenizer.json nor vocab.json + merges.txt")
            tok = Tokenizer(BPE.from_file(vocab, merges, fuse_unk=False))
        except Exception as err:  # the Rust side raises a plain Exception with its reason
            if isinstance(err, TokenizerError):
                raise
            raise TokenizerError(f"cannot read the tokenizer at {path}: {err}") from err
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        _add_special_tokens(tok, config)
        return tok

    # ---- vocabulary --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"ByteLevelBpeTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self.path}")
        return tid

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(self._check_id(token_id))

    @property
    def bos_id(self) -> Optional[int]:
        return None if self._bos_token is None else self.token_to_id(self._bos_token)

    @property
    def stop_ids(self) -> frozenset:
        """Ids that end a generated answer: eos, and ChatML's <|im_end|> / <|endoftext|> when present."""
        ids = {self.eos_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            tid = self._tok.token_to_id(token)
            if tid is not None:
                ids.add(tid)
        return frozenset(ids)

    # ---- encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = True, add_bos: Optional[bool] = None,
               add_eos: Optional[bool] = None) -> List[int]:
        """Token ids of `text`; special-token text becomes its id unless parse_special=False."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        self._tok.encode_special_tokens = not parse_special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        if self.add_bos_token if add_bos is None else add_bos:
            if self._bos_token is None:
                raise TokenizerError(f"{self.path} has no bos token (Qwen2 uses none)")
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_with_offsets(self, text: str):
        """(ids, [(start, end) character offsets]) of `text`, special tokens parsed."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([self._check_id(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalBpeDecoder":
        return IncrementalBpeDecoder(self, skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes an ordinary id stands for."""
        return bytes(self._bytes[c] for c in self._tok.id_to_token(token_id))

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]] = None,
                            add_generation_prompt: bool = True, tokenize: bool = True) -> Union[str, List[int]]:
        """Render with tokenizer_config.json's `chat_template`, else ChatML; ids or the prompt string."""
        template = self.chat_template if self.chat_template is not None else ct.CHATML_JINJA_TEMPLATE
        text = ct.render_chat(messages, tools, add_generation_prompt, template=template,
                              eos_token=self._eos_token, pad_token=self._pad_token, bos_token=self._bos_token)
        return self.encode(text) if tokenize else text


class IncrementalBpeDecoder:
    """Streaming detokenizer: `push(id)` returns the text that id completes (possibly ""), `finish()` the
    rest; the pieces concatenate to `tokenizer.decode(ids, skip_special_tokens)`."""

    def __init__(self, tokenizer: ByteLevelBpeTokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        tok = self._tok
        token_id = tok._check_id(token_id)
        if token_id in tok._special_text:
            if token_id in tok._special_ids and self._skip:
                return ""  # dropped before the bytes are joined, as decode does: the byte run goes on
            text = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            return text + tok._special_text[token_id]
        return self._utf8.decode(tok.token_bytes(token_id))

    def finish(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _add_special_tokens(tok, config: Mapping[str, Any]) -> None:
    """tokenizer_config.json's added tokens at their ids, else the ChatML special tokens after the vocabulary
    (what transformers' Qwen2Tokenizer adds by default)."""
    from tokenizers import AddedToken

    added = config.get("added_tokens_decoder") or {}
    entries = sorted((int(i), v) for i, v in added.items()) if isinstance(added, Mapping) else []
    if not entries:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CHATML_SPECIAL_TOKENS])
        return
    for tid, value in entries:
        if tid != tok.get_vocab_size(with_added_tokens=True):
                raise TokenizerError(f"tokenizer_config.json: added token {value.get('content')!r} has id {tid}, but "
                                 f"the vocabulary ends at {tok.get_vocab_size(with_added_tokens=True)}")
        token = AddedToken(value["content"], normalized=bool(value.get("normalized", False)),
                           special=bool(value.get("special", True)), lstrip=bool(value.get("lstrip", False)),
                           rstrip=bool(value.get("rstrip", False)), single_word=bool(value.get("single_word", False)))
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
