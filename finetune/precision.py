"""Numeric precision of a run: the one place where `training.precision` becomes dtypes.

On a CUDA GPU `auto` is bf16, or fp16 with loss scaling where bf16 is missing. On a CPU, `auto` is bf16 autocast
only where the CPU has bf16 instructions (AMX or AVX512-BF16) AND a matrix product shaped like the run's is at
least `MIN_SPEEDUP` times faster in bf16 than in fp32, measured here once per process and shape; fp32 elsewhere.
The choice follows what this CPU does, never what another machine did: on an AVX2-only CPU bf16 products are
emulated and many times slower than fp32, so `bf16` there is refused and `auto` never measures.

bf16 on CPU is autocast: trained weights and the optimizer state stay fp32 (master weights), the blocks' products
run in bf16, norms, the residual stream and the loss in fp32. A LoRA run's frozen base is held in bf16: it is never
updated, takes half the memory, and autocast no longer casts every base weight at every step (bench/RESULTS.md
has the figures). bf16 is faster, not free: the
quickstart ends a few points of exact match lower in bf16, which is why its recipes pin fp32.
FINETUNE_CPU_BF16=0 or 1 pins what `auto` means on CPU without measuring (a test suite that must not depend on
timing, or a user who knows); an explicit `training.precision` always wins.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from functools import cache

import torch

from .errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_ENV = "FINETUNE_CPU_BF16"
# bf16 must beat fp32 by this much on the probe. A step gains about a third of the products' gain (the casts, the
# fp32 loss head, norms and the optimizer do not speed up; bench/RESULTS.md): at 1.5x on the probe a step gains
# ~15%, below that it is lost in the noise.
MIN_SPEEDUP = 1.5
DEFAULT_SHAPE = (2048, 512, 1376)  # (tokens, dim, hidden_dim) when the caller gives none: llama-58m at 4 x 512
PROBE_FLOPS = 3e9  # one fp32 probe (forward and backward product) costs about this much: ~20 ms at 150 GFLOP/s

# CPU flags (as /proc/cpuinfo spells them) that make bf16 products fast, and how a message names them.
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "bf16": "ARM BF16"}
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "bf16")
# What torch.cpu.get_capabilities() (torch >= 2.10) calls them.
_TORCH_NAMES = {"avx2": "avx2", "avx512_f": "avx512f", "avx512_bf16": "avx512_bf16", "amx_tile": "amx_tile",
                "amx_bf16": "amx_bf16", "bf16": "bf16"}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    weights: torch.dtype  # dtype of weights that are not trained (the LoRA base); trained ones stay fp32
    autocast: torch.dtype | None  # compute dtype inside the forward pass; None means plain fp32
    reason: str = ""  # what was decided and why, for the run's log


def resolve_precision(setting: str, device_type: str, *, shape: tuple[int, int, int] | None = None,
                      deepspeed: bool = False) -> Precision:
    """`training.precision` (auto, fp32, bf16, fp16) on a device type ("cuda", "cpu").

    shape: (tokens per micro-batch, dim, hidden_dim) of the run, what `auto` on CPU measures (DEFAULT_SHAPE
    when None). deepspeed: the run is under DeepSpeed: on CPU `auto` is fp32 there and `bf16` is refused."""
    if device_type == "cuda":
        return _cuda(setting)
    if setting == "fp32":
        return _fp32("fp32 (training.precision: fp32)")
    if device_type != "cpu" or setting == "fp16":
        if setting == "auto":
            return _fp32(f"auto: fp32 (on {device_type})")
        raise UserError(f"training.precision: {setting} needs a CUDA GPU; on {device_type} use fp32 or auto")
    if deepspeed:  # DeepSpeed's bf16 mode is bf16 weights with fp32 copies in its optimizer, not autocast
        if setting == "auto":
            return _fp32("auto: fp32 (DeepSpeed on CPU)")
        raise UserError("training.precision: bf16 under DeepSpeed needs a CUDA GPU (its bf16 mode on CPU is not "
                        "supported here); use fp32 or auto")
    pinned = _pinned_auto() if setting == "auto" else None
    flags = cpu_flags()
    has = [name for flag, name in BF16_FLAGS.items() if flag in flags]
    if setting == "bf16":
        if not has:
            raise UserError(f"training.precision: bf16, but this CPU has no bf16 instructions (AVX512-BF16 or "
                            f"AMX): bf16 would be many times slower than fp32; use fp32 or auto "
                            f"({describe_flags(flags)})")
        return _cpu_bf16(f"bf16 autocast (training.precision: bf16; {'+'.join(has)})")
    return _cpu_auto(flags, has, shape or DEFAULT_SHAPE, pinned)


def step_shape(recipe, config) -> tuple[int, int, int]:
    """The `shape` of a recipe's run on a model config: (micro_batch_size x max_seq_len tokens, dim, hidden_dim)."""
    return recipe.training.micro_batch_size * recipe.data.max_seq_len, config.dim, config.hidden_dim


def _cuda(setting: str) -> Precision:
    if setting == "auto":
        setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        reason = f"auto: {setting} (CUDA GPU{'' if setting == 'bf16' else ' without bf16'})"
    else:
        reason = f"{setting} (training.precision: {setting})"
    dtype = DTYPES[setting]
    return Precision(setting, dtype, None if setting == "fp32" else dtype, reason)


def _fp32(reason: str) -> Precision:
    return Precision("fp32", torch.float32, None, reason)


def _cpu_bf16(reason: str) -> Precision:
    return Precision("bf16", torch.bfloat16, torch.bfloat16, reason)


def _pinned_auto() -> str | None:
    """FINETUNE_CPU_BF16: "0", "1" or None (unset: measure)."""
    pinned = os.environ.get(CPU_BF16_ENV)
    if pinned not in (None, "0", "1"):
        raise UserError(f"{CPU_BF16_ENV}={pinned!r}: use 0 (auto is fp32 on CPU) or 1 (auto is bf16 autocast on "
                        f"a CPU with bf16 instructions), or unset it (measure)")
    return pinned


def _cpu_auto(flags: frozenset[str], has: list[str], shape: tuple[int, int, int], pinned: str | None) -> Precision:
    if not has:
        return _fp32(f"auto: fp32 (this CPU has no bf16 instructions: {describe_flags(flags)})")
    found = "+".join(has)
    if pinned == "0":
        return _fp32(f"auto: fp32 ({CPU_BF16_ENV}=0)")
    if pinned == "1":
        return _cpu_bf16(f"auto: bf16 autocast ({found}; {CPU_BF16_ENV}=1)")
    speedup = bf16_speedup(shape)
    probe = "x".join(str(n) for n in probe_shape(shape))
    if speedup >= MIN_SPEEDUP:
        return _cpu_bf16(f"auto: bf16 autocast ({found}; bf16 products {speedup:.1f}x as fast as fp32 here, "
                         f"{probe} probe)")
    return _fp32(f"auto: fp32 ({found}, but bf16 products only {speedup:.2f}x as fast as fp32 here, {probe} "
                 f"probe; bf16 needs {MIN_SPEEDUP}x)")


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_context(precision: Precision, device: torch.device):
    if precision.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.autocast)


# --- what the CPU has ---

@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags among REPORTED_FLAGS, as /proc/cpuinfo names them: torch's own detection
    (what its kernels dispatch on) together with /proc/cpuinfo (Linux; the only source on an older torch for
    some flags)."""
    return _torch_flags() | _cpuinfo_flags()


def _torch_flags() -> frozenset[str]:
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)  # torch >= 2.10
    if get is not None:
        caps = get()
        return frozenset(ours for theirs, ours in _TORCH_NAMES.items() if caps.get(theirs))
    # Older torch: private helpers, whose names changed between releases (2.5: _is_cpu_support_amx_tile).
    helpers = {"avx2": ("_is_avx2_supported", "_is_cpu_support_avx2"),
               "avx512f": ("_is_avx512_supported", "_is_cpu_support_avx512"),
               "avx512_bf16": ("_is_avx512_bf16_supported",),
               "amx_tile": ("_is_amx_tile_supported", "_is_cpu_support_amx_tile")}
    module = getattr(torch._C, "_cpu", None)
    found = set()
    for flag, names in helpers.items():
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None and fn():
                found.add(flag)
                break
    return frozenset(found)


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo ("flags" on x86, "Features" on ARM); empty elsewhere."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(set(value.split()) & set(REPORTED_FLAGS))
    except OSError:
        pass
    return frozenset()


def describe_flags(flags: frozenset[str]) -> str:
    """The evidence for a message, e.g. "flags found: avx2, avx512f; not found: avx512_bf16, amx_bf16; torch
    kernels: AVX512"."""
    present = [f for f in REPORTED_FLAGS if f in flags]
    absent = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    text = f"flags found: {', '.join(present) or 'none of ' + ', '.join(REPORTED_FLAGS)}"
    if absent:
        text += f"; not found: {', '.join(absent)}"
    return f"{text}; torch kernels: {_torch_capability()}"


def _torch_capability() -> str:
    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get else "unknown"


# --- is bf16 faster here? ---

_speedups: dict[tuple[int, int, int], float] = {}  # probe shape -> measured bf16 speedup, once per process


def bf16_speedup(shape: tuple[int, int, int]) -> float:
    """How many times faster a run-shaped product is under bf16 autocast than in fp32 here (cached)."""
    probe = probe_shape(shape)
    if probe not in _speedups:
        _speedups[probe] = measure_bf16_speedup(probe)
    return _speedups[probe]


def probe_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The run's (tokens, dim, hidden) cut to about PROBE_FLOPS. Hidden is cut first: that keeps the ratio of
    product work to cast work per weight (autocast casts each weight once a micro-batch, the work grows with the
    tokens) as in the run; tokens only when one column of the hidden size is already too much."""
    tokens, dim, hidden = (max(1, int(n)) for n in shape)
    per_column = 6 * tokens * dim  # forward + two backward products, 2 flops per multiply-add
    hidden = min(hidden, max(64, int(PROBE_FLOPS // per_column)))
    tokens = min(tokens, max(64, int(PROBE_FLOPS // (6 * dim * hidden))))
    return tokens, dim, hidden


def measure_bf16_speedup(shape: tuple[int, int, int], rounds: int = 5) -> float:
    """fp32 time / bf16 autocast time of one linear layer's forward and backward products (x: tokens x dim,
    weight: hidden x dim, both fp32 as in training), best of `rounds` each, alternating so that load from other
    processes falls on both alike."""
    tokens, dim, hidden = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=g, requires_grad=True)
    w = (torch.randn(hidden, dim, generator=g) * dim ** -0.5).requires_grad_()
    grads = {None: torch.randn(tokens, hidden, generator=g)}
    grads[torch.bfloat16] = grads[None].bfloat16()  # what the next layer's backward pass hands a bf16 output

    def run(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = torch.nn.functional.linear(x, w)
        torch.autograd.grad(y, (x, w), grads[dtype])
        return time.perf_counter() - start

    run(None), run(torch.bfloat16)  # warm-up: first-call allocations and kernel selection
    fp32, bf16 = [], []
    for _ in range(rounds):
        fp32.append(run(None))
        bf16.append(run(torch.bfloat16))
    return min(fp32) / max(min(bf16), 1e-9)
