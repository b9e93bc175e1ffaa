"""Configuration: every option from the issue, its default, and how it is set and refused.

The expected values below are written out from the issue's Configuration section rather
than read from ``broker.config``, so a changed default or a renamed variable fails here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from typing import Any

import pytest

from broker.config import Config, ConfigError, Overflow, load_config

MIB = 1024 * 1024
KIB = 1024


@dataclasses.dataclass(frozen=True)
class Option:
    """One serve option as the issue describes it."""

    flag: str
    field: str
    default: Any
    valid: tuple[str, Any]  # a valid raw value and what it becomes
    other: str  # another valid raw value, for flag-beats-variable

    @property
    def env(self) -> str:
        """``BROKER_`` and the flag's name: ``--cors-origin`` is ``BROKER_CORS_ORIGIN``."""
        return "BROKER_" + self.flag.removeprefix("--").replace("-", "_").upper()

    def __str__(self) -> str:
        return self.flag


OPTIONS = (
    Option("--host", "host", "127.0.0.1", ("0.0.0.0", "0.0.0.0"), "::1"),
    Option("--port", "port", 8080, ("9090", 9090), "65535"),
    Option("--heartbeat", "heartbeat", 15.0, ("2.5", 2.5), "30"),
    Option("--retry", "retry", 2000, ("500", 500), "0"),
    Option("--history-size", "history_size", 10_000, ("0", 0), "50"),
    Option("--history-ttl", "history_ttl", 3600.0, ("60", 60.0), "0.5"),
    Option("--queue-size", "queue_size", 1024, ("16", 16), "1"),
    Option("--queue-bytes", "queue_bytes", MIB, ("2MiB", 2 * MIB), "4194304"),
    Option(
        "--overflow",
        "overflow",
        Overflow.DROP_OLDEST,
        ("disconnect", Overflow.DISCONNECT),
        "drop-newest",
    ),
    Option("--max-connections", "max_connections", 0, ("100", 100), "1"),
    Option("--max-topics", "max_topics", 64, ("8", 8), "1"),
    Option("--max-body-bytes", "max_body_bytes", MIB, ("64k", 64 * KIB), "8MiB"),
    Option("--max-event-bytes", "max_event_bytes", 256 * KIB, ("512KiB", 512 * KIB), "1024"),
    Option(
        "--cors-origin",
        "cors_origins",
        (),
        ("https://app.example.com", ("https://app.example.com",)),
        "*",
    ),
    Option("--log-level", "log_level", "info", ("debug", "debug"), "error"),
    Option("--shutdown-timeout", "shutdown_timeout", 10.0, ("3", 3.0), "0"),
    Option(
        "--redis-url",
        "redis_url",
        None,
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        "unix:///run/redis/redis.sock",
    ),
    Option("--redis-prefix", "redis_prefix", "sse", ("app_events", "app_events"), "other"),
    Option("--workers", "workers", 1, ("4", 4), "2"),
    Option("--jwt-algorithm", "jwt_algorithm", "HS256", ("es256", "ES256"), "HS512"),
    Option(
        "--publisher-jwt-algorithm", "publisher_jwt_algorithm", None, ("rs256", "RS256"), "HS512"
    ),
    Option(
        "--subscriber-jwt-algorithm", "subscriber_jwt_algorithm", None, ("EdDSA", "EdDSA"), "HS384"
    ),
    Option("--jwt-cookie", "jwt_cookie", "brokerAuthorization", ("session", "session"), "jwt"),
    Option(
        "--jwt-issuer", "jwt_issuer", None, ("https://auth.example", "https://auth.example"), "x"
    ),
    Option(
        "--jwt-audience", "jwt_audience", None, ("https://hub.example", "https://hub.example"), "y"
    ),
    Option("--max-connections-per-ip", "max_connections_per_ip", 0, ("10", 10), "1"),
    Option("--max-stream-age", "max_stream_age", 0.0, ("3600", 3600.0), "60"),
    Option(
        "--trusted-proxy",
        "trusted_proxies",
        (),
        ("10.0.0.0/8", (ipaddress.ip_network("10.0.0.0/8"),)),
        "127.0.0.1",
    ),
    Option("--publish-rate", "publish_rate", 0.0, ("100", 100.0), "5"),
    Option("--publish-burst", "publish_burst", 0, ("50", 50), "1"),
    Option("--header-timeout", "header_timeout", 10.0, ("2", 2.0), "1"),
    Option("--body-timeout", "body_timeout", 30.0, ("5", 5.0), "1"),
    Option(
        "--mercure-cookie", "mercure_cookie", "mercureAccessToken", ("hubToken", "hubToken"), "t"
    ),
    Option(
        "--public-url",
        "public_url",
        None,
        ("https://hub.example.com/", "https://hub.example.com"),
        "http://127.0.0.1:8080",
    ),
)
# Keys and switches have their own tests (tests/test_auth.py): a key is never echoed in an
# error, a key file shares its key's field, and a switch takes no value.
TESTED_ELSEWHERE = {
    "jwt_key",
    "publisher_jwt_key",
    "subscriber_jwt_key",
    "allow_anonymous_publish",
    "allow_anonymous_subscribe",
    "demo",
    "mercure",
    "mercure_legacy",
    "mercure_subscriptions",
}
BY_FLAG = {option.flag: option for option in OPTIONS}


def test_the_issue_lists_exactly_these_options() -> None:
    """Every ``Config`` field is one of the issue's options, and nothing is missing."""
    fields = {field.name for field in dataclasses.fields(Config)}
    assert fields == {o.field for o in OPTIONS} | TESTED_ELSEWHERE


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_default_is_the_one_in_the_issue(option: Option) -> None:
    assert getattr(load_config([], environ={}), option.field) == option.default


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_option_is_settable_by_flag(option: Option) -> None:
    config = load_config([option.flag, option.valid[0]], environ={})
    assert getattr(config, option.field) == option.valid[1]


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_option_is_settable_by_environment_variable(option: Option) -> None:
    config = load_config([], environ={option.env: option.valid[0]})
    assert getattr(config, option.field) == option.valid[1]


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_flag_wins_over_environment_variable(option: Option) -> None:
    config = load_config([option.flag, option.valid[0]], environ={option.env: option.other})
    assert getattr(config, option.field) == option.valid[1]


@pytest.mark.parametrize("option", OPTIONS, ids=str)
def test_each_variable_sets_only_its_own_option(option: Option) -> None:
    config = load_config([], environ={option.env: option.valid[0]})
    changed = {
        field.name
        for field in dataclasses.fields(Config)
        if getattr(config, field.name) != getattr(Config(), field.name)
    }
    assert changed == {option.field}


def test_cors_origin_variable_was_named_after_the_field_not_the_flag() -> None:
    """Regression: the variable was ``BROKER_CORS_ORIGINS`` (from the dataclass field),
    so ``BROKER_CORS_ORIGIN``, the name the issue's ``BROKER_<NAME>`` rule gives, did nothing."""
    config = load_config([], environ={"BROKER_CORS_ORIGIN": "https://app.example.com"})
    assert config.cors_origins == ("https://app.example.com",)


def test_variables_without_the_broker_prefix_are_ignored() -> None:
    assert load_config([], environ={"PORT": "9999", "HOST": "0.0.0.0"}) == Config()


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", MIB), ("256KiB", 256 * KIB), ("1MiB", MIB), ("64k", 64 * KIB)],
)
@pytest.mark.parametrize("flag", ["--queue-bytes", "--max-body-bytes", "--max-event-bytes"])
def test_byte_sizes_accept_plain_numbers_and_units(flag: str, text: str, size: int) -> None:
    # A small event limit keeps a small --queue-bytes valid (an event must fit the queue).
    extra = ["--max-event-bytes", "1024"] if flag == "--queue-bytes" else []
    config = load_config([flag, text, *extra], environ={})
    assert getattr(config, BY_FLAG[flag].field) == size


@pytest.mark.parametrize(("text", "size"), [("256KiB", 256 * KIB), ("64k", 64 * KIB)])
def test_byte_sizes_with_units_work_from_the_environment(text: str, size: int) -> None:
    config = load_config([], environ={"BROKER_MAX_BODY_BYTES": text})
    assert config.max_body_bytes == size


def test_cors_origin_flag_is_repeatable() -> None:
    config = load_config(
        ["--cors-origin", "https://app.example.com", "--cors-origin", "http://localhost:3000"],
        environ={},
    )
    assert config.cors_origins == ("https://app.example.com", "http://localhost:3000")


@pytest.mark.parametrize(
    "value",
    [
        "https://a.example,https://b.example,http://localhost:3000",
        "https://a.example https://b.example http://localhost:3000",
        " https://a.example, https://b.example ,\thttp://localhost:3000 ",
    ],
    ids=["commas", "spaces", "mixed"],
)
def test_cors_origin_variable_is_comma_or_space_separated(value: str) -> None:
    config = load_config([], environ={"BROKER_CORS_ORIGIN": value})
    assert config.cors_origins == (
        "https://a.example",
        "https://b.example",
        "http://localhost:3000",
    )


def test_cors_origin_flags_replace_the_variable_entirely() -> None:
    config = load_config(
        ["--cors-origin", "https://flag.example"],
        environ={"BROKER_CORS_ORIGIN": "https://env.example,https://other.example"},
    )
    assert config.cors_origins == ("https://flag.example",)


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-newest", "disconnect"])
def test_overflow_accepts_each_policy(policy: str) -> None:
    config = load_config(["--overflow", policy], environ={})
    assert config.overflow == Overflow(policy)
    assert config.overflow.value == policy


INVALID = [
    ("--host", ""),
    ("--host", "not a host"),
    ("--port", "http"),
    ("--port", "80.5"),
    ("--port", "0"),
    ("--port", "70000"),
    ("--port", "-1"),
    ("--heartbeat", "-1"),
    ("--heartbeat", "nan"),
    ("--heartbeat", "inf"),
    ("--heartbeat", "soon"),
    ("--retry", "-1"),
    ("--retry", "2s"),
    ("--history-size", "-1"),
    ("--history-ttl", "-1"),
    ("--history-ttl", "nan"),
    ("--queue-size", "0"),
    ("--queue-size", "x"),
    ("--queue-bytes", "lots"),
    ("--queue-bytes", "-1"),
    ("--queue-bytes", "1MiB/s"),
    ("--overflow", "explode"),
    ("--max-connections", "-1"),
    ("--max-topics", "0"),
    ("--max-body-bytes", "10"),
    ("--max-body-bytes", "big"),
    ("--max-event-bytes", "10"),
    ("--cors-origin", "example.com"),
    ("--cors-origin", "ftp://example.com"),
    ("--log-level", "loud"),
    ("--shutdown-timeout", "-1"),
    ("--shutdown-timeout", "inf"),
    ("--redis-url", "localhost:6379"),
    ("--redis-url", "http://127.0.0.1:6379"),
    ("--redis-url", "redis://"),
    ("--redis-url", "redis://127.0.0.1:99999"),
    ("--redis-url", "redis://127.0.0.1:6379/zero"),
    ("--redis-url", "unix://"),
    ("--redis-prefix", ""),
    ("--redis-prefix", "app:events"),
    ("--redis-prefix", "x" * 65),
    ("--workers", "0"),
    ("--workers", "two"),
    ("--workers", "1025"),
    ("--jwt-algorithm", "none"),
    ("--publisher-jwt-algorithm", "none"),
    ("--subscriber-jwt-algorithm", "RS1"),
    ("--jwt-cookie", "a b"),
    ("--jwt-issuer", " "),
    ("--jwt-audience", ""),
    ("--max-connections-per-ip", "-1"),
    ("--max-stream-age", "-1"),
    ("--max-stream-age", "forever"),
    ("--trusted-proxy", "not-a-network"),
    ("--publish-rate", "-1"),
    ("--publish-burst", "x"),
    ("--header-timeout", "0"),
    ("--body-timeout", "0"),
    ("--mercure-cookie", "a;b"),
    ("--public-url", "hub.example.com"),
    ("--public-url", "ftp://hub.example.com"),
    ("--public-url", "https://hub.example.com/mercure"),
    ("--public-url", "https://hub.example.com:99999"),
]


def test_every_option_has_an_invalid_value_case() -> None:
    assert {flag for flag, _ in INVALID} == set(BY_FLAG)


@pytest.mark.parametrize(("flag", "value"), INVALID)
def test_invalid_flag_value_is_refused_naming_flag_and_value(flag: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config([flag, value], environ={})
    message = str(refused.value)
    assert flag in message
    assert repr(value) in message
    assert "\n" not in message


@pytest.mark.parametrize(("flag", "value"), INVALID)
def test_invalid_variable_is_refused_naming_flag_variable_and_value(flag: str, value: str) -> None:
    env = BY_FLAG[flag].env
    if flag == "--cors-origin":
        value = f"https://fine.example,{value}"  # the bad item is named, not the whole list
        bad = value.split(",")[1]
    else:
        bad = value
    with pytest.raises(ConfigError) as refused:
        load_config([], environ={env: value})
    message = str(refused.value)
    assert flag in message
    assert env in message
    assert repr(bad) in message
    assert "\n" not in message


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
@pytest.mark.parametrize("flag", ["--heartbeat", "--history-ttl", "--shutdown-timeout"])
def test_seconds_must_be_finite(flag: str, value: str) -> None:
    assert not math.isfinite(float(value))
    with pytest.raises(ConfigError, match=flag):
        load_config([f"{flag}={value}"], environ={})  # "=": argparse reads "-inf" as a flag


def test_event_limit_larger_than_queue_bytes_is_refused() -> None:
    """Such an event could never be queued for any subscriber."""
    with pytest.raises(ConfigError) as refused:
        load_config(["--max-event-bytes", "2MiB", "--queue-bytes", "1MiB"], environ={})
    message = str(refused.value)
    assert "--max-event-bytes" in message
    assert "--queue-bytes" in message
    assert str(2 * MIB) in message
    assert str(MIB) in message


def test_small_queue_bytes_against_the_default_event_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="--max-event-bytes"):
        load_config(["--queue-bytes", "64k"], environ={})


def test_event_limit_refusal_names_the_variables_it_came_from() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(
            [], environ={"BROKER_MAX_EVENT_BYTES": "512KiB", "BROKER_QUEUE_BYTES": "256KiB"}
        )
    message = str(refused.value)
    assert "BROKER_MAX_EVENT_BYTES" in message
    assert "BROKER_QUEUE_BYTES" in message
    assert str(512 * KIB) in message


def test_event_limit_equal_to_queue_bytes_is_accepted() -> None:
    config = load_config(["--max-event-bytes", "64k", "--queue-bytes", "65536"], environ={})
    assert config.max_event_bytes == config.queue_bytes == 64 * KIB


def test_a_flag_fixes_a_bad_variable() -> None:
    """The variable is not even read when the flag is given, so it cannot fail the start."""
    config = load_config(["--port", "9000"], environ={"BROKER_PORT": "not-a-port"})
    assert config.port == 9000


def test_choices_are_case_insensitive() -> None:
    config = load_config(["--overflow", "Drop-Newest", "--log-level", "WARNING"], environ={})
    assert (config.overflow, config.log_level) == (Overflow.DROP_NEWEST, "warning")


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1",
        "redis://:secret@redis.internal:6380/2",
        "rediss://user:secret@redis.example.com:6380",
        "unix:///run/redis/redis.sock?db=1",
    ],
)
def test_redis_url_accepts_tcp_tls_and_unix_socket_forms(url: str) -> None:
    assert load_config(["--redis-url", url], environ={}).redis_url == url


def test_an_empty_redis_url_variable_means_the_in_memory_backend() -> None:
    """Compose files often set ``BROKER_REDIS_URL: ""`` to turn Redis off."""
    assert load_config([], environ={"BROKER_REDIS_URL": ""}).redis_url is None


def test_the_redis_password_stays_out_of_the_config_repr() -> None:
    config = load_config(["--redis-url", "redis://:hunter2@127.0.0.1:6379"], environ={})
    assert "hunter2" not in repr(config)


def test_redis_needs_a_history_large_enough_to_carry_live_events() -> None:
    """Regression: with --history-size 0, XADD's MAXLEN trimmed every entry as it was
    added, so no node ever delivered anything."""
    with pytest.raises(ConfigError) as refused:
        load_config(["--redis-url", "redis://127.0.0.1", "--history-size", "0"], environ={})
    assert "--history-size" in str(refused.value)
    assert "1000" in str(refused.value)
    config = load_config(["--redis-url", "redis://127.0.0.1", "--history-size", "1000"], environ={})
    assert config.history_size == 1000
    assert load_config(["--history-size", "0"], environ={}).history_size == 0
