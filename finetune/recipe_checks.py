"""Recipes, the rules that span several keys, by section: what a recipe's schema alone cannot say (exactly one of
model.preset and model.checkpoint, a tokenizer for a preset, dataset columns of the chosen format, LoRA targets,
templates, writable output folders...). `recipe.load_recipe` runs them after the schema's checks; each adds its
problems to the same `Problems`, so that every problem of a recipe is reported at once."""
from __future__ import annotations

import dataclasses
import difflib
import os

from llama_core.config import PRESETS, LlamaConfig, get_config
from llama_core.files import OutputError, check_writable_folder

from .chat_templates import chat_template_of
from .ds_config import check_deepspeed_file
from .errors import UserError
from .recipe import DATASET_FIELDS, LORA_TARGETS, Problems, Recipe, _show, looks_like_local_path, report_to
from .templates import BUILTINS, load_template
from .trackers import check_trackers


def check_recipe(recipe: Recipe, problems: Problems, check_paths: bool) -> None:
    for check in (_check_model, _check_tokenizer, _check_datasets, _check_training, _check_lora, _check_logging,
                  _check_eval, _check_distributed, _check_template, _check_output):
        check(recipe, problems, check_paths)


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
                problems.add(f"{key}.columns.{ours}", f"expected a column name, got {_show(theirs)}")


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
