"""Returning the C heap's freed pages to the OS during CPU training (glibc's malloc_trim), when that lowers the peak.

On CPU, tensors of a few MB come from the C heap, and glibc keeps what is freed: torch's 64-byte-aligned
allocations rarely fit the exact holes their predecessors leave, so without trimming peak RSS sits well above the
live peak. The CPU engine calls `release_free_memory` after each block's forward and backward pass and after each
step (recipe: training.release_memory). Measurements: bench/RESULTS.md.
"""
from __future__ import annotations

import ctypes
import os

try:
    import resource
except ImportError:  # not a Unix
    resource = None

import torch


def release_free_memory(keep: int = 256 << 20, near_peak: int = 64 << 20) -> bool:
    """Return the C heap's free pages to the OS once more than `keep` bytes of resident memory are heap memory
    that nothing uses, and the process is within `near_peak` bytes of its peak RSS so far (glibc on Linux;
    elsewhere nothing). Returns whether it trimmed.

    A trim costs time, and trimmed pages fault back in when the heap hands them out again, which is why it trims
    only a surplus over `keep`, and only close to the peak, where a trim keeps the peak from rising."""
    global _outside_heap
    if _malloc_trim is None:
        return False
    resident, in_use = _resident_bytes(), _heap_in_use()
    if resident is None or in_use is None:  # no way to measure: trim whenever glibc holds enough free memory
        if _free_heap_bytes is not None and _free_heap_bytes() <= keep:
            return False
        _malloc_trim(0)
        return True
    # What is resident besides the heap (code, Python's own arenas, mapped files) is the smallest difference seen:
    # right after a trim, the heap holds (almost) nothing unused.
    _outside_heap = min(_outside_heap, resident - in_use)
    if resident - in_use - _outside_heap <= keep:
        return False
    if resident + near_peak < _peak_resident():  # a trim here cannot lower the peak, and its pages would come back
        return False
    _malloc_trim(0)
    return True


def _peak_resident() -> int:
    if resource is None:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _glibc():
    """malloc_trim, and functions giving the heap's free and used bytes (mallinfo2), where the C library has them."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None, None, None
    try:
        mallinfo2 = libc.mallinfo2
        mallinfo2.restype = _MallInfo2
    except AttributeError:
        return trim, None, lambda: None

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd  # allocated from the heap, and allocated as their own mappings

    return trim, lambda: mallinfo2().fordblks, in_use


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


_malloc_trim, _free_heap_bytes, _heap_in_use = _glibc()
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_outside_heap = float("inf")


def _release_after_block(module, inputs, output) -> None:
    if not torch.is_grad_enabled():  # evaluation and generation: little is freed, and it runs per token
        return
    release_free_memory()
    if isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_release_and_pass)


def _release_and_pass(grad: torch.Tensor) -> None:
    release_free_memory()


def release_after_blocks(layers) -> None:
    """Hook each transformer block so that its forward pass (and, through its output's gradient, its backward
    pass) ends with `release_free_memory`."""
    for block in layers:
        block.register_forward_hook(_release_after_block)
