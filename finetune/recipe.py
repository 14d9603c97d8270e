"""Recipes: one YAML file describes a whole run. Schema, loading, command-line overrides and validation.

Every section is a dataclass; a field's type says what the YAML value may be (Literal for choices) and its
metadata may carry a range (`ge`, `gt`, `le`, `lt`) and a `path` kind ("file", "dir", "file_or_dir") that must
exist. Validation walks the YAML against this schema and reports every problem at once, each with its dotted key,
the recipe's file name and the line.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .errors import UserError


def _f(default=dataclasses.MISSING, *, factory=None, **meta):
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    preset: Optional[str] = _f(None, help="a named preset from llama_core.config.PRESETS (random initialization)")
    checkpoint: Optional[str] = _f(None, path="dir", help="a checkpoint folder (HF or Meta layout)")
    format: Literal["auto", "hf", "meta"] = "auto"
    config: dict = _f(factory=dict, help="LlamaConfig fields overriding the preset (for example n_layers)")
    init_seed: int = 0


@dataclass
class TokenizerSection:
    path: Optional[str] = _f(None, path="file", help="tokenizer.model; default: the checkpoint's")


@dataclass
class DatasetSection:
    path: str = _f(help="a local json/jsonl/csv/parquet file or folder, or a Hugging Face Hub dataset id")
    format: Literal["alpaca", "conversations", "text"] = "alpaca"
    split: str = _f("train", help="a split expression such as train or train[:95%]")
    columns: dict = _f(factory=dict, help="our field name -> the dataset's column name")
    weight: float = _f(1.0, gt=0)
    max_samples: Optional[int] = _f(None, ge=1)
    name: Optional[str] = _f(None, help="Hub dataset configuration name")


@dataclass
class DataSection:
    max_seq_len: int = _f(512, ge=8)
    packing: bool = True
    train_on_inputs: bool = False
    overlong: Literal["drop", "truncate_prompt"] = "drop"
    val_fraction: float = _f(0.0, ge=0, lt=1)
    validation: list[DatasetSection] = _f(factory=list, help="explicit validation datasets")
    dedup: bool = True
    on_bad_row: Literal["error", "skip"] = "error"
    seed: int = 0
    cache_dir: Optional[str] = _f(None, help="tokenized-data cache; default ~/.cache/llama-finetune")
    num_proc: int = _f(1, ge=1)


@dataclass
class TrainingSection:
    method: Literal["full", "lora"] = "lora"
    epochs: float = _f(1.0, gt=0)
    max_steps: Optional[int] = _f(None, ge=1, help="optimizer steps; overrides epochs")
    micro_batch_size: int = _f(4, ge=1)
    gradient_accumulation_steps: int = _f(1, ge=1)
    lr: float = _f(2e-4, gt=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = _f(0, ge=0)
    warmup_ratio: float = _f(0.0, ge=0, lt=1)
    min_lr_ratio: float = _f(0.1, ge=0, le=1, help="the schedule decays to this fraction of lr (paper: 10%)")
    weight_decay: float = _f(0.1, ge=0)
    betas: list[float] = _f(factory=lambda: [0.9, 0.95])
    eps: float = _f(1e-8, gt=0)
    grad_clip: Optional[float] = _f(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    kernels: Literal["auto", "torch", "reference"] = _f(
        "auto", help="fused ops: Triton on CUDA (auto), their torch versions, or plain reference ops")
    compile: bool = _f(False, help="torch.compile each transformer block (inductor fuses the reference ops)")
    release_memory: bool = _f(True, help="CPU: return freed heap memory to the OS when over 256 MB of it is unused "
                                         "near the peak (peak RSS near the live peak; costs a few % of speed)")
    seed: int = 1234
    nan_policy: Literal["stop", "skip"] = "stop"
    quantize: Optional[Literal["4bit"]] = _f(None, help="QLoRA: load the base in 4-bit (CUDA, bitsandbytes)")


@dataclass
class LoraSection:
    r: int = _f(8, ge=1)
    alpha: float = _f(16, gt=0)
    dropout: float = _f(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = _f(factory=lambda: ["q_proj", "v_proj"])
    dora: bool = False


@dataclass
class DistributedSection:
    backend: Literal["none", "deepspeed"] = "none"
    zero_stage: Literal[2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    config_file: Optional[str] = _f(None, path="file", help="a DeepSpeed JSON config merged under the recipe")


@dataclass
class EvalSection:
    every_steps: Optional[int] = _f(None, ge=1, help="validation loss every N optimizer steps (and at the end)")
    max_batches: Optional[int] = _f(None, ge=1)
    generate_prompts: int = _f(0, ge=0, help="held-out prompts to generate for at each evaluation")
    max_new_tokens: int = _f(64, ge=1)
    exact_match: int = _f(0, ge=0, help="held-out examples scored by exact match of the greedy answer")
    mmlu: Optional[str] = _f(None, path="dir", help="an MMLU folder (dev/, test/) to evaluate 5-shot at the end")
    mmlu_shots: int = _f(5, ge=0)


@dataclass
class CheckpointSection:
    every_steps: Optional[int] = _f(None, ge=1)
    keep_last: int = _f(2, ge=1)
    resume: Literal["auto", "never"] = "auto"


@dataclass
class LoggingSection:
    every_steps: int = _f(10, ge=1)
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Recipe:
    model: ModelSection = _f(factory=ModelSection)
    tokenizer: TokenizerSection = _f(factory=TokenizerSection)
    datasets: list[DatasetSection] = _f(factory=list)
    template: str = _f("alpaca", help="a built-in template name or a template YAML file")
    data: DataSection = _f(factory=DataSection)
    training: TrainingSection = _f(factory=TrainingSection)
    lora: LoraSection = _f(factory=LoraSection)
    distributed: DistributedSection = _f(factory=DistributedSection)
    eval: EvalSection = _f(factory=EvalSection)
    checkpoint: CheckpointSection = _f(factory=CheckpointSection)
    logging: LoggingSection = _f(factory=LoggingSection)
    output_dir: str = "runs/default"
    source: str = _f("<recipe>", internal=True)  # the file the recipe came from (not a YAML key)


class RecipeError(UserError):
    """One or more problems in a recipe; the message lists them all."""


DATASET_FIELDS = {"alpaca": ("instruction", "input", "output"), "text": ("text",),
                  "conversations": ("conversations", "messages")}  # what `columns` may rename, per format
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


LOCAL_DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".gz", ".arrow"}


def looks_like_local_path(path: str) -> bool:
    """Whether a dataset path names a local file or folder; otherwise it is a Hub id (`tatsu-lab/alpaca`)."""
    return (path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path
            or os.path.splitext(path)[1].lower() in LOCAL_DATA_SUFFIXES)


def read_yaml_file(path: str, what: str) -> tuple[Any, dict[str, Any]]:
    """(value, lines) of a YAML file read safely; lines maps dotted keys to line numbers, and its
    "__duplicates__" entry lists (line, message) for keys given twice. Raises UserError naming the file."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, not a {what} file")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")  # decoded whole, so that an error's offset is the file's
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
    try:
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
        return yaml.safe_load(text), lines
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None


def load_recipe(path: str, overrides: list[str] = (), *, check_paths: bool = True) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError listing every problem found."""
    try:
        raw, lines = read_yaml_file(path, "recipe")
    except UserError as e:
        raise RecipeError(str(e)) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of sections, got {type(raw).__name__}")
    errors: list[str] = []
    for item in overrides:
        _apply_override(raw, item, lines, errors)
    errors.extend(f"{path}:{line}: {message}" for line, message in lines.pop("__duplicates__", []))
    where = _Where(path, lines)
    recipe = _build(Recipe, raw, "", errors, where, check_paths)
    recipe.source = path
    _check_recipe(recipe, errors, where, check_paths)
    if errors:
        raise RecipeError(f"{path}: {len(errors)} problem{'s' * (len(errors) > 1)}:\n" +
                          "\n".join(f"  {e}" for e in errors))
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out.pop("source")
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)


# --- YAML locations -------------------------------------------------------------------------------------------

class _Where:
    def __init__(self, path: str, lines: dict[str, Any]):
        self.path, self.lines = path, lines
        self.failed: set[str] = set()  # keys with a problem reported: rules spanning keys skip them

    def __call__(self, key: str) -> str:
        """`file:line: key` for a problem's message (so the key is recorded as failed); overrides are reported as
        coming from the command line."""
        self.failed.add(key)
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0] if "[" not in probe.rpartition(".")[2] else probe.rpartition("[")[0]
        line = self.lines.get(probe)
        if line == "override":
            return f"command line: {key}"
        return f"{self.path}:{line}: {key}" if line else f"{self.path}: {key}"


def _key_lines(node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    """Map each dotted key path (lists as key[i]) to the 1-based line where it appears."""
    out = {"__duplicates__": []} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            if key in out:  # YAML would silently keep the last one
                out["__duplicates__"].append((key_node.start_mark.line + 1,
                                              f"{key}: duplicate key (first at line {out[key]})"))
            out[key] = key_node.start_mark.line + 1
            _key_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{prefix}[{i}]"] = item.start_mark.line + 1
            _key_lines(item, f"{prefix}[{i}]", out)
    return out


def _apply_override(raw: dict, item: str, lines: dict, errors: list[str]) -> None:
    """`training.lr=2e-5`, `datasets[0].path=x.jsonl`: the value is parsed as YAML, so types follow the same rules
    as in the file."""
    key, sep, value = item.partition("=")
    parts = key.split(".")
    steps = [re.fullmatch(r"([^\[\]]+)(?:\[(\d+)\])?", part) for part in parts]
    if not sep or not all(steps):
        errors.append(f"command line: {item!r}: overrides look like section.key=value (list items: "
                      f"datasets[0].path=value)")
        return
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node: Any = raw
    for depth, step in enumerate(steps):
        name, index = step.group(1), step.group(2)
        where = ".".join(parts[:depth] + [name])
        last = depth == len(steps) - 1
        if index is not None:
            items = node.get(name)
            if not isinstance(items, list) or int(index) >= len(items):
                count = f"{len(items)} items" if isinstance(items, list) else "no list"
                errors.append(f"command line: {item!r}: {where} has {count}; only existing items can be overridden")
                return
            node, name = items, int(index)
        if last:
            node[name] = parsed
        else:
            if isinstance(node, dict) and node.get(name) is None:  # a new or empty section
                node[name] = {}
            if not isinstance(node[name], dict):
                errors.append(f"command line: {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
                return
            node = node[name]
    for depth in range(len(parts)):  # a problem found on the key or a new parent is the command line's
        lines.setdefault(".".join(parts[:depth + 1]), "override")
    lines[key] = "override"


# --- schema-driven validation ---------------------------------------------------------------------------------

def _build(cls, raw, key: str, errors: list[str], where: _Where, check_paths: bool):
    raw = {} if raw is None else raw  # an empty section (`eval:`) takes the defaults
    if not isinstance(raw, dict):
        errors.append(f"{where(key)}: expected a mapping of keys, got {_show(raw)}")
        return cls() if _all_defaults(cls) else None
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        sub = f"{key}.{name}" if key else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            errors.append(f"{where(sub)}: unknown key{hint}")
            continue
        values[name] = _convert(hints[name], value, sub, errors, where, check_paths, fields[name].metadata)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{where(key)}: missing required key {(key + '.' if key else '') + name!r}")
            values[name] = None
    return cls(**values)


def _all_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _show(value) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def _convert(tp, value, key, errors, where, check_paths, meta):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        failed = set(where.failed)
        for option in options:  # the first option that converts without errors wins
            trial: list[str] = []
            result = _convert(option, value, key, trial, where, check_paths, meta)
            if not trial:
                where.failed = failed
                return result
        if len(options) == 1:
            errors.extend(trial)
        else:
            errors.append(f"{where(key)}: expected {' or '.join(_describe(o) for o in options)}, got {_show(value)}")
        return None
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        same_text = [a for a in args if str(a) == str(value)]
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = (f" (write {same_text[0]!r} without quotes: not a string)"
                if same_text else f" (did you mean {close[0]!r}?)" if close else "")
        errors.append(f"{where(key)}: {value!r} is not one of {', '.join(map(repr, args))}{hint}")
        return None
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where(key)}: expected a list, got {_show(value)}")
            return []
        return [_convert(args[0], v, f"{key}[{i}]", errors, where, check_paths, meta) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors, where, check_paths)
    if tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where(key)}: expected a mapping, got {_show(value)}")
            return {}
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where(key)}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where(key)}: expected an integer, got {_show(value)}")
            return None
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where(key)}: expected a number, got {_show(value)}")
            return None
        if not math.isfinite(value):
            errors.append(f"{where(key)}: expected a finite number, got {value!r}")
            return None
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            errors.append(f"{where(key)}: expected a string, got {_show(value)}")
            return None
    for bound, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        if bound in meta and not ok(value, meta[bound]):
            errors.append(f"{where(key)}: must be {word} {meta[bound]}, got {value!r}")
    kind = meta.get("path")
    if kind and isinstance(value, str):
        value = os.path.expanduser(value)
    if kind and check_paths and isinstance(value, str):
        exists = os.path.isfile(value) if kind == "file" else os.path.isdir(value)
        if not exists:
            what = "file" if kind == "file" else "folder"
            errors.append(f"{where(key)}: {what} not found: {value!r} (relative paths are from the current "
                          f"directory, {os.getcwd()})")
    return value


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _check_recipe(r: Recipe, errors: list[str], where: _Where, check_paths: bool) -> None:
    """Rules that span several keys."""
    from llama_core.config import PRESETS, LlamaConfig, get_config

    m = r.model
    ok = lambda *keys: not any(k in where.failed for k in keys)  # noqa: E731 (no follow-on errors)
    if (m.preset is None) == (m.checkpoint is None) and ok("model.preset", "model.checkpoint"):
        errors.append(f"{where('model')}: give exactly one of model.preset and model.checkpoint")
    if m.preset is not None and m.preset not in PRESETS:
        close = difflib.get_close_matches(m.preset, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        errors.append(f"{where('model.preset')}: unknown preset {m.preset!r}; {hint}valid: {', '.join(PRESETS)}")
    valid_config = {f.name for f in dataclasses.fields(LlamaConfig)}
    for name in m.config or {}:
        if name not in valid_config:
            errors.append(f"{where('model.config.' + str(name))}: not a model config field; "
                          f"valid: {', '.join(sorted(valid_config))}")
    if m.preset in PRESETS and m.config and set(m.config) <= valid_config and ok("model.config"):
        try:  # the values, checked by the config itself
            get_config(m.preset, **m.config)
        except (ValueError, TypeError) as e:
            errors.append(f"{where('model.config')}: {e}")
    if r.tokenizer.path is None and m.checkpoint is not None and check_paths:
        if not os.path.isfile(os.path.join(m.checkpoint, "tokenizer.model")):
            errors.append(f"{where('tokenizer')}: no tokenizer.path given and {m.checkpoint}/tokenizer.model "
                          f"does not exist")
    if r.tokenizer.path is None and m.checkpoint is None and ok("tokenizer.path", "model.checkpoint"):
        errors.append(f"{where('tokenizer.path')}: a preset model needs tokenizer.path")
    if not r.datasets and ok("datasets"):
        errors.append(f"{where('datasets')}: at least one dataset is needed")
    all_datasets = [(f"datasets[{i}]", d) for i, d in enumerate(r.datasets or [])]
    all_datasets += [(f"data.validation[{i}]", d) for i, d in enumerate(r.data.validation or [])]
    for key, d in all_datasets:
        if d is None or not isinstance(d.path, str):
            continue
        if check_paths and looks_like_local_path(d.path) and not os.path.exists(os.path.expanduser(d.path)):
            errors.append(f"{where(key + '.path')}: file not found: {d.path!r} (relative paths are from the current "
                          f"directory, {os.getcwd()}; a Hugging Face Hub id looks like owner/name)")
        fields = DATASET_FIELDS.get(d.format, ())
        for ours, theirs in (d.columns or {}).items():
            if ours not in fields:
                errors.append(f"{where(f'{key}.columns.{ours}')}: not a field of the {d.format!r} format; "
                              f"valid: {', '.join(fields)} (columns map our field name to the dataset's column)")
            elif not isinstance(theirs, str) or not theirs:
                errors.append(f"{where(f'{key}.columns.{ours}')}: expected a column name, got {_show(theirs)}")
    t = r.training
    if t.betas is not None and (len(t.betas) != 2 or not all(isinstance(b, float) and 0 <= b < 1
                                                              for b in t.betas)):
        errors.append(f"{where('training.betas')}: expected two numbers in [0, 1), got {t.betas!r}")
    if t.warmup_steps and t.warmup_ratio:
        errors.append(f"{where('training.warmup_ratio')}: give warmup_steps or warmup_ratio, not both")
    if t.quantize and t.method != "lora":
        errors.append(f"{where('training.quantize')}: 4-bit quantization (QLoRA) needs training.method: lora")
    if t.compile and r.distributed.backend == "deepspeed":
        errors.append(f"{where('training.compile')}: not supported under DeepSpeed (its ZeRO hooks on every module "
                      f"break torch.compile's graphs); the fused kernels (training.kernels: auto) apply there")
    targets = r.lora.target_modules
    if isinstance(targets, list):
        for i, name in enumerate(targets):
            if isinstance(name, str) and name not in LORA_TARGETS:
                reason = (" (the output head is not adaptable: its loss is computed in fused chunks)"
                          if name == "lm_head" else "")
                close = difflib.get_close_matches(name, LORA_TARGETS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close and not reason else ""
                errors.append(f"{where(f'lora.target_modules[{i}]')}: {name!r} is not a LoRA target{reason}{hint}; "
                              f"valid: {', '.join(LORA_TARGETS)} or all-linear")
        if not targets:
            errors.append(f"{where('lora.target_modules')}: empty list")
    e = r.eval
    has_validation = (r.data.val_fraction or 0) > 0 or bool(r.data.validation)
    for name in ("every_steps", "exact_match", "generate_prompts"):
        if getattr(e, name) and not has_validation:
            errors.append(f"{where('eval.' + name)}: needs validation data (data.val_fraction or data.validation)")
    if r.distributed.config_file and check_paths and not errors:  # needs an otherwise valid recipe
        from .distributed import check_deepspeed_file
        errors.extend(f"{where('distributed.config_file')}: {p}" for p in check_deepspeed_file(r))
    if r.distributed.offload_params and r.distributed.zero_stage != 3:
        errors.append(f"{where('distributed.offload_params')}: parameter offload needs zero_stage: 3")
    if isinstance(r.template, str) and check_paths:
        from .templates import BUILTINS, load_template
        if r.template not in BUILTINS and not os.path.isfile(r.template):
            errors.append(f"{where('template')}: {r.template!r} is neither a built-in template "
                          f"({', '.join(BUILTINS)}) nor a template file")
        else:
            try:
                load_template(r.template)
            except UserError as e:
                errors.append(f"{where('template')}: {e}")
    if isinstance(r.output_dir, str) and os.path.exists(r.output_dir) and not os.path.isdir(r.output_dir):
        errors.append(f"{where('output_dir')}: {r.output_dir!r} is a file; output_dir must be a folder")
