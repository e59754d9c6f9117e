"""Request and response bodies, and the OpenAPI pieces declared by hand."""
from __future__ import annotations

from enum import Enum
from typing import Any, Literal, Union

from fastapi import HTTPException
from pydantic import BaseModel, Field


class TopClass(BaseModel):
    class_: str = Field(alias="class")
    index: int
    score: float

    model_config = {"populate_by_name": True}


class BufferOutcome(str, Enum):
    """What became of an /infer request's image by the time it was answered."""

    STORED = "stored"  # committed as a new row before the answer: survives kill -9; sample_id is its row
    DUPLICATE = "duplicate"  # the same image was already buffered: sample_id is that row (a label updates it)
    QUEUED = "queued"  # handed to the group commit behind the answer: no sample_id yet; lost if the daemon is killed first
    DROPPED = "dropped"  # the queue of samples waiting for a commit was full: not buffered (counted), the answer stands
    FAILED = "failed"  # the buffer refused the write (disk full, read-only): see buffer_error


class InferResponse(BaseModel):
    sample_id: int | None = Field(description="the buffer row, when known at answer time (stored or duplicate), else null")
    buffered: bool = Field(description="true only when the image was committed as a new row before the answer (buffer: stored)")
    buffer: BufferOutcome = Field(description="stored, duplicate, queued, dropped or failed (docs/api.md)")
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
    """Options left out take the configured ones; level, criterion and allocation are checked by
    prune_core.options.check_cycle_options (422 with its message)."""

    level: Union[Literal["auto"], float, None] = Field(None, description="'auto' or a fraction of parameters to remove, between 0 and 1")
    criterion: str | None = Field(None, description="a criterion, or a comma-separated list to try")
    allocation: str | None = Field(None, description="uniform, global, or uniform,global")
    epochs: int | None = Field(None, ge=0, le=1000)
    force: bool = False


class CycleAccepted(BaseModel):
    cycle_id: str
    state: str


class LabelResponse(BaseModel):
    sample_id: int
    label: str


class AskedLabel(BaseModel):
    """A judging sample a pending candidate and the served model answer differently."""

    sample_id: int
    image_url: str = Field(description="GET it for the image as it was received")
    teacher: str = Field(description="the (prior-corrected) served model's answer")
    candidate: str = Field(description="the candidate's answer")
    label: str | None = Field(description="the true class, once given (POST /samples/{sample_id}/label)")


class Disagreements(BaseModel):
    """The labels a cycle's candidate asks for: its disagreements with the served model, in the order
    they count (each counts once every one before it is labelled)."""

    cycle_id: str
    state: str
    reason: str | None
    judging_samples: int | None = Field(description="samples the candidate was judged on (none took part in its training)")
    disagreements: int | None = Field(description="of them, those the two answer differently")
    classes: list[str] = Field(description="the class names a label may take")
    asked: list[AskedLabel]


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
    500: {"model": ErrorMessage, "description": "the forward pass failed"},
    503: {"model": ErrorMessage, "description": "no model loaded"},
}


def error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)
