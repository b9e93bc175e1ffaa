"""Cross-origin access for browsers, limited to the configured origins.

``EventSource`` with ``withCredentials`` needs the exact origin echoed back together with
``Access-Control-Allow-Credentials``; ``*`` is only ever sent when ``*`` is configured,
and then without credentials, as the Fetch standard requires. Headers are added when a
response is prepared, because a stream's headers leave before its handler returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web

from broker.errors import OriginNotAllowed

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Content-Type, Last-Event-ID, Authorization, Idempotency-Key"
PREFLIGHT_MAX_AGE = "600"
# Response headers a page's script may read: when to retry, why a token was refused, and
# (Mercure) where a resumed stream really starts.
EXPOSED_HEADERS = "Retry-After, WWW-Authenticate, Last-Event-ID, Link"


class CorsPolicy:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins) - {"*"}

    def allow_origin(self, origin: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, or None to refuse."""
        if origin in self._origins:
            return origin
        return "*" if self._any else None

    async def add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return
        allowed = self.allow_origin(origin)
        response.headers.add("Vary", "Origin")
        if allowed is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if allowed != "*":
            response.headers["Access-Control-Allow-Credentials"] = "true"

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is None or "Access-Control-Request-Method" not in request.headers:
            return web.Response(status=204, headers={"Allow": ALLOWED_METHODS})
        if self.allow_origin(origin) is None:
            raise OriginNotAllowed(f"origin {origin!r} is not allowed")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            },
        )


def install(app: web.Application, origins: tuple[str, ...], paths: Iterable[str]) -> None:
    policy = CorsPolicy(origins)
    app.on_response_prepare.append(policy.add_headers)
    for path in paths:
        app.router.add_route("OPTIONS", path, policy.preflight)
