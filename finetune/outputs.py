"""Where a command may write: the one rule for output folders, checked before any work.

A command writes into a folder that is missing or empty, or that holds its own kind of output:
  train            a run folder: it holds RUN_MARKER, written when the run starts (a run of an earlier version: a
                   recipe.yaml whose first line is "# resolved from ...")
  merge, export    a model folder: a checkpoint (Hugging Face or Meta layout) or a PEFT adapter
Any other non-empty folder is refused (exit 2) unless overwrite is asked for (`overwrite: true` in a recipe,
`--overwrite` on the command line); then the command's files go beside the ones there, and if one of its names
exists there already it is refused too: nothing the command did not write is ever replaced or deleted. Replacing a
folder of the command's own kind keeps the files in it that are not of that kind (`llama_core.files.AtomicFolder`).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llama_core.files import (MODEL_LAYOUTS, AtomicFolder, OutputError, check_output_folder, check_writable_file,
                              check_writable_folder, is_stream)

from .errors import UserError

RUN_MARKER = ".llama-finetune-run"  # a run folder's mark, written first when a run starts
# What a run writes in its folder (the marker included); with overwrite, none of these may exist in a folder
# that is not a run folder.
RUN_FILES = (RUN_MARKER, "recipe.yaml", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "metrics.jsonl", "summary.json", "mmlu.json",
             "loss.png", "wandb_run_id.txt", "mlflow_run_id.txt")
RUN_FOLDERS = ("checkpoints", "samples", "tensorboard", "wandb")  # written inside (a link to a folder is fine)
MODEL_FOLDERS = ("final", "base")  # each written as a whole and renamed into place
DEFAULT_CACHE_DIR = "~/.cache/llama-finetune/data"  # the tokenized-data cache (data.cache_dir)
_LEGACY_FIRST_LINE = b"# resolved from "


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a training run's output folder (ours, so a run may continue or replace its files)."""
    path = Path(path)
    if (path / RUN_MARKER).is_file():
        return True
    try:
        with open(path / "recipe.yaml", "rb") as f:
            return f.read(len(_LEGACY_FIRST_LINE)) == _LEGACY_FIRST_LINE
    except OSError:
        return False


def is_model_output(path: str | os.PathLike) -> bool:
    """A checkpoint in either layout or a PEFT adapter: what merge and export may replace."""
    from llama_core.weights import is_checkpoint

    path = Path(path)
    return is_checkpoint(path) or (path / "adapter_config.json").is_file()


def check_run_output(output_dir: str, overwrite: bool) -> str:
    """The rule for a run's output_dir (see the module docstring): "new", "own" or "beside"; UserError otherwise.
    In a run folder, final/ and base/ must be model folders (they are replaced at the end) and the run's own
    files may not be symbolic links (they are written in place, never through a link)."""
    out = Path(os.path.expanduser(output_dir))
    try:
        mode = check_output_folder(out, own_kind=is_run_folder, what="a training run folder", overwrite=overwrite,
                                   clashes=lambda name: name in RUN_FILES + RUN_FOLDERS + MODEL_FOLDERS,
                                   option="overwrite: true (or --overwrite)", link_ok=True)
    except OutputError as e:
        raise UserError(f"output_dir: {e}") from None
    if mode != "own":
        return mode
    for name in RUN_FILES + MODEL_FOLDERS:
        if (out / name).is_symlink():
            raise UserError(f"output_dir: {out / name} is a symbolic link; a run writes its files in place, never "
                            f"through a link (remove the link)")
    for name in MODEL_FOLDERS:
        folder = out / name
        if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not is_model_output(folder))):
            raise UserError(f"output_dir: {folder} is not a model folder, and the run would replace it at the end; "
                            f"move it away")
    for name in RUN_FOLDERS:
        if (out / name).exists() and not (out / name).is_dir():
            raise UserError(f"output_dir: {out / name} is a file, where the run writes a folder; move it away")
    return mode


def check_outputs(recipe) -> str:
    """Where a run writes, checked before any work: output_dir (the rule above; `recipe.overwrite`) and the data
    cache (writable: not a file, not in /proc, not read-only). Returns output_dir's mode; UserError otherwise."""
    mode = check_run_output(recipe.output_dir, recipe.overwrite)
    try:
        check_writable_folder(os.path.expanduser(recipe.data.cache_dir or DEFAULT_CACHE_DIR))
    except OutputError as e:
        raise UserError(f"data.cache_dir: {e}") from None
    return mode


def model_file(name: str) -> bool:
    """A name the model writers use (weights, config, index, tokenizer and template files)."""
    return any(pattern.fullmatch(name) for pattern in MODEL_LAYOUTS.values())


_LAYOUT_NAMES = {"hf": "Hugging Face", "meta": "Meta"}


def check_model_output(output: str | os.PathLike, overwrite: bool, layout: str = "hf") -> str:
    """The rule for merge's and export's --output: "new", "own" (a model folder: replaced, other files kept) or
    "beside" (with --overwrite, a folder without model files); UserError otherwise, before any work. `layout`: what
    the writer writes ("hf" or "meta"); a folder holding weights of the other layout is refused, as the writer
    would leave them beside its own (it never deletes files it did not write) and a loader would find two models."""
    try:
        kind = check_output_folder(output, own_kind=is_model_output, what="a checkpoint or adapter folder",
                                   overwrite=overwrite, clashes=model_file, option="--overwrite")
    except OutputError as e:
        raise UserError(f"--output {e}") from None
    other = {"hf": "meta", "meta": "hf"}[layout]
    if kind != "new" and os.path.isdir(output):
        found = sorted(p.name for p in Path(output).iterdir() if MODEL_LAYOUTS[other].fullmatch(p.name)
                       and p.name != "generation_config.json")
        if found:
            raise UserError(f"--output {output}: holds a {_LAYOUT_NAMES[other]} checkpoint ({', '.join(found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}); the {_LAYOUT_NAMES[layout]} files written here "
                            f"would sit beside it and a loader would find two models. Write to a new folder, or "
                            f"move those files away first")
    return kind


@contextlib.contextmanager
def model_output(output: str | os.PathLike, overwrite: bool, layout: str = "hf") -> Iterator[Path]:
    """The folder to give a model writer (save_hf, save_meta, convert) for --output: `output` itself when it is
    new or a model folder (the writer replaces it atomically), or, for "beside", a temporary folder whose files are
    moved in beside the existing ones once the writer has finished."""
    if check_model_output(output, overwrite, layout) != "beside":
        yield Path(output)
        return
    try:
        folder = AtomicFolder(output, overwrite=True, what="a checkpoint or adapter folder")
    except OutputError as e:
        raise UserError(f"--output {e}") from None
    with folder as tmp:
        yield tmp


def check_output_file(path: str, flag: str, overwrite: bool, reads: tuple = ()) -> Path:
    """An output file named on the command line (`flag`: --output, --log-samples), checked before any work:
    writable (not a folder, not a symbolic link); never inside a folder the command reads (`reads`: the model, the
    adapter); an existing file only with `overwrite` (then replaced whole, once the new file is complete). Devices
    and pipes (/dev/stdout) are written as they are. UserError otherwise."""
    try:
        target = check_writable_file(path)
    except OutputError as e:
        raise UserError(f"{flag} {e}") from None
    if is_stream(target):
        return target
    real = os.path.realpath(target)
    for folder in reads:
        if folder and os.path.isdir(folder):
            inside = os.path.realpath(folder)
            if os.path.commonpath([real, inside]) == inside:
                raise UserError(f"{flag} {path}: is inside {folder}, which this command reads; write it elsewhere")
    if target.exists() and not overwrite:
        raise UserError(f"{flag} {path}: exists; pass --overwrite to replace it (the new file is written beside it "
                        f"and renamed over it only once complete)")
    return target
