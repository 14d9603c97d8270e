"""Nothing lost: the one rule for outputs (issue 18, cases 1, 2, 3 and 6).

A command writes into a folder that is missing, empty or its own kind of output (a run folder, a checkpoint);
another folder is refused before any work unless --overwrite / `overwrite: true`, and then nothing in it is replaced
or deleted. Files are written to a temporary sibling and renamed, never through a symbolic link, never over a
device. Unwritable places are refused in the first second.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.outputs import RUN_MARKER, is_run_folder
from finetune.run_state import checkpoint_dirs
from llama_core import files
from llama_core.files import (AtomicFolder, OutputError, atomic_write, check_output_folder, check_writable_file,
                              check_writable_folder, write_json, write_text)
from llama_core.weights import load_model, save_hf, save_meta

from .test_merge import make_adapter, make_base
from .test_train import ROOT, _losses, _recipe


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the writer: llama_core.files -----------------------------------------------------------------------------

def test_replacing_a_model_folder_keeps_files_of_other_kinds(tmp_path, tiny_model):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    ckpt = tmp_path / "ckpt"
    save_hf(old, old.config, ckpt, max_shard_size="100KB")  # sharded: an index and several files
    save_meta(old, old.config, tmp_path / "meta")
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / "extra").mkdir()
    (ckpt / "extra" / "eval.json").write_text("{}")
    for name in ("params.json", "consolidated.00.pth"):  # another layout: not what save_hf writes
        (ckpt / name).write_bytes((tmp_path / "meta" / name).read_bytes())
    save_hf(new, new.config, ckpt)  # one file: the old shards and index are stale
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "consolidated.00.pth", "extra", "generation_config.json", "model.safetensors",
                     "notes.txt", "params.json"]
    assert (ckpt / "notes.txt").read_text() == "mine" and (ckpt / "extra" / "eval.json").read_text() == "{}"
    assert all(torch.equal(a, b) for a, b in zip(load_model(ckpt, format="hf").state_dict().values(),
                                                 new.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "meta"]  # no temporary or old folder left


def test_a_failed_move_leaves_the_old_folder_whole(tmp_path, monkeypatch, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "notes.txt").write_text("mine")
    real = os.replace

    def refuse_notes(src, dst):
        if Path(src).name == "notes.txt":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", refuse_notes)
    with AtomicFolder(target, replaceable=lambda p: True) as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(kept) == 1 and (kept[0] / "notes.txt").read_text() == "mine"  # nothing lost
    assert "could not be moved" in capsys.readouterr().err and (target / "config.json").read_text() == '{"new": 1}'


def test_overwrite_writes_beside_and_never_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty and is not output; refusing"):
        AtomicFolder(target)
    with AtomicFolder(target, overwrite=True) as tmp:
        (tmp / "result.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "result.json"]
    with pytest.raises(OutputError, match="already holds notes.txt; refusing to replace"):
        with AtomicFolder(target, overwrite=True) as tmp:
            (tmp / "notes.txt").write_text("theirs")
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_folder_rule(tmp_path):
    own = lambda p: (p / "own.txt").exists()  # noqa: E731
    assert check_output_folder(tmp_path / "new", own_kind=own, what="x") == "new"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "own.txt").write_text("")
    assert check_output_folder(tmp_path / "mine", own_kind=own, what="x") == "own"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("")
    with pytest.raises(OutputError, match="is not x; refusing to write into it .* pass --overwrite"):
        check_output_folder(tmp_path / "theirs", own_kind=own, what="x")
    assert check_output_folder(tmp_path / "theirs", own_kind=own, what="x", overwrite=True) == "beside"
    with pytest.raises(OutputError, match="already holds a.txt"):
        check_output_folder(tmp_path / "theirs", own_kind=own, what="x", overwrite=True,
                            clashes=lambda n: n == "a.txt")
    (tmp_path / "link").symlink_to(tmp_path / "theirs")
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_folder(tmp_path / "link", own_kind=own, what="x")
    assert check_output_folder(tmp_path / "link", own_kind=own, what="x", overwrite=True, link_ok=True) == "beside"


def test_atomic_write_never_follows_a_link_or_replaces_a_device(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("keep")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="is a symbolic link"):
        write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "keep"
    with pytest.raises(OutputError, match="is a folder"):
        write_text(tmp_path, "new")
    with pytest.raises(OutputError, match="inside /dev"):
        check_writable_file("/dev/llama-finetune-test-no-such-device")  # nothing is created under /dev
    assert not os.path.exists("/dev/llama-finetune-test-no-such-device")
    with atomic_write("/dev/null") as f:  # a device is written as it is, never renamed over
        f.write("x")
    assert os.path.exists("/dev/null") and not Path("/dev/null").is_file()


def test_dev_stdout_is_appended_to_not_renamed_over(tmp_path):
    out = tmp_path / "redirected.txt"
    out.write_text("before\n")
    inode = out.stat().st_ino
    code = "from llama_core.files import write_text; write_text('/dev/stdout', 'written\\n')"
    with open(out, "a") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert out.read_text() == "before\nwritten\n" and out.stat().st_ino == inode


def test_a_regular_file_under_dev_is_refused_not_appended_to():
    """Only the names of open file descriptors (/dev/stdout, /dev/fd/N) are streams, written as they are; any other
    name under /dev is refused, whether it exists (a regular file in /dev/shm was appended to) or not."""
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    path = Path(f"/dev/shm/llama-finetune-test-{os.getpid()}.json")
    try:
        with pytest.raises(OutputError, match="inside /dev"):
            write_json(path, {"a": 1})
        path.write_text("the user's\n")
        with pytest.raises(OutputError, match="inside /dev"):
            write_json(path, {"a": 2})
        assert path.read_text() == "the user's\n"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@pytest.mark.parametrize("case", ["below a file", "in /proc", "read-only", "unwritable"])
def test_unwritable_folders_are_refused(tmp_path, monkeypatch, case):
    if case == "below a file":
        (tmp_path / "file").write_text("")
        folder, message = tmp_path / "file" / "run", "file is a file"
    elif case == "in /proc":
        folder, message = Path("/proc/self/run"), "inside /proc"
    elif case == "read-only":  # a read-only mount, simulated: the file system reports ST_RDONLY
        real = os.statvfs
        monkeypatch.setattr(files.os, "statvfs", lambda p: _ReadOnly(real(p)))
        folder, message = tmp_path / "run", "read-only file system"
    else:  # no write permission (as a non-root user would see it)
        monkeypatch.setattr(files.os, "access", lambda p, mode: False)
        folder, message = tmp_path / "run", "is not writable"
    with pytest.raises(OutputError, match=message):
        check_writable_folder(folder)


class _ReadOnly:
    def __init__(self, result):
        self.result = result

    def __getattr__(self, name):
        value = getattr(self.result, name)
        return value | os.ST_RDONLY if name == "f_flag" else value


# --- training: output_dir (case 1, case 6) --------------------------------------------------------------------

def _users_folder(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text("my own recipe\n")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    (out / "final").mkdir()
    (out / "final" / "keep.txt").write_text("my notes")
    return _tree(out)


def test_training_refuses_a_folder_that_is_not_a_run(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer)
    before = _users_folder(tmp_path / "out")
    assert main(["--recipe", recipe]) == 2
    err = capsys.readouterr().err
    assert "output_dir" in err and "is not a training run folder" in err and "overwrite: true" in err
    assert "Traceback" not in err
    assert _tree(tmp_path / "out") == before  # nothing overwritten or deleted
    assert not (tmp_path / "cache").exists()  # refused before the data was prepared
    # With overwrite, the run's own names there (recipe.yaml, metrics.jsonl, final/) are still refused.
    assert main(["--recipe", recipe, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "already holds final, metrics.jsonl, recipe.yaml" in err
    assert _tree(tmp_path / "out") == before


def test_overwrite_trains_beside_the_users_files(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    (out / "data" / "x.csv").write_text("a,b\n")
    assert main(["--recipe", recipe, "overwrite=true"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "x.csv").read_text() == "a,b\n"
    assert (out / RUN_MARKER).is_file() and is_run_folder(out) and (out / "final" / "model.safetensors").is_file()
    assert main(["--recipe", recipe, "training.max_steps=6"]) == 0  # now a run folder: it continues
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6] and (out / "notes.txt").read_text() == "mine"


def test_a_run_keeps_files_the_user_put_in_its_folders(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 1, "keep_last": 1})
    out = tmp_path / "out"
    assert main(["--recipe", recipe]) == 0
    first = load_file(out / "final" / "model.safetensors")
    (out / "final" / "notes.txt").write_text("evaluated by hand: fine")
    (out / "checkpoints" / "step-00000004" / "why.txt").write_text("the good one")
    assert main(["--recipe", recipe, "training.max_steps=6"]) == 0  # final/ replaced, checkpoints pruned
    assert (out / "final" / "notes.txt").read_text() == "evaluated by hand: fine"
    assert not torch.equal(load_file(out / "final" / "model.safetensors")["lm_head.weight"], first["lm_head.weight"])
    assert [os.path.basename(d) for d in checkpoint_dirs(out / "checkpoints")] == ["step-00000006"]
    assert sorted(os.listdir(out / "checkpoints" / "step-00000004")) == ["why.txt"]  # only ours went


def test_a_run_folder_of_an_earlier_version_is_still_a_run(tmp_path, tokenizer):
    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 2})
    out = tmp_path / "out"
    assert main(["--recipe", recipe]) == 0
    (out / RUN_MARKER).unlink()  # written before the marker existed: recipe.yaml's first line tells
    assert is_run_folder(out)
    assert main(["--recipe", recipe, "training.max_steps=6"]) == 0
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]


def test_links_and_foreign_folders_inside_a_run_are_refused_up_front(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 2})
    out = tmp_path / "out"
    assert main(["--recipe", recipe]) == 0
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("precious\n")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(elsewhere)
    assert main(["--recipe", recipe, "training.max_steps=6"]) == 2
    assert "metrics.jsonl is a symbolic link" in capsys.readouterr().err and elsewhere.read_text() == "precious\n"
    (out / "metrics.jsonl").unlink()
    os.rename(out / "final", tmp_path / "final-saved")
    (out / "final").mkdir()
    (out / "final" / "mine.txt").write_text("x")
    assert main(["--recipe", recipe, "training.max_steps=6"]) == 2
    assert "final is not a model folder" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["below a file", "in /proc", "read-only", "cache is a file"])
def test_unwritable_output_fails_in_the_first_second(tmp_path, tokenizer, monkeypatch, capsys, case):
    import finetune.train as train

    monkeypatch.setattr(train, "build_datasets", lambda *a, **k: pytest.fail("data prepared before the check"))
    settings = {}
    if case == "below a file":
        (tmp_path / "a-file").write_text("")
        settings["output_dir"] = str(tmp_path / "a-file" / "run")
    elif case == "in /proc":
        settings["output_dir"] = "/proc/self/run"
    elif case == "read-only":
        real = os.statvfs
        monkeypatch.setattr(files.os, "statvfs", lambda p: _ReadOnly(real(p)) if "ro" in str(p) else real(p))
        (tmp_path / "ro").mkdir()
        settings["output_dir"] = str(tmp_path / "ro" / "run")
    else:
        (tmp_path / "cache-file").write_text("")
        settings["data"] = {"cache_dir": str(tmp_path / "cache-file")}
    recipe = _recipe(tmp_path, tokenizer, **settings)
    for command in (["validate", "--recipe", recipe], ["--recipe", recipe]):
        assert main(command) == 2
        err = capsys.readouterr().err
        key = "data.cache_dir" if case == "cache is a file" else "output_dir"
        assert key in err and "Traceback" not in err, err


# --- merge and export (case 2) ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model, tokenizer):
    root = tmp_path_factory.mktemp("outputs")
    base = make_base(root, tiny_model(seed=4), tokenizer)
    adapter, _ = make_adapter(root, base, tokenizer)
    return dict(root=root, base=base, adapter=adapter)


def test_merge_onto_an_unrelated_checkpoint_loses_nothing(models, tmp_path, tiny_model, capsys):
    other = tmp_path / "other"
    model = tiny_model(seed=9)
    save_meta(model, model.config, other)  # someone's Meta checkpoint, with their notes
    (other / "notes.txt").write_text("where this model came from")
    before = _tree(other)
    # Refused: a Hugging Face model written beside their Meta one would leave a folder with two models in it,
    # which a loader reads as one of them (an export into the other layout's folder likewise).
    assert main(["merge", "--adapter", str(models["adapter"]), "--output", str(other)]) == 2
    assert "holds a Meta checkpoint (consolidated.00.pth, params.json)" in capsys.readouterr().err
    assert main(["export", "--input", str(models["base"]), "--output", str(other), "--format", "hf"]) == 2
    assert "holds a Meta checkpoint" in capsys.readouterr().err
    assert _tree(other) == before  # params.json, consolidated.00.pth and notes.txt as they were
    hf = tmp_path / "hf"
    save_hf(model, model.config, hf)
    assert main(["export", "--input", str(models["base"]), "--output", str(hf), "--format", "meta"]) == 2
    assert "holds a Hugging Face checkpoint (config.json, model.safetensors)" in capsys.readouterr().err
    assert main(["export", "--input", str(hf), "--output", str(hf), "--format", "meta"]) == 2  # in place, too


def test_merge_and_export_refuse_a_folder_that_is_not_a_checkpoint(models, tmp_path, monkeypatch, capsys):
    import finetune.merge as merge

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setattr(merge, "load_core", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    for argv in (["merge", "--adapter", str(models["adapter"]), "--output", str(folder)],
                 ["export", "--input", str(models["base"]), "--output", str(folder), "--format", "meta"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is not a checkpoint or adapter folder" in err and "--overwrite" in err and "Traceback" not in err
    (folder / "config.json").write_text("{}")  # a name the command writes: refused even with --overwrite
    assert main(["merge", "--adapter", str(models["adapter"]), "--output", str(folder), "--overwrite"]) == 2
    assert "already holds config.json" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]


def test_export_with_overwrite_writes_beside(models, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["export", "--input", str(models["base"]), "--output", str(folder), "--format", "meta",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["consolidated.00.pth", "notes.txt", "params.json",
                                                        "tokenizer.model"]
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# --- generate and eval --output (cases 3 and 6) -----------------------------------------------------------------

def test_generate_output_link_folder_and_device(models, tmp_path, monkeypatch, capsys):
    import finetune.commands.generate as command

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the day"}\n')
    target = tmp_path / "answers.jsonl"
    target.write_text("old answers\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    real = command.load_model
    monkeypatch.setattr(command, "load_model", lambda a: pytest.fail("the model was loaded before the check"))
    base = ["generate", "--model", str(models["base"]), "--file", str(prompts), "--max-new-tokens", "2"]
    for output, message in ((link, "is a symbolic link"), (tmp_path, "is a folder")):
        assert main(base + ["--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert link.is_symlink() and target.read_text() == "old answers\n"
    monkeypatch.setattr(command, "load_model", real)
    assert main(base + ["--output", "/dev/null"]) == 0  # a device: written as it is
    assert Path("/dev/null").is_char_device()
    assert main(base + ["--output", str(target)]) == 2  # an existing file: only with --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err and target.read_text() == "old answers\n"
    assert main(base + ["--output", str(target), "--overwrite"]) == 0  # then replaced, atomically
    assert json.loads(target.read_text())["prompt"] == "the day"
    for inside in (models["base"] / "config.json", models["base"] / "new.jsonl"):  # never into the model read
        assert main(base + ["--output", str(inside), "--overwrite"]) == 2
        assert f"is inside {models['base']}, which this command reads" in capsys.readouterr().err
    assert not (models["base"] / "new.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "link.jsonl", "p.jsonl"]


def test_eval_output_is_checked_before_evaluating(models, tmp_path, monkeypatch, capsys):
    import finetune.commands.eval as command

    monkeypatch.setattr(command, "load_model", lambda a: pytest.fail("evaluated before the check"))
    assert main(["eval", "mmlu", "--model", str(models["base"]), "--data", str(Path(ROOT) / "data" / "mmlu_sample"),
                 "--output", str(tmp_path)]) == 2
    assert "--output" in (err := capsys.readouterr().err) and "is a folder" in err
    assert main(["eval", "loss", "--model", str(models["base"]), "--data", str(tmp_path / "x.jsonl"),
                 "--output", "/proc/self/x.json"]) == 2
    assert "inside /proc" in capsys.readouterr().err
    (tmp_path / "scores.json").write_text("kept")  # an existing file only with --overwrite, before any work
    for flag in ("--output", "--log-samples"):
        assert main(["eval", "mmlu", "--model", str(models["base"]), "--data", str(Path(ROOT) / "data" / "mmlu_sample"),
                     flag, str(tmp_path / "scores.json")]) == 2
        assert f"{flag} {tmp_path / 'scores.json'}: exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "scores.json").read_text() == "kept"
