"""Training checkpoints: atomic, durable, pruned, and a failed write leaves the previous ones intact."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from finetune.run_state import CheckpointWriteError, checkpoint_dirs, load_trainer_state, save_checkpoint


def _write(path):
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(b"x" * 100)
    os.chmod(os.path.join(path, "weights.bin"), 0o600)  # as safetensors writes its files


def test_checkpoints_are_complete_readable_and_pruned(tmp_path):
    root = str(tmp_path / "checkpoints")
    os.makedirs(root)
    for step in (1, 2, 3):
        save_checkpoint(root, step, _write, {"state": {"step": step, "loss": float("nan")}}, keep_last=2)
    assert [os.path.basename(d) for d in checkpoint_dirs(root)] == ["step-00000002", "step-00000003"]
    assert load_trainer_state(checkpoint_dirs(root)[-1])["state"] == {"step": 3, "loss": None}  # strict JSON
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(os.stat(os.path.join(checkpoint_dirs(root)[-1], "weights.bin")).st_mode)
    assert mode == 0o666 & ~umask


def test_a_failed_write_keeps_the_last_checkpoint(tmp_path):
    root = str(tmp_path / "checkpoints")
    os.makedirs(root)
    save_checkpoint(root, 1, _write, {"state": {"step": 1}}, keep_last=1)

    def disk_full(path):
        _write(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match=r"step 2 .*No space left.*last complete checkpoint is .*step-00000001"):
        save_checkpoint(root, 2, disk_full, {"state": {"step": 2}}, keep_last=1)
    assert os.listdir(root) == ["step-00000001"] and load_trainer_state(checkpoint_dirs(root)[0])["state"]["step"] == 1
