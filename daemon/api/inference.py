"""POST /infer: classify an image (raw body or multipart) and buffer it.

The answer does not wait for the disk unless it must: an unlabelled image is queued for the
buffer's group commit behind the answer; a labelled one (or `?durable=true`) is committed first.
The route is a `DirectRoute` and writes its own JSON: FastAPI solves no parameters for a request
without a query string and validates no response model (the batcher decodes off the loop)."""
from __future__ import annotations

import asyncio
import math
import time

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from prune_core.imagedecode import DataError

from ..runtime import Runtime
from ..serving.batcher import InferenceError
from ..serving.serving import Answer, Served
from ..storage.buffer import NewSample, StorageError
from .routing import DirectRoute
from .schemas import ERROR_RESPONSES, INFER_BODY, BufferOutcome, InferResponse, error


def served_model(rt: Runtime) -> Served:
    model = rt.served()
    if model is None:
        raise error(503, "no model loaded")
    return model


def label_index(model: Served, label: str | None) -> int | None:
    """The class index of a label the model knows (422 naming its classes otherwise)."""
    if label is None:
        return None
    try:
        return model.card.class_names.index(label)
    except ValueError:
        names = ", ".join(model.card.class_names[:20])
        raise error(422, f"unknown label '{label}'; the model's classes are: {names}") from None


async def read_image(request: Request, max_bytes: int) -> tuple[bytes, str]:
    """The uploaded image and its content type; 413/415/400 for too big, not an image, empty."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise error(413, f"payload of {length} bytes exceeds max_upload_bytes ({max_bytes})")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10, max_part_size=max_bytes)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise error(422, "multipart body needs a file field named 'file'")
        data = await upload.read(max_bytes + 1)
        ctype = (upload.content_type or "application/octet-stream").lower()
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > max_bytes:
                raise error(413, f"payload exceeds max_upload_bytes ({max_bytes})")
        data = bytes(buf)
    else:
        raise error(415, f"send an image (image/jpeg, image/png, …) or multipart/form-data with a 'file' field, not '{ctype or 'no content type'}'")
    if len(data) > max_bytes:
        raise error(413, f"payload exceeds max_upload_bytes ({max_bytes})")
    if not data:
        raise error(400, "empty image")
    return data, ctype


async def buffer_sample(rt: Runtime, sample: NewSample, durable: bool) -> dict:
    """Buffer an answered request's image: committed before the answer when `durable`, else
    queued behind it. Returns the response's sample_id, buffered, buffer and buffer_error."""
    try:
        if durable:
            stored = await asyncio.wrap_future(rt.submit_sample(sample))
            outcome = BufferOutcome.DUPLICATE if stored.duplicate else BufferOutcome.STORED
            return {"sample_id": stored.id, "buffered": outcome is BufferOutcome.STORED, "buffer": outcome, "buffer_error": None}
        outcome = BufferOutcome.QUEUED if rt.queue_sample(sample) else BufferOutcome.DROPPED
        return {"sample_id": None, "buffered": False, "buffer": outcome, "buffer_error": None}
    except StorageError as exc:  # inference keeps working when the disk is full or read-only
        return {"sample_id": None, "buffered": False, "buffer": BufferOutcome.FAILED, "buffer_error": str(exc)}


def infer_response(model: Served, answer: Answer, latency_s: float, buffered: dict) -> JSONResponse:
    """The InferResponse body, serialised here rather than validated by FastAPI on every request
    (tests/daemon/test_api_inprocess.py checks it against the model)."""
    top = [{"class": model.card.class_names[i], "index": i, "score": p if math.isfinite(p) else None}  # as pydantic writes NaN
           for i, p in answer.top]
    return JSONResponse({"sample_id": buffered["sample_id"], "buffered": buffered["buffered"], "buffer": buffered["buffer"].value,
                         "top": top, "model_version": model.version, "latency_ms": latency_s * 1000,
                         "buffer_error": buffered["buffer_error"]})


def router(rt: Runtime) -> APIRouter:
    r = APIRouter(route_class=DirectRoute)

    @r.post("/infer", response_model=InferResponse, summary="Classify an image and buffer it",
            openapi_extra={"requestBody": INFER_BODY}, responses=ERROR_RESPONSES)
    async def infer(request: Request, label: str | None = Query(None, description="the true class, when known"),
                    durable: bool = Query(False, description="answer only once the image is committed to the buffer, with its"
                                          " sample_id (implied by label); otherwise it is queued behind the answer")) -> Response:
        model = served_model(rt)
        index = label_index(model, label)
        data, ctype = await read_image(request, rt.settings.max_upload_bytes)
        started = time.perf_counter()
        try:
            result = await rt.answer(model, data)
        except DataError as exc:
            raise error(400, str(exc)) from None
        except InferenceError as exc:
            raise error(500, str(exc)) from None
        latency = time.perf_counter() - started
        answer = result.answer
        rt.note_inference(latency, model, result.image, answer, index)
        best = answer.top[0]
        sample = NewSample(data, ctype, label=index, pred=best[0], confidence=best[1], model_version=model.version,
                           likelihood=None if answer.row is None else answer.row.tobytes(), raw_pred=answer.raw_pred)
        return infer_response(model, answer, latency, await buffer_sample(rt, sample, durable=durable or index is not None))

    return r
