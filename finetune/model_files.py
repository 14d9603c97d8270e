"""The small files a model folder carries beside its weights, and finding them again.

A training run's final/, a merged model and an export hold the tokenizer files the model came with
(tokenizer.model, or tokenizer.json with its tokenizer_config.json), the run's template (template.yaml, the exact
prompt format) and a tokenizer_config.json whose chat_template renders that template, so that
`AutoTokenizer.from_pretrained(folder)` loads the tokenizer and `apply_chat_template` prompts as we trained.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from llama_core.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

from .chat_templates import ModelTemplate, chat_template_of, load_model_template
from .errors import UserError
from .templates import Template, load_template

TEMPLATE_FILE, TOKENIZER_CONFIG = "template.yaml", "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # a folder with either has a tokenizer


def template_bytes(template: Template) -> bytes:
    return yaml.safe_dump(template.definition, sort_keys=False, allow_unicode=True).encode()


def tokenizer_config(tokenizer: Tokenizer, template: Template | ModelTemplate | None, max_len: int) -> dict:
    """tokenizer_config.json: the tokenizer's own (a tokenizer.json's), or for a SentencePiece tokenizer.model one
    for transformers' LlamaTokenizer (legacy=True prepends SentencePiece's dummy-prefix space after <s>, as LLaMA's
    tokenizer does); with the template's chat_template and the model's context length."""
    own = tokenizer.files.get(TOKENIZER_CONFIG) if not isinstance(tokenizer, SentencePieceTokenizer) else None
    if own is not None:
        config = json.loads(own if isinstance(own, bytes) else Path(own).read_bytes())
    else:
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                  "add_bos_token": True, "add_eos_token": False, "legacy": True,
                  "clean_up_tokenization_spaces": False}
    config["model_max_length"] = max_len
    if template is not None:
        config["chat_template"] = template.to_jinja()
    return config


def companion_files(tokenizer: Tokenizer, template: Template | ModelTemplate | None, *,
                    max_len: int | None = None) -> dict[str, bytes | Path]:
    """{file name: bytes or a file to copy}: the tokenizer's files, template.yaml (a built-in or file template;
    `template: model` is the chat_template itself) and, with `max_len`, tokenizer_config.json."""
    files: dict[str, bytes | Path] = dict(tokenizer.files)
    if isinstance(template, Template):
        files[TEMPLATE_FILE] = template_bytes(template)
    if max_len is not None:
        files[TOKENIZER_CONFIG] = (json.dumps(tokenizer_config(tokenizer, template, max_len), indent=2,
                                              ensure_ascii=False) + "\n").encode()
    return files


def find_tokenizer(*dirs) -> Tokenizer:
    """The tokenizer of the first folder that has one (tokenizer.model or tokenizer.json)."""
    tried = [Path(d) for d in dirs if d is not None]
    for folder in tried:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            try:
                return load_tokenizer(folder)
            except ValueError as e:
                raise UserError(str(e)) from None
    raise UserError(f"no tokenizer found (tokenizer.model or tokenizer.json in {', '.join(map(str, tried))})")


def find_template(*dirs, tokenizer: Tokenizer | None = None) -> Template | ModelTemplate | None:
    """The prompt format a model was trained with: the template.yaml of the first folder that has one (a training
    run writes it next to the weights), else the chat template of a folder's tokenizer_config.json (a model from the
    Hub), else None."""
    for d in dirs:
        if d is not None and (file := Path(d) / TEMPLATE_FILE).is_file():
            return load_template(str(file))
    for d in dirs:
        if d is not None and tokenizer is not None and chat_template_of(d) is not None:
            return load_model_template(d, tokenizer)
    return None
