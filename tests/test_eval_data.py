"""Loaders and subject tables against the real csv files in ../shared/data (row counts from its README)."""
import csv
import json

import pytest

from telechat2_ms.evaluate.data import list_subjects, load_subject, resolve_data_dir
from telechat2_ms.evaluate.subjects import (CEVAL_HARD, CEVAL_SUBJECTS, MMLU_SUBCATEGORY, known_subjects,
                                            subject_category)

# shared/data/README.md "Row counts (verified by parsing every file)"
README_ROWS = {
    ("mmlu", "dev"): (57, 285), ("mmlu", "val"): (57, 1531), ("mmlu", "test"): (57, 14042),
    ("ceval", "dev"): (52, 260), ("ceval", "val"): (52, 1346), ("ceval", "test"): (52, 12342),
}


@pytest.fixture(scope="module")
def loaded():
    from tests.conftest import SHARED

    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"{data} missing")
    out = {}
    for benchmark, split in README_ROWS:
        root = resolve_data_dir(str(data), benchmark)
        out[benchmark, split] = {s: load_subject(root, benchmark, s, split)
                                 for s in list_subjects(root, benchmark, split)}
    return data, out


@pytest.mark.parametrize("benchmark,split", sorted(README_ROWS))
def test_row_counts_match_readme(loaded, benchmark, split):
    data, out = loaded
    files, rows = README_ROWS[benchmark, split]
    subjects = out[benchmark, split]
    assert len(subjects) == files
    assert sum(len(qs) for qs in subjects.values()) == rows
    if split == "dev":
        assert all(len(qs) == 5 for qs in subjects.values())
    counts = json.loads((data / benchmark / "subjects.json").read_text(encoding="utf-8"))["row_counts"]
    assert {s: len(qs) for s, qs in subjects.items()} == {s: c[split] for s, c in counts.items()}


def test_answers_and_ids(loaded):
    _, out = loaded
    for (benchmark, split), subjects in out.items():
        for qs in subjects.values():
            if benchmark == "ceval" and split == "test":
                assert all(q.answer is None for q in qs)  # the 2023 release has no test labels
            else:
                assert all(q.answer in "ABCD" and len(q.answer) == 1 for q in qs)
            if benchmark == "ceval":
                assert [q.id for q in qs] == [str(i) for i in range(len(qs))]
                assert all((q.explanation is not None) == (split == "dev") for q in qs)


def test_mmlu_pitfalls_none_strings_and_newlines(loaded):
    _, out = loaded
    mmlu = [q for split in ("dev", "val", "test") for qs in out["mmlu", split].values() for q in qs]
    # README: 12 option cells hold the literal "None"; 1,285 rows have newlines inside quoted fields.
    assert sum(opt == "None" for q in mmlu for opt in q.options) == 12
    assert sum(any("\n" in f for f in (q.question,) + q.options) for q in mmlu) == 1285


def test_crlf_inside_fields_is_kept_verbatim(loaded):
    data, out = loaded
    # C-Eval dev explanations contain \r\n (eval_protocols.md 2.3); the loader must not rewrite them.
    explanations = [q.explanation for qs in out["ceval", "dev"].values() for q in qs]
    assert any("\r\n" in e for e in explanations)
    path = data / "ceval" / "dev" / "computer_network_dev.csv"
    with open(path, encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    loaded_rows = out["ceval", "dev"]["computer_network"]
    assert [r["explanation"] for r in raw] == [q.explanation for q in loaded_rows]
    assert [r["question"] for r in raw] == [q.question for q in loaded_rows]


def test_subject_tables_match_shared_copies(shared_dir):
    mmlu = json.loads((shared_dir / "data/mmlu/subjects.json").read_text(encoding="utf-8"))
    assert MMLU_SUBCATEGORY == mmlu["subject_to_subcategory"]
    assert {s: subject_category("mmlu", s) for s in known_subjects("mmlu")} == mmlu["subject_to_category"]
    mapping = json.loads((shared_dir / "data/ceval/subject_mapping.json").read_text(encoding="utf-8"))
    assert {s: list(v) for s, v in CEVAL_SUBJECTS.items()} == mapping
    assert list(CEVAL_HARD) == json.loads((shared_dir / "data/ceval/subjects.json").read_text(encoding="utf-8"))[
        "hard_subjects"]


def test_category_sizes_both_mmlu_conventions():
    def sizes(benchmark, convention):
        out = {}
        for s in known_subjects(benchmark):
            c = subject_category(benchmark, s, convention)
            out[c] = out.get(c, 0) + 1
        return out

    assert sizes("mmlu", "official") == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}
    assert sizes("mmlu", "lm_eval") == {"STEM": 19, "humanities": 13, "social sciences": 12, "other": 13}
    assert sizes("ceval", "official") == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"anatomy_dev.csv: row 1 has 5 fields"):
        load_subject(str(tmp_path), "mmlu", "anatomy", "dev")
    (tmp_path / "dev" / "anatomy_dev.csv").write_text("q,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 1: answer 'E'"):
        load_subject(str(tmp_path), "mmlu", "anatomy", "dev")
    (tmp_path / "dev" / "astrology_dev.csv").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="astrology"):
        list_subjects(str(tmp_path), "mmlu", "dev")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "logic_val.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs an 'answer' column"):
        load_subject(str(tmp_path), "ceval", "logic", "val")
    with pytest.raises(ValueError, match="no mmlu data found"):
        resolve_data_dir(str(tmp_path / "nowhere"), "mmlu")


def test_crlf_and_lf_files_load_identically(tmp_path):
    rows = [["What is\r\nthis?", "None", "1", "2", "3", "A"], ["Second", "a", "b", "c", "d", "D"]]
    for name, terminator in (("crlf", "\r\n"), ("lf", "\n")):
        folder = tmp_path / name / "val"
        folder.mkdir(parents=True)
        with open(folder / "virology_val.csv", "w", encoding="utf-8", newline="") as f:
            csv.writer(f, lineterminator=terminator).writerows(rows)
    a = load_subject(str(tmp_path / "crlf"), "mmlu", "virology", "val")
    b = load_subject(str(tmp_path / "lf"), "mmlu", "virology", "val")
    assert a == b
    assert a[0].question == "What is\r\nthis?" and a[0].options[0] == "None" and a[1].answer == "D"
