"""PEFT's LoRA, with one cheaper forward pass for the common case.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three (tokens x out_features) temporaries per
layer in the forward pass (B's output, its scaled copy, the sum) and one more in the backward pass (the scaled
gradient), plus a full elementwise pass for each. `LoraLinear` adds the low-rank update into the base layer's
output in place with one `addmm_` (out += scaling * a @ B^T): the same sum, without those temporaries
(measurements: bench/RESULTS.md). With dropout in training, `a = dropout(x) @ A^T` is one autograd function
(`_DroppedProduct`) that keeps `x`, which the layer holds anyway, and a bool mask instead of PEFT's dropped-out
copy and its float mask; on CPU its mask is drawn several times faster than torch's dropout draws one
(`dropout_mask`). Everything else is PEFT's own
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
            a = _DroppedProduct.apply(x2, lora_A.weight, dropout.p)  # (N, r): dropout(x) @ A^T, no copy kept
        else:
            a = lora_A(dropout(x2))  # (N, r)
        out.addmm_(a, lora_B.weight.t(), alpha=self.scaling[name])  # out += scaling * a @ B^T
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fusable(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The active adapter's name when the fused sum computes exactly PEFT's forward (with dropout: the same
        law, drawn by `dropout_mask`), else None."""
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


def dropout_mask(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """Dropout on CPU: a bool mask for `x` that keeps each value with probability 1 - p, and the scale of the kept
    values, 1 / (1 - p), with p rounded to a multiple of 2^-16 (the scale uses the rounded p, so the expectation of
    `x * mask * scale` is exactly x).

    torch's CPU dropout draws one random number per element on one thread (`bernoulli_`: slower than the layer's
    own product on the CPUs measured); this draws 64 random bits for every 4 elements and compares 16 of them with
    p (bench/RESULTS.md).
    Drawn from `generator` (the global CPU generator when None), which advances by ceil(numel / 4) 64-bit draws."""
    levels = min(round(p * 65536), 65535)  # dropped: the 16-bit values below levels - 32768
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None, generator=generator)  # all 64 bits
    return bits.view(torch.int16)[:n].view(x.shape) >= levels - 32768, 65536 / (65536 - levels)


class _DroppedProduct(torch.autograd.Function):
    """`F.linear(dropout(x, p), weight)`, saving `x`, `weight` and the mask (1 byte a value), not the dropped-out
    copy (4 bytes a value in fp32).

    CPU: the mask is `dropout_mask`'s, drawn from the global CPU generator, and the scale 1 / (1 - p) is applied to
    the (tokens x r) product rather than to the (tokens x in_features) input: `(x * keep) @ A^T * scale`.
    CUDA: torch's fused `native_dropout` and its mask.
    `x` goes through ctx.save_for_backward, so saved-tensor hooks (llama_core's recompute_saved) still apply.
    """

    @staticmethod
    def forward(ctx, x, weight, p: float):
        if x.is_cuda:
            dropped, keep = torch.native_dropout(x, p, True)
            ctx.scale = 1.0 / (1.0 - p)
            ctx.save_for_backward(x, weight, keep)
            return F.linear(dropped, weight)
        keep, ctx.scale = dropout_mask(x, p)
        keep = keep.view(torch.uint8)  # x * uint8 measured 1.8x faster than x * bool or torch.where on CPU
        ctx.save_for_backward(x, weight, keep)
        return F.linear(x * keep, weight).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        # autograd's formulas for (x * keep * scale) @ A^T: grad_x = (grad @ A) * keep * scale,
        # grad_A = grad^T @ (x * keep * scale); the scale goes on the small (tokens x r) gradient first
        x, weight, keep = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad = grad * ctx.scale
        grad_x = grad.mm(weight).mul_(keep) if need_x else None
        grad_w = grad.t().mm(x * keep) if need_w else None
        return grad_x, grad_w, None


def lora_config(**kwargs) -> LoraConfig:
    """peft.LoraConfig(**kwargs) whose LoRA layers on llama_core's Linear are `LoraLinear`."""
    return with_fused_layers(LoraConfig(**kwargs))


def with_fused_layers(config):
    """`config` (a PEFT config read from an adapter, say), registering `LoraLinear` if it is a LoRA config."""
    if isinstance(config, LoraConfig) and hasattr(config, "_register_custom_module"):  # PEFT >= 0.12; an
        config._register_custom_module({Linear: LoraLinear})  # experimental API: without it, PEFT's own layer
    return config
