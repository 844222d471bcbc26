"""The evaluation loop: subjects -> prompts -> batched letter scores -> saved records -> summary.

`evaluate()` works with any `next_token_logits(batch) -> [N, V]` and `encode(text) -> ids`, so a stand-in
model is a few lines; `run_eval()` is the entry used by `run_telechat2.py --run_mode eval`. Results go to
`<output_dir>/eval/<benchmark>_<split>_<protocol>_<k>shot/`: `subjects/<subject>.json` per finished subject
(a rerun skips them), then `results.json`, `results.md` and, for the C-Eval test split, `submission.json`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from telechat2_ms.evaluate.data import list_subjects, load_subject, resolve_data_dir, subject_digest
from telechat2_ms.evaluate.distributed import (GatherFn, gather_records, replica_of,
                                               split_subjects)
from telechat2_ms.evaluate.prompts import get_protocol
from telechat2_ms.evaluate.results import (load_subject_record, save_subject_record, subject_record, summarize,
                                           write_outputs)
from telechat2_ms.evaluate.scoring import Encode, NextTokenLogits, build_request, score_requests
from telechat2_ms.evaluate.subjects import subject_category

MAX_SHOTS = 5  # both benchmarks ship 5 dev rows per subject


@dataclass
class EvalOptions:
    """What to evaluate; mirrors telechat2_ms.settings.EvalSettings plus the run's output_dir."""

    benchmark: str = "ceval"  # ceval | mmlu
    data_dir: str = ""  # folder with dev/ val/ test/ (or its parent holding mmlu/ and ceval/)
    split: str = "val"  # dev | val | test (MMLU reports test; C-Eval scores val, test -> submission.json)
    protocol: str = "official"  # official | lm_eval (telechat2_ms/evaluate/prompts.py)
    num_fewshot: int = 5  # 0..5 exemplars, the first rows of dev
    subjects: List[str] = field(default_factory=list)  # empty: every subject in the split
    batch_size: int = 4  # sequences per forward call
    max_length: int = 4096  # tokens fed per sequence; longer prompts drop exemplars
    output_dir: str = "./output"
    add_bos: bool = False  # prepend <_start> (TeleChat2's tokenizer_config adds none)
    limit: int = 0  # score only the first `limit` questions per subject (0: all); for smoke tests
    overwrite: bool = False  # rescore subjects whose stored record was made with other data / model / settings

    def validate(self) -> None:
        get_protocol(self.benchmark, self.protocol)  # raises on an unknown benchmark/protocol pair
        if not 0 <= self.num_fewshot <= MAX_SHOTS:
            raise ValueError(f"num_fewshot must be 0..{MAX_SHOTS} (dev has {MAX_SHOTS} rows), got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


def run_dir_of(options: EvalOptions) -> str:
    name = f"{options.benchmark}_{options.split}_{options.protocol}_{options.num_fewshot}shot"
    return os.path.join(options.output_dir, "eval", name)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True)


def _score_subject(options: EvalOptions, root: str, subject: str, next_token_logits: NextTokenLogits,
                   encode: Encode, bos_id: Optional[int], signature: Dict[str, Any], bar) -> Dict[str, Any]:
    protocol = get_protocol(options.benchmark, options.protocol)
    dev = load_subject(root, options.benchmark, subject, "dev")
    if len(dev) < options.num_fewshot:
        raise ValueError(f"{subject}: dev has {len(dev)} rows, fewer than num_fewshot={options.num_fewshot}")
    questions = load_subject(root, options.benchmark, subject, options.split)
    if options.limit:
        questions = questions[:options.limit]
    requests = [build_request(protocol, encode, subject, dev, q, options.num_fewshot, options.max_length, bos_id)
                for q in questions]
    shown = [0]

    def on_rows(done: int, total: int) -> None:  # questions finished, pro rata to forward rows
        now = len(questions) * done // total
        bar.update(now - shown[0])
        shown[0] = now

    bar.set_postfix_str(subject)
    scores = score_requests(requests, next_token_logits, options.batch_size, on_rows)
    category = subject_category(options.benchmark, subject, protocol.category_convention)
    return subject_record(subject, category, questions, requests, scores, signature)


def evaluate(options: EvalOptions, next_token_logits: NextTokenLogits, encode: Encode, *,
             bos_id: Optional[int] = None, model_tag: Optional[Dict[str, Any]] = None, rank: int = 0,
             world: int = 1, data_parallel: Optional[int] = None, gather_fn: Optional[GatherFn] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Score the benchmark; returns the summary on rank 0 (and writes the outputs there), and
    {"rank": r, "subjects": [...]} on other ranks. `data_parallel` defaults to `world` (no model parallel)."""
    options.validate()
    if options.add_bos and bos_id is None:
        raise ValueError("add_bos is set but no bos_id was given")
    root = resolve_data_dir(options.data_dir, options.benchmark)
    available = list_subjects(root, options.benchmark, options.split)
    subjects = list(options.subjects) or available
    unknown = sorted(set(subjects) - set(available))
    if unknown:
        raise ValueError(f"eval.subjects not found in {root}/{options.split}: {', '.join(unknown)}")
    subjects = sorted(set(subjects))
    # what changes a subject's result: the settings below, the model (weights, tokenizer, dtype) and the
    # subject's data files, by content (a copy of the same files elsewhere gives the same result)
    settings = {k: v for k, v in asdict(options).items()
                if k not in ("data_dir", "output_dir", "batch_size", "subjects", "overwrite")}
    base_signature = {**settings, "model": model_tag or {}}
    run_dir = run_dir_of(options)

    replica, leader = replica_of(rank, world, data_parallel or world)
    sizes = {s: len(load_subject(root, options.benchmark, s, options.split)) for s in subjects}
    if options.limit:
        sizes = {s: min(n, options.limit) for s, n in sizes.items()}
    mine = split_subjects(subjects, sizes, replica, data_parallel or world)
    signatures = {s: {**base_signature, "data": subject_digest(root, s, options.split)} for s in mine}
    records = {s: r for s in mine
               if (r := load_subject_record(run_dir, s, signatures[s], options.overwrite)) is not None}
    pending = [s for s in mine if s not in records]

    desc = f"{options.benchmark}/{options.split}" + (f" dp{replica}" if world > 1 else "")
    with _progress(sum(sizes[s] for s in pending), progress and leader, desc) as bar:
        for subject in pending:
            records[subject] = _score_subject(options, root, subject, next_token_logits, encode, bos_id,
                                              signatures[subject], bar)
            if leader:
                save_subject_record(run_dir, records[subject])

    merged = gather_records(records if leader else {}, rank, world, gather_fn)
    if merged is None:
        return {"rank": rank, "subjects": mine}
    protocol = get_protocol(options.benchmark, options.protocol)
    summary = summarize(merged, options.benchmark, protocol.category_convention, subjects,
                        {**settings, "model": model_tag or {}, "data_dir": os.path.realpath(root),
                         "source": protocol.source})
    summary["outputs"] = write_outputs(run_dir, summary, merged)
    return summary


def options_from_settings(settings) -> EvalOptions:
    """EvalOptions from a telechat2_ms.settings.RunSettings (its `eval` section plus output_dir)."""
    fields = {f.name for f in dataclasses.fields(EvalOptions)} - {"output_dir", "overwrite"}
    values = {name: getattr(settings.eval, name) for name in fields}
    values["subjects"] = list(values["subjects"])
    return EvalOptions(output_dir=settings.output_dir, overwrite=settings.overwrite, **values)


def _bos_id(tokenizer, options: "EvalOptions"):
    """The id to prepend with add_bos; a tokenizer without a bos token (Qwen2) prepends nothing."""
    bos = tokenizer.bos_id if options.add_bos else None
    return None if bos is None else int(bos)


def _plain_encoder(tokenizer) -> Encode:
    """Benchmark text is plain text: special-token strings in it are not parsed, and no bos/eos is added
    (the evaluator adds bos itself when asked)."""
    try:
        tokenizer.encode("A", parse_special=False, add_bos=False, add_eos=False)
    except TypeError:
        return tokenizer.encode
    return lambda text: tokenizer.encode(text, parse_special=False, add_bos=False, add_eos=False)


def _file_digest(paths) -> str:
    """sha256 of the files in `paths` (one path or a list: a tokenizer's `files`), in order."""
    import hashlib

    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths or not all(p and os.path.isfile(p) for p in paths):
        return str(paths[0] if len(paths) == 1 else paths)
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _lock_results(run_dir: str, rank: int, world: int):
    """Rank 0 takes the result directory's lock (outputs.OutputLock); every rank gets the same refusal."""
    from telechat2_ms.config import ConfigError
    from telechat2_ms.outputs import OutputLock

    lock, error = None, ""
    if rank == 0:
        try:
            lock = OutputLock(run_dir, "eval result directory").acquire()
        except ConfigError as err:
            error = str(err)
    if world > 1:
        from telechat2_ms.parallel.ranks import broadcast_object

        error = broadcast_object(error)
    if error:
        raise ConfigError(error)
    return lock


def run_eval(settings, model, tokenizer, weights: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """`--run_mode eval`: evaluate a MindSpore Telechat2ForCausalLM with a Telechat2Tokenizer on
    settings.eval; `weights` identifies what the model loaded (checkpoint.fingerprint). Rank 0 holds the
    result directory's lock meanwhile. Under msrun the communication must already be initialised."""
    from telechat2_ms.evaluate.model_adapter import mindspore_next_token_logits
    from telechat2_ms.parallel import comm
    from telechat2_ms.parallel.ranks import gather_objects

    options = options_from_settings(settings)
    rank, world = comm.get_rank(), comm.get_world_size()
    # settings.validate allows eval only data x tensor parallel (pp = cp = 1), so the replicas are blocks of
    # model_parallel consecutive ranks, as replica_of assumes
    data_parallel = settings.parallel_config.data_parallel if world > 1 else 1
    pad_id = int(tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else model.config.pad_token_id)
    next_token_logits = mindspore_next_token_logits(model, pad_id=pad_id,
                                                    pad_to_multiple=1 if settings.device_target == "CPU" else 128,
                                                    jit=bool(settings.jit) and settings.device_target != "CPU")
    model_tag = {"model": settings.model, "weights": weights or {"load_checkpoint": settings.load_checkpoint},
                 "tokenizer": _file_digest(getattr(tokenizer, "files", None) or getattr(tokenizer, "path", "")),
                 "compute_dtype": settings.compute_dtype}
    lock = _lock_results(run_dir_of(options), rank, world)
    try:
        summary = evaluate(options, next_token_logits, _plain_encoder(tokenizer),
                           bos_id=_bos_id(tokenizer, options), model_tag=model_tag, rank=rank,
                           world=world, data_parallel=data_parallel,
                           gather_fn=gather_objects if world > 1 else None, progress=True)
    finally:
        if lock is not None:
            lock.release()
    if "outputs" in summary:  # rank 0: show the table and where the files are
        with open(summary["outputs"]["markdown"], encoding="utf-8") as f:
            print(f.read())
        print("results written to " + ", ".join(summary["outputs"].values()))
    return summary
