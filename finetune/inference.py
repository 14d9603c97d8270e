"""Loading a model for inference: a checkpoint folder (HF or Meta), optionally with a PEFT adapter, with its
tokenizer and the template it was trained with. Used by generate, chat, eval, merge and serve.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from llama_core.model import Transformer
from llama_core.weights import CheckpointError, load_config, load_model, resolve_dtype

from . import hub
from .errors import UserError, load_error_text
from .inputs import read_yaml_file
from .lora import with_fused_layers
from .model_files import find_template, find_tokenizer
from .plan import check_weights_fit

ADAPTER_CONFIG = "adapter_config.json"


def existing_dir(path: str | os.PathLike, what: str) -> Path:
    """A local folder, or a Hugging Face Hub id (owner/name[@revision]) resolved through the Hub's cache."""
    p = hub.resolve_model(path, what)
    if p.is_dir():
        return p
    raise UserError(f"{what} {path}: {'no such folder' if not p.exists() else 'not a folder'} (relative paths are "
                    f"from {os.getcwd()}; a Hugging Face Hub id looks like owner/name)")


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: Path):
    """The PEFT config of an adapter folder."""
    from peft import PeftConfig

    if not is_adapter(adapter_dir):
        raise UserError(f"adapter {adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # noqa: BLE001 - JSON errors, unknown peft_type, ...
        raise UserError(f"{Path(adapter_dir) / ADAPTER_CONFIG}: cannot read: {e}") from None


def read_adapter(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None):
    """(peft LoraConfig, base checkpoint folder) of a PEFT adapter folder; `base` overrides the recorded one."""
    adapter_dir = existing_dir(adapter_dir, "adapter")
    config = read_adapter_config(adapter_dir)
    if base is None and config.base_model_name_or_path and getattr(config, "revision", None) and \
            hub.is_hub_id(config.base_model_name_or_path):
        base = f"{config.base_model_name_or_path}@{config.revision}"  # the Hub snapshot the adapter was trained on
    base = base or config.base_model_name_or_path or _run_base(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass --base")
    return config, existing_dir(base, f"base model of adapter {adapter_dir}:")


def _run_base(adapter_dir: Path) -> str | None:
    """The base of a training run's OUT/final adapter when its config does not name one: OUT/base (a preset
    model's initial weights) or the recipe's model.checkpoint."""
    run = adapter_dir.resolve().parent
    if (run / "base" / "config.json").is_file():
        return str(run / "base")
    try:
        recipe, _ = read_yaml_file(str(run / "recipe.yaml"), "recipe")  # bounded: it may not be a run's at all
        checkpoint = recipe["model"]["checkpoint"]
    except (UserError, KeyError, TypeError):
        return None
    return checkpoint if isinstance(checkpoint, str) else None


def attach_adapter(core: Transformer, adapter_dir: str | os.PathLike, config=None):
    """`PeftModel.from_pretrained` on our model. Our adapters say task_type CAUSAL_LM (for transformers); that
    wrapper needs transformers' generation API, so the plain PeftModel is used here (same weights, same math)."""
    from peft import PeftModel

    from peft.utils import get_peft_model_state_dict

    if config is None:
        config = read_adapter_config(Path(adapter_dir))
    config = with_fused_layers(config)
    config.task_type = None
    stored = _adapter_weight_names(Path(adapter_dir))
    try:
        with warnings.catch_warnings():  # PEFT only warns about missing or unexpected keys: checked below
            warnings.filterwarnings("ignore", message=".*adapter keys.*")
            model = PeftModel.from_pretrained(core, str(adapter_dir), config=config).eval()
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise UserError(f"adapter {adapter_dir} does not fit its base model: {e}") from None
    # The names save_pretrained writes for this model (resized embeddings, which PEFT may add, are not asked for).
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    missing, unexpected = sorted(expected - stored), sorted(n for n in stored - expected if "lora_" in n)
    if missing or unexpected:
        shown = [f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({len(missing)})"] * bool(
            missing) + [f"unknown {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''} "
                        f"({len(unexpected)})"] * bool(unexpected)
        raise UserError(f"adapter {adapter_dir} does not fit its base model: its weights do not match the layers "
                        f"its config adapts: {'; '.join(shown)}")
    return model


def _adapter_weight_names(adapter_dir: Path) -> set[str]:
    """The tensor names in an adapter's weights file (read without loading them)."""
    from safetensors import safe_open

    file = adapter_dir / "adapter_model.safetensors"
    legacy = adapter_dir / "adapter_model.bin"
    try:
        if file.is_file():
            with safe_open(str(file), "pt") as f:
                return set(f.keys())
        if legacy.is_file():
            return set(torch.load(legacy, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt file
        raise UserError(f"adapter {adapter_dir}: cannot read its weights ({load_error_text(e)})") from None
    raise UserError(f"adapter {adapter_dir}: no adapter_model.safetensors (the adapter's weights)")


def load_core(model_dir: Path, dtype, device="cpu") -> Transformer:
    """A checkpoint's model, after checking its weights can fit this machine's memory (before allocating)."""
    try:
        config = load_config(model_dir)
        check_weights_fit(config, resolve_dtype(dtype) or torch.float32, device, str(model_dir))
        return load_model(model_dir, dtype=dtype, device=device, config=config)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def load_for_inference(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, *,
                       dtype: torch.dtype | str = torch.float32, device="cpu"):
    """(model in eval mode, tokenizer, template or None) from a checkpoint folder, optionally with a LoRA adapter
    (merged into the weights in memory). `model_dir` may itself be an adapter folder: its base is loaded."""
    model_dir = existing_dir(model_dir, "model")
    if is_adapter(model_dir):
        if adapter_dir is not None:
            raise UserError(f"--model {model_dir} is an adapter folder; give its base as --model, or omit --adapter")
        model_dir, adapter_dir = None, model_dir
    base = model_dir
    if adapter_dir is not None:
        config, recorded = read_adapter(adapter_dir, base)
        base, adapter_dir = recorded, Path(adapter_dir)
    try:
        dtype = resolve_dtype(dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = load_core(base, dtype, device)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, config).merge_and_unload()
    tokenizer = find_tokenizer(adapter_dir, base)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{tokenizer.path} has {tokenizer.vocab_size} pieces, more than the model's vocabulary "
                        f"({model.config.vocab_size})")
    return model.eval(), tokenizer, find_template(adapter_dir, base, tokenizer=tokenizer)
