"""Topic matchers beyond our own topic patterns: Mercure's URL patterns and the URI
templates of earlier Mercure drafts.

Both are "scanned" matchers (``broker.topics.Matcher``): the hub cannot place them in its
topic trie, so it asks each distinct one about every published topic. Evaluation must
stay cheap and bounded whatever a client sends, which is why neither uses Python's
backtracking ``re``: URL patterns run on the ``urlpattern`` package (Rust's linear-time
``regex`` engine) and URI templates compile to RE2 expressions. A topic a matcher cannot
even read (not a URL, say) simply does not match.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

import re2
from urlpattern import URLPattern

from broker.topics import MAX_TOPIC_LENGTH

URL_PATTERN = "URLPattern"
URI_TEMPLATE = "URITemplate"
# As long as a topic may be: an Exact matcher is one.
MAX_PATTERN_LENGTH = MAX_TOPIC_LENGTH
MAX_TEMPLATE_EXPRESSIONS = 32

_UNRESERVED = r"A-Za-z0-9\-._~"
_RESERVED = r":/?#\[\]@!$&'()*+,;="
_PCT = "%[0-9A-Fa-f]{2}"
_EXPRESSION = re.compile(r"\{([^{}]*)\}")
_VARIABLE = re.compile(r"(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})(?:\.?(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2}))*")
_MODIFIER = re.compile(r"(.+?)(?::([1-9][0-9]{0,3})|(\*))?")
# RFC 6570 operators: what an expansion starts with, what joins its items, whether items
# are name=value pairs, and whether reserved characters pass unencoded.
_OPERATORS: dict[str, tuple[str, str, bool, bool]] = {
    "": ("", ",", False, False),
    "+": ("", ",", False, True),
    "#": ("#", ",", False, True),
    ".": (".", ".", False, False),
    "/": ("/", "/", False, False),
    ";": (";", ";", True, False),
    "?": ("?", "&", True, False),
    "&": ("&", "&", True, False),
}


class _Expression(Protocol):
    """What we use of a compiled RE2 expression (the package has no type hints)."""

    def fullmatch(self, text: str) -> object | None: ...


class MatcherError(ValueError):
    """A pattern or template that cannot be compiled; the message says why."""


class URLPatternMatcher:
    """A WHATWG URL Pattern, relative ones resolved against the hub's own URL.

    Topics are resolved against the same base, so ``/books/:id`` matches both the topic
    ``/books/1`` and ``https://<hub host>/books/1``. ``ignoreCase`` stays off, as Mercure
    requires: only the host is compared without case (URL canonicalisation does that).
    """

    __slots__ = ("_base", "_pattern", "text")
    kind = URL_PATTERN

    def __init__(self, text: str, base: str) -> None:
        if len(text) > MAX_PATTERN_LENGTH:
            raise MatcherError(f"the URL pattern is longer than {MAX_PATTERN_LENGTH} characters")
        self.text = text
        self._base = base
        self._pattern = _compile_url_pattern(text, base)

    def matches(self, topic: str) -> bool:
        try:
            return self._pattern.test(topic, self._base)
        except ValueError:
            return False

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, URLPatternMatcher)
            and other.text == self.text
            and other._base == self._base
        )

    def __hash__(self) -> int:
        return hash((URL_PATTERN, self.text, self._base))


# Thousands of subscribers tend to send the same few patterns: compile each once.
@functools.lru_cache(maxsize=4096)
def _compile_url_pattern(text: str, base: str) -> URLPattern:
    try:
        return URLPattern(text, base)
    except (ValueError, TypeError) as exc:
        raise MatcherError(f"not a valid URL pattern: {exc}") from None


class URITemplateMatcher:
    """An RFC 6570 URI template read as a pattern, as Mercure hubs before draft 8 did with
    the ``topic`` query parameter: ``https://example.com/books/{id}`` matches every topic
    that some value of ``id`` would expand to."""

    __slots__ = ("_regex", "text")
    kind = URI_TEMPLATE

    def __init__(self, text: str) -> None:
        if len(text) > MAX_PATTERN_LENGTH:
            raise MatcherError(f"the URI template is longer than {MAX_PATTERN_LENGTH} characters")
        self.text = text
        self._regex = _compile_template(text)

    def matches(self, topic: str) -> bool:
        return self._regex.fullmatch(topic) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URITemplateMatcher) and other.text == self.text

    def __hash__(self) -> int:
        return hash((URI_TEMPLATE, self.text))


def is_uri_template(text: str) -> bool:
    """Whether ``text`` has template expressions at all (else it can only match itself)."""
    return "{" in text


@functools.lru_cache(maxsize=4096)
def _compile_template(text: str) -> _Expression:
    parts: list[str] = []
    position = 0
    expressions = 0
    for found in _EXPRESSION.finditer(text):
        parts.append(_literal(text[position : found.start()]))
        parts.append(_expression(found.group(1)))
        position = found.end()
        expressions += 1
        if expressions > MAX_TEMPLATE_EXPRESSIONS:
            raise MatcherError(
                f"the URI template has more than {MAX_TEMPLATE_EXPRESSIONS} expressions"
            )
    parts.append(_literal(text[position:]))
    if not expressions:
        raise MatcherError("the URI template has no expression")
    compiled: _Expression = re2.compile("".join(parts))
    return compiled


def _literal(text: str) -> str:
    if "{" in text or "}" in text:
        raise MatcherError("the URI template has an unbalanced brace")
    return _escape(text)


def _escape(text: str) -> str:
    return str(re2.escape(text))


def _expression(body: str) -> str:
    operator = body[0] if body and body[0] in "+#./;?&" else ""
    if body and body[0] in "=,!@|":
        raise MatcherError(f"the URI template uses the reserved operator {body[:1]!r}")
    prefix, separator, named, reserved = _OPERATORS[operator]
    names: list[str] = []
    exploded = False
    for spec in body[len(operator) :].split(","):
        parsed = _MODIFIER.fullmatch(spec)
        if parsed is None or _VARIABLE.fullmatch(parsed.group(1)) is None:
            raise MatcherError(f"the URI template has an invalid variable {spec!r}")
        names.append(parsed.group(1))
        exploded = exploded or parsed.group(3) is not None
    characters = _UNRESERVED + (_RESERVED if reserved else "")
    value = f"(?:[{characters}]|{_PCT})*"
    if named:
        name = "(?:[A-Za-z0-9_.]|%[0-9A-Fa-f]{2})+" if exploded else _alternatives(names)
        item = f"{name}(?:={value})?"
    else:
        item = value
    # Exploded lists and composite values join with the separator or a comma.
    joiner = f"(?:{_escape(separator)}|,)" if exploded else _escape(separator)
    return f"(?:{_escape(prefix)}{item}(?:{joiner}{item})*)?"


def _alternatives(names: list[str]) -> str:
    return "(?:" + "|".join(_escape(name) for name in names) + ")"
