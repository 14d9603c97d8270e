"""The requests of `finetune serve`, checked as OpenAI's API defines them: the conversation, the sampling settings,
the completion prompts; `ApiError` is a refused request in OpenAI's error shape.

Parameters this server does not know are ignored, as OpenAI-compatible servers commonly do; those it knows but
cannot honour (n > 1, logprobs, tools, penalties, logit_bias, ...) are refused with a 400 unless they have their
no-op value.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.responses import JSONResponse

MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]

# Parameters we know but cannot honour: refused (400) unless absent, null, or this no-op value.
_NO_OP: dict[str, Callable[[object], bool]] = {
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "echo": lambda v: v is False,
    "best_of": lambda v: v == 1,
    "suffix": lambda v: v == "",
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "function_call": lambda v: v == "none",
    "response_format": lambda v: v == {"type": "text"},
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
}


class ApiError(Exception):
    """A request the server refuses: sent as OpenAI's error shape with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------------- validation

def json_type(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf: Python's json reads NaN and Infinity
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:  # JSON's NaN and Infinity (which Python's json accepts) are not numbers here
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def option(body: dict, name: str, check: Callable[[object], bool], what: str, default=None):
    """body[name], or `default` when it is absent or null; a 400 naming the parameter when `check` fails."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {json_type(value)}: {json.dumps(value)[:80]}", name)
    return value


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"'{param}' must be a string, got {json_type(value)}", param)
    try:  # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer takes
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text (a lone surrogate)", param) from None
    return value


def _content(value, param: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts (joined by lines)."""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            where = f"{param}[{i}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(400, f"'{where}': only text content parts ({{\"type\": \"text\", \"text\": ...}}) "
                                    "are supported", where)
            texts.append(_text(part.get("text"), f"{where}.text"))
        return "\n".join(texts)
    return _text(value, param)


def parse_messages(value) -> list[dict]:
    """The conversation of a chat request: [{"role", "content"}], ending with a user message. "developer" (OpenAI's
    newer name for system) is read as "system"; other keys of a message ("name") are ignored."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty array of {\"role\", \"content\"} objects, got "
                            f"{json_type(value) if value != [] else 'an empty array'}", "messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object with \"role\" and \"content\", got {json_type(m)}",
                           where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"'{where}.role' must be 'system', 'user' or 'assistant', got "
                                f"{json.dumps(m.get('role'))[:40]}", f"{where}.role")
        messages.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message must be from the user, got {messages[-1]['role']!r}", "messages")
    return messages


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen; requests with equal settings can share a batch."""
    temperature: float = 0.0  # 0: greedy (then top_p, top_k and seed play no part)
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Settings:
    sampling: Sampling
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_settings(body: dict, default_max_tokens: int, extra_stop: Sequence[str] = ()) -> Settings:
    """The generation parameters of a request, validated; 400 for those we cannot honour."""
    for name, no_op in _NO_OP.items():
        if body.get(name) is not None and not no_op(body[name]):
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if option(body, "n", _is_int, "an integer", 1) != 1:
        raise ApiError(400, "only n=1 is supported (one choice per prompt)", "n")
    max_tokens = option(body, "max_tokens", _is_int, "an integer", default_max_tokens)
    max_tokens = option(body, "max_completion_tokens", _is_int, "an integer", max_tokens)
    if max_tokens < 1:
        param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise ApiError(400, f"'{param}' must be at least 1, got {max_tokens}", param)
    temperature = option(body, "temperature", _is_number, "a number", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise ApiError(400, f"'temperature' must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}",
                       "temperature")
    top_p = option(body, "top_p", _is_number, "a number", 1.0)
    if not 0 <= top_p <= 1:
        raise ApiError(400, f"'top_p' must be between 0 and 1, got {top_p}", "top_p")
    top_k = option(body, "top_k", _is_int, "an integer", 0)  # not OpenAI's, but vLLM's and llama.cpp's
    if top_k < -1:
        raise ApiError(400, f"'top_k' must be -1 or 0 (all tokens) or a positive integer, got {top_k}", "top_k")
    seed = option(body, "seed", _is_int, "an integer")
    stop = option(body, "stop", lambda v: isinstance(v, (str, list)), "a string or an array of strings", [])
    stop = [_text(stop, "stop")] if isinstance(stop, str) else [_text(s, f"stop[{i}]") for i, s in enumerate(stop)]
    stream = option(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = option(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be a boolean, got {json_type(include_usage)}",
                       "stream_options.include_usage")
    if temperature == 0 or top_p == 0:  # a nucleus of probability 0 keeps only the most likely token
        sampling = Sampling(stop=unique(stop, extra_stop))
    else:
        sampling = Sampling(float(temperature), float(top_p), max(top_k, 0),
                            None if seed is None else seed % 2 ** 64, unique(stop, extra_stop))
    return Settings(sampling, max_tokens, stream, bool(include_usage))


def unique(*lists: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for strings in lists for s in strings if s))


def completion_prompts(value, tokenizer) -> list[list[int]]:
    """The token ids of a completions request's `prompt`: a string or an array of strings (each BOS + its text),
    or token ids (an array of integers, or an array of such arrays) used as they are."""
    what = "a string, an array of strings, or an array of token ids (or of such arrays)"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'prompt' must be {what}", "prompt")
    if all(_is_int(t) for t in value):
        value = [value]
    prompts = []
    for i, p in enumerate(value):
        if isinstance(p, str):
            prompts.append(tokenizer.encode(_text(p, f"prompt[{i}]"), bos=True))
        elif isinstance(p, list) and p and all(_is_int(t) and 0 <= t < tokenizer.vocab_size for t in p):
            prompts.append(list(p))
        else:
            raise ApiError(400, f"'prompt[{i}]' must be a string or a non-empty array of token ids in "
                                f"[0, {tokenizer.vocab_size})", f"prompt[{i}]")
    return prompts
