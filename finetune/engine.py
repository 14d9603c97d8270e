"""What the training loop needs from the hardware: forward, backward, optimizer step, state, collectives.

`LocalEngine` trains on one device. `finetune.distributed.DeepSpeedEngine` has the same methods, so the loop in
`finetune.train` is the same for both.
"""
from __future__ import annotations

import ctypes
import os

try:
    import resource
except ImportError:  # not a Unix
    resource = None

import torch
from safetensors.torch import load_file, save_file

from llama_core.model import Transformer

from .build import Precision, autocast_context
from .errors import UserError


def release_free_memory(keep: int = 256 << 20, near_peak: int = 64 << 20) -> bool:
    """Return the C heap's free pages to the OS once more than `keep` bytes of resident memory are heap memory
    that nothing uses, and the process is within `near_peak` bytes of its peak RSS so far (glibc on Linux;
    elsewhere nothing). Returns whether it trimmed.

    On CPU, tensors of a few MB come from the C heap, and glibc keeps what is freed: torch's 64-byte-aligned
    allocations rarely fit the exact holes their predecessors leave, so without trimming peak RSS sits ~0.4 GB
    above the live peak. The CPU engine calls this after each block's forward and backward pass and after each step
    (recipe: training.release_memory). A trim takes ~30 ms, and trimmed pages fault back in when the heap hands
    them out again, which is why it trims only a surplus over `keep`, and only close to the peak, where a trim
    keeps the peak from rising: ~1-2 trims a step on the reference CPU config (bench/RESULTS.md)."""
    global _outside_heap
    if _malloc_trim is None:
        return False
    resident, in_use = _resident_bytes(), _heap_in_use()
    if resident is None or in_use is None:  # no way to measure: trim whenever glibc holds enough free memory
        if _free_heap_bytes is not None and _free_heap_bytes() <= keep:
            return False
        _malloc_trim(0)
        return True
    # What is resident besides the heap (code, Python's own arenas, mapped files) is the smallest difference seen:
    # right after a trim, the heap holds (almost) nothing unused.
    _outside_heap = min(_outside_heap, resident - in_use)
    if resident - in_use - _outside_heap <= keep:
        return False
    if resident + near_peak < _peak_resident():  # a trim here cannot lower the peak, and its pages would come back
        return False
    _malloc_trim(0)
    return True


def _peak_resident() -> int:
    if resource is None:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc():
    """malloc_trim, and functions giving the heap's free and used bytes (mallinfo2), where the C library has them."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None, None, None
    try:
        mallinfo2 = libc.mallinfo2
        mallinfo2.restype = _MallInfo2
    except AttributeError:
        return trim, None, lambda: None

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # allocated from the heap, and allocated as their own mappings

    return trim, lambda: mallinfo2().fordblks, in_use


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


_malloc_trim, _free_heap_bytes, _heap_in_use = _glibc()
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_outside_heap = float("inf")


def _release_after_block(module, inputs, output) -> None:
    if not torch.is_grad_enabled():  # evaluation and generation: little is freed, and it runs per token
        return
    release_free_memory()
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_release_and_pass)


def _release_and_pass(grad: torch.Tensor) -> None:
    release_free_memory()


class LocalEngine:
    rank, world_size, is_main = 0, 1, True

    def __init__(self, module: torch.nn.Module, core: Transformer, optimizer: torch.optim.Optimizer,
                 precision: Precision, device: torch.device, grad_clip: float | None, release_memory: bool = True):
        self.module, self.core, self.optimizer = module, core, optimizer  # module: the PeftModel or the core
        self.precision, self.device, self.grad_clip = precision, device, grad_clip
        # fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type) if precision.name == "fp16" else None
        self.release_memory = release_memory and device.type == "cpu"
        if self.release_memory:  # after each block's forward and backward pass, what it freed (release_free_memory)
            for block in core.model.layers:
                block.register_forward_hook(_release_after_block)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.core.named_parameters() if p.requires_grad}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast_context(self.precision, self.device):
            return self.core(**batch, reduction="sum")

    def backward(self, loss: torch.Tensor) -> None:
        if self.release_memory:
            release_free_memory()  # the forward pass's temporaries, before the backward pass takes pages anew
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
        """Clip, update, clear the gradients; returns the gradient norm before clipping."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or float("inf"))
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update if the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.release_memory:
            release_free_memory()
        return norm.item()

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # --- checkpoints ---

    def save(self, path: str) -> None:
        """Trained weights (the adapter for LoRA) and the optimizer and loss-scaler state."""
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.trainable().items()}
        save_file(tensors, os.path.join(path, "trainable.safetensors"), metadata={"format": "pt"})
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, os.path.join(path, "optimizer.pt"))

    def load(self, path: str) -> None:
        tensors = load_file(os.path.join(path, "trainable.safetensors"))
        params = self.trainable()
        if set(tensors) != set(params):
            raise UserError(f"{path}: the checkpoint's trained tensors do not match this run's "
                             f"(missing {sorted(set(params) - set(tensors))[:5]}, "
                             f"unexpected {sorted(set(tensors) - set(params))[:5]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        state = torch.load(os.path.join(path, "optimizer.pt"), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    # --- collectives (trivial on one process) ---

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass
