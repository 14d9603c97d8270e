"""Writing files so that nothing is ever half-written or lost: the one place that does it.

Every file and folder the project writes goes through here:
  atomic_write(path)    a file written to a temporary sibling, fsynced, then renamed over `path`
  atomic_folder(path)   a folder written as a temporary sibling, fsynced, then renamed into place
  write_json(path, obj) a JSON file written atomically, non-finite floats as null
  check_output_folder   the one rule for an output folder, checked before any work (see its docstring)
A write never goes through a symbolic link (it is refused: the link would be replaced by a file) and never renames
anything over a device or a pipe (`/dev/stdout` is written to directly). Nothing here deletes a file that the
project did not write: a folder replaced by a new one of its kind keeps every file of the old one that is not
part of that kind (a user's notes.txt inside a checkpoint folder moves into the new folder).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


class OutputError(ValueError):
    """An output location that cannot or must not be written; the message names it and says why."""


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def check_writable_file(path: str | os.PathLike) -> Path:
    """`path` as a Path if a file may be written there; else OutputError saying why (a folder, a link, a
    missing or unwritable parent). Devices and pipes are writable as they are."""
    path = Path(path)
    if is_stream(path):
        return path
    if path.is_symlink():
        raise OutputError(f"{path}: is a symbolic link; give the path of the file itself (a link would be replaced "
                          f"by a regular file)")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    check_writable_folder(path.parent if str(path.parent) else Path("."))
    return path


def check_writable_folder(folder: str | os.PathLike, *, create: bool = True) -> Path:
    """`folder` if files can be created in it (or, with `create`, it can be created); else OutputError."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():  # the nearest existing ancestor decides
        if probe.is_symlink():
            raise OutputError(f"{probe}: is a dangling symbolic link")
        if not create and probe == folder:
            raise OutputError(f"{folder}: no such folder")
        probe = probe.parent if str(probe.parent) != str(probe) else Path(".")
    if not probe.is_dir():
        raise OutputError(f"{folder}: cannot be created, {probe} is a file")
    resolved = probe.resolve()
    for system in (Path("/proc"), Path("/sys"), Path("/dev")):
        if resolved == system or system in resolved.parents:
            raise OutputError(f"{folder}: is inside {system}, not a place for output files")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: {probe} is not writable")
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise OutputError(f"{folder}: {probe} is on a read-only file system")
    except (AttributeError, OSError):
        pass
    return folder


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of `path` for writing; when the block completes, fsync it and rename it over
    `path` (the old file, if any, stays until then). An exception in the block leaves `path` untouched.
    A device or pipe (/dev/stdout, a FIFO) is opened and written directly."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = check_writable_file(path)
    if is_stream(path):  # never renamed over: written as it is
        with open(path, mode.replace("w", "a"), encoding=None if "b" in mode else encoding) as f:
            yield f  # appending: opening /dev/stdout for writing would truncate a file it is redirected to
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# Names of a process's open files: /dev/stdout is one even when it is redirected to a regular file.
_DESCRIPTOR_NAME = re.compile(r"/dev/(stdin|stdout|stderr|fd/\d+)|/proc/[^/]+/fd/\d+")


def is_stream(path: Path) -> bool:
    """An existing device or pipe, or an existing name of an open file descriptor (/dev/stdout, /dev/fd/N,
    /proc/PID/fd/N). A regular file elsewhere under /dev (/dev/shm/x) is not one (the writer then refuses /dev as a
    place for output files); a name that does not exist is not a stream: nothing is created there."""
    if not path.exists():
        return False
    if not path.is_file() and not path.is_dir():
        return True
    return _DESCRIPTOR_NAME.fullmatch(os.path.abspath(path)) is not None


def open_append(path: str | os.PathLike):
    """`path` opened for appending text (created if missing), never through a symbolic link (OutputError): for
    logs that grow line by line, such as a run's metrics.jsonl."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise OutputError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"{path}: is not a regular file")
    return os.fdopen(fd, "a", encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def json_safe(obj):
    """`obj` with non-finite floats (a skipped step's NaN loss) as null: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 2) -> None:
    write_text(path, json.dumps(json_safe(obj), indent=indent, ensure_ascii=False) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync folders
        pass
    finally:
        os.close(fd)


def make_durable(folder: str | os.PathLike) -> None:
    """fsync every file under `folder` and the folder, so that a rename after this publishes complete files; and
    give the files the permissions of any file the user creates (safetensors writes 0600)."""
    mode = 0o666 & ~_umask()
    for root, _, names in os.walk(folder):
        for name in names:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            os.chmod(file, mode)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


# The files the project's model writers put in a folder, by layout (Hugging Face, Meta, PEFT, the companions). When
# a model folder replaces an earlier one, the earlier folder's files of a layout the new one is also written in are
# stale (old shards, an old index) and go; anything else in it (a user's notes, another layout) is kept.
MODEL_LAYOUTS = {
    "hf": re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                     r"model\.safetensors\.index\.json"),
    "meta": re.compile(r"params\.json|consolidated\.\d+\.pth"),
    "peft": re.compile(r"adapter_config\.json|adapter_model\.(safetensors|bin)"),
    "companions": re.compile(r"tokenizer\.model|tokenizer_config\.json|template\.yaml"),
}


def stale_model_file(name: str, new_names: frozenset[str]) -> bool:
    """Whether `name`, in a model folder being replaced by one holding `new_names`, is an old file of a layout the
    new folder is written in (so it was written by such a writer, and would be wrong next to the new files)."""
    return any(pattern.fullmatch(name) and any(pattern.fullmatch(n) for n in new_names)
               for pattern in MODEL_LAYOUTS.values())


def everything_stale(name: str, new_names: frozenset[str]) -> bool:
    """For folders that hold nothing but the writer's own files (a data cache entry)."""
    return True


class AtomicFolder:
    """A folder written as a temporary sibling, then put in place by `commit()`.

    What happens to an existing, non-empty folder at `path` is decided before any work:
      - `replaceable(path)` (it is this writer's own kind of output: a checkpoint, an export): it is replaced by
        the rename (moved aside, the new one renamed into place); then every entry of the old folder that the new
        one does not have is moved into the new folder, unless `stale(name, new_names)` says the writer wrote it
        (default `stale_model_file`: old shards and indexes of the layout being written). Only stale entries are
        deleted with the old folder.
      - else, with `overwrite`: the new entries are moved into the folder beside its files; a name that exists
        there already is refused (OutputError) at commit, and nothing of the folder is touched.
      - else: OutputError, before any work.
    Use as a context manager (commit on success, clean up on failure) or call `commit()`/`abort()` yourself (several
    processes write into `tmp`, one commits)."""

    def __init__(self, path: str | os.PathLike, *, replaceable: Callable[[Path], bool] | None = None,
                 what: str = "output", create: bool = True, overwrite: bool = False,
                 stale: Callable[[str, frozenset[str]], bool] = stale_model_file):
        self.path, self.what, self.stale = Path(path), what, stale
        if self.path.is_symlink():
            raise OutputError(f"{self.path}: is a symbolic link; give the folder itself")
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path}: exists and is a file, not a folder")
        self.beside = False
        if self.path.is_dir() and any(self.path.iterdir()) and not (replaceable and replaceable(self.path)):
            if not overwrite:
                raise OutputError(f"{self.path}: exists, is not empty and is not {what}; refusing to replace it "
                                  f"(choose another folder, or empty this one)")
            self.beside = True
            check_writable_folder(self.path, create=False)
        check_writable_folder(self.path.parent if str(self.path.parent) else Path("."))
        self.tmp = _sibling(self.path, "tmp")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the folder

    def commit(self) -> Path:
        make_durable(self.tmp)
        if self.beside:
            self._move_beside()
        elif self.path.exists():
            old = _sibling(self.path, "old")
            os.replace(self.path, old)  # POSIX cannot swap two folders in one step; this is the nearest
            try:
                os.replace(self.tmp, self.path)
            except BaseException:
                os.replace(old, self.path)
                raise
            self._keep_from(old)
        else:
            os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def _move_beside(self) -> None:
        """Overwrite mode: the new entries join the existing folder's; a name already there is refused."""
        new = sorted(os.listdir(self.tmp))
        if clash := [n for n in new if os.path.lexists(self.path / n)]:
            raise OutputError(f"{self.path}: already holds {', '.join(clash[:5])}{' ...' if len(clash) > 5 else ''}; "
                              f"refusing to replace files this command did not write (move them away)")
        for name in new:
            os.replace(self.tmp / name, self.path / name)
        os.rmdir(self.tmp)
        fsync_dir(self.path)

    def _keep_from(self, old: Path) -> None:
        """Move the old folder's entries that the new one lacks, and that are not stale, into the new folder; then
        delete the old folder. If anything cannot be moved, the old folder stays (nothing is lost) and a warning
        names it."""
        new_names = frozenset(os.listdir(self.path))
        failed = []
        for name in os.listdir(old):
            if name in new_names or self.stale(name, new_names):
                continue
            try:
                os.replace(old / name, self.path / name)
            except OSError as e:
                failed.append(f"{name} ({e.strerror or e})")
        if failed:
            print(f"warning: {self.path} was replaced, but {', '.join(failed)} could not be moved into it from the "
                  f"previous folder, which stays at {old}", file=sys.stderr)
            return
        fsync_dir(self.path)
        shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def atomic_folder(path: str | os.PathLike, *, replaceable: Callable[[Path], bool] | None = None,
                  what: str = "output", overwrite: bool = False) -> AtomicFolder:
    """`with atomic_folder(out) as tmp: ...write into tmp...`: see AtomicFolder."""
    return AtomicFolder(path, replaceable=replaceable, what=what, overwrite=overwrite)


def check_output_folder(path: str | os.PathLike, *, own_kind: Callable[[Path], bool], what: str,
                        overwrite: bool = False, clashes: Callable[[str], bool] = lambda name: False,
                        option: str = "--overwrite", link_ok: bool = False) -> str:
    """The one rule for an output folder, checked before any work: "new" (missing or empty), "own" (this command's
    own kind of output: `own_kind(path)`, replaced or continued), or "beside" (another non-empty folder, allowed
    only with `overwrite`: the command's files go beside the ones there, and no entry there may be one the
    command writes: `clashes(name)`). Raises OutputError saying why not and what to do (`option` names the flag).
    `link_ok`: a symbolic link to a folder is accepted (written inside, never replaced)."""
    path = Path(path)
    if path.is_symlink() and not (link_ok and path.is_dir()):
        raise OutputError(f"{path}: is a symbolic link; give the folder itself")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is a file, not a folder")
    check_writable_folder(path)
    if not path.is_dir() or not any(path.iterdir()):
        return "new"
    if own_kind(path):
        return "own"
    if not overwrite:
        raise OutputError(f"{path}: exists, is not empty and is not {what}; refusing to write into it (choose "
                          f"another folder, or pass {option} to write beside its files: none of them is replaced "
                          f"or deleted)")
    if clash := sorted(n for n in os.listdir(path) if clashes(n)):
        raise OutputError(f"{path}: {option} writes beside the files there, but it already holds "
                          f"{', '.join(clash[:5])}{' ...' if len(clash) > 5 else ''}, which this command would "
                          f"replace; move them away or choose another folder")
    return "beside"


def is_regular_input(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file (not a device, pipe or folder), links followed."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False
