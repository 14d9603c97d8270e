"""The `finetune` command.

    finetune --recipe R.yaml [key=value ...]        train (the default command)
    finetune validate --recipe R.yaml [key=value]   check a recipe, do nothing else
    finetune preprocess --recipe R.yaml --show 2    show how the data is templated, masked and packed
    finetune merge / export / eval / generate / chat / launch / plan   (see `finetune COMMAND --help`)

User errors (recipe, data, paths) print one message and exit with code 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError

COMMANDS = ("train", "validate", "preprocess", "merge", "export", "eval", "generate", "chat", "launch", "plan")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # noqa: BLE001 - a few known failure kinds get a message instead of a traceback
        from .train import TrainingStopped
        if isinstance(e, TrainingStopped):
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
        if _is_out_of_memory(e):
            print("error: out of memory. Lower training.micro_batch_size (raise gradient_accumulation_steps to "
                  "keep the batch), lower data.max_seq_len, set training.activation_checkpointing: true, use "
                  "training.method: lora, or offload with distributed.offload_optimizer / offload_params "
                  "(see `finetune plan`).", file=sys.stderr)
            return 1
        raise


def _is_out_of_memory(e: Exception) -> bool:
    import torch
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()[:200]


def _dispatch(argv: list[str]) -> int | None:
    if not argv or argv[0] not in COMMANDS:
        if argv and not argv[0].startswith("-"):
            raise UserError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} "
                            f"(training is `finetune --recipe R.yaml`)")
        argv = ["train", *argv]
    command, rest = argv[0], argv[1:]
    if command in ("train", "validate", "preprocess"):
        return _recipe_command(command, rest)
    if command in ("merge", "export"):
        from . import merge
        return merge.main(command, rest)
    if command == "eval":
        from . import evaluate
        return evaluate.main(rest)
    if command in ("generate", "chat"):
        from . import chat
        return chat.main(command, rest)
    from . import distributed
    return distributed.main(command, rest)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError (exit code 2, same message style)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, epilog=epilog)


def _recipe_command(command: str, argv: list[str]) -> int | None:
    p = parser(f"finetune {command}" if command != "train" else "finetune",
               {"train": "Fine-tune a LLaMA model as a recipe describes.",
                "validate": "Check a recipe and report every problem.",
                "preprocess": "Show how the recipe's data is templated, masked and packed."}[command],
               epilog="other commands: " + ", ".join(c for c in COMMANDS if c != "train") +
               " (finetune COMMAND --help)" if command == "train" else None)
    p.add_argument("--recipe", required=True, help="the YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe values, typed as in YAML: training.lr=2e-5 lora.r=16")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe")
    if command == "train":
        p.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in output_dir (the default, checkpoint.resume: auto)")
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if command == "preprocess":
        p.add_argument("--show", type=int, default=2, help="examples to print")
    args = p.parse_args(argv)
    from .recipe import dump_recipe, load_recipe

    overrides = list(args.overrides)
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=auto")
    recipe = load_recipe(args.recipe, overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
    if command == "validate":
        print(f"{args.recipe}: ok")
        return 0
    if command == "preprocess":
        from .data import preprocess_report
        print(preprocess_report(recipe, show=args.show))
        return 0
    if args.print_config:
        return 0
    if recipe.distributed.backend == "deepspeed":
        from .distributed import train_deepspeed
        train_deepspeed(recipe)
    else:
        from .train import train
        train(recipe)
    return 0
