"""C-Eval and MMLU evaluation, faithful to the published protocols (docs/eval_protocols.md).

Modules: `subjects` (names, categories), `data` (csv loaders), `prompts` (protocol templates), `scoring`
(letter log-probabilities, batched), `results` (records, micro/macro summary, Markdown, C-Eval submission),
`distributed` (data-parallel split and gather), `model_adapter` (MindSpore model -> next_token_logits),
`runner` (`evaluate`, and `run_eval` for run_telechat2.py). Importing this package does not import MindSpore.
"""
from telechat2_ms.evaluate.runner import EvalOptions, evaluate, run_eval

__all__ = ["EvalOptions", "evaluate", "run_eval"]
