"""Evaluation results: per-subject records (saved one file per subject so a run can resume), the
per-category and overall summary with both averages, the Markdown table, and the C-Eval submission JSON.

Averages (docs/eval_protocols.md 1.4, 1.6, 2.5): `micro` = correct / questions over all questions of a
group (hendrycks' "Average accuracy", lm-eval `weight_by_size`); `macro` = mean of the subject accuracies
(OpenCompass, TeleChat's own scripts, C-Eval leaderboard per the sources that state it). Accuracies are
fractions in the JSON and percentages in the Markdown.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from telechat2_ms.evaluate.data import LETTERS, Question
from telechat2_ms.formats.atomic import write_text_atomic
from telechat2_ms.evaluate.scoring import ChoiceRequest
from telechat2_ms.evaluate.subjects import benchmark_categories, extra_groups, subject_category


def subject_record(subject: str, category: str, questions: Sequence[Question],
                   requests: Sequence[ChoiceRequest], scores: Sequence[np.ndarray],
                   signature: Dict[str, Any]) -> Dict[str, Any]:
    """Everything about one finished subject: per-question predictions and letter log-probabilities."""
    items = []
    for q, req, score in zip(questions, requests, scores):
        pred = LETTERS[int(np.argmax(score))]
        items.append({
            "id": q.id, "answer": q.answer, "pred": pred,
            "correct": None if q.answer is None else pred == q.answer,
            "logprobs": [float(x) for x in score], "shots": req.shots, "truncated": req.truncated,
            "prompt_tokens": len(req.context),
        })
    scored = [it for it in items if it["correct"] is not None]
    correct = sum(1 for it in scored if it["correct"])
    return {
        "signature": signature, "subject": subject, "category": category, "n": len(items),
        "n_scored": len(scored), "correct": correct,
        "acc": correct / len(scored) if scored else None, "questions": items,
    }


# ---- resumable per-subject files -----------------------------------------------------------------------

def _write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1))


def subject_path(run_dir: str, subject: str) -> str:
    return os.path.join(run_dir, "subjects", f"{subject}.json")


def save_subject_record(run_dir: str, record: Dict[str, Any]) -> None:
    _write_json_atomic(subject_path(run_dir, record["subject"]), record)


def load_subject_record(run_dir: str, subject: str, signature: Dict[str, Any],
                        overwrite: bool = False) -> Optional[Dict[str, Any]]:
    """The saved record of a finished subject, or None. A record made with anything else that changes
    the result (other data, model, protocol, shots, ...) is refused, naming what differs, rather than
    reused; with `overwrite` it is ignored (the subject is scored again and the record replaced). An
    unreadable record (torn by a kill) is scored again."""
    path = subject_path(run_dir, subject)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    stored = record.get("signature") if isinstance(record, dict) else None
    if stored != signature:
        if overwrite:
            return None
        stored = stored if isinstance(stored, dict) else {}
        differ = sorted(k for k in set(stored) | set(signature) if stored.get(k) != signature.get(k))
        raise ValueError(f"{path} holds a result made with other {', '.join(differ)} than this run's; "
                         "choose another output_dir, or pass --overwrite to score the subject again")
    return record


# ---- aggregation ---------------------------------------------------------------------------------------

def _group_stats(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    scored = [r for r in records if r["n_scored"]]
    n = sum(r["n_scored"] for r in scored)
    correct = sum(r["correct"] for r in scored)
    return {
        "subjects": len(records), "n": n, "correct": correct,
        "micro": correct / n if n else None,
        "macro": float(np.mean([r["acc"] for r in scored])) if scored else None,
    }


def summarize(records: Dict[str, Dict[str, Any]], benchmark: str, convention: str,
              expected_subjects: Sequence[str], settings: Dict[str, Any]) -> Dict[str, Any]:
    """Per-subject, per-category, extra-group (C-Eval Hard) and overall accuracy, micro and macro."""
    subjects = sorted(records)
    by_category: Dict[str, List[Dict[str, Any]]] = {c: [] for c in benchmark_categories(benchmark)}
    for s in subjects:
        by_category[subject_category(benchmark, s, convention)].append(records[s])
    groups = {name: _group_stats([records[s] for s in members if s in records])
              for name, members in extra_groups(benchmark).items()}
    missing = sorted(set(expected_subjects) - set(records))
    return {
        **settings,
        "complete": not missing, "missing_subjects": missing,
        "overall": _group_stats([records[s] for s in subjects]),
        "categories": {c: _group_stats(rs) for c, rs in by_category.items()},
        "groups": groups,
        "subjects": {s: {k: records[s][k] for k in ("category", "n", "n_scored", "correct", "acc")}
                     for s in subjects},
    }


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}"


def to_markdown(summary: Dict[str, Any]) -> str:
    """A summary table (categories, groups, overall) and a per-subject table."""
    title = (f"## {summary['benchmark']} {summary['split']}: protocol {summary['protocol']}, "
             f"{summary['num_fewshot']}-shot")
    lines = [title, ""]
    if not summary["complete"]:
        lines += [f"Incomplete: {len(summary['missing_subjects'])} subject(s) missing.", ""]
    lines += ["| group | subjects | questions | micro acc (%) | macro acc (%) |", "|---|---:|---:|---:|---:|"]
    rows = list(summary["categories"].items()) + list(summary["groups"].items())
    rows.append(("**overall**", summary["overall"]))
    for name, g in rows:
        lines.append(f"| {name} | {g['subjects']} | {g['n']} | {_pct(g['micro'])} | {_pct(g['macro'])} |")
    lines += ["", "| subject | category | questions | correct | acc (%) |", "|---|---|---:|---:|---:|"]
    for s, r in summary["subjects"].items():
        lines.append(f"| {s} | {r['category']} | {r['n']} | {r['correct']} | {_pct(r['acc'])} |")
    return "\n".join(lines) + "\n"


def ceval_submission(records: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, str]]:
    """The official C-Eval test submission: {subject: {id (string): predicted letter}}."""
    return {s: {str(it["id"]): it["pred"] for it in records[s]["questions"]} for s in sorted(records)}


def write_outputs(run_dir: str, summary: Dict[str, Any], records: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    """results.json, results.md and (C-Eval test) submission.json under run_dir; returns their paths."""
    paths = {"json": os.path.join(run_dir, "results.json"), "markdown": os.path.join(run_dir, "results.md")}
    _write_json_atomic(paths["json"], summary)
    write_text_atomic(paths["markdown"], to_markdown(summary))
    if summary["benchmark"] == "ceval" and summary["split"] == "test":
        paths["submission"] = os.path.join(run_dir, "submission.json")
        _write_json_atomic(paths["submission"], ceval_submission(records))
    return paths
