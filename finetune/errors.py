"""Errors caused by the user's input or the machine's limits: the command line prints them without a traceback.

`UserError` (exit code 2): a problem with a recipe, a data file, a path or an argument; the message names it.
`WriteError` (exit code 1): an output could not be written (a full disk); the message says what is intact.
`is_out_of_memory(e)`: whether an exception is an allocation failure (CUDA or CPU), for the clear message.
"""
from __future__ import annotations

import re


class UserError(Exception):
    """A problem with a recipe, a data file, a checkpoint path or a command-line argument."""

    exit_code = 2


class DataError(UserError):
    """Bad dataset input: the message names the file and, where there is one, the line."""


class WriteError(UserError):
    """An output could not be written (disk full, quota, a file too large); the message names it and says what is
    still intact. Not the user's input, hence exit code 1."""

    exit_code = 1


# Allocation failures, as torch (CUDA and CPU allocators), the C library and Windows word them.
_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|not enough memory|"
                            r"DefaultCPUAllocator|failed to allocate|std::bad_alloc", re.IGNORECASE)


def is_out_of_memory(e: BaseException) -> bool:
    """A MemoryError, torch's CUDA OutOfMemoryError, or an error whose first line is an allocator's failure
    (torch's CPU allocator raises a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory: ...")."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    if not isinstance(e, (RuntimeError, OSError)):
        return False
    if isinstance(e, OSError) and e.errno == 12:  # ENOMEM
        return True
    return bool(_OUT_OF_MEMORY.search(str(e)[:500]))


def load_error_text(e: BaseException) -> str:
    """One line describing why torch.load (or a similar reader) failed, without torch's advice to re-run with
    weights_only=False (which would run code from the file: never)."""
    text = str(e)
    if "Weights only load failed" in text:
        if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
            return f"it holds objects other than tensors ({found[1]}), which are never unpickled"
        found = re.search(r"Unsupported (operand \d+|class [\w.]+)", text)
        return f"not a file of tensors that can be read safely{f' (unsupported {found[1]})' if found else ''}"
    if isinstance(e, EOFError):
        return "the file is empty or cut short"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__
