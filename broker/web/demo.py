"""``GET /``: a demo page for trying the broker from a browser (off with ``--no-demo``).

One self-contained file, shipped in the package like the OpenAPI document and read at
import. The page is served from the broker's own origin, where a visitor's token cookie
may live, so it gets a strict Content-Security-Policy: its inline script and style are
allowed by hash, and it may connect to nothing but this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

PAGE = resources.files("broker").joinpath("demo.html").read_bytes()


def _hashes(tag: str) -> str:
    """CSP source expressions for each inline ``<tag>`` element of the page."""
    bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), PAGE, re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in bodies
    )


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src {_hashes('script')}; style-src {_hashes('style')}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def handle_demo(request: web.Request) -> web.Response:
    return web.Response(body=PAGE, content_type="text/html", charset="utf-8", headers=HEADERS)
