"""Training checkpoints: written atomically (a temporary folder renamed into place), the last K kept.

A checkpoint folder `checkpoints/step-00000100/` holds whatever the engine writes (trained weights or adapter,
optimizer state), `trainer_state.json` (step, tokens, data position, the losses so far) and `rng.pt` (the
random generators). The learning-rate schedule is a function of the step, so the step is its whole state.
Only folders named step-N are complete; `.tmp-*` leftovers of an interrupted save are ignored and removed.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil

import torch

from llama_core.checkpoint import make_durable

from .errors import UserError

_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the disk is full, say); the previous ones are intact."""

    exit_code = 1


def checkpoint_dirs(root: str) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n) and
                   os.path.isfile(os.path.join(root, n, "trainer_state.json")))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: str, step: int, write, state: dict, keep_last: int, *, is_main: bool = True,
                    barrier=lambda: None) -> str:
    """`write(tmp_dir)` saves the engine's part (every rank calls it); the main rank then renames and prunes."""
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f".tmp-step-{step:08d}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        write(tmp)
        barrier()
        if is_main:
            torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
            make_durable(tmp)  # the data is on disk before the folder is marked complete and renamed
            _write_json(os.path.join(tmp, "trainer_state.json"), state)  # written last: marks the folder complete
            _fsync_dir(tmp)
    except (OSError, RuntimeError) as e:  # disk full, quota, ... (torch reports a short write as RuntimeError)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        raise CheckpointWriteError(f"could not write the checkpoint of step {step} ({type(e).__name__}: "
                                   f"{str(e)[:200]}); disk full? The last complete checkpoint is "
                                   f"{last or 'none'}") from None
    if is_main:
        if os.path.exists(final):  # a checkpoint of the same step from an interrupted earlier attempt
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):
            if name.startswith(".tmp-") and name != os.path.basename(tmp):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    return final


def load_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(path: str) -> None:
    # weights_only: a checkpoint never runs code. Python's random state is a tuple of ints, which is allowed.
    state = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    _write_json(tmp, obj)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def json_safe(obj):
    """`obj` with non-finite floats (a skipped step's NaN loss) as null: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_final(tmp: str, final: str, tokenizer_file: str, template) -> None:
    """Complete a model folder written to `tmp` (tokenizer, template) and move it to `final`, replacing it."""
    import yaml

    shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, "template.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(template.definition, f, sort_keys=False)
    make_durable(tmp)
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
