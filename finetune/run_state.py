"""Training checkpoints (the state a run resumes from): written atomically, the last K kept.

A checkpoint folder `checkpoints/step-00000100/` holds whatever the engine writes (trained weights or adapter,
optimizer state), `trainer_state.json` (step, tokens, the losses so far, the recipe) and `rng.pt` (the random
generators). The learning-rate schedule and the data order are functions of the step, so the step is their whole
state. Only folders named step-N with a trainer_state.json are complete; `.tmp-*` leftovers of an interrupted save
are ignored and removed. Pruning an old checkpoint removes the files a checkpoint holds and nothing else: a file
someone put in it stays (with the folder).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from llama_core.files import fsync_dir, make_durable, write_json

from .errors import UserError, WriteError, load_error_text
from .inputs import read_json_file

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE, RNG_FILE = "trainer_state.json", "rng.pt"
# What the engines write in a checkpoint (LocalEngine; DeepSpeed's tag folder and the recovery script it copies).
ENGINE_FILES = ("trainable.safetensors", "optimizer.pt", "deepspeed", "zero_to_fp32.py", "latest")


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (the disk is full, say); the previous ones are intact."""


def checkpoint_dirs(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n) and os.path.isfile(os.path.join(root, n, STATE_FILE)))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str, step: int, write, state: dict, keep_last: int, *, is_main: bool = True,
                    barrier=lambda: None) -> str:
    """`write(tmp_dir)` saves the engine's part (every rank calls it, into the same temporary folder); the main
    rank then adds the random generators and the trainer state (last: it marks the folder complete), makes it all
    durable, renames it into place and prunes the older checkpoints."""
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")  # the same name on every rank
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        write(tmp)
        barrier()
        if is_main:
            torch.save(rng_state(), os.path.join(tmp, RNG_FILE))
            make_durable(tmp)  # the data is on disk before the folder is marked complete and renamed
            write_json(os.path.join(tmp, STATE_FILE), state)  # durable, folder entry included
    # Disk full, quota, ...: torch reports a short write as RuntimeError, safetensors as SafetensorError.
    except (OSError, RuntimeError, SafetensorError) as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} ({type(e).__name__}: "
                                   f"{str(e)[:200]}); disk full? The last complete checkpoint is "
                                   f"{last or 'none'}") from None
    if is_main:
        if os.path.exists(final):  # a checkpoint of the same step from an interrupted earlier attempt
            remove_checkpoint(final)
            if os.path.exists(final):  # someone's files in it: kept, beside the new checkpoint's name
                os.rename(final, _sibling_name(final))
        os.rename(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep_last]:
            remove_checkpoint(old)
        for name in os.listdir(root):
            if name.startswith(".tmp-") and name != os.path.basename(tmp):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    return final


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint's own files (its trainer state first: the folder is no longer complete from then on),
    then the folder if nothing else is in it."""
    for name in (STATE_FILE, RNG_FILE, *ENGINE_FILES):
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        elif os.path.lexists(entry):
            os.remove(entry)
    with contextlib.suppress(OSError):  # not empty: someone's files, which stay
        os.rmdir(path)


def _sibling_name(path: str) -> str:
    n = 1
    while os.path.lexists(f"{path}.kept-{n}"):
        n += 1
    return f"{path}.kept-{n}"


def load_trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json; a damaged one is a UserError naming it (the caller adds what to do)."""
    file = os.path.join(path, STATE_FILE)
    try:
        state = read_json_file(file, "trainer state")
    except UserError as e:
        raise UserError(f"{file}: damaged ({str(e).removeprefix(file).lstrip(':0123456789 ')})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        raise UserError(f"{file}: not a trainer state (expected an object with a 'state' entry)")
    return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(path: str) -> None:
    """The random generators saved in a checkpoint; a damaged file is a UserError naming it."""
    file = os.path.join(path, RNG_FILE)
    try:
        # weights_only: a checkpoint never runs code. Python's random state is a tuple of ints, which is allowed.
        state = torch.load(file, weights_only=True)
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, RuntimeError, OSError ...
        raise UserError(f"{file}: damaged ({load_error_text(e)})") from None
    try:
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{file}: not the random generator states this program saves ({type(e).__name__}: "
                        f"{str(e)[:100]})") from None


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def is_model_folder(path: Path) -> bool:
    """A folder this project writes as a model: a Hugging Face checkpoint or a PEFT adapter."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
