"""`finetune --recipe R.yaml [key=value ...]`: fine-tune as a recipe describes (one device or DeepSpeed)."""
from __future__ import annotations

import argparse

from .common import add_recipe_args, parser
from . import COMMANDS


def main(argv: list[str]) -> int:
    p = parser("finetune", "Fine-tune a LLaMA model as a recipe describes.",
               epilog="other commands: " + ", ".join(c for c in COMMANDS if c != "train") +
               " (finetune COMMAND --help)")
    add_recipe_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last checkpoint in output_dir (the default, checkpoint.resume: auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="output_dir may be an existing folder that is not a run folder: the run's files are written "
                        "beside the ones there, none of which is replaced or deleted (overwrite: true)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    from ..recipe import dump_recipe, load_recipe
    from ..train import train

    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else []) + \
        (["overwrite=true"] if args.overwrite else [])
    recipe = load_recipe(args.recipe, overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0
    train(recipe)
    return 0
