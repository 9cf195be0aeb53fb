"""The FastAPI application: ``create_app(predictor, settings)``.

Endpoints: ``POST /predict`` (the model), ``GET /health``, ``GET /info``, ``GET /metrics``
(Prometheus), ``GET /`` (the demo page), and FastAPI's ``/docs`` and ``/openapi.json``. Every
answer is JSON except /metrics and /; every error has one shape, ``{"error", "error_type",
"field"}`` (:func:`kiln.serve.schemas.error_body`), and a client's mistake is never a 500.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.errors import KilnError
from kiln.serve import schemas
from kiln.serve.batcher import Closed, Full, MicroBatcher
from kiln.serve.metrics import CONTENT_TYPE, ServeMetrics
from kiln.serve.schemas import RequestError, error_body
from kiln.serve.settings import ServeSettings
from kiln.version import __version__

if TYPE_CHECKING:
    from kiln.tasks.base import Route

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class ServeState:
    """What the endpoints share: the predictor once loaded (or why it failed), the batcher, metrics."""

    def __init__(self, source: Any, settings: ServeSettings, on_ready: Callable[[ServeState], None] | None):
        self.source = source  # a loaded Predictor, or a callable that loads one
        self.settings = settings
        self.on_ready = on_ready
        self.predictor: Any = None
        self.batcher: MicroBatcher | None = None
        self.error: BaseException | None = None
        self.info: dict[str, Any] = {}
        self.metrics = ServeMetrics()
        self.loaded_in = 0.0
        self.add_routes: Callable[[Sequence[Route]], None] = lambda routes: None

    async def load(self) -> None:
        """Load the model (in a thread, so /health answers meanwhile) and start the batcher."""
        started = time.monotonic()
        try:
            if hasattr(self.source, "predict_examples"):
                predictor = self.source
            else:
                predictor = await asyncio.to_thread(self.source)
            self._start(predictor)
        except Exception as err:  # the caller (kiln serve) reports it and exits; /health says it meanwhile
            self.error = err
            if not isinstance(err, KilnError):
                log.exception("loading the model failed")
        self.loaded_in = time.monotonic() - started
        if self.on_ready is not None:
            self.on_ready(self)

    def _start(self, predictor: Any) -> None:
        # kiln serve loads the predictor with the same budget: one gathered batch, one forward pass.
        budget = self.settings.max_batch_tokens or predictor.batch_tokens
        batcher = MicroBatcher(predictor.predict_examples, max_batch_tokens=budget,
                               max_wait=self.settings.max_wait_ms / 1000, on_batch=self.metrics.record_batch,
                               max_queue=self.settings.max_queue)
        batcher.start()
        self.info = {
            "task": predictor.meta["task"],
            "labels": predictor.task.state.get("labels") or None,
            "profile": predictor.config.name,
            "num_parameters": predictor.num_parameters(),
            "runtime": predictor.runtime,
            "parameters": predictor.parameters(),
            "precision": predictor.weights_precision(),
            "device": str(predictor.device),
            "kiln_version": __version__,
            "max_inputs": self.settings.max_inputs,
            "examples": predictor.meta.get("examples", []),
            "demo": predictor.task.demo,  # how the demo page asks for an input and shows a prediction
        }
        self.add_routes(predictor.task.routes)
        self.batcher, self.predictor = batcher, predictor

    def require(self) -> Any:
        """The predictor, or a 503 while it loads (or after it failed to)."""
        if self.predictor is None:
            raise RequestError(503, "the model failed to load" if self.error else "the model is loading; retry soon")
        return self.predictor


def create_app(predictor: Any, settings: ServeSettings | None = None, *,
               on_ready: Callable[[ServeState], None] | None = None) -> FastAPI:
    """The API for ``predictor``: a loaded :class:`~kiln.predictor.Predictor`, or a callable that
    loads one, which the app's lifespan then calls once, in a thread (``/health`` is 503 until it
    returns). ``on_ready(state)`` runs when loading ends, failed or not (``state.error``)."""
    settings = settings or ServeSettings()
    settings.check()
    state = ServeState(predictor, settings, on_ready)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(state.load())
        if hasattr(predictor, "predict_examples"):
            await loading  # already loaded: ready before the first request
        try:
            yield
        finally:
            await asyncio.shield(loading)  # a load in flight finishes; a thread cannot be cancelled
            if state.batcher is not None:
                await state.batcher.close()  # SIGTERM: answer every request already waiting

    app = FastAPI(title="kiln serve", version=__version__, lifespan=lifespan, description=(
        "A kiln model behind HTTP. `POST /predict` takes `{\"inputs\": [...], \"parameters\": {...}}` and answers a "
        "list with one prediction per input, as `kiln predict --json` prints. Errors are `{\"error\", "
        "\"error_type\", \"field\"}`."))
    app.state.kiln = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    _add_error_handlers(app)

    guarded = _authorization(settings)
    error_model = schemas.error_model()
    errors = {status: {"model": error_model, "description": description} for status, description in (
        (400, "The body is not JSON."), (401, "Missing or wrong API key."),
        (408, "The body did not arrive within the server's --read-timeout."), (413, "The body is too large."),
        (415, "The body is not sent as application/json."), (429, "Too many requests wait; retry later."),
        (422, "JSON of the wrong shape, an unknown parameter, or an input the task refuses."),
        (503, "The model is still loading, or the server is shutting down."))}

    _add_predict_route(app, state, settings, guarded, errors)
    state.add_routes = functools.partial(_add_task_routes, app, state, settings, guarded, errors)
    _add_status_routes(app, state, guarded, errors, error_model)
    app.openapi = _openapi(app, state, settings)  # type: ignore[method-assign]
    return app


def _authorization(settings: ServeSettings) -> list:
    """The dependencies that guard the model's endpoints: a bearer key check with ``--api-key``."""
    bearer = HTTPBearer(auto_error=False, description="the key kiln serve was started with (--api-key)")
    expected = settings.api_key.encode("utf-8")

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        # Header text arrives decoded as latin-1; its bytes are what the client sent.
        given = credentials.credentials.encode("latin-1", "replace") if credentials else b""
        if not hmac.compare_digest(given, expected):
            raise RequestError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'")

    return [Depends(authorize)] if settings.api_key else []


def _add_predict_route(app: FastAPI, state: ServeState, settings: ServeSettings, guarded: list,
                       errors: dict) -> None:
    """``POST /predict``: check the body, bound its work, and hand its inputs to the batcher."""

    @app.post("/predict", dependencies=guarded, response_model=None, responses=errors,
              summary="Predict for a list of inputs")
    async def predict(request: Request) -> Response:
        """One prediction per input, in input order, with exactly the shapes of ``kiln predict --json``.
        Concurrent requests with identical parameters share micro-batches."""
        state.require()
        payload = await _json_body(request, settings)
        items, parameters = schemas.check_request(payload, state.info["task"], settings.max_inputs)
        return JSONResponse(await _predict(state, settings, items, parameters))


def _add_task_routes(app: FastAPI, state: ServeState, settings: ServeSettings, guarded: list, errors: dict,
                     routes: Sequence[Route]) -> None:
    """The endpoints the served task adds besides ``/predict`` (:class:`~kiln.tasks.base.Route`), added
    once the model is loaded; their inputs share ``/predict``'s micro-batches."""
    for route in routes:
        app.add_api_route(route.path, _task_endpoint(state, settings, route), methods=["POST"], dependencies=guarded,
                          response_model=None, responses=errors, summary=route.summary)


def _task_endpoint(state: ServeState, settings: ServeSettings, route: Route) -> Callable:
    """The handler of one task route: its body becomes request items, their predictions its answer."""

    async def endpoint(request: Request) -> Response:
        state.require()
        payload = await _json_body(request, settings)
        try:
            items, parameters = route.inputs(payload)
        except KilnError as err:
            raise RequestError(422, err.message) from None
        if not 1 <= len(items) <= settings.max_inputs:
            raise RequestError(422, f"send between 1 and {settings.max_inputs} inputs (--max-inputs)", "inputs")
        return JSONResponse(route.answer(await _predict(state, settings, items, parameters), payload))

    endpoint.__doc__ = route.summary
    return endpoint


async def _json_body(request: Request, settings: ServeSettings) -> Any:
    """The request's body, read within the server's bounds, sent as JSON, and parsed."""
    body = await read_body(request, settings.max_body_bytes, settings.read_timeout_s)
    # JSON only: a page on another origin can POST text/plain or a form without a CORS preflight.
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise RequestError(415, "the body must be sent as application/json "
                                f"(this request's Content-Type: {kind or 'none'})")
    return schemas.parse_json(body)


async def _predict(state: ServeState, settings: ServeSettings, items: list[Any], raw_parameters: dict) -> list:
    """Check the parameters and inputs of one request, bound its work, and hand it to the batcher."""
    predictor = state.require()
    parameters = {}
    for name, value in raw_parameters.items():
        try:
            parameters.update(predictor.check_parameters({name: value}))
        except KilnError as err:
            raise RequestError(422, err.message, f"parameters.{name}") from None
    for name, most, flag in (("max_new_tokens", settings.max_new_tokens, "--max-new-tokens"),
                             ("num_beams", settings.max_beams, "--max-beams")):
        if parameters.get(name, 0) > most:  # the server's own bound on one request's work
            raise RequestError(422, f"{name} may be at most {most} on this server ({flag})", f"parameters.{name}")
    examples = []
    for index, item in enumerate(items):
        try:
            examples.append(predictor.task.parse_input(item, index + 1))
        except KilnError as err:
            raise RequestError(422, err.message, f"inputs[{index}]") from None
    assert state.batcher is not None
    tokens = sum(schemas.estimate_tokens(item) for item in items)
    key = json.dumps(parameters, sort_keys=True)
    state.metrics.in_flight += 1
    try:
        return await asyncio.wait_for(state.batcher.submit(examples, parameters, key, tokens), settings.timeout_s)
    except Closed:
        raise RequestError(503, "the server is shutting down") from None
    except Full as err:
        raise RequestError(429, f"too many requests: {err}; retry soon") from None
    except TimeoutError:
        raise RequestError(503, f"the request took longer than {settings.timeout_s:g} s (--timeout); "
                           "retry, or send fewer inputs") from None
    except KilnError as err:  # an input the task refuses once encoded (too long a question, say)
        field = f"inputs[{err.line - 1}]" if err.line and 0 < err.line <= len(items) else None
        raise RequestError(422, err.message, field) from None
    finally:
        state.metrics.in_flight -= 1


def _add_status_routes(app: FastAPI, state: ServeState, guarded: list, errors: dict, error_model: Any) -> None:
    """``/health``, ``/info``, ``/metrics`` and the demo page at ``/``."""

    @app.get("/health", summary="200 once the model is loaded, 503 before",
             responses={503: {"model": error_model, "description": "Loading, or failed to load."}})
    async def health() -> JSONResponse:
        """Readiness: ``{"status": "ok"}`` once the model answers, ``loading`` or ``error`` (503) before."""
        if state.predictor is not None:
            return JSONResponse({"status": "ok"})
        status = "error" if state.error else "loading"
        return JSONResponse({**error_body(503, f"the model is {'not loaded' if state.error else 'loading'}"),
                             "status": status}, status_code=503)

    @app.get("/info", dependencies=guarded, summary="What the model is and takes",
             responses={401: errors[401], 503: errors[503]})
    async def info() -> JSONResponse:
        """Task, labels, profile, size, per-call parameters with their defaults, precision, device,
        kiln version, the input limit, and example inputs."""
        state.require()
        return JSONResponse(state.info)

    @app.get("/metrics", dependencies=guarded, response_class=PlainTextResponse,
             summary="Prometheus metrics", responses={401: errors[401]})
    async def metrics() -> Response:
        """Requests and errors by path and status code; batch sizes, queue time, latency histograms."""
        return Response(state.metrics.render(state.predictor is not None), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def demo() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            raise RequestError(404, "this install has no demo page; the API is described at /docs")
        return FileResponse(page, media_type="text/html; charset=utf-8")


def _openapi(app: FastAPI, state: ServeState, settings: ServeSettings) -> Callable[[], dict[str, Any]]:
    """FastAPI's schema function, with /predict's body and answer for this model's task once it is loaded."""

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, with /predict's body and answer for this model's task once it is loaded."""
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if state.predictor is None:
            return schema  # not cached: the task's shapes come with the model
        _describe_predict(schema, state.predictor.task, settings.max_inputs)
        app.openapi_schema = schema
        return schema

    return openapi


def _describe_predict(schema: dict, loaded: Any, max_inputs: int) -> None:
    """Put the loaded task's request and response shapes into ``/predict``'s OpenAPI operation."""
    from pydantic import TypeAdapter

    task, parameters = loaded.name, loaded.parameters()
    refs = "#/components/schemas/{model}"
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    request = schemas.request_model(task, parameters, max_inputs).model_json_schema(ref_template=refs)
    components.update(request.pop("$defs", {}))
    components["PredictRequest"] = request
    answer = TypeAdapter(schemas.response_model(loaded)).json_schema(ref_template=refs)
    components.update(answer.pop("$defs", {}))
    operation = schema["paths"]["/predict"]["post"]
    operation["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}}}
    operation["responses"]["200"] = {"description": "One prediction per input, in input order.",
                                     "content": {"application/json": {"schema": answer}}}


# An oversized body is read (and thrown away) up to this many bytes before the 413 goes out: a client
# still sending when the server answers and closes gets a connection reset instead of the answer
# (Python's urllib, requests and httpx do). Past it, the server answers and closes without reading.
DRAIN_LIMIT = 64 * 1024 * 1024


async def read_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused (413) as soon as its declared or streamed size passes ``limit``; the
    rest of an oversized body is drained first (up to :data:`DRAIN_LIMIT`) so the client reads the 413.
    A body still incomplete after ``timeout`` seconds is answered 408."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, int(declared))
        raise RequestError(413, f"the body has {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:  # chunked uploads declare no length
                    await _drain(request, None)
                    raise RequestError(413, f"the body is over {limit} bytes, the most this server takes")
                chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer; counted as the client's doing, not a crash
        raise RequestError(400, "the client disconnected before sending the whole body") from None
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout:g} s (--read-timeout)") from None
    return b"".join(chunks)


async def _drain(request: Request, declared: int | None) -> None:
    """Read and drop what is left of the body, unless it is declared (or turns out) larger than
    :data:`DRAIN_LIMIT`."""
    if declared is not None and declared > DRAIN_LIMIT:
        return
    drained = 0
    try:
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                return
    except (ClientDisconnect, RuntimeError):  # gone, or the stream was already consumed
        return


def _json_error(status: int, message: str, field: str | None = None, kind: str | None = None,
                headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, field, kind), status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else \
            {"Retry-After": "1"} if exc.status in (429, 503) else \
            {"Connection": "close"} if exc.status == 408 else None  # the rest of a late body may still come
        return _json_error(exc.status, exc.message, exc.field, exc.kind, headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return _json_error(exc.status_code, detail, headers=dict(exc.headers) if exc.headers else None)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "header"))
        return _json_error(422, str(first.get("msg", "invalid request")), field or None)

    async def task_refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KilnError)  # a user mistake that reached no more specific handler
        return _json_error(422, exc.message)

    async def crashed(request: Request, exc: Exception) -> Response:
        # kiln's bug, not the client's: answered as JSON all the same. One line here; the server
        # (uvicorn) logs the traceback, as Starlette raises the exception again after this answer.
        log.error(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}")
        return _json_error(500, f"internal error ({type(exc).__name__}); the server log has the details")

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(KilnError, task_refused)
    app.add_exception_handler(Exception, crashed)


class MetricsMiddleware:
    """Counts every answer by route and status code and times it (a plain ASGI middleware, so
    streaming and errors pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            # The route's template, never the raw path: a scan of random URLs adds no new series.
            path = getattr(route, "path", None) or "other"
            self.metrics.record_request(path, status, time.perf_counter() - started)
