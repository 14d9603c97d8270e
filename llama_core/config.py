"""Model configuration: one dataclass plus named presets (the LLaMA paper's table, Llama 2, Llama 3.1/3.2, TinyLlama)."""
from __future__ import annotations

import copy
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
    # Rotary scaling for long context, as Hugging Face's config.json has it: {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1+) or {"rope_type":
    # "linear", "factor"}; None: plain rotary embeddings.
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False  # the output head shares the embedding matrix (Llama 3.2 1B/3B)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

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
        for name, most in BOUNDS.items():  # a config far beyond any real LLaMA is a wrong file, not a model
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                problems.append(f"{name} {value:,} is beyond any LLaMA (at most {most:,}); is this the right config?")
        if not isinstance(self.tie_word_embeddings, bool):
            problems.append(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        problems += rope_scaling_problems(self.rope_scaling)
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
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
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
            # Both spellings: transformers >= 5 reads rope_parameters, earlier versions rope_theta + rope_scaling.
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
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
        # transformers >= 5 writes rope_parameters (rope_theta inside); earlier versions rope_scaling + rope_theta.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            problems.append(f"rope_parameters / rope_scaling must be a mapping, got {rope!r}")
            rope = {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if kind not in ("default", None):
            scaling = {"rope_type": kind, **{k: v for k, v in rope.items() if k in _SCALING_KEYS.get(kind, ())}}
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            problems.append("biases are not supported (LLaMA has none)")
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {hf.get('hidden_act')!r} is not supported (LLaMA's SwiGLU uses silu)")
        problems += rope_scaling_problems(scaling)
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
            rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_meta(self) -> dict:
        """Meta's params.json. Scaled rotary embeddings: `use_scaled_rope` (Meta's code fixes factor 8, low 1,
        high 4, original context 8192), plus `rope_scaling_factor` when the factor is not 8 (Llama 3.2 1B/3B use 32;
        Meta's own files do not say so); linear scaling has no params.json form."""
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
        if self.rope_scaling:
            s = self.rope_scaling
            if s["rope_type"] != "llama3" or (s["low_freq_factor"], s["high_freq_factor"],
                                              s["original_max_position_embeddings"]) != META_SCALING[1:]:
                raise ValueError(f"rope scaling {s} has no form in Meta's params.json (only Llama 3.1's "
                                 f"use_scaled_rope); export in the Hugging Face layout instead")
            params["use_scaled_rope"] = True
            if s["factor"] != META_SCALING[0]:
                params["rope_scaling_factor"] = s["factor"]
        return params

    @classmethod
    def from_meta(cls, params: dict, vocab_size: int | None = None, tied: bool = False) -> "LlamaConfig":
        """From Meta's params.json. `use_scaled_rope` gives Llama 3.1's scaling with factor `rope_scaling_factor`,
        else 8 (Meta's code), except for the shapes of Llama 3.2 1B and 3B, whose factor is 32 (as their
        config.json says; Meta's params.json does not). Such a model's context is 131,072 tokens. `tied`: the
        checkpoint has no separate output matrix."""
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "max_seq_len"}
        if params.get("rope_scaling"):
            raise ValueError(f"params.json has rope_scaling {params['rope_scaling']!r}, which is not supported "
                             f"(Meta's Llama 3.1 format says use_scaled_rope: true)")
        kwargs = {k: v for k, v in params.items() if k in known}
        if kwargs.get("vocab_size", -1) <= 0:  # the original releases store -1 and take it from the tokenizer
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size; pass it (read from tok_embeddings)")
            kwargs["vocab_size"] = vocab_size
        if params.get("use_scaled_rope"):
            factor = params.get("rope_scaling_factor")
            if factor is None:
                shape = (params.get("dim"), params.get("n_layers"), kwargs["vocab_size"])
                factor = 32.0 if shape in ((2048, 16, 128256), (3072, 28, 128256)) else META_SCALING[0]
            kwargs["rope_scaling"] = {"rope_type": "llama3", "factor": float(factor),
                                      "low_freq_factor": META_SCALING[1], "high_freq_factor": META_SCALING[2],
                                      "original_max_position_embeddings": META_SCALING[3]}
            kwargs.setdefault("max_seq_len", 131072)
        if kwargs["vocab_size"] == 128256:  # Llama 3's tokenizer: <|begin_of_text|>, <|end_of_text|>
            kwargs.update(bos_token_id=128000, eos_token_id=128001)
        return cls(**kwargs, tie_word_embeddings=tied)


# Meta's apply_scaling (Llama 3.1): factor, low_freq_factor, high_freq_factor, original context.
META_SCALING = (8.0, 1.0, 4.0, 8192)
_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "linear": ("factor",)}
# Sizes no LLaMA comes near (the largest, Llama 3.1 405B: dim 16384, 126 layers, 128 heads, FFN 53248).
BOUNDS = {"dim": 65536, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "vocab_size": 4_000_000,
          "hidden_dim": 262144, "max_seq_len": 16_777_216}


def rope_scaling_problems(scaling) -> list[str]:
    """What is wrong with a `rope_scaling` value (see LlamaConfig), as messages; [] if it is fine."""
    if scaling is None:
        return []
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be a mapping or null, got {scaling!r}"]
    kind = scaling.get("rope_type")
    if kind not in _SCALING_KEYS:
        return [f"rope scaling type {kind!r} is not supported (supported: llama3, linear; or none)"]
    problems = []
    for key in _SCALING_KEYS[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"rope_scaling {kind} needs a positive number {key}, got {value!r}")
    if not problems and kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        problems.append("rope_scaling llama3 needs high_freq_factor > low_freq_factor")
    if extra := sorted(set(scaling) - set(_SCALING_KEYS[kind]) - {"rope_type"}):
        problems.append(f"rope_scaling {kind}: unknown key(s) {extra}")
    return problems


_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=131072, bos_token_id=128000,
               eos_token_id=128001)


def _rope3(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}


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
    # Llama 3.1 / 3.2 (their config.json files); 3.2 1B and 3B tie the output head to the embedding.
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, **_LLAMA3,
                        rope_scaling=_rope3(32.0), tie_word_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192, **_LLAMA3,
                        rope_scaling=_rope3(32.0), tie_word_embeddings=True),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, **_LLAMA3,
                        rope_scaling=_rope3(8.0)),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, **_LLAMA3,
                         rope_scaling=_rope3(8.0)),
    # TinyLlama 1.1B (its config.json): Llama 2's architecture and tokenizer, 4 key/value heads.
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, norm_eps=1e-5),
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
    return LlamaConfig(**{**copy.deepcopy(PRESETS[name]), **overrides})
