import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_core import weights as ck
from llama_core.weights import CheckpointError, convert, load_config, load_model, save_hf, save_meta
from llama_core.config import LlamaConfig, get_config

IDS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 300, 5, 64, 128]])


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- Hugging Face layout ---

@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_save_hf_loads_in_transformers(tiny_model, tmp_path, preset):
    model = tiny_model(preset)
    save_hf(model, model.config, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((tmp_path / "ckpt" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                       "eos_token_id": 2}
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").float().eval()
    with torch.no_grad():
        assert (hf(IDS).logits - model(IDS)).abs().max() <= 1e-5
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary directory left behind


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_transformers_checkpoint_loads(tiny_model, hf_twin, tmp_path, preset):
    model = tiny_model(preset, seed=1)
    hf_twin(model).save_pretrained(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert not loaded.training and loaded.config.hidden_dim == model.config.hidden_dim
    assert same_state(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        assert (loaded(IDS) - model(IDS)).abs().max() <= 1e-5


def test_sharded_round_trip(tiny_model, tmp_path):
    model = tiny_model("tiny-gqa")
    save_hf(model, model.config, tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert index.keys() == {"metadata", "weight_map"}
    sd = model.state_dict()
    assert index["metadata"] == {"total_size": sum(t.numel() * 4 for t in sd.values())}
    assert index["weight_map"].keys() == sd.keys()
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for file in files:  # each file holds what the index says, under the limit unless one tensor alone exceeds it
        tensors = load_file(tmp_path / "ckpt" / file)
        assert sorted(tensors) == sorted(k for k, f in index["weight_map"].items() if f == file)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= 100_000
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert same_state(load_model(tmp_path / "ckpt").state_dict(), sd)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").float().eval()
    with torch.no_grad():
        assert (hf(IDS).logits - model(IDS)).abs().max() <= 1e-5


def test_parse_size():
    assert ck.parse_size(123) == 123 and ck.parse_size("5GB") == 5 * 10**9 and ck.parse_size("500MB") == 5 * 10**8
    assert ck.parse_size("2GiB") == 2 * 2**30 and ck.parse_size("1.5kb") == 1500
    for bad in ("5XB", "", "-1", 0, "GB"):
        with pytest.raises(ValueError, match="invalid size"):
            ck.parse_size(bad)


def test_dtype_chosen_at_load(tiny_model, tmp_path):
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "fp32")
    for dtype in (torch.bfloat16, "bf16"):
        loaded = load_model(tmp_path / "fp32", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())
    save_hf(model, model.config, tmp_path / "bf16", dtype="bfloat16")  # stored in bf16, loaded back in fp32
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "bf16" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert {p.dtype for p in load_model(tmp_path / "bf16").parameters()} == {torch.float32}


# --- Meta layout ---

def meta_reference_logits(ckpt: Path, ids: torch.Tensor) -> torch.Tensor:
    """The forward pass of Meta's llama/model.py (complex rotary on interleaved pairs), read from a 1-shard file."""
    params = json.loads((ckpt / "params.json").read_text())
    sd = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    dim, H = params["dim"], params["n_heads"]
    KV, hd, (B, T) = params.get("n_kv_heads", H), dim // H, ids.shape
    freqs = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + params["norm_eps"]))

    def rope(x):  # (B, T, heads, hd)
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))  # (2i, 2i+1) as one complex number
        return torch.view_as_real(pairs * freqs_cis[:, None]).flatten(3)

    h = sd["tok_embeddings.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        w = {k.removeprefix(f"layers.{i}."): v for k, v in sd.items() if k.startswith(f"layers.{i}.")}
        x = rms(h, w["attention_norm.weight"])
        q = rope((x @ w["attention.wq.weight"].T).view(B, T, H, hd))
        k = rope((x @ w["attention.wk.weight"].T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (x @ w["attention.wv.weight"].T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + mask
        h = h + torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, dim) @ w["attention.wo.weight"].T
        x = rms(h, w["ffn_norm.weight"])
        w1, w2, w3 = (w[f"feed_forward.w{j}.weight"] for j in (1, 2, 3))
        h = h + (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_meta_layout_matches_reference(tiny_model, tmp_path, preset):
    model = tiny_model(preset)
    save_meta(model, model.config, tmp_path / "meta")
    assert json.loads((tmp_path / "meta" / "params.json").read_text()) == model.config.to_meta()
    with torch.no_grad():
        assert (meta_reference_logits(tmp_path / "meta", IDS) - model(IDS)).abs().max() <= 1e-5


# fairscale's layers: ParallelEmbedding splits dim 1, ColumnParallelLinear dim 0, RowParallelLinear dim 1.
SPLIT = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_meta_two_shards(tiny_model, tmp_path, preset):
    model = tiny_model(preset)
    save_meta(model, model.config, tmp_path / "one")
    save_meta(model, model.config, tmp_path / "two", num_shards=2)
    assert sorted(os.listdir(tmp_path / "two")) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    one = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    two = [torch.load(tmp_path / "two" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    assert len(one) == 3 + 9 * model.config.n_layers and all(s.keys() == one.keys() for s in two)
    for name, full in one.items():
        dim = SPLIT.get(name.split(".")[-2])
        for i, shard in enumerate(two):
            assert torch.equal(shard[name], full if dim is None else full.chunk(2, dim)[i]), name
            assert shard[name].untyped_storage().nbytes() == shard[name].nbytes  # no hidden full-size storage
    merged = [dict(ck.iter_checkpoint_tensors(tmp_path / d)) for d in ("one", "two")]
    assert same_state(merged[0], merged[1]) and same_state(merged[0], model.state_dict())
    loaded = load_model(tmp_path / "two")
    assert same_state(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        assert (loaded(IDS) - model(IDS)).abs().max() <= 1e-5


def test_rotary_permutation_round_trip():
    for heads, rows in ((4, 64), (2, 32)):
        w = torch.randn(rows, 64)
        assert torch.equal(ck.permute_meta_to_hf(ck.permute_hf_to_meta(w, heads), heads), w)
        assert torch.equal(ck.permute_hf_to_meta(ck.permute_meta_to_hf(w, heads), heads), w)
        assert not torch.equal(ck.permute_hf_to_meta(w, heads), w)
    # Meta's rotary pair (2i, 2i+1) of each head becomes HF's pair (i, i + head_dim/2).
    w = torch.arange(8.0)[:, None]  # one head of dim 8
    assert ck.permute_meta_to_hf(w, 1).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_meta_vocab_size_from_embedding(tiny_model, tmp_path):
    model = tiny_model()
    save_meta(model, model.config, tmp_path / "meta", num_shards=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    (tmp_path / "meta" / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert load_config(tmp_path / "meta").vocab_size == 320


def test_convert(tiny_model, hf_twin, tmp_path):
    model = tiny_model("tiny-gqa")
    hf_twin(model).save_pretrained(tmp_path / "hf")  # config.json only: multiple_of is unknown
    (tmp_path / "hf" / "tokenizer.model").write_bytes(b"spm")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", num_shards=2)
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == b"spm"
    assert load_config(tmp_path / "meta").hidden_dim == model.config.hidden_dim
    convert(tmp_path / "meta", tmp_path / "back", to="hf", dtype="bf16", max_shard_size="50KB")
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == b"spm"
    assert same_state(load_model(tmp_path / "back", dtype=torch.bfloat16).state_dict(),
                      {k: v.bfloat16() for k, v in model.state_dict().items()})
    with pytest.raises(ValueError, match="'hf' or 'meta'"):
        convert(tmp_path / "hf", tmp_path / "x", to="gguf")


# --- errors ---

def test_missing_or_unrecognized_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'}: checkpoint directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="must be a directory"):
        load_config(tmp_path / "file")
    (tmp_path / "d").mkdir()
    with pytest.raises(CheckpointError, match="found: an empty directory"):
        ck.detect_format(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{}")
    (tmp_path / "d" / "pytorch_model.bin").write_text("")
    with pytest.raises(CheckpointError, match="found: config.json, pytorch_model.bin"):
        load_model(tmp_path / "d")


def write_hf(tmp_path: Path, config: LlamaConfig, sd: dict) -> Path:
    out = tmp_path / "broken"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_hf()))
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_missing_unexpected_and_misshapen_tensors(tiny_model, tmp_path):
    model = tiny_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["model.layers.1.mlp.up_proj.weight"], sd["lm_head.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # old transformers: ignored
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    out = write_hf(tmp_path, model.config, sd)
    with pytest.raises(CheckpointError) as e:
        load_model(out)
    msg = str(e.value)
    assert "missing tensor(s): model.layers.1.mlp.up_proj.weight, lm_head.weight" in msg
    assert f"unexpected tensor 'model.layers.0.self_attn.extra.weight' in {out / 'model.safetensors'}" in msg
    assert "'model.layers.0.self_attn.k_proj.weight'" in msg and "shape (32, 64), the model expects (64, 64)" in msg
    assert "inv_freq" not in msg


def test_stale_rotary_buffers_are_ignored(tiny_model, tmp_path):
    model = tiny_model()
    out = write_hf(tmp_path, model.config, {**model.state_dict(), "model.rotary_emb.inv_freq": torch.ones(8)})
    assert same_state(load_model(out).state_dict(), model.state_dict())


def test_truncated_safetensors(tiny_model, tmp_path):
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    data = file.read_bytes()
    for size in (len(data) - 1000, 5):
        file.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=f"{file}: corrupt or truncated safetensors file"):
            load_model(tmp_path / "ckpt")


def test_missing_shard_listed_in_index(tiny_model, tmp_path):
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "ckpt", max_shard_size="100KB")
    second = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(CheckpointError, match=f"index.json: shard file.*not found: {second.name}"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=second.name):  # at the call, before any tensor is read
        ck.iter_checkpoint_tensors(tmp_path / "ckpt")


def test_index_entries_must_name_files_in_the_folder(tiny_model, tmp_path):
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "ckpt", max_shard_size="100KB")
    index_file = tmp_path / "ckpt" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for bad in ("../elsewhere/model.safetensors", 3):
        name = next(iter(index["weight_map"]))
        index_file.write_text(json.dumps({**index, "weight_map": {**index["weight_map"], name: bad}}))
        with pytest.raises(CheckpointError, match=r"must be a file name in"):
            load_model(tmp_path / "ckpt")


def test_saved_files_are_readable_by_others(tiny_model, tmp_path):
    model = tiny_model()
    umask = os.umask(0o022)
    try:
        out = save_hf(model, model.config, tmp_path / "ckpt")
    finally:
        os.umask(umask)
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.iterdir())  # safetensors alone writes 0600


class Payload:
    """Unpickling it would run code: it creates the file named by $PAYLOAD_MARKER."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["PAYLOAD_MARKER"]),))


class Opaque:
    pass


def test_pickle_with_code_is_refused(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    save_meta(model, model.config, tmp_path / "meta", num_shards=2)
    marker = tmp_path / "executed"
    monkeypatch.setenv("PAYLOAD_MARKER", str(marker))
    shard = tmp_path / "meta" / "consolidated.01.pth"
    tensors = torch.load(shard, weights_only=True)
    for obj, culprit in ((Payload(), "getattr"), (Opaque(), "Opaque")):
        for legacy in (False, True):  # the legacy (pre-zip) format is not blamed on memory mapping
            torch.save({**tensors, "extra": obj}, shard, _use_new_zipfile_serialization=not legacy)
            with pytest.raises(CheckpointError, match=f"{shard}: refusing to unpickle objects other than tensors "
                                                      f"\\(it needs .*{culprit}\\)") as e:
                load_model(tmp_path / "meta")
            assert "mmap" not in str(e.value) and "weights_only" not in str(e.value)  # torch's advice is not ours
    assert not marker.exists()
    torch.save([1, 2], shard)
    with pytest.raises(CheckpointError, match=f"{shard}: not a state dict"):
        load_model(tmp_path / "meta")
    shard.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"{shard}: (cannot load|not a readable torch checkpoint)"):
        load_model(tmp_path / "meta")


def test_meta_inconsistent_shards(tiny_model, tmp_path):
    model = tiny_model()
    save_meta(model, model.config, tmp_path / "meta", num_shards=2)
    shard1 = tmp_path / "meta" / "consolidated.01.pth"
    sd = torch.load(shard1, weights_only=True)
    torch.save({k: v for k, v in sd.items() if k != "layers.1.attention.wv.weight"}, shard1)
    with pytest.raises(CheckpointError, match=f"{shard1}: tensor 'layers.1.attention.wv.weight'.* is missing"):
        load_model(tmp_path / "meta")
    shard1.rename(tmp_path / "meta" / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"without gaps; found \['consolidated.00.pth', 'consolidated.02.pth'\]"):
        load_model(tmp_path / "meta")


def test_save_checks_the_weights(tiny_model, tmp_path):
    model = tiny_model()
    sd = dict(model.state_dict())
    del sd["model.norm.weight"]
    with pytest.raises(CheckpointError, match="cannot save.*missing tensor\\(s\\): model.norm.weight"):
        save_hf(sd, model.config, tmp_path / "out")
    with pytest.raises(CheckpointError, match="shape \\(320, 64\\), the config expects \\(400, 64\\)"):
        save_meta(model, model.config.replace(vocab_size=400), tmp_path / "out")
    with pytest.raises(ValueError, match="num_shards must be a positive integer dividing.*got 3"):
        save_meta(model, model.config, tmp_path / "out", num_shards=3)
    assert not (tmp_path / "out").exists()


def test_atomic_write(tiny_model, tmp_path, monkeypatch):
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    save_hf(old, old.config, tmp_path / "ckpt", max_shard_size="100KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError("disk full")
        save_file(tensors, filename, metadata)

    monkeypatch.setattr(ck, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):  # fails on the third shard file
        save_hf(new, new.config, tmp_path / "ckpt", max_shard_size="100KB")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the partial directory is gone
    monkeypatch.undo()
    save_hf(new, new.config, tmp_path / "ckpt")  # a complete save replaces the previous checkpoint
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert same_state(load_model(tmp_path / "ckpt").state_dict(), new.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "plain").mkdir()  # the checkpoint gets the permissions of any new directory (umask)
    assert (tmp_path / "ckpt").stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint; refusing to replace"):
        save_meta(new, new.config, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_invalid_config_file(tmp_path, tiny_model):
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**model.config.to_hf(), "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="config.json: .*divisible by n_kv_heads"):
        load_model(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: cannot read JSON"):
        load_config(tmp_path / "ckpt")
    assert get_config("tiny") == model.config


# --- Llama 3.x layouts: tied head, scaled rotary embeddings ---

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
LONG_IDS = torch.randint(3, 320, (1, 48), generator=torch.Generator().manual_seed(5))


def llama32_like(tiny_model):
    return tiny_model("tiny-gqa", tie_word_embeddings=True, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE),
                      bos_token_id=300, eos_token_id=[301, 302])


def test_tied_model_saves_without_a_head_and_loads_both_ways(tiny_model, hf_twin, tmp_path):
    model = llama32_like(tiny_model)
    save_hf(model, model.config, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["rope_scaling"]["rope_type"] == "llama3"
    assert json.loads((tmp_path / "ours" / "generation_config.json").read_text()) == {
        "bos_token_id": 300, "eos_token_id": [301, 302]}
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    loaded = load_model(tmp_path / "ours")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert dataclasses.replace(loaded.config, multiple_of=16) == model.config  # config.json has no multiple_of
    with torch.no_grad():
        expected = model(LONG_IDS)  # 48 positions: beyond the original context of 16, the scaling matters
        assert (theirs(LONG_IDS).logits - expected).abs().max() <= 1e-5
        assert (loaded(LONG_IDS) - expected).abs().max() == 0
    hf_twin(model).save_pretrained(tmp_path / "hf")  # what transformers writes (no lm_head.weight either)
    assert same_state(load_model(tmp_path / "hf").state_dict(), model.state_dict())


def test_tied_config_with_a_different_head_is_refused(tiny_model, tmp_path):
    model = tiny_model("tiny")
    save_hf(model, model.config, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(CheckpointError, match="ties the output head .* different lm_head.weight"):
        load_model(tmp_path / "ckpt")
    sd = model.state_dict()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # equal: a tied model saved with both
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ckpt" / "model.safetensors")
    assert load_model(tmp_path / "ckpt").lm_head.weight is not None


def test_tied_meta_round_trip(tiny_model, tmp_path):
    """Meta's layout always has an output matrix: a tied model writes its embedding there, and a checkpoint whose
    output equals its embedding (or has none) reads back tied; scaled rope goes to params.json as use_scaled_rope."""
    model = tiny_model("tiny-gqa", tie_word_embeddings=True, rope_theta=5e5, bos_token_id=128000,
                       eos_token_id=128001, vocab_size=128256, dim=32, n_heads=4, n_kv_heads=2,
                       rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 8192})
    save_meta(model, model.config, tmp_path / "meta", num_shards=2)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    assert "output.weight" in shard
    back = load_model(tmp_path / "meta")
    assert back.config.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    assert back.config.rope_scaling == model.config.rope_scaling
    assert (back.config.bos_token_id, back.config.eos_token_id) == (128000, 128001)  # Llama 3's vocabulary
    assert same_state(back.state_dict(), model.state_dict())
    convert(tmp_path / "meta", tmp_path / "hf", to="hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_config_json_is_read_with_bounds(tiny_model, tmp_path):
    model = tiny_model()
    save_hf(model, model.config, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json: cannot read JSON \\(nested too deeply\\)"):
        load_config(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    (tmp_path / "ckpt" / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json: not a regular file"):
        load_config(tmp_path / "ckpt", format="hf")
