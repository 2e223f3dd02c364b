"""The engine fallback chain: ``--engine vllm,hf`` tries each in order at start-up, and hands
over to the next when the serving engine dies or keeps failing at run time.

Fault isolation: a request that raises does not by itself count against the engine. The chain
first probes the engine (a one-token text generation); only when the probe fails too is the
failure the engine's, and ``failures_before_fallback`` such failures in a row hand over. A
request that fails while the engine still answers the probe failed on its own input."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vlmlab.config import EngineSpec
from vlmlab.engines import Engine, GenerationRequest, complete, load_engine
from vlmlab.protocol.core import Chat, SamplingParams
from vlmlab.protocol.errors import EngineUnavailableError, VlmlabError

logger = logging.getLogger(__name__)


@dataclass
class ChainState:
    index: int = -1
    consecutive_failures: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # why each earlier engine is not serving


class EngineChain:
    """Owns the serving engine and the ones behind it."""

    def __init__(
        self,
        specs: Sequence[EngineSpec],
        failures_before_fallback: int = 3,
        loader: Callable[[EngineSpec], Engine] = load_engine,
        probe_timeout_s: float = 60.0,
    ):
        self.specs = list(specs)
        self.failures_before_fallback = failures_before_fallback
        self.loader = loader
        self.state = ChainState()
        self.engine: Engine | None = None
        self._switching = asyncio.Lock()
        self._probing = asyncio.Lock()
        self._last_probe: tuple[float, Engine, bool, str] | None = None
        self.probe_timeout_s = probe_timeout_s
        self.on_fallback: Callable[[], None] | None = None

    @property
    def spec(self) -> EngineSpec:
        return self.specs[self.state.index]

    def start(self, first: int = 0) -> Engine:
        """Load the first engine at or after ``first`` that loads; log why the others did not.

        Raises:
            EngineUnavailableError: none of the engines could be loaded (with every reason).
            VlmlabError: the only engine could not be loaded (its own error).
        """
        for index in range(first, len(self.specs)):
            spec = self.specs[index]
            try:
                engine = self.loader(spec)
            except Exception as exc:  # noqa: BLE001 - any load failure moves to the next engine
                reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                self.state.skipped.append({"engine": spec.engine, "model": spec.model, "reason": reason})
                if len(self.specs) == 1 and isinstance(exc, VlmlabError):
                    raise  # no chain: the reason itself, said once
                continue
            # Said when another engine serves; when none does, the error below says it all, once.
            for skipped in self.state.skipped[len(self.state.skipped) - (index - first):]:
                logger.warning("engine %s for %s not used: %s", skipped["engine"], skipped["model"], skipped["reason"])
            self.engine, self.state.index, self.state.consecutive_failures = engine, index, 0
            logger.info("serving %s with engine %s", spec.model, spec.engine)
            return engine
        reasons = "; ".join(f"{s['engine']}: {s['reason']}" for s in self.state.skipped[-len(self.specs):])
        raise EngineUnavailableError(f"no engine could serve the model ({reasons})")

    def current(self) -> Engine:
        if self.engine is None:
            raise EngineUnavailableError("no engine is serving (all failed); restart the server")
        return self.engine

    def record_success(self) -> None:
        self.state.consecutive_failures = 0

    async def probe(self, engine: Engine) -> tuple[bool, str]:
        """Whether ``engine`` still serves: alive, and a one-token greedy text generation ends.

        Concurrent callers share one probe; a result younger than a second is reused."""
        async with self._probing:
            last = self._last_probe
            if last is not None and last[1] is engine and time.monotonic() - last[0] < 1.0:
                return last[2], last[3]
            healthy, why = engine.health()
            if healthy:
                request = GenerationRequest(Chat.single("ping"), SamplingParams(max_tokens=1, temperature=0.0))
                try:
                    await asyncio.wait_for(complete(engine, request), self.probe_timeout_s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure of the probe is the answer
                    healthy, why = False, f"a probe request failed too: {type(exc).__name__}: {exc}"
            self._last_probe = (time.monotonic(), engine, healthy, why)
            return healthy, why

    async def record_failure(self, engine: Engine, error: BaseException) -> bool:
        """A request on ``engine`` failed: probe it, and count the failure only if the probe fails
        too; hand over after ``failures_before_fallback`` of those in a row (at once when the
        engine reports itself dead). Returns True when the engine still serves, i.e. the failure
        was the request's own."""
        if engine is not self.engine:
            return False  # a failure of an engine that was already replaced
        healthy, why = await self.probe(engine)
        if healthy:
            logger.warning("a request failed (%s: %s) but the engine answers a probe: not counted", type(error).__name__, error)
            return True
        if engine is not self.engine:
            return False
        self.state.consecutive_failures += 1
        alive, _ = engine.health()
        if alive and self.state.consecutive_failures < self.failures_before_fallback:
            return False
        reason = f"{self.state.consecutive_failures} consecutive failures, last: {error}; {why}"
        await self.fall_back(engine, reason)
        return False

    async def fall_back(self, engine: Engine, reason: str) -> None:
        async with self._switching:
            if engine is not self.engine:
                return
            spec = self.spec
            logger.error("engine %s failed at run time (%s); handing over", spec.engine, reason)
            self.state.skipped.append({"engine": spec.engine, "model": spec.model, "reason": reason})
            self.engine = None
            await asyncio.get_running_loop().run_in_executor(None, engine.close)
            if self.on_fallback:
                self.on_fallback()
            try:
                await asyncio.get_running_loop().run_in_executor(None, self.start, self.state.index + 1)
            except EngineUnavailableError:
                logger.error("no engine left to take over")

    def health(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "no engine is serving"
        return self.engine.health()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
