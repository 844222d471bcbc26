"""Training: the one trainer (trainer.py) over two step engines (engine.py: one process, msrun), loss,
AdamW + schedule, compiled step, checkpoints, metrics, LoRA.

`run_train(settings)` (trainer.py) is the entry point of the `train` and `finetune` run modes.
"""
from telechat2_ms.train.trainer import Trainer, run_train

__all__ = ["Trainer", "run_train"]
