"""`finetune plan --recipe R.yaml [--nproc 8] [--gpu-mem 80GB]`: does the run fit? Parameters and per-GPU memory."""
from __future__ import annotations

from ..errors import UserError
from .common import parser

GiB = 1024 ** 3


def main(argv: list[str]) -> int:
    p = parser("finetune plan", "Estimate parameters and per-GPU memory for a recipe.")
    p.add_argument("--recipe", required=True)
    p.add_argument("--nproc", type=int, default=1, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB or 24GiB")
    p.add_argument("--preset", help="plan with this preset's shape (when the recipe's checkpoint is not here yet)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    if args.nproc < 1 or args.nodes < 1:
        raise UserError(f"finetune plan: --nproc and --nodes must be >= 1, got {args.nproc} and {args.nodes}")
    from llama_core.weights import parse_size

    try:
        budget = parse_size(args.gpu_mem)
    except ValueError as e:
        raise UserError(f"finetune plan: --gpu-mem: {e}") from None
    from ..plan import architecture, memory_plan
    from ..recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, check_paths=False)
    config = architecture(recipe, args.preset)
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
