"""Model configuration: one dataclass plus the named presets of the LLaMA and Llama-2 papers."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # grouped-query attention (Llama-2 70B); None means n_heads
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # Llama-2's extra factor on the hidden size
    hidden_dim: int | None = None  # explicit SwiGLU hidden size; derived from the above when None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None and all(isinstance(getattr(self, n), int) for n in ("dim", "multiple_of")) \
                and self.multiple_of > 0 and isinstance(self.ffn_dim_multiplier, (int, float, type(None))):
            # The paper's 2/3 * 4d, then Llama-2's multiplier, then rounded up to `multiple_of`.
            hidden = int(2 * (4 * self.dim) / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if name == "hidden_dim" and value is None:  # not derivable: the fields it comes from are reported
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name, low in (("rope_theta", "gt"), ("norm_eps", "ge"), ("ffn_dim_multiplier", "gt")):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if value is None and name == "ffn_dim_multiplier":
                continue
            if not number or (value <= 0 if low == "gt" else value < 0):
                problems.append(f"{name} must be a {'positive' if low == 'gt' else 'non-negative'} number, "
                                f"got {value!r}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            elif self.head_dim % 2:
                problems.append(f"head dimension dim/n_heads ({self.head_dim}) must be even for rotary embeddings")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with some fields changed; `hidden_dim` is re-derived unless given."""
        fields = dataclasses.asdict(self)
        if not {"dim", "multiple_of", "ffn_dim_multiplier"}.isdisjoint(changes) and "hidden_dim" not in changes:
            fields["hidden_dim"] = None
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            fields["n_kv_heads"] = None  # plain multi-head attention stays so
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; valid: {sorted(fields)}")
        fields.update(changes)
        return LlamaConfig(**fields)

    # --- interchange with the Hugging Face config.json and Meta's params.json ---

    def to_hf(self, dtype: str = "float32") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        problems = []
        if hf.get("model_type", "llama") != "llama":
            problems.append(f"model_type is {hf.get('model_type')!r}, only 'llama' is supported")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in hf:
                problems.append(f"missing key {key!r}")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
        if hf.get("tie_word_embeddings"):
            problems.append("tied input/output embeddings are not supported (LLaMA unties them)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            problems.append("biases are not supported (LLaMA has none)")
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {hf.get('hidden_act')!r} is not supported (LLaMA's SwiGLU uses silu)")
        if problems:
            raise ValueError("; ".join(problems))
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise ValueError(f"head_dim {head_dim} * num_attention_heads != hidden_size is not supported")
        return cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_seq_len=hf.get("max_position_embeddings", 2048),
        )

    def to_meta(self) -> dict:
        params = {"dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
                  "multiple_of": self.multiple_of, "norm_eps": self.norm_eps, "vocab_size": self.vocab_size}
        if self.n_kv_heads != self.n_heads:
            params["n_kv_heads"] = self.n_kv_heads
        if self.ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        if self.rope_theta != 10000.0:
            params["rope_theta"] = self.rope_theta
        if LlamaConfig(**params).hidden_dim != self.hidden_dim:
            # Read from a config.json, multiple_of is unknown: find settings of Meta's formula giving hidden_dim.
            params.pop("ffn_dim_multiplier", None)
            for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1, self.hidden_dim):
                if LlamaConfig(**{**params, "multiple_of": multiple_of}).hidden_dim == self.hidden_dim:
                    params["multiple_of"] = multiple_of
                    break
            else:  # smaller than 8*dim/3: a multiplier below 1 and rounding to the size itself
                base = int(2 * (4 * self.dim) / 3)
                params.update(multiple_of=self.hidden_dim, ffn_dim_multiplier=self.hidden_dim / base)
            if LlamaConfig(**params).hidden_dim != self.hidden_dim:
                raise ValueError(f"hidden_dim {self.hidden_dim} cannot be expressed in Meta's params.json")
        return params

    @classmethod
    def from_meta(cls, params: dict, vocab_size: int | None = None) -> "LlamaConfig":
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "max_seq_len"}
        if params.get("use_scaled_rope") or params.get("rope_scaling"):
            raise ValueError("params.json asks for scaled rotary embeddings (Llama 3.1 use_scaled_rope / "
                             "rope_scaling), which are not supported")
        kwargs = {k: v for k, v in params.items() if k in known}
        if kwargs.get("vocab_size", -1) <= 0:  # the original releases store -1 and take it from the tokenizer
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size; pass it (read from tok_embeddings)")
            kwargs["vocab_size"] = vocab_size
        return cls(**kwargs)


# Table 2 of "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al., 2023), and the Llama-2
# release's params.json. The tiny presets are for tests and the CPU quickstart.
PRESETS: dict[str, dict] = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                       norm_eps=1e-5, max_seq_len=4096),
    # 58M parameters at vocab 32000: the size of the shared CPU reference measurements.
    "llama-58m": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, norm_eps=1e-5),
    # The CPU quickstart: learns its bundled task in a few minutes on 2 cores.
    "quickstart": dict(dim=128, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=256),
    # Tests.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=16, max_seq_len=256),
    "tiny-gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16, max_seq_len=256),
}


def get_config(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
