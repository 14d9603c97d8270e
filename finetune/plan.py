"""`finetune plan`: parameters and per-GPU memory of a recipe under its ZeRO stage and offload, before renting GPUs.

Model states follow DeepSpeed's own accounting (its `estimate_zero{2,3}_model_states_mem_needs`), split into
weights, gradients and optimizer state; activations are our estimate for this model (per layer and token, in the
compute dtype: the block inputs when checkpointing, else about 18*dim + 4*hidden values), plus one chunk of loss
logits (the full logits never exist).
"""
from __future__ import annotations

import os

import torch

from llama_core.checkpoint import parse_size
from llama_core.model import Transformer

from .errors import UserError
from .recipe import Recipe, load_recipe

GiB = 1024 ** 3


def count_parameters(config) -> tuple[int, int]:
    """Total parameters and the largest single module's own parameters, counted on the meta device."""
    with torch.device("meta"):
        model = Transformer(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


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


def main(argv: list[str]) -> int:
    from .cli import parser

    p = parser("finetune plan", "Estimate parameters and per-GPU memory for a recipe.")
    p.add_argument("--recipe", required=True)
    p.add_argument("--nproc", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB or 24GiB")
    p.add_argument("--preset", help="plan with this preset's shape (when the recipe's checkpoint is not here yet)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    if args.nproc < 1 or args.nodes < 1:
        raise UserError(f"finetune plan: --nproc and --nodes must be >= 1, got {args.nproc} and {args.nodes}")
    try:
        budget = parse_size(args.gpu_mem)
    except ValueError as e:
        raise UserError(f"finetune plan: --gpu-mem: {e}") from None
    recipe = load_recipe(args.recipe, args.overrides, check_paths=False)
    config = _architecture(recipe, args.preset)
    plan = memory_plan(recipe, config, args.nproc, args.nodes)
    rows = [("weights", plan["weights"]), ("gradients", plan["gradients"]), ("optimizer state", plan["optimizer"]),
            ("activations (estimate)", plan["activations"]), ("total per GPU", plan["per_gpu"])]
    print(f"{recipe.source}: {plan['parameters'] / 1e9:.2f}B parameters, {recipe.training.method} fine-tuning, "
          f"ZeRO stage {plan['zero_stage'] or 'none'} on {plan['gpus']} GPU(s)"
          + (", optimizer offload" if recipe.distributed.offload_optimizer else "")
          + (", parameter offload" if recipe.distributed.offload_params else ""))
    for name, value in rows:
        print(f"  {name:<24}{value / GiB:10.2f} GiB")
    if plan["cpu_per_node"]:
        print(f"  {'CPU memory per node':<24}{plan['cpu_per_node'] / GiB:10.2f} GiB")
    fits = plan["per_gpu"] <= budget
    print(f"{'fits' if fits else 'does NOT fit'} in {args.gpu_mem} ({budget / GiB:.1f} GiB) per GPU"
          + ("" if fits else ": add GPUs, enable activation checkpointing, lower micro_batch_size or max_seq_len, "
                             "or offload (distributed.offload_optimizer / offload_params)"))
    return 0 if fits else 1


def _architecture(recipe: Recipe, preset: str | None):
    """The model's shape: --preset, else the recipe's preset, else the checkpoint's config (read, not loaded)."""
    from llama_core.checkpoint import load_config
    from llama_core.config import get_config

    from .errors import UserError

    try:
        if preset or recipe.model.preset:
            return get_config(preset or recipe.model.preset, **recipe.model.config)
        if os.path.isdir(recipe.model.checkpoint):
            return load_config(recipe.model.checkpoint)
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    raise UserError(f"model.checkpoint {recipe.model.checkpoint!r} is not here; give --preset (for example "
                    f"--preset llama-7b) to plan with a preset's shape")
