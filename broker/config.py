"""Broker settings: one frozen dataclass, filled from command-line flags and ``BROKER_*`` variables.

Every option can come from a flag or from the environment (``--queue-size`` or
``BROKER_QUEUE_SIZE``); a flag wins. Values are checked here, once, so the rest of the
code can trust them: an invalid value stops the process at start with a single line
naming the option, the value and where it came from (exit status 2, as argparse uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from broker.auth import key_problem

ENV_PREFIX = "BROKER_"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Overflow(enum.StrEnum):
    """What a subscriber's full queue does with one more event."""

    DROP_OLDEST = "drop-oldest"
    DROP_NEWEST = "drop-newest"
    DISCONNECT = "disconnect"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    heartbeat: float = 15.0
    retry: int = 2000
    history_size: int = 10_000
    history_ttl: float = 3600.0
    queue_size: int = 1024
    queue_bytes: int = 1024 * 1024
    overflow: Overflow = Overflow.DROP_OLDEST
    max_connections: int = 0
    max_topics: int = 64
    max_body_bytes: int = 1024 * 1024
    max_event_bytes: int = 256 * 1024
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    shutdown_timeout: float = 10.0
    # Not in the repr: the URL may carry a password.
    redis_url: str | None = dataclasses.field(default=None, repr=False)
    redis_prefix: str = "sse"
    workers: int = 1
    # Not in the repr: an HMAC key is a secret.
    jwt_key: str | None = dataclasses.field(default=None, repr=False)
    publisher_jwt_key: str | None = dataclasses.field(default=None, repr=False)
    subscriber_jwt_key: str | None = dataclasses.field(default=None, repr=False)
    jwt_algorithm: str = "HS256"
    publisher_jwt_algorithm: str | None = None
    subscriber_jwt_algorithm: str | None = None
    jwt_cookie: str = "brokerAuthorization"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    allow_anonymous_publish: bool = False
    allow_anonymous_subscribe: bool = True
    max_connections_per_ip: int = 0
    max_stream_age: float = 0.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    publish_rate: float = 0.0
    publish_burst: int = 0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    demo: bool = True
    mercure: bool = True
    mercure_legacy: bool = True
    mercure_subscriptions: bool = False
    mercure_cookie: str = "mercureAccessToken"
    public_url: str | None = None

    @property
    def publisher_key(self) -> str | None:
        """The key publishers' tokens are checked with (its own, else the shared one)."""
        return self.publisher_jwt_key or self.jwt_key

    @property
    def subscriber_key(self) -> str | None:
        """The key subscribers' tokens are checked with (its own, else the shared one)."""
        return self.subscriber_jwt_key or self.jwt_key

    @property
    def publisher_algorithm(self) -> str:
        return self.publisher_jwt_algorithm or self.jwt_algorithm

    @property
    def subscriber_algorithm(self) -> str:
        return self.subscriber_jwt_algorithm or self.jwt_algorithm


class ConfigError(ValueError):
    """An option value that cannot be used; the message is the one line shown to the user."""


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_byte_size(text: str) -> int:
    """Read ``1048576``, ``1MiB``, ``256KiB`` or ``64k`` as a number of bytes."""
    match = _SIZE_RE.match(text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a byte count such as 65536, 256KiB or 1MiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        _check_range(value, minimum, maximum)
        return value

    return parse


def _seconds(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("expected a finite number of seconds")
        _check_range(value, minimum, maximum)
        return value

    return parse


def _bytes(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = parse_byte_size(text)
        _check_range(value, minimum, None)
        return value

    return parse


def _check_range(value: float, minimum: float, maximum: float | None) -> None:
    if value < minimum:
        raise ValueError(f"must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum:g}")


def _host(text: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", text):
            raise ValueError("expected an IP address or a host name") from None
    return text


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _origin(text: str) -> str:
    value = text.strip().rstrip("/")
    if value == "*":
        return value
    if not re.fullmatch(r"https?://[^/\s?#]+", value):
        raise ValueError("expected '*' or an origin such as https://app.example.com")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("expected an address or a CIDR block such as 10.0.0.0/8") from None


JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)


def _algorithm(text: str) -> str:
    value = text.strip()
    for name in JWT_ALGORITHMS:
        if value.lower() == name.lower():
            return name
    raise ValueError(f"expected one of {', '.join(JWT_ALGORITHMS)}")


def _key_text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _key_file(text: str) -> str:
    path = text.strip()
    try:
        with open(path, encoding="utf-8") as file:
            content = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the key file: {exc}") from None
    if not content.strip():
        raise ValueError("the key file is empty")
    return content.strip() + "\n" if "-----BEGIN" in content else content.strip()


def _claim_value(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _cookie_name(text: str) -> str:
    value = text.strip()
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}", value):
        raise ValueError("expected a cookie name (letters, digits and !#$%&'*+-.^_`|~)")
    return value


def _public_url(text: str) -> str | None:
    """The origin clients reach the broker at: ``http(s)://host[:port]``, nothing more."""
    value = text.strip().rstrip("/")
    if not value:
        return None
    parts = urllib.parse.urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("expected the broker's public origin, as in https://example.com")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("give the origin only (scheme, host and port), as in https://example.com")
    try:
        parts.port  # noqa: B018 (urllib checks the port only when it is read)
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    return value


REDIS_SCHEMES = ("redis", "rediss", "unix")
# With Redis, the stream carries live events between nodes as well as history, so an entry
# must outlive the read of every node's tail; fewer entries would turn ordinary bursts into
# gaps (which the nodes would report as ``broker.missed``).
REDIS_MIN_HISTORY = 1000
_REDIS_PREFIX = re.compile(r"[A-Za-z0-9_]{1,64}")


def _redis_url(text: str) -> str | None:
    """A ``redis://``, ``rediss://`` or ``unix://`` URL; empty means no Redis (in-memory)."""
    value = text.strip()
    if not value:
        return None
    parts = urllib.parse.urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        raise ValueError(
            "expected a redis://host[:port][/db], rediss://host[:port][/db] "
            "or unix:///path/to/socket URL"
        )
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path, as in unix:///run/redis.sock")
        return value
    if not parts.hostname:
        raise ValueError(f"a {scheme}:// URL needs a host, as in {scheme}://127.0.0.1:6379/0")
    try:
        parts.port  # noqa: B018 (urllib checks the port only when it is read)
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError("the path of a redis:// URL is the database number, as in /0")
    return value


def _redis_prefix(text: str) -> str:
    value = text.strip()
    if not _REDIS_PREFIX.fullmatch(value):
        raise ValueError("expected 1 to 64 letters, digits or underscores")
    return value


def redacted_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclasses.dataclass(frozen=True, slots=True)
class _Option:
    flag: str
    field: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    repeatable: bool = False
    # A switch: ``--flag`` / ``--no-flag`` on the command line, true/false in the environment.
    switch: bool = False
    # Another variable read when ``env`` is unset: the name a Mercure hub uses for the same
    # setting, so that a Mercure deployment's environment works unchanged.
    alias: str | None = None

    @property
    def dest(self) -> str:
        """The argparse attribute: per flag, since a key and its key file share a field."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        """``BROKER_`` plus the flag's name (``--cors-origin`` -> ``BROKER_CORS_ORIGIN``)."""
        return ENV_PREFIX + self.flag.removeprefix("--").replace("-", "_").upper()


_OPTIONS: tuple[_Option, ...] = (
    _Option("--host", "host", _host, "address to listen on", "ADDRESS"),
    _Option("--port", "port", _integer(1, 65535), "TCP port to listen on", "PORT"),
    _Option(
        "--heartbeat",
        "heartbeat",
        _seconds(0.01, 3600),
        "seconds between keep-alive comments on every stream",
        "SECONDS",
    ),
    _Option(
        "--retry",
        "retry",
        _integer(0, 86_400_000),
        "reconnection delay sent to clients in the retry: field, in milliseconds",
        "MS",
    ),
    _Option(
        "--history-size",
        "history_size",
        _integer(0, 10_000_000),
        "events kept for Last-Event-ID replay (0 keeps none)",
        "N",
    ),
    _Option(
        "--history-ttl",
        "history_ttl",
        _seconds(0.001),
        "seconds an event stays available for replay",
        "SECONDS",
    ),
    _Option(
        "--queue-size",
        "queue_size",
        _integer(1, 10_000_000),
        "events queued per connection before overflow",
        "N",
    ),
    _Option(
        "--queue-bytes",
        "queue_bytes",
        _bytes(1024),
        "bytes queued per connection before overflow (accepts KiB/MiB)",
        "BYTES",
    ),
    _Option(
        "--overflow",
        "overflow",
        lambda text: Overflow(_choice([o.value for o in Overflow])(text)),
        "what a full queue does: drop-oldest, drop-newest or disconnect",
        "POLICY",
    ),
    _Option(
        "--max-connections",
        "max_connections",
        _integer(0),
        "concurrent event streams accepted (0 means no limit)",
        "N",
    ),
    _Option("--max-topics", "max_topics", _integer(1, 100_000), "topics per subscription", "N"),
    _Option(
        "--max-body-bytes",
        "max_body_bytes",
        _bytes(64),
        "largest publish body; for NDJSON streams, the largest line",
        "BYTES",
    ),
    _Option(
        "--max-event-bytes",
        "max_event_bytes",
        _bytes(64),
        "largest encoded event",
        "BYTES",
    ),
    _Option(
        "--cors-origin",
        "cors_origins",
        _origin,
        "origin allowed to use the API from a browser (repeatable; '*' for any)",
        "ORIGIN",
        repeatable=True,
    ),
    _Option("--log-level", "log_level", _choice(LOG_LEVELS), "logging level", "LEVEL"),
    _Option(
        "--max-stream-age",
        "max_stream_age",
        _seconds(0, 366 * 86400),
        "seconds after which a stream is ended (the client reconnects, resumes and shows "
        "its token again), less up to a tenth at random; 0 means never",
        "SECONDS",
    ),
    _Option(
        "--shutdown-timeout",
        "shutdown_timeout",
        _seconds(0, 3600),
        "seconds allowed for a graceful stop on SIGTERM/SIGINT",
        "SECONDS",
    ),
    _Option(
        "--redis-url",
        "redis_url",
        _redis_url,
        "Redis to share the event log with other nodes (redis://, rediss:// or unix://); "
        "without it the log is in memory",
        "URL",
    ),
    _Option(
        "--redis-prefix",
        "redis_prefix",
        _redis_prefix,
        "namespace of the broker's Redis keys (letters, digits, underscores)",
        "PREFIX",
    ),
    _Option(
        "--workers",
        "workers",
        _integer(1, 1024),
        "processes serving the port together (SO_REUSEPORT); more than 1 needs --redis-url",
        "N",
    ),
    _Option(
        "--jwt-key",
        "jwt_key",
        _key_text,
        "key checking publishers' and subscribers' tokens: the HMAC secret, or a PEM public "
        "key for RS/PS/ES/EdDSA algorithms",
        "KEY",
    ),
    _Option("--jwt-key-file", "jwt_key", _key_file, "--jwt-key, read from a file", "PATH"),
    _Option(
        "--publisher-jwt-key",
        "publisher_jwt_key",
        _key_text,
        "key for publishers' tokens only (overrides --jwt-key for them)",
        "KEY",
        alias="MERCURE_PUBLISHER_JWT_KEY",
    ),
    _Option(
        "--publisher-jwt-key-file",
        "publisher_jwt_key",
        _key_file,
        "--publisher-jwt-key, read from a file",
        "PATH",
    ),
    _Option(
        "--subscriber-jwt-key",
        "subscriber_jwt_key",
        _key_text,
        "key for subscribers' tokens only (overrides --jwt-key for them)",
        "KEY",
        alias="MERCURE_SUBSCRIBER_JWT_KEY",
    ),
    _Option(
        "--subscriber-jwt-key-file",
        "subscriber_jwt_key",
        _key_file,
        "--subscriber-jwt-key, read from a file",
        "PATH",
    ),
    _Option(
        "--jwt-algorithm",
        "jwt_algorithm",
        _algorithm,
        "the one signature algorithm tokens may use",
        "ALG",
    ),
    _Option(
        "--publisher-jwt-algorithm",
        "publisher_jwt_algorithm",
        _algorithm,
        "algorithm for publishers' tokens only (overrides --jwt-algorithm for them)",
        "ALG",
        alias="MERCURE_PUBLISHER_JWT_ALG",
    ),
    _Option(
        "--subscriber-jwt-algorithm",
        "subscriber_jwt_algorithm",
        _algorithm,
        "algorithm for subscribers' tokens only (overrides --jwt-algorithm for them)",
        "ALG",
        alias="MERCURE_SUBSCRIBER_JWT_ALG",
    ),
    _Option(
        "--jwt-issuer",
        "jwt_issuer",
        _claim_value,
        "the iss claim tokens must carry (not checked when unset)",
        "ISSUER",
    ),
    _Option(
        "--jwt-audience",
        "jwt_audience",
        _claim_value,
        "a value the aud claim of tokens must hold, such as the broker's URL "
        "(not checked when unset)",
        "AUDIENCE",
    ),
    _Option(
        "--jwt-cookie",
        "jwt_cookie",
        _cookie_name,
        "name of the cookie that may carry a token",
        "NAME",
    ),
    _Option(
        "--allow-anonymous-publish",
        "allow_anonymous_publish",
        _boolean,
        "let requests without a token publish to any topic",
        switch=True,
    ),
    _Option(
        "--allow-anonymous-subscribe",
        "allow_anonymous_subscribe",
        _boolean,
        "let subscribers without a token receive public events",
        switch=True,
    ),
    _Option(
        "--max-connections-per-ip",
        "max_connections_per_ip",
        _integer(0),
        "concurrent event streams from one client address (0 means no limit)",
        "N",
    ),
    _Option(
        "--trusted-proxy",
        "trusted_proxies",
        _network,
        "proxy address or CIDR whose X-Forwarded-For names the client (repeatable)",
        "CIDR",
        repeatable=True,
    ),
    _Option(
        "--publish-rate",
        "publish_rate",
        _seconds(0),
        "events per second one token (or, without one, one client address) may publish; "
        "0 means no limit",
        "PER_SECOND",
    ),
    _Option(
        "--publish-burst",
        "publish_burst",
        _integer(0),
        "events a publisher may send at once above --publish-rate (0: one second's worth)",
        "N",
    ),
    _Option(
        "--header-timeout",
        "header_timeout",
        _seconds(0.01, 3600),
        "seconds a client has to send a request's headers",
        "SECONDS",
    ),
    _Option(
        "--body-timeout",
        "body_timeout",
        _seconds(0.01, 86_400),
        "seconds a publish body may take; for NDJSON streams, the longest pause between reads",
        "SECONDS",
    ),
    _Option("--demo", "demo", _boolean, "serve the demo page at GET /", switch=True),
    _Option(
        "--mercure",
        "mercure",
        _boolean,
        "serve the Mercure protocol at /.well-known/mercure",
        switch=True,
    ),
    _Option(
        "--mercure-legacy",
        "mercure_legacy",
        _boolean,
        "also accept clients of Mercure drafts before 8: the 'topic' subscribe parameter "
        "(exact topics and URI templates), several 'topic' fields in one publish, and "
        "tokens that are not RFC 9068 access tokens",
        switch=True,
    ),
    _Option(
        "--mercure-subscriptions",
        "mercure_subscriptions",
        _boolean,
        "publish Mercure subscription events (private, under "
        "/.well-known/mercure/subscriptions) as Mercure streams open and close, and serve "
        "the subscription API there",
        switch=True,
    ),
    _Option(
        "--mercure-cookie",
        "mercure_cookie",
        _cookie_name,
        "name of the cookie that may carry a token on /.well-known/mercure",
        "NAME",
    ),
    _Option(
        "--public-url",
        "public_url",
        _public_url,
        "the origin clients reach the broker at (https://host[:port]): the Mercure hub's "
        "URL, against which relative topics and URL patterns resolve; default: each "
        "request's Host",
        "URL",
    ),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option as a flag; values stay raw strings until ``config_from_args``."""
    defaults = Config()
    for option in _OPTIONS:
        default = getattr(defaults, option.field)
        if option.switch:
            parser.add_argument(
                option.flag,
                dest=option.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{option.help} (env {option.env}, default {str(default).lower()})",
            )
            continue
        also = f"; Mercure's {option.alias} also works" if option.alias else ""
        if isinstance(default, tuple) or default is None:
            shown = "none"
        elif isinstance(default, enum.Enum):
            shown = str(default.value)
        else:
            shown = str(default)
        parser.add_argument(
            option.flag,
            dest=option.dest,
            metavar=option.metavar,
            action="append" if option.repeatable else "store",
            default=None,
            help=f"{option.help} (env {option.env}, default {shown}{also})",
        )


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Merge flags over environment over defaults, checking each value.

    Raises ``ConfigError`` with a message naming the flag, the bad value and its source.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for option in _OPTIONS:
        raw: Any = getattr(args, option.dest, None)
        source = option.flag
        variable = option.env
        if option.env not in environ and option.alias is not None and option.alias in environ:
            variable = option.alias
        if raw is None and variable in environ:
            raw = environ[variable]
            source = f"{option.flag} (from {variable})"
            origins[option.field] = f", from {variable}"
            if option.repeatable:
                raw = [item for item in re.split(r"[,\s]+", raw) if item]
        if raw is None:
            continue
        if option.field in values:
            raise ConfigError(f"{source}: give either the key or a key file, not both")
        if isinstance(raw, bool):
            values[option.field] = raw
            continue
        parsed: list[Any] = []
        for item in raw if option.repeatable else [raw]:
            try:
                parsed.append(option.parse(item))
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc} (got {item!r})") from None
        values[option.field] = tuple(dict.fromkeys(parsed)) if option.repeatable else parsed[0]
    config = Config(**values)
    if config.redis_url is not None and config.history_size < REDIS_MIN_HISTORY:
        raise ConfigError(
            f"--history-size ({config.history_size}{origins.get('history_size', '')}) must be "
            f"at least {REDIS_MIN_HISTORY} with --redis-url: the Redis stream also carries "
            "live events between nodes, and each node must read an entry before it is trimmed"
        )
    if config.max_event_bytes > config.queue_bytes:
        raise ConfigError(
            f"--max-event-bytes ({config.max_event_bytes}{origins.get('max_event_bytes', '')}) "
            f"must not exceed --queue-bytes ({config.queue_bytes}"
            f"{origins.get('queue_bytes', '')}): such an event could never be queued"
        )
    for role, own_key in (
        ("publisher", config.publisher_jwt_key),
        ("subscriber", config.subscriber_jwt_key),
    ):
        key = config.publisher_key if role == "publisher" else config.subscriber_key
        algorithm = (
            config.publisher_algorithm if role == "publisher" else config.subscriber_algorithm
        )
        flag = f"--{role}-jwt-key" if own_key is not None else "--jwt-key"
        problem = None if key is None else key_problem(key, algorithm)
        if problem is not None:
            raise ConfigError(f"{flag} (or {flag}-file), for {role}s: {problem}")
    return config


def workers_problem(config: Config) -> str | None:
    """Why ``--workers`` cannot be used as set, or None.

    Checked by the command rather than by ``config_from_args``: it concerns how the
    process runs, not the broker, and a ``Config`` with several workers and no Redis is
    still a valid description of one worker.
    """
    if config.workers > 1 and config.redis_url is None:
        return (
            f"--workers ({config.workers}) needs --redis-url: each worker is a separate "
            "process, and only a shared Redis log lets every worker see every event"
        )
    return None


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build a ``Config`` from serve flags alone; used by tests and embedders."""
    parser = argparse.ArgumentParser(prog="sse-broker serve")
    add_serve_arguments(parser)
    args = parser.parse_args(list(argv or []))
    return config_from_args(args, os.environ if environ is None else environ)
