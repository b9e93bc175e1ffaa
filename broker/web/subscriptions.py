"""Mercure's subscription API: the active subscriptions as JSON-LD (``broker.subscriptions``).

* ``/.well-known/mercure/subscriptions``: every active subscription;
* ``/.well-known/mercure/subscriptions/{matchType}/{match}``: those of one matcher;
* ``/.well-known/mercure/subscriptions/{matchType}/{match}/{subscriber}``: one (404
  when it is not active).

The path, in its canonical form (each variable percent-encoded once, as event topics
are), is the topic the token must grant ``subscribe`` on, so one matcher covers both a
subscription's events and its resources. Without a token the answer is 401, with a
token that does not grant it 403; ended subscriptions are not listed.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import orjson
from aiohttp import web

from broker.discovery import hub_url, link_header
from broker.errors import ClientError, Forbidden
from broker.subscriptions import CONTEXT, PREFIX, Registry, matcher_path, subscription_topic
from broker.web.mercure import grants_for
from broker.web.state import STATE

CONTENT_TYPE = "application/ld+json"


class NotFound(ClientError):
    status = 404
    code = "not_found"


def install(app: web.Application) -> None:
    app.router.add_get(PREFIX, handle_subscriptions, allow_head=False)
    app.router.add_get(PREFIX + "/{matchType}/{match}", handle_subscriptions, allow_head=False)
    app.router.add_get(
        PREFIX + "/{matchType}/{match}/{subscriber}", handle_subscriptions, allow_head=False
    )


async def handle_subscriptions(request: web.Request) -> web.Response:
    state = request.app[STATE]
    registry = state.subscriptions
    assert registry is not None  # the routes exist only with the registry
    variables = _variables(request.rel_url.raw_path)
    if len(variables) == 0:
        path = PREFIX
    elif len(variables) == 2:
        path = matcher_path(*variables)
    else:
        path = subscription_topic(*variables)
    hub = hub_url(request, state.config)
    grants = grants_for(
        request,
        state,
        hub,
        state.gatekeeper.subscriber,
        required="the subscription API needs a token granting subscribe on the path",
    )
    if grants is None or not grants.subscribe.matches_any((path,)):
        raise Forbidden(f"the token does not grant subscribe on {path!r}")
    return web.Response(
        body=orjson.dumps(_answer(registry, variables, path)),
        content_type=CONTENT_TYPE,
        headers={"Link": link_header(hub), "Cache-Control": "private, no-cache"},
    )


def _variables(raw_path: str) -> list[str]:
    """The path's variables after the collection's path, decoded: none, (matchType,
    match) or (matchType, match, subscriber)."""
    rest = raw_path[len(PREFIX) :]
    if not rest:
        return []
    parts = rest[1:].split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise NotFound(f"no such resource; expected {PREFIX}[/matchType/match[/subscriber]]")
    try:
        return [urllib.parse.unquote(part, errors="strict") for part in parts]
    except UnicodeDecodeError:
        raise NotFound("the path is not percent-encoded UTF-8") from None


def _answer(registry: Registry, variables: list[str], path: str) -> dict[str, Any]:
    if len(variables) == 3:
        found = registry.subscription(path)
        if found is None:
            raise NotFound(f"no active subscription {path!r}")
        return {"@context": CONTEXT, **found, "lastEventID": registry.last_event_id}
    matcher = None if not variables else (variables[0], variables[1])
    return {
        "@context": CONTEXT,
        "id": path,
        "type": "Subscriptions",
        "lastEventID": registry.last_event_id,
        "subscriptions": registry.subscriptions(matcher),
    }
