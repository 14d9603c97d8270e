"""`finetune generate` (prompts in, completions out) and `finetune chat` (an interactive, streamed conversation).

Prompts go through the model's template (its template.yaml, else alpaca) exactly as training rendered them, so a
fine-tuned model sees the format it learned; `--raw` continues plain text instead.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator

import torch

from llama_core.generate import generate, stream_generate

from .errors import UserError
from .merge import load_for_inference
from .templates import Template, load_template, tokenize


def _add_model_args(p) -> None:
    p.add_argument("--model", required=True, help="a checkpoint folder (HF or Meta), or a LoRA adapter folder")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply to --model")
    p.add_argument("--template", help="template name or YAML (default: the model's template.yaml, else alpaca)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(args):
    model, tokenizer, found = load_for_inference(args.model, args.adapter, dtype=args.dtype, device=_device())
    template = load_template(args.template) if args.template else found or load_template("alpaca")
    return model, tokenizer, template


def _settings(args) -> dict:
    if (args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf or args.top_k < 0
            or not 0 < args.top_p <= 1):
        raise UserError("need --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, generator=torch.Generator(_device()).manual_seed(args.seed))


def messages_of(row: dict, where: str) -> list[dict]:
    """A prompt row ({"prompt"}, {"instruction", "input"} or {"messages"}) as a conversation ending with a user turn."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        messages = [dict(m) for m in row["messages"]]
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # a training example: prompt for its last answer
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise UserError(f"{where}: every message needs a role and a string content")
        return messages
    if isinstance(row.get("instruction"), str):
        return [{"role": "user", "content": row["instruction"], "input": row.get("input") or ""}]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise UserError(f"{where}: a prompt line needs \"prompt\", \"instruction\" (+ \"input\") or \"messages\"")


def prompt_tokens(row: dict, template: Template | None, tokenizer, where: str) -> list[int]:
    """Token ids of one prompt: through the template, or (template None, --raw) BOS + the text."""
    try:  # JSON's "\ud800" escapes and undecodable command-line bytes are lone surrogates, which no tokenizer takes
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{where}: not valid Unicode text (a lone surrogate or undecodable bytes)") from None
    if template is None:
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{where}: --raw needs {{\"prompt\": TEXT}} lines")
        return tokenizer.encode(row["prompt"], bos=True)
    try:
        return tokenize(template.prompt(messages_of(row, where)), tokenizer)
    except (ValueError, KeyError) as e:
        raise UserError(f"{where}: {e}") from None


def _read_prompts(path: str) -> list[tuple[dict, str]]:
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise UserError(f"--file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object")
            rows.append((row, f"{path}:{n}"))
    if not rows:
        raise UserError(f"--file {path}: no prompts")
    return rows


class TextStream:
    """Decode generated tokens incrementally: `push` returns the new text, holding back incomplete characters."""

    def __init__(self, tokenizer, strip_leading: bool = True):
        self.tokenizer, self.tokens, self.shown, self.strip = tokenizer, [], "", strip_leading

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens, continuation=True)
        return text.lstrip() if self.strip else text

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.tokens += tokens
        text = self.text()
        if not final:
            text = text.rstrip("\ufffd")  # a multi-byte character still missing bytes
        new, self.shown = text[len(self.shown):], max(self.shown, text, key=len)
        return new


def run_generate(args) -> int:
    if (args.prompt is None) == (args.file is None):
        raise UserError("give exactly one of --prompt TEXT and --file prompts.jsonl")
    model, tokenizer, template = _load(args)
    template = None if args.raw else template
    settings = _settings(args)
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.output and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise UserError(f"--output {args.output}: its folder does not exist")
    common = dict(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, stop=args.stop or None, tokenizer=tokenizer)
    rows = [({"prompt": args.prompt}, "--prompt")] if args.prompt is not None else _read_prompts(args.file)
    prompts = [prompt_tokens(row, template, tokenizer, where) for row, where in rows]
    if too_long := [where for p, (_, where) in zip(prompts, rows) if len(p) >= model.config.max_seq_len]:
        raise UserError(f"prompt(s) of {model.config.max_seq_len}+ tokens, the model's context: {', '.join(too_long)}")
    if args.prompt is not None and args.output is None:  # one prompt to the terminal: stream it
        stream = TextStream(tokenizer, strip_leading=template is not None)
        for step in stream_generate(model, prompts, **settings, **common):
            print(stream.push(step[0]), end="", flush=True)
        print(stream.push([], final=True))
        return 0
    # A file is written next to its final name and renamed when complete: an interrupted run leaves no half file.
    out = open(args.output + ".tmp", "w", encoding="utf-8") if args.output else sys.stdout
    try:
        for start in range(0, len(prompts), args.batch_size):
            batch, reasons = prompts[start:start + args.batch_size], []
            results = generate(model, batch, **settings, **common, finish_reasons=reasons)
            for (row, _), tokens, reason in zip(rows[start:start + args.batch_size], results, reasons):
                text = tokenizer.decode(tokens, continuation=True)
                record = {**row, "completion": text.strip() if template is not None else text, "tokens": tokens,
                          "finish_reason": reason}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
        if out is not sys.stdout:
            out.close()
            os.replace(args.output + ".tmp", args.output)
    finally:
        if out is not sys.stdout:
            out.close()
            if os.path.exists(args.output + ".tmp"):
                os.remove(args.output + ".tmp")
    if args.output:
        print(f"wrote {len(prompts)} completions to {args.output}", file=sys.stderr)
    return 0


def _stop_strings(template: Template) -> list[str]:
    """The start of the next user turn: a model that does not emit EOS would go on to write the user's part."""
    start = (template.separator + template.user.partition("{content}")[0]).strip()
    return [start] if start else []


def _fit(template: Template, tokenizer, messages: list[dict], room: int) -> tuple[list[int], list[dict]]:
    """Prompt ids of the conversation, dropping the oldest exchanges until it leaves `room` tokens."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = tokenize(template.prompt(system + turns), tokenizer)
        if len(ids) <= room or len(turns) <= 1:
            return ids, system + turns
        turns = turns[2:]


def chat_turns(lines: Iterator[str], model, tokenizer, template: Template, settings: dict, *,
               system: str | None = None, out=None, show_prompt: bool = False) -> list[dict]:
    """The chat loop over input lines (/reset, /exit); streams each answer to `out`; returns the conversation."""
    out = out or sys.stdout
    base = [{"role": "system", "content": system}] if system is not None else []
    messages = list(base)
    limit, max_new = model.config.max_seq_len, settings["max_new_tokens"]
    stop = _stop_strings(template)
    while True:
        if show_prompt:
            print("you> ", end="", file=out, flush=True)
        line = next(lines, None)
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = list(base)
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not text.strip():
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            print("(this message is not valid UTF-8 text; skipped)", file=out, flush=True)
            continue
        ids, kept = _fit(template, tokenizer, messages + [{"role": "user", "content": text}], limit - min(max_new, 64))
        if len(kept) < len(messages) + 1:
            print(f"(context full: dropped the {len(messages) + 1 - len(kept)} oldest messages)", file=out)
        if len(ids) >= limit:
            print(f"(this message is too long: {len(ids)} tokens, the context is {limit})", file=out, flush=True)
            messages = kept[:-1]
            continue
        stream = TextStream(tokenizer)
        print("assistant> ", end="", file=out, flush=True)
        for step in stream_generate(model, [ids], **settings, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                    stop=stop, tokenizer=tokenizer):
            print(stream.push(step[0]), end="", file=out, flush=True)
        print(stream.push([], final=True), file=out, flush=True)
        messages = kept + [{"role": "assistant", "content": stream.text().strip()}]
    return messages


def run_chat(args) -> int:
    model, tokenizer, template = _load(args)
    if args.system is not None and template.system is None:
        raise UserError(f"template {template.name!r} has no system prompt; drop --system or pick another template")
    settings = _settings(args)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes reach the loop (which skips the line) as surrogates
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} (template {template.name}); /reset clears, /exit quits", flush=True)
    chat_turns(iter(sys.stdin.readline, ""), model, tokenizer, template, settings, system=args.system,
               show_prompt=interactive)
    return 0


def main(command: str, argv: list[str]) -> int:
    from .cli import parser

    if command == "generate":
        p = parser("finetune generate", "Generate completions for prompts with a (fine-tuned) model.")
        _add_model_args(p)
        p.add_argument("--prompt", help="one prompt (the user message; with --raw, text to continue)")
        p.add_argument("--file", help='JSONL prompts: {"prompt"}, {"instruction", "input"} or {"messages"} lines')
        p.add_argument("--output", help="JSONL output file (default: stdout)")
        p.add_argument("--raw", action="store_true", help="no template: continue the prompt text")
        p.add_argument("--stop", action="append", help="stop string (repeatable)")
        p.add_argument("--batch-size", type=int, default=8)
        return run_generate(p.parse_args(argv))
    p = parser("finetune chat", "Chat with a model in its template; /reset starts over, /exit quits.")
    _add_model_args(p)
    p.add_argument("--system", help="system message")
    return run_chat(p.parse_args(argv))
