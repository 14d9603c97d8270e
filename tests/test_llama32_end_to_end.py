"""A Llama-3.2-shaped checkpoint end to end, as transformers makes one: tied head, llama3 rope scaling, GQA 4:1,
the 128,256-id vocabulary and a tokenizer.json with Llama 3's special tokens and chat template; tiny in every other
dimension. Logits, loss and gradients; greedy generation; LoRA (with trained token rows) into PEFT with equal
logits; merge; the Hugging Face <-> Meta round trip; the chunked loss over the large vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from finetune.cli import main
from llama_core import kernels
from llama_core.weights import load_model

from .conftest import save_llama32_like

transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def llama32(llama3_tokenizer, tmp_path_factory) -> Path:
    """A transformers LlamaForCausalLM saved with save_pretrained, its tokenizer and chat template beside it."""
    return save_llama32_like(tmp_path_factory.mktemp("llama32"), llama3_tokenizer)


def _hf(folder) -> torch.nn.Module:
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_logits_loss_gradients_and_generation(llama32):
    ours, theirs = load_model(llama32), _hf(llama32)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.num_parameters() == theirs.num_parameters()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > 16 original positions
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, **TOL)
    ours.train(), theirs.train()
    loss, their_loss = ours(ids, labels=ids), theirs(ids, labels=ids).loss
    torch.testing.assert_close(loss, their_loss, **TOL)
    loss.backward()
    their_loss.backward()
    mine = {n: p.grad for n, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(mine[name], p.grad, atol=1e-5, rtol=1e-3, msg=name)
    # The loss over 128,256 ids is computed in chunks: the largest temporary is one chunk of logits.
    buffer = kernels._logits_buffers[(128256, torch.device("cpu"))]
    assert buffer.shape[0] <= ours.lm_head.chunk_size
    ours.eval()
    from llama_core.generate import generate
    prompt = ids[0, :10].tolist()
    mine = generate(ours, [prompt], max_new_tokens=12, eos_id=None)[0]
    their = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 10:].tolist()
    assert mine == their


def test_lora_with_the_model_template_into_peft_then_merge_and_round_trip(llama32, llama3_tokenizer, tmp_path):
    from peft import PeftModel

    rows = [{"messages": [{"role": "user", "content": f"the day {i}"}, {"role": "assistant", "content": "one two"}]}
            for i in range(16)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"model": {"checkpoint": str(llama32)}, "template": "model",
              "datasets": [{"path": str(tmp_path / "chat.jsonl"), "format": "conversations"}],
              "data": {"max_seq_len": 128, "cache_dir": str(tmp_path / "cache")},
              "training": {"method": "lora", "max_steps": 4, "micro_batch_size": 2, "lr": 1e-2, "precision": "fp32"},
              "lora": {"r": 4, "target_modules": "all-linear", "dropout": 0.0},
              "logging": {"tensorboard": False, "progress": False}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["--recipe", str(tmp_path / "r.yaml")]) == 0
    final = tmp_path / "run" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    eot, header = llama3_tokenizer.token_to_id("<|eot_id|>"), llama3_tokenizer.token_to_id("<|start_header_id|>")
    assert {eot, header, 128000} <= set(adapter["trainable_token_indices"]["embed_tokens"])
    assert "lm_head" not in adapter["trainable_token_indices"]  # tied: PEFT ties the head's rows itself
    # The adapter loads in transformers + PEFT with the same logits as ours.
    from finetune.inference import load_for_inference
    ours, tokenizer, template = load_for_inference(final)
    assert template.name == "model" and tokenizer.stop_ids[0] == llama3_tokenizer.eos_id
    theirs = PeftModel.from_pretrained(_hf(llama32), final).eval()
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    ids[0, 5] = eot  # a trained row
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, **TOL)
    # final/ carries the tokenizer and the chat template: transformers prompts as we trained.
    auto = transformers.AutoTokenizer.from_pretrained(final)
    messages = [{"role": "user", "content": "the day"}]
    from finetune.templates import tokenize
    assert auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        tokenize(template.prompt(messages), tokenizer)
    # merge: one checkpoint, tied and scaled as the base, equal to base + adapter
    assert main(["merge", "--adapter", str(final), "--output", str(tmp_path / "merged")]) == 0
    merged = _hf(tmp_path / "merged")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, theirs(ids).logits, **TOL)
    # Hugging Face -> Meta -> Hugging Face: lossless, the tie and the scaling kept. Meta's params.json knows only
    # Llama 3.1's constants (original context 8192): this test's short context of 16 has no Meta form, and says so.
    assert main(["export", "--input", str(tmp_path / "merged"), "--output", str(tmp_path / "meta"),
                 "--format", "meta"]) == 2
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    for key in ("rope_scaling", "rope_parameters"):
        config[key]["original_max_position_embeddings"] = 8192
    (tmp_path / "merged" / "config.json").write_text(json.dumps(config))
    merged = _hf(tmp_path / "merged")
    assert main(["export", "--input", str(tmp_path / "merged"), "--output", str(tmp_path / "meta"),
                 "--format", "meta"]) == 0
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["rope_scaling_factor"] == 32.0 and params["use_scaled_rope"] is True
    back = load_model(tmp_path / "meta")
    assert back.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(back(ids), merged(ids).logits, **TOL)
