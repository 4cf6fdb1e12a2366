"""The files of `static/`: the pairing page at `/` and the browser client at `/tandem.js`.

Each file is served with its content type, a strong ETag (a hash of its
bytes) and `Cache-Control: no-cache`: a browser keeps a copy and asks each
time whether it is still current, so a new release reaches every page at
once (the URLs carry no version) and an unchanged file costs a 304. A file
is read again when its size or modification time changes, so a developer's
edit shows on the next reload. The page gets a Content-Security-Policy that
allows nothing from another host; the client (`tandem.js`, `tandem.d.ts`) may
be imported by an app on any origin (CORS).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Path -> (file in static/, content type). Nothing else in static/ is served.
FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/tandem.js": ("tandem.js", "text/javascript; charset=utf-8"),
    "/tandem.d.ts": ("tandem.d.ts", "text/plain; charset=utf-8"),
}
# The page loads its script, style and WebSocket from its own origin only, and
# may not be framed. CSP level 3 lets 'self' cover ws: and wss: to the same
# host; older browsers (Safari before 15.4) need the WebSocket origin spelled
# out, so the request's own host is added (when it is a plain host[:port]).
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'{sockets}; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int]  # (size, mtime in ns) of the file read
    body: bytes
    etag: str


class StaticFiles:
    """Serves FILES from `directory`, cached in memory per file version."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._cache: dict[str, _Loaded] = {}

    def routes(self) -> list[Route]:
        return [Route(path, self.serve, methods=["GET", "HEAD"]) for path in FILES]

    def _load(self, name: str) -> _Loaded:
        path = self._directory / name
        info = os.stat(path)
        stamp = (info.st_size, info.st_mtime_ns)
        loaded = self._cache.get(name)
        if loaded is None or loaded.stamp != stamp:
            body = path.read_bytes()
            loaded = _Loaded(stamp, body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
            self._cache[name] = loaded
        return loaded

    async def serve(self, request: Request) -> Response:
        name, content_type = FILES[request.url.path]
        loaded = self._load(name)
        headers = {
            "ETag": loaded.etag,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        }
        if name.endswith(".html"):
            headers["Content-Security-Policy"] = page_csp(request.headers.get("host"))
        elif name.startswith("tandem."):
            # An app on another origin imports the client as a module: a CORS fetch.
            headers["Access-Control-Allow-Origin"] = "*"
        if etag_matches(request.headers.get("if-none-match"), loaded.etag):
            return Response(status_code=304, headers=headers)
        body = b"" if request.method == "HEAD" else loaded.body
        response = Response(body, media_type=content_type, headers=headers)
        response.headers["Content-Length"] = str(len(loaded.body))
        return response


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (weak comparison, RFC 9110 13.1.2), or is `*`."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def page_csp(host: str | None) -> str:
    """The page's Content-Security-Policy, for a request that named `host`."""
    sockets = f" ws://{host} wss://{host}" if host and _HOST.fullmatch(host) else ""
    return PAGE_CSP.format(sockets=sockets)
