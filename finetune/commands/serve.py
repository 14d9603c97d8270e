"""`finetune serve --model DIR [--adapter A] [--template T] [--port 8000]`: an OpenAI-compatible HTTP server."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..errors import UserError
from .common import add_model_args, load_model, parser


def main(argv: list[str]) -> int:
    p = parser("finetune serve", "Serve a model behind the OpenAI API (/v1/chat/completions, /v1/completions, "
                                 "/v1/models) on this machine.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together at most")
    p.add_argument("--max-queue", type=int, default=64, help="waiting prompts at most; more get HTTP 429")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens when a request gives no max_tokens")
    p.add_argument("--name", help="the model id clients use (default: the --adapter or --model folder's name)")
    args = p.parse_args(argv)
    try:
        from .. import serve
    except ImportError as e:  # starlette / uvicorn missing
        raise UserError(f"finetune serve needs the 'serve' extra ({e.name} is missing): "
                        f"pip install 'llama-finetune[serve]'") from None
    if args.max_batch < 1 or args.max_queue < 0 or args.max_tokens < 1 or not 0 < args.port < 65536:
        raise UserError("need --max-batch >= 1, --max-queue >= 0, --max-tokens >= 1 and 0 < --port < 65536")
    try:  # found now, not after loading the model
        socket.create_server((args.host, args.port)).close()
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    from ..chat import stop_strings
    from ..templates import tokenize

    model, tokenizer, template = load_model(args)
    name = args.name or Path(args.adapter or args.model).resolve().name

    def prompt_ids(messages: list[dict]) -> list[int]:  # prompted exactly as the model was trained
        return tokenize(template.prompt(messages), tokenizer)

    app = serve.create_app(model, tokenizer, prompt_ids, model_name=name,
                           max_batch=args.max_batch, max_queue=args.max_queue, default_max_tokens=args.max_tokens,
                           stop_ids=[i for i in getattr(tokenizer, "stop_ids", ()) if i != tokenizer.eos_id],
                           chat_stop=stop_strings(template))
    print(f"serving {name} (template {template.name}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve.serve(app, host=args.host, port=args.port)
    return 0
