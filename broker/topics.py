"""Topic names, subscription patterns, and the index that finds who wants an event.

A topic is a ``/``-separated string. A subscription pattern may use two wildcards, each
a whole segment: ``*`` matches exactly one segment, and ``**`` as the last segment
matches one or more remaining segments. A ``*`` inside a segment (``a*b``) is an
ordinary character. Topics published through our API may not have wildcard segments,
so a topic never means two things there; Mercure's publish accepts them as plain text
(which our wildcards match like any segment).

Mercure's Exact matchers are added to the index as exact topics, never as patterns, and
the matchers a trie cannot hold (URL patterns, URI templates) are the hub's to scan.

The index is a segment trie: publishing walks one path per topic (plus the ``*``
branches), so the cost depends on the topic's depth and the number of distinct
patterns, never on the number of subscribers.
"""

from __future__ import annotations

import functools
import re
import urllib.parse
from collections.abc import Hashable, Iterable
from typing import Generic, Protocol, TypeVar

from yarl import URL

MAX_TOPIC_LENGTH = 1024
STAR = "*"
DOUBLE_STAR = "**"
# Mercure's hub path: topics resolving into it are the hub's own (subscription events).
HUB_PATH = "/.well-known/mercure"
# Any base with the hub's path: where a topic lands does not depend on scheme or host.
_HUB_BASE = "http://hub.invalid" + HUB_PATH

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

S = TypeVar("S", bound=Hashable)


class TopicError(ValueError):
    """A topic or pattern that cannot be accepted; the message says why."""


def _check_text(topic: object, what: str) -> str:
    if not isinstance(topic, str):
        raise TopicError(f"{what} must be a string")
    if not topic:
        raise TopicError(f"{what} must not be empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"{what} is longer than {MAX_TOPIC_LENGTH} characters")
    if _CONTROL.search(topic):
        raise TopicError(f"{what} must not contain control characters")
    return topic


def text_problem(value: str) -> str | None:
    """What makes ``value`` unfit for a Mercure topic or matcher, or None: Mercure also
    refuses C1 controls, and text that was not UTF-8 as sent (lone surrogates here)."""
    for character in value:
        code = ord(character)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return "must not contain control characters"
        if 0xD800 <= code <= 0xDFFF:
            return "is not valid UTF-8"
    return None


def validate_topic(topic: object) -> str:
    """Check a topic an event is published to."""
    if not isinstance(topic, str):
        raise TopicError("topic must be a string")
    return _validate_topic_text(topic)


# Publishers send the same few topics over and over: remember the ones that passed.
@functools.lru_cache(maxsize=4096)
def _validate_topic_text(topic: str) -> str:
    text = _check_text(topic, "topic")
    if any(segment in (STAR, DOUBLE_STAR) for segment in text.split("/")):
        raise TopicError(f"topic {text!r} has a wildcard segment; wildcards are for subscribing")
    if in_hub_namespace(text):
        raise TopicError(f"topic {text!r} is in the Mercure hub's namespace {HUB_PATH}/")
    return text


def is_reserved(topic: str) -> bool:
    """Whether ``topic``, resolved as a URI reference against the Mercure hub's URL,
    addresses the hub's reserved namespace: ``/.well-known/mercure`` or below, whatever
    its scheme and host (Mercure's rule for its publishers).

    Resolution normalises dot segments and percent-encoded dots, so neither
    ``/x/../.well-known/mercure`` nor ``%2Ewell-known`` slips through.
    """
    if topic[:1] in ("?", "#"):
        return True  # a query or fragment alone: the hub's own URL
    path = _hub_path_of(topic)
    return path is not None and (path == HUB_PATH or path.startswith(HUB_PATH + "/"))


def in_hub_namespace(topic: str) -> bool:
    """Whether ``topic`` resolves to a resource under the hub's path, where only the hub
    publishes (subscription events): refused on every API, since a publisher that could
    publish there would forge them for Mercure subscribers. Our own API stays free to use
    topics such as ``#general`` that Mercure's stricter rule refuses."""
    path = _hub_path_of(topic)
    return path is not None and path.startswith(HUB_PATH + "/")


def _hub_path_of(topic: str) -> str | None:
    """The path ``topic`` resolves to against the hub's URL, when it may be in the hub's
    namespace at all; None for the (almost all) topics that cannot be: no ``mercure``
    and nothing percent-encoded means no URL parse."""
    if "%" not in topic and "mercure" not in topic.lower():
        return None
    try:
        url = URL(topic)
        if not url.is_absolute() and not url.scheme:
            url = URL(_HUB_BASE).join(url)
        path = url.path
    except (ValueError, TypeError):
        try:
            resolved = urllib.parse.urljoin(_HUB_BASE, topic)
            path = urllib.parse.unquote(urllib.parse.urlsplit(resolved).path)
        except ValueError:
            return None
    return path.replace("\\", "/")


def validate_pattern(pattern: object) -> str:
    """Check a subscription pattern: ``**`` only as the last segment."""
    text = _check_text(pattern, "topic")
    segments = text.split("/")
    if DOUBLE_STAR in segments[:-1]:
        raise TopicError(f"topic {text!r}: '**' is only allowed as the last segment")
    return text


def is_pattern(pattern: str) -> bool:
    return any(segment in (STAR, DOUBLE_STAR) for segment in pattern.split("/"))


def pattern_matches(pattern: str, topic: str) -> bool:
    """Whether one pattern matches one topic; used to filter history during replay."""
    if pattern == topic:
        return True
    wanted = pattern.split("/")
    actual = topic.split("/")
    for index, segment in enumerate(wanted):
        if segment == DOUBLE_STAR:
            return len(actual) > index
        if index >= len(actual) or (segment != STAR and segment != actual[index]):
            return False
    return len(actual) == len(wanted)


class Matcher(Protocol):
    """A subscription or grant that the index cannot place in its trie (a URL pattern,
    a URI template): the hub asks each distinct one about every published topic.

    Matchers must be hashable and equal when they match the same topics, so that many
    subscribers holding the same one cost one evaluation per topic.
    """

    kind: str
    text: str

    def matches(self, topic: str) -> bool: ...


class Selector:
    """A subscription's set of patterns, answering "does this event concern me?".

    ``patterns`` use our topic syntax. ``exact`` are topics compared byte for byte, even
    where they look like our wildcards (Mercure's ``Exact`` matchers), and ``scanned``
    are matchers of other kinds. All three feed one index in the hub.
    """

    __slots__ = ("_exact", "_patterns", "exact", "patterns", "scanned")

    def __init__(
        self,
        patterns: Iterable[str] = (),
        *,
        exact: Iterable[str] = (),
        scanned: Iterable[Matcher] = (),
    ) -> None:
        self.patterns = tuple(dict.fromkeys(patterns))
        self.exact = tuple(dict.fromkeys(exact))
        self.scanned = tuple(dict.fromkeys(scanned))
        self._exact = frozenset(p for p in self.patterns if not is_pattern(p)) | frozenset(
            self.exact
        )
        self._patterns = tuple(p for p in self.patterns if is_pattern(p))

    def __len__(self) -> int:
        return len(self.patterns) + len(self.exact) + len(self.scanned)

    def __repr__(self) -> str:
        shown = [*self.patterns, *self.exact, *(f"{m.kind}:{m.text}" for m in self.scanned)]
        return f"Selector({shown!r})"

    def matches_any(self, topics: Iterable[str]) -> bool:
        for topic in topics:
            if topic in self._exact:
                return True
            for pattern in self._patterns:
                if pattern_matches(pattern, topic):
                    return True
            for matcher in self.scanned:
                if matcher.matches(topic):
                    return True
        return False


class _Node(Generic[S]):
    __slots__ = ("children", "here", "rest")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.here: set[S] = set()
        self.rest: set[S] = set()

    def is_empty(self) -> bool:
        return not (self.children or self.here or self.rest)


class TopicIndex(Generic[S]):
    """Maps patterns to the subscribers holding them.

    ``match`` returns the subscriber sets themselves (no copy): the caller may iterate
    them only until it next yields to the event loop, and must merge them when there is
    more than one, since a subscriber can hold several patterns that match one topic.
    """

    __slots__ = ("_exact", "_root")

    def __init__(self) -> None:
        self._exact: dict[str, set[S]] = {}
        self._root: _Node[S] = _Node()

    def add(self, pattern: str, subscriber: S) -> None:
        if not is_pattern(pattern):
            self.add_exact(pattern, subscriber)
            return
        node = self._root
        segments = pattern.split("/")
        for segment in segments[:-1]:
            node = node.children.setdefault(segment, _Node())
        last = segments[-1]
        if last == DOUBLE_STAR:
            node.rest.add(subscriber)
        else:
            node.children.setdefault(last, _Node()).here.add(subscriber)

    def add_exact(self, topic: str, subscriber: S) -> None:
        """Register a topic compared byte for byte, whatever its segments look like."""
        self._exact.setdefault(topic, set()).add(subscriber)

    def remove_exact(self, topic: str, subscriber: S) -> None:
        subscribers = self._exact.get(topic)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._exact[topic]

    def remove(self, pattern: str, subscriber: S) -> None:
        """Forget one pattern of one subscriber, pruning emptied branches so nothing leaks."""
        if not is_pattern(pattern):
            self.remove_exact(pattern, subscriber)
            return
        segments = pattern.split("/")
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        walk = segments[:-1] if segments[-1] == DOUBLE_STAR else segments
        for segment in walk:
            child = node.children.get(segment)
            if child is None:
                return
            path.append((node, segment))
            node = child
        if segments[-1] == DOUBLE_STAR:
            node.rest.discard(subscriber)
        else:
            node.here.discard(subscriber)
        for parent, segment in reversed(path):
            if not parent.children[segment].is_empty():
                break
            del parent.children[segment]

    def match(self, topic: str) -> list[set[S]]:
        found: list[set[S]] = []
        exact = self._exact.get(topic)
        if exact:
            found.append(exact)
        root = self._root
        if root.children or root.rest:
            self._walk(root, topic.split("/"), 0, found)
        return found

    def _walk(self, node: _Node[S], segments: list[str], index: int, found: list[set[S]]) -> None:
        if index == len(segments):
            if node.here:
                found.append(node.here)
            return
        if node.rest:
            found.append(node.rest)
        child = node.children.get(segments[index])
        if child is not None:
            self._walk(child, segments, index + 1, found)
        star = node.children.get(STAR)
        if star is not None:
            self._walk(star, segments, index + 1, found)

    def __len__(self) -> int:
        """Number of distinct exact topics and trie nodes in use (for leak checks)."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            count += len(node.children)
            stack.extend(node.children.values())
        return len(self._exact) + count
