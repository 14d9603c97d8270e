"""What only a GPU shows about the fine-tuning side: the fused LoRA forward in bf16 and LoRA dropout on CUDA against
PEFT's own layer, and QLoRA (bitsandbytes 4-bit) for a few steps, then saved and merged. Marked gpu:
bench/gpu_check.sh runs them; elsewhere they are skipped."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from finetune.cli import main
from finetune.lora import LoraLinear, lora_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(tiny_model, fused: bool, dtype: torch.dtype, dropout: float = 0.0):
    """A tiny model on the GPU in `dtype` with LoRA (adapters in the same dtype: PEFT would otherwise keep them in
    fp32, and the fused forward only runs when base and adapter dtypes agree), B non-zero."""
    make = lora_config if fused else LoraConfig
    torch.manual_seed(0)
    model = tiny_model().to("cuda", dtype).train()
    model = get_peft_model(model, make(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS),
                           autocast_adapter_dtype=False)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model


def _loss_and_grads(model):
    ids = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    torch.manual_seed(7)  # the same CUDA dropout masks for both sides
    loss = model(input_ids=ids, labels=ids)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def test_fused_lora_forward_in_bf16_agrees_with_peft(tiny_model):
    ours, theirs = _adapted(tiny_model, True, torch.bfloat16), _adapted(tiny_model, False, torch.bfloat16)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, device="cuda", dtype=torch.bfloat16)
    assert type(layer) is LoraLinear and layer._fusable(x, (), {}) == "default"  # the fused path really runs
    (loss, grads), (ref_loss, ref_grads) = _loss_and_grads(ours), _loss_and_grads(theirs)
    # One rounding of the in-place sum against PEFT's three: bf16's 8 bits agree to about 1%.
    assert abs(loss - ref_loss) <= 1e-2 * ref_loss
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 2 * len(TARGETS)
    worst = max(_rel(grads[n], ref_grads[n]) for n in grads)
    assert worst <= 5e-2, worst


def test_lora_dropout_on_cuda_is_peft_s(tiny_model):
    """On CUDA the fused layer uses torch's own fused dropout (native_dropout) and keeps its bool mask: the same
    masks as PEFT's nn.Dropout from the same seed, so the same loss and gradients (fp32)."""
    ours, theirs = (_adapted(tiny_model, fused, torch.float32, dropout=0.1) for fused in (True, False))
    (loss, grads), (ref_loss, ref_grads) = _loss_and_grads(ours), _loss_and_grads(theirs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_steps_then_save_and_merge(tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    rows = [{"instruction": f"say {w}", "output": w} for w in ("one two", "three four", "five six", "seven")] * 8
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": {"preset": "tiny"}, "tokenizer": {"path": tokenizer.path}, "template": "alpaca",
              "datasets": [{"path": str(tmp_path / "train.jsonl")}],
              "data": {"max_seq_len": 256, "dedup": False, "cache_dir": str(tmp_path / "cache")},
              "training": {"method": "lora", "quantize": "4bit", "max_steps": 3, "micro_batch_size": 4,
                           "lr": 1e-2, "warmup_steps": 0},
              "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
              "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
              "output_dir": str(tmp_path / "out")}
    (tmp_path / "qlora.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["--recipe", str(tmp_path / "qlora.yaml")]) == 0
    out = tmp_path / "out"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert len(losses) == 3 and all(loss is not None and loss < 1e4 for loss in losses), losses
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    assert any("lora_B" in n and t.abs().max() > 0 for n, t in adapter.items())  # B moved from its zeros
    # The adapter merges into the full-precision base it was trained against (OUT/base: the preset's weights,
    # quantized only in memory during training).
    assert main(["merge", "--adapter", str(out / "final"), "--output", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(out / "base" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[name], base[name])
