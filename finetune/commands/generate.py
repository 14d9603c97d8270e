"""`finetune generate --model DIR (--prompt TEXT | --file prompts.jsonl) [--output FILE]`: completions."""
from __future__ import annotations

import os
import sys

from llama_core.files import atomic_write

from ..errors import UserError, WriteError
from ..outputs import check_output_file
from .common import add_model_args, add_sampling_args, load_model, parser, sampling_settings


def main(argv: list[str]) -> int:
    p = parser("finetune generate", "Generate completions for prompts with a (fine-tuned) model.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", help="one prompt (the user message; with --raw, text to continue)")
    p.add_argument("--file", help='JSONL prompts: {"prompt"}, {"instruction", "input"} or {"messages"} lines '
                                  '("-": standard input)')
    p.add_argument("--output", help="JSONL output file (default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--raw", action="store_true", help="no template: continue the prompt text")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    from llama_core.generate import stream_generate

    from ..chat import TextStream, prompt_tokens, read_prompts, write_completions

    if (args.prompt is None) == (args.file is None):
        raise UserError("give exactly one of --prompt TEXT and --file prompts.jsonl")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.output:  # found now, not after generating
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            raise UserError(f"--output {args.output}: its folder does not exist")
        check_output_file(args.output, "--output", args.overwrite, reads=(args.model, args.adapter))
    elif sys.stdout is None or sys.stdout.closed:
        raise UserError("standard output is closed; give --output FILE")
    model, tokenizer, template = load_model(args)
    template = None if args.raw else template
    settings = sampling_settings(args)
    rows = [({"prompt": args.prompt}, "--prompt")] if args.prompt is not None else read_prompts(args.file)
    prompts = [prompt_tokens(row, template, tokenizer, where) for row, where in rows]
    if too_long := [where for p, (_, where) in zip(prompts, rows) if len(p) >= model.config.max_seq_len]:
        raise UserError(f"prompt(s) of {model.config.max_seq_len}+ tokens, the model's context: {', '.join(too_long)}")
    if args.prompt is not None and args.output is None:  # one prompt to the terminal: stream it
        stream = TextStream(tokenizer, strip_leading=template is not None)
        for step in stream_generate(model, prompts, **settings, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                                    stop=args.stop or None, tokenizer=tokenizer):
            print(stream.push(step[0]), end="", flush=True)
        print(stream.push([], final=True))
        return 0
    write = dict(batch_size=args.batch_size, settings=settings, stop=args.stop)
    if args.output is None:
        write_completions(model, tokenizer, template, rows, prompts, sys.stdout, **write)
        return 0
    try:
        with atomic_write(args.output) as out:  # an interrupted run leaves no half file
            write_completions(model, tokenizer, template, rows, prompts, out, **write)
    except OSError as e:
        raise WriteError(f"could not write --output {args.output} ({e.strerror or e}); disk full? Nothing was "
                         f"written there") from None
    print(f"wrote {len(prompts)} completions to {args.output}", file=sys.stderr)
    return 0
