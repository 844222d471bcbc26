"""Training progress: one line per step on stdout, a metrics jsonl, and at the end two PNGs: the loss curve
and the training curves (loss, learning rate, gradient norm, tokens/s against step).

Progress line (every `log_steps` steps):
    step 40/300 | loss 2.4113 | lr 2.87e-03 | grad_norm 0.812 | 12450 tok/s | 0.21 s/step | ETA 0:00:54
(`| aux_loss 0.0103` is appended for a mixture-of-experts model: the load-balancing part of the loss;
`| loss_scale 32768` with fp16 loss scaling, `| skipped (non-finite gradients)` on an
overflow step.) tok/s counts real (non-pad) tokens of the step, on this process. The ETA uses the mean time
of the steps run so far in this process, leaving out the first (it includes compilation).

metrics.jsonl: one JSON object per step {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s",
"step_time_s", "loss_scale", "skipped", "consumed_samples"}, and "aux_loss" for a mixture-of-experts model. On resume, lines after the resumed step (written
by the interrupted run after its last checkpoint) are dropped, so the file describes one clean run. A torn
last line (what a kill or a full disk mid-append leaves) is dropped with a warning; a bad line anywhere else
is an error naming the file and line. The curves are drawn with matplotlib (rank 0 under msrun).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from typing import Any, Callable, Dict, List, Optional

from telechat2_ms.formats.atomic import atomic_file, write_text_atomic

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
CURVES_FILE = "training_curves.png"  # loss, learning rate, gradient norm, tokens/s


class MetricsError(ValueError):
    """metrics.jsonl is damaged before its last line."""


def read_metrics(path: str, warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
                 ) -> List[Dict[str, Any]]:
    """The records of a metrics jsonl ([] if there is none); a torn last line is dropped with a warning."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for n, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if n == len(numbered) - 1:
                warn(f"warning: {path}:{number}: dropped a torn last line ({len(line)} bytes), left by an "
                     "interrupted write")
                break
            raise MetricsError(f"{path}:{number}: not a metrics record ({err}); the file is damaged: remove it "
                               "or that line to resume (it only holds the log of earlier steps)") from None
        records.append(record)
    return records


class MetricsLogger:
    def __init__(self, output_dir: str, total_steps: int, log_steps: int = 1,
                 printer: Callable[[str], None] = print):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.total_steps = total_steps
        self.log_steps = max(int(log_steps), 1)
        self.printer = printer
        self.step_times: List[float] = []
        os.makedirs(output_dir, exist_ok=True)

    def start(self, resumed_step: int) -> None:
        """Keep only records up to `resumed_step` (0: start a fresh file)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step] if resumed_step else []
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def eta(self, step: int) -> Optional[float]:
        timed = self.step_times[1:] if len(self.step_times) > 1 else self.step_times
        if not timed:
            return None
        return sum(timed) / len(timed) * (self.total_steps - step)

    def log(self, record: Dict[str, Any]) -> str:
        """Append the record to metrics.jsonl, print the progress line (every log_steps), return the line."""
        self.step_times.append(record["step_time_s"])
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        eta = self.eta(step)
        line = (f"step {step}/{self.total_steps} | loss {_number(record['loss'], '.4f')} | lr {record['lr']:.2e} | "
                f"grad_norm {_number(record['grad_norm'], '.3f')} | {record['tokens_per_s']:.0f} tok/s | "
                f"{record['step_time_s']:.2f} s/step | ETA "
                + (str(datetime.timedelta(seconds=int(eta))) if eta is not None else "?"))
        if record.get("aux_loss") is not None:
            line += f" | aux_loss {_number(record['aux_loss'], '.4f')}"
        if record.get("loss_scale") not in (None, 1.0):
            line += f" | loss_scale {record['loss_scale']:g}"
        if record.get("skipped"):
            line += " | skipped (non-finite gradients)"
        if step % self.log_steps == 0 or step == self.total_steps or record.get("skipped"):
            self.printer(line)
        return line

    def plot(self, output_dir: str) -> str:
        """Write loss_curve.png (raw loss and its moving average) and training_curves.png from metrics.jsonl;
        returns the loss curve's path."""
        records = read_metrics(self.path)
        steps = [r["step"] for r in records]
        losses = [r["loss"] if r["loss"] is not None and math.isfinite(r["loss"]) else float("nan")
                  for r in records]
        window = max(len(losses) // 20, 1)
        smooth = moving_average(losses, window)
        path = os.path.join(output_dir, LOSS_CURVE_FILE)
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        axes = figure.subplots()
        axes.plot(steps, losses, linewidth=0.8, alpha=0.5, label="loss")
        axes.plot(steps, smooth, linewidth=1.6, label=f"moving average ({window} steps)")
        axes.set(xlabel="step", ylabel="loss", title="training loss vs step")
        axes.grid(alpha=0.3)
        axes.legend()
        with atomic_file(path, overwrite=True, suffix=".png") as tmp:
            figure.savefig(tmp)
        self._plot_curves(records, steps, losses, smooth, window, os.path.join(output_dir, CURVES_FILE))
        return path

    @staticmethod
    def _plot_curves(records, steps, losses, smooth, window, path: str) -> None:
        """training_curves.png: loss, learning rate, gradient norm and tokens/s against step (2 x 2 panels)."""
        from matplotlib.figure import Figure

        def column(key):
            return [r.get(key) if r.get(key) is not None and math.isfinite(r.get(key)) else float("nan")
                    for r in records]

        figure = Figure(figsize=(10.0, 7.0), dpi=100)
        (loss_ax, lr_ax), (norm_ax, speed_ax) = figure.subplots(2, 2, sharex=True)
        loss_ax.plot(steps, losses, linewidth=0.8, alpha=0.5, label="loss")
        loss_ax.plot(steps, smooth, linewidth=1.6, label=f"moving average ({window} steps)")
        loss_ax.legend()
        lr_ax.plot(steps, column("lr"))
        norm_ax.plot(steps, column("grad_norm"))
        speed_ax.plot(steps, column("tokens_per_s"))
        for axes, label in ((loss_ax, "loss"), (lr_ax, "learning rate"), (norm_ax, "gradient norm (before clipping)"),
                            (speed_ax, "tokens / s (this process)")):
            axes.set(ylabel=label, title=f"{label} vs step")
            axes.grid(alpha=0.3)
        for axes in (norm_ax, speed_ax):
            axes.set(xlabel="step")
        figure.tight_layout()
        with atomic_file(path, overwrite=True, suffix=".png") as tmp:
            figure.savefig(tmp)


def moving_average(values: List[float], window: int) -> List[float]:
    """Trailing mean over the last `window` finite values (nan where there is none)."""
    out, recent = [], []
    for value in values:
        if math.isfinite(value):
            recent.append(value)
        recent = recent[-window:]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def _number(value: Optional[float], spec: str) -> str:
    """A record's value for the progress line; a non-finite one is stored as null and shown as nan."""
    return "nan" if value is None else format(value, spec)
