"""finetune.schedule: the learning rate at each step and which rows each micro-batch reads."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from finetune.errors import UserError
from finetune.schedule import learning_rate, make_schedule, micro_batch_indices


def training(**kw):
    base = dict(micro_batch_size=2, gradient_accumulation_steps=1, max_steps=None, epochs=1.0, warmup_steps=0,
                warmup_ratio=0.0, lr=1e-3, schedule="cosine", min_lr_ratio=0.1, seed=7)
    return SimpleNamespace(**{**base, **kw})


def test_step_counts_and_warmup():
    s = make_schedule(training(epochs=2.5, warmup_ratio=0.1), rows=41, world_size=2)  # 4 rows a step
    assert (s.rows_per_step, s.steps_per_epoch, s.total_steps, s.warmup_steps) == (4, 10, 25, 2)
    assert make_schedule(training(max_steps=7, epochs=100), rows=41, world_size=1).total_steps == 7
    with pytest.raises(UserError, match="one optimizer step needs 8 rows .* only 5"):
        make_schedule(training(gradient_accumulation_steps=2), rows=5, world_size=2)


@pytest.mark.parametrize("shape", ["cosine", "linear", "constant"])
def test_learning_rate_shapes(shape):
    s = make_schedule(training(max_steps=10, warmup_steps=4, schedule=shape), rows=100, world_size=1)
    lrs = [learning_rate(step, s) for step in range(1, 11)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup, reaching lr at its end
    if shape == "constant":
        assert lrs[4:] == pytest.approx([1e-3] * 6)
        return
    assert lrs[-1] == pytest.approx(1e-4)  # decays to min_lr_ratio * lr at the last step
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))  # strictly decreasing after warmup
    progress = 3 / 6  # step 7
    expected = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
    assert lrs[6] == pytest.approx(1e-3 * (0.1 + 0.9 * expected))


def test_micro_batches_cover_each_epoch_once_and_are_a_function_of_the_step():
    s = make_schedule(training(micro_batch_size=3, gradient_accumulation_steps=2, epochs=2), rows=25,
                      world_size=2)  # 12 rows a step, 2 steps an epoch, the last row of each epoch left out
    epoch = [i for step in range(2) for rank in range(2) for mb in micro_batch_indices(s, step, rank, 2)
             for i in mb]
    assert len(epoch) == len(set(epoch)) == 24 and set(epoch) <= set(range(25))
    again = [i for step in range(2) for rank in range(2) for mb in micro_batch_indices(s, step, rank, 2) for i in mb]
    assert again == epoch  # no iterator state: the same step reads the same rows
    second = [i for step in (2, 3) for rank in range(2) for mb in micro_batch_indices(s, step, rank, 2) for i in mb]
    assert second != epoch and len(set(second)) == 24  # a new order each epoch
    # Micro-batch j of rank r is the (j * world_size + r)-th slice of the epoch's seeded order.
    order = torch.randperm(25, generator=torch.Generator().manual_seed(7 * 1000)).tolist()
    step0 = [micro_batch_indices(s, 0, rank, 2) for rank in range(2)]
    assert step0[0][0] + step0[1][0] + step0[0][1] + step0[1][1] == order[:12]
