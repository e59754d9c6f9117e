"""What a person looks at: the status page (`GET /`, files shipped in `daemon/static/`, no CDN) and
each cycle's report (`GET /cycles/{id}/report`, `/cycles/{id}/report.png`)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, Response

from ..cycles.report import REPORT_JSON, REPORT_PNG
from ..runtime import NotFound, Runtime

STATIC_DIR = Path(__file__).parents[1] / "static"
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "index.html": "text/html"}


@lru_cache(maxsize=None)
def static_file(name: str) -> bytes:
    """A file of the page, read once from the installed package (package data: see pyproject)."""
    return (STATIC_DIR / name).read_bytes()


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()
    no_cache = {"Cache-Control": "no-cache"}  # an upgraded daemon must not be shown with a stale script

    @r.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(static_file("index.html"), media_type="text/html; charset=utf-8", headers=no_cache)

    @r.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"no static file '{name}'")
        return Response(static_file(name), media_type=f"{STATIC[name]}; charset=utf-8", headers=no_cache)

    def report_path(cycle_id: str, filename: str):
        # Only ids of known cycles reach the file system: nothing else can name a path.
        try:
            folder = rt.cycle_folder(cycle_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        path = folder / filename
        if not path.is_file():
            finished = rt.cycle(cycle_id)["finished"] is not None
            why = "it ended before reports existed, or the report is still being written" if finished else "it has not finished"
            raise HTTPException(404, f"cycle {cycle_id} has no report ({why})")
        return path

    @r.get("/cycles/{cycle_id}/report", summary="A finished cycle's report: outcome, accuracy, channels kept, loss curve")
    async def report(cycle_id: str) -> dict:
        return json.loads(report_path(cycle_id, REPORT_JSON).read_text())

    @r.get("/cycles/{cycle_id}/report.png", summary="A finished cycle's report as a picture", response_class=FileResponse)
    async def report_png(cycle_id: str) -> FileResponse:
        return FileResponse(report_path(cycle_id, REPORT_PNG), media_type="image/png")

    return r
