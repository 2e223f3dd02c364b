"""The FastAPI app: thin routes over :class:`ChatService`, one error mapping, SSE streaming.

``create_app(settings)`` builds everything (engines load in the app's lifespan); the loaded
model lives in ``app.state``, never in module globals, so tests can run several servers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmlab.config import ServerSettings
from vlmlab.protocol.core import GenerationChunk, GenerationResult
from vlmlab.protocol.errors import (
    AuthenticationError,
    BadRequestError,
    EngineError,
    EngineUnavailableError,
    NotFoundError,
    OverloadedError,
    VlmlabError,
)
from vlmlab.protocol.openai import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    DeltaMessage,
    FunctionCallOut,
    ModelCard,
    ModelList,
    TimingsOut,
    ToolCallDelta,
    Usage,
    new_completion_id,
)
from vlmlab.server.docs import docs_page
from vlmlab.server.views import image_views
from vlmlab.server.engines import EngineChain
from vlmlab.server.guard import KEY_HELP, RequestGuard, key_is_valid
from vlmlab.server.playground import add_playground
from vlmlab.server.service import ChatService

logger = logging.getLogger(__name__)


def error_response(exc: VlmlabError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, OverloadedError) else None
    return JSONResponse(exc.to_openai(), status_code=exc.status_code, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one readable sentence, and the field it concerns."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{location or 'body'}: {first.get('msg', 'invalid value')}", location or None


def service_of(request: Request, model: str | None = None) -> ChatService:
    """The service of the served model ``model`` names (its id, or the checkpoint it serves);
    the first model when ``model`` is empty.

    Raises:
        NotFoundError: no served model has that name (404, naming the served ones).
    """
    services: dict[str, ChatService] | None = getattr(request.app.state, "services", None)
    if not services:
        raise EngineUnavailableError("the server is still starting")
    if not model:
        return next(iter(services.values()))
    found = services.get(model)
    if found is None:  # the checkpoint a served name stands for (nano's path, a hub id)
        found = next((s for s in services.values() if s.chain.engine is not None and s.chain.current().info().model == model), None)
    if found is None:
        served = ", ".join(repr(name) for name in services)
        raise NotFoundError(f"The model {model!r} does not exist; this server serves {served}", param="model")
    return found


async def require_api_key(request: Request) -> None:  # async: no thread-pool hop per request
    """The key check of the routes themselves (RequestGuard makes it before the body is read;
    this one documents the security scheme and guards a route the middleware might miss)."""
    expected: str | None = request.app.state.settings.api_key
    if expected and not key_is_valid(request.headers.get("authorization", ""), expected):
        raise AuthenticationError(KEY_HELP)


def create_app(settings: ServerSettings, chain: EngineChain | None = None, more: Sequence[EngineChain] = ()) -> FastAPI:
    """The server for ``settings``; engines not yet loaded (``chain`` for the first model,
    ``more`` for ``settings.models``) load when the app starts (lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        each = settings.each_model()
        given = [chain, *more]
        services: dict[str, ChatService] = {}
        try:
            for index, model_settings in enumerate(each):
                engines = given[index] if index < len(given) and given[index] is not None else None
                engines = engines or EngineChain(model_settings.engines, model_settings.engine_failures_before_fallback)
                if engines.engine is None:
                    await asyncio.get_running_loop().run_in_executor(None, engines.start)
                first = next(iter(services.values()), None)
                services[model_settings.model_name] = ChatService(model_settings, engines, first.metrics if first else None)
            app.state.services = services
            app.state.service = next(iter(services.values()))  # the first model's (tests, docs)
            yield
        finally:
            for service in services.values():
                service.close()

    # FastAPI's /docs and /redoc load their scripts from a CDN (a blank page offline): /docs is
    # vlmlab's own page instead (vlmlab.server.docs).
    app = FastAPI(title="vlmlab", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.add_middleware(RequestGuard, settings=settings)
    auth = [Depends(require_api_key)]
    stats_auth = auth if settings.auth_stats else []

    @app.exception_handler(VlmlabError)
    async def on_vlmlab_error(request: Request, exc: VlmlabError) -> JSONResponse:
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.observe_error(exc.status_code)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return await on_vlmlab_error(request, BadRequestError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFoundError(f"no route {request.method} {request.url.path}"))
        error = VlmlabError(str(exc.detail))
        error.status_code = exc.status_code  # type: ignore[misc]
        error.error_type = "BadRequestError" if exc.status_code < 500 else "InternalServerError"  # type: ignore[misc]
        response = error_response(error)
        response.headers.update(exc.headers or {})  # 405's Allow, for one
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return await on_vlmlab_error(request, VlmlabError(f"internal error: {type(exc).__name__}"))

    @app.post(
        "/v1/chat/completions",
        dependencies=auth,
        response_model=None,
        responses={200: {"description": "The completion, or with stream=true its SSE stream", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionResponse"}},
            "text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": {
                "type": "string", "description": "a chat.completion.chunk as JSON, an error object, or [DONE] last"}}}},
        }}},
    )  # fmt: skip
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        received = getattr(request.state, "received", None)
        http_s = None if received is None else time.perf_counter() - received  # receive + JSON + validation
        service = service_of(request, body.model)
        items = service.choices(body)
        if not body.stream:
            return await respond(request, service, items, body.n or 1)
        first = await anext(items)  # errors before any output become plain HTTP errors
        return StreamingResponse(sse(body, service, first, items, http_s), media_type="text/event-stream")

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        count, max_model_len = await service_of(request, body.model).tokenize(body)
        return {
            "count": count.prompt_tokens,
            "prompt_tokens": count.prompt_tokens,
            "image_tokens": count.image_tokens,
            "per_image_tokens": list(count.per_image),
            "max_model_len": max_model_len,
        }

    @app.post("/views", dependencies=auth)
    async def views(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
        """What the model sees of each image: the processor's size and grid, views, tokens and a
        preview (vlmlab.server.views)."""
        return await image_views(service_of(request, body.model), body)

    @app.get("/v1/models", dependencies=auth)
    async def models(request: Request) -> dict[str, Any]:
        service_of(request)  # started
        cards = []
        for name, service in request.app.state.services.items():
            engine = service.chain.current()
            info = engine.info()
            cards.append(ModelCard(
                id=name,
                root=info.model,
                max_model_len=info.max_model_len,
                max_images=service.max_images(),
                engine=info.engine,
                family=info.family,
                supported_features=sorted(engine.capabilities.features),
                processor_options=processor_options(info.family, service.settings.engines[0].processor_options),
            ))  # fmt: skip
        return ModelList(data=cards).model_dump()

    @app.get("/health")
    async def health(request: Request) -> Response:
        services = getattr(request.app.state, "services", None)
        if not services:
            return JSONResponse({"status": "starting"}, status_code=503)
        for name, service in services.items():
            ok, why = service.chain.health()
            if not ok:
                reason = why if len(services) == 1 else f"{name}: {why}"
                return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/stats", dependencies=stats_auth)
    async def stats(request: Request) -> dict[str, Any]:
        """The first model's figures at the top (as with one model); with several, every
        model's under ``models``."""
        first = service_of(request)
        services = request.app.state.services
        report = first.stats()
        if len(services) > 1:
            report["models"] = {name: service.stats() for name, service in services.items()}
        return report

    @app.get("/metrics", dependencies=stats_auth)
    async def metrics(request: Request) -> Response:
        first = service_of(request)
        for service in request.app.state.services.values():  # one registry, a label per model
            service.metrics.running.labels(service.metrics.model_name).set(service.in_engine)
            service.metrics.waiting.labels(service.metrics.model_name).set(max(0, service.active - service.in_engine))
        return Response(first.metrics.export(), media_type=CONTENT_TYPE_LATEST)

    add_playground(app)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return app


def processor_options(family_name: str | None, configured: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The family's processor options for ``/v1/models``, defaults as the model is served."""
    if not family_name:
        return []
    from vlmlab.families import get_family

    family = get_family(family_name)
    defaults = {**family.default_options, **configured}
    return [
        {"name": o.name, "default": defaults.get(o.name, o.default), "kind": o.kind.__name__, "help": o.help,
         **({"choices": list(o.choices)} if o.choices else {}), **({"minimum": o.minimum} if o.minimum is not None else {})}
        for o in family.options
    ]  # fmt: skip


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, corrected to what the server does: a body that fails validation is a
    400 in OpenAI's error shape (FastAPI documents 422), and every route may answer with that
    error object."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorResponse"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["integer", "string", "null"]},
        }}},
    }  # fmt: skip
    # pydantic's own schemas: FastAPI's OpenAPI model turns integer bounds into floats, and
    # 2**63 - 1 (the seed's maximum) does not survive that.
    for model in (ChatCompletionRequest, ChatCompletionResponse):
        exact = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in exact.pop("$defs", {}).items():
            components[name] = definition
        components[model.__name__] = exact
    error = {"description": "An error in OpenAI's shape", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for methods in schema.get("paths", {}).values():
        for operation in methods.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in ("400", "401", "404", "413", "429", "500", "503", "504"):
                responses.setdefault(status, error)
    metrics = schema.get("paths", {}).get("/metrics", {}).get("get")
    if metrics:  # Prometheus' text format, not JSON
        metrics["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    app.openapi_schema = schema
    return schema


async def respond(request: Request, service: ChatService, items: AsyncIterator[Any], n: int = 1) -> Response:
    """Drain the generations (which, not streamed, may yield their results alone); cancel them
    when the client disconnects before the answer. Their errors become plain HTTP errors."""

    async def drain() -> list[GenerationResult]:
        results: dict[int, GenerationResult] = {}
        async for index, item in items:
            if isinstance(item, GenerationResult):
                results[index] = item
                if len(results) == n:
                    return [results[i] for i in range(n)]
        raise EngineError("the engine ended the generation without a result")

    task = asyncio.ensure_future(drain())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return JSONResponse({}, status_code=499)
        results = task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await items.aclose()
    body = ChatCompletionResponse.from_results(results, model=service.settings.model_name)
    return Response(body.model_dump_json(), media_type="application/json")


async def sse(body: ChatCompletionRequest, service: ChatService, first: Any, items: AsyncIterator[Any],
              http_s: float | None = None) -> AsyncIterator[str]:  # fmt: skip
    """OpenAI's stream: a role chunk, content chunks, a finish chunk, an optional usage chunk,
    ``[DONE]``. An error after the stream started is sent as an SSE error event.

    The finish chunk's timings add two stages: ``http`` (``http_s``: receiving, parsing and
    validating the body) and ``sse`` (serializing the chunks before it; socket writes excluded)."""
    completion_id, created, model = new_completion_id(), int(time.time()), service.settings.model_name
    serialized_s = 0.0

    def chunk(index: int, delta: DeltaMessage, finish: str | None = None, logprobs: Any = None, **extra: Any) -> str:
        nonlocal serialized_s
        began = time.perf_counter()
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=ChoiceLogprobs.from_core(logprobs))
        payload = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[choice], **extra)
        text = f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
        serialized_s += time.perf_counter() - began
        return text

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    n = body.n or 1
    for index in range(n):
        yield chunk(index, DeltaMessage(role="assistant", content=""))
    results: dict[int, GenerationResult] = {}
    index, item = first
    try:
        while True:
            if isinstance(item, GenerationChunk):
                if item.text or item.logprobs:
                    yield chunk(index, DeltaMessage(content=item.text), logprobs=item.logprobs)
            else:
                result: GenerationResult = item
                results[index] = result
                if result.tool_calls:  # each call whole, in one delta
                    calls = [ToolCallDelta(index=i, id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                             for i, c in enumerate(result.tool_calls)]  # fmt: skip
                    yield chunk(index, DeltaMessage(content=result.text or None, tool_calls=calls))
                if http_s is not None:
                    result.timings.stages["http"] = http_s
                result.timings.stages["sse"] = serialized_s
                timings = TimingsOut.from_timings(result.timings, result.completion_tokens)
                yield chunk(index, DeltaMessage(), result.finish_reason, timings=timings)
                if len(results) == n:
                    if include_usage:  # every response carries timings (README), the usage chunk too
                        ordered = [results[i] for i in range(n)]
                        first_timings = TimingsOut.from_timings(ordered[0].timings, ordered[0].completion_tokens)
                        usage = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[], usage=Usage.from_results(ordered), timings=first_timings)
                        yield f"data: {usage.model_dump_json()}\n\n"
                    break
            index, item = await anext(items)
    except VlmlabError as exc:
        service.metrics.observe_error(exc.status_code)
        yield f"data: {json.dumps(exc.to_openai())}\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - the status is already 200: report in-band
        logger.exception("stream failed")
        yield f"data: {json.dumps(VlmlabError(f'internal error: {type(exc).__name__}').to_openai())}\n\n"
    finally:
        await items.aclose()
    yield "data: [DONE]\n\n"
