"""An engine made of Ray actors: N copies of one engine, on the machines of a Ray cluster.

:class:`RayEnginePool` has the engine interface, so the evaluation runner (and anything else
that drives an engine) uses it unchanged: its requests go to the actor with the fewest in flight,
each actor batches what it holds, results come back to the caller, which alone writes them.

Callers with more work per request than one generation (the evaluation runner: read a share of
a dataset, build the prompts, answer them) send that work to the workers instead, with
:meth:`RayEnginePool.call`: a function ``task(engine, scratch, *args)`` runs in the actor next
to its engine, so only the function's (small) arguments and result cross processes. The
functions come from the caller's layer and are pickled by reference, so this module stays
unaware of them; ``scratch`` is a dict the actor keeps between calls (lost when it restarts).

A worker that dies (its process killed, its node lost) is restarted by Ray, and the calls it
held are sent again (``max_restarts`` / ``max_task_retries``): a generation is a pure function of
its request at temperature 0 or with a seed, so a retry gives the same answer and the caller sees
each request answered exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines.base import Engine, EngineInfo, GenerationRequest, PromptCount
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult
from vlmlab.protocol.errors import ConfigError, EngineError

logger = logging.getLogger(__name__)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray: pip install 'vlmlab[ray]'") from exc
    return ray


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (``None``: start a new local one, even when another
    runs on this machine), unless this process already is in one. Ray's own start-up lines stay
    out of vlmlab's output; its warnings do not. Returns whether this call connected.

    Raises:
        ConfigError: Ray is not installed (naming the extra).
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    ray.init(address=address or "local", log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
    return True


class _Worker:
    """One engine in one Ray actor (an async actor: the requests it holds are decoded together)."""

    def __init__(self, spec: EngineSpec):
        from vlmlab.engines import load_engine

        self.engine = load_engine(spec)
        self.scratch: dict[str, Any] = {}

    async def run(self, task: Callable[..., Any], *args: Any) -> Any:
        """``task(engine, scratch, *args)``, awaited when it is a coroutine function."""
        result = task(self.engine, self.scratch, *args)
        return await result if inspect.isawaitable(result) else result

    def info(self) -> EngineInfo:
        return self.engine.info()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def complete(self, request: GenerationRequest) -> GenerationResult:
        from vlmlab.engines.base import complete

        return await complete(self.engine, request)

    def count(self, chat: Chat, options: Mapping[str, Any] | None) -> PromptCount:
        return self.engine.count_prompt_tokens(chat, options)


def worker_spec(spec: EngineSpec, cpus: float) -> EngineSpec:
    """``spec`` as one worker with ``cpus`` CPUs loads it.

    The hf engine prefills new requests on a thread of their own while the batch decodes, to use
    a second core; a one-CPU worker has none, and the overlap only costs switching: measured here
    (nano, one core, image caches off) 9.2 ms of CPU per sample without it, 10.5 ms with it, the
    answers the same. A setting of the user's own wins.

    ``--data-parallel-size auto`` is one copy here: on Ray the copies are the workers (or
    replicas), each with its own CPUs, not processes a worker would start beside itself.
    """
    if spec.data_parallel_size == "auto":
        spec = dataclasses.replace(spec, data_parallel_size=1)
    if spec.engine == "hf" and cpus <= 1 and "overlap_prefill" not in spec.extra:
        return dataclasses.replace(spec, extra={**spec.extra, "overlap_prefill": False})
    return spec


class RayEnginePool(Engine):
    """``workers`` copies of ``spec``'s engine as Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(self, spec: EngineSpec, workers: int, address: str | None = None, cpus_per_worker: float = 1.0):
        ray = _ray()
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        connect(address)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < workers * cpus_per_worker:  # Ray waits for them (an autoscaler may add nodes): say so
            logger.warning("the Ray cluster has %g CPUs; %d workers need %g: some wait until it has them", cpus, workers, workers * cpus_per_worker)
        actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=-1, max_task_retries=-1)(_Worker)
        self.workers = [actor.remote(worker_spec(spec, cpus_per_worker)) for _ in range(workers)]
        self.in_flight = [0] * workers
        self.spec = spec
        try:
            self._info = ray.get(self.workers[0].info.remote())
            self.nodes = ray.get([w.node.remote() for w in self.workers])
        except Exception as exc:  # noqa: BLE001 - the load failed inside the actor
            self.close()
            cause = getattr(exc, "cause", None) or exc
            raise EngineError(f"the Ray workers could not load {spec.model!r}: {getattr(cause, 'message', cause)}") from exc
        self.capabilities = self._capabilities()  # type: ignore[misc]

    def _capabilities(self) -> Any:
        from vlmlab.engines import ENGINES

        inner = ENGINES.get(self.spec.engine).capabilities
        return dataclasses.replace(inner, max_images=self._info.max_images)

    @classmethod
    def load(cls, spec: EngineSpec) -> RayEnginePool:
        extra = spec.extra
        return cls(spec, int(extra.get("ray_workers", 2)), extra.get("ray_address"))

    async def _on(self, index: int, method: str, *args: Any) -> Any:
        self.in_flight[index] += 1
        try:
            return await getattr(self.workers[index], method).remote(*args)
        except _ray().exceptions.RayTaskError as exc:  # the caller sees the worker's own exception
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from exc
        finally:
            self.in_flight[index] -= 1

    def put(self, value: Any) -> list[Any]:
        """``value`` in Ray's object store, as a one-element list holding its reference: passed to
        :meth:`call` that way, the reference itself reaches the worker, which fetches the value
        (``await box[0]``) only when it does not hold it yet."""
        return [_ray().put(value)]

    def _least_busy(self) -> int:
        return min(range(len(self.workers)), key=self.in_flight.__getitem__)

    async def call(self, task: Callable[..., Any], *args: Any) -> Any:
        """``task(engine, scratch, *args)`` on the worker with the fewest calls in flight; its result.

        ``task`` must reach the workers: a module-level function of an installed module (sent
        by reference), or one cloudpickle sends by value (a lambda, a function of ``__main__``). A worker that dies mid-call is restarted and the call sent again, so ``task``
        must give the same result when run twice. Exceptions raised by ``task`` reach the caller
        as they were raised (Ray's wrapper removed), and are not retried.
        """
        return await self._on(self._least_busy(), "run", task, *args)

    async def call_each(self, task: Callable[..., Any], *args: Any) -> list[Any]:
        """``task(engine, scratch, *args)`` once on every worker, in worker order (see :meth:`call`)."""
        return await asyncio.gather(*(self._on(i, "run", task, *args) for i in range(len(self.workers))))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        result = await self._on(self._least_busy(), "complete", request)
        if result.text:
            yield GenerationChunk(result.text, result.completion_tokens)
        yield result

    def count_prompt_tokens(self, chat: Chat, processor_options: Mapping[str, Any] | None = None) -> PromptCount:
        return _ray().get(self.workers[0].count.remote(chat, processor_options))

    def info(self) -> EngineInfo:
        return self._info

    def cluster(self) -> dict[str, Any]:
        """What ``summary.json`` records: workers, the nodes they run on, the cluster's resources."""
        ray = _ray()
        return {
            "workers": len(self.workers),
            "worker_nodes": len(set(self.nodes)),
            "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
            "resources": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        }

    def close(self) -> None:
        ray = _ray()
        for worker in getattr(self, "workers", ()):
            ray.kill(worker, no_restart=True)
        self.workers = []
