"""Shared fixtures: a small trained tokenizer, tiny random models, and their transformers twins.

Everything runs on CPU in fp32, offline: the tokenizer is trained here on a generated corpus, never downloaded.
"""
from __future__ import annotations

import random

import pytest
import torch

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
