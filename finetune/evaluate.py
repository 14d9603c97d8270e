"""Measuring a model: validation loss and perplexity, exact match of greedy answers, sample generations.

(The paper's MMLU protocol is in `finetune.mmlu`; the `finetune eval` command in `finetune.commands.eval`.)
"""
from __future__ import annotations

import json
import math

import torch

from llama_core.files import atomic_write
from llama_core.generate import generate
from llama_core.model import count_targets

from .data import collate
from .engine import Engine, LocalEngine
from .templates import tokenize


@torch.no_grad()
def validation_loss(engine: Engine, dataset, micro_batch: int, pad_id: int, max_batches: int | None = None) -> float:
    """Mean loss over the trained tokens of `dataset` (summed over all ranks' shares under DeepSpeed)."""
    was_training = engine.module.training
    engine.module.eval()
    total, count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    n, per_round = len(dataset), micro_batch * engine.world_size
    rounds = math.ceil(n / per_round) if max_batches is None else min(max_batches, math.ceil(n / per_round))
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively); a rank whose
    # share has run out repeats the first batch with weight 0.
    for i in range(rounds):
        start = i * per_round + engine.rank * micro_batch
        weight = 1.0 if start < n else 0.0
        rows = dataset.select(range(start, min(start + micro_batch, n)) if weight else range(min(micro_batch, n)))
        batch = collate(rows, pad_id)
        total += weight * engine.loss_sum(batch).double().cpu()
        count += weight * int(count_targets(batch["labels"]))
    total, count = engine.all_reduce_sum(total), engine.all_reduce_sum(count)
    if was_training:
        engine.module.train()
    return (total / count.clamp(min=1)).item()


def prompt_ids(template, tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the last assistant turn of `messages` (which is left out)."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return tokenize(template.prompt(history), tokenizer)


def answer_text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, continuation=True).strip()


@torch.no_grad()
def greedy_answers(model, tokenizer, template, examples: list[dict], *, max_new_tokens: int,
                   batch_size: int = 16) -> list[dict]:
    """Greedy answers to held-out examples: prompt, reference, prediction, and whether it stopped at EOS."""
    was_training = model.training
    model.eval()
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [prompt_ids(template, tokenizer, ex["messages"]) for ex in chunk]
        outputs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.stop_ids,
                           pad_id=tokenizer.pad_id)
        for ex, prompt, out in zip(chunk, prompts, outputs):
            # generate drops the EOS; a row shorter than the limits ended with one.
            stopped = len(out) < max_new_tokens and len(prompt) + len(out) < model.config.max_seq_len
            results.append({"prompt": tokenizer.decode(prompt), "reference": ex["messages"][-1]["content"],
                            "prediction": answer_text(tokenizer, out), "stopped_at_eos": stopped})
    if was_training:
        model.train()
    return results


def exact_match(model, tokenizer, template, examples: list[dict], *, max_new_tokens: int) -> float:
    """Fraction of examples whose greedy answer, ended by EOS, equals the reference (ignoring outer spaces)."""
    results = greedy_answers(model, tokenizer, template, examples, max_new_tokens=max_new_tokens)
    hits = sum(r["stopped_at_eos"] and r["prediction"] == r["reference"].strip() for r in results)
    return hits / max(1, len(results))


def write_samples(model, tokenizer, template, examples: list[dict], path: str, *, max_new_tokens: int) -> None:
    results = greedy_answers(model, tokenizer, template, examples, max_new_tokens=max_new_tokens)
    with atomic_write(path) as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def dataset_loss(model, dataset, pad_id: int, batch_size: int = 8) -> dict:
    """Loss, perplexity and trained-token count of a tokenized dataset (rows with input_ids/labels/position_ids)."""
    loss = validation_loss(LocalEngine(model, model), dataset, batch_size, pad_id)
    tokens = sum(sum(1 for t in labels[1:] if t != -100) for labels in dataset["labels"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "rows": len(dataset)}
