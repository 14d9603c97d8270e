"""`finetune chat --model DIR`: an interactive, streamed conversation in the model's template."""
from __future__ import annotations

import sys

from ..errors import UserError
from .common import add_model_args, add_sampling_args, load_model, parser, sampling_settings


def main(argv: list[str]) -> int:
    p = parser("finetune chat", "Chat with a model in its template; /reset starts over, /exit quits.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system message")
    args = p.parse_args(argv)
    from ..chat import chat_turns

    if sys.stdin is None or sys.stdin.closed:  # found now, not after loading the model
        raise UserError("standard input is closed: chat reads your messages from it (for prompts in a file, use "
                        "finetune generate --file)")
    if sys.stdout is None or sys.stdout.closed:
        raise UserError("standard output is closed: chat writes its answers there")

    model, tokenizer, template = load_model(args)
    if args.system is not None and template.system is None:
        raise UserError(f"template {template.name!r} has no system prompt; drop --system or pick another template")
    settings = sampling_settings(args)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach the loop (which skips the line) as surrogates
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} (template {template.name}); /reset clears, /exit quits", flush=True)
    chat_turns(iter(sys.stdin.readline, ""), model, tokenizer, template, settings, system=args.system,
               show_prompt=interactive)
    return 0
