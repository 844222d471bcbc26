"""Scoring with stand-in models: a model that favours one letter token gets exactly the share of questions
whose answer is that letter, per subject (it cannot pass if the scorer reads the wrong letter ids), and
log-likelihoods of multi-token continuations add up as lm-eval defines them."""
import csv
import zlib

import numpy as np
import pytest

from telechat2_ms.evaluate.prompts import get_protocol
from telechat2_ms.evaluate.runner import EvalOptions, evaluate
from telechat2_ms.evaluate.scoring import ChoiceRequest, build_request, score_requests

VOCAB = 131072
# Letter token ids with the real tokenizer after each protocol's cue (spec 5.2): '▁A'.. and 'A'..
SPACED = {"A": 459, "B": 501, "C": 465, "D": 524}
BARE = {"A": 126173, "B": 126195, "C": 126175, "D": 126189}
CASES = {  # protocol -> (letter ids the protocol must score, id of the cue token every context ends with)
    ("mmlu", "official"): (SPACED, 126176), ("mmlu", "lm_eval"): (SPACED, 126176),
    ("ceval", "official"): (BARE, 126264), ("ceval", "lm_eval"): (SPACED, 126264),
}
SUBJECTS = {"mmlu": ["abstract_algebra", "college_physics", "high_school_geography"],
            "ceval": ["college_chemistry", "high_school_physics", "operating_system"]}


def favouring_model(token_id: int, cue_id: int, calls: list):
    """Logits: N(0,1) noise seeded by the row's tokens, plus 8 at `token_id`. Every row must end with the
    cue (the scorer feeds the context, not context + letter)."""
    def next_token_logits(batch):
        calls.append(len(batch))
        out = np.empty((len(batch), VOCAB), np.float32)
        for i, row in enumerate(batch):
            assert row[-1] == cue_id, f"row ends with {row[-1]}, not the answer cue {cue_id}"
            seed = zlib.crc32(np.asarray(row, np.int32).tobytes())
            out[i] = np.random.default_rng(seed).standard_normal(VOCAB, dtype=np.float32)
        out[:, token_id] += 8.0
        return out
    return next_token_logits


def answer_share(data_dir, benchmark, subject, letter):
    """Share of `letter` among the gold answers, read with the csv module directly (not our loader)."""
    with open(data_dir / benchmark / "val" / f"{subject}_val.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    answers = [r[5] for r in rows] if benchmark == "mmlu" else [r[6] for r in rows[1:]]
    return answers.count(letter), len(answers)


@pytest.mark.parametrize("benchmark,protocol", sorted(CASES))
def test_favoured_letter_accuracy_equals_its_answer_share(shared_dir, encode, tmp_path, benchmark, protocol):
    letter_ids, cue_id = CASES[benchmark, protocol]
    per_subject_total = {s: 0.0 for s in SUBJECTS[benchmark]}
    for letter in "ABCD":
        calls = []
        summary = evaluate(
            EvalOptions(benchmark=benchmark, data_dir=str(shared_dir / "data"), split="val", protocol=protocol,
                        num_fewshot=1, subjects=SUBJECTS[benchmark], batch_size=7,
                        output_dir=str(tmp_path / letter)),
            favouring_model(letter_ids[letter], cue_id, calls), encode, progress=False)
        hits = total = 0
        for s in SUBJECTS[benchmark]:
            count, n = answer_share(shared_dir / "data", benchmark, s, letter)
            assert summary["subjects"][s]["n"] == n
            assert summary["subjects"][s]["correct"] == count, (s, letter)
            assert summary["subjects"][s]["acc"] == pytest.approx(count / n, abs=1e-12)
            per_subject_total[s] += summary["subjects"][s]["acc"]
            hits, total = hits + count, total + n
        assert summary["overall"]["micro"] == pytest.approx(hits / total, abs=1e-12)
        assert sum(calls) == total  # one forward row per question: single-token letters share the context
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in per_subject_total.values())


def test_multi_token_continuations_sum_log_probs():
    # A character-level "tokenizer": " A" is two tokens (space, A), so each choice needs two rows.
    vocab = 128
    encode = lambda text: [ord(c) for c in text]

    def model(batch):
        out = np.zeros((len(batch), vocab))
        for i, row in enumerate(batch):
            out[i] = np.cos(np.arange(vocab) * (len(row) + 1) + row[-1])  # depends on the prefix
        return out

    protocol = get_protocol("mmlu", "lm_eval")
    from telechat2_ms.evaluate.data import Question
    q = Question("anatomy", "0", "Q?", ("a", "b", "c", "d"), "B")
    req = build_request(protocol, encode, "anatomy", [], q, 0, 4096)
    assert req.continuations == [[32, 65], [32, 66], [32, 67], [32, 68]]
    calls = []
    scores = score_requests([req], lambda b: (calls.append(len(b)), model(b))[1], batch_size=16)[0]

    def log_softmax(row):
        return row - np.log(np.exp(row - row.max()).sum()) - row.max()
    first = log_softmax(model([req.context])[0])[32]
    expected = [first + log_softmax(model([req.context + [32]])[0])[65 + j] for j in range(4)]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-12)
    assert calls == [2]  # the context row and the shared context+" " row, each once


def test_batch_size_does_not_change_scores():
    rng = np.random.default_rng(0)
    requests = [ChoiceRequest(list(rng.integers(0, 50, size=rng.integers(3, 20))), [[1], [2], [3], [4, 5]], 0)
                for _ in range(11)]

    def model(batch):
        return np.stack([np.sin(np.arange(60) * (sum(r) % 7 + 1) + len(r)) for r in batch])

    ref = score_requests(requests, model, batch_size=1)
    for b in (2, 5, 64):
        got = score_requests(requests, model, batch_size=b)
        assert all(np.array_equal(x, y) for x, y in zip(ref, got))


def test_bad_model_outputs_are_reported():
    req = [ChoiceRequest([1, 2, 3], [[4], [5], [6], [7]], 0)]
    with pytest.raises(ValueError, match="non-finite"):
        score_requests(req, lambda b: np.full((len(b), 10), np.nan), 1)
    with pytest.raises(ValueError, match="shape"):
        score_requests(req, lambda b: np.zeros((len(b), 2, 10)), 1)
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        score_requests(req, lambda b: np.zeros((len(b), 5)), 1)
