"""`finetune merge` and `finetune export`: merged logits equal base + adapter (ours and transformers'), the probe
check and quantized-base refusals, the tokenizer files transformers reads, and lossless HF <-> Meta conversion."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from finetune.inference import load_for_inference
from finetune.cli import main
from finetune.templates import load_template, segments_text, tokenize
from llama_core.weights import load_model, save_hf

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[2]


def make_base(root: Path, model, tokenizer) -> Path:
    """An HF checkpoint folder of `model` with the tokenizer, as a run's model.checkpoint would be."""
    return save_hf(model, model.config, root / "base", extra_files={"tokenizer.model": tokenizer.path})


def make_adapter(root: Path, base: Path, tokenizer, template: str = "vicuna", seed: int = 0):
    """A LoRA adapter folder as the trainer writes OUT/final (nonzero lora_B); returns (folder, PeftModel)."""
    from peft import LoraConfig, get_peft_model

    core = load_model(base)
    peft_model = get_peft_model(core, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, lora_dropout=0.0))
    peft_model.peft_config["default"].task_type = "CAUSAL_LM"  # as finetune.build.add_lora
    peft_model.peft_config["default"].base_model_name_or_path = str(base.resolve())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    out = root / "adapter"
    # save_embedding_layers=False: PEFT's "auto" check calls config.from_pretrained, which our config lacks.
    peft_model.save_pretrained(out, save_embedding_layers=False)
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    (out / "template.yaml").write_text(yaml.safe_dump(load_template(template).definition, sort_keys=False))
    return out, peft_model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, tokenizer):
    root = tmp_path_factory.mktemp("merge")
    base = make_base(root, tiny_model(), tokenizer)
    adapter, peft_model = make_adapter(root, base, tokenizer)
    probe = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = peft_model(probe)
    return dict(root=root, base=base, adapter=adapter, probe=probe, expected=expected)


def test_merge_logits_equal_base_plus_adapter(run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run["adapter"]), "--output", str(out), "--shard-size", "200KB"]) == 0
    printed = capsys.readouterr().out
    assert "probe check passed" in printed and "model.safetensors.index.json" in printed
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded per --shard-size
    merged = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(merged(run["probe"]), run["expected"], atol=1e-5, rtol=0)
        base = load_model(run["base"])(run["probe"])
    assert (base - run["expected"]).abs().max() > 1e-2  # the adapter does change the model
    assert (out / "tokenizer.model").read_bytes() == (run["adapter"] / "tokenizer.model").read_bytes()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == load_template("vicuna").to_jinja()
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<s>", "</s>", True)
    assert yaml.safe_load((out / "template.yaml").read_text()) == load_template("vicuna").definition


def test_merged_folder_loads_in_transformers(run, tmp_path, tokenizer):
    import transformers

    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run["adapter"]), "--output", str(out), "--template", "alpaca"]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(run["probe"]).logits, run["expected"], atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    template = load_template("alpaca")
    conversation = [{"role": "user", "content": "Name two days."}, {"role": "assistant", "content": "It is one."},
                    {"role": "user", "content": "And the year 2023?"}]
    assert hf_tok.apply_chat_template(conversation[:2], tokenize=False) == \
        segments_text(template.render(conversation[:2]))
    assert hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == \
        segments_text(template.prompt(conversation))
    # A single-turn prompt tokenizes exactly as we do. (After </s> in multi-turn text, transformers' Metaspace
    # pre-tokenizer adds a "▁" that our per-segment encoding does not: the text is the same, one id differs.)
    ids = hf_tok.apply_chat_template(conversation[:1], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == tokenize(template.prompt(conversation[:1]), tokenizer)


def test_failed_probe_check_writes_nothing(run, tmp_path, monkeypatch, capsys):
    from peft.tuners.lora import LoraModel

    original = LoraModel.merge_and_unload

    def broken_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken_merge)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run["adapter"]), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "merge check failed" in err and "float32" in err and "Traceback" not in err
    assert not out.exists()


def test_quantized_base_needs_dequantize(run, tmp_path, capsys):
    base = tmp_path / "qbase"
    shutil.copytree(run["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    args = ["merge", "--adapter", str(run["adapter"]), "--base", str(base), "--output", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "quantization_config (bitsandbytes)" in err and "--dequantize" in err
    assert not (tmp_path / "m").exists()
    # Full-precision tensors behind a quantization_config: --dequantize reads them and merges.
    assert main(args + ["--dequantize"]) == 0
    assert "--dequantize:" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    # Packed 4-bit tensors cannot be read on CPU: a clear refusal, not a traceback.
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight.absmax"] = torch.ones(4)
    save_file(tensors, base / "model.safetensors")
    assert main(args[:-1] + [str(tmp_path / "m2"), "--dequantize"]) == 2
    err = capsys.readouterr().err
    assert "cannot dequantize" in err and "absmax" in err


def test_merge_in_bfloat16_and_base_fallbacks(run, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["merge", "--adapter", str(run["adapter"]), "--output", str(out), "--dtype", "bfloat16"]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    # An adapter whose config names no base: a run's OUT/base next to OUT/final is used, else --base is required.
    run_dir = tmp_path / "run"
    shutil.copytree(run["adapter"], run_dir / "final")
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    (run_dir / "final" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    assert main(["merge", "--adapter", str(run_dir / "final"), "--output", str(tmp_path / "x")]) == 2
    assert "pass --base" in capsys.readouterr().err
    shutil.copytree(run["base"], run_dir / "base")
    assert main(["merge", "--adapter", str(run_dir / "final"), "--output", str(tmp_path / "x")]) == 0


def test_merge_user_errors(run, tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(run["base"]), "--output", str(tmp_path / "o")]) == 2
    assert "not a PEFT adapter" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(run["adapter"]), "--output", str(run["base"])]) == 2
    assert "choose a new folder" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(run["adapter"]), "--base", "meta-llama/Llama-2-7b-hf",
                 "--output", str(tmp_path / "o")]) == 2
    assert "not in the Hugging Face cache" in capsys.readouterr().err


def test_partial_or_damaged_adapters_are_refused(run, tmp_path, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(run["adapter"], partial)
    weights = load_file(partial / "adapter_model.safetensors")  # layer 1's adapter renamed to a layer 7
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in weights.items()},
              partial / "adapter_model.safetensors")
    assert main(["merge", "--adapter", str(partial), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "its weights do not match the layers its config adapts" in err and "missing" in err and "unknown" in err
    assert not (tmp_path / "o").exists()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # truncated
    assert main(["merge", "--adapter", str(partial), "--output", str(tmp_path / "o")]) == 2
    assert "cannot read its weights" in capsys.readouterr().err
    (partial / "adapter_model.safetensors").unlink()
    assert main(["generate", "--model", str(partial), "--prompt", "hi"]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


def test_export_onto_itself_keeps_the_run_files(run, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run["adapter"]), "--output", str(merged)]) == 0
    before = {f: (merged / f).read_bytes() for f in ("template.yaml", "tokenizer_config.json", "tokenizer.model")}
    assert main(["export", "--input", str(merged), "--output", str(merged), "--format", "hf",
                 "--dtype", "bfloat16"]) == 0
    assert {f: (merged / f).read_bytes() for f in before} == before
    assert load_file(merged / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_load_for_inference_accepts_adapter_folder(run):
    model, tokenizer, template = load_for_inference(run["adapter"])
    with torch.no_grad():
        torch.testing.assert_close(model(run["probe"]), run["expected"], atol=1e-5, rtol=0)
    assert template.name == "vicuna" and tokenizer.vocab_size == 320
    model2, _, _ = load_for_inference(run["base"], run["adapter"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


def test_export_hf_meta_hf_is_lossless(run, tmp_path, capsys):
    meta, back = tmp_path / "meta", tmp_path / "back"
    assert main(["export", "--input", str(run["base"]), "--output", str(meta), "--format", "meta",
                 "--shards", "2"]) == 0
    assert sorted(p.name for p in meta.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    assert main(["export", "--input", str(meta), "--output", str(back), "--format", "hf"]) == 0
    assert "wrote" in capsys.readouterr().out
    original, roundtrip = load_file(run["base"] / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == roundtrip.keys()
    assert all(torch.equal(original[k], roundtrip[k]) and original[k].dtype == roundtrip[k].dtype for k in original)
    with torch.no_grad():
        assert torch.equal(load_model(back)(run["probe"]), load_model(run["base"])(run["probe"]))
    a, b = (json.loads((d / "config.json").read_text()) for d in (run["base"], back))
    # params.json has no context length (Meta's loader takes max_seq_len as an argument): it comes back as 2048.
    assert {k: v for k, v in a.items() if k != "max_position_embeddings"} == \
        {k: v for k, v in b.items() if k != "max_position_embeddings"}
    assert (back / "tokenizer.model").is_file() and (back / "tokenizer_config.json").is_file()


def test_export_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["export", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                 "--format", "hf"]) == 2
    assert "not a LLaMA checkpoint" in capsys.readouterr().err
    assert main(["export", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--format", "gguf"]) == 2


_DEEPSPEED_RUN = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.multiprocessing as mp
    import deepspeed
    from llama_core.config import get_config
    from llama_core.model import Transformer

    def rank_main(rank, step_dir):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2)
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = Transformer(get_config("tiny"))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=config)
        x = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(x, labels=x))
        engine.step()
        engine.save_checkpoint(step_dir, tag="deepspeed", save_latest=False)
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            if rank == 0:
                torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, step_dir + "/expected.pt")
        dist.barrier()

    if __name__ == "__main__":
        step_dir = sys.argv[1]
        recipe = {"model": {"preset": "tiny", "checkpoint": None, "config": {}}, "training": {"method": "full"}}
        os.makedirs(step_dir, exist_ok=True)
        with open(step_dir + "/trainer_state.json", "w") as f:
            json.dump({"state": {"step": 1}, "world_size": 2, "recipe": recipe}, f)
        mp.start_processes(rank_main, args=(step_dir,), nprocs=2, start_method="fork")  # inherit the imports
""")


@pytest.mark.slow
def test_export_consolidates_a_two_rank_zero3_checkpoint(tmp_path, tokenizer):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step-00000001"
    (tmp_path / "ds_run.py").write_text(_DEEPSPEED_RUN)
    shutil.copyfile(tokenizer.path, tmp_path / "tokenizer.model")
    os.makedirs(run_dir)
    shutil.copyfile(tokenizer.path, run_dir / "tokenizer.model")  # a run keeps its tokenizer in OUT/
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "ds_run.py"), str(step)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "hf"
    assert main(["export", "--input", str(step), "--output", str(out), "--format", "hf"]) == 0
    expected = torch.load(step / "expected.pt", weights_only=True)
    got = load_file(out / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k].float()) for k in expected)
    assert (out / "tokenizer.model").is_file()
