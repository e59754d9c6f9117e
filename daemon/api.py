"""The REST API (FastAPI): inference, samples, cycles, models, status, metrics, health.

Request handlers stay thin: decoding and the forward pass run in the thread pool, buffer writes
are group-committed by the buffer's writer thread, cycles run in the worker process.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import time
from contextlib import asynccontextmanager
from typing import Any, Literal, Union

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware
from typing_extensions import Annotated  # typing's is 3.9+; JetPack 5's Python is 3.8

from prune_core.data import DataError, decode_image

from . import status_page
from .buffer import NewSample, StorageError
from .model_store import UnknownVersion
from .runtime import Runtime
from .scheduler import FINAL_STATES, Conflict
from .serving import Served



# ---- request and response bodies --------------------------------------------------------
class TopClass(BaseModel):
    class_: str = Field(alias="class")
    index: int
    score: float

    model_config = {"populate_by_name": True}


class InferResponse(BaseModel):
    sample_id: int | None
    buffered: bool
    top: list[TopClass]
    model_version: str
    latency_ms: float
    buffer_error: str | None = None


class LabelRequest(BaseModel):
    label: str = Field(min_length=1, max_length=200)


class SampleIn(BaseModel):
    image: str = Field(description="base64-encoded image file (JPEG, PNG, …)")
    label: str | None = None


class SamplesRequest(BaseModel):
    samples: list[SampleIn] = Field(min_length=1, max_length=1000)


class PruneRequest(BaseModel):
    level: Union[Literal["auto"], Annotated[float, Field(gt=0, lt=1)], None] = None
    criterion: str | None = None
    allocation: str | None = None
    epochs: int | None = Field(None, ge=0, le=1000)
    force: bool = False


class CycleAccepted(BaseModel):
    cycle_id: str
    state: str


class ErrorMessage(BaseModel):
    detail: str


# /infer reads its body itself (raw image or multipart), so the schema is declared by hand.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
INFER_BODY = {"required": True, "content": {
    "image/jpeg": _BINARY, "image/png": _BINARY, "application/octet-stream": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}},
}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "empty, truncated or undecodable image"},
    413: {"model": ErrorMessage, "description": "larger than max_upload_bytes"},
    415: {"model": ErrorMessage, "description": "not an image or multipart upload"},
    503: {"model": ErrorMessage, "description": "no model loaded"},
}


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


# ---- middleware --------------------------------------------------------------------------
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


# ---- the app -----------------------------------------------------------------------------
def create_app(runtime: Runtime) -> FastAPI:
    rt = runtime
    s = rt.settings

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
    app.include_router(status_page.router(rt))

    def served() -> Served:
        current = rt.holder.current
        if current is None:
            raise _error(503, "no model loaded")
        return current

    def label_index(model: Served, label: str | None) -> int | None:
        if label is None:
            return None
        try:
            return model.card.class_names.index(label)
        except ValueError:
            names = ", ".join(model.card.class_names[:20])
            raise _error(422, f"unknown label '{label}'; the model's classes are: {names}") from None

    async def read_image(request: Request) -> tuple[bytes, str]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > s.max_upload_bytes:
            raise _error(413, f"payload of {length} bytes exceeds max_upload_bytes ({s.max_upload_bytes})")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=10, max_part_size=s.max_upload_bytes)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise _error(422, "multipart body needs a file field named 'file'")
            data = await upload.read(s.max_upload_bytes + 1)
            ctype = (upload.content_type or "application/octet-stream").lower()
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            data = bytearray()
            async for chunk in request.stream():
                data += chunk
                if len(data) > s.max_upload_bytes:
                    raise _error(413, f"payload exceeds max_upload_bytes ({s.max_upload_bytes})")
            data = bytes(data)
        else:
            raise _error(415, f"send an image (image/jpeg, image/png, …) or multipart/form-data with a 'file' field, not '{ctype or 'no content type'}'")
        if len(data) > s.max_upload_bytes:
            raise _error(413, f"payload exceeds max_upload_bytes ({s.max_upload_bytes})")
        if not data:
            raise _error(400, "empty image")
        return data, ctype

    @app.post("/infer", response_model=InferResponse, response_model_by_alias=True, summary="Classify an image and buffer it",
              openapi_extra={"requestBody": INFER_BODY}, responses=ERROR_RESPONSES)
    async def infer(request: Request, label: str | None = Query(None, description="the true class, when known")) -> Any:
        model = served()
        index = label_index(model, label)
        data, ctype = await read_image(request)
        started = time.perf_counter()
        try:
            tensor = await run_in_threadpool(decode_image, data, model.card.input_size)
        except DataError as exc:
            raise _error(400, str(exc)) from None
        top = await run_in_threadpool(model.predict, tensor.unsqueeze(0))
        latency = time.perf_counter() - started
        rt.metrics.inference_latency.observe(latency)
        rt.gate.note_request()
        best = top[0][0]
        result = {
            "top": [{"class": model.card.class_names[i], "index": i, "score": p} for i, p in top[0]],
            "model_version": model.version, "latency_ms": latency * 1000, "sample_id": None, "buffered": False,
        }
        sample = NewSample(data, ctype, label=index, pred=best[0], confidence=best[1], model_version=model.version)
        try:
            stored = await asyncio.wrap_future(rt.buffer.submit(sample))
            result.update(sample_id=stored.id, buffered=not stored.duplicate)
            if not stored.duplicate:
                rt.metrics.samples_ingested.labels(source="infer").inc()
        except StorageError as exc:  # inference keeps working when the disk is full or read-only
            result["buffer_error"] = str(exc)
        return result

    @app.post("/samples/{sample_id}/label", summary="Give the true class of a buffered sample")
    async def set_label(body: LabelRequest, sample_id: int = Path(ge=1, le=2**63 - 1, description="a SQLite rowid")) -> dict:
        index = label_index(served(), body.label)
        try:
            found = await run_in_threadpool(rt.buffer.set_label, sample_id, index)
        except StorageError as exc:
            raise _error(exc.http_status, str(exc)) from None
        if not found:
            raise _error(404, f"no buffered sample {sample_id} (never stored, or evicted)")
        return {"sample_id": sample_id, "label": body.label}

    @app.post("/samples", status_code=201, summary="Bulk ingest of images, labelled or not, without inference")
    async def add_samples(body: SamplesRequest) -> dict:
        model = served()
        prepared = []
        for i, item in enumerate(body.samples):
            try:
                data = base64.b64decode(item.image, validate=True)
            except (binascii.Error, ValueError):
                raise _error(422, f"samples[{i}].image is not valid base64") from None
            if len(data) > s.max_upload_bytes:
                raise _error(413, f"samples[{i}] exceeds max_upload_bytes ({s.max_upload_bytes})")
            try:
                await run_in_threadpool(decode_image, data, model.card.input_size)
            except DataError as exc:
                raise _error(422, f"samples[{i}]: {exc}") from None
            prepared.append(NewSample(data, "application/octet-stream", label=label_index(model, item.label), source="ingest"))
        try:
            stored = await run_in_threadpool(rt.buffer.add_many, prepared)
        except StorageError as exc:
            raise _error(exc.http_status, str(exc)) from None
        rt.metrics.samples_ingested.labels(source="ingest").inc(sum(not x.duplicate for x in stored))
        return {"sample_ids": [x.id for x in stored], "stored": sum(not x.duplicate for x in stored), "duplicates": sum(x.duplicate for x in stored)}

    def start_cycle(body: PruneRequest) -> JSONResponse:
        from prune_core.criteria import parse_criteria
        from prune_core.surgery import parse_allocations

        criterion = body.criterion or s.cycle_criterion
        allocation = body.allocation or s.cycle_allocation
        try:
            parse_criteria(criterion)
            parse_allocations(allocation)
        except ValueError as exc:
            raise _error(422, str(exc)) from None
        level = body.level if body.level is not None else s.cycle_level
        epochs = body.epochs if body.epochs is not None else s.cycle_epochs
        try:
            record = rt.scheduler.request(level, criterion, allocation, epochs, body.force)
        except Conflict as exc:
            raise _error(409, str(exc)) from None
        return JSONResponse({"cycle_id": record.id, "state": record.state}, status_code=202, headers={"Location": f"/cycles/{record.id}"})

    @app.post("/prune", status_code=202, response_model=CycleAccepted, summary="Start a prune-retrain cycle")
    async def prune(body: PruneRequest | None = Body(None)) -> JSONResponse:
        return start_cycle(body or PruneRequest())

    @app.get("/prune", status_code=202, response_model=CycleAccepted, summary="Start a cycle with defaults (for bare curl)")
    async def prune_get() -> JSONResponse:
        return start_cycle(PruneRequest())

    @app.get("/cycles", summary="Cycle history, newest first")
    async def cycles(limit: int = Query(50, ge=1, le=1000)) -> list[dict]:
        records = sorted(rt.scheduler.records.values(), key=lambda r: r.created, reverse=True)
        return [r.to_dict() for r in records[:limit]]

    @app.get("/cycles/{cycle_id}", summary="One cycle")
    async def cycle(cycle_id: str) -> dict:
        record = rt.scheduler.records.get(cycle_id)
        if record is None:
            raise _error(404, f"no cycle '{cycle_id}'")
        return record.to_dict()

    def describe(version: str) -> dict:
        card = rt.store.card(version)
        return {
            "version": version, "active": version == (rt.holder.current.version if rt.holder.current else None),
            "arch": card.arch, "params": card.params, "macs": card.macs, "input_size": card.input_size,
            "num_classes": card.num_classes, "lineage": card.lineage.__dict__,
        }

    @app.get("/models", summary="Stored model versions")
    async def models() -> list[dict]:
        return [describe(v) for v in reversed(rt.store.versions())]

    @app.post("/models/{version}/activate", summary="Roll back or forward to a stored version")
    async def activate(version: str) -> dict:
        try:
            rt.store.path(version)
        except UnknownVersion as exc:
            raise _error(422, str(exc.args[0])) from None
        if version not in rt.store.versions():
            raise _error(404, f"no model version '{version}'")
        current = rt.scheduler.current
        if current is not None and current.state not in FINAL_STATES:
            raise _error(409, f"cycle {current.id} is {current.state}; activate after it ends")
        try:
            model = await run_in_threadpool(rt.scheduler.activate, version)
        except Exception as exc:
            raise _error(409, f"version {version} cannot be served: {exc}") from None
        return {"active": model.version, "params": model.params, "macs": model.macs}

    @app.get("/status", summary="Model, buffer, scheduler, telemetry and current cycle")
    async def status() -> dict:
        model = rt.holder.current
        buffer = await run_in_threadpool(rt.buffer.stats)
        names = model.card.class_names if model else []
        buffer["per_class"] = {
            (names[k] if isinstance(k, int) and 0 <= k < len(names) else "unknown"): n for k, n in buffer["per_class"].items()
        }
        current = rt.scheduler.current
        return {
            "model": None if model is None else {
                "version": model.version, "arch": model.card.arch, "params": model.params, "macs": model.macs,
                "input_size": model.card.input_size, "num_classes": model.card.num_classes, "device": str(model.device),
            },
            "buffer": buffer,
            "scheduler": rt.scheduler.status(),
            "telemetry": {"provider": rt.provider.name, **rt.scheduler.reading.to_dict(), "limits": {
                "thermal_limit_c": s.thermal_limit_c, "power_budget_w": rt.gate.power_budget(rt.scheduler.reading),
                "max_cpu_load": s.max_cpu_load, "max_gpu_load": s.max_gpu_load}},
            "cycle": current.to_dict() if current is not None else None,
        }

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="The process is alive")
    async def healthz() -> dict:
        return {"ok": True}

    @app.get("/readyz", summary="A model is loaded and serving")
    async def readyz() -> JSONResponse:
        model = rt.holder.current
        if model is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "model_version": model.version})

    return app
