"""``GET /openapi.yaml``: the API description, from the package that serves the API.

The document ships inside the ``broker`` package, so every install (editable or wheel)
serves the description of the code it runs; tests/test_openapi.py keeps the two in step.
It is read at import, so an install that lacks it fails at start, not on a request.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

# RFC 9512. YAML carries no charset parameter: it is UTF-8 here, as YAML 1.2 defaults to.
CONTENT_TYPE = "application/yaml"
DOCUMENT = resources.files("broker").joinpath("openapi.yaml").read_bytes()


async def handle_openapi(request: web.Request) -> web.Response:
    return web.Response(body=DOCUMENT, content_type=CONTENT_TYPE)
