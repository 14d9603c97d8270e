"""`finetune export --format gguf`: a run's final/ folder, Meta and bf16 checkpoints, a Llama-3.2-shaped folder made
by transformers (tied, llama3 rope scaling, byte-level BPE with Llama 3's special tokens and chat template) and a
DeepSpeed step, written through the command and read back with gguf's reader; the output-file rule and bad inputs
(exit 2, nothing left behind); and, where llama-cpp-python is installed, llama.cpp running the command's files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from finetune.cli import main
from finetune.model_files import companion_files
from finetune.templates import load_template
from llama_core.config import get_config
from llama_core.generate import generate
from llama_core.model import Transformer
from llama_core.weights import load_model, save_hf

from ..conftest import LLAMA3_INSTRUCT, LLAMA3_ROPE, save_llama32_like
from .test_gguf import llama_cpp_run, read, unpermute, values

Q = gguf.GGMLQuantizationType


def tiny(seed: int = 0, **overrides) -> Transformer:
    # hidden_dim 192: every row of every matrix fills whole 32-value q8_0 blocks (no f16 fallback)
    model = Transformer(get_config("tiny-gqa", hidden_dim=192, **overrides))
    model.reset_parameters(seed=seed, std=0.2)
    return model.eval()


@pytest.fixture(scope="module")
def run_final(tmp_path_factory, tokenizer) -> Path:
    """A full training run's final/ as the trainer writes it (save_hf with the run's companion files): weights,
    tokenizer.model, template.yaml and a tokenizer_config.json whose chat_template renders the template."""
    final = tmp_path_factory.mktemp("runs") / "my-run" / "final"
    model = tiny()
    save_hf(model, model.config, final, extra_files=companion_files(tokenizer, load_template("vicuna"), max_len=256))
    return final


@pytest.fixture(scope="module")
def llama3_folder(llama3_tokenizer, tmp_path_factory) -> Path:
    """A Llama-3.2-shaped checkpoint saved by transformers (tests/conftest.py: save_llama32_like), GQA 2:1."""
    folder = tmp_path_factory.mktemp("models") / "llama32-tiny"
    return save_llama32_like(folder, llama3_tokenizer, heads=2, kv_heads=1)


def export(*args: str | Path) -> int:
    return main(["export", *map(str, args)])


def test_a_runs_final_folder(run_final, tmp_path, capsys):
    out = tmp_path / "my-run.gguf"
    assert export("--input", run_final, "--output", out, "--format", "gguf") == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (" in printed
    assert "gguf f32): 21 tensors, vocabulary of 320 tokens, chat template: yes" in printed
    assert os.listdir(tmp_path) == ["my-run.gguf"]  # no temporary file left
    kv, tensors = read(out)
    vicuna = load_template("vicuna").to_jinja()
    assert kv["tokenizer.chat_template"] == vicuna
    assert json.loads((run_final / "tokenizer_config.json").read_text())["chat_template"] == vicuna
    expected = {"general.name": "my-run", "general.file_type": 0, "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.add_bos_token": True, "llama.vocab_size": 320, "llama.context_length": 256,
                "llama.attention.head_count_kv": 2}
    assert {k: kv.get(k) for k in expected} == expected
    assert "tokenizer.ggml.eot_token_id" not in kv and "rope_freqs.weight" not in tensors
    state = load_model(run_final).state_dict()
    assert len(tensors) == 21 and all(t.tensor_type == Q.F32 for t in tensors.values())
    assert torch.equal(values(tensors["output.weight"]), state["lm_head.weight"])
    assert torch.equal(unpermute(values(tensors["blk.0.attn_k.weight"]), 2),
                       state["model.layers.0.self_attn.k_proj.weight"])


def test_an_existing_file_is_replaced_only_with_overwrite(run_final, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    assert export("--input", run_final, "--output", out, "--format", "gguf") == 2
    assert f"--output {out}: exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"mine" and os.listdir(tmp_path) == ["m.gguf"]
    assert export("--input", run_final, "--output", out, "--format", "gguf", "--dtype", "f16", "--overwrite") == 0
    kv, tensors = read(out)
    assert kv["general.file_type"] == 1 and tensors["blk.0.ffn_up.weight"].tensor_type == Q.F16
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_q8_0(run_final, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert export("--input", run_final, "--output", out, "--format", "gguf", "--dtype", "q8_0") == 0
    assert "gguf q8_0): 21 tensors" in capsys.readouterr().out
    kv, tensors = read(out)
    assert kv["general.file_type"] == 7
    state = load_model(run_final).state_dict()
    for name, t in tensors.items():
        assert t.tensor_type == (Q.F32 if name.endswith("norm.weight") else Q.Q8_0), name
    ours, got = state["model.layers.1.mlp.down_proj.weight"], values(tensors["blk.1.ffn_down.weight"])
    blocks = ours.reshape(-1, 32)  # per 32-value block: within half an int8 step of amax/127, plus the f16 scale
    bound = blocks.abs().amax(dim=1, keepdim=True) * (0.5 / 127 + 2 ** -11)
    assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all()
    assert (got - ours).abs().max() > 0  # really quantized


def test_meta_layout_and_stored_bf16(run_final, tmp_path):
    # The Meta layout gives the same tensors as the Hugging Face one (q/k converted back from Meta's layout).
    meta, hf_file, meta_file = tmp_path / "meta", tmp_path / "hf.gguf", tmp_path / "meta.gguf"
    assert export("--input", run_final, "--output", meta, "--format", "meta") == 0
    assert export("--input", run_final, "--output", hf_file, "--format", "gguf") == 0
    assert export("--input", meta, "--output", meta_file, "--format", "gguf") == 0
    (kv_hf, hf), (kv_meta, from_meta) = read(hf_file), read(meta_file)
    assert hf.keys() == from_meta.keys()
    assert all(np.array_equal(hf[n].data, from_meta[n].data) for n in hf)
    assert kv_meta["tokenizer.chat_template"] == kv_hf["tokenizer.chat_template"]  # meta/ carries template.yaml
    # --dtype auto keeps a bfloat16 checkpoint in bf16.
    model = tiny()
    save_hf(model, model.config, tmp_path / "bf16", dtype=torch.bfloat16, extra_files={
        "tokenizer.model": run_final / "tokenizer.model"})
    assert export("--input", tmp_path / "bf16", "--output", tmp_path / "bf16.gguf", "--format", "gguf") == 0
    kv, tensors = read(tmp_path / "bf16.gguf")
    assert kv["general.file_type"] == 32 and tensors["token_embd.weight"].tensor_type == Q.BF16
    assert "tokenizer.chat_template" not in kv  # no template.yaml, no chat template: none written


def test_llama3_folder_tied_and_scaled(llama3_folder, llama3_tokenizer, tmp_path, capsys):
    out = tmp_path / "llama32.gguf"
    assert export("--input", llama3_folder, "--output", out, "--format", "gguf") == 0
    assert "vocabulary of 128,256 tokens, chat template: yes" in capsys.readouterr().out
    kv, tensors = read(out)
    tok = llama3_tokenizer
    expected = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.bos_token_id": 128000, "tokenizer.ggml.eos_token_id": 128001,
                "tokenizer.ggml.eot_token_id": tok.token_to_id("<|eot_id|>"), "tokenizer.ggml.add_bos_token": True,
                "tokenizer.chat_template": LLAMA3_INSTRUCT, "llama.vocab_size": 128256,
                "llama.rope.freq_base": 500000.0, "general.name": "llama32-tiny"}
    assert {k: kv.get(k) for k in expected} == expected
    assert tok.token_to_id("<|eot_id|>") == 128009
    assert kv["tokenizer.ggml.tokens"][128009] == "<|eot_id|>"
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd.weight
    # llama.cpp divides each rotary frequency by its factor: transformers' llama3 frequencies are base / factor.
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = HFConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=256,
                  rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)  # head_dim 16: 8 rotary frequencies
    factors = values(tensors["rope_freqs.weight"])
    torch.testing.assert_close(factors, base / scaled, rtol=1e-5, atol=0)
    assert factors[-1] == 32 and factors.min() > 1  # an original context of 16: even the highest is scaled a bit
    assert "llama.rope.scaling.type" not in kv


def test_a_deepspeed_checkpoint(run_final, tokenizer, tmp_path, monkeypatch):
    """A DeepSpeed step folder: its consolidated weights (stubbed here: consolidating needs real ranks, see
    test_merge's two-rank test) with the run's tokenizer and the recipe's template."""
    import finetune.merge

    run = tmp_path / "ds-run"
    step = run / "checkpoints" / "step-00000002"
    (step / "deepspeed").mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"recipe": {"template": "alpaca"}}))
    (run / "tokenizer.model").write_bytes(Path(tokenizer.path).read_bytes())
    model = load_model(run_final)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(finetune.merge, "deepspeed_state", lambda path, config: (state, model.config, [run]))
    assert export("--input", step, "--output", tmp_path / "ds.gguf", "--format", "gguf") == 0
    kv, tensors = read(tmp_path / "ds.gguf")
    assert kv["general.name"] == "ds-run" and kv["general.file_type"] == 0  # consolidated weights are fp32
    assert kv["tokenizer.chat_template"] == load_template("alpaca").to_jinja()
    assert torch.equal(values(tensors["token_embd.weight"]), state["model.embed_tokens.weight"])


def _refused(capsys, folder: Path, message: str, *args) -> None:
    before = sorted(os.listdir(folder))
    assert export(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(os.listdir(folder)) == before  # nothing written, no temporary file


def test_bad_inputs_exit_2_and_write_nothing(run_final, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    gguf_args = ("--output", out / "m.gguf", "--format", "gguf")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    _refused(capsys, out, "is a LoRA adapter (adapter_config.json), not a whole model: merge it first with finetune "
                          "merge", "--input", adapter, *gguf_args)
    _refused(capsys, out, "--dtype q8_0 does not fit --format hf (a GGUF type: only with --format gguf)",
             "--input", run_final, "--output", out / "hf", "--format", "hf", "--dtype", "q8_0")
    _refused(capsys, out, "--dtype float16 does not fit --format gguf (did you mean f16?)",
             "--input", run_final, *gguf_args, "--dtype", "float16")
    _refused(capsys, out, "--shards and --shard-size are for --format meta and hf",
             "--input", run_final, *gguf_args, "--shards", "2")
    (out / "folder.gguf").mkdir()
    _refused(capsys, out, "folder.gguf: is a folder; give a file name",
             "--input", run_final, "--output", out / "folder.gguf", "--format", "gguf")
    _refused(capsys, out, "--format gguf writes one file, whose name ends in .gguf (not a folder)",
             "--input", run_final, "--output", out / "new", "--format", "gguf")
    (out / "target.gguf").write_bytes(b"mine")
    (out / "link.gguf").symlink_to(out / "target.gguf")
    for overwrite in ((), ("--overwrite",)):
        _refused(capsys, out, "link.gguf: is a symbolic link",
                 "--input", run_final, "--output", out / "link.gguf", "--format", "gguf", *overwrite)
    assert (out / "target.gguf").read_bytes() == b"mine" and (out / "link.gguf").is_symlink()
    _refused(capsys, out, "no such folder", "--input", tmp_path / "missing", *gguf_args)
    (tmp_path / "empty").mkdir()
    _refused(capsys, out, "not a LLaMA checkpoint", "--input", tmp_path / "empty", *gguf_args)
    state = tmp_path / "step"
    state.mkdir()
    (state / "trainer_state.json").write_text("{}")
    _refused(capsys, out, "is a single-device training checkpoint", "--input", state, *gguf_args)
    model = tiny()
    bare = save_hf(model, model.config, tmp_path / "bare")
    _refused(capsys, out, "no tokenizer found", "--input", bare, *gguf_args)
    # A checkpoint found damaged while its tensors are being written: the partial file is removed.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in run_final.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    _refused(capsys, out, "model.safetensors: corrupt or truncated safetensors file", "--input", damaged, *gguf_args)


def test_without_the_gguf_package(run_final, tmp_path, capsys, monkeypatch):
    import finetune.gguf_export

    monkeypatch.setattr(finetune.gguf_export, "gguf", None)
    _refused(capsys, tmp_path, "GGUF export needs the gguf package (llama.cpp's writer): pip install gguf",
             "--input", run_final, "--output", tmp_path / "m.gguf", "--format", "gguf")


# --- llama.cpp itself (optional: pip install llama-cpp-python) ----------------------------------------------------

# Absolute, for logits up to about 6 (both models); measured 8.5e-6 (the Llama-3-shaped model) and 1.2e-5 (the run's),
# in fp32 with an fp32 KV cache (llama.cpp's default f16 cache alone adds ~1e-3).
LOGIT_TOLERANCE = 1e-4
TEXT = "It was a long day of the year, one two three 12345 water light"  # > 16 tokens: past the original context


@pytest.mark.parametrize("which", ["llama3", "run"])
def test_llama_cpp_runs_the_exported_file(which, llama3_folder, llama3_tokenizer, run_final, tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    folder, tok = (llama3_folder, llama3_tokenizer) if which == "llama3" else (run_final, tokenizer)
    out = tmp_path / "m.gguf"
    assert export("--input", folder, "--output", out, "--format", "gguf", "--dtype", "f32") == 0
    model = load_model(folder)
    prompt = tok.encode(TEXT, bos=True)
    assert len(prompt) > 16
    theirs, greedy, their_prompt = llama_cpp_run(out, prompt, new_tokens=8, text=TEXT)
    assert their_prompt == prompt  # the same tokenizer
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LOGIT_TOLERANCE)
    assert greedy == generate(model, [prompt], max_new_tokens=8, eos_id=None)[0]
    if which == "llama3":  # the scaling is applied: without it the logits differ far beyond the tolerance
        assert model.config.rope_scaling["rope_type"] == "llama3" and model.config.tie_word_embeddings
        unscaled = Transformer(model.config.replace(rope_scaling=None))
        unscaled.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (unscaled.eval()(torch.tensor([prompt]))[0] - ours).abs().max() > 100 * LOGIT_TOLERANCE
