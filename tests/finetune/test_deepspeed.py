"""DeepSpeed ZeRO-3 on real CPU ranks (gloo): partitioning, loss parity with one process, consolidated save, resume.

Slow: each launch starts two Python processes and DeepSpeed (about a minute; the first ever also compiles
DeepSpeed's small shared-memory op). Everything is checked in two launches.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from finetune.cli import main
from llama_core.weights import load_model

from .test_train import ROOT, _losses, _recipe

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(recipe: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "finetune", "launch", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "--recipe", recipe, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_zero3_two_ranks(tmp_path, tokenizer, hf_twin):
    settings = dict(training={"max_steps": 6, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                              "schedule": "constant", "warmup_steps": 0, "lr": 3e-3},
                    checkpoint={"every_steps": 2})
    # One process with the same global batch (2 rows x 2 ranks = 4 rows a step) and the same rows per step.
    single = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "single"), **settings)
    assert main(["--recipe", single, "training.gradient_accumulation_steps=2"]) == 0
    expected = _losses(tmp_path / "single")

    recipe = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "zero3"),
                     distributed={"backend": "deepspeed", "zero_stage": 3}, **settings)
    first = _launch(recipe, "training.max_steps=4")
    shares = [float(m) for m in re.findall(r"rank \d: holds [\d,]+ of [\d,]+ parameter values \(([\d.]+)%", first.stderr)]
    assert len(shares) == 2 and all(45 <= s <= 55 for s in shares), first.stderr[-3000:]
    part = _losses(tmp_path / "zero3")
    assert sorted(part) == [1, 2, 3, 4]

    second = _launch(recipe)  # max_steps 6: resumes from the step-4 checkpoint
    assert "resuming from" in second.stderr and "step 4 of 6" in second.stderr
    losses = _losses(tmp_path / "zero3")
    assert sorted(losses) == list(range(1, 7))
    for step in range(1, 7):
        assert losses[step] == pytest.approx(expected[step], abs=2e-5, rel=0), (step, losses, expected)

    # The consolidated model loads in transformers and matches the single-process result.
    from transformers import LlamaForCausalLM
    final = tmp_path / "zero3" / "final"
    hf = LlamaForCausalLM.from_pretrained(final).eval()
    reference = load_model(tmp_path / "single" / "final")
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, reference(x), atol=5e-4, rtol=1e-3)
        torch.testing.assert_close(hf(x).logits, load_model(final)(x), atol=1e-5, rtol=0)
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_zero3_lora_matches_one_process(tmp_path, tokenizer):
    from safetensors.torch import load_file

    # (lora.train_tokens is off under DeepSpeed: PEFT's trainable token rows are not ZeRO-partitioned)
    settings = dict(training={"method": "lora", "max_steps": 4, "micro_batch_size": 2, "schedule": "constant",
                              "lr": 3e-3}, lora={"dropout": 0.0, "train_tokens": "none"})
    single = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "single"), **settings)
    assert main(["--recipe", single, "training.gradient_accumulation_steps=2"]) == 0
    recipe = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "zero3"),
                     distributed={"backend": "deepspeed", "zero_stage": 3}, **settings)
    _launch(recipe)
    expected, losses = _losses(tmp_path / "single"), _losses(tmp_path / "zero3")
    assert all(losses[s] == pytest.approx(expected[s], abs=2e-5, rel=0) for s in range(1, 5)), (losses, expected)
    a = load_file(tmp_path / "single" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "zero3" / "final" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert (tmp_path / "zero3" / "base" / "model.safetensors").exists()  # the preset base the adapter needs


def test_zero3_tied_head_matches_one_process(tmp_path, tokenizer):
    """A tied head (Llama 3.2's layout) under ZeRO-3: one shared partitioned parameter, the same losses as one
    process, and a consolidated save that keeps the tie (no lm_head.weight)."""
    from safetensors import safe_open

    settings = dict(model={"preset": "tiny", "config": {"tie_word_embeddings": True}},
                    training={"max_steps": 3, "micro_batch_size": 2, "schedule": "constant", "lr": 3e-3})
    single = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "single"), **settings)
    assert main(["--recipe", single, "training.gradient_accumulation_steps=2"]) == 0
    recipe = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "zero3"),
                     distributed={"backend": "deepspeed", "zero_stage": 3}, **settings)
    run = _launch(recipe)
    assert "holds 60,576 of 121,152 parameter values" in run.stderr  # the shared matrix counted once
    expected, losses = _losses(tmp_path / "single"), _losses(tmp_path / "zero3")
    assert all(losses[s] == pytest.approx(expected[s], abs=2e-5, rel=0) for s in range(1, 4)), (losses, expected)
    final = tmp_path / "zero3" / "final"
    with safe_open(final / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(final)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what an unsafe unpickler would run


def test_deepspeed_checkpoints_load_weights_only(tmp_path):
    from finetune.deepspeed_io import safe_checkpoint_engine as _safe_checkpoint_engine, weights_only_loads

    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(str(marker))}, tmp_path / "optim_states.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        _safe_checkpoint_engine(None).load(str(tmp_path / "optim_states.pt"))
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "optim_states.pt", weights_only=False)  # what DeepSpeed's zero_to_fp32 asks for
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "fine.pt")
    assert torch.equal(_safe_checkpoint_engine(None).load(str(tmp_path / "fine.pt"))["w"], torch.ones(2))


@pytest.mark.parametrize("env, backend, message", [
    ({"WORLD_SIZE": "abc"}, "none", "WORLD_SIZE='abc' is not a number of processes"),
    ({"WORLD_SIZE": "0"}, "none", "WORLD_SIZE=0: a launcher starts at least 1 process"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "none", "(OMPI_COMM_WORLD_SIZE=2)"),
    ({"PMI_SIZE": "4"}, "none", "(PMI_SIZE=4)"),
    ({"WORLD_SIZE": "2"}, "deepspeed", "WORLD_SIZE=2, but RANK, MASTER_ADDR, MASTER_PORT are not set")])
def test_launch_environments_that_cannot_work_are_refused(tmp_path, tokenizer, monkeypatch, capsys, env, backend,
                                                          message):
    """Bad or partial launcher variables: exit 2 and one line, from validate as from training, before any work."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recipe = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "out"), distributed={"backend": backend})
    for command in (["validate", "--recipe", recipe], ["--recipe", recipe]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_under_torchrun(tmp_path, tokenizer, monkeypatch, capsys):
    """torchrun (or any launcher setting WORLD_SIZE > 1): backend none is refused at once, exit 2, nothing
    written; backend deepspeed runs there as under DeepSpeed's launcher, with the same losses as one process."""
    settings = dict(training={"max_steps": 3, "micro_batch_size": 2, "schedule": "constant", "lr": 3e-3})
    none = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "none"), **settings)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--recipe", none]) == 2
    assert "WORLD_SIZE=2" in capsys.readouterr().err and not (tmp_path / "none").exists()
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["--recipe", none, "training.gradient_accumulation_steps=2"]) == 0  # the same global batch
    recipe = _recipe(tmp_path, tokenizer, output_dir=str(tmp_path / "torchrun"),
                     distributed={"backend": "deepspeed", "zero_stage": 3}, **settings)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "finetune", "--recipe", recipe]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    expected, losses = _losses(tmp_path / "none"), _losses(tmp_path / "torchrun")
    assert all(losses[s] == pytest.approx(expected[s], abs=2e-5, rel=0) for s in range(1, 4)), (losses, expected)
