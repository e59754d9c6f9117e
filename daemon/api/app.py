"""The FastAPI app: the routers, the guard in front of them, and the runtime's start and stop.

Request handlers stay thin: decoding and the forward pass run in the thread pool, buffer writes
are group-committed by the buffer's writer thread, cycles run in the worker process.
"""
from __future__ import annotations

import hmac
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware

from .. import status_page
from ..runtime import Runtime
from . import cycles, inference, models, samples, status


def _is_mutating(request: Request) -> bool:
    return request.method in ("POST", "PUT", "PATCH", "DELETE") or (request.method == "GET" and request.url.path == "/prune")


class GuardMiddleware(BaseHTTPMiddleware):
    """Refuses cross-site requests to mutating endpoints (a GET /prune can be forged from any web
    page) and, when a token is configured, mutating requests without it. Records metrics."""

    def __init__(self, app, runtime: Runtime):
        super().__init__(app)
        self.rt = runtime

    async def dispatch(self, request: Request, call_next):
        started = time.perf_counter()
        if _is_mutating(request):
            origin = request.headers.get("origin")
            host = request.headers.get("host", "")
            cross = request.headers.get("sec-fetch-site") == "cross-site" or (
                origin is not None and origin not in (f"http://{host}", f"https://{host}")
            )
            if cross:
                return self._finish(request, JSONResponse({"detail": "cross-site request refused"}, 403), started)
            token = self.rt.settings.api_token
            if token is not None:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token.get_secret_value()}".encode()):
                    resp = JSONResponse({"detail": "missing or wrong API token (Authorization: Bearer …)"}, 401, headers={"WWW-Authenticate": "Bearer"})
                    return self._finish(request, resp, started)
        response = await call_next(request)
        return self._finish(request, response, started)

    def _finish(self, request: Request, response: Response, started: float) -> Response:
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        self.rt.metrics.requests.labels(endpoint=endpoint, method=request.method, status=str(response.status_code)).inc()
        self.rt.metrics.request_latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        return response


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
    for module in (status_page, inference, samples, cycles, models, status):
        app.include_router(module.router(rt))
    return app
