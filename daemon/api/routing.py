"""A FastAPI route for a hot endpoint: FastAPI's per-request machinery only where it has work to do."""
from __future__ import annotations

from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DirectRoute(APIRoute):
    """Calls its endpoint directly when the request has no query string: every parameter then takes
    its default, so FastAPI's parameter solving has nothing to do and is skipped. With a query
    string FastAPI parses and validates it as on any route (its 422s are unchanged).

    The endpoint is async, takes the Request and optional query parameters only, and returns a
    Response, so FastAPI validates no response model on either path; `response_model` still
    documents the body in the OpenAPI schema."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        solving = super().get_route_handler()
        d = self.dependant
        if d.path_params or d.header_params or d.cookie_params or d.body_params or d.dependencies or d.request_param_name is None:
            raise TypeError(f"DirectRoute {self.path}: the endpoint may take the Request and optional query parameters only")
        if any(p.field_info.is_required() for p in d.query_params):
            raise TypeError(f"DirectRoute {self.path}: a required query parameter has no default")
        defaults = {p.name: p.default for p in d.query_params}
        request_name, endpoint = d.request_param_name, self.endpoint

        async def handler(request: Request) -> Response:
            if request.scope.get("query_string"):
                return await solving(request)
            return await endpoint(**{request_name: request}, **defaults)

        return handler
