"""The run's schedule: how many steps, the learning rate at each, and which rows each micro-batch reads.

All three are pure functions of the recipe, the data size and the step, so a resumed run needs only the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Schedule:
    rows: int  # training rows (packed sequences)
    rows_per_step: int  # micro_batch x accumulation x ranks
    micro_batch: int
    accumulation: int
    seed: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float
    shape: str  # cosine | linear | constant
    min_lr_ratio: float


def make_schedule(training, rows: int, world_size: int) -> Schedule:
    """The schedule of a recipe's `training` section over `rows` training rows on `world_size` ranks."""
    t = training
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    steps_per_epoch = rows // per_step
    if steps_per_epoch == 0:
        raise UserError(f"training: one optimizer step needs {per_step} rows (micro_batch_size x "
                        f"gradient_accumulation_steps x {world_size} rank(s)) but the data has only {rows}; lower "
                        f"training.micro_batch_size or training.gradient_accumulation_steps")
    total = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    return Schedule(rows, per_step, t.micro_batch_size, t.gradient_accumulation_steps, t.seed, steps_per_epoch, total,
                    warmup, t.lr, t.schedule, t.min_lr_ratio)


def learning_rate(step: int, s: Schedule) -> float:
    """Linear warmup to `lr` over the warmup steps, then cosine (or linear) decay to `min_lr_ratio * lr` at the
    last step, or constant. Steps count from 1."""
    if step <= s.warmup_steps:
        return s.lr * step / s.warmup_steps
    if s.shape == "constant":
        return s.lr
    progress = (step - s.warmup_steps) / max(1, s.total_steps - s.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if s.shape == "cosine" else 1 - progress
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * shape)


def micro_batch_indices(s: Schedule, step_index: int, rank: int, world_size: int) -> list[list[int]]:
    """The row indices of each micro-batch of `rank` for optimizer step `step_index` (0-based).

    Each epoch visits the rows in a seeded random order; a step takes `rows_per_step` consecutive rows of that
    order (the remainder of an epoch that does not fill a step is left out), micro-batch j of rank r being the
    (j * world_size + r)-th slice of `micro_batch` rows. No iterator state: resuming at step N reads exactly what
    an uninterrupted run reads.
    """
    epoch, index = divmod(step_index, s.steps_per_epoch)
    order = torch.randperm(s.rows, generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
    start = index * s.rows_per_step
    out = []
    for j in range(s.accumulation):
        first = start + (j * world_size + rank) * s.micro_batch
        out.append(order[first:first + s.micro_batch].tolist())
    return out
