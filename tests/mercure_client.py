"""What the Mercure spec tests share: a subscriber and a publisher speaking the protocol
over real HTTP (httpx and httpx-sse), and access tokens as an authorization server or a
self-issuing publisher would mint them.

A reader stops at a public sentinel update published last, so "received nothing else"
is a complete statement, not a timeout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
import jwt
from httpx_sse import ServerSentEvent, aconnect_sse

from tests.conftest import JWT_KEY, SENTINEL, events_of, until_sentinel

HUB = "/.well-known/mercure"
SENTINEL_TOPIC = "urn:test:sentinel"
# The key Mercure's own conformance suite signs its tokens with.
MERCURE_CONFORMANCE_KEY = "!ChangeThisMercureHubJWTSecretKey!"

Params = Sequence[tuple[str, str]]


@contextlib.asynccontextmanager
async def subscribe(
    http: httpx.AsyncClient,
    url: str,
    params: Params,
    *,
    headers: Mapping[str, str] | None = None,
    sentinel: str | None = SENTINEL_TOPIC,
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[ServerSentEvent]]]:
    """An open Mercure subscription that also listens to the ``sentinel`` topic."""
    query = list(params) if sentinel is None else [*params, ("match", sentinel)]
    async with aconnect_sse(
        http, "GET", url + HUB, params=query, headers=dict(headers or {})
    ) as source:
        assert source.response.status_code == 200, await source.response.aread()
        yield source.response, events_of(source)


async def publish(
    http: httpx.AsyncClient,
    url: str,
    topic: str | Sequence[str],
    data: str = "",
    *,
    token: str | None = None,
    **fields: str,
) -> str:
    """Publish one update as a Mercure form and return its id."""
    response = await post(http, url, topic, data, token=token, **fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def post(
    http: httpx.AsyncClient,
    url: str,
    topic: str | Sequence[str],
    data: str = "",
    *,
    token: str | None = None,
    **fields: str,
) -> httpx.Response:
    topics = [topic] if isinstance(topic, str) else list(topic)
    form = [("topic", t) for t in topics] + [("data", data)] + list(fields.items())
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return await http.post(url + HUB, data=dict_pairs(form), headers=headers)


def dict_pairs(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """httpx takes repeated form fields as a list per name."""
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


async def end(
    http: httpx.AsyncClient,
    url: str,
    token: str | None = None,
    *,
    topic: str = SENTINEL_TOPIC,
    private: bool = False,
) -> None:
    fields = {"private": "on"} if private else {}
    await publish(http, url, topic, SENTINEL, token=token, **fields)


async def data_until_sentinel(events: AsyncIterator[ServerSentEvent]) -> list[str]:
    return [event.data for event in await until_sentinel(events)]


def detail(actions: Sequence[str], *matches: str | tuple[str, str], **extra: Any) -> dict[str, Any]:
    """A ``mercure`` authorization detail; a match is a string (``Exact`` by default) or
    a (match, matchType) pair."""
    topics = [
        {"match": m} if isinstance(m, str) else {"match": m[0], "matchType": m[1]} for m in matches
    ]
    return {"type": "mercure", "actions": list(actions), "topics": topics, **extra}


def access_token(
    *details: Any,
    key: str = JWT_KEY,
    typ: str | None = "at+jwt",
    lifetime: int | None = 3600,
    **claims: Any,
) -> str:
    """An RFC 9068 access token carrying ``authorization_details``."""
    payload: dict[str, Any] = {"authorization_details": list(details), **claims}
    if lifetime is not None:
        payload.setdefault("exp", int(time.time()) + lifetime)
    headers = {} if typ is None else {"typ": typ}
    return jwt.encode(payload, key, algorithm="HS256", headers=headers)


PUBLISHER = access_token(detail(["publish"], "*"))
