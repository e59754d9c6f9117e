"""A small client for the daemon's HTTP API, for the commands that talk to a running daemon
(`edgetune status`, `watch`, `demo`). Standard library only (httpx is a test tool); one
keep-alive connection, reopened once when the server has closed an idle one."""
from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_URL = "http://127.0.0.1:8000"


class Unreachable(ConnectionError):
    """No answer from the daemon (not running, wrong URL, connection dropped)."""


class ApiError(RuntimeError):
    """The daemon answered with an HTTP error; `detail` is its message."""

    def __init__(self, method: str, path: str, status: int, detail: str):
        super().__init__(f"{method} {path}: HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class ApiClient:
    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 60):
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// URL: {url}")
        self.token = token
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, accept: tuple[int, ...] = ()) -> Any:
        """The decoded JSON answer. HTTP errors raise ApiError unless their status is in `accept`
        (e.g. 503 from /readyz while the daemon is starting)."""
        headers = {"Accept": "application/json", **(headers or {})}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.conn.close()
                if attempt == 2:
                    raise Unreachable(f"cannot reach the daemon at {self.url} ({exc})") from None
        if response.status >= 400 and response.status not in accept:
            try:
                detail = str(json.loads(data).get("detail", response.reason))
            except (ValueError, AttributeError):
                detail = data[:300].decode(errors="replace") or response.reason
            raise ApiError(method, path, response.status, detail)
        return json.loads(data)

    def get(self, path: str, accept: tuple[int, ...] = ()) -> Any:
        return self.request("GET", path, accept=accept)

    def infer(self, image: bytes, label: str | None = None, content_type: str = "image/png") -> dict:
        path = "/infer" + (f"?label={quote(label)}" if label is not None else "")
        return self.request("POST", path, image, {"content-type": content_type})

    def close(self) -> None:
        self.conn.close()
