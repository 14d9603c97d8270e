"""LoRA that learns to stop: a base whose EOS row never received a training signal.

A tiny base is pretrained (full fine-tuning, from random weights) on a task whose answers are never followed by
EOS: EOS is never a target; then EOS's embedding and head rows are zeroed, as the rows of tokens a real base never
trained are (Llama 3 base and <|eot_id|>). LoRA then teaches it to end its answers with EOS. With `lora.train_tokens: auto` the
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
              "training": {"method": "lora", "max_steps": 200, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 5,
                           "precision": "fp32"},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "train_tokens": train_tokens},
              "eval": {"exact_match": 40, "max_new_tokens": 12},
              "logging": {"tensorboard": False, "progress": False}, "output_dir": str(base / f"lora-{train_tokens}")}
    path = base / f"lora-{train_tokens}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["--recipe", str(path)]) == 0
    return json.loads((base / f"lora-{train_tokens}" / "summary.json").read_text())


def test_lora_learns_to_stop_only_with_the_template_token_rows(base):
    """With EOS's rows trained (auto), the held-out answers end where they should; without them (none), EOS's logit
    stays 0 (its head row is zero), so greedy decoding never stops on its own. Measured at 200 steps on an Intel
    Xeon with AVX-512: auto 0.95 exact match and 0.026 validation loss, none 0.0 and 0.68. (Before EOS's rows were
    zeroed in `base`, as rows pretraining only pushed down, none's q/v adapters learned to reach them: 0.2 to 0.8
    exact match depending on the CPU and the steps.)"""
    auto, none = _lora(base, "auto"), _lora(base, "none")
    assert auto["val_exact_match"] >= 0.9, auto
    assert none["val_exact_match"] <= 0.2, none
    assert auto["val_loss"] < 0.3 * none["val_loss"], (auto, none)
