"""Prompting a model: prompt rows to token ids, completions in batches, and the chat loop (streamed answers).

Prompts go through the model's template exactly as training rendered them, so a fine-tuned model sees the format it
learned. The `generate` and `chat` commands (finetune.commands) call these.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator

from llama_core.generate import generate, stream_generate

from .errors import UserError
from .inputs import parse_json, read_stdin_text, read_text
from .templates import Template, tokenize


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


PROMPTS_LIMIT = 256 << 20  # a prompts file is read whole; far more prompts than one run generates for


def read_prompts(path: str) -> list[tuple[dict, str]]:
    """(row, "file:line") of a JSONL prompts file (a regular file, or standard input for "-"); bounded in size and
    nesting, every problem naming its line."""
    try:
        text = read_stdin_text("prompts", PROMPTS_LIMIT) if path == "-" else read_text(path, "prompts",
                                                                                        PROMPTS_LIMIT)
    except UserError as e:
        raise UserError(f"--file {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = parse_json(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON: {e.msg}") from None
            except ValueError as e:
                raise UserError(f"{path}:{n}: malformed JSON: {e}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object")
            rows.append((row, f"{path}:{n}"))
    if not rows:
        raise UserError(f"--file {path}: no prompts")
    return rows


class TextStream:
    """Decode generated tokens incrementally: `push` returns the new text, holding back incomplete characters.

    Each push decodes only a window that starts at the last token released before the previous push (a token's
    text can depend on its neighbour: the leading space of "▁world", the bytes of one character), so an answer of
    n tokens costs O(n) decoding, not O(n^2). The window only moves past text that was released whole.
    """

    def __init__(self, tokenizer, strip_leading: bool = True):
        self.tokenizer, self.tokens, self.strip = tokenizer, [], strip_leading
        self.prefix = self.read = 0  # window start; tokens before `read` have had their text released
        self.started = not strip_leading  # released something other than leading whitespace

    def text(self) -> str:
        """The whole text so far (decoded from all the tokens)."""
        text = self.tokenizer.decode(self.tokens, continuation=True)
        return text.lstrip() if self.strip else text

    def push(self, tokens: list[int], final: bool = False) -> str:
        self.tokens += tokens
        released = self.tokenizer.decode(self.tokens[self.prefix:self.read], continuation=True)
        text = self.tokenizer.decode(self.tokens[self.prefix:], continuation=True)
        if len(text) <= len(released) or (not final and text.endswith("\ufffd")):
            return ""  # nothing new, or a multi-byte character still missing bytes
        new = text[len(released):]
        self.prefix, self.read = self.read, len(self.tokens)
        if not self.started:
            new = new.lstrip()
            self.started = bool(new)
        return new


def write_completions(model, tokenizer, template: Template | None, rows: list[tuple[dict, str]],
                      prompts: list[list[int]], out, *, batch_size: int, settings: dict, stop: list[str] | None) -> None:
    """One JSON line per prompt row: the row, its completion, tokens and finish_reason, generated in batches."""
    common = dict(eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id, stop=stop or None, tokenizer=tokenizer)
    for start in range(0, len(prompts), batch_size):
        batch, reasons = prompts[start:start + batch_size], []
        results = generate(model, batch, **settings, **common, finish_reasons=reasons)
        for (row, _), tokens, reason in zip(rows[start:start + batch_size], results, reasons):
            text = tokenizer.decode(tokens, continuation=True)
            record = {**row, "completion": text.strip() if template is not None else text, "tokens": tokens,
                      "finish_reason": reason}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()


def stop_strings(template: Template) -> list[str]:
    """The start of the next user turn: a model that does not emit EOS would go on to write the user's part."""
    start = (template.separator + template.user.partition("{content}")[0]).strip()
    return [start] if start else []


def fit_conversation(template: Template, tokenizer, messages: list[dict], room: int) -> tuple[list[int], list[dict]]:
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
    stop = stop_strings(template)
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
        ids, kept = fit_conversation(template, tokenizer, messages + [{"role": "user", "content": text}], limit - min(max_new, 64))
        if len(kept) < len(messages) + 1:
            print(f"(context full: dropped the {len(messages) + 1 - len(kept)} oldest messages)", file=out)
        if len(ids) >= limit:
            print(f"(this message is too long: {len(ids)} tokens, the context is {limit})", file=out, flush=True)
            messages = kept[:-1]
            continue
        stream = TextStream(tokenizer)
        print("assistant> ", end="", file=out, flush=True)
        for step in stream_generate(model, [ids], **settings, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
                                    stop=stop, tokenizer=tokenizer):
            print(stream.push(step[0]), end="", file=out, flush=True)
        print(stream.push([], final=True), file=out, flush=True)
        messages = kept + [{"role": "assistant", "content": stream.text().strip()}]
    return messages
