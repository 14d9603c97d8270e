"""The DeepSpeed config a recipe implies, and the checks of a recipe's own DeepSpeed JSON file against it.

Pure dictionaries: no DeepSpeed import, so a recipe can be validated on a machine without DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .errors import UserError
from .inputs import read_json_file
from .precision import default_device_type, resolve_precision

# Recipe values that flow into the DeepSpeed config; a DeepSpeed JSON file may not contradict them.
_FLOWS = {
    ("train_micro_batch_size_per_gpu",): "training.micro_batch_size",
    ("gradient_accumulation_steps",): "training.gradient_accumulation_steps",
    ("gradient_clipping",): "training.grad_clip",
    ("zero_optimization", "stage"): "distributed.zero_stage",
    ("bf16", "enabled"): "training.precision",
    ("fp16", "enabled"): "training.precision",
    ("optimizer", "params", "lr"): "training.lr",
    ("optimizer", "params", "betas"): "training.betas",
    ("optimizer", "params", "weight_decay"): "training.weight_decay",
    ("optimizer", "params", "eps"): "training.eps",
}


def deepspeed_config(recipe, precision_name: str, world_size: int | None = None) -> dict:
    """The DeepSpeed config a recipe implies, merged over the recipe's DeepSpeed JSON file (if any)."""
    t, d = recipe.training, recipe.distributed
    zero = {"stage": d.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if d.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=0)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision_name == "bf16"},
        "fp16": {"enabled": precision_name == "fp16"},
        "steps_per_print": 2 ** 31 - 1,  # the loop prints its own progress
        "wall_clock_breakdown": False,
    }
    if world_size:
        ours["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    if d.offload_optimizer:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam
        ours["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas),
                                                         "weight_decay": t.weight_decay, "eps": t.eps}}
    user = _read_ds_file(d.config_file) if d.config_file else {}
    return _drop_auto(_merge(user, ours))


def _drop_auto(d: dict) -> dict:
    """Values the file left to us as "auto" (transformers' convention) that we do not set: DeepSpeed's default."""
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}


def check_deepspeed_file(recipe) -> list[str]:
    """Contradictions between a recipe and its DeepSpeed JSON file (values set to "auto" are filled in)."""
    d = recipe.distributed
    if not d.config_file or not os.path.isfile(d.config_file):
        return []
    try:
        user = _read_ds_file(d.config_file)
    except UserError as e:
        return [str(e)]
    try:
        precision = resolve_precision(recipe.training.precision, default_device_type(), deepspeed=True).name
    except UserError:  # fp16/bf16 on CPU: reported by the recipe's own checks
        precision = recipe.training.precision
    ours = deepspeed_config(_without_file(recipe), precision)
    problems = []
    for path, key in _FLOWS.items():
        theirs, mine = _get(user, path), _get(ours, path)
        if theirs is None or theirs == "auto" or mine is None:
            continue
        if isinstance(mine, float) or isinstance(theirs, float):
            same = isinstance(theirs, (int, float)) and abs(float(theirs) - float(mine)) <= 1e-12 * abs(float(mine))
        elif isinstance(mine, list):
            same = isinstance(theirs, list) and [float(x) for x in theirs] == [float(x) for x in mine]
        else:
            same = theirs == mine
        if not same:
            problems.append(f"{d.config_file}: {'.'.join(path)} is {theirs!r} but the recipe's {key} gives "
                            f"{mine!r}; remove it from the file or make them agree")
    if "optimizer" in user and not d.offload_optimizer:
        problems.append(f"{d.config_file}: optimizer: the recipe's training section sets the optimizer (AdamW); "
                        f"remove the file's optimizer section")
    if "scheduler" in user:
        problems.append(f"{d.config_file}: scheduler: the learning-rate schedule comes from the recipe's training "
                        f"section; remove the file's scheduler section")
    return problems


def _without_file(recipe):
    return dataclasses.replace(recipe, distributed=dataclasses.replace(recipe.distributed, config_file=None))


def _read_ds_file(path: str) -> dict:
    try:
        value = read_json_file(path, "DeepSpeed config")
    except UserError as e:
        raise UserError(f"distributed.config_file: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"distributed.config_file: {path}: expected a JSON object")
    return value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _get(d: dict, path: tuple):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d
