"""Few-shot prompt formats of MMLU and C-Eval, per protocol (docs/eval_protocols.md sections 1.2, 1.5, 2.2,
2.7). Every protocol builds

    header(subject) + sum(question_text(shot) + continuation(shot.answer) + "\\n\\n") + question_text(q)

and scores the four continuations `continuation("A")` .. `continuation("D")` after that context.

| protocol          | header                                                     | question      | cue      | continuation |
|-------------------|------------------------------------------------------------|---------------|----------|--------------|
| mmlu official     | "...(with answers) about" + " abstract" + " algebra" + ".\\n\\n" (two spaces) | verbatim | "Answer:" | " A" |
| mmlu lm_eval      | "...(with answers) about abstract algebra.\\n\\n"            | .strip()      | "Answer:" | " A"         |
| ceval official    | "以下是中国关于{中文名}考试的单项选择题，请选出其中的正确答案。\\n\\n"  | verbatim      | "答案："  | "A"          |
| ceval lm_eval     | "以下是中国关于{中文名}的单项选择题，请选出其中的正确答案。\\n\\n" (no 考试) | .strip() | "答案：" | " A"      |

'official' is hendrycks/test `evaluate.py` for MMLU and hkust-nlp/ceval answer-only (`evaluators/llama.py`,
with the Chinese subject name the README intends) for C-Eval; 'lm_eval' is lm-evaluation-harness
(`mmlu`, `ceval-valid`; exemplars are the first n dev rows in both). The default is 'official'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

from telechat2_ms.evaluate.data import LETTERS, Question
from telechat2_ms.evaluate.subjects import CEVAL_SUBJECTS

PROTOCOL_NAMES: Tuple[str, ...] = ("official", "lm_eval")
DEFAULT_PROTOCOL = "official"


def _mmlu_header_hendrycks(subject: str) -> str:
    # format_subject() puts a space before every word, after the template's own space: "about  abstract".
    words = "".join(" " + word for word in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def _mmlu_header_lm_eval(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"


def _ceval_header_official(subject: str) -> str:
    return f"以下是中国关于{CEVAL_SUBJECTS[subject][1]}考试的单项选择题，请选出其中的正确答案。\n\n"


def _ceval_header_lm_eval(subject: str) -> str:
    return f"以下是中国关于{CEVAL_SUBJECTS[subject][1]}的单项选择题，请选出其中的正确答案。\n\n"


@dataclass(frozen=True)
class Protocol:
    """One prompt-and-scoring convention. `category_convention` picks the MMLU category map."""

    benchmark: str
    name: str
    header_fn: Callable[[str], str]
    answer_cue: str
    target_delimiter: str
    strip_question: bool
    category_convention: str
    source: str

    def header(self, subject: str) -> str:
        return self.header_fn(subject)

    def question_text(self, q: Question) -> str:
        """Question, the four options, and the answer cue (no answer)."""
        text = q.question.strip() if self.strip_question else q.question
        for letter, option in zip(LETTERS, q.options):
            text += f"\n{letter}. {option}"
        return text + "\n" + self.answer_cue

    def continuation(self, letter: str) -> str:
        """What follows the cue for option `letter`; its trailing tokens are the ones scored."""
        return self.target_delimiter + letter

    def exemplar(self, q: Question) -> str:
        if q.answer is None:
            raise ValueError(f"few-shot exemplar {q.subject}#{q.id} has no answer")
        return self.question_text(q) + self.continuation(q.answer) + "\n\n"

    def context(self, subject: str, shots: Sequence[Question], q: Question) -> str:
        """The full prompt for `q` with `shots` as exemplars, ending right after the answer cue."""
        return self.header(subject) + "".join(self.exemplar(s) for s in shots) + self.question_text(q)

    def continuations(self) -> List[str]:
        return [self.continuation(letter) for letter in LETTERS]


PROTOCOLS: Dict[Tuple[str, str], Protocol] = {
    ("mmlu", "official"): Protocol(
        "mmlu", "official", _mmlu_header_hendrycks, "Answer:", " ", False, "official",
        "hendrycks/test evaluate.py (scores ' A'..' D')"),
    ("mmlu", "lm_eval"): Protocol(
        "mmlu", "lm_eval", _mmlu_header_lm_eval, "Answer:", " ", True, "lm_eval",
        "lm-evaluation-harness task mmlu (acc)"),
    ("ceval", "official"): Protocol(
        "ceval", "official", _ceval_header_official, "答案：", "", False, "official",
        "hkust-nlp/ceval answer-only (scores 'A'..'D' right after 答案：)"),
    ("ceval", "lm_eval"): Protocol(
        "ceval", "lm_eval", _ceval_header_lm_eval, "答案：", " ", True, "official",
        "lm-evaluation-harness task ceval-valid (acc)"),
}


def get_protocol(benchmark: str, name: str) -> Protocol:
    key = (benchmark, name)
    benchmarks = sorted({b for b, _ in PROTOCOLS})
    if benchmark not in benchmarks:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(benchmarks)}")
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r} for benchmark {benchmark!r}; expected one of "
                         f"{', '.join(PROTOCOL_NAMES)} with benchmark mmlu or ceval")
    return PROTOCOLS[key]
