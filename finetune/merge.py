"""Loading a model (and its LoRA adapter) for inference, merging an adapter into its base, converting layouts.

    finetune merge --adapter OUT/final --output MERGED/     adapter + base -> one HF checkpoint (checked on a probe)
    finetune export --input DIR --output DIR --format meta  HF <-> Meta layouts, or a DeepSpeed checkpoint -> either

A merged folder is a complete Hugging Face checkpoint: config.json, safetensors, tokenizer.model and a
tokenizer_config.json whose chat_template renders the run's template, so `transformers` loads and prompts it as is.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
import yaml

from llama_core.checkpoint import (CheckpointError, convert, iter_checkpoint_tensors, load_config, load_model,
                                   parse_size, resolve_dtype, save_hf, save_meta)
from llama_core.config import LlamaConfig, get_config
from llama_core.model import Transformer
from llama_core.tokenizer import Tokenizer

from .errors import UserError
from .templates import Template, load_template

ADAPTER_CONFIG = "adapter_config.json"
# Largest |merged - unmerged| logit difference allowed on the probe, relative to max(1, largest |logit|).
# fp32 differs by rounding only; 16-bit merged weights are rounded once more than base + separate fp32 adapter.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


# --- loading ------------------------------------------------------------------------------------------------------

def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not str(path).startswith("."):
        raise UserError(f"{what} {path}: no such folder (relative to {os.getcwd()}). If it is a Hugging Face Hub "
                        f"id: Hub ids are not downloaded by this tool; download it first (huggingface-cli download "
                        f"{path} --local-dir DIR) and pass DIR")
    raise UserError(f"{what} {path}: {'no such folder' if not p.exists() else 'not a folder'}")


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None):
    """(peft LoraConfig, base checkpoint folder) of a PEFT adapter folder; `base` overrides the recorded one."""
    from peft import PeftConfig

    adapter_dir = _existing_dir(adapter_dir, "adapter")
    if not is_adapter(adapter_dir):
        raise UserError(f"adapter {adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as e:  # noqa: BLE001 - JSON errors, unknown peft_type, ...
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG}: cannot read: {e}") from None
    base = base or config.base_model_name_or_path or _run_base(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass --base")
    return config, _existing_dir(base, f"base model of adapter {adapter_dir}:")


def _run_base(adapter_dir: Path) -> str | None:
    """The base of a training run's OUT/final adapter when its config does not name one: OUT/base (a preset
    model's initial weights) or the recipe's model.checkpoint."""
    run = adapter_dir.resolve().parent
    if (run / "base" / "config.json").is_file():
        return str(run / "base")
    try:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
        return recipe["model"]["checkpoint"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def attach_adapter(core: Transformer, adapter_dir: str | os.PathLike, config=None):
    """`PeftModel.from_pretrained` on our model. Our adapters say task_type CAUSAL_LM (for transformers); that
    wrapper needs transformers' generation API, so the plain PeftModel is used here (same weights, same math)."""
    from peft import PeftModel

    from peft.utils import get_peft_model_state_dict

    if config is None:
        config, _ = read_adapter(adapter_dir)
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
        raise UserError(f"adapter {adapter_dir}: cannot read its weights ({type(e).__name__}: {e})") from None
    raise UserError(f"adapter {adapter_dir}: no adapter_model.safetensors (the adapter's weights)")


def find_template(*dirs) -> Template | None:
    """The template.yaml of the first folder that has one (a training run writes it next to the weights)."""
    for d in dirs:
        if d is not None and (file := Path(d) / "template.yaml").is_file():
            return load_template(str(file))
    return None


def find_tokenizer(*dirs) -> Tokenizer:
    tried = [Path(d) / "tokenizer.model" for d in dirs if d is not None]
    for file in tried:
        if file.is_file():
            try:
                return Tokenizer(file)
            except ValueError as e:
                raise UserError(str(e)) from None
    raise UserError(f"no tokenizer.model found (looked for {', '.join(map(str, tried))})")


def _load_core(model_dir: Path, dtype, device="cpu") -> Transformer:
    try:
        return load_model(model_dir, dtype=dtype, device=device)
    except CheckpointError as e:
        raise UserError(str(e)) from None


def load_for_inference(model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, *,
                       dtype: torch.dtype | str = torch.float32, device="cpu"):
    """(model in eval mode, tokenizer, template or None) from a checkpoint folder, optionally with a LoRA adapter
    (merged into the weights in memory). `model_dir` may itself be an adapter folder: its base is loaded."""
    model_dir = _existing_dir(model_dir, "model")
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
    model = _load_core(base, dtype, device)
    if adapter_dir is not None:
        model = attach_adapter(model, adapter_dir, config).merge_and_unload()
    tokenizer = find_tokenizer(adapter_dir, base)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{tokenizer.path} has {tokenizer.vocab_size} pieces, more than the model's vocabulary "
                        f"({model.config.vocab_size})")
    return model.eval(), tokenizer, find_template(adapter_dir, base)


# --- merge --------------------------------------------------------------------------------------------------------

def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: config.json's torch_dtype/dtype, else its first tensor's."""
    if (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text())
        for key in ("torch_dtype", "dtype"):
            try:
                if (dtype := resolve_dtype(hf.get(key))) is not None:
                    return dtype
            except ValueError:
                pass
    return next(iter(iter_checkpoint_tensors(path)))[1].dtype


def probe_batch(vocab_size: int, max_len: int) -> torch.Tensor:
    """Fixed token rows (BOS + seeded ids) to compare models on."""
    rows = torch.randint(3, vocab_size, (3, min(24, max_len)), generator=torch.Generator().manual_seed(1234))
    rows[:, 0] = 1
    return rows


def tokenizer_config(template: Template | None, max_len: int) -> dict:
    """tokenizer_config.json for transformers' LlamaTokenizer (converted from tokenizer.model, needs sentencepiece
    and protobuf). legacy=True prepends SentencePiece's dummy-prefix space after <s>, as LLaMA's tokenizer does."""
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
              "model_max_length": max_len}
    if template is not None:
        config["chat_template"] = template.to_jinja()
    return config


def _quantization_refusal(base: Path, dequantize: bool) -> None:
    hf = json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    q = hf.get("quantization_config")
    if not q:
        return
    method = q.get("quant_method", "unknown") if isinstance(q, dict) else "unknown"
    if not dequantize:
        raise UserError(
            f"{base}/config.json has a quantization_config ({method}): merging into quantized weights would "
            f"round the LoRA update away or produce a checkpoint no loader reads. Merge into the full-precision "
            f"checkpoint it was quantized from (--base DIR), or pass --dequantize to merge into the dequantized "
            f"weights (a 16-bit model that keeps the quantization error the adapter was trained against)")
    print(f"--dequantize: {base} declares {method} quantization; its weights are read in --dtype, the adapter is "
          f"added, and the result is saved unquantized. Packed 4-bit tensors (bitsandbytes) cannot be read here: "
          f"dequantize those with transformers + bitsandbytes on a GPU first (model.dequantize()).")


def merge(adapter_dir: str | os.PathLike, output: str | os.PathLike, *, base: str | os.PathLike | None = None,
          dtype: str = "auto", max_shard_size: str = "5GB", template: str | None = None,
          dequantize: bool = False) -> dict:
    """Merge a LoRA adapter into its base and write an HF checkpoint; returns what was written and the probe."""
    config, base_dir = read_adapter(adapter_dir, base)
    adapter_dir, output = Path(adapter_dir), Path(output)
    for other in (adapter_dir, base_dir):
        if output.resolve() == other.resolve():
            raise UserError(f"--output {output} is the adapter or base folder; choose a new folder")
    _quantization_refusal(base_dir, dequantize)
    try:
        parse_size(max_shard_size)
        target = stored_dtype(base_dir) if dtype == "auto" else resolve_dtype(dtype)
    except (ValueError, CheckpointError) as e:
        raise UserError(str(e)) from None
    tmpl = load_template(template) if template else find_template(adapter_dir)
    tokenizer = find_tokenizer(adapter_dir, base_dir)
    try:
        model = _load_core(base_dir, target)
    except UserError as e:
        if dequantize:
            raise UserError(f"{e}\n(--dequantize: this base holds tensors this tool cannot dequantize)") from None
        raise
    peft_model = attach_adapter(model, adapter_dir, config)
    probe = probe_batch(model.config.vocab_size, model.config.max_seq_len)
    with torch.no_grad():
        expected = peft_model(probe).float()
        with peft_model.disable_adapter():
            base_logits = peft_model(probe).float()
        merged = peft_model.merge_and_unload()
        got = merged(probe).float()
    scale = max(1.0, expected.abs().max().item())
    diff, tolerance = (got - expected).abs().max().item(), PROBE_TOLERANCE[target] * scale
    effect = (expected - base_logits).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise UserError(f"merge check failed: on the probe batch the merged model's logits differ from base + "
                        f"adapter by up to {diff:.3g} (tolerance {tolerance:.3g} in {target}); nothing written")
    extra = {"tokenizer.model": tokenizer.path,
             "tokenizer_config.json": (json.dumps(tokenizer_config(tmpl, model.config.max_seq_len), indent=2,
                                                  ensure_ascii=False) + "\n").encode()}
    if tmpl is not None:
        extra["template.yaml"] = yaml.safe_dump(tmpl.definition, sort_keys=False, allow_unicode=True).encode()
    try:
        save_hf(merged, model.config, output, dtype=target, max_shard_size=max_shard_size, extra_files=extra)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    files = {p.name: p.stat().st_size for p in sorted(output.iterdir())}
    return {"output": str(output), "base": str(base_dir), "dtype": str(target).removeprefix("torch."),
            "files": files, "probe_max_diff": diff, "probe_tolerance": tolerance, "adapter_effect": effect,
            "template": tmpl.name if tmpl is not None else None}


# --- export -------------------------------------------------------------------------------------------------------

def _deepspeed_state(step_dir: Path, config_path: str | None) -> tuple[dict, LlamaConfig, Path | None]:
    """Consolidated fp32 weights of a DeepSpeed training checkpoint (any ZeRO stage, any number of ranks)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise UserError(f"{step_dir} is a DeepSpeed checkpoint; reading it needs deepspeed ({e})") from None

    state_file = step_dir / "trainer_state.json"
    recipe = json.loads(state_file.read_text()).get("recipe", {}) if state_file.is_file() else {}
    if recipe.get("training", {}).get("method") == "lora":
        raise UserError(f"{step_dir} is a LoRA run's checkpoint: it holds the adapter only. Use the run's "
                        f"final/ adapter (finetune merge), or resume LoRA on the same number of ranks")
    try:
        from .distributed import weights_only_loads
        with weights_only_loads():  # DeepSpeed's reader unpickles freely; a checkpoint must never run code
            sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
    except Exception as e:  # noqa: BLE001 - deepspeed raises ValueError, FileNotFoundError, KeyError ...
        raise UserError(f"{step_dir}/deepspeed: cannot consolidate the DeepSpeed checkpoint: {e}") from None
    if any(".lora_" in k for k in sd):
        raise UserError(f"{step_dir}: holds LoRA adapter weights only; use `finetune merge` on the run's final/")
    vocab = sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in sd else None
    model = recipe.get("model", {})
    try:
        if config_path is not None:
            p = Path(config_path)
            config = load_config(p) if p.is_dir() else LlamaConfig.from_hf(json.loads(p.read_text()))
        elif model.get("preset"):
            config = get_config(model["preset"], **{"vocab_size": vocab, **model.get("config", {})})
        elif model.get("checkpoint"):
            config = load_config(model["checkpoint"]).replace(**model.get("config", {}))
        else:
            raise UserError(f"{step_dir}: no trainer_state.json recipe to take the model config from; pass --config "
                            f"(a config.json or a checkpoint folder)")
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"model config for {step_dir}: {e}") from None
    candidates = [step_dir.parent.parent, Path(model["checkpoint"]) if model.get("checkpoint") else None]
    tokenizer = next((d / "tokenizer.model" for d in candidates if d and (d / "tokenizer.model").is_file()), None)
    return sd, config, tokenizer


def export(input_dir: str | os.PathLike, output: str | os.PathLike, *, format: str, shards: int = 1,
           dtype: str | None = None, max_shard_size: str = "5GB", config: str | None = None) -> Path:
    """Convert a checkpoint folder (HF, Meta, or a DeepSpeed training checkpoint) to `format`."""
    input_dir = _existing_dir(input_dir, "input")
    dtype = None if dtype in (None, "auto") else dtype
    # The small files a run keeps next to the weights, read first (the output may replace the input folder) and
    # written inside the new folder before it is renamed into place.
    extra: dict[str, bytes | Path] = {}
    if (input_dir / "template.yaml").is_file():
        extra["template.yaml"] = (input_dir / "template.yaml").read_bytes()
    try:
        if (input_dir / "trainer_state.json").is_file() and not (input_dir / "deepspeed").is_dir():
            raise UserError(f"{input_dir} is a single-device training checkpoint (for resuming); export the run's "
                            f"final/ folder, or run the recipe again to finish it")
        if (input_dir / "deepspeed").is_dir():
            sd, cfg, tokenizer = _deepspeed_state(input_dir, config)
            if tokenizer:
                extra["tokenizer.model"] = tokenizer
        else:
            cfg, tokenizer = load_config(input_dir), input_dir / "tokenizer.model"
        if format == "hf" and tokenizer and Path(tokenizer).is_file():
            tokenizer_cfg = tokenizer_config(find_template(input_dir), cfg.max_seq_len)
            extra["tokenizer_config.json"] = (json.dumps(tokenizer_cfg, indent=2, ensure_ascii=False) + "\n").encode()
        if (input_dir / "deepspeed").is_dir():
            if format == "hf":
                return save_hf(sd, cfg, output, dtype=dtype, max_shard_size=max_shard_size, extra_files=extra)
            return save_meta(sd, cfg, output, num_shards=shards, dtype=dtype, extra_files=extra)
        return convert(input_dir, output, to=format, num_shards=shards, dtype=dtype, max_shard_size=max_shard_size,
                       extra_files=extra)
    except (CheckpointError, ValueError) as e:
        raise UserError(str(e)) from None


# --- command line -------------------------------------------------------------------------------------------------

def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def main(command: str, argv: list[str]) -> int:
    from .cli import parser

    dtypes = ["auto", "float32", "bfloat16", "float16"]
    if command == "merge":
        p = parser("finetune merge", "Merge a LoRA adapter into its base model and write a Hugging Face checkpoint.")
        p.add_argument("--adapter", required=True, help="the adapter folder (a run's OUT/final)")
        p.add_argument("--output", required=True, help="the folder to write")
        p.add_argument("--base", help="the base checkpoint (default: adapter_config.json's base_model_name_or_path)")
        p.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB)")
        p.add_argument("--dtype", default="auto", choices=dtypes, help="default: the base's dtype")
        p.add_argument("--template", help="chat template to embed (default: the adapter's template.yaml)")
        p.add_argument("--dequantize", action="store_true", help="allow a base whose config declares quantization")
        a = p.parse_args(argv)
        r = merge(a.adapter, a.output, base=a.base, dtype=a.dtype, max_shard_size=a.shard_size,
                  template=a.template, dequantize=a.dequantize)
        print(f"merged {a.adapter} into {r['base']} ({r['dtype']}); probe check passed: max logit difference "
              f"{r['probe_max_diff']:.2e} <= {r['probe_tolerance']:.2e} (the adapter moves logits by up to "
              f"{r['adapter_effect']:.3g})")
        if r["template"] is None:
            print("note: no template.yaml in the adapter and no --template: tokenizer_config.json has no chat_template")
        print(f"wrote {r['output']}/:")
        for name, size in r["files"].items():
            print(f"  {name:<40} {_size(size):>10}")
        return 0
    p = parser("finetune export", "Convert a checkpoint between the Hugging Face and Meta layouts, or consolidate a "
                                  "DeepSpeed training checkpoint (checkpoints/step-N) into either.")
    p.add_argument("--input", required=True, help="a checkpoint folder (HF, Meta, or a DeepSpeed run's "
                                                  "checkpoints/step-N)")
    p.add_argument("--output", required=True)
    p.add_argument("--format", required=True, choices=["hf", "meta"])
    p.add_argument("--shards", type=int, default=1, help="Meta model-parallel shards (default 1)")
    p.add_argument("--dtype", default="auto", choices=dtypes, help="default: keep the stored dtype")
    p.add_argument("--shard-size", default="5GB", help="largest safetensors file for --format hf")
    p.add_argument("--config", help="model config.json or checkpoint folder, for a DeepSpeed checkpoint whose "
                                    "trainer_state.json recipe cannot give it")
    a = p.parse_args(argv)
    out = export(a.input, a.output, format=a.format, shards=a.shards, dtype=a.dtype, max_shard_size=a.shard_size,
                 config=a.config)
    print(f"wrote {out}/ ({a.format}):")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:<40} {_size(f.stat().st_size):>10}")
    return 0
