"""`finetune validate --recipe R.yaml [key=value ...]`: check a recipe, report every problem, do nothing else."""
from __future__ import annotations

import sys

from .common import add_recipe_args, parser


def main(argv: list[str]) -> int:
    p = parser("finetune validate", "Check a recipe and report every problem.")
    add_recipe_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe")
    p.add_argument("--overwrite", action="store_true", help="as for training: output_dir may be any folder")
    args = p.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    from ..outputs import check_outputs
    from ..plan import check_recipe_memory
    from ..recipe import dump_recipe, load_recipe
    from ..train import check_launcher

    recipe = load_recipe(args.recipe, args.overrides + (["overwrite=true"] if args.overwrite else []))
    if args.print_config:
        print(dump_recipe(recipe), end="")
    check_launcher(recipe)  # what training checks before any work: how it was started, where it writes, and
    check_outputs(recipe)  # whether the model fits
    if warning := check_recipe_memory(recipe):
        print(warning, file=sys.stderr)
    print(f"{args.recipe}: ok")
    return 0
