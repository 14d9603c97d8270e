"""Checkpoints in the Hugging Face layout (config.json + safetensors, sharded or not) and in Meta's original one
(params.json + model-parallel consolidated.NN.pth): detection, streaming reads, atomic writes and conversion.

Tensors are named as in `model.py` (Hugging Face's names, half-split rotary layout) everywhere in this module's
API; Meta's names, its model-parallel split and its interleaved rotary layout only exist inside the files.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LlamaConfig
from .files import AtomicFolder, OutputError
from .model import Transformer

HF_CONFIG, HF_SINGLE, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
HF_GENERATION = "generation_config.json"
META_PARAMS = "params.json"
_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.(original_)?inv_freq|rope\.freqs)$")  # stale buffers of old saves

# Meta's module names, ours, and the dim fairscale splits each along across model-parallel shards (None:
# replicated): ParallelEmbedding splits dim 1, ColumnParallelLinear dim 0 (outputs), RowParallelLinear dim 1.
_META_TOP = [("tok_embeddings", "model.embed_tokens", 1), ("norm", "model.norm", None), ("output", "lm_head", 0)]
_META_LAYER = [("attention.wq", "self_attn.q_proj", 0), ("attention.wk", "self_attn.k_proj", 0),
               ("attention.wv", "self_attn.v_proj", 0), ("attention.wo", "self_attn.o_proj", 1),
               ("feed_forward.w1", "mlp.gate_proj", 0), ("feed_forward.w2", "mlp.down_proj", 1),
               ("feed_forward.w3", "mlp.up_proj", 0), ("attention_norm", "input_layernorm", None),
               ("ffn_norm", "post_attention_layernorm", None)]
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


class CheckpointError(ValueError):
    """An unreadable, inconsistent or unwritable checkpoint; the message names the file (and tensor)."""


# --- names, rotary layout, small helpers ---

def meta_names(n_layers: int) -> dict[str, tuple[str, int | None]]:
    """Our tensor name -> (Meta's name, dim of its model-parallel split or None)."""
    names = {f"{ours}.weight": (f"{meta}.weight", dim) for meta, ours, dim in _META_TOP}
    for i in range(n_layers):
        names |= {f"model.layers.{i}.{ours}.weight": (f"layers.{i}.{meta}.weight", dim)
                  for meta, ours, dim in _META_LAYER}
    return names


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows from Meta's interleaved rotary pairs (2i, 2i+1) to HF's half-split pairs (i, i + d/2)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _rotary_heads(name: str, config: LlamaConfig) -> int | None:
    """Heads of a q/k projection (which the rotary permutation applies to), None for other tensors."""
    if name.endswith("self_attn.q_proj.weight"):
        return config.n_heads
    return config.n_kv_heads if name.endswith("self_attn.k_proj.weight") else None


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch.bfloat16, "bf16", "bfloat16", "torch.bfloat16", ... -> torch.bfloat16; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.removeprefix("torch.") not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    return _DTYPES[dtype.removeprefix("torch.")]


def parse_size(size: int | str) -> int:
    """Bytes in 5000000, "5GB" (10^9), "5GiB" (2^30), "500MB", ..., as Hugging Face reads max_shard_size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if isinstance(size, bool) or not m or float(m[1]) <= 0:
        raise ValueError(f"invalid size {size!r}; use bytes or a number with a unit (B, KB, MB, GB, KiB, MiB, GiB), "
                         f"e.g. '5GB', '500MB', '80GiB'")
    unit = (m[2] or "B").upper()
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
                              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit])


JSON_LIMIT = 64 << 20  # config.json, params.json, an index: far smaller than this


def _read_json(file: Path) -> dict:
    """A small JSON object of a checkpoint folder: a regular file, bounded in size and nesting."""
    try:
        if not file.is_file():
            raise CheckpointError(f"{file}: not a regular file")
        with open(file, "rb") as f:
            raw = f.read(JSON_LIMIT + 1)
        if len(raw) > JSON_LIMIT:
            raise CheckpointError(f"{file}: larger than {JSON_LIMIT >> 20} MB; not a checkpoint's JSON file")
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{file}: cannot read JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A .pth state dict, memory-mapped; refuses (never executes) pickles that need anything but tensors."""
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zipfile" not in str(e).lower():
                raise
            # The legacy (pre-zip) format cannot be memory-mapped: load it whole; its own error is the one to report.
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, OSError ...
        raise CheckpointError(f"{file}: {_load_failure(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{file}: not a state dict (a dict of tensor names to tensors)")
    return sd


def _load_failure(e: Exception) -> str:
    """What went wrong in torch.load, in one line. torch's advice to load with weights_only=False is left out on
    purpose: that would run whatever code the file holds."""
    text = str(e)
    if "Weights only load failed" in text:
        if glob := re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text):
            return (f"refusing to unpickle objects other than tensors (it needs {glob[1]}); a checkpoint must "
                    f"never run code")
        return "not a readable torch checkpoint (its pickle holds something other than tensors, or is damaged)"
    first = next((line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line), "")
    return f"cannot load ({type(e).__name__}: {first[:200]})" if first else f"cannot load ({type(e).__name__})"


def _meta_shard_files(path: Path) -> list[Path]:
    found = sorted((int(m[1]), p) for p in path.iterdir() if (m := _META_SHARD.fullmatch(p.name)))
    if [i for i, _ in found] != list(range(len(found))):
        raise CheckpointError(f"{path}: model-parallel shards must be consolidated.00.pth .. consolidated.NN.pth "
                              f"without gaps; found {[p.name for _, p in found] or 'none'}")
    return [p for _, p in found]


# --- reading ---

def detect_format(path: str | os.PathLike) -> str:
    """The layout of a checkpoint directory: "hf" (config.json + safetensors) or "meta" (params.json + .pth)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found" if not path.exists()
                              else f"{path}: a checkpoint must be a directory, this is a file")
    names = sorted(p.name for p in path.iterdir())
    if HF_CONFIG in names and any(n.endswith(".safetensors") or n == HF_INDEX for n in names):
        return "hf"
    if META_PARAMS in names and any(_META_SHARD.fullmatch(n) for n in names):
        return "meta"
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")
    raise CheckpointError(f"{path}: not a LLaMA checkpoint; expected config.json + *.safetensors (Hugging Face) or "
                          f"params.json + consolidated.NN.pth (Meta), found: {shown or 'an empty directory'}")


def _resolve_format(path: Path, format: str) -> str:
    if format not in ("auto", "hf", "meta"):
        raise ValueError(f"format must be 'auto', 'hf' or 'meta', got {format!r}")
    return detect_format(path) if format == "auto" else format


def load_config(path: str | os.PathLike, format: str = "auto") -> LlamaConfig:
    path = Path(path)
    format = _resolve_format(path, format)
    file = path / (HF_CONFIG if format == "hf" else META_PARAMS)
    params = _read_json(file)
    try:
        if format == "hf":
            return LlamaConfig.from_hf(params)
        files = _meta_shard_files(path)
        shards = [_torch_load(f) for f in files]  # memory-mapped
        if "tok_embeddings.weight" not in shards[0]:
            raise CheckpointError(f"{files[0]}: tensor 'tok_embeddings.weight' not found")
        # The original releases store vocab_size -1: it is read off the embedding (split along dim 1).
        vocab_size = shards[0]["tok_embeddings.weight"].shape[0]
        return LlamaConfig.from_meta(params, vocab_size=vocab_size, tied=_meta_tied(shards))
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def _meta_tied(shards: list[dict[str, torch.Tensor]]) -> bool:
    """Whether a Meta checkpoint's output matrix is its embedding: absent, or equal to it (Meta's layout always has
    a separate `output`; this project writes the embedding there for a tied model)."""
    if "output.weight" not in shards[0]:
        return True
    # First row first (the output is split by rows, the embedding by columns): an untied model differs there, so
    # only a tied one pays for comparing the whole matrices.
    first = torch.cat([sd["tok_embeddings.weight"][:1] for sd in shards], 1)
    if not torch.equal(shards[0]["output.weight"][:1], first):
        return False
    output = torch.cat([sd["output.weight"] for sd in shards], 0) if len(shards) > 1 else shards[0]["output.weight"]
    embedding = (torch.cat([sd["tok_embeddings.weight"] for sd in shards], 1) if len(shards) > 1
                 else shards[0]["tok_embeddings.weight"])
    return output.shape == embedding.shape and torch.equal(output, embedding)


def _hf_files(path: Path) -> list[tuple[Path, list[str] | None]]:
    """The safetensors files and the tensors the index places in each (None: all, for a single file)."""
    if (index := path / HF_INDEX).is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file:  # a file name in this folder, nothing else
                raise CheckpointError(f"{index}: weight_map[{name!r}] must be a file name in {path}, got {file!r}")
            by_file.setdefault(file, []).append(name)
        if missing := sorted(f for f in by_file if not (path / f).is_file()):
            raise CheckpointError(f"{index}: shard file(s) listed in the index not found: {', '.join(missing)}")
        files = [(path / f, by_file[f]) for f in sorted(by_file)]
    elif (path / HF_SINGLE).is_file():
        files = [(path / HF_SINGLE, None)]
    else:
        raise CheckpointError(f"{path}: neither {HF_SINGLE} nor {HF_INDEX} found")
    return files


def _hf_tensors(files: list[tuple[Path, list[str] | None]]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for file, names in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                keys = getattr(f, "offset_keys", f.keys)()  # file order where available
                if names is not None and (absent := sorted(set(names) - set(keys))):
                    raise CheckpointError(f"{file}: tensor(s) the index places in this file are missing: {absent}")
                wanted = set(keys if names is None else names)
                for name in (k for k in keys if k in wanted):
                    yield name, f.get_tensor(name), file
        except SafetensorError as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None


def _meta_tensors(files: list[Path], shards: list[dict[str, torch.Tensor]],
                  config: LlamaConfig) -> Iterator[tuple[str, torch.Tensor, Path]]:
    to_ours = {meta: (ours, dim) for ours, (meta, dim) in meta_names(config.n_layers).items()}
    for name in shards[0]:
        if _IGNORED.search(name):
            continue
        for file, sd in zip(files[1:], shards[1:]):
            if name not in sd:
                raise CheckpointError(f"{file}: tensor {name!r} (present in {files[0].name}) is missing")
        ours, dim = to_ours.get(name, (name, None))  # an unknown name passes through: load_model reports it
        try:
            w = shards[0][name] if dim is None or len(shards) == 1 else torch.cat([sd[name] for sd in shards], dim)
        except RuntimeError:
            shapes = ", ".join(f"{f.name}: {tuple(sd[name].shape)}" for f, sd in zip(files, shards))
            raise CheckpointError(f"{files[0].parent}: the shards of tensor {name!r} do not fit together "
                                  f"({shapes})") from None
        heads = _rotary_heads(ours, config)
        if heads is not None and w.dim() == 2 and w.shape[0] == heads * config.head_dim:  # else: misshapen, and
            w = permute_meta_to_hf(w, heads)  # load_model reports it
        yield ours, w, files[0]
    for file, sd in zip(files[1:], shards[1:]):
        if extra := sorted(set(sd) - set(shards[0])):
            raise CheckpointError(f"{file}: tensor(s) not in {files[0].name}: {extra}")


def _iter_tensors(path, format, config) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file); the files are found and opened here, before the first tensor is asked for."""
    path = Path(path)
    format = _resolve_format(path, format)
    config = config or load_config(path, format)
    if format == "hf":
        return _without_tied_head(_hf_tensors(_hf_files(path)), config, path)
    files = _meta_shard_files(path)
    shards = [_torch_load(f) for f in files]  # memory-mapped: nothing is read until a tensor is used
    return _without_tied_head(_meta_tensors(files, shards, config), config, path)


def _without_tied_head(tensors, config: LlamaConfig, path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """For a tied config, the stream without `lm_head.weight` (the embedding is the head), refusing a head that
    differs from the embedding: tying them would silently change the model."""
    if not config.tie_word_embeddings:
        yield from tensors
        return
    embedding = head = None
    for name, tensor, file in tensors:
        if name == "lm_head.weight":
            head = (tensor, file)
            continue
        if name == "model.embed_tokens.weight":
            embedding = tensor
        yield name, tensor, file
    if head is not None and embedding is not None and not (
            head[0].shape == embedding.shape and torch.equal(head[0], embedding)):
        raise CheckpointError(f"{path}: the config ties the output head to the embedding (tie_word_embeddings), but "
                              f"{head[1].name} holds a different lm_head.weight; set tie_word_embeddings to false in "
                              f"the config to load both matrices")


def iter_checkpoint_tensors(path: str | os.PathLike, format: str = "auto", *,
                            config: LlamaConfig | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in our names and rotary layout, in the stored dtype, one tensor at a time.

    Hugging Face files are read shard file by shard file; Meta tensors are merged across the model-parallel
    files (all memory-mapped) one tensor at a time. Stale buffers (rotary inv_freq, rope.freqs) are skipped.
    Missing or unreadable files raise here, before the first tensor.
    """
    return ((name, tensor) for name, tensor, _ in _iter_tensors(path, format, config) if not _IGNORED.search(name))


def load_into(params: Mapping[str, torch.Tensor], tensors: Iterator[tuple[str, torch.Tensor, object]], where,
              assign=None, shape_of=lambda p: p.shape) -> None:
    """Copy checkpoint tensors (name, tensor, file) into `params` (name -> tensor of the model), checking every
    name and shape; every missing, duplicate, unexpected or misshapen tensor is reported at once. `assign(name,
    tensor)` does the copy (default: in place); `shape_of(param)` gives a parameter's full shape (DeepSpeed ZeRO-3
    keeps only a placeholder in `param.shape`). The one checked loader of single-device and DeepSpeed runs."""
    assign = assign or (lambda name, tensor: params[name].copy_(tensor))
    seen, problems = set(), []
    with torch.no_grad():
        for name, tensor, file in tensors:
            if _IGNORED.search(name):
                continue
            if name not in params or name in seen:
                problems.append(f"{'unexpected' if name not in params else 'duplicate'} tensor {name!r} in {file}")
            elif tuple(tensor.shape) != tuple(shape_of(params[name])):
                problems.append(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                                f"the model expects {tuple(shape_of(params[name]))}")
            else:
                assign(name, tensor)
            seen.add(name)
    if missing := [n for n in params if n not in seen]:
        problems.insert(0, f"missing tensor(s): {', '.join(missing)}")
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match the model config: " + "; ".join(problems))


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device="cpu",
               format: str = "auto", config: LlamaConfig | None = None) -> Transformer:
    """A Transformer with the checkpoint's weights, in eval mode (call .train() to train).

    The model is built on the meta device and allocated once, directly in `dtype` on `device`; the checkpoint
    is streamed into it tensor by tensor (`load_into`).
    """
    path, dtype = Path(path), resolve_dtype(dtype) or torch.float32
    format = _resolve_format(path, format)
    config = config or load_config(path, format)
    tensors = _iter_tensors(path, format, config)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    expected = expected_tensors(config)
    load_into({k: v for k, v in model.state_dict().items() if k in expected}, tensors, path)
    return model.eval()


# --- writing ---

class TensorSource:
    """The tensors to save, one at a time: `specs` names each with its full shape and dtype, in saving order;
    `get(name)` returns it on CPU, or None in a process that does not write (DeepSpeed ranks other than 0, which
    must still take part in gathering each parameter, in the same order)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors[name].detach().cpu()


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `config` holds, in the model's order (a tied model has no
    lm_head.weight: its head is the embedding, as transformers saves it)."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _source(source: nn.Module | Mapping[str, torch.Tensor] | TensorSource, config: LlamaConfig,
            out_dir: Path) -> tuple[TensorSource, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """The tensors to save and their specs in the model's order, checked against `config` (names and shapes)."""
    if not isinstance(source, TensorSource):
        sd = source.state_dict() if isinstance(source, nn.Module) else dict(source)
        if config.tie_word_embeddings and "lm_head.weight" in sd:  # the same matrix (a model's state_dict has both)
            head, embedding = sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight")
            if embedding is None or not (head is embedding or torch.equal(head, embedding)):
                raise CheckpointError(f"{out_dir}: cannot save, the config ties the head to the embedding but "
                                      f"lm_head.weight differs from model.embed_tokens.weight")
        source = TensorSource({k: v for k, v in sd.items() if not _IGNORED.search(k)})
    specs, expected = source.specs(), expected_tensors(config)
    problems = [f"unexpected tensor {k!r}" for k in specs if k not in expected]
    if missing := [k for k in expected if k not in specs]:
        problems.insert(0, f"missing tensor(s): {', '.join(missing)}")
    problems += [f"tensor {k!r} has shape {specs[k][0]}, the config expects {s}"
                 for k, s in expected.items() if k in specs and specs[k][0] != s]
    if problems:
        raise CheckpointError(f"{out_dir}: cannot save, the weights do not match the config: " + "; ".join(problems))
    return source, {k: specs[k] for k in expected}


def is_checkpoint(path: Path) -> bool:
    """Whether a folder holds a checkpoint in either layout (the only kind of folder a save may replace)."""
    try:
        detect_format(path)
        return True
    except CheckpointError:
        return False


@contextmanager
def _atomic_dir(out_dir: str | os.PathLike, write: bool = True) -> Iterator[Path | None]:
    """A temporary folder next to `out_dir` that replaces it only once the body has completed (a previous
    checkpoint there is replaced; any other non-empty folder is refused). Yields None where `write` is false."""
    if not write:
        yield None
        return
    try:
        folder = AtomicFolder(out_dir, replaceable=is_checkpoint, what="a checkpoint")
    except OutputError as e:
        raise CheckpointError(str(e)) from None
    with folder as tmp:
        yield tmp


def _write_extra(tmp: Path, extra_files: Mapping[str, str | os.PathLike | bytes] | None) -> None:
    for name, source in (extra_files or {}).items():
        if isinstance(source, bytes):
            (tmp / name).write_bytes(source)
        else:
            shutil.copyfile(source, tmp / name)


def _shards(nbytes: dict[str, int], limit: int) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each safetensors file: greedy, in order, as transformers does; a tensor larger
    than the limit gets its own file."""
    shards, size = [[]], 0
    for name, n in nbytes.items():
        if shards[-1] and size + n > limit:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        return [(HF_SINGLE, shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", names) for i, names in enumerate(shards)]


def save_hf(source: nn.Module | Mapping[str, torch.Tensor] | TensorSource, config: LlamaConfig,
            out_dir: str | os.PathLike, *, dtype: torch.dtype | str | None = None, max_shard_size: int | str = "5GB",
            extra_files: Mapping[str, str | os.PathLike | bytes] | None = None, write: bool = True) -> Path:
    """Write a Hugging Face checkpoint: config.json, generation_config.json and model.safetensors, or
    model-0000i-of-0000N.safetensors + model.safetensors.index.json beyond `max_shard_size` bytes per file.

    dtype: None keeps each tensor's dtype. extra_files: {name in out_dir: source path to copy, or bytes}.
    The folder appears (or replaces a previous checkpoint) only when complete and read back: every tensor the
    config implies, with its shape (`verify_saved`). `write=False`: only take part in fetching the tensors
    (a DeepSpeed rank other than 0).
    """
    out_dir, dtype, limit = Path(out_dir), resolve_dtype(dtype), parse_size(max_shard_size)
    source, specs = _source(source, config, out_dir)
    nbytes = {k: math.prod(shape) * (dtype or dt).itemsize for k, (shape, dt) in specs.items()}
    files = _shards(nbytes, limit)
    with _atomic_dir(out_dir, write) as tmp:
        for file, names in files:
            tensors = {}
            for name in names:
                tensor = source.get(name)
                if tmp is not None:
                    tensors[name] = tensor.to(dtype or tensor.dtype).contiguous()
            if tmp is not None:
                save_file(tensors, tmp / file, metadata={"format": "pt"})
            del tensors
        if tmp is None:
            return out_dir
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())},
                     "weight_map": {k: file for file, names in files for k in names}}
            (tmp / HF_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        stored = dtype or specs["model.embed_tokens.weight"][1]
        (tmp / HF_CONFIG).write_text(json.dumps(config.to_hf(str(stored).removeprefix("torch.")), indent=2) + "\n")
        (tmp / HF_GENERATION).write_text(json.dumps(generation_config(config), indent=2) + "\n")
        _write_extra(tmp, extra_files)
        verify_saved(tmp, config)
    return out_dir


def generation_config(config: LlamaConfig) -> dict:
    """generation_config.json: the ids generation starts and stops with."""
    return {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}


def verify_saved(path: str | os.PathLike, config: LlamaConfig) -> None:
    """Read a written checkpoint's headers back: every tensor the config implies, with its shape, none extra.
    (Tools have shipped empty files from ZeRO-3, saving partitioned placeholders: such a save fails here.)"""
    found = {}
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), "pt") as f:
            for name in f.keys():
                found[name] = tuple(f.get_slice(name).get_shape())
    expected = expected_tensors(config)
    problems = [f"missing {n}" for n in expected if n not in found]
    problems += [f"unexpected {n}" for n in found if n not in expected]
    problems += [f"{n} has shape {found[n]}, expected {s}" for n, s in expected.items() if n in found and found[n] != s]
    if problems:
        raise CheckpointError(f"the checkpoint written to {path} is wrong, refusing to use it: "
                              + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


def save_meta(source: nn.Module | Mapping[str, torch.Tensor], config: LlamaConfig, out_dir: str | os.PathLike, *,
              num_shards: int = 1, dtype: torch.dtype | str | None = None,
              extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> Path:
    """Write Meta's layout: params.json + consolidated.00.pth .. consolidated.NN.pth, split for `num_shards`-way
    model parallelism as fairscale's Parallel{Embedding,Column,Row} layers hold it, q/k in Meta's rotary layout.
    """
    out_dir, dtype = Path(out_dir), resolve_dtype(dtype)
    source, specs = _source(source, config, out_dir)
    sd = {name: source.get(name) for name in specs}
    if config.tie_word_embeddings:  # Meta's layout always has an output matrix: the embedding, written again
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    sizes = {"dim": config.dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
             "hidden_dim": config.hidden_dim, "vocab_size": config.vocab_size}
    if not isinstance(num_shards, int) or num_shards < 1 or any(v % num_shards for v in sizes.values()):
        raise ValueError(f"num_shards must be a positive integer dividing each of "
                         f"{', '.join(f'{k} ({v})' for k, v in sizes.items())}; got {num_shards!r}")
    params, names = config.to_meta(), meta_names(config.n_layers)
    with _atomic_dir(out_dir) as tmp:
        for shard in range(num_shards):  # one shard's slices in memory at a time
            tensors = {}
            for name, w in sd.items():
                meta, dim = names[name]
                w = w.to(dtype or w.dtype)
                if (heads := _rotary_heads(name, config)) is not None:
                    w = permute_hf_to_meta(w, heads)
                # clone: torch.save writes a view's whole storage
                tensors[meta] = (w if dim is None else w.chunk(num_shards, dim)[shard]).clone()
            torch.save(tensors, tmp / f"consolidated.{shard:02d}.pth")
            del tensors
        (tmp / META_PARAMS).write_text(json.dumps(params, indent=2) + "\n")
        _write_extra(tmp, extra_files)
    return out_dir


def convert(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, to: str, num_shards: int = 1,
            dtype: torch.dtype | str | None = None, max_shard_size: int | str = "5GB",
            extra_files: Mapping[str, str | os.PathLike | bytes] | None = None,
            config: LlamaConfig | None = None) -> Path:
    """Rewrite a checkpoint (either layout) as `to` ("hf" or "meta"), copying tokenizer.model along (and
    `extra_files`, as in `save_hf`). The output may be the input folder itself: it is replaced when complete.
    `config`: the input's, when the caller has read it already (else read here).

    The tensors are held once in memory (in the stored dtype; memory-mapped where the input allows).
    """
    if to not in ("hf", "meta"):
        raise ValueError(f"to must be 'hf' or 'meta', got {to!r}")
    input_dir = Path(input_dir)
    config = config or load_config(input_dir)
    sd = dict(iter_checkpoint_tensors(input_dir, config=config))
    extra = {"tokenizer.model": input_dir / "tokenizer.model"} if (input_dir / "tokenizer.model").is_file() else {}
    extra.update(extra_files or {})
    if to == "hf":
        return save_hf(sd, config, output_dir, dtype=dtype, max_shard_size=max_shard_size, extra_files=extra)
    return save_meta(sd, config, output_dir, num_shards=num_shards, dtype=dtype, extra_files=extra)
