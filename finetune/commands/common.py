"""What several commands share: the argument parser, the model and sampling arguments, the device."""
from __future__ import annotations

import argparse
import math

import torch

from ..errors import UserError

DTYPES = ["float32", "bfloat16", "float16"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UserError (exit code 2, same message style)."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description, epilog=epilog)


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", required=True, help="the YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe values, typed as in YAML: training.lr=2e-5 lora.r=16")


def add_model_args(p: argparse.ArgumentParser, *, template: bool = True) -> None:
    """--model, --adapter, --dtype (and --template): a model to load for inference."""
    p.add_argument("--model", required=True, help="a checkpoint folder (HF or Meta), or a LoRA adapter folder")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply to --model")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    if template:
        p.add_argument("--template", help="template name or YAML (default: the model's template.yaml, else alpaca)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def sampling_settings(args) -> dict:
    """The keyword arguments of `generate`/`stream_generate` that the sampling arguments give."""
    if (args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf or args.top_k < 0
            or not 0 < args.top_p <= 1):
        raise UserError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, generator=torch.Generator(device()).manual_seed(args.seed))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args):
    """(model, tokenizer, template) for the model arguments: --template, else the model's own, else alpaca."""
    from ..inference import load_for_inference
    from ..templates import load_template

    model, tokenizer, found = load_for_inference(args.model, args.adapter, dtype=args.dtype, device=device())
    template = load_template(args.template) if getattr(args, "template", None) else found or load_template("alpaca")
    return model, tokenizer, template
