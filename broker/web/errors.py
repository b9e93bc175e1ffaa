"""The one place where failures become HTTP error responses.

Every error body has the same shape, ``{"error": code, "detail": text}``, whether it
comes from our own validation (``ClientError``), from aiohttp (404, 405, 413 on an
over-long body) or from a bug (500, logged with its traceback).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from broker.errors import ClientError

logger = logging.getLogger(__name__)

_NOT_COPIED = {"content-type", "content-length"}


def error_response(
    status: int,
    code: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if extra:
        body.update(extra)
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def _code_for(reason: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_") or "error"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ClientError as exc:
        return error_response(
            exc.status, exc.code, exc.detail, headers=exc.headers, extra=exc.extra
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _NOT_COPIED}
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return error_response(exc.status, _code_for(exc.reason), detail, headers=headers)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the broker failed; this is a bug")
