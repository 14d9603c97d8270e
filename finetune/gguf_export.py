"""GGUF export for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's own writer).

The file holds what llama.cpp's `convert_hf_to_gguf.py` writes for a Hugging Face Llama model (class LlamaModel):
the hyperparameters under `llama.*`, the tokenizer (finetune.gguf_vocab: SentencePiece `tokenizer.model` as
tokenizer model "llama", or a Llama 3 byte-level BPE `tokenizer.json` or Meta's tiktoken `tokenizer.model` as
"gpt2" with pre-tokenizer "llama-bpe"), the tokenizer's special token ids (with <|eot_id|> as llama.cpp's end of turn), the chat template,
rope scaling (linear as metadata, llama3 as the `rope_freqs.weight` factors), and the tensors under
llama.cpp's names. q_proj/k_proj are permuted from Hugging Face's rotary layout (pairs i, i + head_dim/2) to the
interleaved one llama.cpp's LLaMA uses (pairs 2i, 2i+1), as the converter does. Norms and other 1-D tensors stay
f32; q8_0 needs rows that are a multiple of 32 values, and a tensor whose rows are not is written as f16 instead
(as the converter does), with a note.

The tensor layout is planned from the config before any tensor is read, the header written, and each tensor then
written at its offset as it arrives (any order): one tensor in memory at a time. The file is written to a temporary
sibling and renamed into place (llama_core.files.atomic_write): a failure leaves nothing behind.

    write_gguf(output, config, tensors, tokenizer=...)    the writer, for any source of tensors
    export_gguf(input_dir, output, dtype=...)             `finetune export --format gguf`: a checkpoint folder (HF,
                                                          Meta, a DeepSpeed training checkpoint, a Hub id) to a file
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_core.files import OutputError, atomic_write, check_writable_file
from llama_core.tokenizer import Tokenizer
from llama_core.weights import permute_hf_to_meta

from .chat_templates import chat_template_of
from .errors import UserError
from .gguf_vocab import SPECIAL_KINDS, Vocab, load_vocab

try:
    import gguf
except ImportError:  # an optional extra: only this export needs it
    gguf = None

DTYPES = ("f32", "f16", "bf16", "q8_0")


# --- tensors ------------------------------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    gguf_name: str
    shape: tuple[int, ...]  # numpy order (rows, columns), as in the checkpoint
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    offset: int = 0  # from the start of the data section
    heads: int | None = None  # q_proj / k_proj: the number of heads to permute with
    value: np.ndarray | None = None  # a tensor computed here (rope_freqs), not read from the checkpoint


def _config_values(config) -> dict:
    """The config's fields this module uses (a LlamaConfig)."""
    return {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
            "n_kv_heads": config.n_kv_heads or config.n_heads, "vocab_size": config.vocab_size,
            "hidden_dim": config.hidden_dim, "head_dim": config.dim // config.n_heads,
            "tied": bool(config.tie_word_embeddings), "rope_scaling": config.rope_scaling or None}


def plan_tensors(c: dict, dtype: str) -> tuple[dict[str, PlannedTensor], list[str]]:
    """Hugging Face name -> its GGUF tensor, in file order; and the names of tensors q8_0 could not take."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["n_layers"])
    dim, hd, hidden = c["dim"], c["head_dim"], c["hidden_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], dim)}
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (dim,),
            p + "self_attn.q_proj.weight": (c["n_heads"] * hd, dim),
            p + "self_attn.k_proj.weight": (c["n_kv_heads"] * hd, dim),
            p + "self_attn.v_proj.weight": (c["n_kv_heads"] * hd, dim),
            p + "self_attn.o_proj.weight": (dim, c["n_heads"] * hd),
            p + "post_attention_layernorm.weight": (dim,),
            p + "mlp.gate_proj.weight": (hidden, dim),
            p + "mlp.up_proj.weight": (hidden, dim),
            p + "mlp.down_proj.weight": (dim, hidden),
        })
    shapes["model.norm.weight"] = (dim,)
    if not c["tied"]:  # tied: llama.cpp uses token_embd.weight as the output projection when output.weight is absent
        shapes["lm_head.weight"] = (c["vocab_size"], dim)
    wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    plan, fallbacks = {}, []
    for name, shape in shapes.items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
        qtype = wanted
        if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32  # as the converter: llama.cpp wants 1-D tensors in f32
        elif shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # the converter's fallback when a row does not fill whole blocks
            fallbacks.append(gguf_name)
        heads = c["n_heads"] if name.endswith("q_proj.weight") else \
            c["n_kv_heads"] if name.endswith("k_proj.weight") else None
        plan[name] = PlannedTensor(gguf_name, shape, qtype, _nbytes(shape, qtype), heads=heads)
    return plan, fallbacks


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def llama3_rope_factors(scaling: Mapping, head_dim: int, theta: float) -> np.ndarray:
    """rope_freqs.weight for Llama 3.1's rope scaling: llama.cpp divides each rotary frequency by its factor
    (1 for high frequencies, `factor` for low ones, smoothly in between), as convert_hf_to_gguf.py computes it."""
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    if low == high:
        raise UserError(f"rope_scaling: low_freq_factor and high_freq_factor must differ, both are {low}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _rope_scaling(scaling) -> tuple[str, dict]:
    """("none" | "linear" | "llama3", the dict), validated."""
    if scaling is None:
        return "none", {}
    if not isinstance(scaling, Mapping):
        raise UserError(f"rope_scaling must be a mapping or None, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return "none", {}
    if kind not in ("linear", "llama3"):
        raise UserError(f"rope_scaling type {kind!r} is not supported by GGUF export (only linear and llama3)")
    numbers = {k: v for k, v in scaling.items() if k in ("factor", "low_freq_factor", "high_freq_factor",
                                                         "original_max_position_embeddings")}
    bad = {k: v for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
    if bad or (kind == "linear" and "factor" not in numbers):
        raise UserError(f"rope_scaling {dict(scaling)}: {kind} scaling needs a positive number 'factor'"
                        + (f"; bad values {bad}" if bad else ""))
    return kind, dict(scaling)


# --- the file -----------------------------------------------------------------------------------------------------

@dataclass
class Written:
    """What write_gguf wrote."""
    path: Path
    dtype: str  # the dtype asked for (norms are f32; see f16_instead)
    tensors: int
    vocab_size: int
    chat_template: bool
    f16_instead: list[str]  # q8_0: the GGUF names of tensors written as f16 (rows not a multiple of 32 values)

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def write_gguf(output: str | os.PathLike, config, tensors: Iterable[tuple[str, torch.Tensor]] | Mapping, *,
               tokenizer: str | os.PathLike | Tokenizer, chat_template: str | None = None, dtype: str = "f32",
               name: str = "llama", special_ids: Mapping[str, int] | None = None) -> Written:
    """Write a llama.cpp GGUF file of a Llama model.

    config: a LlamaConfig (tie_word_embeddings: no output.weight; rope_scaling: linear or llama3).
    tensors: (name, tensor) pairs with Hugging Face names, in any order, consumed once (a generator reading a
        checkpoint shard by shard keeps one tensor in memory); a state dict works too. `rotary_emb.inv_freq`
        buffers are skipped; with tied embeddings, lm_head.weight is too.
    tokenizer: a llama_core Tokenizer, or a tokenizer file or model folder (read by load_tokenizer): SentencePiece,
        or byte-level BPE (Llama 3's tokenizer.json, with its tokenizer_config.json; Meta's tiktoken file).
        bos, eos and unk are the tokenizer's; <|eot_id|> / <|eom_id|> become llama.cpp's eot / eom ids.
    chat_template: a Jinja chat template (tokenizer_config.json's `chat_template`), stored as tokenizer.chat_template.
    dtype: f32, f16, bf16 or q8_0 for the 2-D tensors.
    special_ids: token ids overriding the tokenizer's, by kind: bos, eos, unk, pad, eot, eom.
    Bad input raises UserError, and nothing is left at `output` (an existing file there stays as it was; whether
    one may be replaced is the caller's rule: see export_gguf).
    """
    if gguf is None:
        raise UserError("GGUF export needs the gguf package (llama.cpp's writer): pip install gguf")
    if dtype not in DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise UserError(f"chat_template must be a string, got {type(chat_template).__name__}")
    output = _check_output(output)
    c = _config_values(config)
    scaling_kind, scaling = _rope_scaling(c["rope_scaling"])
    vocab = load_vocab(tokenizer, c["vocab_size"])
    for kind, token_id in (special_ids or {}).items():
        if kind not in SPECIAL_KINDS:
            raise UserError(f"special_ids: unknown kind {kind!r}; valid: {', '.join(SPECIAL_KINDS)}")
        if not isinstance(token_id, int) or not 0 <= token_id < c["vocab_size"]:
            raise UserError(f"special_ids: {kind} id {token_id!r} is not a token id (0 .. {c['vocab_size'] - 1})")
        vocab.special_ids[kind] = token_id
    plan, fallbacks = plan_tensors(c, dtype)
    if scaling_kind == "llama3":  # first, as the converter's generate_extra_tensors
        factors = llama3_rope_factors(scaling, c["head_dim"], float(config.rope_theta))
        plan = {"rope_freqs.weight": PlannedTensor("rope_freqs.weight", factors.shape, gguf.GGMLQuantizationType.F32,
                                                   factors.nbytes, value=factors), **plan}

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, config, c, dtype, name, scaling_kind, scaling, vocab, chat_template)
    size = 0
    for t in plan.values():  # offsets as the writer computes them: each tensor padded to the alignment
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        t.offset = size
        size += writer.ggml_pad(t.nbytes, writer.data_alignment)

    with atomic_write(output, "wb") as f:
        # The writer writes the header, metadata and tensor infos through its own handle on the temporary file;
        # the data then goes through `f`, each tensor at its planned offset.
        writer.write_header_to_file(path=Path(f.name))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        data_start = writer.ggml_pad(f.seek(0, os.SEEK_END), writer.data_alignment)
        for t in plan.values():
            if t.value is not None:
                _write_at(f, data_start + t.offset, t.value)
        _write_tensors(f, data_start, plan, tensors, c["tied"])
        f.truncate(data_start + size)  # the padding after the last tensor
    if fallbacks:
        print(f"note: {len(fallbacks)} tensor(s) have rows that are not a multiple of 32 values and were written as "
              f"f16 instead of q8_0: {', '.join(fallbacks)}", file=sys.stderr)
    return Written(output, dtype, len(plan), c["vocab_size"], bool(chat_template), fallbacks)


def _check_output(output) -> Path:
    try:
        path = check_writable_file(output)
    except OutputError as e:
        raise UserError(str(e)) from None
    if path.exists() and not path.is_file():
        raise UserError(f"{path}: is not a regular file; GGUF is written to a file (it is not a stream format)")
    if str(os.path.abspath(path)).startswith(("/dev/", "/proc/")):
        raise UserError(f"{path}: GGUF is written to a regular file, not a device or stream")
    return path


def _add_metadata(w, config, c: dict, dtype: str, name: str, scaling_kind: str, scaling: dict, vocab: Vocab,
                  chat_template: str | None) -> None:
    """The keys convert_hf_to_gguf.py writes for a Llama model."""
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(c["n_layers"])
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(c["dim"])
    w.add_feed_forward_length(c["hidden_dim"])
    w.add_head_count(c["n_heads"])
    w.add_head_count_kv(c["n_kv_heads"])
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_file_type(file_type)
    w.add_vocab_size(c["vocab_size"])
    w.add_rope_dimension_count(c["head_dim"])
    if scaling_kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for kind in SPECIAL_KINDS:
        if kind in vocab.special_ids:
            getattr(w, f"add_{kind}_token_id")(vocab.special_ids[kind])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        w.add_chat_template(chat_template)


def _write_tensors(f, data_start: int, plan: dict[str, PlannedTensor], tensors, tied: bool) -> None:
    if isinstance(tensors, Mapping):
        tensors = tensors.items()
    seen = set()
    for hf_name, tensor in tensors:
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by llama.cpp; the tied output projection is token_embd.weight
        t = plan.get(hf_name)
        if t is None or t.value is not None:
            raise UserError(f"unexpected tensor {hf_name!r} for a Llama model with this config "
                            f"(expected names like {next(iter(plan))!r})")
        if hf_name in seen:
            raise UserError(f"tensor {hf_name!r} given twice")
        if tuple(tensor.shape) != t.shape:
            raise UserError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, the config says {t.shape}")
        seen.add(hf_name)
        data = tensor.detach().to("cpu", torch.float32)
        if t.heads is not None:
            data = permute_hf_to_meta(data, t.heads)  # llama.cpp's rotary pairs are Meta's (2i, 2i+1)
        array = gguf.quants.quantize(data.numpy(), t.qtype)
        del data
        if array.nbytes != t.nbytes:  # a bug here, not the user's input
            raise RuntimeError(f"{t.gguf_name}: {array.nbytes} bytes, {t.nbytes} planned")
        _write_at(f, data_start + t.offset, array)
    missing = [n for n, t in plan.items() if n not in seen and t.value is None]
    if missing:
        raise UserError(f"{len(missing)} tensor(s) missing from the checkpoint: {', '.join(missing[:5])}"
                        + (" ..." if len(missing) > 5 else ""))


def _write_at(f, position: int, array: np.ndarray) -> None:
    f.seek(position)
    f.write(np.ascontiguousarray(array).data)


# --- `finetune export --format gguf` ------------------------------------------------------------------------------

FROM_TORCH = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # --dtype auto


def check_gguf_output(output: str | os.PathLike, overwrite: bool) -> Path:
    """The rule for a GGUF --output, checked before any work: a file name ending in .gguf, not a folder, not a
    symbolic link, not a device; an existing file only with `overwrite` (then replaced whole, once the new file is
    complete). UserError otherwise."""
    text = os.fspath(output)
    if text.endswith(("/", os.sep)) or not text.lower().endswith(".gguf"):
        raise UserError(f"--output {text}: --format gguf writes one file, whose name ends in .gguf (not a folder)")
    path = _check_output(text)
    if path.exists() and not overwrite:
        raise UserError(f"--output {path}: exists; pass --overwrite to replace it (the new file is written beside it "
                        f"and renamed over it only once complete)")
    return path


def export_gguf(input_dir: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "auto",
                overwrite: bool = False, config: str | os.PathLike | None = None) -> Written:
    """A checkpoint folder (HF or Meta layout, a DeepSpeed run's checkpoints/step-N, or a Hub id) as one GGUF file,
    with the folder's tokenizer, the run's template (template.yaml) or the folder's chat template, and the rope
    settings. dtype: f32, f16, bf16, q8_0, or auto (the stored dtype: float32 -> f32, bfloat16 -> bf16, float16 ->
    f16; a DeepSpeed checkpoint's consolidated weights are float32). `config`: for a DeepSpeed checkpoint whose
    recipe cannot give the model config (as `finetune export --config`)."""
    from llama_core.weights import CheckpointError, iter_checkpoint_tensors, load_config

    from .hub import hub_id_of
    from .inference import existing_dir, is_adapter
    from .merge import deepspeed_state, is_deepspeed_checkpoint, stored_dtype
    from .model_files import find_template, find_tokenizer

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: --format gguf takes auto, {', '.join(DTYPES)}")
    output = check_gguf_output(output, overwrite)
    if gguf is None:
        raise UserError("GGUF export needs the gguf package (llama.cpp's writer): pip install gguf")
    input_dir = existing_dir(input_dir, "--input")
    if is_adapter(input_dir):
        raise UserError(f"{input_dir} is a LoRA adapter (adapter_config.json), not a whole model: merge it first with "
                        f"finetune merge --adapter {input_dir} --output MERGED, then export MERGED")
    deepspeed = is_deepspeed_checkpoint(input_dir)
    try:
        if deepspeed:
            state, cfg, folders = deepspeed_state(input_dir, config)
            tensors, stored = state.items(), torch.float32
            name = input_dir.resolve().parent.parent.name
        else:
            cfg, folders = load_config(input_dir), [input_dir]
            tensors = iter_checkpoint_tensors(input_dir, config=cfg)
            stored = stored_dtype(input_dir) if dtype == "auto" else None
            name = _model_name(input_dir, hub_id_of(input_dir))
        if dtype == "auto":
            if stored not in FROM_TORCH:
                raise UserError(f"{input_dir}: stored as {stored}, which has no GGUF counterpart; pass --dtype "
                                f"({', '.join(DTYPES)})")
            dtype = FROM_TORCH[stored]
        tokenizer = find_tokenizer(*folders)
        # The template the model was trained with: a run's template.yaml (final/, merged, exported folders), the
        # recipe's (a DeepSpeed checkpoint), else the folder's own chat template.
        template = _recipe_template(input_dir) if deepspeed else find_template(*folders)
        chat = template.to_jinja() if template is not None else \
            next((t for folder in folders if (t := chat_template_of(folder)) is not None), None)
        return write_gguf(output, cfg, tensors, tokenizer=tokenizer, chat_template=chat, dtype=dtype, name=name)
    except (CheckpointError, ValueError) as e:  # a damaged or mismatched checkpoint, seen while it is read
        raise UserError(str(e)) from None


def _model_name(folder: Path, hub_id: str | None) -> str:
    """general.name: a Hub model's name, a run's name for its final/, else the folder's name."""
    if hub_id:
        return hub_id.split("/")[-1]
    folder = folder.resolve()
    return (folder.parent.name if folder.name == "final" else folder.name) or "llama"


def _recipe_template(step_dir: Path):
    """The built-in or file template a DeepSpeed checkpoint's run trained with (its trainer_state.json recipe);
    None for `template: model` (the model's own chat template is then used) or a template file that is gone."""
    from .inputs import read_json_file
    from .templates import load_template

    state = read_json_file(str(step_dir / "trainer_state.json"), "trainer state")
    recipe = state.get("recipe") if isinstance(state, dict) else None
    name = recipe.get("template", "alpaca") if isinstance(recipe, dict) else None
    if not isinstance(name, str) or name == "model":
        return None
    try:
        return load_template(name)
    except UserError as e:
        print(f"note: the run's template cannot be read ({e}); the GGUF file gets the model folder's chat template, "
              f"if any", file=sys.stderr)
        return None
