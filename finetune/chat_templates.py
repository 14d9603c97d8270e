"""`template: model`: the checkpoint's own Jinja chat template (tokenizer_config.json's `chat_template`).

Rendered as transformers' `apply_chat_template` renders it: a sandboxed Jinja environment (no attribute access to
Python internals, no file or network access; the template cannot run code) with the same filters and globals
(`raise_exception`, `strftime_now`, `tojson`), `bos_token`/`eos_token` from the tokenizer config. It gives the same
`Segment`s as a built-in `Template`, so training and inference use it unchanged:
- the assistant turns are found by rendering the conversation up to each one (with the generation prompt) and
  through it: the difference is the turn, trained (its end-of-turn token included); everything else is not.
  A template that rewrites earlier turns when later ones are added cannot be trained this way: an error.
- a control token's text inside a message (a user typing "<|eot_id|>") is marked before rendering and stays text;
  control tokens the template itself writes become their ids (`templates.encode_segments`).
Prompts are the rendering with add_generation_prompt, so their ids equal apply_chat_template's.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path

from .errors import UserError
from .inputs import read_json_file, read_text
from .templates import Segment

# Private-use characters around control-token text found in messages (transformers uses the same convention).
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"
_CONTROL = re.compile(r"<\|[^|<>\s]{1,64}\|>|</?s>|<unk>")
TOKENIZER_CONFIG = "tokenizer_config.json"


def chat_template_of(folder: str | Path) -> str | None:
    """The Jinja chat template of a model folder, or None: chat_template.jinja where there is one (transformers
    saves it there since 4.50, and reads it before the config's), else tokenizer_config.json's `chat_template` (a
    string, or the "default" of a list of named templates)."""
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        text = read_text(str(jinja), "chat template")
        return text if text.strip() else None
    file = Path(folder) / TOKENIZER_CONFIG
    if not file.is_file():
        return None
    config = read_json_file(str(file), "tokenizer config")
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template.strip() else None


class ModelTemplate:
    """A Jinja chat template with the interface of `templates.Template` (render, prompt, to_jinja, sha256)."""

    name = "model"
    system = "{content}"  # whether a system message is allowed is the template's to say (raise_exception)
    separator = user = ""  # no stop strings: the model stops at its end-of-turn ids

    def __init__(self, source: str, *, special: dict[str, str], origin: str, date: str | None = None):
        self.source, self.special, self.origin = source, special, origin
        self.date = date  # a fixed date for templates that write today's (None: today, as transformers does)
        self.definition = {"name": "model", "chat_template": source}
        self.description = f"the chat template of {origin}"
        self._compiled = _compile(source, origin)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps([self.source, self.special, self.date]).encode()).hexdigest()

    def to_jinja(self) -> str:
        return self.source

    def control_tokens(self) -> list[str]:
        return []

    def check_tokenizer(self, tokenizer) -> None:
        pass

    def render(self, messages: list[dict]) -> list[Segment]:
        """Segments of a whole conversation (it ends with an assistant turn): the assistant turns trained."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("a conversation must end with an assistant turn")
        messages = _marked(messages)
        full = self._render(messages, add_generation_prompt=False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[:i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ValueError(f"the chat template of {self.origin} renders earlier turns differently once turn "
                                 f"{i + 1} is added, so the assistant's part cannot be told apart; use a built-in "
                                 f"template (template: llama3, chatml, ...)")
            spans.append((len(before), len(through)))
        cuts = sorted({0, len(full), *(p for span in spans for p in span)})
        trained = {a for a, _ in spans}
        return [_segment(full[a:b], a in trained) for a, b in zip(cuts, cuts[1:]) if b > a]

    def prompt(self, messages: list[dict]) -> list[Segment]:
        """The rendering of a conversation ending with a user turn, with the generation prompt."""
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a prompt must end with a user turn")
        return [_segment(self._render(_marked(messages), add_generation_prompt=True), False)]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        extra = {"date_string": self.date} if self.date else {}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **self.special, **extra)
        except jinja2.TemplateError as e:  # raise_exception(...) of the template, or a rendering error
            raise ValueError(f"the chat template of {self.origin}: {e}") from None


def _marked(messages: list[dict]) -> list[dict]:
    """Messages with control-token text in their content wrapped in private markers (any marker the user sent
    removed); `input` (an Alpaca row's) joined to the content as the built-in templates do."""
    out = []
    for m in messages:
        content = m["content"] + (f"\n\n{m['input']}" if m.get("input") else "")
        content = _CONTROL.sub(lambda x: _OPEN + x.group() + _CLOSE, content.replace(_OPEN, "").replace(_CLOSE, ""))
        out.append({"role": m["role"], "content": content})
    return out


def _segment(text: str, trained: bool) -> Segment:
    """A segment of rendered text, the markers removed and the marked spans kept as message words."""
    plain, data, start = [], [], None
    for ch in text:
        if ch == _OPEN:
            start = sum(map(len, plain))
        elif ch == _CLOSE:
            if start is not None:
                data.append((start, sum(map(len, plain))))
            start = None
        else:
            plain.append(ch)
    return Segment("".join(plain), trained, data=tuple(data))


def _compile(source: str, origin: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{origin}: chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None


def load_model_template(folder: str | Path, tokenizer, *, date: str | None = None) -> ModelTemplate:
    """The chat template of a model folder, with the tokenizer's special token texts; a UserError if it has none."""
    source = chat_template_of(folder)
    if source is None:
        raise UserError(f"template: model, but {Path(folder) / TOKENIZER_CONFIG} has no chat_template; choose a "
                        f"built-in template (alpaca, llama3, chatml, ...) or a template file")
    special = {}
    for name, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                           ("pad_token", tokenizer.pad_id), ("unk_token", getattr(tokenizer, "unk_id", -1))):
        if token_id is not None and token_id >= 0:
            special[name] = tokenizer.id_to_piece(token_id)
    return ModelTemplate(source, special=special, origin=str(folder), date=date)
