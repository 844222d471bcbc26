"""TeleChat2 tokenizer over sentencepiece (spec 5.1-5.2), with a streaming detokenizer; `load_tokenizer`
chooses it or the byte-level BPE one of Qwen2 (tokenizer_bpe.py) from the files it is given.

Encoding: the text is split at the special tokens the model has as pieces (<_start> <_end> <_pad> <_user>
<_bot> <_system> <_observation> <_sep>, and <tool_call> </tool_call> <tool_response> </tool_response> only
in tokenizers that have them: 3B/7B/35B and the built-in demo one, not 115B). Each text chunk between them is
encoded separately by sentencepiece, so each chunk gets its own dummy-prefix "▁"; special tokens map to
their ids. No bos/eos is added unless tokenizer_config.json says add_bos_token / add_eos_token.
  "<_user>生抽与老抽的区别？<_bot>" -> [4, 25104, 127499, 126325, 73611, 29151, 126271, 5];  "\n" -> [126136, 29]

Decoding mirrors that: ids are cut at special ids and each chunk is decoded by sentencepiece on its own,
which strips exactly the one dummy-prefix space the chunk got when encoded, so decode(encode(x)) == x
(skip_special_tokens=False) for any text sentencepiece can represent (byte fallback covers everything
except the character "▁" U+2581, which sentencepiece itself turns into a space). With
skip_special_tokens=True the chunks are concatenated without the special tokens and without any space
between them (HF's slow tokenizer would instead decode the joined chunks at once and turn the second
chunk's dummy prefix into a space).

`IncrementalDecoder` turns ids into text one id at a time for streaming: it reproduces the sentencepiece
decoding rules exactly (leading-space strip, per-byte U+FFFD for invalid byte-fallback sequences) and holds
back incomplete UTF-8 sequences until they complete.
"""
from __future__ import annotations

import codecs
import os
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from telechat2_ms import chat_template as ct
from telechat2_ms.formats.json_file import read_json_object

SPECIAL_TOKENS = ("<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>")
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
SPACE = "\u2581"  # sentencepiece's whitespace marker "▁"
DEMO_TOKENIZER_ASSET = "assets/demo_tokenizer.model"


class TokenizerError(ValueError):
    """A tokenizer file, token or id is unusable; the message names it."""


def _replace_per_byte(err: UnicodeDecodeError):
    """sentencepiece's rule for invalid byte-fallback sequences: one U+FFFD per invalid byte."""
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("telechat2_spm_replace", _replace_per_byte)


def token_content(value: Any) -> Optional[str]:
    """tokenizer_config.json stores tokens as strings or {"content": ...} AddedToken dicts."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


class TokenizerBase:
    """What this module's tokenizer and tokenizer_bpe.ByteLevelBpeTokenizer share. A subclass provides
    `vocab_size`, `token_to_id`, `encode`, and sets `_eos_token`, `_pad_token` (token strings) and `_special_ids`."""

    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, **kwargs) -> List[int]:
        return self.encode(text, **kwargs)

    def _check_id(self, token_id: Any) -> int:
        return check_token_id(token_id, self.vocab_size)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(self._eos_token)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(self._pad_token)

    @property
    def special_ids(self) -> frozenset:
        """Ids that text never encodes to without special-token parsing: sentencepiece's control pieces and the
        split tokens; a BPE tokenizer's special added tokens."""
        return frozenset(self._special_ids)


class Telechat2Tokenizer(TokenizerBase):
    """TeleChat2 tokenizer. `path` is a tokenizer.model file or a directory holding tokenizer.model and
    optionally tokenizer_config.json (add_bos_token, add_eos_token, bos/eos/pad tokens, chat_template)."""

    family = "telechat2"

    def __init__(self, path: Union[str, os.PathLike]):
        import sentencepiece as spm

        if path is None or str(path).strip() == "":
            raise TokenizerError("empty tokenizer path; use Telechat2Tokenizer.demo() or load_tokenizer(None) "
                                 "for the built-in demo tokenizer")
        path = os.fspath(path)
        config: Dict[str, Any] = {}
        if os.path.isdir(path):
            model_file = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(model_file):
                raise TokenizerError(f"directory {path} has no tokenizer.model")
            config = read_tokenizer_config(path)
        elif os.path.isfile(path):
            model_file = path
        else:
            raise TokenizerError(f"tokenizer file not found: {path}")
        with open(model_file, "rb") as f:
            blob = f.read()
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(blob)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError depending on the build
            raise TokenizerError(f"{model_file} is not a sentencepiece model ({type(err).__name__}: {err})") from err
        if sp.get_piece_size() == 0:
            raise TokenizerError(f"{model_file} is not a sentencepiece model (no pieces)")
        self.path = model_file
        self.files = [model_file]  # what defines it (dataset and eval fingerprints hash these)
        self._sp = sp
        self._setup(config)

    # ---- construction helpers ----------------------------------------------------------------------
    def _setup(self, config: Mapping[str, Any]) -> None:
        sp = self._sp
        self.config = dict(config)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.chat_template = config.get("chat_template")
        # unk_token is not read: the 115B config names "<_end>" (sic); sentencepiece's unk piece is used
        self._bos_token = token_content(config.get("bos_token")) or "<_start>"
        self._eos_token = token_content(config.get("eos_token")) or "<_end>"
        self._pad_token = token_content(config.get("pad_token")) or "<_pad>"
        self._piece_ids = {}
        for name in SPECIAL_TOKENS + TOOL_TOKENS + (self._bos_token, self._eos_token, self._pad_token):
            pid = sp.piece_to_id(name)
            if sp.id_to_piece(pid) == name:  # unknown pieces map to the unk id
                self._piece_ids[name] = pid
        self.has_tool_tokens = all(t in self._piece_ids for t in TOOL_TOKENS)
        split_names = [t for t in SPECIAL_TOKENS + TOOL_TOKENS if t in self._piece_ids]
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in sorted(split_names, key=len, reverse=True))
                                    + ")") if split_names else None
        self._split_ids = {t: self._piece_ids[t] for t in split_names}
        # ids that end a text chunk when decoding: every control piece plus the split tokens
        self._special_ids = {i for i in range(sp.get_piece_size()) if sp.is_control(i)}
        self._special_ids.update(self._split_ids.values())
        self._byte_value = {i: int(sp.id_to_piece(i)[3:5], 16)
                            for i in range(sp.get_piece_size()) if sp.is_byte(i)}
        self._unk_surface = sp.decode([sp.unk_id()]) if sp.unk_id() >= 0 else ""

    @classmethod
    def demo(cls) -> "Telechat2Tokenizer":
        """The built-in 1024-piece demo tokenizer (telechat2_ms/assets/demo_tokenizer.model), ids 0-12 as in
        the TeleChat2 3B/7B tokenizer; used by the `tiny` model so nothing has to be downloaded."""
        return cls(demo_tokenizer_path())

    # ---- vocabulary --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def __repr__(self) -> str:
        return f"Telechat2Tokenizer({self.path!r}, vocab_size={self.vocab_size}, tool_tokens={self.has_tool_tokens})"

    def token_to_id(self, token: str) -> int:
        """Id of a piece (e.g. "<_user>", "▁A"); TokenizerError if the model has no such piece."""
        pid = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(pid) != token:
            hint = (" (the TeleChat2-115B tokenizer.model has no tool-call tokens; use the 3B/7B/35B "
                    "tokenizer.model, never add them as new ids beyond the embedding)") if token in TOOL_TOKENS else ""
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self.path}{hint}")
        return pid

    def id_to_token(self, token_id: int) -> str:
        self._check_id(token_id)
        return self._sp.id_to_piece(int(token_id))

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self.token_to_id(self._bos_token)

    @property
    def stop_ids(self) -> frozenset:
        """Ids that end a generated answer (<_end>)."""
        return frozenset({self.eos_id})

    @property
    def user_id(self) -> int:
        return self.token_to_id("<_user>")

    @property
    def bot_id(self) -> int:
        return self.token_to_id("<_bot>")

    @property
    def system_id(self) -> int:
        return self.token_to_id("<_system>")

    @property
    def tool_token_ids(self) -> Dict[str, int]:
        """{"<tool_call>": 9, ...}; TokenizerError on a tokenizer without them (115B)."""
        return {t: self.token_to_id(t) for t in TOOL_TOKENS}

    # ---- encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, parse_special: bool = True, add_bos: Optional[bool] = None,
               add_eos: Optional[bool] = None) -> List[int]:
        """Token ids of `text`. Special-token strings in the text become their ids unless
        parse_special=False (then they are encoded as plain text, e.g. for untrusted user input).
        add_bos/add_eos default to tokenizer_config.json's add_bos_token/add_eos_token (false for TeleChat2)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: List[int] = []
        if self.add_bos_token if add_bos is None else add_bos:
            ids.append(self.bos_id)
        chunks = self._split_re.split(text) if (parse_special and self._split_re) else [text]
        for chunk in chunks:
            if not chunk:
                continue
            if chunk in self._split_ids and parse_special:
                ids.append(self._split_ids[chunk])
            else:
                ids.extend(self._sp.encode(chunk))
        if self.add_eos_token if add_eos is None else add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Each run of ordinary ids between special ids is decoded by sentencepiece on its own
        (dropping its one dummy-prefix space); special ids are dropped or written as their piece text."""
        out: List[str] = []
        chunk: List[int] = []
        for raw in ids:
            token_id = self._check_id(raw)
            if token_id in self._special_ids:
                if chunk:
                    out.append(self._sp.decode(chunk))
                    chunk = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(token_id))
            else:
                chunk.append(token_id)
        if chunk:
            out.append(self._sp.decode(chunk))
        return "".join(out)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence[Any]] = None,
                            add_generation_prompt: bool = True, tokenize: bool = True) -> Union[str, List[int]]:
        """Render `messages` with tokenizer_config.json's `chat_template` (Jinja) if it has one, else the
        built-in TeleChat2 template (spec 5.3); return ids (tokenize=True) or the prompt string.
        Tokenizing a conversation with tools / tool calls / tool results needs the tool tokens: on a tokenizer
        without them (115B) this raises TokenizerError instead of silently encoding the tags as text."""
        text = ct.render_chat(messages, tools, add_generation_prompt, template=self.chat_template,
                              bos_token=self._bos_token, eos_token=self._eos_token, pad_token=self._pad_token)
        if not tokenize:
            return text
        if not self.has_tool_tokens and ct.uses_tool_tokens(messages, tools):
            missing = [t for t in TOOL_TOKENS if t not in self._piece_ids]
            raise TokenizerError(f"{self.path} has no {', '.join(missing)} pieces, so a conversation with tools "
                                 "cannot be tokenized (the TeleChat2-115B tokenizer lacks them; use the "
                                 "3B/7B/35B tokenizer.model)")
        return self.encode(text)


class IncrementalDecoder:
    """Streaming detokenizer: `push(id)` returns the text that id completes (possibly ""), `finish()` the
    rest. The concatenation of all returned strings equals `tokenizer.decode(ids, skip_special_tokens)`.
    Incomplete UTF-8 from byte-fallback pieces is held back until its last byte arrives (or emitted as
    U+FFFD per byte, like sentencepiece, when the run of byte pieces ends without completing it)."""

    def __init__(self, tokenizer: Telechat2Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._reset_chunk()

    def _reset_chunk(self) -> None:
        self._bytes = codecs.getincrementaldecoder("utf-8")("telechat2_spm_replace")
        self._in_bytes = False  # inside a run of byte-fallback pieces
        self._at_start = True  # sentencepiece's "is_bos_ws": may still strip a leading "▁"
        self._stripped_last = False  # the previous piece had its leading "▁" stripped
        self._chunk_has_text = False

    def _end_byte_run(self) -> str:
        text = self._bytes.decode(b"", final=True) if self._in_bytes else ""
        self._in_bytes = False
        if text:
            self._chunk_has_text = True
        return text

    def push(self, token_id: int) -> str:
        tok = self._tok
        token_id = tok._check_id(token_id)
        if token_id in tok._special_ids:
            text = self._end_byte_run()
            self._reset_chunk()
            return text if self._skip else text + tok._sp.id_to_piece(token_id)
        if token_id in tok._byte_value:
            self._in_bytes = True
            text = self._bytes.decode(bytes([tok._byte_value[token_id]]))
            self._chunk_has_text = self._chunk_has_text or bool(text)
            return text
        text = self._end_byte_run()
        if self._stripped_last or self._chunk_has_text:
            self._at_start = False
        if token_id == tok.unk_id:
            piece, self._stripped_last = tok._unk_surface, False
        else:
            piece = tok._sp.id_to_piece(token_id)
            self._stripped_last = self._at_start and piece.startswith(SPACE)
            if self._stripped_last:
                piece = piece[1:]
            piece = piece.replace(SPACE, " ")
        if piece:
            self._chunk_has_text = True
        return text + piece

    def finish(self) -> str:
        """Flush held-back bytes (an unfinished UTF-8 sequence becomes U+FFFD per byte) and reset."""
        text = self._end_byte_run()
        self._reset_chunk()
        return text


def demo_tokenizer_path() -> str:
    """Filesystem path of the packaged demo tokenizer model."""
    from importlib import resources

    ref = resources.files("telechat2_ms").joinpath(DEMO_TOKENIZER_ASSET)
    path = os.fspath(ref)
    if not os.path.isfile(path):
        raise TokenizerError(f"demo tokenizer missing at {path}; regenerate it with "
                             "`python -m telechat2_ms.data.demo_corpus --write-tokenizer`")
    return path


BPE_FILES = ("tokenizer.json", "vocab.json")


def tokenizer_kind(path: str) -> Optional[str]:
    """"sentencepiece" (TeleChat2's tokenizer.model), "bpe" (Qwen2's tokenizer.json or vocab.json + merges.txt)
    or None, for a tokenizer file or a directory holding one."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return "sentencepiece"
        if any(os.path.isfile(os.path.join(path, name)) for name in BPE_FILES):
            return "bpe"
        return None
    if os.path.isfile(path):
        return "bpe" if path.endswith(".json") else "sentencepiece"
    return None


def load_tokenizer(path: Optional[Union[str, os.PathLike]] = None):
    """Tokenizer at `path` (a file, or a directory: tokenizer.model -> Telechat2Tokenizer; tokenizer.json or
    vocab.json + merges.txt -> tokenizer_bpe.ByteLevelBpeTokenizer), or the built-in demo tokenizer when `path`
    is None or empty."""
    if path is None or str(path).strip() == "":
        return Telechat2Tokenizer.demo()
    path = os.fspath(path)
    kind = tokenizer_kind(path)
    if kind == "bpe":
        from telechat2_ms.tokenizer_bpe import ByteLevelBpeTokenizer

        return ByteLevelBpeTokenizer(path)
    if kind is None and os.path.isdir(path):
        raise TokenizerError(f"directory {path} has no tokenizer.model, tokenizer.json or vocab.json + merges.txt")
    return Telechat2Tokenizer(path)


def read_tokenizer_config(directory: str) -> Dict[str, Any]:
    """tokenizer_config.json of a tokenizer directory ({} when there is none)."""
    config_file = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return {}
    return read_json_object(config_file, TokenizerError)


def check_token_id(token_id: Any, vocab_size: int) -> int:
    """`token_id` as an int, or TokenizerError if it is not an integer id of the vocabulary."""
    if isinstance(token_id, bool) or not hasattr(token_id, "__index__"):
        raise TokenizerError(f"token id {token_id!r} is not an integer")
    token_id = int(token_id)
    if not 0 <= token_id < vocab_size:
        raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
    return token_id
