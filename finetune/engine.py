"""What the training loop needs from the hardware: the `Engine` contract, and `LocalEngine` for one device.

`finetune.deepspeed_engine.DeepSpeedEngine` implements the same contract on DeepSpeed ZeRO-2/3, so the loop in
`finetune.train` is one loop for both; `finetune.evaluate` uses the evaluation half of it (a LocalEngine without an
optimizer evaluates a model on its own).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file

from llama_core.files import AtomicFolder, OutputError
from llama_core.model import Transformer
from llama_core.weights import save_hf

from .errors import UserError, load_error_text
from .heap import release_after_blocks, release_free_memory
from .precision import Precision, autocast_context
from .run_state import is_model_folder


@runtime_checkable
class Engine(Protocol):
    """A model being trained: forward/backward/step, its state on disk, the final model, collectives.

    `module` is what trains (the PeftModel for LoRA, else the model), `core` our Transformer inside it.
    `num_parameters` counts the base model's parameters (not the adapter's)."""

    module: torch.nn.Module
    core: Transformer
    device: torch.device
    precision: Precision
    rank: int
    world_size: int
    is_main: bool
    num_parameters: int

    def trainable(self) -> dict[str, torch.nn.Parameter]: ...

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of a micro-batch (labels included), on the device."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def step(self) -> float:
        """Clip, update, clear the gradients; returns the gradient norm before clipping."""

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss with training.nan_policy: skip)."""

    def save(self, path: str) -> None:
        """Write the training state (trained weights, optimizer) into the folder `path` (every rank calls it)."""

    def load(self, path: str) -> None: ...

    def save_final(self, final: str, companions: dict, base_dir: str | None) -> None:
        """Write the final model to `final` (full: an HF checkpoint; LoRA: a PEFT adapter) with `companions`
        (model_files.companion_files); a LoRA run on a preset also writes its untrained base to `base_dir`."""

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor: ...

    def barrier(self) -> None: ...


def _read(file: str, read):
    """read(file); a damaged or unreadable file is a UserError naming it."""
    try:
        return read(file)
    except Exception as e:  # noqa: BLE001 - SafetensorError, UnpicklingError, EOFError, RuntimeError, OSError ...
        raise UserError(f"{file}: damaged ({load_error_text(e)})") from None


def base_parameter_count(core: torch.nn.Module) -> int:
    """Parameters of the base model (adapter weights excluded); a ZeRO-3 parameter counts its full size."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in core.named_parameters()
               if base_weight_name(n) is not None)


def base_weight_name(name: str) -> str | None:
    """The plain name of a base weight inside PEFT's wrappers (a LoRA layer's base_layer, trainable tokens'
    token_adapter.base_layer), or None for an adapter's own weight."""
    if "lora_" in name or "trainable_tokens" in name:
        return None
    return name.replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")


def base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a preset's untrained base inside a PEFT-wrapped core, under their plain names."""
    return {plain: p for n, p in module.state_dict().items() if (plain := base_weight_name(n)) is not None}


def write_adapter(final: str, save, companions: dict) -> None:
    """A PEFT adapter folder, written by `save(tmp)` (PeftModel.save_pretrained), with its companion files, put in
    place atomically (replacing only an earlier model folder)."""
    try:
        folder = AtomicFolder(final, replaceable=is_model_folder, what="a model folder")
    except OutputError as e:
        raise UserError(str(e)) from None
    with folder as tmp:
        save(tmp)
        for name, source in companions.items():
            (tmp / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())


class LocalEngine:
    """One device (CPU or one GPU). Without an optimizer it only evaluates (`loss_sum`)."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, module: torch.nn.Module, core: Transformer, optimizer: torch.optim.Optimizer | None = None,
                 precision: Precision | None = None, device: torch.device | None = None, *,
                 grad_clip: float | None = None, release_memory: bool = False, num_parameters: int | None = None):
        self.module, self.core, self.optimizer = module, core, optimizer  # module: the PeftModel or the core
        self.precision = precision or Precision("fp32", torch.float32, None)
        self.device = device or next(core.parameters()).device
        self.grad_clip = grad_clip
        self.num_parameters = base_parameter_count(core) if num_parameters is None else num_parameters
        # fp16 needs loss scaling to keep small gradients representable; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.name == "fp16" else None
        self.release_memory = release_memory and self.device.type == "cpu"
        if self.release_memory:  # after each block's forward and backward pass, what it freed
            release_after_blocks(core.model.layers)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.core.named_parameters() if p.requires_grad}

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast_context(self.precision, self.device):
            return self.core(**batch, reduction="sum")  # the core holds the LoRA layers, if any

    def backward(self, loss: torch.Tensor) -> None:
        if self.release_memory:
            release_free_memory()  # the forward pass's temporaries, before the backward pass takes pages anew
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> float:
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

    # --- state on disk ---

    def save(self, path: str) -> None:
        """Trained weights (the adapter for LoRA) and the optimizer and loss-scaler state."""
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.trainable().items()}
        save_file(tensors, os.path.join(path, "trainable.safetensors"), metadata={"format": "pt"})
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, os.path.join(path, "optimizer.pt"))

    def load(self, path: str) -> None:
        tensors = _read(os.path.join(path, "trainable.safetensors"), load_file)
        params = self.trainable()
        if set(tensors) != set(params):
            raise UserError(f"{path}: the checkpoint's trained tensors do not match this run's "
                            f"(missing {sorted(set(params) - set(tensors))[:5]}, "
                            f"unexpected {sorted(set(tensors) - set(params))[:5]})")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        state = _read(os.path.join(path, "optimizer.pt"),
                      lambda file: torch.load(file, map_location=self.device, weights_only=True))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def save_final(self, final: str, companions: dict, base_dir: str | None) -> None:
        if self.module is self.core:  # full fine-tuning: a Hugging Face checkpoint
            save_hf(self.core, self.core.config, final, extra_files=companions)
            return
        if base_dir is not None and not os.path.isfile(os.path.join(base_dir, "config.json")):
            tokenizer = {k: v for k, v in companions.items() if k.startswith("tokenizer")}
            save_hf(base_state(self.core), self.core.config, base_dir, extra_files=tokenizer)
        # adapter_config.json + adapter_model.safetensors (the embeddings are never adapted)
        write_adapter(final, lambda tmp: self.module.save_pretrained(tmp, save_embedding_layers=False), companions)

    # --- collectives (trivial on one process) ---

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass
