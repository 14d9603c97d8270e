"""finetune.heap, the CPU memory release: when it trims the C heap, and that trimming returns memory for real."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune import heap as mem

MB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def heap(monkeypatch):
    """A fake process: set `heap.resident` and `heap.in_use` (bytes); `heap.trims` counts malloc_trim calls."""
    class Heap:
        resident, in_use, trims, peak = 900 * MB, 500 * MB, 0, 0

        def trim(self, pad):
            self.trims += 1
            self.resident = self.in_use + 400 * MB  # what is resident besides the heap: 400 MB

    fake = Heap()
    monkeypatch.setattr(mem, "_malloc_trim", fake.trim)
    monkeypatch.setattr(mem, "_resident_bytes", lambda: fake.resident)
    monkeypatch.setattr(mem, "_heap_in_use", lambda: fake.in_use)
    monkeypatch.setattr(mem, "_peak_resident", lambda: max(fake.resident, fake.peak))
    monkeypatch.setattr(mem, "_outside_heap", float("inf"))
    return fake


def test_trims_only_a_surplus_of_unused_resident_heap(heap):
    assert not mem.release_free_memory(keep=256 * MB)  # the first call only learns what is resident besides
    heap.resident += 200 * MB  # 200 MB freed and kept by the heap: under `keep`
    assert not mem.release_free_memory(keep=256 * MB)
    heap.resident += 100 * MB
    assert mem.release_free_memory(keep=256 * MB) and heap.trims == 1
    assert heap.resident == 900 * MB and mem._outside_heap == 400 * MB
    heap.in_use += 300 * MB  # live memory grows: nothing to release
    heap.resident += 300 * MB
    assert not mem.release_free_memory(keep=256 * MB) and heap.trims == 1


def test_trims_only_close_to_the_peak(heap):
    mem.release_free_memory()
    heap.peak = 2000 * MB  # an earlier peak (loading, say) far above: trimming now would not lower it
    heap.resident += 400 * MB
    assert not mem.release_free_memory(keep=256 * MB, near_peak=64 * MB)
    heap.resident = 1950 * MB  # within 64 MB of it
    assert mem.release_free_memory(keep=256 * MB, near_peak=64 * MB) and heap.trims == 1


def test_falls_back_to_the_free_byte_count(heap, monkeypatch):
    monkeypatch.setattr(mem, "_resident_bytes", lambda: None)
    monkeypatch.setattr(mem, "_free_heap_bytes", lambda: 100 * MB)
    assert not mem.release_free_memory(keep=256 * MB)
    monkeypatch.setattr(mem, "_free_heap_bytes", lambda: 300 * MB)
    assert mem.release_free_memory(keep=256 * MB) and heap.trims == 1


REAL_HEAP = """
import ctypes
from finetune import heap as mem
MB = 1 << 20
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
libc.mallopt(-3, 64 * MB)  # M_MMAP_THRESHOLD: 4 MB blocks come from the heap, as torch's tensors of a few MB do
blocks = [libc.malloc(4 * MB) for _ in range(100)]
for b in blocks:
    ctypes.memset(b, 1, 4 * MB)
keeper = libc.malloc(4 * MB)  # above them: the heap's top cannot shrink by itself
assert not mem.release_free_memory()  # learns what is resident besides the heap
before = mem._resident_bytes()
for b in blocks:
    libc.free(b)
assert mem._resident_bytes() > before - 16 * MB  # glibc kept the freed blocks
assert mem.release_free_memory(keep=256 * MB)
assert mem._resident_bytes() < before - 300 * MB, (before, mem._resident_bytes())
"""


@pytest.mark.skipif(mem._malloc_trim is None or mem._resident_bytes() is None, reason="glibc on Linux only")
def test_really_returns_freed_heap_memory():
    # Its own process (mallopt stays there), started through sh: Linux carries the peak RSS (ru_maxrss, which
    # release_free_memory compares with) across fork and exec, so a child exec'd straight from a large pytest
    # process would start with pytest's peak; sh forks a fresh one that starts from its own.
    subprocess.run(["sh", "-c", '"$0" "$@"; exit $?', sys.executable, "-c", REAL_HEAP], check=True, cwd=ROOT)
