"""`finetune preprocess --recipe R.yaml --show 2`: prepare (or load from the cache) a recipe's data and show it."""
from __future__ import annotations

import os

from .common import add_recipe_args, parser


def main(argv: list[str]) -> int:
    p = parser("finetune preprocess", "Show how the recipe's data is templated, masked and packed.")
    add_recipe_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe")
    p.add_argument("--show", type=int, default=2, help="examples to print")
    args = p.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    from ..build import load_tokenizer
    from ..data import build_datasets, show_examples
    from ..recipe import dump_recipe, load_recipe
    from ..templates import load_template

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
    tokenizer = load_tokenizer(recipe)
    prepared = build_datasets(recipe.data, recipe.datasets, load_template(recipe.template), tokenizer)
    print(show_examples(prepared, tokenizer, args.show, color=os.isatty(1)))
    return 0
