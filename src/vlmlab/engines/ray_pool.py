"""An engine made of Ray actors: N copies of one engine, on the machines of a Ray cluster.

:class:`RayEnginePool` has the engine interface, so the evaluation runner (and anything else
that drives an engine) uses it unchanged: its requests go to the actor with the fewest in flight,
each actor batches what it holds, results come back to the caller, which alone writes them.

A worker that dies (its process killed, its node lost) is restarted by Ray, and the requests it
held are sent again (``max_restarts`` / ``max_task_retries``): a generation is a pure function of
its request at temperature 0 or with a seed, so a retry gives the same answer and the caller sees
each request answered exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from vlmlab.config import EngineSpec
from vlmlab.engines.base import Engine, EngineInfo, GenerationRequest, PromptCount
from vlmlab.protocol.core import Chat, GenerationChunk, GenerationResult
from vlmlab.protocol.errors import ConfigError, EngineError


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("--ray needs Ray: pip install 'vlmlab[ray]'") from exc
    return ray


class _Worker:
    """One engine in one Ray actor (an async actor: the requests it holds are decoded together)."""

    def __init__(self, spec: EngineSpec):
        from vlmlab.engines import load_engine

        self.engine = load_engine(spec)

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


class RayEnginePool(Engine):
    """``workers`` copies of ``spec``'s engine as Ray actors (see the module docstring)."""

    name = "ray"

    def __init__(self, spec: EngineSpec, workers: int, address: str | None = None, cpus_per_worker: float = 1.0):
        ray = _ray()
        if workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {workers}")
        if not ray.is_initialized():
            # Ray's own start-up lines stay out of vlmlab's output; its warnings do not.
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
        actor = ray.remote(num_cpus=cpus_per_worker, max_restarts=-1, max_task_retries=-1)(_Worker)
        self.workers = [actor.remote(spec) for _ in range(workers)]
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
        import dataclasses

        from vlmlab.engines import ENGINES

        inner = ENGINES.get(self.spec.engine).capabilities
        return dataclasses.replace(inner, max_images=self._info.max_images)

    @classmethod
    def load(cls, spec: EngineSpec) -> RayEnginePool:
        extra = spec.extra
        return cls(spec, int(extra.get("ray_workers", 2)), extra.get("ray_address"))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        index = min(range(len(self.workers)), key=self.in_flight.__getitem__)
        self.in_flight[index] += 1
        try:
            result = await self.workers[index].complete.remote(request)
        finally:
            self.in_flight[index] -= 1
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
