"""Hand a worker's large tensors to the parent through shared memory instead of the result pipe.

A 4032x3024 photo for Qwen2-VL at its default ``max_pixels`` is 62,208 patches of 1,176 float32
values: 293 MB. Through :class:`concurrent.futures.ProcessPoolExecutor`'s pipe that is a pickle
copy, a transfer in chunks and an unpickle copy, several times the preprocessing itself. Here a
worker runs its pipeline inside an :class:`Arena`: the pipeline's output arrays
(:func:`vlmlab.preprocess.kernels.output_array`) of ``min_bytes`` or more are allocated in files
on the shared-memory file system (``/dev/shm``, tmpfs: RAM, never a disk), so the result is
written there once, in place. The worker sends each file's name and layout; the parent maps the
file, removes its name at once and wraps a numpy array around the mapping, without a copy. The
memory is freed when the last array over it is garbage. A large returned tensor that was not
allocated there (a pipeline path without ``output_array``) is copied into a file once.

Space is reserved before use (``posix_fallocate``): a tmpfs too small (Docker's default
``/dev/shm`` is 64 MB) fails there with ``OSError`` and the array is an ordinary one that goes
through the pipe, instead of a SIGBUS on a page the file system cannot supply. File names carry
the parent's pid and its pool's token: a pool's shutdown removes its own leftovers (a worker killed
after writing), and :func:`sweep` those of parents that are gone (killed before they read them).
"""

from __future__ import annotations

import mmap
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from vlmlab.preprocess.core import Preprocessed
from vlmlab.preprocess.kernels import outputs_from

SHM_DIR = Path("/dev/shm")
PREFIX = "vlmlab-pre-"
# Tensors at least this large go through shared memory. Measured with benchmarks/pool_transport.py
# on a 2-core VM: a 293 MB result came back 5.6x faster than through the pipe, while for 7-55 MB
# results the two were within run-to-run noise of each other (shared-memory pages are 4 KB pages,
# faulted one by one on both sides; the pipe's copies land in transparent huge pages).
MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class SharedArray:
    """Where one shipped tensor waits: a shared-memory file holding it from byte 0."""

    path: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class Shipped:
    """A :class:`Preprocessed` whose large tensors wait in shared-memory files."""

    pre: Preprocessed  # without the shipped tensors
    shared: dict[str, SharedArray]
    order: tuple[str, ...]  # every tensor's name, in the worker's order


def available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Arena:
    """In a worker, around one pipeline run: large output arrays live in shared-memory files.

    ``with Arena(owner) as arena: result = arena.ship(run())``; ``owner`` is
    ``"<parent pid>-<pool token>"`` (:func:`owner_tag`). Files that the shipped result does not
    reference (an intermediate, a failed run) are removed on exit."""

    def __init__(self, owner: str, min_bytes: int = MIN_BYTES):
        self.owner, self.min_bytes = owner, min_bytes
        self._files: dict[int, tuple[str, int]] = {}  # buffer address -> (path, bytes)
        self._paths: list[str] = []  # every file made, for the clean-up
        self._kept: set[str] = set()
        self._routing = outputs_from(self.allocate)

    def __enter__(self) -> Self:
        self._routing.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._routing.__exit__(kind, error, tb)
        for path in self._paths:
            if path not in self._kept:
                _remove(path)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A new array in a shared-memory file (zero-filled), or None when it is small or there
        is no room (the caller then allocates an ordinary one)."""
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes < self.min_bytes or not available():
            return None
        path = str(SHM_DIR / f"{PREFIX}{self.owner}-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return None
        self._paths.append(path)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # ENOSPC here, not SIGBUS while writing
            mapped = mmap.mmap(fd, nbytes)
        except OSError:
            _remove(path)
            self._paths.remove(path)
            return None
        finally:
            os.close(fd)
        array = np.frombuffer(mapped, dtype, count).reshape(shape)
        self._files[array.ctypes.data] = (path, nbytes)
        return array

    def ship(self, pre: Preprocessed) -> Preprocessed | Shipped:
        """``pre`` with its large tensors replaced by the files holding them (copied into a new
        file when a tensor was not allocated in one); ``pre`` itself when none is large."""
        shared: dict[str, SharedArray] = {}
        for name, tensor in pre.tensors.items():
            if tensor.nbytes < self.min_bytes:
                continue
            own = self._files.get(tensor.ctypes.data) if tensor.flags.c_contiguous else None
            if own is not None and own[1] == tensor.nbytes:
                path = own[0]
            else:
                copy = self.allocate(tensor.shape, tensor.dtype)
                if copy is None:
                    continue
                copy[...] = tensor
                path = self._files[copy.ctypes.data][0]
            self._kept.add(path)
            shared[name] = SharedArray(path, tensor.dtype.str, tuple(tensor.shape))
        if not shared:
            return pre
        rest = {name: t for name, t in pre.tensors.items() if name not in shared}
        return Shipped(replace(pre, tensors=rest), shared, tuple(pre.tensors))


def receive(result: Preprocessed | Shipped) -> Preprocessed:
    """In the parent: map a :class:`Shipped` result's files, remove their names and return the
    :class:`Preprocessed` with (writable) arrays over the mappings, in the worker's order."""
    if not isinstance(result, Shipped):
        return result
    tensors = dict(result.pre.tensors)
    try:
        for name, where in result.shared.items():
            try:
                fd = os.open(where.path, os.O_RDWR)
            finally:
                _remove(where.path)  # mapped or not, the name goes now
            try:
                mapped = mmap.mmap(fd, where.nbytes)
            finally:
                os.close(fd)
            tensors[name] = np.frombuffer(mapped, where.dtype).reshape(where.shape)
    finally:
        discard(result)  # the rest, when one failed
    return replace(result.pre, tensors={name: tensors[name] for name in result.order})


def discard(result: Preprocessed | Shipped | None) -> None:
    """Remove a shipped result's files without mapping them (a result nobody will read)."""
    if isinstance(result, Shipped):
        for where in result.shared.values():
            _remove(where.path)


def owner_tag() -> str:
    """A new pool's owner tag: this process's pid and a random token."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def remove_owned(owner: str) -> int:
    """Remove the files of ``owner`` still in the shared-memory directory; returns how many."""
    if not SHM_DIR.is_dir():
        return 0
    return sum(_remove(str(path)) for path in SHM_DIR.glob(f"{PREFIX}{owner}-*"))


def sweep() -> int:
    """Remove shared-memory files left by parents that are gone; returns how many."""
    if not SHM_DIR.is_dir():
        return 0
    removed = 0
    for path in SHM_DIR.glob(PREFIX + "*"):
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            removed += _remove(str(path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1
