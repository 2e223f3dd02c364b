"""A process pool for preprocessing, sized to the cores, off the event loop.

Preprocessing is CPU-bound; PIL and torch release the GIL inside their kernels, but the numpy
passes and the Python between steps do not, so it scales with processes, and worker processes
keep it entirely off a server's event loop and interpreter. Each worker runs
:func:`vlmlab.preprocess.preprocess_bytes` on the bytes it is sent and sends back the
:class:`~vlmlab.preprocess.Preprocessed` (pickled numpy arrays). Workers use one intra-op
thread each (torch, OpenCV, OpenMP): the pool is the parallelism.

Usage from async code (never call the blocking methods on the event loop)::

    pool = PreprocessPool()                       # one worker per available core
    result = await pool.run(data, "qwen2_vl", "exact", {"max_pixels": 1003520})
    pool.shutdown()

Transport: output tensors of 64 MB or more are written into shared memory and mapped by the
parent without a copy (:mod:`vlmlab.preprocess.shm`); the rest comes through the executor's pipe.
A 4032x3024 Qwen2-VL image at the default ``max_pixels`` is 293 MB of float32: through the pipe
it took ten times as long to ship as to compute.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from typing import Any, Self

from vlmlab.media import MediaPolicy
from vlmlab.preprocess import shm
from vlmlab.preprocess.core import Mode, Preprocessed, get_preprocessor
from vlmlab.protocol.errors import ConfigError


def available_cpus() -> int:
    """Cores this process may run on (affinity-aware where the OS says), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def exit_with_parent(interval_s: float = 1.0) -> None:
    """End this worker process when the one that started it is gone (killed, or exited without
    shutting its pool down): a worker blocked on a queue whose other end it holds itself would
    otherwise wait forever, an orphan holding its memory.

    Also ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and a worker
    would die with a KeyboardInterrupt traceback while the parent shuts it down in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="vlmlab-parent-watch", daemon=True).start()


def _init_worker(threads: int) -> None:
    """Pin each worker's libraries to ``threads`` intra-op threads and import them up front."""
    exit_with_parent()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is optional for the PIL paths
        pass
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:  # pragma: no cover - only Pixtral variant=mistral needs it
        pass


def _work(
    data: bytes,
    family: str,
    mode: Mode,
    options: dict[str, Any],
    policy: MediaPolicy | None,
    share_min_bytes: int | None = None,
    owner: str = "",
) -> Preprocessed | shm.Shipped:
    """The worker function (module level so it pickles by reference); tensors of at least
    ``share_min_bytes`` come back through shared memory (:mod:`vlmlab.preprocess.shm`)."""
    preprocessor = get_preprocessor(family, mode, **options)
    if share_min_bytes is None:
        return preprocessor.from_bytes(data, policy)
    with shm.Arena(owner, share_min_bytes) as arena:
        return arena.ship(preprocessor.from_bytes(data, policy))


def _chain(inner: Future[Any], outer: Future[Preprocessed]) -> None:
    """Done-callback of a worker's future: receive its result into ``outer``."""
    if inner.cancelled():
        outer.cancel()
        return
    error = inner.exception()
    result = None if error is not None else inner.result()
    if outer.cancelled():  # nobody will read it
        shm.discard(result)
        return
    if error is None:
        try:
            result = shm.receive(result)
        except OSError as exc:  # the file vanished (removed by hand, another sweep)
            error = exc
    try:
        if error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(result)
    except InvalidStateError:
        return  # cancelled meanwhile: the mapped arrays go with the result


class PreprocessPool:
    """Preprocess encoded images in worker processes.

    Args:
        max_workers: worker processes; defaults to the cores available to this process.
        policy: decode limits (``vlmlab.media.MediaPolicy``) applied in the workers.
        threads_per_worker: intra-op threads per worker (torch, OpenCV); 1 unless workers are
            fewer than cores.
        start_method: multiprocessing start method; ``"spawn"`` (default) is safe in servers
            that already run threads, ``"forkserver"`` starts faster on Linux.
        share_min_bytes: result tensors at least this large come back through shared memory
            (``/dev/shm``) instead of the pipe; ``None`` turns that off.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        policy: MediaPolicy | None = None,
        threads_per_worker: int = 1,
        start_method: str = "spawn",
        share_min_bytes: int | None = shm.MIN_BYTES,
    ):
        if max_workers is not None and max_workers < 1:
            raise ConfigError(
                f"max_workers must be at least 1, got {max_workers}", param="max_workers"
            )
        self.max_workers = max_workers or available_cpus()
        self.policy = policy
        self.share_min_bytes = share_min_bytes if share_min_bytes is not None and shm.available() else None
        self._owner = shm.owner_tag()
        if self.share_min_bytes is not None:
            shm.sweep()  # files of pools whose process was killed before it read them
        self._executor = ProcessPoolExecutor(
            max_workers=self.max_workers,
            mp_context=multiprocessing.get_context(start_method),
            initializer=_init_worker,
            initargs=(threads_per_worker,),
        )

    def submit(
        self,
        data: bytes,
        family: str,
        mode: Mode = "exact",
        options: Mapping[str, Any] | None = None,
    ) -> Future[Preprocessed]:
        """Queue one image; returns a ``concurrent.futures.Future`` of its :class:`Preprocessed`.

        The family, mode and options are validated here, so configuration errors raise at once
        instead of coming back from a worker; decode and size errors arrive through the future.

        Raises:
            NotFoundError / ConfigError / UnknownOptionError: as :func:`get_preprocessor`.
        """
        options = dict(options or {})
        get_preprocessor(family, mode, **dict(options))
        inner = self._executor.submit(
            _work, bytes(data), family, mode, options, self.policy, self.share_min_bytes, self._owner
        )
        outer: Future[Preprocessed] = Future()
        outer.add_done_callback(lambda done: done.cancelled() and inner.cancel())
        inner.add_done_callback(lambda done: _chain(done, outer))
        return outer

    async def run(
        self,
        data: bytes,
        family: str,
        mode: Mode = "exact",
        options: Mapping[str, Any] | None = None,
    ) -> Preprocessed:
        """:meth:`submit` and await the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(data, family, mode, options))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the workers (after finishing queued work unless ``cancel_futures``)."""
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)
        shm.remove_owned(self._owner)  # results of workers that died after writing them

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
