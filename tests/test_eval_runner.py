"""The runner with a stand-in model: resume skips finished subjects, the data-parallel split and gather give
the single-process result, outputs (JSON, Markdown, C-Eval submission) and micro/macro averages."""
import json
import os
import zlib

import numpy as np
import pytest

from telechat2_ms.evaluate.distributed import gather_records, replica_of, split_subjects
from telechat2_ms.evaluate.results import summarize, to_markdown
from telechat2_ms.evaluate.runner import EvalOptions, evaluate, run_dir_of

VOCAB = 512
SUBJECTS = ["advanced_mathematics", "college_chemistry", "logic", "operating_system", "physician"]


def hashed_model(calls):
    """Deterministic logits from each row's tokens (so results do not depend on batching or rank)."""
    def next_token_logits(batch):
        calls.append(len(batch))
        return np.stack([np.random.default_rng(zlib.crc32(np.asarray(r, np.int32).tobytes()))
                         .standard_normal(VOCAB) for r in batch])
    return next_token_logits


def byte_encode(text):
    """A stand-in tokenizer: UTF-8 bytes shifted past the letter ids of interest (vocab 512)."""
    return [b + 200 for b in text.encode("utf-8")]


def options(shared_dir, out, **kw):
    base = dict(benchmark="ceval", data_dir=str(shared_dir / "data"), split="val", protocol="official",
                num_fewshot=0, subjects=SUBJECTS, batch_size=8, output_dir=str(out))
    base.update(kw)
    return EvalOptions(**base)


def test_resume_skips_finished_subjects(shared_dir, tmp_path):
    calls = []
    first = evaluate(options(shared_dir, tmp_path), hashed_model(calls), byte_encode, progress=False)
    total = first["overall"]["n"]
    assert sum(calls) == total == sum(first["subjects"][s]["n"] for s in SUBJECTS)
    calls.clear()
    again = evaluate(options(shared_dir, tmp_path), hashed_model(calls), byte_encode, progress=False)
    assert calls == [] and again["subjects"] == first["subjects"] and again["overall"] == first["overall"]
    os.remove(os.path.join(run_dir_of(options(shared_dir, tmp_path)), "subjects", "logic.json"))
    again = evaluate(options(shared_dir, tmp_path), hashed_model(calls), byte_encode, progress=False)
    assert sum(calls) == first["subjects"]["logic"]["n"] and again["overall"] == first["overall"]
    with pytest.raises(ValueError, match="advanced_mathematics.json holds a result made with other model than this run.s"):
        evaluate(options(shared_dir, tmp_path), hashed_model(calls), byte_encode, model_tag={"model": "other"},
                 progress=False)


def test_outputs_and_averages(shared_dir, tmp_path):
    summary = evaluate(options(shared_dir, tmp_path), hashed_model([]), byte_encode, progress=False)
    run_dir = run_dir_of(options(shared_dir, tmp_path))
    on_disk = json.loads(open(os.path.join(run_dir, "results.json"), encoding="utf-8").read())
    assert on_disk["overall"] == summary["overall"] and not os.path.exists(os.path.join(run_dir, "submission.json"))
    subj = summary["subjects"]
    micro = sum(subj[s]["correct"] for s in SUBJECTS) / sum(subj[s]["n"] for s in SUBJECTS)
    macro = float(np.mean([subj[s]["correct"] / subj[s]["n"] for s in SUBJECTS]))
    assert summary["overall"]["micro"] == pytest.approx(micro, abs=1e-12)
    assert summary["overall"]["macro"] == pytest.approx(macro, abs=1e-12)
    stem = [s for s in SUBJECTS if subj[s]["category"] == "STEM"]
    assert stem == ["advanced_mathematics", "college_chemistry", "operating_system"]
    assert summary["categories"]["STEM"]["n"] == sum(subj[s]["n"] for s in stem)
    assert summary["groups"]["C-Eval Hard"]["subjects"] == 2
    assert summary["complete"] and summary["missing_subjects"] == []
    md = open(os.path.join(run_dir, "results.md"), encoding="utf-8").read()
    assert f"| **overall** | 5 | {summary['overall']['n']} | {100 * micro:.2f} | {100 * macro:.2f} |" in md
    assert f"| logic | Humanities | {subj['logic']['n']} | {subj['logic']['correct']} |" in md


def test_summary_arithmetic_on_hand_made_records():
    records = {
        "logic": {"category": "Humanities", "n": 2, "n_scored": 2, "correct": 1, "acc": 0.5},
        "law": {"category": "Humanities", "n": 4, "n_scored": 4, "correct": 3, "acc": 0.75},
        "physician": {"category": "Other", "n": 10, "n_scored": 10, "correct": 10, "acc": 1.0},
    }
    s = summarize(records, "ceval", "official", ["logic", "law", "physician", "marxism"],
                  {"benchmark": "ceval", "split": "val", "protocol": "official", "num_fewshot": 5})
    assert s["categories"]["Humanities"] == {"subjects": 2, "n": 6, "correct": 4, "micro": 4 / 6, "macro": 0.625}
    assert s["overall"]["micro"] == 14 / 16 and s["overall"]["macro"] == pytest.approx(2.25 / 3, abs=1e-15)
    assert s["categories"]["STEM"] == {"subjects": 0, "n": 0, "correct": 0, "micro": None, "macro": None}
    assert not s["complete"] and s["missing_subjects"] == ["marxism"]
    assert "| Humanities | 2 | 6 | 66.67 | 62.50 |" in to_markdown(s)


def test_ceval_test_split_writes_the_submission(shared_dir, tmp_path):
    subjects = ["logic", "marxism"]
    summary = evaluate(options(shared_dir, tmp_path, split="test", subjects=subjects, num_fewshot=1),
                       hashed_model([]), byte_encode, progress=False)
    sub = json.loads(open(summary["outputs"]["submission"], encoding="utf-8").read())
    counts = json.loads((shared_dir / "data/ceval/subjects.json").read_text(encoding="utf-8"))["row_counts"]
    assert sorted(sub) == subjects
    for s in subjects:
        assert list(sub[s]) == [str(i) for i in range(counts[s]["test"])]
        assert set(sub[s].values()) <= set("ABCD")
    assert summary["overall"]["micro"] is None and summary["subjects"]["logic"]["acc"] is None


def test_split_subjects_is_a_balanced_partition():
    sizes = {f"s{i}": n for i, n in enumerate([443, 19, 33, 170, 49, 22, 19, 55, 300, 12, 8])}
    parts = [split_subjects(list(sizes), sizes, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(sizes)
    loads = [sum(sizes[s] for s in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes.values()) and max(loads) == 443
    assert parts == [split_subjects(list(sizes), sizes, r, 3) for r in range(3)]  # deterministic
    assert replica_of(5, 8, 4) == (2, False) and replica_of(4, 8, 4) == (2, True) and replica_of(3, 4, 4) == (3, True)
    with pytest.raises(ValueError, match="does not divide"):
        replica_of(0, 6, 4)


@pytest.mark.parametrize("world,data_parallel", [(3, 3), (4, 2)])
def test_data_parallel_ranks_gather_the_single_process_result(shared_dir, tmp_path, world, data_parallel):
    single = evaluate(options(shared_dir, tmp_path / "single"), hashed_model([]), byte_encode, progress=False)
    parts = {}

    def gather_for(rank):
        def gather(obj):  # every rank's object reaches rank 0, which runs last here
            parts[rank] = obj
            return [parts[r] for r in range(world)] if rank == 0 else None
        return gather

    calls = {}
    group = world // data_parallel
    # Sequential stand-in for concurrent ranks: every rank checks for finished subjects before any replica
    # finishes one (a model-parallel leader cannot finish without its peers), so peers go first, rank 0 last.
    order = [r for r in range(world) if r % group] + [r for r in range(group, world, group)] + [0]
    for rank in order:
        calls[rank] = []
        out = evaluate(options(shared_dir, tmp_path / "dp"), hashed_model(calls[rank]), byte_encode, rank=rank,
                       world=world, data_parallel=data_parallel, gather_fn=gather_for(rank), progress=False)
        if rank:
            assert out["rank"] == rank
    assert out["subjects"] == single["subjects"] and out["overall"] == single["overall"]
    for s in SUBJECTS:  # per-question predictions and log-probs, saved by each replica's leader
        dp_file, single_file = (os.path.join(run_dir_of(options(shared_dir, tmp_path / d)), "subjects", f"{s}.json")
                                for d in ("dp", "single"))
        assert json.load(open(dp_file))["questions"] == json.load(open(single_file))["questions"]
    for rank in range(world):  # model-parallel peers run the same forward calls as their leader
        assert calls[rank] == calls[rank - rank % group]
    assert sum(sum(calls[r]) for r in range(0, world, group)) == single["overall"]["n"]
    assert all(parts[r] == {} for r in range(world) if r % group)  # only leaders contribute


def test_gather_rejects_disagreeing_ranks():
    with pytest.raises(ValueError, match="disagree"):
        gather_records({"logic": {"a": 1}}, 0, 2, lambda obj: [obj, {"logic": {"a": 2}}])
    with pytest.raises(ValueError, match="no gather function"):
        gather_records({}, 0, 2, None)


def test_bad_options_are_named(shared_dir, tmp_path):
    with pytest.raises(ValueError, match="num_fewshot must be 0..5"):
        evaluate(options(shared_dir, tmp_path, num_fewshot=6), hashed_model([]), byte_encode)
    with pytest.raises(ValueError, match="unknown protocol 'harness'"):
        evaluate(options(shared_dir, tmp_path, protocol="harness"), hashed_model([]), byte_encode)
    with pytest.raises(ValueError, match="eval.subjects not found.*astrology"):
        evaluate(options(shared_dir, tmp_path, subjects=["astrology"]), hashed_model([]), byte_encode)
