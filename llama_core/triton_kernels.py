"""Triton kernels for the fused ops of `llama_core.kernels` on the GPU: RMSNorm, rotary, SwiGLU, and the
softmax-gradient step of the chunked linear + cross-entropy (whose matrix products stay with cuBLAS). The functions
mirror `kernels._TorchOps`; the autograd Functions in `kernels` call one or the other.

Each works in fp32 registers whatever the storage dtype and rounds once when storing, so in bf16 they are at least
as accurate as the plain-torch references they are tested against. `llama_core.kernels` dispatches here for CUDA
tensors; the tests also run them on CPU through Triton's interpreter (TRITON_INTERPRET=1, backend "triton").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a (rows, last dim) matrix with unit stride along the last dim."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# --- RMSNorm ---

@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # rounded to the input dtype, as the reference does
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(X, W, DY, RSTD, DX, DW, stride_x, stride_dy, stride_dx, M, N, rows_per_program,
                  BLOCK: tl.constexpr, HAS_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # 64-bit offsets: rows x stride can pass 2**31
    last = tl.minimum(first + rows_per_program, M)
    for row in range(first, last):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        n = x * rstd
        if HAS_DW:
            dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
        dn = dy * w
        # y = w * n, n = x * rstd:  dx = rstd * (dn - n * mean(dn * n))
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DW:
        tl.store(DW + pid * N + cols, dw, mask=mask)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    x2 = _rows(x)
    M, N = x2.shape
    y = torch.empty((M, N), dtype=torch.result_type(x, weight), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    _rms_norm_fwd[(M,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps, BLOCK=triton.next_power_of_2(N))
    return y.view(x.shape), rstd


def rms_norm_backward(grad, x, weight, rstd, need_weight_grad: bool):
    x2, dy = _rows(x), _rows(grad)
    M, N = x2.shape
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    programs = min(M, 512)  # each program sums its rows' share of the weight gradient
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw = torch.empty((programs, N), dtype=torch.float32, device=x.device) if need_weight_grad else dx
    _rms_norm_bwd[(programs,)](x2, weight, dy, rstd, dx, dw, x2.stride(0), dy.stride(0), dx.stride(0), M, N,
                               rows_per_program, BLOCK=triton.next_power_of_2(N), HAS_DW=need_weight_grad)
    return dx.view(x.shape), dw.sum(0).to(weight.dtype) if need_weight_grad else None


# --- rotary embeddings, half-split layout: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 ---

@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, sxb, sxh, sxt, sob, soh, sot, scb, sct, H, T, HALF,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSE: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, position) per program, all heads at once
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < HALF
    mask = (h < H) & dmask
    c = COS + b * scb + t * sct + d
    s = SIN + b * scb + t * sct + d
    c1 = tl.load(c, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=dmask, other=0.0).to(tl.float32)
    x = X + b * sxb + t * sxt + h * sxh + d
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
    if TRANSPOSE:  # the backward pass: rotation by -angle
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    o = OUT + b * sob + t * sot + h * soh + d
    tl.store(o, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    # x: (B, n_heads, T, head_dim), any strides with a unit last stride; cos, sin: (B, T, head_dim)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    B, H, T, D = x.shape
    out = torch.empty_like(x)  # same layout as x
    _rotary_kernel[(B * T,)](x, cos, sin, out, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                             out.stride(2), cos.stride(0), cos.stride(1), H, T, D // 2,
                             BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D // 2),
                             TRANSPOSE=transpose)
    return out


# --- SwiGLU ---

@triton.jit
def _swiglu_fwd(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(G, U, DY, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, (dy * u * (sig + silu * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


_EW_BLOCK = 1024


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate, dtype=torch.result_type(gate, up))
    n = gate.numel()
    _swiglu_fwd[(triton.cdiv(n, _EW_BLOCK),)](gate, up, y, n, BLOCK=_EW_BLOCK)
    return y


def swiglu_backward(grad, gate, up):
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _swiglu_bwd[(triton.cdiv(n, _EW_BLOCK),)](gate, up, grad, grad_gate, grad_up, n, BLOCK=_EW_BLOCK)
    return grad_gate, grad_up


# --- cross-entropy gradient, in place over a chunk of fp32 logits ---

@triton.jit
def _softmax_grad_kernel(LOGITS, TARGETS, LOSS, stride, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    peak = tl.zeros([], dtype=tl.float32) - float("inf")
    total = tl.zeros([], dtype=tl.float32)
    for start in range(0, V, BLOCK):  # online max and sum of exponentials
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf"))
        new_peak = tl.maximum(peak, tl.max(x, axis=0))
        total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(x - new_peak), axis=0)
        peak = new_peak
    target = tl.load(TARGETS + row)
    target_logit = tl.load(base + target)
    for start in range(0, V, BLOCK):  # softmax - one_hot(target), written over the logits
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        p = tl.exp(tl.load(base + cols, mask=mask, other=0.0) - peak) / total
        tl.store(base + cols, tl.where(cols == target, p - 1.0, p), mask=mask)
    tl.store(LOSS + row, tl.log(total) + peak - target_logit)


def softmax_grad_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """As in `kernels._TorchOps`: logits (n, vocab) fp32 become the gradient; returns the summed loss."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    _softmax_grad_kernel[(n,)](logits, targets.contiguous(), loss, logits.stride(0), V,
                               BLOCK=min(4096, triton.next_power_of_2(V)))
    return loss.sum()
