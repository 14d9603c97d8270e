"""Loss curves from metrics.jsonl: `loss.png` at the end of a run (train and validation loss against tokens, the
learning rate beside) and `finetune plot RUN [RUN ...]` to compare runs in one picture.

matplotlib draws off-screen (a Figure on an Agg canvas; pyplot and the global backend are left alone); the picture
is rendered in memory, then written atomically, so a failed plot leaves no half-written file.
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llama_core.files import OutputError, write_bytes

from .errors import UserError

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
COMPARISON = "loss_comparison.png"  # where `finetune plot` puts a comparison of several runs by default
_KEYS = ("train_loss", "val_loss", "lr", "tokens")


@dataclass
class Curves:
    """One run's logged values: key -> {step: value} (finite values only; a later line for a step wins)."""

    label: str
    source: Path
    values: dict[str, dict[int, float]] = field(default_factory=lambda: {key: {} for key in _KEYS})

    def points(self, key: str, by_tokens: bool) -> tuple[list[float], list[float]]:
        """(x, y) of `key` in step order, x in tokens (interpolated between logged points) or in steps."""
        steps = sorted(self.values[key])
        y = [self.values[key][s] for s in steps]
        return (self._tokens_at(steps) if by_tokens else [float(s) for s in steps]), y

    def _tokens_at(self, steps: list[int]) -> list[float]:
        import numpy as np

        # Evaluations are logged at steps without a token count of their own (the training line of that step
        # may be logged or not): their position is interpolated; no tokens are seen before step 1.
        known = {0: 0.0, **self.values["tokens"]}
        xs = sorted(known)
        return np.interp(steps, xs, [known[s] for s in xs]).tolist()


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl with an integer "step"; blank, torn (a crash mid-write) and other
    unreadable lines are skipped (load_curves says how many)."""
    return _read_metrics(path)[0]


def _read_metrics(path: str | Path) -> tuple[list[dict], int]:
    records, unreadable = [], 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    unreadable += bool(line.strip())
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) \
                        and not isinstance(record["step"], bool):
                    records.append(record)
                else:
                    unreadable += 1
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    return records, unreadable


def load_curves(run_dir: str | Path, label: str | None = None) -> Curves:
    """A run folder's curves; UserError if it is not a run folder or has no loss to plot."""
    folder = Path(run_dir)
    if not folder.exists():
        raise UserError(f"{run_dir}: no such run folder")
    if not folder.is_dir():
        raise UserError(f"{run_dir}: is a file; give a run's output folder (the one that holds metrics.jsonl)")
    source = folder / "metrics.jsonl"
    if not source.is_file():
        raise UserError(f"{run_dir}: has no metrics.jsonl; give a run's output folder")
    curves = Curves(label or run_name(folder), source)
    records, unreadable = _read_metrics(source)
    if unreadable:  # a run killed mid-write leaves its last line torn; more than that deserves a look
        print(f"note: {source}: {unreadable} unreadable line{'s' * (unreadable > 1)} skipped", file=sys.stderr)
    for record in records:
        for key in _KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                curves.values[key][record["step"]] = float(value)
    if not curves.values["train_loss"] and not curves.values["val_loss"]:
        raise UserError(f"{source}: no train_loss or val_loss values to plot")
    return curves


def run_name(folder: Path) -> str:
    return folder.resolve().name or str(folder)


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw one run's loss and learning rate into `output` (default run_dir/loss.png); returns the path."""
    output = _picture_path(Path(output) if output is not None else Path(run_dir) / "loss.png")
    curves = load_curves(run_dir)
    return _save(_figure([curves], curves.label), output)


def plot_runs(run_dirs: list[str | Path], output: str | Path) -> Path:
    """Draw several runs into one picture, one colour each, labelled by folder name; returns the path."""
    if not run_dirs:
        raise UserError("give at least one run folder to plot")
    output = _picture_path(Path(output))
    names = [run_name(Path(d)) for d in run_dirs]
    if len(set(names)) < len(names):  # runs/a/lora and runs/b/lora: label them by the paths given
        names = [str(d) for d in run_dirs]
    runs = [load_curves(d, name) for d, name in zip(run_dirs, names)]
    title = " vs ".join(names)
    return _save(_figure(runs, title if len(title) <= 100 else f"{len(runs)} runs"), output)


def plot(runs: list[str], output: str | None = None) -> Path:
    """`finetune plot RUN [RUN ...] [--output FILE]`: one run -> RUN/loss.png, several -> ./loss_comparison.png,
    unless --output says where."""
    if len(runs) == 1:
        return plot_run(runs[0], output)
    return plot_runs(runs, output or COMPARISON)


def _figure(runs: list[Curves], title: str):
    Figure, FigureCanvasAgg, EngFormatter, FuncFormatter = _matplotlib()
    by_tokens = all(run.values["tokens"] for run in runs)  # one x axis for all: tokens when every run has them
    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, lr_ax = fig.subplots(1, 2, width_ratios=(3, 2))
    several = len(runs) > 1
    losses = []
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        prefix = f"{run.label} " if several else ""
        x, y = run.points("train_loss", by_tokens)
        if y:
            loss_ax.plot(x, y, color=colour, linewidth=1.2, label=prefix + "train")
        vx, vy = run.points("val_loss", by_tokens)
        if vy:
            loss_ax.plot(vx, vy, color=colour if several else "C1", linestyle="--", marker="o", markersize=4,
                         label=prefix + "validation")
        losses += y + vy
        lx, ly = run.points("lr", by_tokens)
        if ly:
            lr_ax.plot(lx, ly, color=colour if several else "C2", label=run.label if several else None)
    x_label = "tokens" if by_tokens else "step"
    loss_ax.set(title="loss", xlabel=x_label, ylabel="loss")
    if min(losses) > 0 and max(losses) / min(losses) > 20:  # a long run's late progress is invisible on a line
        loss_ax.set_yscale("log")
        loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1 1 10, not 10^-1
        loss_ax.yaxis.set_minor_formatter(FuncFormatter(_label_2_and_5))
    loss_ax.legend()
    lr_ax.set(title="learning rate", xlabel=x_label)
    if not any(run.values["lr"] for run in runs):
        lr_ax.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=lr_ax.transAxes)
    elif several:
        lr_ax.legend()
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
        if by_tokens:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 500k, 1M, 2.5M
    fig.suptitle(title)
    return fig


def _label_2_and_5(value: float, _) -> str:
    """Of a log axis' minor ticks (0.2 0.3 ... 0.9 2 3 ...) label 0.2, 0.5, 2, 5, ...: enough to read values."""
    leading = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return f"{value:g}" if round(leading, 6) in (2, 5) else ""


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter, FuncFormatter
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'llama-finetune[plot]'") from None
    return Figure, FigureCanvasAgg, EngFormatter, FuncFormatter


def _picture_path(output: Path) -> Path:
    if output.suffix.lower() not in FORMATS:
        raise UserError(f"{output}: a picture's file name ends in {', '.join(FORMATS)}")
    return output


def _save(fig, output: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=FORMATS[output.suffix.lower()])
    try:
        write_bytes(output, buffer.getvalue())
    except OutputError as e:
        raise UserError(str(e)) from None
    except OSError as e:
        raise UserError(f"{output}: cannot be written ({e.strerror or e})") from None
    return output
