"""What a run shows and records: a progress line (step, loss, lr, tokens/s, ETA), metrics.jsonl, the trackers."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from llama_core.files import json_safe, open_append

from .trackers import open_trackers


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RunLog:
    """Metrics to `metrics.jsonl` (one JSON object per line) and the recipe's trackers (TensorBoard, W&B, MLflow:
    finetune.trackers); progress to stderr. Only the main rank logs.

    On a terminal the progress line redraws in place every step; otherwise one line is printed every
    `every` steps, so logs stay readable.
    """

    def __init__(self, out_dir: str, total_steps: int, *, every: int = 10, report_to=("tensorboard",),
                 config: dict | None = None, progress: bool = True, enabled: bool = True, start_step: int = 0):
        self.enabled, self.total, self.every, self.progress = enabled, total_steps, every, progress
        self.start_time, self.start_step = time.time(), start_step
        self.tty = sys.stderr.isatty()
        self.trackers = []
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        # The trackers first: one that cannot start ends the run before metrics.jsonl is opened.
        self.trackers = open_trackers(list(report_to), out_dir, os.path.basename(os.path.abspath(out_dir)),
                                      config or {}, start_step=start_step, warn=self.message)
        self.metrics = open_append(os.path.join(out_dir, "metrics.jsonl"))  # never through a symbolic link

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(json_safe({"step": step, **values})) + "\n")
        self.metrics.flush()
        for tracker in self.trackers:
            tracker.log(step, values)

    def show(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not (self.enabled and self.progress):
            return
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / done * (self.total - step) if done else float("nan")
        width = len(str(self.total))
        line = (f"step {step:>{width}}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {format_duration(eta)}")
        if self.tty:
            print("\r" + line + "\033[K", end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            if self.tty and self.progress:
                print("\r\033[K", end="", file=sys.stderr)
            print(text, file=sys.stderr, flush=True)

    def close(self, status: str = "finished") -> None:
        """`status`: finished, failed or interrupted (what the trackers record); closing twice is harmless."""
        if self.enabled and not self.metrics.closed:
            self.metrics.close()
            for tracker in self.trackers:
                tracker.close(status)
