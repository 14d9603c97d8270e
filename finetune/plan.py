"""Parameters and per-GPU memory of a recipe under its ZeRO stage and offload, before renting GPUs (`finetune plan`),
and the check that a one-device run fits this machine (`check_memory`: `finetune validate` and training start).

Model states follow DeepSpeed's own accounting (its `estimate_zero{2,3}_model_states_mem_needs`), split into
weights, gradients and optimizer state; activations are our estimate for this model (per layer and token, in the
compute dtype: the block inputs when checkpointing, else about 18*dim + 4*hidden values), plus one chunk of loss
logits (the full logits never exist). Parameters are counted from the config's shapes, never by building a model:
a config of a million layers is counted in microseconds.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from llama_core.config import get_config
from llama_core.weights import load_config

from . import hub
from .errors import UserError
from .recipe import Recipe

GiB = 1024 ** 3


def count_parameters(config) -> tuple[int, int]:
    """Total parameters and the largest single module's own parameters, from the config's shapes (the tied head
    counted once, as `Transformer.num_parameters` does)."""
    c = config
    q_out, kv_out = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    modules = [c.vocab_size * c.dim,  # the embedding; the head is the same size
               c.dim * q_out, c.dim * kv_out, q_out * c.dim, c.dim * c.hidden_dim, c.dim]  # q, k and v, o, mlp, norm
    per_layer = c.dim * q_out + 2 * c.dim * kv_out + q_out * c.dim + 3 * c.dim * c.hidden_dim + 2 * c.dim
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.dim
    return c.vocab_size * c.dim + c.n_layers * per_layer + c.dim + head, max(modules)


def memory_plan(recipe: Recipe, config, nproc: int, nodes: int = 1) -> dict:
    """Bytes per GPU (and per node of CPU memory for offload) for one rank of `nproc * nodes`."""
    total, largest = count_parameters(config)
    d, t = recipe.distributed, recipe.training
    gpus = nproc * nodes
    stage = d.zero_stage if d.backend == "deepspeed" else 0
    if t.method == "lora":  # the frozen base in its dtype; adapter states are negligible next to it
        base = 4 * total if t.precision == "fp32" else 2 * total
        if t.quantize == "4bit":  # NF4 linear layers (~0.56 bytes with the block scales); embeddings and head 16-bit
            outer = 2 * config.vocab_size * config.dim
            base = 0.5625 * (total - outer) + 2 * outer
        weights, grads, optim = base / (gpus if stage == 3 else 1), 0.0, 0.0
        cpu = 0.0
    elif stage == 3:
        largest_layer = 4 * largest  # one gathered module at a time (DeepSpeed: 4 bytes per parameter)
        if d.offload_params:
            weights, grads, optim = largest_layer, 0.0, 0.0
            cpu = total * 18 / nodes * 1.5
        elif d.offload_optimizer:
            weights, grads, optim = largest_layer + 2 * total / gpus, 0.0, 0.0
            cpu = total * 16 / nodes * 1.5
        else:
            weights, grads, optim = largest_layer + 2 * total / gpus, 4 * total / gpus, 12 * total / gpus
            cpu = largest * 4 * nproc * 1.5
    elif stage == 2:
        if d.offload_optimizer:
            weights, grads, optim = 2 * total, 0.0, 0.0
            cpu = total * max(4 * gpus, 16) * 1.5
        else:  # 16-bit weights whole; 16- and 32-bit gradients, fp32 master and Adam moments partitioned
            weights, grads, optim = 2 * total, 6 * total / gpus, 12 * total / gpus
            cpu = total * 4 * nproc * 1.5
    else:  # one device, no ZeRO: fp32 master weights, gradients and Adam moments
        weights, grads, optim, cpu = 4 * total, 4 * total, 8 * total, 0.0
    compute_bytes = 4 if t.precision == "fp32" else 2
    tokens = t.micro_batch_size * recipe.data.max_seq_len
    # Saved per token and block: with the fused ops (llama_core.kernels) the block input and midpoint, the two
    # normalized inputs of the linear layers, q, k, v, the attention output, and SwiGLU's gate and up; the plain
    # composition keeps about 18 x dim + 4 x hidden (norm intermediates, rotary temporaries, silu, the product).
    if t.kernels == "reference" or t.compile:
        block = 18 * config.dim + 4 * config.hidden_dim
    else:
        block = 8 * config.dim + 2 * config.hidden_dim
    if t.activation_checkpointing:  # each block's input is kept; one block is recomputed at a time
        activations = tokens * compute_bytes * (config.n_layers * config.dim + block)
    else:
        activations = tokens * compute_bytes * config.n_layers * block
    activations += min(tokens, 512) * config.vocab_size * 4 * 2  # one loss chunk: logits (turned into their gradient)
    return {"parameters": total, "largest_layer_parameters": largest, "gpus": gpus, "zero_stage": stage,
            "weights": weights, "gradients": grads, "optimizer": optim, "activations": activations,
            "per_gpu": weights + grads + optim + activations, "cpu_per_node": cpu}


def architecture(recipe: Recipe, preset: str | None = None):
    """The model's shape: --preset, else the recipe's preset, else the checkpoint's config (read, not loaded)."""
    try:
        if preset or recipe.model.preset:
            return get_config(preset or recipe.model.preset, **recipe.model.config)
        if hub.is_hub_id(recipe.model.checkpoint):  # its config.json, from the Hub (or its cache)
            try:
                folder = hub.resolve_model(recipe.model.checkpoint, "model.checkpoint", configs_only=True)
            except UserError as e:
                raise UserError(f"{e}; or give --preset (for example --preset llama-7b) to plan with a preset's "
                                f"shape") from None
            return load_config(folder)
        if os.path.isdir(recipe.model.checkpoint):
            return load_config(recipe.model.checkpoint)
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    raise UserError(f"model.checkpoint {recipe.model.checkpoint!r} is not here; give --preset (for example "
                    f"--preset llama-7b) to plan with a preset's shape")


# --- does a one-device run fit this machine? -------------------------------------------------------------------

SKIP_ENV = "FINETUNE_SKIP_MEMORY_CHECK"  # set to 1 to start anyway (an estimate can be wrong; swap exists)
WARN_FRACTION = 0.9  # warn when the estimate exceeds this fraction of the memory free now


def machine_memory(device: torch.device) -> tuple[int, int]:
    """(total, available now) bytes of the device's memory: the GPU's, or the machine's RAM on CPU
    (MemAvailable from /proc/meminfo where there is one, else the free pages)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            available = total
    return total, available


def one_device_need(recipe: Recipe, config, precision: str) -> dict:
    """`memory_plan` of a one-device run in its resolved precision (fp32, bf16 or fp16)."""
    resolved = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, precision=precision))
    return memory_plan(resolved, config, 1)


def check_memory(recipe: Recipe, config, device: torch.device, precision: str, *,
                 memory: tuple[int, int] | None = None) -> str | None:
    """Refuse (UserError) a one-device run whose estimated memory (weights, gradients, optimizer state,
    activations) exceeds the device's total memory, saying by how much and what to lower; return a warning when
    it exceeds what is free now; None when it fits. Set FINETUNE_SKIP_MEMORY_CHECK=1 to start anyway."""
    if recipe.distributed.backend != "none":  # per-rank shares: `finetune plan --nproc N`
        return None
    need = one_device_need(recipe, config, precision)
    total, available = memory or machine_memory(device)
    where = "GPU memory" if device.type == "cuda" else "RAM"
    parts = ", ".join(f"{name} {need[key] / GiB:.1f}" for name, key in (
        ("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
        ("activations", "activations")) if need[key])
    summary = (f"the model ({need['parameters'] / 1e9:.2f}B parameters, {recipe.training.method}, {precision}) "
               f"needs about {need['per_gpu'] / GiB:.1f} GiB ({parts} GiB)")
    if need["per_gpu"] > total and os.environ.get(SKIP_ENV) != "1":
        lower = ("use training.method: lora" if recipe.training.method == "full" else
                 "use a smaller model" + (" or training.quantize: 4bit" if device.type == "cuda" else ""))
        raise UserError(f"{summary}, more than this machine's {total / GiB:.1f} GiB of {where} (by "
                        f"{(need['per_gpu'] - total) / GiB:.1f} GiB): {lower}, lower training.micro_batch_size or "
                        f"data.max_seq_len, set training.activation_checkpointing: true, or run on more memory "
                        f"(DeepSpeed: `finetune plan`). To start anyway, set {SKIP_ENV}=1")
    if need["per_gpu"] > WARN_FRACTION * available:
        return (f"warning: {summary}; {available / GiB:.1f} GiB of {total / GiB:.1f} GiB {where} is free now: the "
                f"run may fail or swap")
    return None


def check_weights_fit(config, dtype: torch.dtype, device: torch.device | str, where: str) -> None:
    """Refuse (UserError) to load a model whose weights alone exceed the device's total memory, before any
    allocation (an allocation that fails half-way is a crash, or the machine's out-of-memory killer)."""
    device = torch.device(device)
    need = count_parameters(config)[0] * torch.empty((), dtype=dtype).element_size()
    total, _ = machine_memory(device)
    if need > total and os.environ.get(SKIP_ENV) != "1":
        kind = "GPU memory" if device.type == "cuda" else "RAM"
        raise UserError(f"{where}: the model's weights need {need / GiB:.1f} GiB in {str(dtype).removeprefix('torch.')}"
                        f", more than this machine's {total / GiB:.1f} GiB of {kind}; use --dtype bfloat16 or a "
                        f"machine with more memory (to try anyway, set {SKIP_ENV}=1)")


def check_recipe_memory(recipe: Recipe, tokenizer=None, device: torch.device | None = None) -> str | None:
    """`check_memory` for a recipe on this machine's device (a CUDA GPU if there is one, else CPU), with the model's
    shape from its preset or checkpoint config (read, not loaded); None under DeepSpeed (`finetune plan`)."""
    if recipe.distributed.backend != "none":
        return None
    from .build import load_tokenizer, model_config, pick_device
    from .precision import resolve_precision, step_shape

    device = device or pick_device()
    config = model_config(recipe, tokenizer or load_tokenizer(recipe))
    precision = resolve_precision(recipe.training.precision, device.type,
                                  deepspeed=recipe.distributed.backend == "deepspeed", shape=step_shape(recipe, config))
    return check_memory(recipe, config, device, precision.name)
