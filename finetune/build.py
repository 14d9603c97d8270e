"""From a recipe to the objects a run needs: device and precision, tokenizer, template, model (with LoRA), optimizer."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from llama_core import kernels
from llama_core.checkpoint import CheckpointError, load_config, load_model
from llama_core.config import LlamaConfig, get_config
from llama_core.model import Transformer
from llama_core.tokenizer import Tokenizer

from .errors import UserError
from .recipe import LORA_TARGETS, Recipe


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    weights: torch.dtype  # dtype of weights that are not trained (the LoRA base); trained ones stay fp32
    autocast: torch.dtype | None  # compute dtype inside the forward pass; None means plain fp32


def pick_device(local_rank: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank or 0)
    return torch.device("cpu")


def resolve_precision(setting: str, device: torch.device) -> Precision:
    if setting == "auto":
        if device.type != "cuda":
            setting = "fp32"
        else:
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting != "fp32" and device.type != "cuda":
        raise UserError(f"training.precision: {setting} needs a CUDA GPU; on CPU use fp32 (bf16 matrix work on "
                        f"CPU is far slower)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]
    return Precision(setting, dtype, None if setting == "fp32" else dtype)


def autocast_context(precision: Precision, device: torch.device):
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast)


def tokenizer_path(recipe: Recipe) -> str:
    return recipe.tokenizer.path or os.path.join(recipe.model.checkpoint, "tokenizer.model")


def load_tokenizer(recipe: Recipe) -> Tokenizer:
    path = tokenizer_path(recipe)
    try:
        return Tokenizer(path)
    except (ValueError, OSError) as e:
        raise UserError(f"tokenizer: {e}") from None


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> LlamaConfig:
    """The architecture: a preset (its vocabulary sized to the tokenizer) or the checkpoint's own config."""
    m = recipe.model
    try:
        if m.preset is not None:
            return get_config(m.preset, **{"vocab_size": tokenizer.vocab_size, **m.config})
        config = load_config(m.checkpoint)
        return config.replace(**m.config) if m.config else config
    except (ValueError, TypeError) as e:
        raise UserError(f"model: {e}") from None


def build_model(recipe: Recipe, tokenizer: Tokenizer, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The base model with its weights: random (seeded) for a preset, else loaded from the checkpoint."""
    config = model_config(recipe, tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"tokenizer {tokenizer_path(recipe)} has {tokenizer.vocab_size} pieces but the model's "
                        f"vocabulary has only {config.vocab_size}")
    if recipe.model.preset is not None:
        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device=device)
        model.reset_parameters(seed=recipe.model.init_seed)
        model.to(dtype)
    else:
        try:
            model = load_model(recipe.model.checkpoint, dtype=dtype, device=device, format=recipe.model.format,
                               config=config)
        except CheckpointError as e:
            raise UserError(str(e)) from None
    model.activation_checkpointing = recipe.training.activation_checkpointing
    kernels.set_backend(recipe.training.kernels)
    if recipe.training.compile:
        for layer in model.model.layers:  # in place: parameter names (checkpoints, PEFT) stay as they are
            layer.compile()
    return model


def lora_targets(recipe: Recipe) -> list[str]:
    targets = recipe.lora.target_modules
    return list(LORA_TARGETS) if targets == "all-linear" else list(targets)


def add_lora(model: Transformer, recipe: Recipe, base_path: str | None):
    """Wrap with PEFT LoRA (or DoRA): only the adapter trains; adapters are kept in fp32."""
    from peft import get_peft_model

    from .lora import lora_config

    lora = recipe.lora
    config = lora_config(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora_targets(recipe), use_dora=lora.dora, bias="none")
    # The adapter's random initialization depends only on the seed, not on how the base was built (building it
    # inside deepspeed.zero.Init draws from the global generator, for instance).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.training.seed)
        peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = base_path  # where `finetune merge` finds the base
    # The adapter we write is a transformers causal-LM adapter: PeftModel.from_pretrained on LlamaForCausalLM
    # reads it. (Wrapping our model as CAUSAL_LM would require transformers' generation API.)
    peft_model.peft_config["default"].task_type = "CAUSAL_LM"
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return peft_model


def quantize_base_4bit(model: Transformer, device: torch.device) -> None:
    """QLoRA: replace the linear layers of the blocks with bitsandbytes 4-bit NF4 layers (CUDA only)."""
    if device.type != "cuda":
        raise UserError("training.quantize: 4bit (QLoRA) needs a CUDA GPU and bitsandbytes; on CPU remove it")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("training.quantize: 4bit needs bitsandbytes: pip install 'llama-finetune[qlora]'") from None
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to(device))


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear layers, embeddings), none on the RMSNorm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # under ZeRO-3 a parameter's own shape is an empty placeholder: ds_shape is the real one
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    t = recipe.training
    # Fused on CPU too: one pass over each tensor instead of a dozen foreach passes (58M parameters: 28 ms instead of
    # 170 ms a step); it rounds the same whatever the tensors' alignment, so a resumed run stays bitwise equal.
    return torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                             fused=True if device.type in ("cuda", "cpu") else None)


def load_adapter(model: Transformer, adapter_dir: str, *, trainable: bool = False):
    """A PEFT adapter directory applied to our model (the adapter says CAUSAL_LM for transformers' sake; on our
    model it loads as a plain PeftModel, which needs no generation API)."""
    from peft import PeftConfig, PeftModel

    from .lora import with_fused_layers

    config = with_fused_layers(PeftConfig.from_pretrained(adapter_dir))
    config.task_type = None
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=trainable)
