"""A compact LLaMA: model, presets, checkpoint formats, tokenizer and generation."""
from .config import PRESETS, LlamaConfig, get_config
from .model import IGNORE_INDEX, KVCache, Transformer, count_targets

__all__ = ["PRESETS", "LlamaConfig", "get_config", "IGNORE_INDEX", "KVCache", "Transformer", "count_targets"]
