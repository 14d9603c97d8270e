"""Reading a recipe's YAML mapping into its dataclasses (finetune.recipe's schema): command-line overrides, types,
Literal choices, ranges and paths, each problem located by file and line (`Problems`) and all of them collected.
Generic over the dataclasses: what the recipe's sections are and the rules that span keys are finetune.recipe's."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from typing import Any, Literal, Union

from .errors import UserError
from .hub import is_hub_id
from .inputs import parse_yaml_value


# --- problems, located ----------------------------------------------------------------------------------------

class Problems:
    """The problems found in a recipe, each message starting with its key's place (`file:line: key`, or
    `command line: key` for an override). Keys with a problem are remembered, so that rules spanning several keys
    do not report follow-on errors (`ok`)."""

    def __init__(self, path: str, lines: dict[str, Any]):
        self.path, self.lines = path, lines
        self.messages: list[str] = []
        self.failed: set[str] = set()

    def add(self, key: str, message: str) -> None:
        self.failed.add(key)
        self.messages.append(f"{self.locate(key)}: {message}")

    def ok(self, *keys: str) -> bool:
        return not any(k in self.failed for k in keys)

    def locate(self, key: str) -> str:
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0] if "[" not in probe.rpartition(".")[2] else probe.rpartition("[")[0]
        line = self.lines.get(probe)
        if line == "override":
            return f"command line: {key}"
        return f"{self.path}:{line}: {key}" if line else f"{self.path}: {key}"

    def trial(self) -> "Problems":
        """A scratch collector with the same locations: for trying one option of a union."""
        return Problems(self.path, self.lines)


def apply_override(raw: dict, item: str, lines: dict, problems: Problems) -> None:
    """`training.lr=2e-5`, `datasets[0].path=x.jsonl`: the value is parsed as YAML, so types follow the same rules
    as in the file."""
    key, sep, value = item.partition("=")
    parts = key.split(".")
    steps = [re.fullmatch(r"([^\[\]]+)(?:\[(\d+)\])?", part) for part in parts]
    if not sep or not all(steps):
        problems.messages.append(f"command line: {item!r}: overrides look like section.key=value (list items: "
                                 f"datasets[0].path=value)")
        return
    try:
        parsed = parse_yaml_value(value, "value") if value.strip() else None
    except UserError as e:
        reason = str(e).removeprefix("value").lstrip(":0123456789 ")
        hint = f"; quote a string that YAML cannot read: {key}='\"...\"'" if reason.startswith("not valid") else ""
        problems.messages.append(f"command line: {item!r}: {reason}{hint}")
        return
    node: Any = raw
    for depth, step in enumerate(steps):
        name, index = step.group(1), step.group(2)
        where = ".".join(parts[:depth] + [name])
        last = depth == len(steps) - 1
        if index is not None:
            items = node.get(name)
            if not isinstance(items, list) or int(index) >= len(items):
                count = f"{len(items)} items" if isinstance(items, list) else "no list"
                problems.messages.append(f"command line: {item!r}: {where} has {count}; only existing items can be "
                                         f"overridden")
                return
            node, name = items, int(index)
        if last:
            node[name] = parsed
        else:
            if isinstance(node, dict) and node.get(name) is None:  # a new or empty section
                node[name] = {}
            if not isinstance(node[name], dict):
                problems.messages.append(f"command line: {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
                return
            node = node[name]
    # The recipe's lines inside the replaced value are gone with it: problems in the new value are the command
    # line's (a bad `datasets=[...]` is not blamed on the recipe's own datasets lines).
    for stale in [k for k in lines if k.startswith((key + ".", key + "["))]:
        del lines[stale]
    for depth in range(len(parts)):  # a problem found on the key or a new parent is the command line's
        lines.setdefault(".".join(parts[:depth + 1]), "override")
    lines[key] = "override"


# --- schema-driven validation ---------------------------------------------------------------------------------

def build_section(cls, raw, key: str, problems: Problems, check_paths: bool):
    raw = {} if raw is None else raw  # an empty section (`eval:`) takes the defaults
    if not isinstance(raw, dict):
        problems.add(key, f"expected a mapping of keys, got {show_value(raw)}")
        return cls() if _all_defaults(cls) else None
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            problems.add(sub, f"unknown key{_unknown_key_hint(str(name), key, fields)}")
            continue
        values[name] = _convert(hints[name], value, sub, problems, check_paths, fields[name].metadata)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.add(key, f"missing required key {(key + '.' if key else '') + name!r}")
            values[name] = None
    return cls(**values)


# What other tools call our keys (Hugging Face TrainingArguments, axolotl, LLaMA-Factory, torchtune), answered
# wherever they appear in a recipe: `training.learning_rate: unknown key; this recipe calls it 'training.lr'`.
FOREIGN_KEYS = {
    "learning_rate": "training.lr", "lr_scheduler_type": "training.schedule", "lr_scheduler": "training.schedule",
    "num_train_epochs": "training.epochs", "num_epochs": "training.epochs",
    "per_device_train_batch_size": "training.micro_batch_size", "batch_size": "training.micro_batch_size",
    "train_batch_size": "training.micro_batch_size", "gradient_checkpointing": "training.activation_checkpointing",
    "enable_activation_checkpointing": "training.activation_checkpointing", "max_grad_norm": "training.grad_clip",
    "clip_grad_norm": "training.grad_clip", "adam_beta1": "training.betas", "adam_beta2": "training.betas",
    "adam_epsilon": "training.eps", "bf16": "training.precision", "fp16": "training.precision",
    "dtype": "training.precision", "torch_dtype": "training.precision", "warmup_steps_ratio": "training.warmup_ratio",
    "num_warmup_steps": "training.warmup_steps", "optimizer": "training (AdamW is the optimizer: lr, betas, eps, "
                                                             "weight_decay)",
    "finetuning_type": "training.method", "adapter": "training.method", "load_in_4bit": "training.quantize",
    "quantization_bit": "training.quantize", "seed": "training.seed",
    "sequence_len": "data.max_seq_len", "cutoff_len": "data.max_seq_len", "max_seq_length": "data.max_seq_len",
    "max_length": "data.max_seq_len", "sample_packing": "data.packing", "val_set_size": "data.val_fraction",
    "val_size": "data.val_fraction", "dataset": "datasets", "data_files": "datasets[].path",
    "lora_r": "lora.r", "lora_rank": "lora.r", "rank": "lora.r", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules", "lora_target": "lora.target_modules",
    "lora_target_linear": "lora.target_modules: all-linear", "use_dora": "lora.dora",
    "base_model": "model.checkpoint", "model_name_or_path": "model.checkpoint",
    "pretrained_model_name_or_path": "model.checkpoint", "tokenizer_name": "tokenizer.path",
    "tokenizer_type": "tokenizer.path", "chat_template": "template", "prompt_template": "template",
    "save_steps": "checkpoint.every_steps", "save_total_limit": "checkpoint.keep_last",
    "resume_from_checkpoint": "checkpoint.resume", "logging_steps": "logging.every_steps",
    "log_every_n_steps": "logging.every_steps", "eval_steps": "eval.every_steps",
    "deepspeed": "distributed.config_file", "zero_stage": "distributed.zero_stage",
    "output": "output_dir", "save_dir": "output_dir",
}


def _unknown_key_hint(name: str, section: str, fields) -> str:
    """What to write instead of an unknown key: ours, when another tool's name is used; a close spelling; or the
    valid keys of the section."""
    ours = FOREIGN_KEYS.get(name)
    if ours is not None:
        return f"; this recipe calls it {ours!r} (see README: recipes from other tools)"
    close = difflib.get_close_matches(name, list(fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"


def _all_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def show_value(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _convert(tp, value, key: str, problems: Problems, check_paths: bool, meta):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:  # the first option that converts without problems wins
            trial = problems.trial()
            result = _convert(option, value, key, trial, check_paths, meta)
            if not trial.messages:
                return result
        if len(options) == 1:
            problems.messages.extend(trial.messages)
            problems.failed |= trial.failed
        else:
            problems.add(key, f"expected {' or '.join(_describe(o) for o in options)}, got {show_value(value)}")
        return None
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        same_text = [a for a in args if str(a) == str(value)]
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = (f" (write {same_text[0]!r} without quotes: not a string)"
                if same_text else f" (did you mean {close[0]!r}?)" if close else "")
        problems.add(key, f"{value!r} is not one of {', '.join(map(repr, args))}{hint}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.add(key, f"expected a list, got {show_value(value)}")
            return []
        return [_convert(args[0], v, f"{key}[{i}]", problems, check_paths, meta) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key, problems, check_paths)
    if tp is dict:
        if not isinstance(value, dict):
            problems.add(key, f"expected a mapping, got {show_value(value)}")
            return {}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.add(key, f"expected true or false, got {show_value(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(key, f"expected an integer, got {show_value(value)}")
            return None
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(key, f"expected a number, got {show_value(value)}")
            return None
        if not math.isfinite(value):
            problems.add(key, f"expected a finite number, got {value!r}")
            return None
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            problems.add(key, f"expected a string, got {show_value(value)}")
            return None
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if bound in meta and not ok(value, meta[bound]):
            problems.add(key, f"must be {word} {meta[bound]}, got {value!r}")
    kind = meta.get("path")
    if kind and isinstance(value, str):
        value = os.path.expanduser(value)
    if kind and check_paths and isinstance(value, str):
        exists = {"file": os.path.isfile, "dir": os.path.isdir, "file_or_dir": os.path.exists,
                  "model": lambda v: os.path.isdir(v) or is_hub_id(v)}[kind](value)
        if not exists:
            what = {"file": "file", "dir": "folder", "file_or_dir": "file or folder",
                    "model": "folder"}[kind]
            hub_hint = "; a Hugging Face Hub id looks like owner/name" if kind == "model" else ""
            problems.add(key, f"{what} not found: {value!r} (relative paths are from the current directory, "
                              f"{os.getcwd()}{hub_hint})")
    return value


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))
