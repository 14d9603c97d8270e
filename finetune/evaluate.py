"""Measuring a model: validation loss and perplexity, exact match of greedy answers, sample generations.

`finetune eval loss ...` and `finetune eval mmlu ...` (the paper's 5-shot protocol, in `finetune.mmlu`) start here.
"""
from __future__ import annotations

import json
import math
import os

import torch

from llama_core.generate import generate

from .templates import tokenize


@torch.no_grad()
def validation_loss(engine, dataset, micro_batch: int, pad_id: int, max_batches: int | None = None) -> float:
    """Mean loss over the trained tokens of `dataset` (summed over all ranks' shares under DeepSpeed)."""
    from .data import collate

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
        count += weight * int((batch["labels"][:, 1:] != -100).sum())
    total, count = engine.all_reduce_sum(total), engine.all_reduce_sum(count)
    if was_training:
        engine.module.train()
    return (total / count.clamp(min=1)).item()


def prompt_ids(template, tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the prompt for the last assistant turn of `messages` (which is left out)."""
    history = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    ids, _ = tokenize(template.prompt(history), tokenizer)
    return ids


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
        outputs = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    raise NotImplementedError  # replaced by the eval command (issue 6)
