"""Cycles: start one (POST /prune, or GET /prune for a bare curl), the history, one cycle."""
from __future__ import annotations

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..runtime import Conflict, NotFound, Runtime
from .schemas import CycleAccepted, Disagreements, ErrorMessage, PruneRequest, error


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    async def start_cycle(body: PruneRequest) -> JSONResponse:
        try:
            record = await run_in_threadpool(rt.request_cycle, body.level, body.criterion, body.allocation, body.epochs, body.force)
        except ValueError as exc:
            raise error(422, str(exc)) from None
        except Conflict as exc:
            raise error(409, str(exc)) from None
        return JSONResponse({"cycle_id": record["id"], "state": record["state"]}, status_code=202,
                            headers={"Location": f"/cycles/{record['id']}"})

    @r.post("/prune", status_code=202, response_model=CycleAccepted, summary="Start a prune-retrain cycle")
    async def prune(body: PruneRequest | None = Body(None)) -> JSONResponse:
        return await start_cycle(body or PruneRequest())

    @r.get("/prune", status_code=202, response_model=CycleAccepted, summary="Start a cycle with defaults (for bare curl)")
    async def prune_get() -> JSONResponse:
        return await start_cycle(PruneRequest())

    @r.get("/cycles", summary="Cycle history, newest first")
    async def cycles(limit: int = Query(50, ge=1, le=1000)) -> list[dict]:
        return rt.list_cycles(limit)

    @r.get("/cycles/{cycle_id}", summary="One cycle")
    async def cycle(cycle_id: str) -> dict:
        try:
            return rt.cycle(cycle_id)
        except NotFound as exc:
            raise error(404, str(exc)) from None

    @r.get("/cycles/{cycle_id}/disagreements", response_model=Disagreements, responses={404: {"model": ErrorMessage}},
           summary="The disagreements a pending candidate asks labels for (each labelled with POST /samples/{id}/label)")
    async def disagreements(cycle_id: str) -> dict:
        try:
            return await run_in_threadpool(rt.disagreements, cycle_id)
        except NotFound as exc:
            raise error(404, str(exc)) from None

    return r
