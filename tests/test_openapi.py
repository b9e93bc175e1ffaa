"""broker/openapi.yaml: a valid OpenAPI 3.1 document, served as it is, which cannot drift
from the application: its routes, limits, error codes and input rules are checked against
the code here, and every answer against the document in tests/test_fuzz.py.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st

import broker
from broker import auth, errors, event, topics
from broker.config import Config
from broker.web import cors, openapi, publish, stream
from tests.conftest import Broker, BrokerFactory

ROOT = Path(__file__).parents[1]
OPENAPI = ROOT / "broker" / "openapi.yaml"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
LIMITS = event.EventLimits(max_topics=64, max_event_bytes=256 * 1024)


def load() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_path(OPENAPI)


DOCUMENT: dict[str, Any] = load().raw_schema
SCHEMAS: dict[str, Any] = DOCUMENT["components"]["schemas"]


def test_document_is_valid_openapi_3_1() -> None:
    load().validate()  # against the OpenAPI 3.1 meta-schema
    assert DOCUMENT["openapi"].startswith("3.1.")


def test_validation_would_catch_a_broken_document() -> None:
    """So that the test above is not passing for want of checking anything."""
    broken = copy.deepcopy(DOCUMENT)
    broken["paths"]["/publish"]["post"]["responses"] = "none"
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_schema_is_valid_json_schema(name: str) -> None:
    dialect = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    jsonschema_rs.meta.validate({**dialect, **SCHEMAS[name]})


async def test_served_as_the_file(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{broker.url}/openapi.yaml")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == openapi.CONTENT_TYPE
    assert response.content == OPENAPI.read_bytes()
    answers = DOCUMENT["paths"]["/openapi.yaml"]["get"]["responses"]["200"]["content"]
    assert set(answers) == {openapi.CONTENT_TYPE}


def test_shipped_in_the_package() -> None:
    """A wheel carries it: setuptools includes it as package data."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "openapi.yaml" in project["tool"]["setuptools"]["package-data"]["broker"]
    assert OPENAPI.parent == Path(broker.__file__).parent


async def test_every_route_is_documented_and_every_operation_routed(
    make_broker: BrokerFactory,
) -> None:
    # With every optional route on: the subscription API is routed only on request.
    broker = await make_broker(mercure_subscriptions=True)
    routed = set()
    for route in broker.server.app.router.routes():
        assert route.resource is not None
        method = route.method.lower()
        # aiohttp's add_get answers HEAD too; HTTP makes HEAD a GET without the body.
        routed.add(("get" if method == "head" else method, route.resource.canonical))
    documented = {
        (method, path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }
    assert routed == documented


def test_documented_limits_match_the_code() -> None:
    defaults = Config()
    assert SCHEMAS["Topic"]["maxLength"] == topics.MAX_TOPIC_LENGTH
    assert SCHEMAS["TopicPattern"]["maxLength"] == topics.MAX_TOPIC_LENGTH
    assert SCHEMAS["EventType"]["maxLength"] == event.MAX_TYPE_LENGTH
    assert SCHEMAS["Retry"]["maximum"] == event.MAX_RETRY_MS
    assert SCHEMAS["IdempotencyKey"]["maxLength"] == event.MAX_KEY_LENGTH
    assert SCHEMAS["LastEventId"]["maxLength"] == stream.MAX_LAST_EVENT_ID_LENGTH
    topic_lists = [
        parameter["schema"]
        for operation in (
            DOCUMENT["paths"]["/publish"]["post"],
            DOCUMENT["paths"]["/events"]["get"],
        )
        for parameter in operation["parameters"]
        if parameter["name"] == "topic"
    ]
    topic_lists += [SCHEMAS["Event"]["properties"]["topic"]["oneOf"][1]]
    topic_lists += [SCHEMAS["FormEvent"]["properties"]["topic"]]
    assert {schema["maxItems"] for schema in topic_lists} == {defaults.max_topics}
    security = DOCUMENT["components"]["securitySchemes"]
    assert security["cookieToken"]["name"] == defaults.jwt_cookie
    assert security["queryToken"]["name"] == auth.QUERY_PARAMETER
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert DOCUMENT["info"]["version"] == project["project"]["version"]


def test_documented_bodies_and_headers_match_the_code() -> None:
    body = DOCUMENT["paths"]["/publish"]["post"]["requestBody"]["content"]
    accepted = publish.JSON_TYPES | publish.FORM_TYPES | publish.NDJSON_TYPES
    assert set(body) == accepted
    assert set(SCHEMAS["Event"]["properties"]) == publish.EVENT_FIELDS
    documented_headers = {
        parameter["name"]
        for operation in (
            DOCUMENT["paths"]["/publish"]["post"],
            DOCUMENT["paths"]["/events"]["get"],
        )
        for parameter in operation["parameters"]
        if parameter["in"] == "header"
    }
    # Every header a browser may send cross-origin is described: as a parameter, or as the
    # body's media type (Content-Type) or the bearer security scheme (Authorization).
    described = documented_headers | {"Content-Type", "Authorization"}
    assert {name.strip() for name in cors.ALLOWED_HEADERS.split(",")} <= described


def error_codes(cls: type[errors.ClientError]) -> set[str]:
    codes = {cls.code}
    for subclass in cls.__subclasses__():
        codes |= error_codes(subclass)
    return codes


def test_every_error_code_is_documented() -> None:
    text = OPENAPI.read_text()
    for code in sorted(error_codes(errors.ClientError)):
        assert f"`{code}`" in text, code


# The document's input rules, against the broker's own checks, on generated strings.
SAMPLES = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(["a", "*", "**", "", "broker.", "\n", "\x7f", "é"])).map("/".join),
    st.sampled_from(["broker.x", "a\rb", "x" * 1024, "x" * 1025, "k" * 256, "k" * 257]),
)


def document_accepts(name: str, value: str) -> bool:
    return bool(jsonschema_rs.validator_for(SCHEMAS[name]).is_valid(value))


def code_accepts(check: Any, value: str) -> bool:
    try:
        check(value)
    except (topics.TopicError, errors.InvalidEvent):
        return False
    return True


def check_event_type(value: str) -> None:
    event.make_draft("t", "d", value, limits=LIMITS)


@settings(max_examples=300, deadline=None)
@given(value=SAMPLES)
def test_input_rules_agree_with_the_broker(value: str) -> None:
    # The Mercure hub's namespace is a URL resolution no pattern can state: the document
    # says it in words.
    in_namespace = topics.in_hub_namespace(value) if isinstance(value, str) else False
    documented = document_accepts("Topic", value) and not in_namespace
    assert documented == code_accepts(topics.validate_topic, value)
    assert document_accepts("TopicPattern", value) == code_accepts(topics.validate_pattern, value)
    assert document_accepts("EventType", value) == code_accepts(check_event_type, value)
    assert document_accepts("IdempotencyKey", value) == code_accepts(
        lambda key: event.check_key(key, "key"), value
    )
