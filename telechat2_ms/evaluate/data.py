"""Loaders for the MMLU and C-Eval csv files as released (hendrycks `data.tar`, `ceval-exam.zip`).

Layout: `<root>/{dev,val,test}/<subject>_<split>.csv`. MMLU files have no header and 6 fields
(`question,A,B,C,D,answer`); C-Eval files have a header whose columns depend on the split (dev:
`id,question,A,B,C,D,answer,explanation`; val: no explanation; test: no answer in the 2023 release).
Read with the stdlib csv module (shared/data/README.md): quoted fields keep their newlines (LF or CRLF,
verbatim), files may end lines with CRLF or LF, and the literal option text "None" stays a string (pandas
would turn it into NaN).
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from telechat2_ms.evaluate.subjects import BENCHMARKS, known_subjects

LETTERS: Tuple[str, str, str, str] = ("A", "B", "C", "D")
SPLITS: Tuple[str, ...] = ("dev", "val", "test")
_CEVAL_REQUIRED = ("id", "question", "A", "B", "C", "D")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question. `id` is C-Eval's id column, or the 0-based row number for MMLU;
    `answer` is None where the split carries no labels (C-Eval test)."""

    subject: str
    id: str
    question: str
    options: Tuple[str, str, str, str]
    answer: Optional[str]
    explanation: Optional[str] = None


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def resolve_data_dir(data_dir: str, benchmark: str) -> str:
    """The directory holding `dev/`: `data_dir` itself, `data_dir/<benchmark>` (a folder holding both
    benchmarks, like ../shared/data) or `data_dir/data` (the unpacked MMLU data.tar)."""
    _check_benchmark(benchmark)
    if not data_dir:
        raise ValueError(f"eval.data_dir is empty: point it at the {benchmark} data (a folder with dev/, val/, test/)")
    tried = [data_dir, os.path.join(data_dir, benchmark), os.path.join(data_dir, "data")]
    for candidate in tried:
        if os.path.isdir(os.path.join(candidate, "dev")):
            return candidate
    raise ValueError(f"no {benchmark} data found: none of {', '.join(tried)} has a dev/ folder")


def subject_file(root: str, subject: str, split: str) -> str:
    return os.path.join(root, split, f"{subject}_{split}.csv")


def list_subjects(root: str, benchmark: str, split: str) -> List[str]:
    """Subjects that have a `<split>` file under `root`, sorted; unknown names are an error."""
    _check_split(split)
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise ValueError(f"{benchmark} split {split!r} not found: {folder} is not a directory")
    suffix = f"_{split}.csv"
    found = sorted(name[: -len(suffix)] for name in os.listdir(folder) if name.endswith(suffix))
    unknown = sorted(set(found) - set(known_subjects(benchmark)))
    if unknown:
        raise ValueError(f"{folder} holds files for subjects that are not in {benchmark}: {', '.join(unknown)}")
    if not found:
        raise ValueError(f"{folder} holds no *{suffix} files")
    return found


def _read_rows(path: str) -> List[List[str]]:
    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path}")
    # newline="" lets csv see CR/LF itself: row ends may be CRLF or LF, quoted fields keep theirs verbatim.
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return [row for row in csv.reader(f) if row]  # blank lines are skipped, as pandas does
    except UnicodeDecodeError as err:
        with open(path, "rb") as f:
            line = f.read()[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{err.object[err.start]:02x}); the benchmark "
                         "files are UTF-8 csv") from None
    except csv.Error as err:
        raise ValueError(f"{path}: not a csv file ({err})") from None


def subject_digest(root: str, subject: str, split: str) -> str:
    """sha256 of the files a subject's score depends on (its dev exemplars and its `split` questions)."""
    digest = hashlib.sha256()
    for part in dict.fromkeys(("dev", split)):
        with open(subject_file(root, subject, part), "rb") as f:
            digest.update(part.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _check_answer(answer: str, path: str, line: int) -> str:
    if answer not in LETTERS:
        raise ValueError(f"{path}: row {line}: answer {answer!r} is not one of A, B, C, D")
    return answer


def _load_mmlu(path: str, subject: str) -> List[Question]:
    questions = []
    for i, row in enumerate(_read_rows(path)):
        if len(row) != 6:
            raise ValueError(f"{path}: row {i + 1} has {len(row)} fields; MMLU rows have 6 "
                             "(question,A,B,C,D,answer, no header)")
        questions.append(Question(subject=subject, id=str(i), question=row[0], options=tuple(row[1:5]),
                                  answer=_check_answer(row[5], path, i + 1)))
    return questions


def _load_ceval(path: str, subject: str, split: str) -> List[Question]:
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path} is empty (C-Eval files start with a header row)")
    header, body = rows[0], rows[1:]
    missing = [c for c in _CEVAL_REQUIRED if c not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks column(s) {missing}")
    if split != "test" and "answer" not in header:
        raise ValueError(f"{path}: the {split} split needs an 'answer' column; header is {header}")
    col = {name: j for j, name in enumerate(header)}
    questions = []
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path}: row {i + 2} has {len(row)} fields, the header has {len(header)}")
        answer = row[col["answer"]] if "answer" in col else None
        questions.append(Question(
            subject=subject, id=row[col["id"]], question=row[col["question"]],
            options=tuple(row[col[letter]] for letter in LETTERS),
            answer=_check_answer(answer, path, i + 2) if answer is not None else None,
            explanation=row[col["explanation"]] if "explanation" in col else None))
    return questions


def load_subject(root: str, benchmark: str, subject: str, split: str) -> List[Question]:
    """All questions of one subject and split, in file order."""
    _check_benchmark(benchmark)
    _check_split(split)
    path = subject_file(root, subject, split)
    if benchmark == "mmlu":
        return _load_mmlu(path, subject)
    return _load_ceval(path, subject, split)
