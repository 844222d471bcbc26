"""Shared test setup: quiet MindSpore logs, run every test in its own temporary directory (MindSpore writes
rank_0/, kernel_meta/ into the working directory), and locate ../shared."""
import os
import pathlib

import pytest

os.environ.setdefault("GLOG_v", "3")

try:  # select the device before any kernel runs: a later set_device would be refused by MindSpore
    import mindspore

    mindspore.set_device("CPU")
    mindspore.runtime.launch_blocking()  # synchronous PyNative: faster on 2 cores, errors where they happen
except ImportError:  # the tokenizer / evaluation-loader tests run without MindSpore
    pass

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
REFERENCE_115B = SHARED / "reference" / "telechat2-115b"


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
