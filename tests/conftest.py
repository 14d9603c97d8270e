"""Shared fixtures: a small trained tokenizer, tiny random models, and their transformers twins.

Everything runs on CPU in fp32, offline: the tokenizer is trained here on a generated corpus, never downloaded.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

# No test depends on a timing: `precision: auto` on a CPU with bf16 instructions would measure one (and subprocesses
# inherit this). The decision itself is tested with mocked timings in tests/finetune/test_precision.py.
os.environ.setdefault("FINETUNE_CPU_BF16", "0")
# Offline: no test reaches the Hub (huggingface_hub and datasets read this at their import, after this line). The
# online paths are tested with huggingface_hub's functions replaced (tests/finetune/test_hub.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_core.config import get_config
from llama_core.model import Transformer
from llama_core.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the a of to and in is was for on with it be are have not but one two three model token data train test "
         "story day year time people water light house small good new old first last long").split()


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """English-ish sentences with numbers, plus a little Cyrillic and Chinese (12 KB, 49 distinct characters)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(rng.choice(["The", "A", "It", "We"]) + " " + " ".join(words) + rng.choice(".?!,"))
    return lines + ["Привет, мир!", "世界"]


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    """`make_corpus()`: the tokenizer's training text."""
    return make_corpus()


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    """A 320-piece LLaMA-style tokenizer (the "tiny" presets' vocab_size) trained on `corpus`."""
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tokenizer") / "tokenizer.model", 320)


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: `tiny_model(preset="tiny", seed=0, **overrides)`, a randomly initialized fp32 model in eval mode."""
    def make_model(preset: str = "tiny", seed: int = 0, **overrides) -> Transformer:
        model = Transformer(get_config(preset, **overrides))
        model.reset_parameters(seed=seed)
        return model.float().eval()
    return make_model


def _hf_twin(model: Transformer):
    """transformers' `LlamaForCausalLM` with the same config and weights as `model` (fp32, eval mode)."""
    import transformers

    hf = model.config.to_hf()
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    twin = transformers.LlamaForCausalLM(config)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.float().eval()


@pytest.fixture(scope="session")
def hf_twin():
    """The function `hf_twin(model)`: the transformers `LlamaForCausalLM` equivalent of one of our models."""
    return _hf_twin


@pytest.fixture(autouse=True)
def _seed():
    """Tests start from the same global RNG state whatever ran before them."""
    torch.manual_seed(0)
    random.seed(0)


def write_llama3_json(folder: Path, corpus, config: dict | None = None) -> Path:
    """A tiny Llama 3 style tokenizer.json in `folder`: byte-level BPE trained on `corpus` with Llama 3's split
    regex, its 256 special tokens at ids 128000..128255 (in the model's vocab, so the ids stay sparse), and
    <|begin_of_text|> added by the post-processor; with `config`, a tokenizer_config.json beside it."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Tokenizers

    from llama_core.tokenizer import LLAMA3_SPECIAL, LLAMA3_SPLIT

    tk = Tokenizers(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=[],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tk.to_str())
    spec["model"]["vocab"].update({s: 128000 + i for i, s in enumerate(LLAMA3_SPECIAL)})
    spec["added_tokens"] = [{"id": 128000 + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, s in enumerate(LLAMA3_SPECIAL)]
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                                       "tokens": ["<|begin_of_text|>"]}}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


@pytest.fixture(scope="session")
def llama3_tokenizer(corpus, tmp_path_factory):
    """A tiny Llama 3 style tokenizer (byte-level BPE, 300 pieces, the 256 special tokens at 128000..128255), as a
    folder with tokenizer.json and a base model's tokenizer_config.json (bos <|begin_of_text|>, eos
    <|end_of_text|>)."""
    from llama_core.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    write_llama3_json(folder, corpus, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                                       "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072})
    return load_tokenizer(folder)


# Meta-Llama-3-8B-Instruct's chat template, as published in its tokenizer_config.json.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def save_llama32_like(folder: Path, tokenizer, *, heads: int = 8, kv_heads: int = 2) -> Path:
    """A Llama-3.2-shaped checkpoint saved by transformers in `folder`: tied head, llama3 rope scaling with an
    original context of 16 (so that short prompts already use the scaling), GQA, the 128,256-id vocabulary, and
    `tokenizer`'s files (tokenizer.json with Llama 3's special tokens) with an Instruct chat template; tiny in every
    other dimension, weights at a visible scale (std 0.2) so that differences show."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=128256, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(folder)
    for name, source in tokenizer.files.items():
        (folder / name).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_INSTRUCT}))
    return folder
