"""Client mistakes, as one exception hierarchy.

Everything a request can do wrong raises a ``ClientError``; the web layer turns it into
the JSON error body ``{"error": code, "detail": text}`` with the status given here, in
one place (``broker.web.errors``). Anything else reaching that layer is a bug: a 500.
"""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    status = 400
    code = "bad_request"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}


class InvalidEvent(ClientError):
    code = "invalid_event"


class InvalidSubscription(ClientError):
    code = "invalid_subscription"


class InvalidBody(ClientError):
    code = "invalid_body"


class OriginNotAllowed(ClientError):
    status = 403
    code = "origin_not_allowed"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class Unavailable(ClientError):
    """The broker cannot take this request now; ``Retry-After`` tells when to try again."""

    status = 503
    code = "unavailable"

    def __init__(
        self, detail: str, *, retry_after: int = 1, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, extra=extra)


class TooManyConnections(Unavailable):
    code = "too_many_connections"


class Unauthorized(ClientError):
    """No usable token where one is needed, or a token that does not verify (RFC 6750)."""

    status = 401
    code = "unauthorized"

    def __init__(self, detail: str, *, invalid_token: bool = True) -> None:
        challenge = 'Bearer error="invalid_token"' if invalid_token else "Bearer"
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(ClientError):
    """A valid token (or none, where none is allowed) that does not grant this."""

    status = 403
    code = "forbidden"

    def __init__(self, detail: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(
            detail,
            headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
            extra=extra,
        )


class TooManyRequests(ClientError):
    """A publisher over its rate; ``Retry-After`` says when its bucket holds enough again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, detail: str, *, retry_after: int, extra: dict[str, Any] | None = None):
        super().__init__(detail, headers={"Retry-After": str(retry_after)}, extra=extra)


class RequestTimeout(ClientError):
    """A client too slow to send its request: its head, or its publish body."""

    status = 408
    code = "request_timeout"
