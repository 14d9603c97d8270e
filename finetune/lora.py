"""PEFT's LoRA, with one cheaper forward pass for the common case.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three (tokens x out_features) temporaries per
layer in the forward pass (B's output, its scaled copy, the sum) and one more in the backward pass (the scaled
gradient), plus a full elementwise pass for each. `LoraLinear` adds the low-rank update into the base layer's
output in place with one `addmm_` (out += scaling * a @ B^T): the same sum, without those temporaries (a LoRA
step on the reference CPU config allocates ~1/3 fewer bytes; bench/RESULTS.md). Everything else is PEFT's own
`lora.Linear`: parameters, names, adapter files, merging, DoRA and every other case, which fall back to PEFT's
forward. Registered through PEFT's custom-module dispatch for llama_core's Linear only.
"""
from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear

from llama_core.model import Linear


class LoraLinear(PeftLoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): a 2-D output takes the in-place add without a view's copy
        out = self.base_layer(x2)  # (N, out), a fresh tensor the base layer's backward pass does not need
        a = lora_A(self.lora_dropout[name](x2))  # (N, r)
        out.addmm_(a, lora_B.weight.t(), alpha=self.scaling[name])  # out += scaling * a @ B^T
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fusable(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The active adapter's name when the fused sum computes exactly PEFT's forward, else None."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        variant = name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False)
        if name not in self.lora_A or variant or self.lora_B[name].bias is not None:
            return None  # DoRA and the other variants (older PEFT: use_dora), or a trained LoRA bias
        a_weight, b_weight = self.lora_A[name].weight, self.lora_B[name].weight
        if hasattr(b_weight, "ds_id") or torch.is_autocast_enabled(x.device.type):
            return None  # ZeRO-3 gathers B only when lora_B runs; autocast would mix dtypes in the in-place add
        if not (x.dtype == a_weight.dtype == b_weight.dtype == self.base_layer.weight.dtype):
            return None  # PEFT computes an fp32 adapter on a bf16 base in fp32, then casts
        return name


def lora_config(**kwargs) -> LoraConfig:
    """peft.LoraConfig(**kwargs) whose LoRA layers on llama_core's Linear are `LoraLinear`."""
    return with_fused_layers(LoraConfig(**kwargs))


def with_fused_layers(config):
    """`config` (a PEFT config read from an adapter, say), registering `LoraLinear` if it is a LoRA config."""
    if isinstance(config, LoraConfig) and hasattr(config, "_register_custom_module"):  # PEFT >= 0.12; an
        config._register_custom_module({Linear: LoraLinear})  # experimental API: without it, PEFT's own layer
    return config
