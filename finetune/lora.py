"""PEFT's LoRA, with one cheaper forward pass for the common case.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three (tokens x out_features) temporaries per
layer in the forward pass (B's output, its scaled copy, the sum) and one more in the backward pass (the scaled
gradient), plus a full elementwise pass for each. `LoraLinear` adds the low-rank update into the base layer's
output in place with one `addmm_` (out += scaling * a @ B^T): the same sum, without those temporaries
(measurements: bench/RESULTS.md). With dropout in training, `a = dropout(x) @ A^T` is one autograd function
(`_DroppedProduct`) that keeps `x`, which the layer holds anyway, instead of PEFT's dropped-out copy and its float
mask: two (tokens x in_features) tensors per layer fewer until the backward pass. Everything else is PEFT's own
`lora.Linear`: parameters, names, adapter files, merging, DoRA and every other case, which fall back to PEFT's
forward. Registered through PEFT's custom-module dispatch for llama_core's Linear only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
        dropout = self.lora_dropout[name]
        if _saves_dropped_copy(dropout, x2, lora_A.weight):
            a = _DroppedProduct.apply(x2, lora_A.weight, dropout.p)  # (N, r), the same values and gradients
        else:
            a = lora_A(dropout(x2))  # (N, r)
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


def _saves_dropped_copy(dropout, x: torch.Tensor, a_weight: torch.Tensor) -> bool:
    """Whether autograd would keep `dropout(x)` (and its mask) for A's gradient: nn.Dropout at work while
    gradients are recorded, on CPU or CUDA (the two devices whose dropout `_DroppedProduct` reproduces)."""
    return (type(dropout) is torch.nn.Dropout and dropout.training and 0 < dropout.p < 1
            and torch.is_grad_enabled() and (x.requires_grad or a_weight.requires_grad)
            and x.device.type in ("cpu", "cuda"))


class _DroppedProduct(torch.autograd.Function):
    """`F.linear(F.dropout(x, p), weight)`, computed with exactly torch's ops (the same masks from the same global
    random generator, which advances exactly as much), saving only `x` and `weight`, not the dropped-out copy.

    CPU: torch's dropout is `empty_like(x).bernoulli_(1 - p).div_(1 - p)`, then `x * noise`. Nothing of the mask
    is kept: the backward pass draws it again from a private generator set to the global CPU generator's state
    before the forward pass drew it (bernoulli_ on the same state gives the same values, whatever the generator).
    CUDA: dropout is the fused `native_dropout`, which takes no generator and maps random numbers to elements
    depending on the input's address alignment, so it cannot be redrawn for certain: its bool mask (1 byte a value)
    is kept, as autograd would keep it too.
    `x` goes through ctx.save_for_backward, so saved-tensor hooks (llama_core's recompute_saved) still apply.
    """

    @staticmethod
    def forward(ctx, x, weight, p: float):
        ctx.p = p
        if x.is_cuda:
            dropped, mask = torch.native_dropout(x, p, True)
            ctx.save_for_backward(x, weight, mask)
        else:
            ctx.rng_state = torch.get_rng_state()  # before the draw: the backward pass draws from here again
            dropped = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p).mul_(x)  # bitwise x * noise
            ctx.save_for_backward(x, weight)
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad):
        # autograd's own formulas for mul / native_dropout then mm: grad_x = (grad @ A) * noise and
        # grad_A = grad^T @ dropped, with the same kernels, so the results are bitwise torch's.
        x, weight, *mask = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if x.is_cuda:
            scale = 1.0 / (1.0 - ctx.p)
            grad_x = torch.ops.aten.native_dropout_backward(grad.mm(weight), mask[0], scale) if need_x else None
            dropped = torch.ops.aten.native_dropout_backward(x, mask[0], scale) if need_w else None
        else:
            generator = torch.Generator()
            generator.set_state(ctx.rng_state)
            noise = torch.empty_like(x).bernoulli_(1 - ctx.p, generator=generator).div_(1 - ctx.p)
            grad_x = grad.mm(weight).mul_(noise) if need_x else None
            dropped = noise.mul_(x) if need_w else None  # reuses the mask's memory: it is not needed again
        grad_w = grad.t().mm(dropped) if need_w else None
        return grad_x, grad_w, None


def lora_config(**kwargs) -> LoraConfig:
    """peft.LoraConfig(**kwargs) whose LoRA layers on llama_core's Linear are `LoraLinear`."""
    return with_fused_layers(LoraConfig(**kwargs))


def with_fused_layers(config):
    """`config` (a PEFT config read from an adapter, say), registering `LoraLinear` if it is a LoRA config."""
    if isinstance(config, LoraConfig) and hasattr(config, "_register_custom_module"):  # PEFT >= 0.12; an
        config._register_custom_module({Linear: LoraLinear})  # experimental API: without it, PEFT's own layer
    return config
