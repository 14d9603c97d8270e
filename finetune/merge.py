"""Merging a LoRA adapter into its base, and converting checkpoint layouts (the `merge` and `export` commands).

    merge   adapter + base -> one HF checkpoint, checked on a probe batch before anything is written
    export  HF <-> Meta layouts, or a DeepSpeed training checkpoint -> either

A merged folder is a complete Hugging Face checkpoint: config.json, safetensors, tokenizer.model and a
tokenizer_config.json whose chat_template renders the run's template, so `transformers` loads and prompts it as is.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError

from llama_core.config import LlamaConfig, get_config
from llama_core.weights import (CheckpointError, convert, iter_checkpoint_tensors, load_config, parse_size,
                                resolve_dtype, save_hf, save_meta)

from .deepspeed_io import weights_only_loads
from .errors import UserError, WriteError, load_error_text
from .inference import attach_adapter, existing_dir, load_core, read_adapter
from .inputs import read_json_file
from .outputs import check_model_output, model_output
from .model_files import companion_files, find_template, find_tokenizer
from .templates import load_template

# Largest |merged - unmerged| logit difference allowed on the probe, relative to max(1, largest |logit|).
# fp32 differs by rounding only; 16-bit merged weights are rounded once more than base + separate fp32 adapter.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


# --- merge --------------------------------------------------------------------------------------------------------

def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint is stored in: config.json's torch_dtype/dtype, else its first tensor's."""
    if (path / "config.json").is_file():
        hf = read_json_file(str(path / "config.json"), "model config")
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


def _quantization_refusal(base: Path, dequantize: bool) -> None:
    hf = read_json_file(str(base / "config.json"), "model config") if (base / "config.json").is_file() else {}
    q = hf.get("quantization_config") if isinstance(hf, dict) else None
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


@contextlib.contextmanager
def _writing(output: Path, overwrite: bool, layout: str = "hf"):
    """The folder a writer fills for --output (see `finetune.outputs.model_output`); a failed write (a full disk:
    OSError, or SafetensorError, which is not one) is a WriteError: nothing new is left at `output`, and what was
    there before is intact."""
    try:
        with model_output(output, overwrite, layout) as target:
            yield target
    except (OSError, SafetensorError) as e:
        raise WriteError(f"could not write {output} ({type(e).__name__}: {str(e)[:300]}); disk full? Nothing was "
                         f"written there, and what was there before is intact") from None
    except CheckpointError as e:
        raise UserError(str(e)) from None


def merge(adapter_dir: str | os.PathLike, output: str | os.PathLike, *, base: str | os.PathLike | None = None,
          dtype: str = "auto", max_shard_size: str = "5GB", template: str | None = None,
          dequantize: bool = False, overwrite: bool = False) -> dict:
    """Merge a LoRA adapter into its base and write an HF checkpoint; returns what was written and the probe.
    `output` follows `finetune.outputs`' rule (a model folder is replaced, keeping files of other kinds; another
    non-empty folder needs `overwrite`), checked before any work."""
    config, base_dir = read_adapter(adapter_dir, base)
    adapter_dir, output = Path(adapter_dir), Path(output)
    for other in (adapter_dir, base_dir):
        if output.resolve() == other.resolve():
            raise UserError(f"--output {output} is the adapter or base folder; choose a new folder")
    check_model_output(output, overwrite)
    _quantization_refusal(base_dir, dequantize)
    try:
        parse_size(max_shard_size)
        target = stored_dtype(base_dir) if dtype == "auto" else resolve_dtype(dtype)
    except (ValueError, CheckpointError) as e:
        raise UserError(str(e)) from None
    tokenizer = find_tokenizer(adapter_dir, base_dir)
    tmpl = load_template(template) if template else find_template(adapter_dir, tokenizer=tokenizer)
    try:
        model = load_core(base_dir, target)
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
    extra = companion_files(tokenizer, tmpl, max_len=model.config.max_seq_len)
    with _writing(output, overwrite) as folder:
        save_hf(merged, model.config, folder, dtype=target, max_shard_size=max_shard_size, extra_files=extra)
    files = {p.name: p.stat().st_size for p in sorted(output.iterdir())}
    return {"output": str(output), "base": str(base_dir), "dtype": str(target).removeprefix("torch."),
            "files": files, "probe_max_diff": diff, "probe_tolerance": tolerance, "adapter_effect": effect,
            "template": tmpl.name if tmpl is not None else None}


# --- export -------------------------------------------------------------------------------------------------------

def is_deepspeed_checkpoint(input_dir: Path) -> bool:
    """Whether a folder to export is a DeepSpeed training checkpoint (else a model folder). A single-device training
    checkpoint (kept for resuming, its weights beside the optimizer state) is refused: its run's final/ is the
    model."""
    deepspeed = (input_dir / "deepspeed").is_dir()
    if (input_dir / "trainer_state.json").is_file() and not deepspeed:
        raise UserError(f"{input_dir} is a single-device training checkpoint (for resuming); export the run's final/ "
                        f"folder, or run the recipe again to finish it")
    return deepspeed


def deepspeed_state(step_dir: Path, config_path: str | None) -> tuple[dict, LlamaConfig, Path | None]:
    """Consolidated fp32 weights of a DeepSpeed training checkpoint (any ZeRO stage, any number of ranks)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise UserError(f"{step_dir} is a DeepSpeed checkpoint; reading it needs deepspeed ({e})") from None

    state_file = step_dir / "trainer_state.json"
    state = read_json_file(str(state_file), "trainer state") if state_file.is_file() else {}
    recipe = state.get("recipe", {}) if isinstance(state, dict) else {}
    recipe = recipe if isinstance(recipe, dict) else {}
    if recipe.get("training", {}).get("method") == "lora":
        raise UserError(f"{step_dir} is a LoRA run's checkpoint: it holds the adapter only. Use the run's "
                        f"final/ adapter (finetune merge), or resume LoRA on the same number of ranks")
    try:
        with weights_only_loads():  # DeepSpeed's reader unpickles freely; a checkpoint must never run code
            sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="deepspeed")
    except Exception as e:  # noqa: BLE001 - deepspeed raises ValueError, FileNotFoundError, KeyError ...
        raise UserError(f"{step_dir}/deepspeed: cannot consolidate the DeepSpeed checkpoint: "
                        f"{load_error_text(e)}") from None
    if any(".lora_" in k for k in sd):
        raise UserError(f"{step_dir}: holds LoRA adapter weights only; use `finetune merge` on the run's final/")
    vocab = sd["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in sd else None
    model = recipe.get("model", {})
    try:
        if config_path is not None:
            p = Path(config_path)
            config = load_config(p) if p.is_dir() else LlamaConfig.from_hf(read_json_file(str(p), "model config"))
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
    return sd, config, [d for d in candidates if d is not None]


def _companions_of(folders: list[Path], max_len: int | None) -> dict[str, bytes | Path]:
    """The tokenizer files and template of the first folder that has a tokenizer (nothing if none has), read now
    (the output may replace the input folder); tokenizer_config.json too with `max_len` (the Hugging Face layout)."""
    try:
        tokenizer = find_tokenizer(*folders)
    except UserError:
        return {}
    template = find_template(*folders, tokenizer=tokenizer)
    files = companion_files(tokenizer, template, max_len=max_len)
    return {name: source if isinstance(source, bytes) else Path(source).read_bytes() for name, source in files.items()}


def export(input_dir: str | os.PathLike, output: str | os.PathLike, *, format: str, shards: int = 1,
           dtype: str | None = None, max_shard_size: str = "5GB", config: str | None = None,
           overwrite: bool = False) -> Path:
    """Convert a checkpoint folder (HF, Meta, or a DeepSpeed training checkpoint) to `format`. `output` follows
    `finetune.outputs`' rule, as for merge."""
    input_dir = existing_dir(input_dir, "input")
    check_model_output(output, overwrite, format)  # onto itself: a model folder is replaced, its other files kept
    dtype = None if dtype in (None, "auto") else dtype
    # The small files a run keeps next to the weights, read first (the output may replace the input folder) and
    # written inside the new folder before it is renamed into place.
    try:
        deepspeed = is_deepspeed_checkpoint(input_dir)
        if deepspeed:
            sd, cfg, folders = deepspeed_state(input_dir, config)
        else:
            cfg, folders = load_config(input_dir), [input_dir]
        extra = _companions_of(folders, cfg.max_seq_len if format == "hf" else None)
        with _writing(Path(output), overwrite, format) as folder:
            if deepspeed:
                if format == "hf":
                    save_hf(sd, cfg, folder, dtype=dtype, max_shard_size=max_shard_size, extra_files=extra)
                else:
                    save_meta(sd, cfg, folder, num_shards=shards, dtype=dtype, extra_files=extra)
            else:
                convert(input_dir, folder, to=format, num_shards=shards, dtype=dtype, max_shard_size=max_shard_size,
                        extra_files=extra, config=cfg)
        return Path(output)
    except (CheckpointError, ValueError) as e:
        raise UserError(str(e)) from None
