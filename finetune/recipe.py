"""Recipes: one YAML file describes a whole run. Schema, loading and validation (recipe_parse.py reads the YAML
into the schema: overrides, types, ranges, paths).

Every section is a dataclass; a field's type says what the YAML value may be (Literal for choices) and its
metadata may carry a range (`ge`, `gt`, `le`, `lt`) and a `path` kind ("file", "dir", "file_or_dir") that must
exist. Validation walks the YAML against this schema and reports every problem at once, each with its dotted key,
the recipe's file name and the line.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from llama_core.config import PRESETS, LlamaConfig, get_config
from llama_core.files import OutputError, check_writable_folder

from .ds_config import check_deepspeed_file
from .errors import UserError
from .inputs import read_yaml_file
from .recipe_parse import Problems, apply_override, build_section, show_value
from .chat_templates import chat_template_of
from .templates import BUILTINS, load_template
from .trackers import check_trackers


def _f(default=dataclasses.MISSING, *, factory=None, **meta):
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    preset: Optional[str] = _f(None, help="a named preset from llama_core.config.PRESETS (random initialization)")
    checkpoint: Optional[str] = _f(None, path="model", help="a checkpoint folder (HF or Meta layout) or a Hugging "
                                                             "Face Hub id (owner/name[@revision]: safetensors only)")
    format: Literal["auto", "hf", "meta"] = "auto"
    config: dict = _f(factory=dict, help="LlamaConfig fields overriding the preset (for example n_layers)")
    init_seed: int = 0


@dataclass
class TokenizerSection:
    path: Optional[str] = _f(None, path="file_or_dir", help="tokenizer.model, tokenizer.json or a folder with one; "
                                                            "default: the checkpoint's")


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
    train_tokens: Union[Literal["auto", "none"], list[Union[int, str]]] = _f(
        "auto", help="embedding (and untied head) rows trained with the adapter (PEFT's trainable tokens): auto = "
                     "the tokens the template writes (BOS, EOS, end-of-turn and other control tokens), so that a "
                     "base whose end-of-turn rows never learned learns to stop; none; or ids / token texts")


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
    allow_data_change: bool = _f(False, help="resume even though the training data changed since the checkpoint "
                                            "(its fingerprint differs): said loudly, the data order then differs")


@dataclass
class LoggingSection:
    every_steps: int = _f(10, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(
        factory=lambda: ["tensorboard"], help="trackers besides metrics.jsonl ([] for none): TensorBoard (OUT/"
                                              "tensorboard), Weights & Biases (WANDB_* variables), MLflow "
                                              "(MLFLOW_TRACKING_URI)")
    tensorboard: bool = _f(True, help="false drops tensorboard from report_to (the older spelling)")
    progress: bool = True


@dataclass
class Recipe:
    model: ModelSection = _f(factory=ModelSection)
    tokenizer: TokenizerSection = _f(factory=TokenizerSection)
    datasets: list[DatasetSection] = _f(factory=list)
    template: str = _f("alpaca", help="a built-in template name, 'model' (the checkpoint's own chat template) or a "
                                      "template YAML file")
    data: DataSection = _f(factory=DataSection)
    training: TrainingSection = _f(factory=TrainingSection)
    lora: LoraSection = _f(factory=LoraSection)
    distributed: DistributedSection = _f(factory=DistributedSection)
    eval: EvalSection = _f(factory=EvalSection)
    checkpoint: CheckpointSection = _f(factory=CheckpointSection)
    logging: LoggingSection = _f(factory=LoggingSection)
    output_dir: str = "runs/default"
    overwrite: bool = _f(False, help="output_dir may be an existing folder that is not a run folder: the run's files "
                                     "are written beside the ones there (none of them is replaced or deleted)")
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


def load_recipe(path: str, overrides: list[str] = (), *, check_paths: bool = True) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError listing every problem found."""
    try:
        raw, lines = read_yaml_file(path, "recipe")
    except UserError as e:
        raise RecipeError(str(e)) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: a recipe must be a mapping of sections, got {type(raw).__name__}")
    problems = Problems(path, lines)
    for item in overrides:
        apply_override(raw, item, lines, problems)
    problems.messages.extend(f"{path}:{line}: {message}" for line, message in lines.pop("__duplicates__", []))
    recipe = build_section(Recipe, raw, "", problems, check_paths)
    recipe.source = path
    for check in (_check_model, _check_tokenizer, _check_datasets, _check_training, _check_lora, _check_logging,
                  _check_eval, _check_distributed, _check_template, _check_output):
        check(recipe, problems, check_paths)
    if problems.messages:
        n = len(problems.messages)
        raise RecipeError(f"{path}: {n} problem{'s' * (n > 1)}:\n" + "\n".join(f"  {m}" for m in problems.messages))
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out.pop("source")
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)


# --- rules that span several keys, by section -----------------------------------------------------------------

def _check_model(r: Recipe, problems: Problems, check_paths: bool) -> None:
    m = r.model
    if (m.preset is None) == (m.checkpoint is None) and problems.ok("model.preset", "model.checkpoint"):
        problems.add("model", "give exactly one of model.preset and model.checkpoint")
    if m.preset is not None and m.preset not in PRESETS:
        close = difflib.get_close_matches(m.preset, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        problems.add("model.preset", f"unknown preset {m.preset!r}; {hint}valid: {', '.join(PRESETS)}")
    valid_config = {f.name for f in dataclasses.fields(LlamaConfig)}
    for name in m.config or {}:
        if name not in valid_config:
            problems.add(f"model.config.{name}", f"not a model config field; valid: {', '.join(sorted(valid_config))}")
    if m.preset in PRESETS and m.config and set(m.config) <= valid_config and problems.ok("model.config"):
        try:  # the values, checked by the config itself
            get_config(m.preset, **m.config)
        except (ValueError, TypeError) as e:
            problems.add("model.config", str(e))


def _check_tokenizer(r: Recipe, problems: Problems, check_paths: bool) -> None:
    m = r.model
    if r.tokenizer.path is None and m.checkpoint is not None and check_paths and os.path.isdir(m.checkpoint):
        if not any(os.path.isfile(os.path.join(m.checkpoint, f)) for f in ("tokenizer.model", "tokenizer.json")):
            problems.add("tokenizer", f"no tokenizer.path given and {m.checkpoint} has no tokenizer (tokenizer.model "
                                      f"or tokenizer.json)")
    if r.tokenizer.path is None and m.checkpoint is None and problems.ok("tokenizer.path", "model.checkpoint"):
        problems.add("tokenizer.path", "a preset model needs tokenizer.path")


def _check_datasets(r: Recipe, problems: Problems, check_paths: bool) -> None:
    if not r.datasets and problems.ok("datasets"):
        problems.add("datasets", "at least one dataset is needed")
    all_datasets = [(f"datasets[{i}]", d) for i, d in enumerate(r.datasets or [])]
    all_datasets += [(f"data.validation[{i}]", d) for i, d in enumerate(r.data.validation or [])]
    for key, d in all_datasets:
        if d is None or not isinstance(d.path, str):
            continue
        if check_paths and looks_like_local_path(d.path) and not os.path.exists(os.path.expanduser(d.path)):
            problems.add(f"{key}.path", f"file not found: {d.path!r} (relative paths are from the current "
                                        f"directory, {os.getcwd()}; a Hugging Face Hub id looks like owner/name)")
        fields = DATASET_FIELDS.get(d.format, ())
        for ours, theirs in (d.columns or {}).items():
            if ours not in fields:
                problems.add(f"{key}.columns.{ours}", f"not a field of the {d.format!r} format; valid: "
                                                      f"{', '.join(fields)} (columns map our field name to the "
                                                      f"dataset's column)")
            elif not isinstance(theirs, str) or not theirs:
                problems.add(f"{key}.columns.{ours}", f"expected a column name, got {show_value(theirs)}")


def _check_training(r: Recipe, problems: Problems, check_paths: bool) -> None:
    t = r.training
    if problems.ok("training.betas") and t.betas is not None and (len(t.betas) != 2 or not all(isinstance(b, float) and 0 <= b < 1
                                                              for b in t.betas)):
        problems.add("training.betas", f"expected two numbers in [0, 1), got {t.betas!r}")
    if t.warmup_steps and t.warmup_ratio:
        problems.add("training.warmup_ratio", "give warmup_steps or warmup_ratio, not both")
    if t.quantize and t.method != "lora":
        problems.add("training.quantize", "4-bit quantization (QLoRA) needs training.method: lora")
    if t.compile and r.distributed.backend == "deepspeed":
        problems.add("training.compile", "not supported under DeepSpeed (its ZeRO hooks on every module break "
                                         "torch.compile's graphs); the fused kernels (training.kernels: auto) apply "
                                         "there")


def _check_lora(r: Recipe, problems: Problems, check_paths: bool) -> None:
    tokens = r.lora.train_tokens
    if isinstance(tokens, list):
        if r.training.method == "lora" and r.distributed.backend == "deepspeed":
            problems.add("lora.train_tokens", "not supported under DeepSpeed (PEFT's trainable token rows are not "
                                              "partitioned by ZeRO); use auto (off there) or none")
        for i, token in enumerate(tokens):
            if isinstance(token, int) and token < 0:
                problems.add(f"lora.train_tokens[{i}]", f"a token id must be >= 0, got {token}")
    targets = r.lora.target_modules
    if not isinstance(targets, list):
        return
    for i, name in enumerate(targets):
        if isinstance(name, str) and name not in LORA_TARGETS:
            reason = (" (the output head is not adaptable: its loss is computed in fused chunks)"
                      if name == "lm_head" else "")
            close = difflib.get_close_matches(name, LORA_TARGETS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close and not reason else ""
            problems.add(f"lora.target_modules[{i}]", f"{name!r} is not a LoRA target{reason}{hint}; valid: "
                                                      f"{', '.join(LORA_TARGETS)} or all-linear")
    if not targets:
        problems.add("lora.target_modules", "empty list")


def _check_logging(r: Recipe, problems: Problems, check_paths: bool) -> None:
    if isinstance(r.logging.report_to, list) and problems.ok("logging.report_to"):
        for problem in check_trackers(report_to(r)):
            problems.add("logging.report_to", problem.removeprefix("logging.report_to: "))


def report_to(r: Recipe) -> list[str]:
    """The trackers a run writes to: logging.report_to, without tensorboard if logging.tensorboard is false."""
    return [t for t in dict.fromkeys(r.logging.report_to or []) if t != "tensorboard" or r.logging.tensorboard]


def _check_eval(r: Recipe, problems: Problems, check_paths: bool) -> None:
    has_validation = (r.data.val_fraction or 0) > 0 or bool(r.data.validation)
    for name in ("every_steps", "exact_match", "generate_prompts"):
        if getattr(r.eval, name) and not has_validation:
            problems.add(f"eval.{name}", "needs validation data (data.val_fraction or data.validation)")


def _check_distributed(r: Recipe, problems: Problems, check_paths: bool) -> None:
    d = r.distributed
    if d.config_file and check_paths and not problems.messages:  # needs an otherwise valid recipe
        for p in check_deepspeed_file(r):
            problems.add("distributed.config_file", p)
    if d.offload_params and d.zero_stage != 3:
        problems.add("distributed.offload_params", "parameter offload needs zero_stage: 3")


def _check_template(r: Recipe, problems: Problems, check_paths: bool) -> None:
    if not isinstance(r.template, str) or not check_paths:
        return
    if r.template == "model":  # the checkpoint's own chat template
        folder = r.model.checkpoint or r.tokenizer.path
        if folder and os.path.isfile(folder):
            folder = os.path.dirname(folder) or "."
        if folder and os.path.isdir(folder):
            try:
                found = chat_template_of(folder)
            except UserError as e:
                found, problems_text = None, str(e)
            else:
                problems_text = f"{os.path.join(folder, 'tokenizer_config.json')} has no chat_template"
            if found is None:
                problems.add("template", f"model: {problems_text}; choose a built-in template "
                                         f"({', '.join(BUILTINS)}) or a template file")
        return
    if r.template not in BUILTINS and not os.path.isfile(r.template):
        problems.add("template", f"{r.template!r} is neither a built-in template ({', '.join(BUILTINS)}), 'model' "
                                 f"(the checkpoint's own chat template) nor a template file")
        return
    try:
        load_template(r.template)
    except UserError as e:
        problems.add("template", str(e))


def _check_output(r: Recipe, problems: Problems, check_paths: bool) -> None:
    """output_dir and data.cache_dir can be written (not a file, not below one, not in /proc or on a read-only
    file system); whether output_dir may be used (a run folder, or overwrite) is `finetune.outputs`' rule."""
    if isinstance(r.output_dir, str) and os.path.exists(r.output_dir) and not os.path.isdir(r.output_dir):
        problems.add("output_dir", f"{r.output_dir!r} is a file; output_dir must be a folder")
        return
    if not check_paths:
        return
    for key, folder in (("output_dir", r.output_dir), ("data.cache_dir", r.data.cache_dir if r.data else None)):
        if isinstance(folder, str) and problems.ok(key):
            try:
                check_writable_folder(os.path.expanduser(folder))
            except OutputError as e:
                problems.add(key, str(e))
