"""finetune.lora: PEFT's LoRA layer with the fused forward pass gives PEFT's results with fewer temporaries."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.lora import LoraLinear, lora_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(tiny_model, fused: bool, **kwargs):
    """A tiny model with LoRA on every linear layer of the blocks, B non-zero (else A would get no gradient)."""
    make = lora_config if fused else LoraConfig
    torch.manual_seed(0)
    model = get_peft_model(tiny_model().train(), make(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs))
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return model


def loss_and_grads(model, seed=1):
    ids = torch.randint(0, model.base_model.model.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(7)  # the same dropout masks for both
    loss = model(input_ids=ids, labels=ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) >= 2 * len(TARGETS) * 2  # A and B, 2 layers
    for name in ours[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], msg=name)


def test_lora_config_uses_the_fused_layer_only_on_llama_core_linears(tiny_model, hf_twin):
    model = adapted(tiny_model, fused=True)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert len(layers) == 2 * len(TARGETS) and all(type(m) is LoraLinear for m in layers)
    hf = get_peft_model(hf_twin(tiny_model()), lora_config(r=4, target_modules=TARGETS))  # torch's nn.Linear
    assert not any(isinstance(m, LoraLinear) for m in hf.modules())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_forward_matches_peft(tiny_model, dropout):
    ours, theirs = adapted(tiny_model, True, lora_dropout=dropout), adapted(tiny_model, False, lora_dropout=dropout)
    assert_same(loss_and_grads(ours), loss_and_grads(theirs))
    with torch.no_grad():  # inference keeps the same path
        ids = torch.arange(12).view(1, 12)
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))


def test_fused_forward_allocates_less(tiny_model):
    class BytesMade(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and not func._schema.is_mutable:  # in-place ops make nothing new
                    self.total += t.untyped_storage().nbytes()
            return out

    made = {}
    for fused in (True, False):
        model = adapted(tiny_model, fused)
        with BytesMade() as mode:
            loss_and_grads(model)
        made[fused] = mode.total
    assert made[True] < 0.85 * made[False], made


def test_other_cases_fall_back_to_peft(tiny_model):
    ids = torch.arange(12).view(1, 12)
    ours, theirs = adapted(tiny_model, True), adapted(tiny_model, False)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features)
    assert layer._fusable(x, (), {}) == "default"
    with ours.disable_adapter(), theirs.disable_adapter():  # the base model alone
        assert layer._fusable(x, (), {}) is None
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))
    assert layer._fusable(x.double(), (), {}) is None  # dtypes differ: PEFT's casts
    ours.merge_adapter(), theirs.merge_adapter()
    assert layer._fusable(x, (), {}) is None
    torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids))
    ours.unmerge_adapter(), theirs.unmerge_adapter()
    dora, dora_ref = adapted(tiny_model, True, use_dora=True), adapted(tiny_model, False, use_dora=True)
    assert dora.base_model.model.model.layers[0].mlp.up_proj._fusable(
        torch.randn(2, tiny_model().config.dim), (), {}) is None
    assert_same(loss_and_grads(dora), loss_and_grads(dora_ref))


def test_adapter_files_are_peft_s(tiny_model, hf_twin, tmp_path):
    """What the fused layer's model saves loads into transformers + PEFT with the same logits."""
    from peft import PeftModel

    ours = adapted(tiny_model, True).eval()
    ours.save_pretrained(tmp_path)
    theirs = PeftModel.from_pretrained(hf_twin(tiny_model()), tmp_path).eval()
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids), theirs(input_ids=ids).logits)


def test_adapters_loaded_back_use_the_fused_layer(tiny_model, tmp_path):
    from finetune.build import load_adapter

    ours = adapted(tiny_model, True).eval()
    ours.save_pretrained(tmp_path)
    loaded = load_adapter(tiny_model(), str(tmp_path)).eval()
    assert sum(isinstance(m, LoraLinear) for m in loaded.modules()) == 2 * len(TARGETS)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids), ours(input_ids=ids))
