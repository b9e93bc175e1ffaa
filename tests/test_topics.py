"""Topic validation, pattern semantics, and the index agreeing with the plain matcher."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.topics import (
    MAX_TOPIC_LENGTH,
    Selector,
    TopicError,
    TopicIndex,
    pattern_matches,
    validate_pattern,
    validate_topic,
)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/*", "a/b", True),
        ("a/*", "a/b/c", False),
        ("a/*", "a", False),
        ("*/b", "x/b", True),
        ("a/*/c", "a/x/c", True),
        ("a/*/c", "a/x/d", False),
        ("a/**", "a/b", True),
        ("a/**", "a/b/c/d", True),
        ("a/**", "a", False),
        ("**", "anything/at/all", True),
        ("*", "one", True),
        ("*", "one/two", False),
        ("a*", "ab", False),
        ("a*", "a*", True),
        ("https://example.com/books/*", "https://example.com/books/1", True),
    ],
)
def test_pattern_semantics(pattern: str, topic: str, expected: bool) -> None:
    assert pattern_matches(pattern, topic) is expected
    index: TopicIndex[str] = TopicIndex()
    index.add(pattern, "sub")
    assert bool(index.match(topic)) is expected


@pytest.mark.parametrize(
    "bad", ["", "x" * (MAX_TOPIC_LENGTH + 1), "a\nb", "a\x00", "a\x7f", 5, None, ["a"]]
)
def test_invalid_topics_are_refused(bad: object) -> None:
    with pytest.raises(TopicError):
        validate_topic(bad)
    with pytest.raises(TopicError):
        validate_pattern(bad)


@pytest.mark.parametrize("wild", ["*", "a/*", "**", "a/**/b", "a/*/b"])
def test_published_topics_have_no_wildcard_segment(wild: str) -> None:
    with pytest.raises(TopicError):
        validate_topic(wild)


def test_double_star_only_last() -> None:
    assert validate_pattern("a/**") == "a/**"
    with pytest.raises(TopicError, match="last segment"):
        validate_pattern("a/**/b")


def test_unicode_and_uri_topics_are_fine() -> None:
    for topic in ("caf\u00e9/\u65e5\u672c", "https://example.com/books/1", "a//b", "/lead"):
        assert validate_topic(topic) == topic


def test_selector_deduplicates_and_matches_any_topic() -> None:
    selector = Selector(["a/*", "a/*", "b"])
    assert selector.patterns == ("a/*", "b")
    assert selector.matches_any(["z", "a/q"])
    assert not selector.matches_any(["a", "c"])


def test_remove_prunes_every_branch() -> None:
    index: TopicIndex[int] = TopicIndex()
    patterns = ["a/b", "a/*", "a/*/c", "a/**", "**", "x/y/z/*", "*"]
    for number, pattern in enumerate(patterns):
        index.add(pattern, number)
        index.add(pattern, number + 100)
    assert len(index) > 0
    for number, pattern in enumerate(patterns):
        index.remove(pattern, number)
        index.remove(pattern, number + 100)
    assert len(index) == 0
    assert index.match("a/b") == []


def test_removing_unknown_pattern_is_harmless() -> None:
    index: TopicIndex[int] = TopicIndex()
    index.add("a/*", 1)
    index.remove("b/*", 1)
    index.remove("a/*", 2)
    index.remove("zzz", 1)
    assert index.match("a/x") == [{1}]


segment = st.sampled_from(["a", "b", "c"])
topic_strategy = st.lists(segment, min_size=1, max_size=4).map("/".join)
pattern_strategy = st.lists(st.sampled_from(["a", "b", "c", "*"]), min_size=1, max_size=4).flatmap(
    lambda parts: st.sampled_from(["/".join(parts), "/".join([*parts[:-1], "**"])])
)


@given(
    patterns=st.lists(pattern_strategy, max_size=12), topics=st.lists(topic_strategy, max_size=8)
)
def test_index_agrees_with_pattern_matches(patterns: list[str], topics: list[str]) -> None:
    index: TopicIndex[int] = TopicIndex()
    for number, pattern in enumerate(patterns):
        index.add(pattern, number)
    for topic in topics:
        found = set().union(*index.match(topic)) if index.match(topic) else set()
        expected = {n for n, p in enumerate(patterns) if pattern_matches(p, topic)}
        assert found == expected, (topic, patterns)
    for number, pattern in enumerate(patterns):
        index.remove(pattern, number)
    assert len(index) == 0


def test_selector_exact_topics_match_byte_for_byte() -> None:
    selector = Selector(exact=["a/*", "https://Example.com/x"])
    assert selector.matches_any(["a/*"])
    assert not selector.matches_any(["a/b", "https://example.com/x"])
    assert len(selector) == 2


def test_index_exact_entries_coexist_with_patterns() -> None:
    index: TopicIndex[str] = TopicIndex()
    index.add_exact("a/*", "literal")
    index.add("a/*", "pattern")
    # A topic with a "*" segment walks the wildcard branch twice; the hub merges groups.
    assert {s for group in index.match("a/*") for s in group} == {"literal", "pattern"}
    assert [s for group in index.match("a/b") for s in group] == ["pattern"]
    index.remove_exact("a/*", "literal")
    index.remove("a/*", "pattern")
    assert len(index) == 0
