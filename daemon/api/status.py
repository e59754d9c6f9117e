"""What the daemon is doing: /status, /metrics (Prometheus), /healthz, /readyz."""
from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..runtime import Runtime


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.get("/status", summary="Model, buffer, scheduler, telemetry and current cycle")
    async def status() -> dict:
        return await run_in_threadpool(rt.status)

    @r.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(rt.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @r.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"ok": True}

    @r.get("/readyz", summary="A model is loaded and serving")
    async def readyz() -> JSONResponse:
        model = rt.served()
        if model is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "model_version": model.version})

    return r
