"""From a recipe to the objects a run needs: device, tokenizer, model (with LoRA), optimizer, the one-device engine."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from llama_core.config import LlamaConfig, get_config
from llama_core.model import Transformer
from llama_core.tokenizer import Tokenizer
from llama_core.tokenizer import load_tokenizer as load_tokenizer_file
from llama_core.weights import CheckpointError, load_config, load_model

from .chat_templates import load_model_template
from . import hub
from .engine import LocalEngine
from .errors import UserError
from .precision import Precision
from .recipe import LORA_TARGETS, Recipe
from .templates import encode_segments, load_template


def pick_device(local_rank: int | None = None) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank or 0)
    return torch.device("cpu")


def checkpoint_folder(recipe: Recipe, *, configs_only: bool = False) -> Path | None:
    """The folder of model.checkpoint: a local folder, or a Hub id's snapshot in the Hugging Face cache
    (downloaded once; `configs_only`: its small JSON files only, for checks and plans). None for a preset."""
    if recipe.model.checkpoint is None:
        return None
    return _resolved(recipe.model.checkpoint, configs_only)


@functools.cache
def _resolved(checkpoint: str, configs_only: bool) -> Path:
    return hub.resolve_model(checkpoint, "model.checkpoint", configs_only=configs_only)


def tokenizer_path(recipe: Recipe) -> str:
    """tokenizer.path (a file or a folder), else the checkpoint folder (its tokenizer.model or tokenizer.json)."""
    return recipe.tokenizer.path or str(checkpoint_folder(recipe))


def load_tokenizer(recipe: Recipe) -> Tokenizer:
    path = tokenizer_path(recipe)
    try:
        return load_tokenizer_file(path)
    except (ValueError, OSError) as e:
        raise UserError(f"tokenizer: {e}") from None


# The date a template that writes today's date (Llama 3.1's) is given in training: the template's own fallback, so
# that the training text does not change from day to day.
TRAINING_DATE = "26 Jul 2024"


def load_run_template(recipe: Recipe, tokenizer: Tokenizer):
    """The recipe's template: a built-in, a template file, or `model`: the checkpoint's own chat template (its
    folder's tokenizer_config.json, or tokenizer.path's folder). Its control tokens checked against the tokenizer."""
    if recipe.template == "model":
        folder = str(checkpoint_folder(recipe) or recipe.tokenizer.path)
        if os.path.isfile(folder):
            folder = os.path.dirname(folder) or "."
        template = load_model_template(folder, tokenizer, date=TRAINING_DATE)
    else:
        template = load_template(recipe.template)
    template.check_tokenizer(tokenizer)
    return template


def model_config(recipe: Recipe, tokenizer: Tokenizer) -> LlamaConfig:
    """The architecture: a preset (its vocabulary sized to the tokenizer) or the checkpoint's own config."""
    m = recipe.model
    try:
        if m.preset is not None:
            return get_config(m.preset, **{"vocab_size": tokenizer.vocab_size, **m.config})
        config = load_config(checkpoint_folder(recipe, configs_only=True))
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
        model.tie_weights()
        model.reset_parameters(seed=recipe.model.init_seed)
        model.to(dtype)
    else:
        try:
            model = load_model(checkpoint_folder(recipe), dtype=dtype, device=device, format=recipe.model.format,
                               config=config)
        except CheckpointError as e:
            raise UserError(str(e)) from None
    model.activation_checkpointing = recipe.training.activation_checkpointing
    model.kernels = recipe.training.kernels
    if recipe.training.compile:
        for layer in model.model.layers:  # in place: parameter names (checkpoints, PEFT) stay as they are
            layer.compile()
    return model


def lora_targets(recipe: Recipe) -> list[str]:
    targets = recipe.lora.target_modules
    return list(LORA_TARGETS) if targets == "all-linear" else list(targets)


def train_token_ids(recipe: Recipe, tokenizer: Tokenizer, template) -> list[int]:
    """The token rows a LoRA run trains besides the adapter (lora.train_tokens): `auto` = the ids the template
    itself writes into every example (BOS, EOS, end-of-turn and other control tokens), found by encoding a sample
    conversation; off under DeepSpeed (PEFT's trainable tokens are not ZeRO-partitioned)."""
    setting = recipe.lora.train_tokens
    if recipe.training.method != "lora" or setting == "none":
        return []
    if setting == "auto":
        if recipe.distributed.backend == "deepspeed":
            return []
        sample = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        specials = set(tokenizer.special_tokens.values()) | {tokenizer.bos_id, tokenizer.eos_id}
        ids = {i for piece in encode_segments(template.render(sample), tokenizer) for i in piece if i in specials}
        return sorted(i for i in ids if i >= 0)
    ids = []
    for i, token in enumerate(setting):
        found = token if isinstance(token, int) else tokenizer.token_to_id(token)
        if found is None or not 0 <= found < tokenizer.vocab_size:
            raise UserError(f"lora.train_tokens[{i}]: {token!r} is not a token of {tokenizer.path}")
        ids.append(found)
    return sorted(set(ids))


def untrained_rows_warning(model: Transformer, ids: list[int], trained: list[int]) -> str | None:
    """A note when control-token rows the template uses look untrained (their embedding norm far below the
    typical row's) and the LoRA run does not train them: such a base may never learn to stop."""
    weight = model.model.embed_tokens.weight
    if getattr(weight, "ds_shape", None) is not None or not ids:  # partitioned (ZeRO-3): not looked at
        return None
    with torch.no_grad():
        norms = weight.float().norm(dim=1)
        typical = norms.median().item()
        weak = [i for i in ids if i not in trained and norms[i].item() < 0.1 * typical]
    if not weak:
        return None
    return (f"note: the embedding rows of token(s) {weak} that the template uses look untrained (norm below 10% of "
            f"the typical row's); LoRA does not train them with lora.train_tokens: {trained or 'none'}: the model may "
            f"not learn to stop. lora.train_tokens: auto trains them")


def add_lora(model: Transformer, recipe: Recipe, base_path: str | None, token_ids: list[int] = ()):
    """Wrap with PEFT LoRA (or DoRA): only the adapter trains (and, with `token_ids`, those rows of the embedding and
    the untied head, through PEFT's trainable tokens); adapters are kept in fp32."""
    from peft import get_peft_model

    from .lora import lora_config

    lora = recipe.lora
    extra = {}
    if token_ids:
        rows = {"embed_tokens": list(token_ids)}
        if not model.config.tie_word_embeddings:  # a tied head is the embedding: PEFT ties its rows too
            rows["lm_head"] = list(token_ids)
        extra["trainable_token_indices"] = rows
    config = lora_config(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=lora_targets(recipe), use_dora=lora.dora, bias="none", **extra)
    # The adapter's random initialization depends only on the seed, not on how the base was built (building it
    # inside deepspeed.zero.Init draws from the global generator, for instance).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.training.seed)
        peft_model = get_peft_model(model, config)
    # Where `finetune merge` (and PEFT users) find the base: a path, or a Hub id with its revision.
    name, revision = hub.split_hub_id(base_path) if base_path and hub.is_hub_id(base_path) else (base_path, None)
    peft_model.peft_config["default"].base_model_name_or_path = name
    if revision:
        peft_model.peft_config["default"].revision = revision
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
    """Weight decay on matrices (linear layers, embeddings), none on the RMSNorm gains, nor on trained token rows
    (PEFT stores their values, not a delta: decay would shrink the embeddings themselves)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # under ZeRO-3 a parameter's own shape is an empty placeholder: ds_shape is the real one
            matrix = len(getattr(p, "ds_shape", p.shape)) >= 2 and "trainable_tokens" not in name
            (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    t = recipe.training
    # Fused on CPU too: one pass over each tensor instead of a dozen foreach passes; it rounds the same whatever
    # the tensors' alignment, so a resumed run stays bitwise equal.
    return torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                             fused=True if device.type in ("cuda", "cpu") else None)


def base_path(recipe: Recipe) -> str:
    """The base model an adapter of this run belongs to, as adapter_config.json records it: a Hub id (with its
    revision) when the checkpoint came from the Hub, so that the adapter travels to another machine; else the
    checkpoint's absolute path, or OUT/base (a preset's initial weights)."""
    checkpoint = recipe.model.checkpoint
    if checkpoint is not None and hub.is_hub_id(checkpoint):
        return checkpoint
    if checkpoint is not None:
        folder = checkpoint_folder(recipe)
        if (repo := hub.hub_id_of(folder)) is not None:  # a folder inside the Hugging Face cache
            return f"{repo}@{hub.hub_revision_of(folder)}"
        return os.path.abspath(checkpoint)
    return os.path.abspath(os.path.join(recipe.output_dir, "base"))


def local_engine(recipe: Recipe, tokenizer: Tokenizer, precision: Precision, device: torch.device,
                 token_ids: list[int] = ()) -> LocalEngine:
    """The one-device engine of a recipe: the model (a frozen base in the precision's dtype under LoRA, fp32
    master weights for full fine-tuning), LoRA if asked, the optimizer."""
    t = recipe.training
    base = build_model(recipe, tokenizer, device, precision.weights if t.method == "lora" else torch.float32)
    if t.quantize:
        quantize_base_4bit(base, device)
    num_parameters = base.num_parameters()
    module = base
    if t.method == "lora":
        module = add_lora(base, recipe, base_path(recipe), token_ids)
    else:
        for p in base.parameters():
            p.requires_grad_(True)
    return LocalEngine(module, base, make_optimizer(module, recipe, device), precision, device,
                       grad_clip=t.grad_clip, release_memory=t.release_memory, num_parameters=num_parameters)
