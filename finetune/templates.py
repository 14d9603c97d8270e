"""Prompt templates: one object renders training examples and inference prompts, so the two cannot drift.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`; an Alpaca user turn
may also carry a non-empty `input`. `Template.render(messages)` turns it into `Segment`s (text + trained flag);
`Template.prompt(messages)` renders a conversation ending with a user turn and stops where the answer begins.
`tokenize(segments, tokenizer)` gives the token ids, so a prompt's ids are exactly a prefix of the training ids.
The training labels (which tokens are targets) follow from the segments: see `finetune.data`.

A template is a small definition (the built-ins below, or a YAML file with the same keys):

    system:         format of the system block, with {content}; null: system messages are refused
    default_system: the system message used when a conversation has none (null: none)
    system_in_first_user: prepend the system block to the first user message (LLaMA-2 chat) instead of the start
    user:           format of a user turn, with {content}
    user_with_input: format of a user turn with a non-empty Alpaca `input`, with {content} and {input}
                    (null: "{content}\\n\\n{input}" through `user`)
    assistant:      format of an assistant turn, with {content}; the text before {content} is an untrained header
                    (ending the prompt), the rest is the trained response. Spaces ending the header move into the
                    response: a SentencePiece prompt must not end with a space ("ASSISTANT:" + " Hi").
    separator:      untrained text between an assistant turn and the next user turn
    bos_each_turn:  every user turn after the first starts a new BOS sequence (LLaMA-2 chat: "</s><s>[INST]")
    eos:            end every assistant response with EOS, trained (false for few-shot formats like mmlu, and where
                    the turn ends with a control token of its own, as Llama 3's <|eot_id|>)
    special_tokens: the control tokens written in the template (<|name|>) must be single ids of the tokenizer
                    (an error otherwise); false: they are ids where the tokenizer has them, else text

Templates never contain <s> or </s> as text: BOS and EOS are token ids (`Segment.bos`, `Segment.eos`). Control
tokens written as `<|name|>` in a template (Llama 3's <|eot_id|>, ChatML's <|im_end|>) become their single ids where
the tokenizer has them; the same text inside a message stays text, so a user cannot end a turn by typing it.
The model's own Jinja chat template (`template: model`) is in `finetune.chat_templates`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .inputs import read_yaml_file

_FIELDS = re.compile(r"\{(content|input)\}")
_OPT = (str, type(None))
_KEYS = {"name": str, "description": str, "system": _OPT, "default_system": _OPT, "system_in_first_user": bool,
         "user": str, "user_with_input": _OPT, "assistant": str, "separator": str, "bos_each_turn": bool, "eos": bool,
         "special_tokens": bool}
_DEFAULTS = {"description": "", "system": None, "default_system": None, "system_in_first_user": False,
             "user_with_input": None, "separator": "", "bos_each_turn": False, "eos": True, "special_tokens": False}

_ALPACA = "Below is an instruction that describes a task{}. Write a response that appropriately completes the request."
BUILTINS: dict[str, dict] = {
    "alpaca": dict(
        description="Stanford Alpaca (train.py's PROMPT_DICT); the output follows '### Response:' directly",
        user=_ALPACA.format("") + "\n\n### Instruction:\n{content}\n\n### Response:",
        user_with_input=_ALPACA.format(", paired with an input that provides further context")
        + "\n\n### Instruction:\n{content}\n\n### Input:\n{input}\n\n### Response:",
        assistant="{content}", separator="\n\n"),
    "vicuna": dict(
        description="Vicuna v1.1 (FastChat vicuna_v1.1: sep ' ', sep2 '</s>')",
        system="{content} ", default_system="A chat between a curious user and an artificial intelligence "
        "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user="USER: {content} ", assistant="ASSISTANT: {content}"),
    "llama2-chat": dict(
        description="LLaMA-2 chat: [INST] <<SYS>> ... <</SYS>> ... [/INST] answer </s><s>[INST] ...",
        system="<<SYS>>\n{content}\n<</SYS>>\n\n", system_in_first_user=True,
        user="[INST] {content} [/INST]", assistant=" {content} ", bos_each_turn=True),
    "llama3": dict(
        description="Llama 3 Instruct (Meta's header/eot format); the answer ends with <|eot_id|>, trained; the "
                    "control tokens are single ids (the tokenizer must have them)",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
        eos=False, special_tokens=True),
    "chatml": dict(
        description="ChatML; <|im_start|> and <|im_end|> are single ids where the tokenizer has them (else text); "
                    "EOS follows each <|im_end|> of the assistant",
        system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>", separator="\n"),
    "plain": dict(
        description="completion: the prompt text, then the response text, nothing added",
        system="{content}\n", user="{content}", user_with_input="{content}\n{input}", assistant="{content}"),
    "mmlu": dict(
        description="MMLU / Flan few-shot: '{question}\\nA. ..\\nD. ..\\nAnswer:' then ' X'; no EOS between shots",
        system="{content}\n\n", user="{content}\nAnswer:", user_with_input="{content}\n{input}\nAnswer:",
        assistant=" {content}", separator="\n\n", eos=False),
}


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation. `bos`: a BOS id precedes it (and its text is encoded as the start of a
    sequence); `eos`: an EOS id follows it, trained iff the segment is. `data`: the character spans of `text` that
    hold a message's words: a special token's text there stays text (only the template's own text may put a control
    token such as <|eot_id|> in the ids)."""
    text: str
    trained: bool
    bos: bool = False
    eos: bool = False
    data: tuple[tuple[int, int], ...] = field(default=(), compare=False)


def format_choices(choices: list[str]) -> str:
    """MMLU answer options as 'A. ...\\nB. ...', the `input` of a user turn for the mmlu template."""
    return "\n".join(f"{'ABCDEFGH'[i]}. {c}" for i, c in enumerate(choices))


Text = tuple[str, tuple[tuple[int, int], ...]]  # text and the spans in it that are a message's words


def _data(text: str) -> Text:
    return text, ((0, len(text)),) if text else ()


def _fill(fmt: str, **values: Text) -> Text:
    """`fmt` with its {fields} replaced (in one pass: braces inside the values stay as they are), and where the
    values' message words ended up."""
    parts, spans, pos = [], [], 0
    for i, part in enumerate(_FIELDS.split(fmt)):
        text, inner = values[part] if i % 2 else (part, ())
        spans += [(pos + a, pos + b) for a, b in inner]
        parts.append(text)
        pos += len(text)
    return "".join(parts), tuple(spans)


def _join(texts) -> Text:
    parts, spans, pos = [], [], 0
    for text, inner in texts:
        spans += [(pos + a, pos + b) for a, b in inner]
        parts.append(text)
        pos += len(text)
    return "".join(parts), tuple(spans)


class Template:
    def __init__(self, definition: dict, source: str = "<template>", lines: dict | None = None):
        self.definition = _validate(definition, source, lines)
        for key, value in self.definition.items():
            setattr(self, key, value)
        header, _, response = self.assistant.partition("{content}")
        stripped = header.rstrip(" ")
        self.header, self.response = stripped, header[len(stripped):] + "{content}" + response

    @property
    def sha256(self) -> str:
        """Fingerprint of the definition (part of the tokenized-data cache key)."""
        rendering = {k: v for k, v in self.definition.items() if k not in ("name", "description")}
        return hashlib.sha256(json.dumps(rendering, sort_keys=True).encode()).hexdigest()

    def render(self, messages: list[dict]) -> list[Segment]:
        """Segments of a whole conversation; it must end with an assistant turn."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a conversation must end with an assistant turn")
        return self._segments(messages)

    def prompt(self, messages: list[dict]) -> list[Segment]:
        """Segments of a conversation ending with a user turn, up to where the assistant's answer begins."""
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a prompt must end with a user turn")
        return self._segments(messages)

    def _segments(self, messages: list[dict]) -> list[Segment]:
        system, turns = self._split_system(messages)
        out = [Segment("", False, bos=True)]
        if system is not None and not self.system_in_first_user:
            out.append(_segment(_fill(self.system, content=_data(system)), False))
        for i, m in enumerate(turns):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError(f"turn {i + 1} is {m['role']!r}: turns must alternate user, assistant, ...")
            if m["role"] == "user":
                content = _data(m["content"])
                if i == 0 and system is not None and self.system_in_first_user:
                    content = _join([_fill(self.system, content=_data(system)), content])
                if i > 0:
                    out.append(Segment(self.separator, False))
                    if self.bos_each_turn:
                        out.append(Segment("", False, bos=True))
                out.append(_segment(self._user_text(content, m.get("input")), False))
                if i == len(turns) - 1:  # a prompt: end with the assistant's header
                    out.append(Segment(self.header, False))
            else:
                out.append(Segment(self.header, False))
                out.append(_segment(_fill(self.response, content=_data(m["content"])), True, eos=self.eos))
        return _merge(out)

    def _split_system(self, messages: list[dict]) -> tuple[str | None, list[dict]]:
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
            if self.system is None:
                raise ValueError(f"template {self.name!r} has no system prompt; this conversation has one")
        if any(m["role"] == "system" for m in messages):
            raise ValueError("a system message may only come first")
        return system, messages

    def _user_text(self, content: Text, input: str | None) -> Text:
        if not input:
            return _fill(self.user, content=content)
        if self.user_with_input is None:
            return _fill(self.user, content=_join([content, ("\n\n", ()), _data(input)]))
        return _fill(self.user_with_input, content=content, input=_data(input))

    def control_tokens(self) -> list[str]:
        """The control tokens (`<|name|>`) the template's own text uses, in order of appearance."""
        found = []
        for key in ("system", "user", "user_with_input", "assistant", "separator"):
            for token in _SPECIAL.findall(getattr(self, key) or ""):
                if token not in found:
                    found.append(token)
        return found

    def check_tokenizer(self, tokenizer) -> None:
        """A template that needs single-id special tokens (`special_tokens: true`, as llama3) refuses a tokenizer
        that lacks them; others (chatml) write them as text where the tokenizer has no such token."""
        missing = [t for t in self.control_tokens() if t not in getattr(tokenizer, "special_tokens", {})]
        if missing and self.definition.get("special_tokens"):
            raise UserError(f"template {self.name!r} needs the special token(s) {', '.join(missing)}, which the "
                            f"tokenizer {tokenizer.path} lacks (the model's vocabulary has no such control tokens: "
                            f"use a template written as text, such as alpaca or chatml)")

    def to_jinja(self) -> str:
        """A Hugging Face `chat_template` (for tokenizer_config.json) rendering the same text, with bos_token and
        eos_token where the ids go: it equals `segments_text(render(messages))` (and `prompt` with
        add_generation_prompt)."""
        def s(text: str) -> str:
            return json.dumps(text, ensure_ascii=False)

        def expr(fmt: str, **names: str) -> str:  # a format string as a Jinja expression
            parts = [s(p) if i % 2 == 0 else names[p] for i, p in enumerate(_FIELDS.split(fmt))]
            return " + ".join(p for p in parts if p != '""') or '""'

        user_input = self.user_with_input or self.user.replace("{content}", "{content}\n\n{input}")
        j = ["{{- bos_token -}}",
             f"{{%- set system = {s(self.default_system) if self.default_system is not None else 'none'} -%}}",
             "{%- set turns = messages -%}",
             "{%- if messages and messages[0]['role'] == 'system' -%}"
             "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}{%- endif -%}"]
        sys_block = expr(self.system, content="system") if self.system is not None else '""'
        if not self.system_in_first_user:
            j.append(f"{{%- if system is not none -%}}{{{{- {sys_block} -}}}}{{%- endif -%}}")
        j += ["{%- for m in turns -%}",
              "{%- if m['role'] == 'user' -%}{%- set content = m['content'] -%}",
              f"{{%- if not loop.first -%}}{{{{- {s(self.separator)} -}}}}"
              + ("{{- bos_token -}}" if self.bos_each_turn else "") + "{%- endif -%}"]
        if self.system_in_first_user:
            j.append(f"{{%- if loop.first and system is not none -%}}{{%- set content = {sys_block} + content -%}}"
                     "{%- endif -%}")
        with_input = expr(user_input, content="content", input="m['input']")
        answer = f"{s(self.header)} + {expr(self.response, content='m[' + s('content') + ']')}"
        eos = " + eos_token" if self.eos else ""
        j += ["{%- if 'input' in m and m['input'] -%}",
              f"{{{{- {with_input} -}}}}",
              f"{{%- else -%}}{{{{- {expr(self.user, content='content')} -}}}}{{%- endif -%}}",
              f"{{%- else -%}}{{{{- {answer}{eos} -}}}}{{%- endif -%}}",
              "{%- endfor -%}",
              f"{{%- if add_generation_prompt -%}}{{{{- {s(self.header)} -}}}}{{%- endif -%}}"]
        return "".join(j)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind (so "USER: hi " + "ASSISTANT:" tokenizes as one text) and drop empty
    texts that carry no BOS/EOS."""
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].trained == seg.trained and not out[-1].eos and not seg.bos:
            prev = out.pop()
            text, data = _join([(prev.text, prev.data), (seg.text, seg.data)])
            seg = Segment(text, seg.trained, prev.bos, seg.eos, data)
        if seg.text or seg.bos or seg.eos:
            out.append(seg)
    return out


def segments_text(segments: list[Segment], bos: str = "<s>", eos: str = "</s>") -> str:
    """The text of segments, with `bos`/`eos` where the ids go (what `to_jinja` renders)."""
    return "".join(bos * s.bos + s.text + eos * s.eos for s in segments)


def _segment(text: Text, trained: bool, **flags) -> Segment:
    return Segment(text[0], trained, data=text[1], **flags)


def encode_segments(segments: list[Segment], tokenizer) -> list[list[int]]:
    """Token ids of each segment, its BOS and EOS included. A segment that starts a sequence (after BOS) is
    encoded with SentencePiece's dummy prefix, any other as a continuation, so concatenated ids equal the ids of
    the whole conversation and a prompt's ids are a prefix of its training example's. A special token's text in the
    template's own text (outside the message words) is its single id, where the tokenizer has that token."""
    specials = _special_pattern(getattr(tokenizer, "special_tokens", {}))
    out = []
    for seg in segments:
        ids = [tokenizer.bos_id] if seg.bos else []
        continuation = not seg.bos and bool(out)
        for piece in _pieces(seg.text, seg.data, specials):
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids += tokenizer.encode(piece, continuation=continuation)
            continuation = True
        out.append(ids + [tokenizer.eos_id] * seg.eos)
    return out


_SPECIAL = re.compile(r"<\|[^|<>\s]{1,64}\|>")  # how control tokens are written (<|eot_id|>, <|im_start|>)


def _special_pattern(special_tokens: dict[str, int]):
    """(regex matching the tokenizer's special tokens, longest first; their ids), or None without any."""
    if not special_tokens:
        return None
    names = sorted(special_tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))), special_tokens


def _pieces(text: str, data: tuple[tuple[int, int], ...], specials) -> list[str | int]:
    """`text` as runs of text and special-token ids: a special token's text is its id outside the message words
    (`data`), and stays text inside them."""
    if specials is None or not text:
        return [text] if text else []
    pattern, ids = specials
    out: list[str | int] = []
    start = 0
    for m in pattern.finditer(text):
        if any(a < m.end() and m.start() < b for a, b in data):  # the message's own words
            continue
        if m.start() > start:
            out.append(text[start:m.start()])
        out.append(ids[m.group()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def tokenize(segments: list[Segment], tokenizer) -> list[int]:
    """All token ids of `segments` (for a prompt: `tokenize(template.prompt(messages), tokenizer)`)."""
    return [i for ids in encode_segments(segments, tokenizer) for i in ids]


def _validate(d, source: str, lines: dict | None = None) -> dict:
    if not isinstance(d, dict):
        raise UserError(f"{source}: a template must be a mapping of keys, got {type(d).__name__}")
    at = lambda k: f"line {lines[k]}: " if lines and k in lines else ""  # noqa: E731
    problems = [f"{at(k)}unknown key {k!r} (known: {', '.join(_KEYS)})" for k in d if k not in _KEYS]
    problems += [f"missing key {k!r}" for k in ("name", "user", "assistant") if k not in d]
    problems += [f"line {line}: {message}" for line, message in (lines or {}).get("__duplicates__", [])]
    for k, v in d.items():
        if k in _KEYS and not isinstance(v, _KEYS[k]):
            kind = "a string or null" if _KEYS[k] is _OPT else f"a {_KEYS[k].__name__}"
            problems.append(f"{at(k)}{k!r} must be {kind}, got {type(v).__name__}")
    if not problems:
        d = {**_DEFAULTS, **d}
        need = {"user": {"content"}, "assistant": {"content"}, "system": {"content"},
                "user_with_input": {"content", "input"}}
        for k, fields in need.items():
            found = set(_FIELDS.findall(d[k] or ""))
            if d[k] is not None and found - fields:
                problems.append(f"{at(k)}{k!r} cannot use {{input}} (only 'user_with_input' takes it: the format "
                                f"for rows with an input)")
            elif d[k] is not None and found != fields:
                problems.append(f"{at(k)}{k!r} must contain {' and '.join('{' + f + '}' for f in sorted(fields))}"
                                " (each once; other placeholders are not supported)")
            elif d[k] is not None and any(len(re.findall(r"\{" + f + r"\}", d[k])) > 1 for f in fields):
                problems.append(f"{at(k)}{k!r} must contain each placeholder once")
        if d["default_system"] is not None and d["system"] is None:
            problems.append(f"{at('default_system')}'default_system' needs a 'system' format")
        if any(t in str(d[k]) for k in need for t in ("<s>", "</s>")):
            problems.append("templates must not contain <s> or </s> as text (BOS/EOS are added as ids)")
    if problems:
        raise UserError(f"{source}: invalid template:\n  " + "\n  ".join(problems))
    return d


def load_template(name_or_path: str) -> Template:
    """A built-in template by name, or a template YAML file (with the keys described in this module)."""
    if name_or_path in BUILTINS:
        return Template({"name": name_or_path, **BUILTINS[name_or_path]}, f"built-in template {name_or_path!r}")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        definition, lines = read_yaml_file(name_or_path, "template")
        return Template(definition, f"template file {name_or_path}", lines)
    raise UserError(f"unknown template {name_or_path!r}: use a built-in ({', '.join(BUILTINS)}) "
                    "or a template .yaml file")
