"""Packed-row attention without a T x T mask (llama_core/packed_attention.py).

On CPU: the documents (cu_seqlens) against a plain Python reader of the position ids and against the model's dense
mask; FlexAttention's forward (eager) against SDPA with that mask; the varlen path's layout, causality, scale and GQA
handling through stand-ins for torch's varlen_attn with each release's signature (2.10, 2.11, 2.12+).
On a CUDA GPU (marker gpu; bench/gpu_check.sh runs them): varlen and flex against the fp32 dense reference, forward
and every gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_core import packed_attention as pa
from llama_core.model import attention_mask_for

CUDA = torch.cuda.is_available()


def reference_documents(position_ids: torch.Tensor) -> list[int]:
    """Document lengths over the flattened batch, token by token: a document starts at each row's first token and
    wherever a position is not its predecessor's plus one."""
    lengths = []
    for row in position_ids.tolist():
        for t, p in enumerate(row):
            if t == 0 or p != row[t - 1] + 1:
                lengths.append(0)
            lengths[-1] += 1
    return lengths


def expected_cu(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


CASES = {
    "several documents": [[0, 1, 2, 0, 1, 0, 1, 2, 3]],
    "collate padding": [[0, 1, 2, 3, 0, 0, 0], [0, 1, 0, 1, 2, 3, 4]],  # pads: position 0 each, one-token documents
    "single document": [[0, 1, 2, 3, 4, 5, 6, 7]],
    "rows continue each other": [[0, 1, 2], [3, 4, 5]],  # a row boundary still starts a document
    "jumps and repeats": [[5, 6, 7, 2, 3, 3, 4, 0]],  # any break starts one, not only a return to 0
    "one token": [[7]],
}


@pytest.mark.parametrize("case", CASES)
def test_cu_seqlens_cases(case):
    positions = torch.tensor(CASES[case])
    lengths = reference_documents(positions)
    cu, max_len = pa.cu_seqlens(positions)
    assert cu.dtype == torch.int32 and cu.tolist() == expected_cu(lengths)
    assert isinstance(max_len, int) and max_len == max(lengths)


def test_cu_seqlens_known_values():
    cu, max_len = pa.cu_seqlens(torch.tensor(CASES["collate padding"]))
    assert cu.tolist() == [0, 4, 5, 6, 7, 9, 14] and max_len == 5
    assert pa.document_ids(torch.tensor(CASES["collate padding"])).tolist() == [[1, 1, 1, 1, 2, 3, 4],
                                                                                [1, 1, 2, 2, 2, 2, 2]]


@pytest.mark.parametrize("seed", range(5))
def test_cu_seqlens_random_rows_match_the_dense_mask(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 40
    positions = pa.random_packed_positions(B, T, mean_len=int(torch.randint(1, 12, (1,), generator=g)),
                                           generator=g, pad=seed)
    cu, max_len = pa.cu_seqlens(positions)
    lengths = reference_documents(positions)
    assert cu.tolist() == expected_cu(lengths) and max_len == max(lengths)
    # The block-diagonal causal mask these documents imply is the model's own dense mask, and the reference's.
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(B, T)
    implied = (doc[:, :, None] == doc[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    model_mask = attention_mask_for(positions, None, 0, T, "cpu")
    assert torch.equal(implied, model_mask[:, 0]) and torch.equal(pa.dense_mask(positions), model_mask)


@pytest.mark.parametrize("bad", [torch.zeros(0, 4, dtype=torch.long), torch.arange(5)])
def test_cu_seqlens_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match="position_ids"):
        pa.cu_seqlens(bad)


def qkv(B, H, KV, T, D, dtype=torch.float32, device="cpu", seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)

    def make(heads):  # (B, heads, T, D) as a transposed view, the model's layout
        return torch.randn(B, T, heads, D, generator=g).to(device, dtype).transpose(1, 2)
    q, k, v = make(H), make(KV), make(KV)
    return [t.detach().requires_grad_(grad) for t in (q, k, v)]


def dense(q, k, v, positions, scale=None):
    mask = attention_mask_for(positions, None, 0, q.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


PACKED = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 0, 0],
                       [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_on_cpu_matches_dense_mask(kv_heads):
    q, k, v = qkv(2, 4, kv_heads, PACKED.shape[1], 16)
    out = pa.varlen_attention(q, k, v, PACKED, impl="flex")
    assert out.shape == q.shape
    torch.testing.assert_close(out, dense(q, k, v, PACKED), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(pa.varlen_attention(q, k, v, PACKED, scale=0.3, impl="flex"),
                               dense(q, k, v, PACKED, scale=0.3), atol=2e-6, rtol=1e-5)


# --- the varlen path through stand-ins for torch's varlen_attn: FlashAttention's contract, computed per document ---

def varlen_semantics(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
    """(tokens, heads, hd) tensors cut at cu_q/cu_k: attention within each document, as flash varlen computes it."""
    assert q.dim() == 3 and q.shape[-1] == k.shape[-1] and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert gqa or q.shape[1] == k.shape[1], "key/value heads must equal query heads without enable_gqa"
    lengths = torch.diff(cu_q)
    assert max_q == max_k == int(lengths.max()), "max_q/max_k must be the longest document"
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        outs.append(F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=causal, scale=scale,
            enable_gqa=q.shape[1] != k.shape[1]).transpose(0, 1))
    return torch.cat(outs)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    assert window_size in ((-1, -1), (-1, 0))
    return varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale,
                            False)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size in ((-1, -1), (-1, 0))
    return varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale,
                            enable_gqa)


@pytest.mark.parametrize("fake", [varlen_2_10, varlen_2_11, varlen_2_12], ids=["2.10", "2.11", "2.12+"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_varlen_path_with_each_torch_signature(monkeypatch, fake, kv_heads, scale):
    monkeypatch.setattr(pa, "_varlen_fn", lambda: fake)
    q, k, v = qkv(2, 4, kv_heads, PACKED.shape[1], 16, grad=True)
    out = pa.varlen_attention(q, k, v, PACKED, scale=scale)
    ref = dense(q, k, v, PACKED, scale=scale)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    ref_grads = torch.autograd.grad(ref, (q, k, v), upstream)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_plan_is_shared_and_checked(monkeypatch):
    monkeypatch.setattr(pa, "_varlen_fn", lambda: varlen_2_12)
    plan = pa.packed_plan(PACKED, "varlen")
    assert plan.cu_seqlens.tolist() == expected_cu(reference_documents(PACKED)) and plan.max_len == 9
    q, k, v = qkv(2, 4, 2, PACKED.shape[1], 16)
    torch.testing.assert_close(pa.packed_attention(q, k, v, plan), dense(q, k, v, PACKED), atol=2e-6, rtol=1e-5)
    short = qkv(2, 4, 2, 8, 16)
    with pytest.raises(ValueError, match="do not fit a plan"):
        pa.packed_attention(*short, plan)
    with pytest.raises(ValueError, match="unknown packed attention"):
        pa.packed_plan(PACKED, "dense")


def test_cpu_uses_the_dense_path(monkeypatch):
    monkeypatch.delenv(pa.ENV_VAR, raising=False)
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    assert not pa.supported(q) and not any(pa.supported(q, impl) for impl in pa.IMPLS)
    assert pa.choose_impl("cpu", torch.bfloat16, 64) is None
    monkeypatch.setenv(pa.ENV_VAR, "dense")
    assert pa.choose_impl("cuda", torch.bfloat16, 64) is None
    monkeypatch.setenv(pa.ENV_VAR, "varlen")
    with pytest.raises(ValueError, match="not supported"):
        pa.choose_impl("cpu", torch.bfloat16, 64)
    monkeypatch.setenv(pa.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="expected one of varlen, flex or dense"):
        pa.choose_impl("cpu", torch.bfloat16, 64)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_bench_code_on_cpu_with_stand_ins(monkeypatch):
    """The benchmark's own code (bench/gpu_check.sh runs it once, on the GPU): varlen through the stand-in, flex
    eager (whose backward CPU lacks: a failed row, reported, not raised)."""
    monkeypatch.setattr(pa, "_varlen_fn", lambda: varlen_2_12)
    monkeypatch.setattr(pa, "supported_for", lambda device, dtype, head_dim, impl: True)
    result = pa.bench(batch=2, seq_len=48, heads=4, kv_heads=2, head_dim=16, mean_len=6, dtype=torch.float32,
                      iters=1, layers=2, device="cpu")
    rows = result["rows"]
    assert list(rows) == ["dense mask (SDPA)", "causal, no documents (floor)", "varlen", "flex"]
    assert rows["dense mask (SDPA)"]["rel_error"] < 1e-6 and rows["varlen"]["rel_error"] < 1e-6
    assert "backward" in rows["flex"]["error"] and result["fastest"] == "varlen"
    table = pa._table(result)
    assert "| varlen |" in table and "failed: NotImplementedError" in table and table.endswith("varlen")


def test_command_line_dry_run(capsys):
    assert pa.main(["--bench", "--dry-run", "--batch", "2", "--seq", "512"]) == 0
    assert "varlen" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        pa.main(["--bench", "--heads", "6", "--kv-heads", "4"])


# --- on a CUDA GPU ---

# Relative error (||out - ref|| / ||ref||) allowed against the fp32 dense reference, outputs and gradients: bf16 has
# 8 mantissa bits (about 4e-3 per rounding), fp16 11. A wrong mask or scale gives errors of order 1.
GPU_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl,dtype,kv_heads", [("varlen", torch.bfloat16, 2), ("varlen", torch.float16, 8),
                                                 ("flex", torch.bfloat16, 2), ("flex", torch.float16, 8)])
def test_gpu_matches_dense_reference(impl, dtype, kv_heads):
    if not pa.supported_for("cuda", dtype, 64, impl):
        pytest.skip(f"{impl} is not supported here (torch {torch.__version__}, "
                    f"{torch.cuda.get_device_name()}): the dense path is used")
    g = torch.Generator().manual_seed(0)
    B, T = 2, 300  # not a multiple of any block size
    positions = pa.random_packed_positions(B, T, mean_len=40, generator=g, pad=7).cuda()
    q, k, v = qkv(B, 8, kv_heads, T, 64, dtype=dtype, device="cuda", grad=True)
    upstream = torch.randn(q.shape, generator=g).to("cuda", dtype)
    out = pa.varlen_attention(q, k, v, positions, impl=impl)
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = dense(q32, k32, v32, positions)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), upstream.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        assert a.dtype == dtype and a.shape == b.shape and torch.isfinite(a).all(), name
        err = pa.relative_error(a, b)
        print(f"{impl} {dtype} kv_heads={kv_heads} {name}: relative error {err:.1e}")
        assert err < GPU_TOLERANCE[dtype], (name, err)
    # The pads (one-token documents) see only themselves: their outputs are their values.
    expanded = v.repeat_interleave(8 // kv_heads, dim=1)
    torch.testing.assert_close(out[:, :, -7:], expanded[:, :, -7:])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_choice_is_supported(monkeypatch):
    monkeypatch.delenv(pa.ENV_VAR, raising=False)
    impl = pa.choose_impl("cuda", torch.bfloat16, 64)
    print(f"packed attention on {torch.cuda.get_device_name()}, torch {torch.__version__}: {impl or 'dense'}")
    assert impl is not None, "neither varlen nor flex runs bf16 attention here (torch >= 2.5 has flex)"
    q, k, v = qkv(1, 4, 4, 128, 64, dtype=torch.bfloat16, device="cuda")
    positions = torch.arange(128, device="cuda")[None] % 50
    out = pa.packed_attention(q, k, v, pa.packed_plan(positions, impl))
    assert pa.relative_error(out, dense(q.float(), k.float(), v.float(), positions)) < 2e-2
