"""Shared test setup: quiet MindSpore logs, run every test in its own temporary directory (MindSpore writes
rank_0/, kernel_meta/ into the working directory), and locate ../shared."""
import os
import pathlib

import pytest

os.environ.setdefault("GLOG_v", "3")

try:  # select the device before any kernel runs: a later set_device would be refused by MindSpore
    import mindspore

    from telechat2_ms.build import synchronous_cpu_runtime

    mindspore.set_device("CPU")
    synchronous_cpu_runtime()  # host work in the calling thread: faster on 2 cores, errors where they happen
except ImportError:  # the tokenizer / evaluation-loader tests run without MindSpore
    pass

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
REFERENCE_115B = SHARED / "reference" / "telechat2-115b"
QWEN2_RANKS = SHARED / "reference" / "qwen2" / "qwen.tiktoken"


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"../shared is not beside the checkout ({SHARED} missing)")
    return SHARED


@pytest.fixture
def tokenizer_115b_path():
    path = REFERENCE_115B / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"real TeleChat2 tokenizer not found at {path}")
    return str(path)


@pytest.fixture(scope="session")
def encode():
    """The real TeleChat2 tokenizer's encode, special-token strings kept as text (prompt parity tests)."""
    path = REFERENCE_115B / "tokenizer.model"
    if not path.exists():
        pytest.skip(f"real TeleChat2 tokenizer not found at {path}")
    from telechat2_ms.tokenizer import Telechat2Tokenizer

    tokenizer = Telechat2Tokenizer(str(path))
    return lambda text: tokenizer.encode(text, parse_special=False)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    """A Qwen2 checkpoint as transformers' save_pretrained writes it (tiny widths, tied embeddings, the real
    151,936-id vocabulary) with a tokenizer.json built from the real Qwen2 ranks and a Qwen2-Instruct style
    tokenizer_config.json (no chat_template: the built-in ChatML)."""
    import json

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not QWEN2_RANKS.is_file():
        pytest.skip(f"../shared/reference/qwen2 not present ({QWEN2_RANKS} missing)")
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from telechat2_ms.tokenizer_bpe import QWEN2_PATTERN

    d = tmp_path_factory.mktemp("Qwen2-tiny")
    conf = transformers.Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(conf).save_pretrained(str(d))
    special = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    tok = TikTokenConverter(vocab_file=str(QWEN2_RANKS), pattern=QWEN2_PATTERN,
                            extra_special_tokens=list(special)).converted()
    tok.normalizer = normalizers.NFC()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in special.items()},
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")
    return d
