"""The `finetune` command: dispatch to a command of `finetune.commands`, and turn known failures into messages.

    finetune --recipe R.yaml [key=value ...]        train (the default command)
    finetune validate --recipe R.yaml [key=value]   check a recipe, do nothing else
    finetune preprocess --recipe R.yaml --show 2    show how the data is templated, masked and packed
    finetune merge / export / eval / generate / chat / launch / plan   (see `finetune COMMAND --help`)

User errors (recipe, data, paths, output folders) print one message and exit with code 2, without a traceback;
a full disk, out of memory and an unwritable standard output print one message and exit with code 1.
"""
from __future__ import annotations

import atexit
import errno
import importlib
import os
import sys
import threading

from llama_core.files import OutputError

from .commands import COMMANDS
from .errors import UserError, is_out_of_memory

OUT_OF_MEMORY = ("error: out of memory{where}. Training: lower training.micro_batch_size (raise "
                 "gradient_accumulation_steps to keep the batch), lower data.max_seq_len, set "
                 "training.activation_checkpointing: true, use training.method: lora, or offload with "
                 "distributed.offload_optimizer / offload_params (see `finetune plan`). generate, chat, eval, merge: "
                 "lower --batch-size, use --dtype bfloat16, or a smaller model.")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def run() -> None:
    """The console entry point (`finetune`, `python -m finetune`): main(), then exit without tearing the interpreter
    down. Freeing the objects of the thousands of modules torch, transformers and datasets import took ~1.1 s after
    every training run on a 2-core Xeon (bench/RESULTS.md); nothing of ours needs it: outputs are written and closed
    before main returns. atexit handlers still run and the standard streams are flushed; while a thread that
    Python would wait for is alive, it is a normal exit. (Tests call main, which returns.)"""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or missing: nothing more can be said there
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout = sys.stdout
    sys.stdout = _WatchedStream(stdout) if stdout is not None else None
    try:
        return _main(argv)
    finally:
        sys.stdout = stdout


def _main(argv: list[str]) -> int:
    try:
        code = _dispatch(argv) or 0
        if sys.stdout is not None:
            sys.stdout.flush()  # a full or closed standard output fails here, inside the handlers below
        return code
    except UserError as e:
        return _error(str(e), e.exit_code)
    except OutputError as e:
        return _error(str(e), 2)
    except KeyboardInterrupt as e:
        _say("interrupted")
        return getattr(e, "exit_code", 130)
    except Exception as e:  # noqa: BLE001 - a few known failure kinds get a message instead of a traceback
        return _known_failure(e)


def _known_failure(e: Exception) -> int:
    from .train import TrainingStopped

    if isinstance(e, TrainingStopped):
        return _error(str(e), e.exit_code)
    if failure := _stdout_failure(e):
        _silence_stdout()
        if isinstance(failure, BrokenPipeError):  # the reader went away (`| head`): nothing more to say
            return 1
        reason = failure.strerror if isinstance(failure, OSError) and failure.strerror else "it is closed"
        return _error(f"cannot write to standard output ({reason})", 1)
    if is_out_of_memory(e):
        where = " (GPU)" if "cuda" in type(e).__name__.lower() or "CUDA" in str(e)[:200] else ""
        _say(OUT_OF_MEMORY.format(where=where))
        return 1
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return _error(f"could not write {e.filename or 'a file'}: {e.strerror} (disk full or over quota?)", 1)
    if type(e).__name__ == "SafetensorError":  # safetensors' writer does not raise OSError on a full disk
        return _error(f"could not write or read a safetensors file: {str(e)[:300]} (disk full?)", 1)
    if isinstance(e, RecursionError):
        return _error("an input file is nested too deeply to read (RecursionError); it cannot be a valid recipe, "
                      "data row or config", 2)
    raise e


def _error(message: str, code: int) -> int:
    _say(f"error: {message}")
    return code


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):  # no usable standard error either: the exit code says it
        pass


class _WatchedStream:
    """Standard output as it is, remembering a failed write or flush (a full device, a closed pipe), so that the
    error is reported as standard output's, not as some file's."""

    def __init__(self, stream):
        self._stream, self.failure = stream, None

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as e:
            self.failure = e
            raise

    def flush(self):
        try:
            return self._stream.flush()
        except (OSError, ValueError) as e:
            self.failure = e
            raise

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _stdout_failure(e: Exception) -> BaseException | None:
    """The error writing to standard output that `e` is (or follows from), if it is one."""
    if isinstance(sys.stdout, _WatchedStream) and sys.stdout.failure is not None:
        return sys.stdout.failure
    if sys.stdout is None and isinstance(e, AttributeError):  # closed when Python started
        return e
    return None


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that Python's own flush at exit does not fail again (and print
    "Exception ignored ..."): what CPython's documentation recommends for a broken pipe."""
    stream = sys.stdout._stream if isinstance(sys.stdout, _WatchedStream) else sys.stdout
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _dispatch(argv: list[str]) -> int | None:
    if not argv or argv[0] not in COMMANDS:
        if argv and not argv[0].startswith("-"):
            raise UserError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} "
                            f"(training is `finetune --recipe R.yaml`)")
        argv = ["train", *argv]
    command = importlib.import_module(f"finetune.commands.{argv[0]}")  # only the command that runs is imported
    return command.main(argv[1:])
