"""Data parallelism for the transformers engine: more copies of the model, each decoding its own
batch in its own process (``--data-parallel-size N``, vLLM's name for the same idea).

One process cannot decode two batches at once: a decode step of a small model is mostly Python
and operator dispatch, which hold the GIL (measured: two threads decoding 8 rows each made 0.5-0.7x
the tokens of one thread decoding 16). A replica process has its own interpreter and its own core.

The serving process keeps everything that comes before a prefill (chat template, token counts,
image preprocessing and its cache, the vision tower run ahead of time and the encoder cache) and
hands each replica finished model inputs. Each request goes to the least-loaded copy, the serving
process's own first on a tie, so one request at a time never pays the hop. A replica sends its
requests' tokens back in one message per decode step; cancelling a request stops its row there.
A replica that dies fails its requests with an engine error and gets no new ones.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import multiprocessing
import pickle
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vlmlab.engines.hf.batching import Job, batched_emits
from vlmlab.protocol.errors import EngineError

if TYPE_CHECKING:
    from vlmlab.config import EngineSpec

logger = logging.getLogger(__name__)

# What a finished job's consumer reads besides its stream (HFEngine.generate's timings and text).
_RESULT_FIELDS = ("queued", "started", "first_token", "last_token", "token_ids", "text", "finish_reason", "logprobs", "stages")


def _send(conn: Any, message: Any) -> None:
    """Plain pickle on purpose: a ``Connection.send`` of a tensor takes torch's multiprocessing
    path (shared-memory file, descriptor passed over a socket), which costs more than copying
    the small tensors a job carries (measured: a third of a replica's time)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# -- the replica process ---------------------------------------------------------------------------


class _Outbox:
    """Stands in for a job's event loop inside a replica: ``call_soon_threadsafe`` runs the
    delivery at once and sends everything it delivered as one message (a decode step of 16 rows
    is one send, like the one event-loop wake-up it is in-process)."""

    def __init__(self, conn: Any):
        self.conn = conn
        self.items: list[tuple[int, Any, dict[str, Any] | None]] = []
        self.lock = threading.Lock()

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        with self.lock:
            callback(*args)
            items, self.items = self.items, []
            if items:
                _send(self.conn, ("emit", items))


class _RowQueue:
    """Stands in for a job's asyncio queue inside a replica: items go to the outbox, the last
    one with the job's result fields."""

    def __init__(self, rid: int, outbox: _Outbox, jobs: dict[int, Job]):
        self.rid, self.outbox, self.jobs = rid, outbox, jobs

    def put_nowait(self, item: Any) -> None:
        fields = None
        if isinstance(item, tuple):  # ("done", reason) or ("error", exc): the job's end
            job = self.jobs.pop(self.rid, None)
            if job is not None:
                fields = {name: getattr(job, name) for name in _RESULT_FIELDS}
            if item[0] == "error":
                item = ("error", _portable(item[1]))
        self.outbox.items.append((self.rid, item, fields))


def replica_main(load: Callable[[EngineSpec], Any], spec: EngineSpec, conn: Any) -> None:
    """A replica process: load the model with ``load`` (the engine's own loader, passed in so
    that this module does not import the engine, which imports it), then decode the jobs the
    serving process sends."""
    from vlmlab.preprocess.pool import exit_with_parent

    exit_with_parent()

    try:
        engine = load(spec)
    except BaseException as exc:  # noqa: BLE001 - reported to the serving process
        _send(conn, ("failed", f"{type(exc).__name__}: {exc}"))
        return
    _send(conn, ("ready", None))
    outbox = _Outbox(conn)
    jobs: dict[int, Job] = {}
    encoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmlab-replica-encode")
    try:
        while True:
            try:
                message = _recv(conn)
            except (EOFError, OSError):  # the serving process is gone
                break
            if message[0] == "job":
                _, rid, fields = message
                job = Job(loop=outbox, queue=_RowQueue(rid, outbox, jobs), **fields)  # type: ignore[arg-type]
                # The hop: pickling, the pipe and unpickling (perf_counter is the system's
                # monotonic clock on Linux and macOS, one for every process).
                job.stages["replica_send"] = time.perf_counter() - job.submitted
                if job.sampling.seed is not None and not job.sampling.greedy:
                    import torch

                    job.generator = torch.Generator().manual_seed(job.sampling.seed)
                jobs[rid] = job
                if job.image_features is None and "pixel_values" in job.inputs and engine.encode_ahead:
                    # The vision tower runs here, on this copy's core, off the reading thread.
                    encoder.submit(_encode_then_submit, engine, job)
                else:
                    engine.batcher.submit(job)
            elif message[0] == "cancel":
                job = jobs.get(message[1])
                if job is not None:
                    job.cancelled = True
            elif message[0] == "close":
                break
    finally:
        encoder.shutdown(wait=False, cancel_futures=True)
        engine.close()


def _encode_then_submit(engine: Any, job: Job) -> None:
    """In a replica: the job's images through the vision tower, then the job to the batcher
    (an encoding error is the job's error, reported as any other)."""
    if job.cancelled:
        job.finish_reason = "abort"
        job.emit(("done", "abort"))  # through the outbox, as the batcher ends a job
        return
    start = time.perf_counter()
    try:
        job.image_features = engine.encode_images(job.inputs, job.image_keys)
    except Exception as exc:  # noqa: BLE001 - handed to the serving process
        job.emit(("error", exc))
        return
    job.stages["encode"] = time.perf_counter() - start
    engine.batcher.submit(job)


# -- the serving process's side --------------------------------------------------------------------


class Replica:
    """One replica process, seen from the serving process."""

    def __init__(self, index: int, spec: EngineSpec, load: Callable[[EngineSpec], Any]):
        context = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        self.index = index
        self.conn, child = context.Pipe()
        # spawn pickles ``load`` by name: it must be a module-level function
        self.process = context.Process(target=replica_main, args=(load, spec, child), name=f"vlmlab-replica-{index}", daemon=True)
        self.process.start()
        child.close()
        self.jobs: dict[int, Job] = {}
        self.reserved = 0  # requests routed here and still being prepared (not yet registered)
        self.submitted = 0  # requests sent here
        self.aborted = 0  # of those, stopped there because their consumer went away
        self.alive = False
        self.problem = "starting"
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        # Jobs are pickled and written on a thread of this replica's own: in the event loop's
        # default pool they waited behind the other requests' preprocessing (the hop at 16
        # concurrent on nano: 10-24 ms p50 there, 6-8 ms on this thread).
        self.sender = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vlmlab-replica-{index}-send")

    @property
    def load(self) -> int:
        return len(self.jobs) + self.reserved

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the model to load there; on success start reading its messages."""
        try:
            if not self.conn.poll(timeout_s):
                self.problem = f"not ready after {timeout_s:.0f} s"
            else:
                kind, detail = _recv(self.conn)
                self.alive = kind == "ready"
                self.problem = "ok" if self.alive else detail
        except (EOFError, OSError):
            self.problem = f"exited while loading (exit code {self.process.exitcode})"
        if not self.alive:
            self.close()
            return False
        threading.Thread(target=self._read, name=f"vlmlab-replica-{self.index}-reader", daemon=True).start()
        return True

    def register(self, job: Job) -> int:
        """Count ``job`` against this replica at once (routing sees it); :meth:`send` ships it."""
        rid = next(self._ids)
        self.jobs[rid] = job
        self.reserved = max(0, self.reserved - 1)
        self.submitted += 1
        return rid

    def send(self, rid: int, job: Job) -> None:
        """Ship a registered job (pickling its tensors: call it off the event loop)."""
        fields = {
            "inputs": job.inputs, "prompt_tokens": job.prompt_tokens, "sampling": job.sampling,
            "submitted": job.submitted, "image_features": job.image_features, "stream": job.stream,
            "image_keys": job.image_keys,
        }  # fmt: skip
        try:
            self._send(("job", rid, fields))
        except (OSError, ValueError) as exc:
            self.jobs.pop(rid, None)
            raise EngineError(f"data-parallel replica {self.index} is unreachable: {exc}") from exc

    def cancel(self, rid: int) -> None:
        if rid in self.jobs:
            try:
                self._send(("cancel", rid))
            except (OSError, ValueError):  # gone: its reader fails the job
                pass

    def _send(self, message: Any) -> None:
        with self._send_lock:
            _send(self.conn, message)

    def _read(self) -> None:
        while True:
            try:
                kind, items = _recv(self.conn)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            if kind != "emit":
                continue
            with batched_emits():  # one wake-up of the event loop per message
                for rid, item, fields in items:
                    job = self.jobs.get(rid)
                    if job is None:
                        continue
                    if fields is not None:
                        for name, value in fields.items():
                            setattr(job, name, value)
                        del self.jobs[rid]
                        self.aborted += item == ("done", "abort")
                    job.emit(item)
        self.alive = False
        self.problem = f"process exited (exit code {self.process.exitcode})"
        if self.jobs:
            logger.error("data-parallel replica %d died with %d request(s) in flight", self.index, len(self.jobs))
        with batched_emits():
            for rid in list(self.jobs):
                job = self.jobs.pop(rid)
                job.emit(("error", EngineError(f"data-parallel replica {self.index} died")))

    def close(self) -> None:
        self.sender.shutdown(wait=False, cancel_futures=True)
        if not self.alive:  # still loading, or failed: nothing to finish there
            self.process.terminate()
        self.alive = False
        try:
            self._send(("close", None))
        except (OSError, ValueError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


def start_replicas(spec: EngineSpec, count: int, load: Callable[[EngineSpec], Any]) -> list[Replica]:
    """Start ``count`` replica processes, each loading its copy with ``load`` (a module-level
    function) while the serving process loads its own."""
    return [Replica(i + 1, spec, load) for i in range(count)]


def await_replicas(replicas: list[Replica], timeout_s: float = 600.0) -> list[Replica]:
    """The replicas that loaded; the others are logged and stopped."""
    deadline = time.monotonic() + timeout_s
    ready = []
    for replica in replicas:
        if replica.wait_ready(max(1.0, deadline - time.monotonic())):
            ready.append(replica)
        else:
            logger.warning("data-parallel replica %d did not start: %s", replica.index, replica.problem)
    return ready
