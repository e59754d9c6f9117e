"""Model versions: the list, and activation (rollback or roll forward)."""
from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..runtime import Conflict, NotFound, Runtime
from .schemas import error


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.get("/models", summary="Stored model versions")
    async def models() -> list[dict]:
        return rt.models()

    @r.post("/models/{version}/activate", summary="Roll back or forward to a stored version")
    async def activate(version: str) -> dict:
        try:
            model = await run_in_threadpool(rt.activate, version)
        except ValueError as exc:
            raise error(422, str(exc)) from None
        except NotFound as exc:
            raise error(404, str(exc)) from None
        except Conflict as exc:
            raise error(409, str(exc)) from None
        return {"active": model.version, "params": model.params, "macs": model.macs}

    return r
