"""Nothing crashes: the bad inputs of issue 18 (cases 4, 5, 7, 8, 9, 10, 11, 12), each a clear `error:` line and
an exit code, never a traceback, a hang or an out-of-memory kill.

Outputs (cases 1, 2, 3, 6) are in test_outputs.py. Subprocess tests run the real entry point where what matters is
the process as a whole (closed or full standard streams, a file size limit).
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from finetune import chat
from finetune.cli import main
from finetune.data import build_datasets
from finetune.errors import DataError, UserError, is_out_of_memory, load_error_text
from finetune.inputs import JSON_DEPTH_LIMIT, parse_json, parse_yaml
from finetune.plan import check_memory, count_parameters
from finetune.recipe import DataSection, DatasetSection, load_recipe
from finetune.templates import load_template
from llama_core.config import get_config

from .test_merge import make_base
from .test_train import ROOT, _losses, _recipe

ENV = {**os.environ, "PYTHONPATH": ROOT}
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                 [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


class Evil:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bounded_memory():
    """In the child: at most 3 GB of data memory, so that a regression that reads /dev/zero fails fast instead of
    filling the machine's memory."""
    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120, preexec_fn=_bounded_memory, **kwargs)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model, tokenizer) -> Path:
    return make_base(tmp_path_factory.mktemp("bad-inputs"), tiny_model(seed=2), tokenizer)


# --- case 4: unbounded reads ------------------------------------------------------------------------------------

def test_a_recipe_is_read_with_bounds(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(5 << 20)  # 5 MB of nothing (sparse): larger than any recipe
    cases = [("/dev/zero", "not a regular file"), (str(big), "larger than 4 MB"),
             (str(tmp_path / "bomb.yaml"), "aliases expand to more than 100,000 values"),
             (str(tmp_path / "deep.yaml"), "nested more than 64 levels"),
             (str(tmp_path / "loop.yaml"), "alias refers to a node that contains it")]
    (tmp_path / "bomb.yaml").write_text(BOMB)
    (tmp_path / "deep.yaml").write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "loop.yaml").write_text("datasets: &d [*d]\n")
    for path, message in cases:
        start = time.time()
        assert main(["validate", "--recipe", path]) == 2, path
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (path, err)
        assert time.time() - start < 5, path  # refused before reading or expanding it


def test_a_template_and_an_override_are_bounded_too(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer)
    (tmp_path / "t.yaml").write_text(BOMB)
    assert main(["validate", "--recipe", recipe, f"template={tmp_path / 't.yaml'}"]) == 2
    assert "aliases expand to more than 100,000 values" in capsys.readouterr().err
    flow = "[" + ", ".join(f"&{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")) + "]"
    bomb = "[&a [x, x, x, x, x, x, x, x, x], " + flow[1:]  # the same bomb as one command-line value
    with pytest.raises(UserError, match="aliases expand"):
        parse_yaml(bomb, "value")
    start = time.time()
    assert main(["validate", "--recipe", recipe, f"lora.target_modules={bomb}"]) == 2
    assert "aliases expand to more than 100,000 values" in capsys.readouterr().err and time.time() - start < 5
    assert main(["validate", "--recipe", recipe, "lora.target_modules=&a [q_proj, *a]"]) == 2
    assert "alias refers to a node that contains it" in capsys.readouterr().err


def test_prompts_are_read_from_files_or_stdin(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is a folder"):
        chat.read_prompts(str(tmp_path))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": "from stdin"}\n')))
    assert chat.read_prompts("-") == [({"prompt": "from stdin"}, "-:1")]
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(UserError, match="standard input is closed"):
        chat.read_prompts("-")


def test_devices_and_pipes_are_refused_at_once_by_the_real_command(base, tmp_path):
    """In subprocesses with bounded memory and a timeout: were these read, they would never end."""
    start = time.time()
    result = _run(["validate", "--recipe", "/dev/zero"])
    assert result.returncode == 2 and "not a regular file" in result.stderr and "Traceback" not in result.stderr
    os.mkfifo(tmp_path / "prompts.jsonl")  # a pipe nobody writes to: opening it would block forever
    for path in ("/dev/zero", str(tmp_path / "prompts.jsonl")):
        # generate loads the model, then reads the prompts: refused, not read until memory runs out
        result = _run(["generate", "--model", str(base), "--file", path])
        assert result.returncode == 2 and f"--file {path}: is not a regular file" in result.stderr, result.stderr
    assert time.time() - start < 60


# --- case 5: deeply nested JSON ----------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_is_a_bad_row(tmp_path, tokenizer):
    assert parse_json("[" * JSON_DEPTH_LIMIT + "]" * JSON_DEPTH_LIMIT) is not None
    with pytest.raises(ValueError, match="nested more than"):
        parse_json('{"a": ' + "[" * (JSON_DEPTH_LIMIT + 1) + "]" * (JSON_DEPTH_LIMIT + 1) + "}")
    assert parse_json('{"a": "' + "[" * 500 + '"}') == {"a": "[" * 500}  # brackets inside a string are text
    path = tmp_path / "d.jsonl"
    good = [json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) for i in range(4)]
    path.write_text("\n".join(good[:2] + ['{"instruction": ' + DEEP + "}"] + good[2:]) + "\n")
    section = DataSection(max_seq_len=128, packing=False, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON line: nested more than 100 levels"):
        build_datasets(section, [DatasetSection(path=str(path))], load_template("plain"), tokenizer)
    section.on_bad_row = "skip"
    prepared = build_datasets(section, [DatasetSection(path=str(path))], load_template("plain"), tokenizer)
    stats = prepared.stats.datasets[str(path)]
    assert (stats.rows_read, stats.bad_rows_skipped, stats.examples) == (5, 1, 4)
    array = tmp_path / "d.json"
    array.write_text("[" + DEEP + "]")
    with pytest.raises(DataError, match=r"d\.json: malformed JSON: nested more than"):
        build_datasets(section, [DatasetSection(path=str(array))], load_template("plain"), tokenizer)


def test_deep_json_in_eval_and_prompt_files(base, tmp_path, capsys):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"prompt": "ok"}\n{"prompt": ' + DEEP + "}\n")
    assert main(["generate", "--model", str(base), "--file", str(deep)]) == 2
    err = capsys.readouterr().err
    assert f"{deep}:2: malformed JSON: nested more than" in err and "Traceback" not in err
    assert main(["eval", "loss", "--model", str(base), "--data", str(deep), "--format", "text",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "deep.jsonl:2: malformed JSON line: nested more than" in err and "Traceback" not in err
    config = tmp_path / "config.json"
    config.write_text(DEEP)
    assert main(["export", "--input", str(base), "--output", str(tmp_path / "x"), "--format", "hf",
                 "--config", str(config)]) in (0, 2)  # --config is only read for DeepSpeed checkpoints
    assert "Traceback" not in capsys.readouterr().err


# --- case 7: a full disk while safetensors writes ----------------------------------------------------------------

def _disk_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_safetensors_disk_full_names_the_last_good_checkpoint(tmp_path, tokenizer, monkeypatch, capsys):
    import finetune.engine as engine
    import llama_core.weights as weights

    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 2})
    real = engine.save_file
    calls = {"n": 0}

    def full_on_second(*args, **kwargs):
        calls["n"] += 1
        return _disk_full() if calls["n"] == 2 else real(*args, **kwargs)

    monkeypatch.setattr(engine, "save_file", full_on_second)
    assert main(["--recipe", recipe]) == 1  # the step-4 checkpoint cannot be written
    err = capsys.readouterr().err
    last = tmp_path / "out" / "checkpoints" / "step-00000002"
    assert f"The last complete checkpoint is {last}" in err and "SafetensorError" in err and "Traceback" not in err
    monkeypatch.setattr(engine, "save_file", real)
    monkeypatch.setattr(weights, "save_file", _disk_full)  # now the final model cannot be written
    assert main(["--recipe", recipe]) == 1
    err = capsys.readouterr().err
    assert "could not write the final model" in err and "step-00000004" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "final").exists()
    monkeypatch.undo()
    assert main(["--recipe", recipe]) == 0  # space again: the same command finishes the run
    assert sorted(_losses(tmp_path / "out")) == [1, 2, 3, 4] and (tmp_path / "out" / "final").is_dir()


def test_merge_disk_full_is_an_error_and_writes_nothing(base, tmp_path, monkeypatch, capsys):
    import llama_core.weights as weights

    from .test_merge import make_adapter

    adapter, _ = make_adapter(tmp_path, base, types.SimpleNamespace(path=base / "tokenizer.model"))
    monkeypatch.setattr(weights, "save_file", _disk_full)
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "Nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from finetune.cli import main
sys.exit(main(["--recipe", sys.argv[2]]))
"""


def test_a_real_file_size_limit_during_a_checkpoint(tmp_path, tokenizer):
    """A tiny RLIMIT_FSIZE (as on a nearly full disk): the checkpoint's 560 KB safetensors file cannot be written."""
    recipe = _recipe(tmp_path, tokenizer, checkpoint={"every_steps": 2})
    assert main(["validate", "--recipe", recipe]) == 0
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT, str(300_000), recipe], capture_output=True,
                            text=True, cwd=tmp_path, env=ENV, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "could not write the checkpoint of step 2" in result.stderr and "Traceback" not in result.stderr
    assert "The last complete checkpoint is none" in result.stderr
    assert main(["--recipe", recipe]) == 0  # without the limit the run completes


# --- case 8: damaged checkpoint metadata on resume ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("damaged")
    recipe = _recipe(root, tokenizer, checkpoint={"every_steps": 2, "keep_last": 2})
    assert main(["--recipe", recipe]) == 0
    return root, recipe


@pytest.mark.parametrize("file,content", [
    ("trainer_state.json", b""), ("trainer_state.json", b"garbage\x00\xff"), ("trainer_state.json", "pickle"),
    ("trainer_state.json", b'{"state": {"step": 4, "epoch": 2}, "recipe": {}}'),
    ("trainer_state.json", b'{"state": {"step": "four"}}'), ("trainer_state.json", b'{"state": {"step": 4}, "recipe": 7}'),
    ("trainer_state.json", b"[" * 10_000), ("rng.pt", b""), ("rng.pt", b"garbage"), ("rng.pt", "pickle"),
    ("rng.pt", "tensors"), ("optimizer.pt", "pickle")])
def test_damaged_checkpoint_files_say_what_to_delete(finished, tmp_path, capsys, file, content):
    import shutil

    root, recipe = finished
    run = tmp_path / "run"
    shutil.copytree(root / "out", run)
    last = run / "checkpoints" / "step-00000004"
    marker = tmp_path / "code-ran"
    if content == "pickle":
        torch.save({"torch": Evil(marker)}, last / file) if file.endswith(".pt") else \
            (last / file).write_bytes(pickle.dumps(Evil(marker)))
    elif content == "tensors":
        torch.save({"torch": torch.zeros(3), "python": [1, 2]}, last / file)  # readable, but not what we save
    else:
        (last / file).write_bytes(content)
    assert main(["--recipe", recipe, f"output_dir={run}", "training.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert str(last / file) in err, err  # the damaged file itself is named
    assert f"delete it to resume from {run / 'checkpoints' / 'step-00000002'}" in err and "Traceback" not in err
    assert "weights_only" not in err and "will likely succeed" not in err
    assert not marker.exists()  # no code from a checkpoint ever runs


# --- case 9: closed or full standard streams -----------------------------------------------------------------------

def test_closed_stdin_and_stdout(base, monkeypatch, capsys):
    import finetune.commands.chat as chat_command
    import finetune.commands.generate as generate_command

    for command in (chat_command, generate_command):
        monkeypatch.setattr(command, "load_model", lambda a: pytest.fail("loaded the model with a closed stream"))
    monkeypatch.setattr(sys, "stdin", None)  # how Python starts with file descriptor 0 closed
    assert main(["chat", "--model", str(base)]) == 2
    assert "standard input is closed" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["generate", "--model", str(base), "--prompt", "the"]) == 2
    assert "standard output is closed; give --output FILE" in capsys.readouterr().err


class _FullDevice(io.TextIOBase):
    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_stdout_in_process(base, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _FullDevice())
    assert main(["generate", "--model", str(base), "--prompt", "the", "--max-new-tokens", "2"]) == 1
    assert "error: cannot write to standard output (No space left on device)" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_real_closed_and_full_streams(base):
    full = subprocess.run(f"{sys.executable} -m finetune generate --model {base} --prompt the --max-new-tokens 2 "
                          f"> /dev/full", shell=True, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert full.returncode == 1 and "error: cannot write to standard output" in full.stderr
    assert "Traceback" not in full.stderr and "Exception ignored" not in full.stderr
    closed = subprocess.run(f"{sys.executable} -m finetune generate --model {base} --prompt the >&-", shell=True,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert closed.returncode == 2 and "standard output is closed" in closed.stderr
    no_stdin = subprocess.run(f"{sys.executable} -m finetune chat --model {base} <&-", shell=True, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV, timeout=120)
    assert no_stdin.returncode == 2 and "standard input is closed" in no_stdin.stderr
    assert "Traceback" not in closed.stderr + no_stdin.stderr


# --- cases 10 and 11: memory ---------------------------------------------------------------------------------------

def test_cpu_allocation_failure_is_a_clear_error(tmp_path, tokenizer, monkeypatch, capsys):
    from finetune.engine import LocalEngine

    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # a real CPU allocator failure: its exact text
    except RuntimeError as e:
        real_error = e
    else:
        pytest.skip("this machine allocated a petabyte")
    assert is_out_of_memory(real_error) and is_out_of_memory(MemoryError()) and is_out_of_memory(
        OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))
    recipe = _recipe(tmp_path, tokenizer)
    for error in (real_error, MemoryError()):
        def fail(self, batch, error=error):
            raise error
        monkeypatch.setattr(LocalEngine, "loss_sum", fail)
        assert main(["--recipe", recipe]) == 1
        err = capsys.readouterr().err
        assert "error: out of memory" in err and "training.micro_batch_size" in err and "Traceback" not in err


def test_validate_and_training_refuse_a_model_larger_than_the_machine(tmp_path, tokenizer, monkeypatch, capsys):
    import finetune.plan as plan

    monkeypatch.setattr(plan, "machine_memory", lambda device: (24 << 30, 20 << 30))  # a 24 GB machine
    recipe = _recipe(tmp_path, tokenizer, model={"preset": "llama-7b"}, training={"method": "full"})
    for command in (["validate", "--recipe", recipe], ["--recipe", recipe]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "6.48B parameters, full, fp32" in err and "more than this machine's 24.0 GiB of RAM" in err, err
        assert "training.method: lora" in err and "FINETUNE_SKIP_MEMORY_CHECK=1" in err
    assert not (tmp_path / "cache").exists()  # refused before the data was prepared
    monkeypatch.setenv("FINETUNE_SKIP_MEMORY_CHECK", "1")
    assert main(["validate", "--recipe", recipe]) == 0
    assert "warning: the model" in capsys.readouterr().err  # still said
    monkeypatch.delenv("FINETUNE_SKIP_MEMORY_CHECK")
    tiny = _recipe(tmp_path, tokenizer, model={"preset": "tiny"})
    assert main(["validate", "--recipe", tiny]) == 0 and "warning" not in capsys.readouterr().err


def test_check_memory_accounting():
    recipe = load_recipe(os.path.join(ROOT, "recipes", "alpaca.yaml"), check_paths=False)
    config = get_config("llama-7b")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(UserError, match=r"lora, fp32\) needs about .* \(weights 25\.1, activations"):  # 4 x 6.7B
        check_memory(recipe, config, cpu, "fp32", memory=(16 << 30, 16 << 30))
    assert check_memory(recipe, config, gpu, "bf16", memory=(80 << 30, 79 << 30)) is None
    assert "is free now" in check_memory(recipe, config, gpu, "bf16", memory=(80 << 30, 10 << 30))


def test_inference_refuses_weights_larger_than_the_machine(tmp_path, monkeypatch, capsys):
    import finetune.plan as plan

    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps(get_config("llama-65b").to_hf()))
    (huge / "model.safetensors").write_bytes(b"")  # never read: refused before
    monkeypatch.setattr(plan, "machine_memory", lambda device: (24 << 30, 20 << 30))
    assert main(["generate", "--model", str(huge), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "weights need 243.2 GiB in float32, more than this machine's 24.0 GiB of RAM" in err


def test_parameters_are_counted_without_building_a_model():
    c = get_config("llama-7b")
    huge = types.SimpleNamespace(**{k: getattr(c, k) for k in ("dim", "n_heads", "n_kv_heads", "head_dim",
                                                              "hidden_dim", "vocab_size", "tie_word_embeddings")},
                                 n_layers=1_000_000)
    start = time.time()
    total, _ = count_parameters(huge)
    assert time.time() - start < 0.1 and total > 2e14


# --- case 12: messages ------------------------------------------------------------------------------------------

def test_torch_load_errors_never_suggest_weights_only_false(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"a": Evil(marker)}, tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    messages = {}
    for name in ("evil.pt", "garbage.pt", "empty.pt"):
        with pytest.raises(Exception) as info:
            torch.load(tmp_path / name, weights_only=True)
        messages[name] = load_error_text(info.value)
    assert "objects other than tensors (pathlib.Path.touch" in messages["evil.pt"] or \
           "objects other than tensors" in messages["evil.pt"]
    assert messages["empty.pt"] == "the file is empty or cut short"
    assert all("weights_only" not in m and "likely succeed" not in m for m in messages.values()), messages
    assert not marker.exists()


def test_an_adapter_pickle_message_is_clean(base, tmp_path, capsys):
    from .test_merge import make_adapter

    adapter, _ = make_adapter(tmp_path, base, types.SimpleNamespace(path=base / "tokenizer.model"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"x": Evil(tmp_path / "ran")}, adapter / "adapter_model.bin")
    assert main(["generate", "--model", str(adapter), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "objects other than tensors" in err and "weights_only" not in err and not (tmp_path / "ran").exists()


def test_override_messages(tmp_path, tokenizer, capsys):
    recipe = _recipe(tmp_path, tokenizer)
    assert main(["validate", "--recipe", recipe, "training.lr=[oops"]) == 2
    err = capsys.readouterr().err
    assert "command line: 'training.lr=[oops': not valid YAML" in err and "quote" in err
    assert main(["validate", "--recipe", recipe, f"datasets=[{{path: {tmp_path / 'train.jsonl'}, format: bad}}]"]) == 2
    err = capsys.readouterr().err
    assert "command line: datasets[0].format: 'bad' is not one of" in err
    assert not re.search(r"recipe\.yaml:\d+: datasets", err)  # not blamed on the recipe's own datasets lines


def test_data_file_messages(tmp_path, tokenizer):
    section = DataSection(max_seq_len=128, packing=False, cache_dir=str(tmp_path / "cache"))
    header = tmp_path / "h.csv"
    header.write_text("instruction,input,output\n")
    with pytest.raises(DataError, match=r"h\.csv: no rows \(only the header line instruction,input,output\)"):
        build_datasets(section, [DatasetSection(path=str(header))], load_template("plain"), tokenizer)
    latin = tmp_path / "l.jsonl"
    good = [json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}).encode() for i in range(3)]
    latin.write_bytes(b"\n".join(good[:2] + [b'{"instruction": "caf\xe9", "output": "x"}'] + good[2:]) + b"\n")
    with pytest.raises(DataError, match=r"l\.jsonl:3: not UTF-8 text \(invalid continuation byte at byte 21 of "
                                        r"the line\)"):
        build_datasets(section, [DatasetSection(path=str(latin))], load_template("plain"), tokenizer)
    section.on_bad_row = "skip"
    prepared = build_datasets(section, [DatasetSection(path=str(latin))], load_template("plain"), tokenizer)
    stats = prepared.stats.datasets[str(latin)]
    assert (stats.rows_read, stats.bad_rows_skipped, stats.examples) == (4, 1, 3)


def test_prompt_file_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 16 of the "
                                        r"line\)"):
        chat.read_prompts(str(path))
