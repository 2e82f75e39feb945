"""What every file format of the package shares: atomic writes (readers never see half an output, a crash never
leaves one behind), the one overwrite check, Ctrl-C held over work that must not be cut, and page-aligned host memory
to read arrays into."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np


def check_overwrite(path: str, overwrite: bool) -> None:
    """Refuses to replace an existing output unless asked to.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass --overwrite, or overwrite=True, to replace it)")


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Holds Ctrl-C (SIGINT) over a block and raises KeyboardInterrupt after it, for work that an interrupt would
    otherwise cut where it does harm: JAX's extensions initialising (the interrupt comes out as an ImportError that an
    optional import swallows), an orbax save (its writer threads outlive the interrupted main thread and abort the
    interpreter's exit). Elsewhere than on the main thread, where Python delivers signals, a no-op.

    Raises:
      KeyboardInterrupt: after the block, when SIGINT came during it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory beside `path`; on success its contents are flushed to disk and it is renamed to
    `path`, on error removed. (Without the flush, a power loss soon after the rename could leave `path` complete in
    name but holding empty files.)

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    path = os.path.abspath(path)
    check_overwrite(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        _follow_umask(tmp)
        _fsync_tree(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _follow_umask(root: str) -> None:
    """Gives everything under `root`, itself included, the mode the umask gives a new file or directory. mkdtemp
    makes the directory private (0700) and some writers make their files private too (safetensors' `save_file`:
    0600); the output is an ordinary directory, readable as the user's other files are."""
    umask = _umask()
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def _fsync_dir(path: str) -> None:
    if os.name == "posix":  # elsewhere a directory cannot be opened to flush it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: str) -> None:
    """Flushes every file under `root`, then every directory (their entries), to disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Opens a temporary file beside `path`; renames it onto `path` once written and flushed to disk. Text modes
    write UTF-8 unless `encoding` says otherwise (never the locale's encoding)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    # mkstemp makes the file private (0600); the output is an ordinary file, readable as the umask allows.
    os.fchmod(fd, 0o666 & ~_umask())
    try:
        text = "b" not in mode
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if text else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def job_record(path: str) -> str:
    """Where a job that writes one plain file (`mine`'s JSONL) records the settings and counts of the run that made
    it: a hidden file beside it, so that a rerun of the same job can answer "already complete" instead of refusing an
    existing output."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.job.json")


def file_sha256(path: str) -> str:
    """The SHA-256 of a file's content (hex), read in 4 MiB blocks: what a resumable job records of its input, so
    that a resume refuses an input that changed."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def host_buffer(nbytes: int) -> Any:
    """Writable host memory for `nbytes`, page-aligned and, where the OS allows, populated up front (one kernel
    call instead of a page fault per 4 KiB, which is most of a load's time on a VM)."""
    if os.name != "posix":
        return bytearray(nbytes)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(nbytes, 1), flags=flags)


def host_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised numpy array in fresh, page-aligned, populated host memory (a CPU device can use it in
    place: `jax.device_put(..., may_alias=True)` aliases 64-byte-aligned arrays)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    return np.frombuffer(host_buffer(count * dtype.itemsize), dtype, count=count).reshape(shape)
