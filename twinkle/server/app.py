"""The FastAPI app factory and the Ray Serve application.

* ``create_app(config, workers=...)`` builds the gateway app around a ``Service``. In unit tests ``workers``
  are in-process ``ModelWorker`` objects (or fakes) and the app is driven with ``httpx.ASGITransport``.
* ``build_serve_app(config)`` builds the Ray Serve application: one ingress deployment (the gateway: FastAPI +
  Service + SQLite store + futures, 1 replica) and one worker deployment per (base model, replica index),
  each ``num_replicas=1`` so an adapter lives on exactly one replica.

Nothing here imports torch; ``ray`` is imported only by ``build_serve_app``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import sys
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from twinkle.types import InvalidInputError, LimitExceededError, TwinkleError

from .body_budget import LARGE_BODY, BodyBudget
from .config import ModelConfig, ServerConfig
from .deps import api_key_from_headers, validation_error
from .docs_routes import docs_router
from .routes_native import create_native_router, health_router
from .routes_openai import create_openai_router
from .routes_stream import create_stream_router
from .routes_tokens import create_tokens_router
from .service import Service
from .worker_api import WorkerAPI

__all__ = ["build_serve_app", "create_app", "error_response", "serve_logging_config", "worker_config"]

log = logging.getLogger("twinkle.server")


def worker_config(m: ModelConfig) -> dict[str, Any]:
    """The dict a ``ModelWorker`` is built from (backend options, scheduler knobs, limits)."""
    d = m.model_dump(mode="json")  # the scheduler section stays: SchedulerConfig.from_dict reads it
    d["name"] = m.served_name
    d["max_sample_batch"] = m.sampler.max_batch_size
    d.pop("sampler", None)
    d.pop("ray_actor_options", None)
    d.pop("placement", None)
    megatron = d.pop("megatron") or {}
    custom = d.pop("backend_options") or {}
    d["backend_options"] = dict(megatron) if m.backend == "megatron" else dict(custom)
    return d


_TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})  # vLLM's, beside its OpenAI routes
_OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                       429: "rate_limit_error"}


def _body_for(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` (the server's ``{error, category, code, detail}``) as OpenAI's ``{"error": {message, type, param,
    code}}`` on the OpenAI-compatible routes (``/v1/...``, the tokenizer routes, both under ``/models/{model}``
    too): the ``openai`` package shows ``error.message`` and nothing else (with the server's own shape its users
    read just "Error code: 400"). The server's fields stay inside the error object."""
    if not path.startswith(("/v1/", "/models/")) and path not in _TOKENIZER_PATHS:
        return body
    raw = body.get("detail")
    detail: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = "server_error" if status >= 500 else _OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": body.get("error"), "type": kind, "param": detail.get("field"),
                      "code": body.get("code"), "category": body.get("category"), "detail": detail}}


def error_response(err: TwinkleError, request_id: str | None = None, path: str = "") -> JSONResponse:
    """The answer to ``err`` (in OpenAI's error shape on the OpenAI-compatible routes: :func:`_body_for`)."""
    headers = {}
    if request_id:
        headers["x-request-id"] = request_id
    retry = getattr(err, "retry_after", None)
    if retry is not None:
        headers["retry-after"] = str(max(1, int(round(float(retry)))))
    status = err.status
    if status == 402:  # the Tinker SDK loops on 402; never send it
        status = 400
    return JSONResponse(status_code=status, content=_body_for(path, status, err.to_dict()), headers=headers)


class _GuardMiddleware:
    """Request id, body-size limit and last-resort error answers, as a plain ASGI middleware (Starlette's
    ``@app.middleware("http")`` runs every request through an extra task and memory streams)."""

    def __init__(self, app: Any, max_bytes: int, budget: BodyBudget):
        self.app = app
        self.max_bytes = max_bytes
        self.budget = budget

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        length = None
        for k, v in scope.get("headers") or ():
            if k == b"x-request-id":
                rid = v.decode("latin-1")
            elif k == b"content-length":
                length = v.decode("latin-1")
        rid = rid or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            err = LimitExceededError(f"request body of {int(length)} bytes exceeds the limit of {self.max_bytes}",
                                     field="body")
            await error_response(err, rid, scope.get("path", ""))(scope, receive, send)
            return
        reserved = 0
        key = ""  # the account a large body is reserved on (body_budget.py): its API key
        if length is not None and length.isdigit() and int(length) > LARGE_BODY:
            key = api_key_from_headers(Headers(scope=scope)) or ""
            try:
                await self.budget.acquire(key, int(length))
            except TwinkleError as err:
                await error_response(err, rid, scope.get("path", ""))(scope, receive, send)
                return
            reserved = int(length)
        started = False
        rid_header = (b"x-request-id", rid.encode("latin-1"))

        async def _send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"]
                headers.append(rid_header)
                tracing = sys.modules.get("twinkle.server.telemetry.tracing")
                tid = tracing.trace_id_hex() if tracing is not None else None
                if tid:  # traces exported: the client shows this id in its error messages
                    headers.append((b"x-trace-id", tid.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        seen = 0

        async def _receive() -> Any:
            # Bodies without a Content-Length (chunked) are counted as they stream: refused the moment they
            # pass the limit, never buffered whole.
            nonlocal seen, reserved, key
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body") or b"")
                if seen > self.max_bytes:
                    raise LimitExceededError(f"request body exceeds the limit of {self.max_bytes} bytes "
                                             "(limits.max_request_bytes)", field="body",
                                             detail={"limit": self.max_bytes})
                if seen > LARGE_BODY and not reserved:  # chunked: it may grow to the limit
                    key = api_key_from_headers(Headers(scope=scope)) or ""
                    await self.budget.acquire(key, self.max_bytes)
                    reserved = self.max_bytes
            return message

        try:
            await self.app(scope, _receive, _send)
        except Exception as e:
            if started:
                raise
            if isinstance(e, TwinkleError):
                await error_response(e, rid, scope.get("path", ""))(scope, receive, send)
                return
            log.error("unhandled error [request id %s] %s %s\n%s", rid, scope.get("method"), scope.get("path"),
                      traceback.format_exc())
            body = {"error": f"internal server error (request id {rid})", "category": "server",
                    "code": "internal_error", "detail": {"request_id": rid}}
            await JSONResponse(status_code=500, content=_body_for(scope.get("path", ""), 500, body),
                               headers={"x-request-id": rid})(scope, receive, send)
        finally:
            if reserved:
                await self.budget.release(key, reserved)


def _install_handlers(app: FastAPI, config: ServerConfig) -> None:
    app.state.body_budget = budget = BodyBudget(config.limits.decoding_bytes())
    app.add_middleware(_GuardMiddleware, max_bytes=config.limits.max_request_bytes, budget=budget)

    @app.exception_handler(TwinkleError)
    async def _twinkle_error(request: Request, exc: TwinkleError) -> JSONResponse:
        return error_response(exc, getattr(request.state, "request_id", None), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        await _skip_refused_seq(request, getattr(exc, "body", None))
        return error_response(validation_error(exc), getattr(request.state, "request_id", None), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "unsupported", 401: "unauthenticated"}.get(exc.status_code, "invalid_input")
        status = 400 if exc.status_code in (402, 409, 429) or exc.status_code >= 500 else exc.status_code
        body = {"error": str(exc.detail), "category": "user", "code": code, "detail": {"path": request.url.path}}
        return JSONResponse(status_code=status, content=_body_for(request.url.path, status, body))


_SEQ_ROUTE = re.compile(r"^/api/v1/twinkle/runs/([^/]+)/(forward|forward_backward|optim_step|checkpoints|load)$")


async def _skip_refused_seq(request: Request, body: Any) -> None:
    """A native training request refused before it reached the service still consumed its ``seq_id``: tell
    the run's worker, so the run's next requests do not wait for it."""
    user = getattr(request.state, "user", None)
    match = _SEQ_ROUTE.match(request.url.path)
    if user is None or match is None or request.method != "POST" or not isinstance(body, dict):
        return
    seq_id = body.get("seq_id")
    if isinstance(seq_id, int):
        try:
            await request.app.state.service.skip_seq(user, unquote(match.group(1)), seq_id)
        except Exception:  # best effort: the worker's grace period covers the gap anyway
            log.info("skip of a refused seq_id failed", exc_info=True)


def _fastapi_telemetry() -> dict[str, Any]:
    """FastAPI >= 0.165 instruments requests itself once a global OpenTelemetry provider exists (ours, when traces
    are exported). Its SERVER span per request is the gateway's HTTP span in a trace (it honours the client's
    ``traceparent``; docs/observability.md "Traces"); its other instruments are turned off: dependency / endpoint
    / serialization spans (three more spans a request, no information the server's own spans lack), its metrics
    (the server exports its own) and its exception logs (messages and stack traces)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": True, "operation_spans": False, "metrics": False, "logs": False}}


def create_app(
    config: ServerConfig, workers: dict[str, list[Any]] | None = None, *, store: Any | None = None,
    service: Service | None = None,
) -> FastAPI:
    """The gateway app. ``workers``: served model name → list of worker objects (one per replica)."""
    if service is None:
        if workers is None:
            raise InvalidInputError("create_app needs workers or a service", field="workers")
        service = Service(config, workers, store=store)
        if config.auth.bootstrap_key_env:
            key = os.environ.get(config.auth.bootstrap_key_env)
            if key:
                service.add_bootstrap_key(key, config.auth.bootstrap_user)

    @asynccontextmanager
    async def _lifespan(app: FastAPI) -> Any:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="Twinkle server", version="0.1.0", lifespan=_lifespan,
        description="Self-hosted training-as-a-service for LoRA adapters (native API + Tinker-compatible API).",
        docs_url=None, redoc_url=None, openapi_url=None,  # served below, behind a key (see SECURITY.md)
        **_fastapi_telemetry(),
    )
    app.state.service = service
    app.state.config = config
    _install_handlers(app, config)
    app.include_router(docs_router(app))
    if config.telemetry.enabled:
        from .telemetry.setup import install_telemetry

        install_telemetry(app, config, service)
    from .telemetry.routes import create_usage_router

    # FastAPI matches a request against the routers in the order they were included, trying each route in turn
    # (tens of microseconds per route): each area below is skipped at once for a path outside it, and the
    # Tinker area (the SDK's hot path: forward_backward, retrieve_future) comes before the native one.
    app.include_router(health_router())
    tinker = _tinker_router()
    if tinker is not None:
        tinker_area = _AreaRouter("/api/v1/", reject="/api/v1/twinkle/")
        tinker_area.include_router(tinker, prefix="/api/v1")
        app.include_router(tinker_area)
    native = _AreaRouter("/api/v1/twinkle/")
    for router in (create_native_router(), create_stream_router(), create_usage_router()):
        native.include_router(router)
    app.include_router(native)
    app.include_router(create_openai_router())
    app.include_router(create_tokens_router())
    return app


class _AreaRouter(APIRouter):
    """Routes under one path prefix, skipped at once for any other path. FastAPI ≥ 0.16x asks an included router
    whether it ``matches`` a request and then tries its routes one by one; a request for another area would try
    them all (~0.5 ms for the native routes before a Tinker one). Older FastAPI copies the routes into the app
    and never calls this ``matches``: then it changes nothing."""

    def __init__(self, accept: str, *, reject: str | None = None):
        super().__init__()
        self._accept = accept
        self._reject = reject

    def matches(self, scope: Any) -> tuple[Match, Any]:
        path = get_route_path(scope)
        if not path.startswith(self._accept) or (self._reject is not None and path.startswith(self._reject)):
            return Match.NONE, {}
        return super().matches(scope)


def _tinker_router() -> Any:
    from ._tinker_proto import install

    install()  # the Tinker codec needs the SDK's protobuf module only: keep torch out of the gateway
    try:
        from twinkle.server import tinker as tinker_pkg
    except ImportError:
        return None
    factory = getattr(tinker_pkg, "create_router", None)
    if factory is None:
        return None
    return factory()


# ---- Ray Serve -----------------------------------------------------------------------------------------------


@dataclass
class WorkerRefusal:
    """A user error (``TwinkleError``) a worker replica returns as a value instead of raising it, so Ray Serve
    does not log a bad input as an ERROR with a traceback; the gateway raises it again."""

    error: TwinkleError


async def refusal_as_value(call: Any) -> Any:
    try:
        return await call
    except TwinkleError as e:
        return WorkerRefusal(e)


_TOO_LARGE = re.compile(r"(?:(SERVER|CLIENT): )?Received message larger than max \((\d+) vs\. (\d+)\)")


def _message_too_large(e: BaseException) -> LimitExceededError | None:
    """Ray Serve's gRPC message limit met between the gateway and a worker replica (``RESOURCE_EXHAUSTED``) as
    a 413 instead of an internal error. The launcher raises the limit above what an accepted request decodes to
    (SECURITY.md, "Internal messages"), so this is a safety net for a lowered or foreign setting."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        m = _TOO_LARGE.search(str(cur))
        if m:
            way = {"SERVER": " request", "CLIENT": " reply"}.get(m.group(1) or "", "")
            return LimitExceededError(
                f"this request's internal{way} message ({m.group(2)} bytes) exceeds the server's internal "
                f"message limit ({m.group(3)} bytes, RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); send a smaller "
                "request", field="body", detail={"limit": int(m.group(3))})
        cur = cur.__cause__ or cur.__context__
    return None


class _HandleWorker:
    """Adapts a Ray Serve ``DeploymentHandle`` of a worker deployment to :class:`~twinkle.server.worker_api.WorkerAPI`."""

    def __init__(self, handle: Any):
        self._h = handle

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from .state.common import unwrap as _unwrap

        response = getattr(self._h, method).remote(*args, **kwargs)
        try:
            out = await response
        except asyncio.CancelledError:
            response.cancel()  # the caller gave up (e.g. its session ended): cancel the call on the replica too
            raise
        except Exception as e:
            err = _unwrap(e)
            if err is e:
                too_large = _message_too_large(e)
                if too_large is not None:
                    raise too_large from None
                raise
            raise err from None
        if isinstance(out, WorkerRefusal):
            raise out.error
        return out

    async def create_adapter(self, adapter_id: str, lora: Any, **kw: Any) -> Any:
        return await self._call("create_adapter", adapter_id, lora, **kw)

    async def remove_adapter(self, adapter_id: str) -> Any:
        return await self._call("remove_adapter", adapter_id)

    async def execute(self, adapter_id: str, op: Any, *, seq_id: int | None = None, path: str | None = None) -> Any:
        return await self._call("execute", adapter_id, op, seq_id=seq_id, path=path, **_trace_kw())

    async def sample(self, op: Any, *, adapter_id: str | None = None, checkpoint_path: str | None = None) -> Any:
        return await self._call("sample", op, adapter_id=adapter_id, checkpoint_path=checkpoint_path,
                                **_trace_kw())

    async def sample_stream_open(self, op: Any, *, adapter_id: str | None = None,
                                 checkpoint_path: str | None = None) -> Any:
        return await self._call("sample_stream_open", op, adapter_id=adapter_id, checkpoint_path=checkpoint_path)

    async def sample_stream_poll(self, stream_id: str, after: int = 0, timeout: float = 10.0) -> Any:
        return await self._call("sample_stream_poll", stream_id, after, timeout)

    async def sample_stream_close(self, stream_id: str) -> Any:
        return await self._call("sample_stream_close", stream_id)

    async def tokenize(self, **kw: Any) -> Any:
        return await self._call("tokenize", **kw)

    async def tokenizer_info(self) -> Any:
        return await self._call("tokenizer_info")

    async def token_texts(self, ids: list[int], singles: list[int]) -> Any:
        return await self._call("token_texts", ids, singles)

    async def skip(self, adapter_id: str, seq_id: int) -> Any:
        return await self._call("skip", adapter_id, seq_id)

    async def has_adapter(self, adapter_id: str) -> Any:
        return await self._call("has_adapter", adapter_id)

    async def status(self) -> Any:
        return await self._call("status")

    async def model_info(self) -> Any:
        return await self._call("model_info")

    async def telemetry_exposition(self) -> Any:
        return await self._call("telemetry_exposition")


def _conforms(w: _HandleWorker) -> WorkerAPI:  # never called: mypy checks the adaptor implements WorkerAPI
    return w


def _trace_kw() -> dict[str, Any]:
    """``{"_trace": <W3C headers>}`` when this process exports traces and a span is current, else ``{}``."""
    tracing = sys.modules.get("twinkle.server.telemetry.tracing")
    if tracing is None:
        return {}
    carrier = tracing.inject()
    return {"_trace": carrier} if carrier else {}


def serve_logging_config(replica: bool = False) -> dict[str, Any]:
    """Ray Serve logging for the proxy and every replica. Access logs (one line per request and per handle call
    in each replica and the proxy, forwarded to the launcher's output) cost CPU on every hop of a request;
    they are off unless ``TWINKLE_ACCESS_LOG=1``. Replicas then log Serve's own messages from WARNING up: a
    replica formats and filters an INFO access record for every request even when access logs are off."""
    access = os.environ.get("TWINKLE_ACCESS_LOG", "0") == "1"
    out: dict[str, Any] = {"enable_access_log": access}
    if replica and not access:
        out["log_level"] = "WARNING"
    return out


def _deployment_name(model: str, replica: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in model)
    return f"worker-{safe}-{replica}"


def build_serve_app(config: ServerConfig, own_http: bool = False) -> Any:
    """The Ray Serve application (ingress + workers), ready for ``serve.run``. ``own_http``: the gateway replica
    serves ``http.host:http.port`` itself (``own_http.py``; Serve started with proxies disabled), otherwise it is
    a Serve ingress deployment behind Serve's HTTP (direct ingress, HAProxy or the Python proxy)."""
    from ray import serve

    logging_config = serve_logging_config(replica=True)

    @serve.deployment(name="model-worker", max_ongoing_requests=100000, graceful_shutdown_timeout_s=5,
                      health_check_period_s=30, health_check_timeout_s=60, logging_config=logging_config)
    class WorkerDeployment:
        def __init__(self, model_config: dict[str, Any], replica: int):
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            from twinkle.server.worker import ModelWorker

            self.worker = ModelWorker(model_config, replica)

        async def create_adapter(self, adapter_id: str, lora: Any, **kw: Any) -> Any:
            return await refusal_as_value(self.worker.create_adapter(adapter_id, lora, **kw))

        async def remove_adapter(self, adapter_id: str) -> Any:
            return await self.worker.remove_adapter(adapter_id)

        async def execute(self, adapter_id: str, op: Any, *, seq_id: int | None = None,
                          path: str | None = None, _trace: dict[str, str] | None = None) -> Any:
            if _trace:  # the gateway's trace context (telemetry with traces on)
                from twinkle.server.telemetry.tracing import attached

                with attached(_trace):
                    return await refusal_as_value(self.worker.execute(adapter_id, op, seq_id=seq_id, path=path))
            return await refusal_as_value(self.worker.execute(adapter_id, op, seq_id=seq_id, path=path))

        async def sample(self, op: Any, *, adapter_id: str | None = None,
                         checkpoint_path: str | None = None, _trace: dict[str, str] | None = None) -> Any:
            if _trace:
                from twinkle.server.telemetry.tracing import attached

                with attached(_trace):
                    return await refusal_as_value(
                        self.worker.sample(op, adapter_id=adapter_id, checkpoint_path=checkpoint_path))
            return await refusal_as_value(self.worker.sample(op, adapter_id=adapter_id, checkpoint_path=checkpoint_path))

        async def sample_stream_open(self, op: Any, *, adapter_id: str | None = None,
                                     checkpoint_path: str | None = None) -> Any:
            return await refusal_as_value(
                self.worker.sample_stream_open(op, adapter_id=adapter_id, checkpoint_path=checkpoint_path))

        async def sample_stream_poll(self, stream_id: str, after: int = 0, timeout: float = 10.0) -> Any:
            return await refusal_as_value(self.worker.sample_stream_poll(stream_id, after, timeout))

        async def sample_stream_close(self, stream_id: str) -> Any:
            return await self.worker.sample_stream_close(stream_id)

        async def tokenize(self, **kw: Any) -> Any:
            return await refusal_as_value(self.worker.tokenize(**kw))

        async def tokenizer_info(self) -> Any:
            return await refusal_as_value(self.worker.tokenizer_info())

        async def token_texts(self, ids: list[int], singles: list[int]) -> Any:
            return await refusal_as_value(self.worker.token_texts(ids, singles))

        async def skip(self, adapter_id: str, seq_id: int) -> None:
            await self.worker.skip(adapter_id, seq_id)

        async def has_adapter(self, adapter_id: str) -> bool:
            return await self.worker.has_adapter(adapter_id)

        async def status(self) -> Any:
            return await self.worker.status()

        async def model_info(self) -> Any:
            return await self.worker.model_info()

        async def telemetry_exposition(self) -> Any:
            return await self.worker.telemetry_exposition()

    gateway_models = [m for m in config.models if config.in_gateway(m)]

    class _GatewayBase:
        """The gateway replica: the FastAPI app, with the workers of ``placement: gateway`` models in process."""

        def _setup(self, config_json: dict[str, Any], handles: dict[str, list[Any]]) -> None:
            self._config = ServerConfig.model_validate(config_json)
            self._handles = handles
            self._local: dict[str, list[Any]] = {}
            local = [m for m in self._config.models if self._config.in_gateway(m)]
            if local:  # placement 'gateway': the worker lives in this replica, called without a hop
                os.environ.setdefault("OMP_NUM_THREADS", "1")
                from twinkle.server.worker import ModelWorker

                self._local = {m.served_name: [ModelWorker(_serve_worker_config(self._config, m), 0)]
                               for m in local}

        def _build_app(self) -> Any:
            logging.basicConfig(level=self._config.log_level.upper())
            workers = {name: [_HandleWorker(h) for h in hs] for name, hs in self._handles.items()}
            workers.update(self._local)
            return create_app(self._config, {m.served_name: workers[m.served_name] for m in self._config.models})

    gateway_options: dict[str, Any] = {
        "name": "gateway", "num_replicas": 1, "max_ongoing_requests": 100000, "graceful_shutdown_timeout_s": 10,
        "ray_actor_options": _gateway_actor_options(gateway_models), "logging_config": logging_config}
    gateway: Any
    if own_http:  # twinkle/server/own_http.py: uvicorn in this replica on http.port, no Serve proxy at all

        class OwnHTTPGateway(_GatewayBase):
            async def __init__(self, config_json: dict[str, Any], handles: dict[str, list[Any]]) -> None:  # type: ignore[misc]  # Ray Serve awaits it
                from .own_http import OwnHTTPServer

                self._setup(config_json, handles)
                self._http = OwnHTTPServer(self._build_app(), self._config.http.host, self._config.http.port)
                await self._http.start()

            def check_health(self) -> None:
                if not self._http.alive():
                    raise RuntimeError("the gateway's HTTP server stopped")

            async def __del__(self) -> None:  # Ray Serve awaits it at a graceful shutdown
                http = getattr(self, "_http", None)
                if http is not None:
                    await http.stop()

        gateway = serve.deployment(**gateway_options)(OwnHTTPGateway)
    else:

        @serve.deployment(**gateway_options)
        @serve.ingress()
        class Gateway(_GatewayBase):
            def __init__(self, config_json: dict[str, Any], handles: dict[str, list[Any]]):
                from ._reuse_addr import reuse_address

                if not reuse_address() and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
                    log.warning("could not set SO_REUSEADDR on the gateway's HTTP socket: after a crash with open "
                                "connections the port may stay busy for a minute")
                self._setup(config_json, handles)

            def __serve_build_asgi_app__(self) -> Any:
                return self._build_app()

        gateway = Gateway

    handles: dict[str, list[Any]] = {}
    for m in config.models:
        if config.in_gateway(m):
            continue
        opts = m.ray_actor_options.to_ray()
        handles[m.served_name] = [
            cast(Any, WorkerDeployment).options(name=_deployment_name(m.served_name, i), ray_actor_options=opts).bind(
                _serve_worker_config(config, m), i)
            for i in range(m.replicas)
        ]
    return gateway.bind(config.model_dump(mode="json"), handles)  # serve.deployment's (untyped) class


def _serve_worker_config(config: ServerConfig, m: ModelConfig) -> dict[str, Any]:
    """``worker_config`` plus the telemetry section, for a worker on Ray Serve (own replica or in the gateway)."""
    return {**worker_config(m),
            "telemetry": config.telemetry.model_dump(mode="json") if config.telemetry.enabled else False}


def _gateway_actor_options(local: list[ModelConfig]) -> dict[str, Any]:
    """The gateway replica's Ray resources: none of its own, plus those of the workers it hosts."""
    out: dict[str, Any] = {"num_cpus": 0}
    for m in local:
        for k, v in m.ray_actor_options.to_ray().items():
            if k == "resources":
                res = out.setdefault("resources", {})
                for name, amount in v.items():
                    res[name] = res.get(name, 0) + amount
            else:
                out[k] = out.get(k, 0) + v
    return out
