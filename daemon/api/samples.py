"""Samples: bulk ingest without inference, and labels for buffered samples."""
from __future__ import annotations

import base64
import binascii

from fastapi import APIRouter, Path
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from prune_core.imagedecode import DataError, decode_array

from ..runtime import NotFound, Runtime
from ..storage.buffer import NewSample, StorageError
from .inference import label_index, served_model
from .schemas import ErrorMessage, LabelRequest, LabelResponse, SamplesRequest, error


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()
    max_bytes = rt.settings.max_upload_bytes

    @r.post("/samples/{sample_id}/label", response_model=LabelResponse, summary="Give the true class of a buffered sample"
            " (a pending candidate that asked for it is judged again)")
    async def set_label(body: LabelRequest, sample_id: int = Path(ge=1, le=2**63 - 1, description="a SQLite rowid")) -> dict:
        index = label_index(served_model(rt), body.label)
        try:
            found = await run_in_threadpool(rt.label_sample, sample_id, index)
        except StorageError as exc:
            raise error(exc.http_status, str(exc)) from None
        if not found:
            raise error(404, f"no buffered sample {sample_id} (never stored, or evicted)")
        return {"sample_id": sample_id, "label": body.label}

    @r.get("/samples/{sample_id}/image", response_class=Response, responses={
        200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}, "description": "the image as received"},
        404: {"model": ErrorMessage, "description": "not buffered"}}, summary="A buffered sample's image")
    async def image(sample_id: int = Path(ge=1, le=2**63 - 1, description="a SQLite rowid")) -> Response:
        try:
            data, media = await run_in_threadpool(rt.sample_image, sample_id)
        except NotFound as exc:
            raise error(404, str(exc)) from None
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    @r.post("/samples", status_code=201, summary="Bulk ingest of images, labelled or not, without inference")
    async def add_samples(body: SamplesRequest) -> dict:
        model = served_model(rt)
        prepared = []
        for i, item in enumerate(body.samples):
            try:
                data = base64.b64decode(item.image, validate=True)
            except (binascii.Error, ValueError):
                raise error(422, f"samples[{i}].image is not valid base64") from None
            if len(data) > max_bytes:
                raise error(413, f"samples[{i}] exceeds max_upload_bytes ({max_bytes})")
            try:
                await run_in_threadpool(decode_array, data, model.card.preprocess)
            except DataError as exc:
                raise error(422, f"samples[{i}]: {exc}") from None
            prepared.append(NewSample(data, "application/octet-stream", label=label_index(model, item.label), source="ingest"))
        try:
            stored = await run_in_threadpool(rt.add_samples, prepared)
        except StorageError as exc:
            raise error(exc.http_status, str(exc)) from None
        return {"sample_ids": [x.id for x in stored], "stored": sum(not x.duplicate for x in stored),
                "duplicates": sum(x.duplicate for x in stored)}

    return r
