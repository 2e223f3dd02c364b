"""``vlmlab serve --ray``: the model's replicas as a Ray Serve application, behind one endpoint.

Two parts, both Ray Serve's own machinery (no scheduler or worker pool of vlmlab's):

- :class:`Replica`, a Ray Serve deployment: one whole vlmlab server (engine chains, caches,
  :func:`vlmlab.server.app.create_app`) per replica. A request reaches it as the HTTP request
  (method, path, headers, body) and runs through that app in-process, so every route, limit and
  error is exactly plain ``vlmlab serve``'s.
- The front (:class:`Front`): takes the HTTP request, reads the image keys from the chat body
  and hands the request to a replica through a deployment handle whose request router is
  :class:`vlmlab.server.ray_router.ImageAffinityRouter`. ``/stats``, ``/metrics`` and
  ``/health`` ask every replica and merge the answers (a ``replica`` label on each metric).
  A replica that dies before it answered has its request sent again to another one; one that
  dies mid-stream ends that stream with an error event.

``vlmlab serve --ray`` runs the front in its own process under uvicorn (one Ray hop per
request); :func:`build` makes the same front a Ray Serve ingress deployment instead, for
``serve run`` and KubeRay's ``RayService`` (Ray's HTTP proxy in front of it, one more hop).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from vlmlab.config import RaySettings, ServerSettings, server_settings
from vlmlab.protocol.errors import ConfigError, EngineUnavailableError, VlmlabError

logger = logging.getLogger(__name__)

APP_NAME = "vlmlab"
REPLICA_HEADER = "x-vlmlab-replica"
# Routes whose body names images (the rest carry none worth routing on).
IMAGE_ROUTES = ("/v1/chat/completions", "/tokenize", "/views")
# A replica that dies before answering: the request is sent this many more times.
RETRIES = 2
# After a stream's first token, its chunks leave a replica at most this often, together.
STREAM_INTERVAL_S = 0.005
# Whether start() started a local cluster (stop() then leaves the application to it).
STARTED_LOCAL = False


def ray_modules() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ConfigError("--ray needs Ray Serve: pip install 'vlmlab[ray]'") from exc
    return ray, serve


# -- the replica ------------------------------------------------------------------------------


class Replica:
    """One vlmlab server inside one Ray Serve replica (see the module docstring)."""

    def __init__(self, settings: ServerSettings):
        from ray import serve

        from vlmlab.server.app import create_app
        from vlmlab.server.engines import EngineChain

        chains = [EngineChain(m.engines, m.engine_failures_before_fallback) for m in settings.each_model()]
        for chain in chains:
            chain.start()
        self.app = create_app(settings, chains[0], chains[1:])
        self.lifespan: Any = None
        self.started = asyncio.Lock()
        self.id = serve.get_replica_context().replica_id.unique_id

    async def _start(self) -> None:
        async with self.started:
            if self.lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self.lifespan = lifespan

    async def http(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
        images: tuple[str, ...] = (), replica: str | None = None,
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """The request through this replica's app: first ``{"status", "headers", "body",
        "ended"}`` (the body sent so far, and whether that is all of it), then the rest of the body as the app sends it (an SSE stream
        chunk by chunk). ``images`` and ``replica`` are for the router."""
        await self._start()
        sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        delivered = False
        disconnected = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await sent.put(message)

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
        }  # fmt: skip
        task = asyncio.create_task(self.app(scope, receive, send))
        loop = asyncio.get_running_loop()
        sent_items, last = 0, 0.0
        try:
            while True:
                messages = await next_messages(sent, task, None)
                if not messages:  # the app ended without a further message
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    return
                while all(m["type"] == "http.response.start" for m in messages):
                    more = await next_messages(sent, task, None)  # the start travels with the first chunk
                    if not more:
                        break
                    messages += more
                # Everything the app has sent by now goes as one item, and after a stream's
                # first two (its role and first token) at most one item per STREAM_INTERVAL_S:
                # each item is a Ray message, dearer than a token.
                while sent_items >= 2 and not ends(messages):
                    wait = last + STREAM_INTERVAL_S - loop.time()
                    more = await next_messages(sent, task, wait) if wait > 0 else []
                    if not more:
                        break
                    messages += more
                start: dict[str, Any] | None = None
                chunks: list[bytes] = []
                for message in messages:
                    if message["type"] == "http.response.start":
                        extra = [(REPLICA_HEADER.encode(), self.id.encode())]
                        start = {"status": message["status"], "headers": [*message.get("headers", []), *extra]}
                    elif message["type"] == "http.response.body":
                        chunks.append(bytes(message.get("body", b"")))
                ended = ends(messages)
                if start is not None:
                    yield {**start, "body": b"".join(chunks), "ended": ended}
                elif any(chunks):
                    yield b"".join(chunks)
                    sent_items += 1
                last = loop.time()
                if ended:
                    return
        finally:
            disconnected.set()  # the caller went away (or the response ended): the app stops
            if not task.done():
                task.cancel()

    async def whole(
        self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
        images: tuple[str, ...] = (), replica: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`http` for an answer that does not stream: ``{"status", "headers", "body"}``."""
        answer: dict[str, Any] = {}
        rest: list[bytes] = []
        async for item in self.http(method, path, query, headers, body):
            if isinstance(item, dict):
                answer = item
            else:
                rest.append(item)
        return {**answer, "body": answer.get("body", b"") + b"".join(rest)}

    def replica_id(self, replica: str | None = None) -> str:
        """This replica's id (``replica``: the router's, to ask one replica by id)."""
        return self.id

    def pid(self, replica: str | None = None) -> int:
        return os.getpid()

    async def __del__(self) -> None:  # Ray Serve calls an async __del__ when a replica stops
        if self.lifespan is not None:
            await self.lifespan.__aexit__(None, None, None)


def ends(messages: list[dict[str, Any]]) -> bool:
    """Whether ``messages`` hold the last of a response."""
    return any(m["type"] == "http.response.body" and not m.get("more_body", False) for m in messages)


async def next_messages(sent: asyncio.Queue[dict[str, Any]], app: asyncio.Task[Any], timeout: float | None) -> list[dict[str, Any]]:
    """The ASGI messages the app has sent: at least one, waiting up to ``timeout`` (none: until
    one comes or the app ends); empty when the app ended or the time ran out first."""
    if sent.empty() and not app.done():
        getter = asyncio.ensure_future(sent.get())
        await asyncio.wait({getter, app}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()  # nothing runs between the wait and this: no message is lost
        elif not getter.cancelled():
            return [getter.result(), *drain(sent)]
    return drain(sent)


def drain(sent: asyncio.Queue[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    while not sent.empty():
        out.append(sent.get_nowait())
    return out


# -- the front --------------------------------------------------------------------------------


def read_body(path: str, body: bytes) -> tuple[tuple[str, ...], bool]:
    """Keys of the images a chat body names (a hash of each URL or data URL, in order), and
    whether its answer streams; no keys for other routes or a body that is not a chat request
    (the replica answers why)."""
    if path not in IMAGE_ROUTES or not body:
        return (), False
    try:
        parsed = json.loads(body)
        messages, streams = parsed.get("messages"), parsed.get("stream") is True
    except (ValueError, AttributeError):
        return (), False
    keys: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str):
                keys.append(hashlib.blake2b(url.encode(), digest_size=12).hexdigest())
    return tuple(keys), streams


class Front:
    """The endpoint: hands each request to a replica (see the module docstring)."""

    def __init__(self, handle: Any, app_name: str = APP_NAME):
        self.handle = handle.options(stream=True)
        self.calls = handle
        self.app_name = app_name

    def router(self) -> Any:
        from vlmlab.server.ray_router import ROUTERS

        return ROUTERS.get(self.app_name)

    async def replica_ids(self) -> list[str]:
        """The live replicas (the router learns them from the first call through the handle)."""
        router = self.router()
        if router is None or not router.replica_ids():
            await self.calls.replica_id.remote()
            router = self.router()
        return router.replica_ids() if router is not None else []

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if request.method == "GET" and path in ("/stats", "/metrics", "/health"):
            return await self.fan_out(request, path)
        body = await request.body()
        call = (request.method, path, request.url.query.encode(), list(request.headers.raw), body)
        keys, streams = read_body(path, body)
        if streams:
            return await self.forward_stream(call, keys)
        return await self.forward(call, keys)

    async def forward(self, call: tuple[Any, ...], keys: tuple[str, ...], replica: str | None = None) -> Response:
        """A request whose answer does not stream: one Ray call, sent again to another
        replica if the one answering dies."""
        import ray

        for attempt in range(RETRIES + 1):
            try:
                answer = await self.calls.whole.remote(*call, images=keys, replica=replica)
            except ray.exceptions.RayError as exc:
                if replica is not None or attempt == RETRIES:
                    return replica_failed(exc)
                logger.warning("a replica failed before answering (%s); sending the request to another", type(exc).__name__)
                continue
            return Response(answer["body"], status_code=answer["status"], headers=relayed_headers(answer["headers"]))
        raise AssertionError("unreachable")

    async def forward_stream(self, call: tuple[Any, ...], keys: tuple[str, ...]) -> Response:
        """A streamed answer: relayed as the replica sends it; sent again to another replica
        if the one answering dies before its first message."""
        import ray

        for attempt in range(RETRIES + 1):
            stream = self.handle.http.remote(*call, images=keys)
            try:
                start = await stream.__anext__()
            except StopAsyncIteration:
                return unavailable("the replica ended the request without an answer")
            except ray.exceptions.RayError as exc:
                if attempt == RETRIES:
                    return replica_failed(exc)
                logger.warning("a replica failed before answering (%s); sending the request to another", type(exc).__name__)
                continue
            headers = relayed_headers(start["headers"])
            sse = headers.get("content-type", "").startswith("text/event-stream")
            if start["ended"]:  # the whole answer came with its start (not streamed)
                return Response(start["body"], status_code=start["status"], headers=headers)
            return StreamingResponse(relay(start["body"], stream, sse), status_code=start["status"], headers=headers)
        raise AssertionError("unreachable")

    async def fan_out(self, request: Request, path: str) -> Response:
        """``/stats``, ``/metrics`` and ``/health`` from every replica, merged."""
        ids = await self.replica_ids()
        call = ("GET", path, request.url.query.encode(), list(request.headers.raw), b"")

        async def ask(replica: str) -> tuple[int, bytes]:
            response = await self.forward(call, (), replica=replica)
            return response.status_code, bytes(response.body)

        answers = dict(zip(ids, await asyncio.gather(*(ask(r) for r in ids)), strict=True))
        failed = {r: status for r, (status, _) in answers.items() if status != 200}
        if path == "/health":
            report = {r: (json.loads(body) if body.startswith(b"{") else {"status": status}) for r, (status, body) in answers.items()}
            ok = any(status == 200 for status, _ in answers.values())
            return JSONResponse({"status": "ok" if ok else "unhealthy", "replicas": report}, status_code=200 if ok else 503)
        if failed and len(failed) == len(answers):  # 401 for a missing key, say: the first's answer
            status, body = next(iter(answers.values()))
            return Response(body, status_code=status, media_type="application/json")
        good = {r: body for r, (status, body) in answers.items() if status == 200}
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            return Response(merge_metrics({r: b.decode() for r, b in good.items()}), media_type=CONTENT_TYPE_LATEST)
        router = self.router()
        merged = merge_stats({r: json.loads(b) for r, b in good.items()})
        merged["routing"] = router.figures() if router is not None else None
        merged["replicas_failed"] = failed
        return JSONResponse(merged)


async def relay(first: bytes, stream: Any, sse: bool) -> AsyncIterator[bytes]:
    """The body chunks of a replica's answer (``first``: what came with its start); if the
    replica dies mid-stream, an SSE stream ends with an error event (a plain body just ends)."""
    import ray

    if first:
        yield first
    try:
        async for chunk in stream:
            yield chunk
    except ray.exceptions.RayError as exc:
        logger.warning("a replica failed mid-answer (%s)", type(exc).__name__)
        if sse:
            error = EngineUnavailableError(f"the replica answering this stream failed ({type(exc).__name__}); retry the request")
            yield f"data: {json.dumps(error.to_openai())}\n\n".encode()


def relayed_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """A replica's response headers for the front's response (its content-length is set again
    from what the front sends)."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
    headers.pop("content-length", None)
    return headers


def replica_failed(exc: Exception) -> JSONResponse:
    return unavailable(f"the replica answering this request failed ({type(exc).__name__}); retry the request")


def unavailable(message: str) -> JSONResponse:
    error: VlmlabError = EngineUnavailableError(message)
    return JSONResponse(error.to_openai(), status_code=error.status_code)


# -- merging the replicas' figures ------------------------------------------------------------

CACHE_FIELDS = ("queries", "hits", "entries", "size", "budget", "evictions")


def merge_stats(per_replica: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """One ``/stats`` for all replicas: counts and caches summed, health all-of, the first
    replica's description (model, engine, device); each replica's own report under
    ``replicas`` (latency percentiles do not add up, so they are only there)."""
    reports = list(per_replica.values())
    if not reports:
        return {"replicas": {}}
    first = reports[0]
    merged: dict[str, Any] = {k: first.get(k) for k in ("model", "engine", "engine_model", "device")}
    merged["healthy"] = all(r.get("healthy") for r in reports)
    for key in ("requests_active", "requests_in_engine"):
        merged[key] = sum(r.get(key) or 0 for r in reports)
    for cache in ("preprocess_cache", "encoder_cache", "response_cache"):
        parts = [r[cache] for r in reports if r.get(cache)]
        if parts:
            summed = {f: sum(p.get(f, 0) for p in parts) for f in CACHE_FIELDS}
            summed["hit_rate"] = round(summed["hits"] / summed["queries"], 4) if summed["queries"] else 0.0
            merged[cache] = summed
    totals: dict[str, float] = {}
    for report in reports:
        for key, value in (report.get("totals") or {}).items():
            totals[key] = totals.get(key, 0) + value
    merged["totals"] = totals
    rates = {}
    for kind, label in (("mm", "preprocess"), ("response", "response")):
        queries = totals.get(f"{kind}_cache_queries", 0)
        rates[label] = totals.get(f"{kind}_cache_hits", 0) / queries if queries else None
    merged["cache_hit_rate"] = rates
    merged["replicas"] = dict(per_replica)
    return merged


def merge_metrics(per_replica: Mapping[str, str]) -> bytes:
    """One Prometheus exposition for all replicas: every sample with a ``replica`` label."""
    from prometheus_client.core import Metric
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for replica, text in per_replica.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                merged.samples.append(Sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar))

    class Merged:
        def collect(self) -> Any:
            return iter(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())  # type: ignore[arg-type]
    return generate_latest(registry)


# -- deploying --------------------------------------------------------------------------------


def replica_options(settings: ServerSettings) -> dict[str, Any]:
    """What the replicas' Ray Serve deployment is given: resources, a fixed count or
    autoscaling bounds, and the router, from ``settings.ray``."""
    ray_settings = settings.ray or RaySettings()
    scaling: dict[str, Any] = {"num_replicas": ray_settings.replicas}
    if ray_settings.max_replicas is not None:
        scaling = {"autoscaling_config": {
            "min_replicas": ray_settings.min_replicas,
            "max_replicas": ray_settings.max_replicas,
            "target_ongoing_requests": ray_settings.target_ongoing_requests,
        }}  # fmt: skip
    return {
        "name": "Replica",
        "ray_actor_options": {"num_cpus": ray_settings.num_cpus, "num_gpus": ray_settings.num_gpus},
        "max_ongoing_requests": ray_settings.max_ongoing_requests,
        "request_router_config": {
            "request_router_class": "vlmlab.server.ray_router:ImageAffinityRouter",
            "request_router_kwargs": {"mode": ray_settings.router, "imbalance": ray_settings.affinity_imbalance},
        },
        # A dead replica is found by its actor's death at once; a hung one by these checks.
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        **scaling,
    }


def replica_settings(settings: ServerSettings) -> ServerSettings:
    """``settings`` as a replica with ``ray.num_cpus`` CPUs loads them (a one-CPU hf replica
    decodes without the prefill thread meant for a second core: ``worker_spec``)."""
    from dataclasses import replace

    from vlmlab.engines.ray_pool import worker_spec

    cpus = (settings.ray or RaySettings()).num_cpus
    engines = tuple(worker_spec(spec, cpus) for spec in settings.engines)
    models = tuple(replace(m, engines=tuple(worker_spec(spec, cpus) for spec in m.engines)) for m in settings.models)
    return replace(settings, engines=engines, models=models)


def replica_deployment(settings: ServerSettings) -> Any:
    """The replicas' deployment (:func:`replica_options`), bound to ``settings``."""
    _, serve = ray_modules()
    from ray.serve.config import RequestRouterConfig

    options = replica_options(settings)
    options["request_router_config"] = RequestRouterConfig(**options["request_router_config"])
    return serve.deployment(Replica, **options).bind(replica_settings(settings))


class FrontDeployment:
    """The front as a Ray Serve ingress deployment (:func:`build`): Ray's HTTP proxy calls it
    with each request."""

    def __init__(self, replicas: Any):
        self.front = Front(replicas)

    async def __call__(self, request: Request) -> Response:
        return await self.front(request)


def build(args: Mapping[str, Any]) -> Any:
    """The Ray Serve application for ``serve run vlmlab.server.ray_serve:build`` and KubeRay:
    ``args`` is a vlmlab config (``model``, ``engine``, ..., ``ray: {replicas, num_gpus, ...}``)."""
    _, serve = ray_modules()
    settings = server_settings(dict(args))
    settings = settings if settings.ray else server_settings({**args, "ray": {}})
    front = serve.deployment(FrontDeployment, name="Front", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return front.bind(replica_deployment(settings))


def start(settings: ServerSettings, app_name: str = APP_NAME) -> Front:
    """Deploy ``settings``' replicas on the Ray cluster (``settings.ray.address``; none: a new
    local one) as the application ``app_name`` and return the front that serves them from this
    process (``vlmlab serve --ray`` names it after its port, so several can share a cluster)."""
    global STARTED_LOCAL
    from vlmlab.engines.ray_pool import connect

    _, serve = ray_modules()
    address = (settings.ray or RaySettings()).address
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its start-up lines are not vlmlab's
    if connect(address):
        STARTED_LOCAL = address is None
    # No Ray HTTP proxy: this process's uvicorn is the endpoint.
    serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
    handle = serve.run(replica_deployment(settings), name=app_name, route_prefix=None, blocking=False)
    return Front(handle, app_name)


def front_app(front: Front, settings: ServerSettings) -> Any:
    """The ASGI app of ``vlmlab serve --ray``: every path to :class:`Front`, behind the same
    key and body-size checks as plain ``serve`` (the replica checks them again)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    from vlmlab.server.guard import RequestGuard

    async def endpoint(request: Request) -> Response:
        return await front(request)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)])
    app.add_middleware(RequestGuard, settings=settings)
    return app


def stop(app_name: str = APP_NAME) -> None:
    """Remove the application from a cluster given by address and disconnect (a local
    cluster, started by :func:`start`, stops with this process's Ray)."""
    ray, serve = ray_modules()
    if not ray.is_initialized():
        return
    try:
        if not STARTED_LOCAL:
            serve.delete(app_name)
    finally:
        ray.shutdown()
