"""Attention over packed rows on CUDA without a T x T mask.

A packed row holds several documents, its position ids restarting at each one (finetune's packing, and collate's
padding, where every pad has position 0 and so is a one-token document). Attention stays inside each document,
causally. The dense path (`llama_core.model.attention_mask_for` + SDPA) builds a (B, 1, T, T) mask, and SDPA with a
mask cannot use its flash kernel. Two paths need no mask:

- "varlen": `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10; its signature changed in 2.11 and 2.12, all
  handled), flash attention over the B*T tokens taken as one sequence of documents cut at `cu_seqlens`.
- "flex": FlexAttention (torch >= 2.5) with a document block mask, compiled by torch.compile on CUDA.
Both in fp16/bf16 only (fp32 keeps the dense path).

`python -m llama_core.packed_attention --bench` times both against the dense path (bench/gpu_check.sh runs it);
PREFERENCE holds them fastest first. The dense path stays the reference and the CPU path. The environment variable
LLAMA_PACKED_ATTENTION=varlen|flex|dense forces one (for benchmarks and bisecting).

    plan = packed_plan(position_ids, "varlen")      # once per forward pass: cu_seqlens or the block mask
    out = packed_attention(q, k, v, plan)           # per layer: q (B, n_heads, T, hd), k/v (B, n_kv_heads, T, hd)
"""
from __future__ import annotations

import argparse
import functools
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMPLS = ("varlen", "flex")
PREFERENCE = ("varlen", "flex")  # fastest first, as bench/gpu_check.sh measures it
ENV_VAR = "LLAMA_PACKED_ATTENTION"


# --- documents ---

def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a document starts, i.e. where a position does not continue its predecessor by one;
    every row starts one. llama_core.model.attention_mask_for builds its CPU mask from these documents too."""
    if position_ids.dim() != 2 or position_ids.numel() == 0:
        raise ValueError(f"position_ids must be a non-empty (B, T) tensor, got shape {tuple(position_ids.shape)}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The documents of the B*T tokens taken row after row: (cu_seqlens, max_len).

    cu_seqlens: int32 (n_docs + 1,), on position_ids' device: document i is tokens cu_seqlens[i]:cu_seqlens[i + 1]
    of the flattened batch, the last entry B*T. max_len: the longest document (one device sync).
    """
    starts = document_starts(position_ids).reshape(-1).nonzero().squeeze(1)  # (n_docs,)
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    cu = torch.cat((starts, total)).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int32: each token's document, counted from 1 within its row."""
    return document_starts(position_ids).cumsum(dim=1, dtype=torch.int32)


# --- what runs where ---

def available(impl: str) -> bool:
    """Whether this torch has the implementation's API."""
    if impl == "varlen":
        return _varlen_fn() is not None
    if impl == "flex":
        return _flex_api() is not None
    raise ValueError(f"unknown packed attention implementation {impl!r}; valid: {', '.join(IMPLS)}")


def supported_for(device: torch.device | str, dtype: torch.dtype, head_dim: int, impl: str) -> bool:
    """Whether `impl` runs attention of this device, compute dtype and head size."""
    device = torch.device(device)
    if device.type != "cuda" or not available(impl) or not torch.cuda.is_available():
        return False
    # Half precision only (fp32 training keeps the dense reference path); head sizes both kernels take.
    if dtype not in (torch.float16, torch.bfloat16) or head_dim % 8 or not 16 <= head_dim <= 256:
        return False
    # FlashAttention-2 (varlen) needs Ampere or newer.
    return impl != "varlen" or torch.cuda.get_device_capability(device) >= (8, 0)


def supported(q: torch.Tensor, impl: str | None = None) -> bool:
    """Whether `impl` (None: any, as choose_impl picks) runs attention for queries q (B, n_heads, T, head_dim)."""
    if impl is None:
        return choose_impl(q.device, q.dtype, q.shape[-1]) is not None
    return supported_for(q.device, q.dtype, q.shape[-1], impl)


def choose_impl(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """The implementation to use, or None for the dense-mask path: LLAMA_PACKED_ATTENTION if set, else the first
    of PREFERENCE that is supported."""
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced == "dense":
        return None
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {', '.join(IMPLS)} or dense")
        if not supported_for(device, dtype, head_dim, forced):
            raise ValueError(f"{ENV_VAR}={forced}: not supported for {dtype} attention with head size {head_dim} "
                             f"on {torch.device(device)} with torch {torch.__version__}")
        return forced
    return next((impl for impl in PREFERENCE if supported_for(device, dtype, head_dim, impl)), None)


# --- the attention ---

@dataclass
class PackedPlan:
    """What one forward pass's layers share: the documents of its (B, T) position ids, in the impl's form."""
    impl: str
    batch: int
    seq_len: int
    cu_seqlens: torch.Tensor | None = None  # varlen
    max_len: int = 0  # varlen
    block_mask: object = None  # flex: a BlockMask


def packed_plan(position_ids: torch.Tensor, impl: str) -> PackedPlan:
    B, T = position_ids.shape
    if impl == "varlen":
        cu, max_len = cu_seqlens(position_ids)
        return PackedPlan(impl, B, T, cu_seqlens=cu, max_len=max_len)
    if impl == "flex":
        docs = document_ids(position_ids)

        def same_document_causal(b, h, q_idx, kv_idx):
            return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)
        block_mask = _flex_api()[1](same_document_causal, B, None, T, T, device=position_ids.device)
        return PackedPlan(impl, B, T, block_mask=block_mask)
    raise ValueError(f"unknown packed attention implementation {impl!r}; valid: {', '.join(IMPLS)}")


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: PackedPlan,
                     scale: float | None = None) -> torch.Tensor:
    """Causal attention within each document: q (B, n_heads, T, hd), k and v (B, n_kv_heads, T, hd), as
    llama_core.model's Attention has them; returns (B, n_heads, T, hd), what SDPA with the block-diagonal causal
    mask gives."""
    B, H, T, D = q.shape
    if (B, T) != (plan.batch, plan.seq_len) or k.shape[0] != B or k.shape[2] != T or H % k.shape[1]:
        raise ValueError(f"packed attention: q {tuple(q.shape)}, k {tuple(k.shape)} do not fit a plan for "
                         f"(B, T) = {(plan.batch, plan.seq_len)}")
    if plan.impl == "varlen":
        out = _varlen(_flat(q), _flat(k), _flat(v), plan.cu_seqlens, plan.max_len, scale)  # (B*T, H, hd)
        return out.view(B, T, H, D).transpose(1, 2)
    return _flex(q, k, v, plan.block_mask, scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position_ids: torch.Tensor,
                     scale: float | None = None, impl: str = "varlen") -> torch.Tensor:
    """packed_attention with its plan made from position_ids (B, T) here (make it once per forward pass instead
    when several layers share it)."""
    return packed_attention(q, k, v, packed_plan(position_ids, impl), scale)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, hd) -> (B*T, heads, hd); free for the model's layout (a transposed view of (B, T, heads, hd))."""
    B, heads, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, heads, D)


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Each key/value head (along `dim`) repeated for the `groups` query heads that share it, as SDPA's GQA does."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _varlen_fn():
    """torch.nn.attention.varlen.varlen_attn, or None before torch 2.10 (a module attribute: tests replace it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _varlen(q, k, v, cu, max_len, scale):
    """varlen_attn over flattened (tokens, heads, hd) tensors, causal, whichever signature this torch has:
    2.10 `is_causal`, no `scale`, no GQA; 2.11 `window_size` (-1, 0) for causal, `scale`; 2.12 on `enable_gqa`."""
    fn = _varlen_fn()
    params = _parameters(fn)
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel scales by 1/sqrt(hd): fold the rest into q
            q = q * (scale * math.sqrt(q.shape[-1]))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _flex_api():
    """(flex_attention, create_block_mask), or None before torch 2.5."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    """flex_attention compiled once per process (uncompiled it materializes the scores: a reference only)."""
    return torch.compile(_flex_api()[0])


def _flex(q, k, v, block_mask, scale):
    flex_attention = _flex_api()[0]
    groups = q.shape[1] // k.shape[1]
    kwargs = {}
    if groups > 1:
        if "enable_gqa" in _parameters(flex_attention):
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    fn = _compiled_flex() if q.is_cuda else flex_attention  # CPU: eager, forward only (tests)
    return fn(q, k, v, block_mask=block_mask, scale=scale, **kwargs)


# --- the benchmark bench/gpu_check.sh runs ---

def dense_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True where a query may attend to a key: the block-diagonal causal mask, as
    llama_core.model.attention_mask_for builds it for packed rows (the reference the CUDA paths are tested against)."""
    docs = document_ids(position_ids)
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal)[:, None]


def dense_attention(q, k, v, position_ids, scale=None):
    """The reference: SDPA with the dense block-diagonal causal mask, llama_core.model's path on CPU."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(position_ids), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def random_packed_positions(batch: int, seq_len: int, mean_len: int, generator: torch.Generator,
                            pad: int = 0) -> torch.Tensor:
    """(batch, seq_len) position ids of rows packed with documents of 1 .. 2*mean_len tokens, the last `pad`
    tokens of each row padding as finetune's collate makes it (position 0 each)."""
    rows = []
    for _ in range(batch):
        row = []
        while len(row) < seq_len - pad:
            n = int(torch.randint(1, 2 * mean_len + 1, (1,), generator=generator))
            row.extend(range(n))
        rows.append(row[:seq_len - pad] + [0] * pad)
    return torch.tensor(rows)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def _time_ms(fn, iters: int) -> float:
    """Median milliseconds of fn() over `iters` runs after 3 warm-up runs: CUDA events on the GPU, the wall clock
    on CPU (a check of the benchmark's code, not a measurement)."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def bench(batch=4, seq_len=2048, heads=32, kv_heads=8, head_dim=64, mean_len=256, dtype=torch.bfloat16,
          iters=20, layers=16, seed=0, device="cuda") -> dict:
    """Milliseconds of the dense path, each supported packed implementation, and plain causal flash attention (one
    document a row: the floor): preparing (the mask or plan, once per forward pass), and one layer's forward and
    forward+backward; with each output's relative error against the dense path in float32. `fastest` compares
    prepare + layers x forward+backward, a training step's attention in a model of that many layers."""
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    positions = random_packed_positions(batch, seq_len, mean_len, g, pad=seq_len // 64).to(device)
    shapes = ((batch, heads, seq_len, head_dim), (batch, kv_heads, seq_len, head_dim))
    q, k, v = (torch.randn(shapes[min(i, 1)], generator=g).to(device, dtype).requires_grad_() for i in range(3))
    grad = torch.randn(shapes[0], generator=g).to(device, dtype)
    with torch.no_grad():
        reference = dense_attention(q.float(), k.float(), v.float(), positions)
    lengths = torch.diff(cu_seqlens(positions)[0]).double()
    flops = 4 * heads * head_dim * float((lengths * (lengths + 1) / 2).sum())  # forward: QK^T and PV, causal
    gqa = heads != kv_heads

    def masked(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def causal(q, k, v, _):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # name: (prepare, attend(q, k, v, prepared))
    candidates = {"dense mask (SDPA)": (functools.partial(dense_mask, positions), masked),
                  "causal, no documents (floor)": (lambda: None, causal)}
    for impl in IMPLS:
        if supported_for(device, dtype, head_dim, impl):
            candidates[impl] = (functools.partial(packed_plan, positions, impl), packed_attention)
    rows = {}
    for name, (prepare, attend) in candidates.items():
        try:
            prepared = prepare()
            out = attend(q, k, v, prepared).float()

            def forward():
                with torch.no_grad():
                    attend(q, k, v, prepared)

            def step():
                torch.autograd.grad(attend(q, k, v, prepared), (q, k, v), grad)
            row = {"prepare_ms": _time_ms(prepare, iters), "forward_ms": _time_ms(forward, iters),
                   "step_ms": _time_ms(step, iters),
                   "rel_error": None if name.startswith("causal") else relative_error(out, reference)}
            row["tflops"] = 3.5 * flops / row["step_ms"] / 1e9  # the backward pass is about 2.5 forward passes
            row["per_training_step_ms"] = row["prepare_ms"] + layers * row["step_ms"]
            rows[name] = row
        except Exception as e:  # noqa: BLE001 - a failing implementation is a result to report, not the end
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    timed = {impl: rows[impl]["per_training_step_ms"] for impl in IMPLS if "step_ms" in rows.get(impl, {})}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "device": device_name, "batch": batch, "seq_len": seq_len,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "mean_doc_len": mean_len,
            "docs": int(lengths.numel()), "dtype": str(dtype).removeprefix("torch."), "layers": layers,
            "rows": rows, "fastest": min(timed, key=timed.get) if timed else None, "varlen_signature": _signature()}


def _signature() -> str | None:
    fn = _varlen_fn()
    return None if fn is None else f"varlen_attn{inspect.signature(fn)}"


def _table(result: dict) -> str:
    lines = [f"packed attention, {result['device']}, torch {result['torch']}: batch {result['batch']} x "
             f"{result['seq_len']}, {result['docs']} documents (mean {result['mean_doc_len']}), {result['heads']} "
             f"heads / {result['kv_heads']} kv, head size {result['head_dim']}, {result['dtype']}",
             f"| path | prepare ms | forward ms | fwd+bwd ms | TFLOP/s | {result['layers']} layers ms | "
             f"rel. error vs fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
        else:
            err = "-" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
            lines.append(f"| {name} | {r['prepare_ms']:.3f} | {r['forward_ms']:.3f} | {r['step_ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r['per_training_step_ms']:.1f} | {err} |")
    lines.append(f"fastest packed implementation: {result['fastest']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_core.packed_attention",
                                description="Time packed-row attention (varlen, flex, dense mask) on a CUDA GPU.")
    p.add_argument("--bench", action="store_true", help="run the benchmark (needs CUDA)")
    p.add_argument("--dry-run", action="store_true", help="check the arguments and this torch's APIs, run nothing")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--doc-len", type=int, default=256, help="mean document length (uniform in 1 .. 2x)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--layers", type=int, default=16, help="layers of the model the choice is for (Llama-3.2-1B: 16)")
    p.add_argument("--json", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads or min(args.batch, args.seq, args.heads, args.head_dim, args.doc_len,
                                         args.iters, args.layers) < 1:
        p.error("sizes must be positive and --heads a multiple of --kv-heads")
    if args.dry_run:
        print(_signature() or "no torch.nn.attention.varlen")
        print(f"torch {torch.__version__}: " + ", ".join(f"{impl} {'available' if available(impl) else 'missing'}"
                                                          for impl in IMPLS))
        return 0
    if not args.bench:
        p.error("nothing to do: pass --bench (or --dry-run)")
    if not torch.cuda.is_available():
        print("packed attention benchmark: needs a CUDA GPU", file=sys.stderr)
        return 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    result = bench(args.batch, args.seq, args.heads, args.kv_heads, args.head_dim, args.doc_len, dtype, args.iters,
                   args.layers)
    print(_table(result))
    if args.json:
        from .files import write_json
        write_json(args.json, result)
    failed = [name for name, r in result["rows"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
