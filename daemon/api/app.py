"""The FastAPI app: the routers, the guard in front of them, and the runtime's start and stop.

Request handlers stay thin: decoding and forward passes run in the batcher's thread pool, buffer
writes are group-committed by the buffer's writer thread, cycles run in the worker process.
"""
from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..ops import status_page
from ..runtime import Runtime
from . import cycles, inference, models, samples, status


def _is_mutating(request: Request) -> bool:
    return request.method in ("POST", "PUT", "PATCH", "DELETE") or (request.method == "GET" and request.url.path == "/prune")


class GuardMiddleware:
    """Refuses cross-site requests to mutating endpoints (a GET /prune can be forged from any web
    page) and, when a token is configured, mutating requests without it. Records metrics.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware runs every request through a task group
    and memory streams, a cost on the request path that bench/RESULTS.md measured (issue 21)."""

    def __init__(self, app: ASGIApp, runtime: Runtime):
        self.app = app
        self.rt = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = Request(scope)
        status = 500  # what ServerErrorMiddleware answers if the app raises before responding

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        refusal = self._refusal(request)
        try:
            await (refusal or self.app)(scope, receive, send_noting_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.rt.metrics.requests.labels(endpoint=endpoint, method=request.method, status=str(status)).inc()
            self.rt.metrics.request_latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)

    def _refusal(self, request: Request) -> Response | None:
        """The 403 or 401 answer for a request the guard refuses; None to let it through."""
        if not _is_mutating(request):
            return None
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        cross = request.headers.get("sec-fetch-site") == "cross-site" or (
            origin is not None and origin not in (f"http://{host}", f"https://{host}")
        )
        if cross:
            return JSONResponse({"detail": "cross-site request refused"}, 403)
        token = self.rt.settings.api_token
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
                return JSONResponse({"detail": "missing or wrong API token (Authorization: Bearer …)"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return None


def create_app(runtime: Runtime) -> FastAPI:
    rt = runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start()
        try:
            yield
        finally:
            await run_in_threadpool(rt.stop)

    app = FastAPI(title="edgetune", version="0.1.0", lifespan=lifespan,
                  description="On-device data-aware pruning and retraining of the served CNN.")
    app.add_middleware(GuardMiddleware, runtime=rt)
    for module in (inference, status_page, samples, cycles, models, status):  # /infer first: matched first
        app.include_router(module.router(rt))
    return app
