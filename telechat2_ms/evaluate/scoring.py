"""Multiple-choice scoring by next-token log-probabilities, batched over any `next_token_logits` callable.

Token ids of the answer letters are taken the way lm-evaluation-harness does (`_encode_pair`): encode
context + continuation together and keep the tokens after the encoded context. With the TeleChat2
tokenizer this matters (spec 5.2 / 10.13): after "Answer:" the continuation " A" is the single token
'▁A' (459), after "答案：" the continuation "A" is 'A' (126173), whereas encoding " A" alone gives
['▁▁', 'A']. A choice's score is the sum of log p(token | prefix) over its continuation tokens, so
single-token letters cost one forward pass per question (one row shared by the four choices) and
multi-token continuations stay correct. The prediction is the argmax (first on ties), as in hendrycks'
`evaluate.py`, C-Eval's `llama.py` and lm-eval's `acc`.

A prompt longer than `max_length` loses exemplars one at a time (hendrycks `evaluate.py`, the C-Eval
tutorial); a zero-shot prompt that still does not fit keeps its last tokens (lm-eval's left truncation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from telechat2_ms.evaluate.data import Question
from telechat2_ms.evaluate.prompts import Protocol

NextTokenLogits = Callable[[List[List[int]]], np.ndarray]  # N token lists -> logits [N, V] at each last token
Encode = Callable[[str], List[int]]


def encode_pair(encode: Encode, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """(context ids, continuation ids) by lm-eval's rule: trailing context whitespace moves into the
    continuation, the continuation is the tail of encode(context + continuation) after len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(encode(context + continuation))
    context_ids = list(encode(context))
    continuation_ids = whole[len(context_ids):]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after its context")
    return context_ids, continuation_ids


@dataclass
class ChoiceRequest:
    """What one question sends to the model: `context` ids (as fed, after any shot dropping or
    truncation) and one id list per choice. `shots` is the number of exemplars kept."""

    context: List[int]
    continuations: List[List[int]]
    shots: int
    truncated: bool = False


def build_request(protocol: Protocol, encode: Encode, subject: str, dev: Sequence[Question], q: Question,
                  num_fewshot: int, max_length: int, bos_id: Optional[int] = None) -> ChoiceRequest:
    """Prompt for `q` with the first `num_fewshot` dev rows, dropping the last exemplar until
    len(context) + len(longest continuation) - 1 <= max_length (the tokens the model is fed)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prefix = [bos_id] if bos_id is not None else []
    k = min(num_fewshot, len(dev))
    while True:
        text = protocol.context(subject, dev[:k], q)
        pairs = [encode_pair(encode, text, cont) for cont in protocol.continuations()]
        context = prefix + pairs[0][0]
        continuations = [cont for _, cont in pairs]
        fed = len(context) + max(len(c) for c in continuations) - 1
        if fed <= max_length:
            return ChoiceRequest(context, continuations, shots=k)
        if k == 0:
            keep = max_length - (max(len(c) for c in continuations) - 1)
            return ChoiceRequest(context[-keep:], continuations, shots=0, truncated=True)
        k -= 1


def _log_softmax_at(logits: np.ndarray, token_ids: Sequence[int]) -> Dict[int, float]:
    """log_softmax(logits)[token_ids] for one row, in float64."""
    row = logits.astype(np.float64)  # [V]
    peak = row.max()
    log_norm = peak + np.log(np.exp(row - peak).sum())
    return {t: float(row[t] - log_norm) for t in token_ids}


def _plan_rows(requests: Sequence[ChoiceRequest]) -> Tuple[Dict[Tuple[int, ...], int], List[set]]:
    """Distinct prefixes (context + first i continuation tokens) -> row index, and the token ids whose
    log-probability each row must provide."""
    row_of: Dict[Tuple[int, ...], int] = {}
    needed: List[set] = []
    for req in requests:
        for cont in req.continuations:
            for i in range(len(cont)):
                key = tuple(req.context + cont[:i])
                if key not in row_of:
                    row_of[key] = len(needed)
                    needed.append(set())
                needed[row_of[key]].add(cont[i])
    return row_of, needed


def score_requests(requests: Sequence[ChoiceRequest], next_token_logits: NextTokenLogits, batch_size: int,
                   on_rows: Optional[Callable[[int, int], None]] = None) -> List[np.ndarray]:
    """Log-likelihood of every choice of every request: a list of float64 arrays [num_choices].

    Each distinct prefix is scored once, longest first, `batch_size` rows per call (a single-token
    letter set needs one row per question). `on_rows(done, total)` is called after each call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    row_of, needed = _plan_rows(requests)
    prefixes = list(row_of)
    order = sorted(range(len(prefixes)), key=lambda r: -len(prefixes[r]))  # stable: longest first
    logprob: List[Dict[int, float]] = [{} for _ in prefixes]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        logits = np.asarray(next_token_logits([list(prefixes[r]) for r in rows]))  # [b, V]
        if logits.ndim != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"next_token_logits returned shape {logits.shape} for {len(rows)} sequences; "
                             "expected [N, vocab]")
        if not np.all(np.isfinite(logits)):
            raise ValueError("next_token_logits returned non-finite values (NaN/inf); check padding/masking")
        for j, r in enumerate(rows):
            if max(needed[r]) >= logits.shape[1]:
                raise ValueError(f"token id {max(needed[r])} is outside the model vocabulary ({logits.shape[1]})")
            logprob[r] = _log_softmax_at(logits[j], sorted(needed[r]))
        if on_rows is not None:
            on_rows(min(start + batch_size, len(order)), len(order))
    scores = []
    for req in requests:
        choice_scores = [sum(logprob[row_of[tuple(req.context + cont[:i])]][cont[i]] for i in range(len(cont)))
                         for cont in req.continuations]
        scores.append(np.asarray(choice_scores, dtype=np.float64))
    return scores
