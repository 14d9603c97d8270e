"""LoRA that learns to stop: a base whose EOS row never received a training signal.

A tiny base is pretrained (full fine-tuning, from random weights) on a task whose answers are never followed by
EOS: EOS is never a target. LoRA then teaches it to end its answers with EOS. With `lora.train_tokens: auto` the
rows of the tokens the template writes (BOS, EOS) train with the adapter and the held-out answers stop; with
`none` the adapter alone does not learn to stop in the same steps.
"""
from __future__ import annotations

import itertools
import json
import random

import pytest
import yaml
from safetensors.torch import load_file, save_file

from finetune.cli import main

WORDS = "the a of to and in is was for on with it be are have not but one two three".split()


def _rows(pairs) -> str:
    return "".join(json.dumps({"instruction": p, "output": p}) + "\n" for p in pairs)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A base that copies two words after "Answer:" and was never trained to stop there."""
    folder = tmp_path_factory.mktemp("untrained-eos")
    pairs = [f"{a} {b}" for a, b in itertools.permutations(WORDS, 2)]
    rng = random.Random(0)
    rng.shuffle(pairs)
    (folder / "pretrain.jsonl").write_text(_rows(rng.choice(pairs) for _ in range(3000)))
    (folder / "train.jsonl").write_text(_rows(rng.choice(pairs[40:]) for _ in range(1000)))
    (folder / "valid.jsonl").write_text(_rows(pairs[:40]))  # answers the base knows; LoRA never sees them
    fmt = {"name": "copy", "user": "Repeat: {content}\nAnswer:", "assistant": " {content}"}
    (folder / "no-eos.yaml").write_text(yaml.safe_dump({**fmt, "eos": False}))  # pretraining: EOS never a target
    (folder / "copy.yaml").write_text(yaml.safe_dump(fmt))
    recipe = {"model": {"preset": "tiny"}, "tokenizer": {"path": tokenizer.path}, "template": str(folder / "no-eos.yaml"),
              "datasets": [{"path": str(folder / "pretrain.jsonl")}],
              "data": {"max_seq_len": 256, "dedup": False, "cache_dir": str(folder / "cache")},
              "training": {"method": "full", "max_steps": 300, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 10,
                           "precision": "fp32"},
              "logging": {"tensorboard": False, "progress": False}, "output_dir": str(folder / "base")}
    (folder / "base.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["--recipe", str(folder / "base.yaml")]) == 0
    # As in Llama 3 base for <|eot_id|>: EOS's rows never received a training signal. Pretraining above only pushed
    # EOS's logit down (a softmax gradient); a row that was never trained is (near) zero, as unsloth found in the
    # real base checkpoints: zero both rows of EOS.
    weights = folder / "base" / "final" / "model.safetensors"
    tensors = load_file(weights)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name][tokenizer.eos_id] = 0
    save_file(tensors, weights)
    return folder


def _lora(base, train_tokens: str) -> dict:
    recipe = {"model": {"checkpoint": str(base / "base" / "final")}, "template": str(base / "copy.yaml"),
              "datasets": [{"path": str(base / "train.jsonl")}],
              "data": {"max_seq_len": 256, "dedup": False, "cache_dir": str(base / "cache"),
                       "validation": [{"path": str(base / "valid.jsonl")}]},
              "training": {"method": "lora", "max_steps": 150, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
                           "precision": "fp32"},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "train_tokens": train_tokens},
              "eval": {"exact_match": 40, "max_new_tokens": 12},
              "logging": {"tensorboard": False, "progress": False}, "output_dir": str(base / f"lora-{train_tokens}")}
    path = base / f"lora-{train_tokens}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["--recipe", str(path)]) == 0
    return json.loads((base / f"lora-{train_tokens}" / "summary.json").read_text())


def test_lora_learns_to_stop_with_the_template_token_rows(base):
    """With the EOS row trained (auto), the held-out answers end where they should: EOS becomes likely, and the
    validation loss (which counts the EOS target) falls far below the adapter-only run's. Without it (none), q/v
    adapters can only push the hidden state towards a row pretraining pushed down: greedy decoding may still stop
    (how often differs between CPUs) but the EOS target stays expensive. Measured at 150 steps on an Intel Xeon
    with AVX-512: auto 0.07 validation loss and 0.93 exact match, none 0.77 and 0.80. (At 100 steps none
    stopped in 0.2 of the answers or fewer on an AMD EPYC, but in 0.48 on that Xeon: exact match alone does
    not separate the two.)"""
    auto, none = _lora(base, "auto"), _lora(base, "none")
    assert auto["val_exact_match"] >= 0.8, auto
    assert auto["val_loss"] < 0.3 * none["val_loss"], (auto, none)
