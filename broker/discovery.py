"""How clients find the Mercure hub and learn how to talk to it.

Mercure's discovery is the publisher's job: the resources it serves carry a
``Link: <hub>; rel="mercure"`` header (``link_header`` builds one). The hub's own part is
its URL, which relative topics and URL patterns resolve against (``hub_url``), and the
OAuth 2.0 protected-resource
metadata (RFC 9728) that tells a client which audience to put in its tokens and how it
may present them (``resource_metadata``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker.config import Config
from broker.limits import from_trusted_proxy
from broker.topics import HUB_PATH

METADATA_PATH = "/.well-known/oauth-protected-resource" + HUB_PATH
# The revision of the Mercure draft this hub implements, as the metadata announces it.
MERCURE_VERSION = 8


def origin(request: web.Request, config: Config) -> str:
    """The origin clients reach us at: ``--public-url`` when set; else the request's
    ``Host``, with the scheme a ``--trusted-proxy`` says the client used
    (``X-Forwarded-Proto``: behind a TLS proxy our own connection is plain HTTP)."""
    if config.public_url is not None:
        return config.public_url
    url = request.url
    if config.trusted_proxies and from_trusted_proxy(request, config.trusted_proxies):
        scheme = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        if scheme in ("http", "https"):
            url = url.with_scheme(scheme)
    return str(url.origin())


def hub_url(request: web.Request, config: Config) -> str:
    return origin(request, config) + HUB_PATH


def link_header(
    hub: str, *, last_event_id: str | None = None, content_type: str | None = None
) -> str:
    """The ``Link`` header value a publisher adds to a resource so that its clients find
    the hub: ``<hub>; rel="mercure"``, with the optional ``last-event-id`` (the id of
    the last update when the resource was generated, for a loss-free subscription)
    and ``content-type`` (of the updates) target attributes."""
    value = f'<{hub}>; rel="mercure"'
    if last_event_id is not None:
        value += f"; last-event-id={_quoted(last_event_id)}"
    if content_type is not None:
        value += f"; content-type={_quoted(content_type)}"
    return value


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resource_metadata(*, resource: str, issuer: str | None) -> dict[str, Any]:
    """The RFC 9728 document served at ``METADATA_PATH``: tokens come in the header, the
    ``access_token`` query parameter or the cookie (``mercure_cookie``)."""
    document: dict[str, Any] = {
        "resource": resource,
        "bearer_methods_supported": ["header", "query"],
        "mercure_version": MERCURE_VERSION,
        "mercure_cookie": True,
    }
    if issuer is not None:
        document["authorization_servers"] = [issuer]
    return document
