"""Tokens: who may publish where, how tokens arrive, and every way a bad token is refused.

Tokens are minted with PyJWT exactly as a user's application would; the broker is served
on a real socket and spoken to with httpx.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from httpx_sse import aconnect_sse

from broker.auth import (
    Grants,
    TokenChecker,
    grants_from_claims,
    key_problem,
    start_warnings,
)
from broker.config import ConfigError, load_config
from broker.errors import Unauthorized
from tests.conftest import JWT_KEY, Broker, BrokerFactory, events_of, mint

OTHER_KEY = "another-hmac-secret-of-enough-length-42"


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def pem_pair(private: PrivateKey) -> tuple[str, str]:
    """(private, public) PEM texts: the application signs with one, the broker checks with
    the other."""
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


def rsa_pair() -> tuple[str, str]:
    return pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_pair() -> tuple[str, str]:
    return pem_pair(ec.generate_private_key(ec.SECP256R1()))


# --- keys and configuration -------------------------------------------------------------


def test_short_hmac_secret_is_refused() -> None:
    problem = key_problem("too-short", "HS256")
    assert problem is not None
    assert "32 bytes" in problem


def test_public_keys_are_accepted_and_private_keys_refused() -> None:
    rsa_private, rsa_public = rsa_pair()
    ec_private, ec_public = ec_pair()
    assert key_problem(rsa_public, "RS256") is None
    assert key_problem(ec_public, "ES256") is None
    for private, algorithm in ((rsa_private, "RS256"), (ec_private, "ES256")):
        problem = key_problem(private, algorithm)
        assert problem is not None
        assert "public key" in problem


def test_a_public_key_cannot_be_an_hmac_secret() -> None:
    """Algorithm confusion: a PEM public key used as an HMAC secret is refused outright."""
    _, public = rsa_pair()
    assert key_problem(public, "HS256") is not None


def test_key_errors_name_the_flag_but_never_echo_the_key() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(["--jwt-key", "secret-but-short"], environ={})
    assert "--jwt-key" in str(refused.value)
    assert "secret-but-short" not in str(refused.value)


def test_keys_come_from_flags_files_and_variables(tmp_path: Path) -> None:
    _, public = rsa_pair()
    key_file = tmp_path / "public.pem"
    key_file.write_text(public)
    config = load_config(
        ["--publisher-jwt-key-file", str(key_file), "--jwt-algorithm", "RS256"], environ={}
    )
    assert config.publisher_key is not None
    assert "BEGIN PUBLIC KEY" in config.publisher_key
    # The subscriber key was given for HMAC, but the algorithm is RS256 for both.
    with pytest.raises(ConfigError, match="--subscriber-jwt-key"):
        load_config(["--jwt-algorithm", "RS256"], environ={"BROKER_SUBSCRIBER_JWT_KEY": OTHER_KEY})
    shared = load_config([], environ={"BROKER_JWT_KEY": JWT_KEY})
    assert shared.publisher_key == shared.subscriber_key == JWT_KEY
    own = load_config(["--jwt-key", JWT_KEY, "--subscriber-jwt-key", OTHER_KEY], environ={})
    assert (own.publisher_key, own.subscriber_key) == (JWT_KEY, OTHER_KEY)


def test_mercure_environment_variables_work_unchanged() -> None:
    """A Mercure hub's environment (its variable names, a key per role, an algorithm per
    role) configures the broker as it configured the hub."""
    _, public = rsa_pair()
    config = load_config(
        [],
        environ={
            "MERCURE_PUBLISHER_JWT_KEY": JWT_KEY,
            "MERCURE_SUBSCRIBER_JWT_KEY": public,
            "MERCURE_SUBSCRIBER_JWT_ALG": "RS256",
        },
    )
    assert (config.publisher_key, config.publisher_algorithm) == (JWT_KEY, "HS256")
    assert (config.subscriber_key, config.subscriber_algorithm) == (public, "RS256")
    # Our own names win where both are set.
    both = load_config(
        [],
        environ={"MERCURE_PUBLISHER_JWT_KEY": JWT_KEY, "BROKER_PUBLISHER_JWT_KEY": OTHER_KEY},
    )
    assert both.publisher_key == OTHER_KEY
    with pytest.raises(ConfigError, match="MERCURE_PUBLISHER_JWT_ALG"):
        load_config([], environ={"MERCURE_PUBLISHER_JWT_ALG": "none"})


def test_a_key_that_does_not_suit_its_roles_algorithm_is_named_with_the_role() -> None:
    with pytest.raises(ConfigError, match=r"--jwt-key .*for subscribers"):
        load_config(["--jwt-key", JWT_KEY, "--subscriber-jwt-algorithm", "ES256"], environ={})


async def test_each_role_checks_tokens_with_its_own_algorithm(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    private, public = rsa_pair()
    broker = await make_broker(
        publisher_jwt_key=public,
        publisher_jwt_algorithm="RS256",
        subscriber_jwt_key=JWT_KEY,
        allow_anonymous_publish=False,
        allow_anonymous_subscribe=False,
    )
    signed = mint(private, publish=["t"], algorithm="RS256")
    published = await client.post(
        f"{broker.url}/publish",
        json={"topic": "t", "data": "x"},
        headers={"Authorization": f"Bearer {signed}"},
    )
    assert published.status_code == 200, published.text
    subscriber = mint(subscribe=["t"])
    accepted = await stream_status(
        client, broker.url, params={"topic": "t", "authorization": subscriber}
    )
    assert accepted.status_code == 200
    # The publisher's RS256 token is not a subscriber token here.
    refused = await stream_status(
        client, broker.url, params={"topic": "t", "authorization": signed}
    )
    assert_error(refused, 401, "unauthorized")


def test_a_key_and_its_key_file_together_are_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(JWT_KEY)
    with pytest.raises(ConfigError, match="not both"):
        load_config(["--jwt-key", JWT_KEY, "--jwt-key-file", str(key_file)], environ={})


def test_unreadable_key_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the key file"):
        load_config(["--jwt-key-file", str(tmp_path / "missing")], environ={})


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, (False, True)),
        (["--allow-anonymous-publish"], {}, (True, True)),
        (["--no-allow-anonymous-subscribe"], {}, (False, False)),
        ([], {"BROKER_ALLOW_ANONYMOUS_PUBLISH": "true"}, (True, True)),
        ([], {"BROKER_ALLOW_ANONYMOUS_SUBSCRIBE": "0"}, (False, False)),
        (
            ["--no-allow-anonymous-publish"],
            {"BROKER_ALLOW_ANONYMOUS_PUBLISH": "yes"},
            (False, True),
        ),
    ],
)
def test_anonymous_switches(
    argv: list[str], environ: dict[str, str], expected: tuple[bool, bool]
) -> None:
    config = load_config(argv, environ=environ)
    assert (config.allow_anonymous_publish, config.allow_anonymous_subscribe) == expected


def test_a_switch_variable_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="BROKER_ALLOW_ANONYMOUS_PUBLISH"):
        load_config([], environ={"BROKER_ALLOW_ANONYMOUS_PUBLISH": "maybe"})


def test_open_publishing_on_a_public_address_is_warned_about() -> None:
    settings: dict[str, Any] = {
        "publisher_key": None,
        "subscriber_key": None,
        "allow_anonymous_subscribe": True,
    }
    assert start_warnings(host="127.0.0.1", allow_anonymous_publish=True, **settings) == []
    assert start_warnings(host="::1", allow_anonymous_publish=True, **settings) == []
    (warning,) = start_warnings(host="0.0.0.0", allow_anonymous_publish=True, **settings)
    assert "--allow-anonymous-publish" in warning
    (closed,) = start_warnings(host="127.0.0.1", allow_anonymous_publish=False, **settings)
    assert "publishing is closed" in closed


def test_a_broker_with_open_publishing_on_all_addresses_warns_at_start(
    broker_process: Any,
) -> None:
    node = broker_process("--host", "0.0.0.0", "--allow-anonymous-publish")
    _, stderr = node.stop()
    assert "may publish to any topic" in stderr


# --- token checking ---------------------------------------------------------------------


def grants_of(token: str, key: str = JWT_KEY, algorithm: str = "HS256") -> Grants:
    return TokenChecker(key, algorithm).check(token)


def test_our_claim_grants_patterns() -> None:
    grants = grants_of(mint(publish=["chat/*"], subscribe=["chat/**"], sub="alice"))
    assert grants.may_publish(["chat/1"])
    assert not grants.may_publish(["chat/1", "admin"])
    assert grants.subscribe.matches_any(["chat/a/b"])
    assert grants.subject == "alice"


def test_mercure_claim_star_means_every_topic() -> None:
    grants = grants_of(
        mint(publish=["*"], subscribe=["https://example.com/books/1"], claim="mercure")
    )
    assert grants.may_publish(["anything/at/all", "x"])
    assert grants.subscribe.matches_any(["https://example.com/books/1"])
    assert not grants.subscribe.matches_any(["https://example.com/books/2"])


def test_both_claims_are_merged() -> None:
    token = jwt.encode(
        {"sse": {"publish": ["a"]}, "mercure": {"publish": ["b"]}}, JWT_KEY, algorithm="HS256"
    )
    assert grants_of(token).may_publish(["a", "b"])


def test_tokens_without_a_subject_are_told_apart() -> None:
    first = grants_of(mint(publish=["a"]))
    second = grants_of(mint(publish=["b"]))
    assert first.subject != second.subject


@pytest.mark.parametrize(
    "claims",
    [
        {"other": 1},
        {"sse": ["a"]},
        {"sse": {"publish": "a"}},
        {"sse": {"publish": [1]}},
        {"sse": {"subscribe": [""]}},
        {"sse": {"subscribe": ["a/**/b"]}},
        {"mercure": {"publish": ["bad\ncontrol"]}},
    ],
)
def test_malformed_claims_are_refused(claims: dict[str, Any]) -> None:
    with pytest.raises(Unauthorized):
        grants_from_claims(claims, "token")


def bad_tokens() -> dict[str, str]:
    now = int(time.time())
    rsa_private, _ = rsa_pair()
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    body = jwt.utils.base64url_encode(b'{"sse":{"publish":["**"]}}').decode()
    return {
        "expired": mint(publish=["**"], exp=now - 60),
        "not yet valid": mint(publish=["**"], nbf=now + 3600),
        "wrong key": mint(OTHER_KEY, publish=["**"]),
        "alg none": f"{header}.{body}.",
        "other algorithm": mint(rsa_private, publish=["**"], algorithm="RS256"),
        "garbage": "not.a.token",
        "one segment": "abc",
        "bad base64": "!!!.###.$$$",
        "huge": "a" * 20_000,
        "no claim": jwt.encode({"sub": "x"}, JWT_KEY, algorithm="HS256"),
        "bad exp": mint(publish=["**"], exp="tomorrow"),
    }


@pytest.mark.parametrize("kind", sorted(bad_tokens()))
def test_bad_tokens_are_refused(kind: str) -> None:
    with pytest.raises(Unauthorized):
        grants_of(bad_tokens()[kind])


def test_a_cached_token_is_refused_once_it_expires() -> None:
    checker = TokenChecker(JWT_KEY, "HS256")
    token = mint(publish=["a"], exp=int(time.time()) + 2)
    assert checker.check(token).may_publish(["a"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            checker.check(token)
        except Unauthorized:
            return
        time.sleep(0.05)
    raise AssertionError("the expired token was still accepted")


def test_asymmetric_tokens_verify_with_the_public_key() -> None:
    private, public = ec_pair()
    token = mint(private, publish=["a"], algorithm="ES256")
    assert grants_of(token, public, "ES256").may_publish(["a"])


# --- publishing over HTTP ---------------------------------------------------------------


@pytest.fixture
async def secured(make_broker: BrokerFactory) -> Broker:
    return await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str), body
    if status in (401, 403):
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_publishing_without_a_token_is_401(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    response = await client.post(f"{secured.url}/publish", json={"topic": "a", "data": "x"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


# A huge token is refused sooner by the header size limit (431): tested by tests/test_server.py.
@pytest.mark.parametrize("kind", sorted(set(bad_tokens()) - {"huge"}))
async def test_publishing_with_a_bad_token_is_401(
    secured: Broker, client: httpx.AsyncClient, kind: str
) -> None:
    response = await client.post(
        f"{secured.url}/publish",
        json={"topic": "a", "data": "x"},
        headers={"Authorization": f"Bearer {bad_tokens()[kind]}"},
    )
    assert_error(response, 401, "unauthorized")
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert secured.state.stats.published == 0


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "token abc", "Bearer a b"])
async def test_malformed_authorization_headers_are_401(
    secured: Broker, client: httpx.AsyncClient, header: str
) -> None:
    response = await client.post(
        f"{secured.url}/publish",
        json={"topic": "a", "data": "x"},
        headers={"Authorization": header},
    )
    assert_error(response, 401, "unauthorized")


async def test_a_token_must_cover_every_topic(secured: Broker, client: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {mint(publish=['chat/*'])}"}
    allowed = await client.post(
        f"{secured.url}/publish", json={"topic": "chat/1", "data": "x"}, headers=headers
    )
    assert allowed.status_code == 200, allowed.text
    partly = await client.post(
        f"{secured.url}/publish", json={"topic": ["chat/1", "admin"], "data": "x"}, headers=headers
    )
    assert_error(partly, 403, "forbidden")
    assert "admin" in partly.json()["detail"]
    batch = await client.post(
        f"{secured.url}/publish",
        json=[{"topic": "chat/2", "data": "ok"}, {"topic": "chat/2/deep", "data": "no"}],
        headers=headers,
    )
    assert_error(batch, 403, "forbidden")
    assert secured.state.stats.published == 1  # nothing of the refused batch got in


async def test_subscribe_grants_do_not_allow_publishing(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    headers = {"Authorization": f"Bearer {mint(subscribe=['**'])}"}
    response = await client.post(
        f"{secured.url}/publish", json={"topic": "a", "data": "x"}, headers=headers
    )
    assert_error(response, 403, "forbidden")


async def test_ndjson_stops_at_the_first_forbidden_line(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    body = (
        b'{"topic": "ok", "data": 1}\n{"topic": "secret", "data": 2}\n{"topic": "ok", "data": 3}\n'
    )
    response = await client.post(
        f"{secured.url}/publish",
        content=body,
        headers={
            "Content-Type": "application/x-ndjson",
            "Authorization": f"Bearer {mint(publish=['ok'])}",
        },
    )
    assert_error(response, 403, "forbidden")
    assert len(response.json()["ids"]) == 1


async def test_tokens_arrive_by_header_query_and_cookie(
    secured: Broker, client: httpx.AsyncClient
) -> None:
    token = mint(publish=["a"])
    event = {"topic": "a", "data": "x"}
    by_query = await client.post(
        f"{secured.url}/publish", json=event, params={"authorization": token}
    )
    assert by_query.status_code == 200, by_query.text
    by_cookie = await client.post(
        f"{secured.url}/publish", json=event, headers={"Cookie": f"brokerAuthorization={token}"}
    )
    assert by_cookie.status_code == 200, by_cookie.text
    # The header wins over a cookie holding a token that does not verify.
    both = await client.post(
        f"{secured.url}/publish",
        json=event,
        headers={"Authorization": f"Bearer {token}", "Cookie": "brokerAuthorization=junk"},
    )
    assert both.status_code == 200, both.text


async def test_the_cookie_name_is_configurable(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False, jwt_cookie="sess")
    token = mint(publish=["a"])
    response = await client.post(
        f"{broker.url}/publish",
        json={"topic": "a", "data": "x"},
        headers={"Cookie": f"sess={token}"},
    )
    assert response.status_code == 200, response.text
    ignored = await client.post(
        f"{broker.url}/publish",
        json={"topic": "a", "data": "x"},
        headers={"Cookie": f"brokerAuthorization={token}"},
    )
    assert_error(ignored, 401, "unauthorized")


async def test_mercure_tokens_work_unchanged(secured: Broker, client: httpx.AsyncClient) -> None:
    token = mint(publish=["*"], subscribe=["*"], claim="mercure")
    response = await client.post(
        f"{secured.url}/publish",
        data={"topic": "https://example.com/books/1", "data": "{}"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200, response.text


async def test_a_publisher_key_of_its_own(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(
        jwt_key=JWT_KEY, publisher_jwt_key=OTHER_KEY, allow_anonymous_publish=False
    )
    event = {"topic": "a", "data": "x"}
    shared = await client.post(
        f"{broker.url}/publish",
        json=event,
        headers={"Authorization": f"Bearer {mint(publish=['a'])}"},
    )
    assert_error(shared, 401, "unauthorized")
    own = await client.post(
        f"{broker.url}/publish",
        json=event,
        headers={"Authorization": f"Bearer {mint(OTHER_KEY, publish=['a'])}"},
    )
    assert own.status_code == 200, own.text


async def test_rs256_publisher_tokens_over_http(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    private, public = rsa_pair()
    broker = await make_broker(jwt_key=public, jwt_algorithm="RS256", allow_anonymous_publish=False)
    event = {"topic": "a", "data": "x"}
    signed = mint(private, publish=["a"], algorithm="RS256")
    response = await client.post(
        f"{broker.url}/publish", json=event, headers={"Authorization": f"Bearer {signed}"}
    )
    assert response.status_code == 200, response.text
    # The classic confusion: an HS256 token signed with the public key as its secret
    # (made by hand: PyJWT itself refuses to sign so).
    signing_input = (
        jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
        + b"."
        + jwt.utils.base64url_encode(b'{"sse":{"publish":["a"]}}')
    )
    signature = hmac.new(public.encode(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    refused = await client.post(
        f"{broker.url}/publish", json=event, headers={"Authorization": f"Bearer {forged}"}
    )
    assert_error(refused, 401, "unauthorized")


async def test_anonymous_publishing_beside_tokens(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=True)
    event = {"topic": "a", "data": "x"}
    anonymous = await client.post(f"{broker.url}/publish", json=event)
    assert anonymous.status_code == 200, anonymous.text
    # A token that is sent is checked, even where none is needed.
    bad = await client.post(
        f"{broker.url}/publish", json=event, headers={"Authorization": "Bearer junk"}
    )
    assert_error(bad, 401, "unauthorized")


async def test_without_a_key_or_the_switch_publishing_is_closed(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(allow_anonymous_publish=False)
    response = await client.post(f"{broker.url}/publish", json={"topic": "a", "data": "x"})
    assert_error(response, 401, "unauthorized")
    assert "--jwt-key" in response.json()["detail"]


# --- subscribing over HTTP --------------------------------------------------------------


async def stream_status(client: httpx.AsyncClient, url: str, **kwargs: Any) -> httpx.Response:
    async with client.stream("GET", f"{url}/events", **kwargs) as response:
        await response.aread() if response.status_code != 200 else None
        return response


async def test_anonymous_subscribers_can_be_refused(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_subscribe=False)
    refused = await stream_status(client, broker.url, params={"topic": "a"})
    assert_error(refused, 401, "unauthorized")
    token = mint(subscribe=["b"])
    for kwargs in (
        {"params": {"topic": "a", "authorization": token}},
        {"params": {"topic": "a"}, "headers": {"Authorization": f"Bearer {token}"}},
        {"params": {"topic": "a"}, "headers": {"Cookie": f"brokerAuthorization={token}"}},
    ):
        accepted = await stream_status(client, broker.url, **kwargs)
        assert accepted.status_code == 200
        assert accepted.headers["Content-Type"].startswith("text/event-stream")


@pytest.mark.parametrize("kind", ["expired", "wrong key", "alg none", "garbage"])
async def test_subscribing_with_a_bad_token_is_401(
    make_broker: BrokerFactory, client: httpx.AsyncClient, kind: str
) -> None:
    broker = await make_broker(jwt_key=JWT_KEY)
    response = await stream_status(
        client, broker.url, params={"topic": "a", "authorization": bad_tokens()[kind]}
    )
    assert_error(response, 401, "unauthorized")
    assert broker.state.hub.connection_count == 0


async def test_a_token_with_bytes_outside_ascii_is_401(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """Undecodable header bytes arrive as lone surrogates; PyJWT cannot even take them."""
    broker = await make_broker(jwt_key=JWT_KEY, allow_anonymous_publish=False)
    response = await client.post(
        f"{broker.url}/publish",
        json={"topic": "a", "data": "x"},
        headers=[(b"Authorization", b"Bearer \xffabc")],
    )
    assert_error(response, 401, "unauthorized")


# --- issuer and audience ----------------------------------------------------------------


def test_an_audience_in_the_token_is_fine_when_none_is_configured() -> None:
    """RFC 9068 access tokens always name an audience; that alone must not refuse them."""
    assert grants_of(mint(publish=["a"], aud="https://hub.example")).may_publish(["a"])


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"iss": "https://auth.example", "aud": "https://hub.example"}, True),
        ({"iss": "https://auth.example", "aud": ["other", "https://hub.example"]}, True),
        ({"iss": "https://auth.example", "aud": "https://other.example"}, False),
        ({"iss": "https://evil.example", "aud": "https://hub.example"}, False),
        ({"aud": "https://hub.example"}, False),
        ({"iss": "https://auth.example"}, False),
    ],
)
def test_issuer_and_audience_are_checked_when_configured(
    claims: dict[str, Any], accepted: bool
) -> None:
    checker = TokenChecker(
        JWT_KEY, "HS256", issuer="https://auth.example", audience="https://hub.example"
    )
    token = mint(publish=["a"], **claims)
    if accepted:
        assert checker.check(token).may_publish(["a"])
    else:
        with pytest.raises(Unauthorized):
            checker.check(token)


async def test_issuer_and_audience_over_http(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(
        jwt_key=JWT_KEY,
        allow_anonymous_publish=False,
        jwt_issuer="https://auth.example",
        jwt_audience="https://hub.example",
    )
    event = {"topic": "a", "data": "x"}
    good = mint(publish=["a"], iss="https://auth.example", aud="https://hub.example")
    bad = mint(publish=["a"], iss="https://auth.example", aud="https://elsewhere.example")
    accepted = await client.post(
        f"{broker.url}/publish", json=event, headers={"Authorization": f"Bearer {good}"}
    )
    assert accepted.status_code == 200, accepted.text
    refused = await client.post(
        f"{broker.url}/publish", json=event, headers={"Authorization": f"Bearer {bad}"}
    )
    assert_error(refused, 401, "unauthorized")


async def test_a_stream_ends_when_its_token_expires(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """A stream must not outlive its credential: at ``exp`` it ends cleanly, so the client
    reconnects and has to show a fresh token. Anonymous streams are not affected."""
    broker = await make_broker(jwt_key=JWT_KEY)
    token = mint(subscribe=["t"], exp=int(time.time()) + 2)
    async with (
        aconnect_sse(
            client, "GET", f"{broker.url}/events", params={"topic": "t", "authorization": token}
        ) as expiring,
        aconnect_sse(client, "GET", f"{broker.url}/events", params={"topic": "t"}) as anonymous,
    ):
        assert expiring.response.status_code == anonymous.response.status_code == 200
        # The stream ends by itself: iterating it finishes instead of waiting for events.
        received = [event async for event in events_of(expiring)]
        assert received == []
        assert broker.state.stats.disconnects["expired"] == 1
        assert broker.state.hub.connection_count == 1
        published = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "x"})
        assert published.status_code == 200
        assert (await anext(events_of(anonymous))).data == "x"
    metrics = (await client.get(f"{broker.url}/metrics")).text
    assert 'sse_broker_disconnects_total{reason="expired"} 1.0' in metrics
    # Reconnecting with the expired token is refused.
    response = await client.get(
        f"{broker.url}/events", params={"topic": "t", "authorization": token}
    )
    assert_error(response, 401, "unauthorized")


async def test_max_stream_age_ends_every_stream_and_the_client_resumes(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    """``--max-stream-age`` ends streams whatever their token (or none): a token that can
    no longer be trusted is dropped at the latest then. The client comes back and resumes
    where it was, so nothing is lost."""
    broker = await make_broker(max_stream_age=1)
    first = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "1"})
    async with aconnect_sse(
        client, "GET", f"{broker.url}/.well-known/mercure", params={"match": "t"}
    ) as stream:
        assert stream.response.status_code == 200
        assert [event async for event in events_of(stream)] == []
    assert broker.state.stats.disconnects["expired"] == 1
    second = await client.post(f"{broker.url}/publish", json={"topic": "t", "data": "2"})
    async with aconnect_sse(
        client,
        "GET",
        f"{broker.url}/events",
        params={"topic": "t"},
        headers={"Last-Event-ID": first.json()["id"]},
    ) as resumed:
        event = await anext(events_of(resumed))
        assert (event.id, event.data) == (second.json()["id"], "2")
