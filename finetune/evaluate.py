"""Measuring a model: validation loss and perplexity, exact match of greedy answers, sample generations.

`finetune eval loss ...` and `finetune eval mmlu ...` (the paper's 5-shot protocol, in `finetune.mmlu`) start here.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

from llama_core.generate import generate
from llama_core.model import count_targets

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


class _Inference:
    """The part of a training engine that `validation_loss` uses, for one model on one device."""

    rank, world_size = 0, 1

    def __init__(self, model):
        self.module = self.core = model
        self.device = next(model.parameters()).device

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**{k: v.to(self.device) for k, v in batch.items()}, reduction="sum")

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value


def dataset_loss(model, dataset, pad_id: int, batch_size: int = 8) -> dict:
    """Loss, perplexity and trained-token count of a tokenized dataset (rows with input_ids/labels/position_ids)."""
    loss = validation_loss(_Inference(model), dataset, batch_size, pad_id)
    tokens = sum(sum(1 for t in labels[1:] if t != -100) for labels in dataset["labels"])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": tokens, "rows": len(dataset)}


def _common_args(p) -> None:
    p.add_argument("--model", required=True, help="a checkpoint folder (HF or Meta), or a LoRA adapter folder")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply to --model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, help="default: the model's context length")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--output", help="write the results as JSON to this file")


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> int:
    from .cli import parser
    from .errors import UserError
    from .merge import load_for_inference

    what = argv[0] if argv and not argv[0].startswith("-") else None
    usage = ("usage: finetune eval mmlu --model DIR --data DIR|hub [...] | "
             "finetune eval loss --model DIR --data FILE [--template NAME] [...] (--help after either for more)")
    if what is None and argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if what not in ("mmlu", "loss"):
        raise UserError(usage)
    p = parser(f"finetune eval {what}", "MMLU k-shot accuracy (Hendrycks et al.)" if what == "mmlu" else
               "Loss and perplexity over a dataset, masked as training masks it")
    _common_args(p)
    if what == "mmlu":
        p.add_argument("--data", required=True, help="MMLU folder (dev/, test/ CSVs) or 'hub' (cais/mmlu)")
        p.add_argument("--shots", type=int, default=5)
        p.add_argument("--subjects", help="comma-separated subjects (default: all found)")
    else:
        p.add_argument("--data", required=True, help="a dataset file or folder (json/jsonl/csv/parquet)")
        p.add_argument("--format", default="alpaca", choices=["alpaca", "conversations", "text"])
        p.add_argument("--template", help="default: the model's template.yaml, else alpaca")
        p.add_argument("--train-on-inputs", action="store_true", help="score prompt tokens too")
        p.add_argument("--cache-dir", help="tokenized-data cache (default ~/.cache/llama-finetune/data)")
    a = p.parse_args(argv[1:])
    if a.batch_size < 1 or (a.max_seq_len is not None and a.max_seq_len < 8):
        raise UserError("--batch-size must be >= 1 and --max-seq-len >= 8")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, template = load_for_inference(a.model, a.adapter, dtype=a.dtype, device=device)
    max_len = min(a.max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
    if a.max_seq_len and a.max_seq_len > max_len:
        print(f"note: --max-seq-len {a.max_seq_len} is longer than the model's context; using {max_len}",
              file=sys.stderr)
    if what == "mmlu":
        from .mmlu import evaluate_mmlu

        if a.shots < 0:
            raise UserError("--shots must be >= 0")
        subjects = [s.strip() for s in a.subjects.split(",") if s.strip()] if a.subjects else None
        try:
            evaluate_mmlu(model, tokenizer, a.data, shots=a.shots, batch_size=a.batch_size, output=a.output,
                          max_seq_len=max_len, subjects=subjects)
        except ValueError as e:
            raise UserError(str(e)) from None
        if a.output:
            print(f"wrote {a.output}")
        return 0
    from .data import build_datasets
    from .recipe import DataSection, DatasetSection
    from .templates import load_template

    template = load_template(a.template) if a.template else template or load_template("alpaca")
    section = DataSection(max_seq_len=max_len, packing=False, train_on_inputs=a.train_on_inputs, dedup=False,
                          cache_dir=a.cache_dir)
    prepared = build_datasets(section, [DatasetSection(path=a.data, format=a.format)], template, tokenizer)
    stats = next(iter(prepared.stats.datasets.values()))
    result = {"data": a.data, "template": template.name, **dataset_loss(model, prepared.train, tokenizer.pad_id,
                                                                       a.batch_size),
              "examples": stats.examples, "overlong_dropped": stats.overlong_dropped, "max_seq_len": max_len}
    print(f"{a.data}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over {result['tokens']:,} "
          f"trained tokens of {result['examples']} examples (template {template.name}, max_seq_len {max_len})")
    if stats.overlong_dropped:
        print(f"note: {stats.overlong_dropped} example(s) longer than {max_len} tokens were left out")
    if a.output:
        _write_json(a.output, result)
        print(f"wrote {a.output}")
    return 0
