"""URL patterns and URI templates as topic matchers: what they match, what they refuse,
and that no pattern can make matching slow."""

from __future__ import annotations

import pytest

from broker.matchers import (
    MAX_PATTERN_LENGTH,
    MAX_TEMPLATE_EXPRESSIONS,
    MatcherError,
    URITemplateMatcher,
    URLPatternMatcher,
    is_uri_template,
)

HUB = "https://hub.example/.well-known/mercure"


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("https://example.com/books/:id", "https://example.com/books/1", True),
        ("https://example.com/books/:id", "https://example.com/books/1/2", False),
        ("https://example.com/books/:id", "https://EXAMPLE.com/books/1", True),
        ("https://example.com/books/:id", "https://example.com/Books/1", False),
        ("https://example.com/books/*", "https://example.com/books/1/2", True),
        ("https://example.com/books/:id(\\d+)", "https://example.com/books/x", False),
        ("/books/:id", "/books/7", True),
        ("/books/:id", "https://hub.example/books/7", True),
        ("/books/:id", "https://other.example/books/7", False),
        ("books/:id", "https://hub.example/.well-known/books/7", True),
        ("https://example.com/books/:id", "not a url at all", False),
        ("https://example.com/books/:id", "urn:uuid:1", False),
        (
            "/.well-known/mercure/subscriptions/:type/:match/:sub",
            "/.well-known/mercure/subscriptions/Exact/a/b",
            True,
        ),
    ],
)
def test_url_patterns(pattern: str, topic: str, expected: bool) -> None:
    assert URLPatternMatcher(pattern, HUB).matches(topic) is expected


def test_url_pattern_equality_depends_on_text_and_base() -> None:
    assert URLPatternMatcher("/a/:x", HUB) == URLPatternMatcher("/a/:x", HUB)
    assert hash(URLPatternMatcher("/a/:x", HUB)) == hash(URLPatternMatcher("/a/:x", HUB))
    assert URLPatternMatcher("/a/:x", HUB) != URLPatternMatcher("/a/:x", "https://b/")
    assert URLPatternMatcher("/a/:x", HUB) != URLPatternMatcher("/a/:y", HUB)


@pytest.mark.parametrize(
    "bad", ["https://example.com/:id(", "https://example.com/:id((a)\\1)", "x" * 1025]
)
def test_invalid_url_patterns_are_refused(bad: str) -> None:
    with pytest.raises(MatcherError):
        URLPatternMatcher(bad, HUB)


def test_a_backtracking_url_pattern_is_evaluated_in_linear_time() -> None:
    """On a backtracking engine this is exponential in the topic's length; the Rust
    engine behind ``urlpattern`` answers at once (pytest-timeout would stop a hang)."""
    matcher = URLPatternMatcher("https://x/:a((?:a+)+b)", HUB)
    assert not matcher.matches("https://x/" + "a" * 100_000 + "c")


@pytest.mark.parametrize(
    ("template", "topic", "expected"),
    [
        ("https://example.net/foo/{random}", "https://example.net/foo/abc", True),
        ("https://example.net/foo/{random}", "https://example.net/foo/a%20b", True),
        ("https://example.net/foo/{random}", "https://example.net/foo/a/b", False),
        ("https://example.net/foo/{random}", "https://example.net/bar/x", False),
        ("https://example.net/{+path}", "https://example.net/a/b?c", True),
        ("/books{/id*}", "/books/1/2", True),
        ("/books{/id*}", "/books", True),
        ("/search{?q,page}", "/search?q=x&page=2", True),
        ("/search{?q,page}", "/search?other=1", False),
        ("/x{#frag}", "/x#a/b", True),
        ("/x{.ext}", "/x.json", True),
        ("/m{;a,b}", "/m;a=1;b=2", True),
        ("/a/{x}/{y}", "/a/1/2", True),
        ("/a/{x}/{y}", "/a/1", False),
    ],
)
def test_uri_templates(template: str, topic: str, expected: bool) -> None:
    assert URITemplateMatcher(template).matches(topic) is expected


@pytest.mark.parametrize(
    "bad",
    [
        "a{",
        "a}{b}",
        "{}",
        "{a b}",
        "{=a}",
        "{a:0}",
        "plain",
        "{a}" * (MAX_TEMPLATE_EXPRESSIONS + 1),
    ],
)
def test_invalid_uri_templates_are_refused(bad: str) -> None:
    with pytest.raises(MatcherError):
        URITemplateMatcher(bad)


def test_adjacent_template_expressions_cannot_make_matching_slow() -> None:
    """Thirty adjacent expressions backtrack forever on Python's ``re``; RE2 is linear."""
    template = "/x/" + "{a}" * 30 + "!"
    assert not URITemplateMatcher(template).matches("/x/" + "a" * 1000)


def test_is_uri_template_and_length_limit() -> None:
    assert is_uri_template("/a/{b}")
    assert not is_uri_template("/a/b")
    with pytest.raises(MatcherError):
        URITemplateMatcher("/{a}" + "x" * MAX_PATTERN_LENGTH)
