"""GGUF export (finetune/gguf_export.py): files read back with gguf's own reader, and, where llama-cpp-python is
installed, run by llama.cpp and compared with our model."""
from __future__ import annotations

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from finetune.chat_templates import chat_template_of
from finetune.errors import UserError
from finetune.gguf_export import write_gguf
from finetune.gguf_vocab import LLAMA3_SPLIT
from llama_core.config import get_config
from llama_core.generate import generate
from llama_core.model import Transformer
from llama_core.weights import permute_hf_to_meta

CHAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
F32 = gguf.GGMLQuantizationType.F32


def make_model(preset: str = "tiny-gqa", std: float = 0.02, **overrides) -> Transformer:
    model = Transformer(get_config(preset, **overrides))
    model.reset_parameters(seed=0, std=std)
    return model.eval()


def read(path):
    reader = gguf.GGUFReader(getattr(path, "path", path))  # a file, or what write_gguf returns
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def values(t) -> torch.Tensor:
    """A GGUF tensor as fp32 in numpy/torch order (rows, columns)."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of llama.cpp's q/k permutation: interleaved pairs back to Hugging Face's rotary halves."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stand_in(config, **fields):
    """The config's fields as a plain object, with changes LlamaConfig itself would refuse (yarn scaling)."""
    return types.SimpleNamespace(**{**dataclasses.asdict(config), **fields})


def test_permutation_interleaves_the_rotary_halves():
    # One head of head_dim 4: HF rotates rows (0, 2) and (1, 3) together; llama.cpp rotates adjacent rows.
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_hf_to_meta(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    w = torch.randn(2 * 8, 3)
    assert torch.equal(unpermute(permute_hf_to_meta(w, 2), 2), w)


def test_sentencepiece_export_reads_back(tmp_path, tokenizer):
    model = make_model()  # grouped-query attention: k is permuted with n_kv_heads
    c = model.config
    w = write_gguf(tmp_path / "m.gguf", c, model.state_dict().items(), tokenizer=tokenizer.path,
                   chat_template=CHAT, name="tiny")
    assert w.path == tmp_path / "m.gguf" and sorted(os.listdir(tmp_path)) == ["m.gguf"]
    assert (w.dtype, w.tensors, w.vocab_size, w.chat_template, w.f16_instead) == ("f32", 21, 320, True, [])
    kv, tensors = read(w.path)
    expected = {
        "general.architecture": "llama", "general.name": "tiny", "general.file_type": 0,
        "llama.context_length": c.max_seq_len, "llama.embedding_length": c.dim, "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.hidden_dim, "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads, "llama.rope.dimension_count": c.head_dim,
        "llama.rope.freq_base": c.rope_theta, "llama.vocab_size": c.vocab_size,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True, "tokenizer.chat_template": CHAT,
    }
    assert {k: kv.get(k) for k in expected} == expected
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-6)
    assert "llama.rope.scaling.type" not in kv and "tokenizer.ggml.pad_token_id" not in kv
    sp = tokenizer.sp
    assert kv["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert kv["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    token_types = kv["tokenizer.ggml.token_type"]
    assert token_types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                               gguf.TokenType.BYTE]
    assert token_types.count(gguf.TokenType.BYTE) == 256 and token_types[-1] == gguf.TokenType.NORMAL

    state = model.state_dict()
    assert len(tensors) == 2 + 9 * c.n_layers + 1
    for name, t in tensors.items():
        assert t.tensor_type == F32, name
    assert torch.equal(values(tensors["token_embd.weight"]), state["model.embed_tokens.weight"])
    assert torch.equal(values(tensors["output.weight"]), state["lm_head.weight"])
    assert torch.equal(values(tensors["output_norm.weight"]), state["model.norm.weight"])
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [c.hidden_dim, c.dim]  # GGUF lists columns first
    p = "model.layers.1."
    assert torch.equal(unpermute(values(tensors["blk.1.attn_q.weight"]), c.n_heads), state[p + "self_attn.q_proj.weight"])
    assert torch.equal(unpermute(values(tensors["blk.1.attn_k.weight"]), c.n_kv_heads),
                       state[p + "self_attn.k_proj.weight"])
    assert not torch.equal(values(tensors["blk.1.attn_q.weight"]), state[p + "self_attn.q_proj.weight"])
    for ours, theirs in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                         ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
        assert torch.equal(values(tensors[f"blk.1.{theirs}.weight"]), state[f"{p}{ours}.weight"]), ours


def test_tensor_order_does_not_matter(tmp_path, tokenizer):
    model = make_model("tiny")
    items = list(model.state_dict().items())
    a = write_gguf(tmp_path / "a.gguf", model.config, iter(items), tokenizer=tokenizer.path, dtype="q8_0")
    b = write_gguf(tmp_path / "b.gguf", model.config, reversed(items), tokenizer=tokenizer.path, dtype="q8_0")
    assert a.path.read_bytes() == b.path.read_bytes()


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_reduced_precision_round_trips(tmp_path, tokenizer, dtype, capsys):
    model = make_model("tiny")  # hidden_dim 176: ffn_down's rows (176 values) do not fill q8_0's 32-value blocks
    out = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tokenizer=tokenizer.path, dtype=dtype)
    kv, tensors = read(out)
    Q = gguf.GGMLQuantizationType
    assert kv["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    hf_names = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = model.state_dict()
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk":
            ours = state[f"model.layers.{parts[1]}.{hf_names[parts[2]]}.weight"]
        else:
            ours = state[hf_names[parts[0]] + ".weight"]
        got = values(t)
        if parts[-2] in ("attn_q", "attn_k"):
            got = unpermute(got, model.config.n_heads if parts[-2] == "attn_q" else model.config.n_kv_heads)
        if ours.dim() == 1:
            assert t.tensor_type == Q.F32 and torch.equal(got, ours), name  # norms stay f32, exactly
        elif dtype == "f16" or (dtype == "q8_0" and parts[-2] == "ffn_down"):
            assert t.tensor_type == Q.F16, name
            torch.testing.assert_close(got, ours, rtol=2 ** -11, atol=2 ** -24)  # f16: 11 significant bits
        elif dtype == "bf16":
            assert t.tensor_type == Q.BF16, name
            torch.testing.assert_close(got, ours, rtol=2 ** -8, atol=0)  # bf16: 8 significant bits
        else:
            assert t.tensor_type == Q.Q8_0, name
            # q8_0: per 32-value block, int8 steps of amax/127 (error <= half a step) with an f16 scale.
            blocks = ours.reshape(-1, 32)
            bound = blocks.abs().amax(dim=1, keepdim=True) * (0.5 / 127 + 2 ** -11)
            assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), name
    if dtype == "q8_0":
        assert "written as f16 instead of q8_0: blk.0.ffn_down.weight, blk.1.ffn_down.weight" in capsys.readouterr().err


def train_llama3_style_bpe(folder, corpus) -> dict:
    """A tiny Llama 3 style tokenizer.json: byte-level BPE with Llama 3's pre-tokenizer, special tokens after the
    vocabulary, and <|begin_of_text|> added by the post-processor."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    tok.add_tokens(["[[note]]"])  # a user-defined, non-special added token
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(folder / "tokenizer.json"))
    return json.loads((folder / "tokenizer.json").read_text())


def test_llama3_bpe_tokenizer(tmp_path, corpus):
    data = train_llama3_style_bpe(tmp_path, corpus)
    n_tokens = 304
    model = make_model(vocab_size=312)  # larger than the tokenizer: padded with [PAD{id}] tokens
    out = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict().items(), tokenizer=tmp_path)
    kv, _ = read(out)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert "tokenizer.ggml.scores" not in kv
    tokens, token_types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    vocab = data["model"]["vocab"]
    assert len(tokens) == 312 and all(tokens[i] == text for text, i in vocab.items())
    assert tokens[300:] == ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "[[note]]"] + \
        [f"[PAD{i}]" for i in range(n_tokens, 312)]
    T = gguf.TokenType
    assert token_types[300:n_tokens] == [T.CONTROL, T.CONTROL, T.CONTROL, T.USER_DEFINED]
    assert set(token_types[:300]) == {T.NORMAL} and set(token_types[n_tokens:]) == {T.UNUSED}
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) for m in data["model"]["merges"]]
    assert kv["tokenizer.ggml.merges"][0].count(" ") == 1
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (300, 301)
    assert kv["tokenizer.ggml.eot_token_id"] == 302  # <|eot_id|>: llama.cpp's end of turn
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False

    # An instruct model's tokenizer_config.json names its EOS (and its chat template); special_ids override all.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT}))
    assert chat_template_of(tmp_path) == CHAT
    out = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict().items(),
                     tokenizer=tmp_path / "tokenizer.json", chat_template=chat_template_of(tmp_path),
                     special_ids={"pad": 301})
    kv, _ = read(out)
    assert (kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.padding_token_id"]) == (302, 301)
    assert kv["tokenizer.chat_template"] == CHAT

    # GPT-2's byte-level pre-tokenizer (one ByteLevel step with its own regex) is llama.cpp's "gpt-2".
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    kv, _ = read(write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tokenizer=tmp_path))
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")


def tiktoken_folder(tmp_path):
    """Meta's Llama 3 layout of a tokenizer: a tiktoken tokenizer.model (tiny), read by llama_core as byte-level BPE."""
    from llama_core.tokenizer import load_tokenizer

    from ..llama_core.test_tokenizer import write_tiktoken

    ranks = write_tiktoken(tmp_path / "meta" / "tokenizer.model")
    return tmp_path / "meta", load_tokenizer(tmp_path / "meta"), len(ranks)


def test_meta_tiktoken_tokenizer(tmp_path):
    folder, tok, n_ranks = tiktoken_folder(tmp_path)
    model = make_model(vocab_size=tok.vocab_size)  # the ranks, then Llama 3's 256 special tokens
    kv, _ = read(write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tokenizer=folder))
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    tokens = kv["tokenizer.ggml.tokens"]
    assert tokens == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert tokens[n_ranks:n_ranks + 2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    special = {k: kv[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eot", "eom")}
    assert special == {"bos": n_ranks, "eos": n_ranks + 1, "eot": tok.token_to_id("<|eot_id|>"),
                       "eom": tok.token_to_id("<|eom_id|>")}
    assert kv["tokenizer.ggml.add_bos_token"] is True and len(kv["tokenizer.ggml.merges"]) > 0
    assert set(kv["tokenizer.ggml.token_type"][n_ranks:]) == {gguf.TokenType.CONTROL}


def test_tied_embeddings_and_rope_scaling(tmp_path, tokenizer):
    model = make_model("tiny")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = model.config.replace(tie_word_embeddings=True, rope_scaling=scaling)
    untied = [(k, v) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    kv, tensors = read(write_gguf(tmp_path / "m.gguf", config, untied, tokenizer=tokenizer.path))
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    assert "llama.rope.scaling.type" not in kv  # llama3 scaling lives in rope_freqs.weight
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type == F32 and list(freqs.shape) == [model.config.head_dim // 2]
    # Reference: transformers' llama3 frequencies; llama.cpp divides each base frequency by its factor.
    head_dim, theta = model.config.head_dim, model.config.rope_theta
    base = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = HFConfig(hidden_size=model.config.dim, num_attention_heads=model.config.n_heads,
                  max_position_embeddings=512, rope_parameters={"rope_theta": theta, **scaling})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    factors = torch.from_numpy(np.array(freqs.data))
    torch.testing.assert_close(factors, base / scaled, rtol=1e-5, atol=0)
    assert factors[0] == 1 and factors[-1] == 8 and 1 < factors[1] < 8  # high, low, and smoothed frequencies

    # With tied embeddings a checkpoint may still carry lm_head.weight: it is not written.
    config = model.config.replace(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 4.0})
    kv, tensors = read(write_gguf(tmp_path / "m.gguf", config, model.state_dict(), tokenizer=tokenizer.path))
    assert (kv["llama.rope.scaling.type"], kv["llama.rope.scaling.factor"]) == ("linear", 4.0)
    assert "output.weight" not in tensors and "rope_freqs.weight" not in tensors


def _bad(tmp_path, match, **kwargs):
    model = make_model("tiny")
    args = {"output": tmp_path / "m.gguf", "config": model.config, "tensors": model.state_dict().items()}
    args.update(kwargs)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match=match):
        write_gguf(args.pop("output"), args.pop("config"), args.pop("tensors"), **args)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary file left


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tokenizer):
    tok = tokenizer.path
    _bad(tmp_path, "unknown GGUF dtype 'q4_0'; choose one of f32, f16, bf16, q8_0", tokenizer=tok, dtype="q4_0")
    (tmp_path / "folder").mkdir()
    _bad(tmp_path, "is a folder", output=tmp_path / "folder", tokenizer=tok)
    (tmp_path / "target.gguf").write_bytes(b"old")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "target.gguf")
    _bad(tmp_path, "is a symbolic link", output=tmp_path / "link.gguf", tokenizer=tok)
    state = make_model("tiny").state_dict()
    # A failure while the tensors are written leaves an existing file as it was.
    partial = [(k, v) for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"]
    _bad(tmp_path, "1 tensor\\(s\\) missing from the checkpoint: model.layers.1.mlp.up_proj.weight",
         output=tmp_path / "target.gguf", tensors=partial, tokenizer=tok)
    assert (tmp_path / "target.gguf").read_bytes() == b"old"
    _bad(tmp_path, "unexpected tensor 'model.layers.2.mlp.up_proj.weight'",
         tensors=[*state.items(), ("model.layers.2.mlp.up_proj.weight", torch.zeros(1))], tokenizer=tok)
    wrong = {**state, "model.norm.weight": torch.ones(65)}
    _bad(tmp_path, "'model.norm.weight' has shape \\(65,\\), the config says \\(64,\\)", tensors=wrong, tokenizer=tok)
    _bad(tmp_path, "more than the model's vocab_size 300", config=get_config("tiny", vocab_size=300),
         tensors=make_model("tiny", vocab_size=300).state_dict(), tokenizer=tok)
    (tmp_path / "notes.txt").write_text("hello")
    _bad(tmp_path, r"notes.txt is not a SentencePiece model file \(nor a tokenizer.json or a tiktoken file\)",
         tokenizer=tmp_path / "notes.txt")
    _bad(tmp_path, "no tokenizer.model or tokenizer.json in this folder", tokenizer=tmp_path / "folder")
    from tokenizers import Tokenizer, models, pre_tokenizers
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    _bad(tmp_path, "model type 'WordPiece' is not supported", tokenizer=tmp_path / "tokenizer.json")
    metaspace = Tokenizer(models.BPE({"a": 0, "\u2581": 1}, []))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.save(str(tmp_path / "tokenizer.json"))
    _bad(tmp_path, "SentencePiece-style tokenizer.json .*tokenizer.model instead", tokenizer=tmp_path / "tokenizer.json")
    _bad(tmp_path, "rope_scaling type 'yarn' is not supported",
         config=stand_in(get_config("tiny"), rope_scaling={"rope_type": "yarn", "factor": 4.0}), tokenizer=tok)
    _bad(tmp_path, "special_ids: eos id 999 is not a token id", special_ids={"eos": 999}, tokenizer=tok)


# --- llama.cpp itself (optional: pip install llama-cpp-python) ----------------------------------------------------

LOGIT_TOLERANCE = 1e-4  # absolute, for logits up to ~8 in magnitude; measured about 1e-5 (fp32 with an fp32 KV cache)


def load_llama_cpp(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # type_k/type_v 0: an fp32 KV cache (llama.cpp's default fp16 cache alone adds ~1e-3 relative error).
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                          type_k=0, type_v=0)
    return llm


def llama_cpp_run(path, prompt: list[int], new_tokens: int = 0, text: str | None = None):
    """llama.cpp on a GGUF file: (its logits at each position of `prompt`, its greedy continuation of `new_tokens`
    tokens (the argmax of its logits, fed back), its tokens for `text` with BOS, or None without a text)."""
    llm = load_llama_cpp(path)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True) if text is not None else None
        llm.eval(prompt)
        logits = torch.from_numpy(np.array(llm.scores[:len(prompt)]))
        greedy = []
        for _ in range(new_tokens):
            greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(greedy[-1:])
        return logits, greedy, tokens
    finally:
        llm.close()


def test_llama_cpp_matches_our_model(tmp_path, tokenizer):
    pytest.importorskip("llama_cpp")
    model = make_model("tiny-gqa", std=0.2)  # larger weights than the default: clear margins between the top logits
    path = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict().items(), tokenizer=tokenizer.path).path
    text = "The model was small, 12345 Привет"
    prompt = tokenizer.encode(text, bos=True)
    theirs, greedy, their_prompt = llama_cpp_run(path, prompt, new_tokens=8, text=text)
    assert their_prompt == prompt
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LOGIT_TOLERANCE)
    assert greedy == generate(model, [prompt], max_new_tokens=8, eos_id=None)[0]


# Largest logit difference from ours, relative to the largest logit (about 6 here); measured 0.2%, 1.3%, 3.9%
# (llama.cpp's q8_0 products also round the activations to 8 bits).
REDUCED_TOLERANCE = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.08}


@pytest.mark.parametrize("dtype", REDUCED_TOLERANCE)
def test_llama_cpp_runs_reduced_precision_files(tmp_path, tokenizer, dtype):
    pytest.importorskip("llama_cpp")
    model = make_model("tiny-gqa", std=0.2)  # q8_0: ffn_down falls back to f16, so the file mixes types
    path = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict().items(), tokenizer=tokenizer.path,
                      dtype=dtype).path
    prompt = tokenizer.encode("The model was small", bos=True)
    theirs = llama_cpp_run(path, prompt)[0]
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert (theirs - ours).abs().max() <= REDUCED_TOLERANCE[dtype] * ours.abs().max()


def test_llama_cpp_tied_embeddings_and_llama3_rope(tmp_path, tokenizer):
    pytest.importorskip("llama_cpp")
    import transformers

    model = make_model("tiny", std=0.2)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    config = model.config.replace(tie_word_embeddings=True, rope_scaling=scaling)
    path = write_gguf(tmp_path / "m.gguf", config, state, tokenizer=tokenizer.path).path
    prompt = tokenizer.encode("It was a long day of the year, one two three", bos=True)
    theirs = llama_cpp_run(path, prompt)[0]

    def reference(rope: dict) -> torch.Tensor:  # transformers' LlamaForCausalLM, tied, with this rope
        hf = {k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "torch_dtype")}
        hf.update(tie_word_embeddings=True, rope_parameters={"rope_theta": model.config.rope_theta, **rope})
        twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()
        twin.load_state_dict(state, strict=False)
        assert torch.equal(twin.lm_head.weight, state["model.embed_tokens.weight"])
        with torch.no_grad():
            return twin(torch.tensor([prompt])).logits[0]

    ours = reference(scaling)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=LOGIT_TOLERANCE)
    # The scaling matters at this length: without it the logits differ by far more than the tolerance.
    assert (reference({"rope_type": "default"}) - ours).abs().max() > 100 * LOGIT_TOLERANCE


def test_llama_cpp_tokenizes_a_meta_tiktoken_vocabulary_as_we_do(tmp_path):
    pytest.importorskip("llama_cpp")
    folder, tok, _ = tiktoken_folder(tmp_path)
    model = make_model(vocab_size=tok.vocab_size)
    path = write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tokenizer=folder).path
    llm = load_llama_cpp(path)
    try:
        for text in ("hello world", "hello, dew world!\n  hellohello 123456", "ωorld wo rl"):
            assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text, bos=True), text
    finally:
        llm.close()
