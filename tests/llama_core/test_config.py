import dataclasses

import pytest
import torch
import transformers

from llama_core.config import PRESETS, LlamaConfig, get_config
from llama_core.model import Transformer

# Table 2 of the LLaMA paper, and the Llama-2 70B release (68.98B parameters).
PAPER_SIZES = {"llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9,
               "llama2-7b": 6.7e9, "llama2-13b": 13.0e9, "llama2-70b": 69.0e9}
HIDDEN = {"llama-7b": 11008, "llama-13b": 13824, "llama-33b": 17920, "llama-65b": 22016, "llama2-70b": 28672}


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_parameter_count(name):
    with torch.device("meta"):  # no memory is allocated
        model = Transformer(get_config(name))
    assert model.lm_head.weight.is_meta
    assert abs(model.num_parameters() / PAPER_SIZES[name] - 1) < 0.01


@pytest.mark.parametrize("name", HIDDEN)
def test_hidden_dim(name):
    assert get_config(name).hidden_dim == HIDDEN[name]


def test_derived_sizes():
    assert LlamaConfig(dim=64, n_heads=4, multiple_of=16).hidden_dim == 176  # int(2 * 256 / 3) = 170, rounded up
    assert LlamaConfig(dim=64, n_heads=4, multiple_of=16, hidden_dim=100).hidden_dim == 100
    cfg = get_config("tiny-gqa")
    assert (cfg.head_dim, cfg.n_kv_heads, get_config("tiny").n_kv_heads) == (16, 2, 4)
    assert get_config("tiny", vocab_size=1000).vocab_size == 1000


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_config("llama-8b")
    assert "'llama-8b'" in str(e.value) and all(name in str(e.value) for name in PRESETS)


def test_invalid_config_lists_every_problem():
    with pytest.raises(ValueError) as e:
        LlamaConfig(dim=0, n_layers=-2, vocab_size=1.5)
    assert all(f"{field} must be a positive integer" in str(e.value) for field in ("dim", "n_layers", "vocab_size"))
    with pytest.raises(ValueError) as e:
        LlamaConfig(dim=64, n_heads=6, n_kv_heads=4)
    assert "dim (64) must be divisible by n_heads (6)" in str(e.value)
    assert "n_heads (6) must be divisible by n_kv_heads (4)" in str(e.value)
    with pytest.raises(ValueError, match="head dimension .* must be even"):
        LlamaConfig(dim=60, n_heads=4)
    with pytest.raises(ValueError) as e:  # YAML reads 1e6 (no dot) as a string
        LlamaConfig(rope_theta="1e6", norm_eps=-1, ffn_dim_multiplier=0, n_layers=True)
    assert all(s in str(e.value) for s in ("rope_theta must be a positive number, got '1e6'",
                                           "norm_eps must be a non-negative number", "ffn_dim_multiplier must be",
                                           "n_layers must be a positive integer, got True"))


def test_replace():
    cfg = get_config("tiny")
    assert cfg.replace(n_layers=3).n_layers == 3 and cfg.replace(n_layers=3).hidden_dim == cfg.hidden_dim
    assert cfg.replace(dim=128, n_heads=8).hidden_dim == 352  # re-derived from the new dim
    assert cfg.replace(dim=128, n_heads=8, hidden_dim=200).hidden_dim == 200
    assert cfg.replace(dim=128, n_heads=8).n_kv_heads == 8  # multi-head attention stays multi-head
    assert get_config("tiny-gqa").replace(n_layers=3).n_kv_heads == 2
    with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['depth'\]"):
        cfg.replace(depth=3)


ARCHITECTURE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
                "max_seq_len")


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "llama-7b", "llama2-70b"])
def test_hf_round_trip(name):
    cfg = get_config(name)
    hf = cfg.to_hf("bfloat16")
    back = LlamaConfig.from_hf(hf)  # config.json has no multiple_of: the explicit hidden_dim is kept instead
    assert all(getattr(back, f) == getattr(cfg, f) for f in ARCHITECTURE)
    assert back.to_hf("bfloat16") == hf and hf["torch_dtype"] == "bfloat16"
    twin = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    assert (twin.hidden_size, twin.intermediate_size, twin.num_hidden_layers, twin.num_attention_heads,
            twin.num_key_value_heads, twin.head_dim, twin.rms_norm_eps, twin.vocab_size) == \
        (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps,
         cfg.vocab_size)
    assert LlamaConfig.from_hf(twin.to_dict()) == back  # what transformers writes reads back the same


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "llama-7b", "llama2-70b"])
def test_meta_round_trip(name):
    cfg = get_config(name)
    params = cfg.to_meta()
    assert "hidden_dim" not in params and ("n_kv_heads" in params) == (cfg.n_kv_heads != cfg.n_heads)
    # params.json has no context length: it comes back as the default.
    assert LlamaConfig.from_meta(params) == dataclasses.replace(cfg, max_seq_len=LlamaConfig.max_seq_len)


def test_meta_params_of_the_releases():
    # Llama-2 70B's params.json as released, and LLaMA-1's with vocab_size -1 (taken from the embedding).
    cfg = LlamaConfig.from_meta({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
                                 "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
                                vocab_size=32000)
    assert (cfg.hidden_dim, cfg.n_kv_heads, cfg.vocab_size) == (28672, 8, 32000)
    params7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_meta(params7b)
    assert LlamaConfig.from_meta(params7b, vocab_size=32000) == get_config("llama-7b")


def test_unsupported_hf_configs_list_every_problem():
    hf = {**get_config("tiny").to_hf(), "attention_bias": True, "rope_scaling": None,
          "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0}}
    with pytest.raises(ValueError) as e:
        LlamaConfig.from_hf(hf)
    assert all(s in str(e.value) for s in ("biases", "rope scaling type 'yarn' is not supported"))
    with pytest.raises(ValueError, match="llama3 needs a positive number low_freq_factor"):
        LlamaConfig.from_hf({**hf, "attention_bias": False, "rope_parameters": {"rope_type": "llama3", "factor": 8}})
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        LlamaConfig.from_hf({**get_config("tiny").to_hf(), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_meta({**get_config("tiny").to_meta(), "rope_scaling": {"type": "linear"}})
    with pytest.raises(ValueError, match="model_type is 'mistral'.*missing key 'intermediate_size'"):
        LlamaConfig.from_hf({"model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "vocab_size": 320})


def test_configs_beyond_any_llama_are_refused_at_once():
    with pytest.raises(ValueError, match="n_layers 1,000,000 is beyond any LLaMA"):
        LlamaConfig.from_hf({**get_config("tiny").to_hf(), "num_hidden_layers": 1_000_000})


# The published config.json of Llama-3.2-1B (Instruct differs in eos_token_id only).
LLAMA_32_1B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
               "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
               "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
               "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
               "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                       "original_max_position_embeddings": 8192,
                                                       "rope_type": "llama3"},
               "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
               "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256}


@pytest.mark.parametrize("name,parameters", [("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
                                             ("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496),
                                             ("tinyllama-1.1b", 1_100_048_384)])
def test_llama3_presets_have_the_published_sizes(name, parameters):
    import torch

    from llama_core.model import Transformer

    with torch.device("meta"):
        model = Transformer(get_config(name))
    assert model.num_parameters() == parameters  # a tied head counted once


def test_llama3_configs_read_and_write():
    import transformers

    cfg = LlamaConfig.from_hf(LLAMA_32_1B)
    assert cfg == get_config("llama3.2-1b")
    hf = cfg.to_hf("bfloat16")
    assert LlamaConfig.from_hf(hf) == cfg
    # transformers reads what we write, whichever of its two spellings it prefers, and its own writing reads back
    theirs = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    assert theirs.rope_parameters["rope_type"] == "llama3" and theirs.rope_parameters["factor"] == 32.0
    assert theirs.tie_word_embeddings and theirs.rope_parameters["rope_theta"] == 500000.0
    assert LlamaConfig.from_hf(theirs.to_dict()) == cfg
    # linear scaling, in the legacy spelling ("type")
    linear = LlamaConfig.from_hf({**get_config("tiny").to_hf(), "rope_parameters": None,
                                  "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_llama3_meta_params():
    # Meta's params.json of Llama 3.1 8B and 3.2 1B: use_scaled_rope, no factor (8 in Meta's code; 32 for 3.2 1B/3B)
    p8b = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
           "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    assert LlamaConfig.from_meta(p8b) == get_config("llama3.1-8b", multiple_of=1024, ffn_dim_multiplier=1.3)
    p1b = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
           "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
    cfg = LlamaConfig.from_meta(p1b, tied=True)
    assert dataclasses.replace(cfg, multiple_of=256, ffn_dim_multiplier=None) == get_config("llama3.2-1b")
    written = cfg.to_meta()
    assert written["use_scaled_rope"] is True and written["rope_scaling_factor"] == 32.0
    assert LlamaConfig.from_meta(written, tied=True).rope_scaling == cfg.rope_scaling
    assert "rope_scaling_factor" not in get_config("llama3.1-8b").to_meta()  # Meta's own constant
    with pytest.raises(ValueError, match="no form in Meta's params.json"):
        get_config("tiny", rope_scaling={"rope_type": "linear", "factor": 2.0}).to_meta()
