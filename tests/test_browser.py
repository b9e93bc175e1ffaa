"""A real browser against a real broker: headless Debian Chromium, driven by Playwright.

Python clients parse SSE the way we read the standard; these tests check that a browser's
own ``EventSource`` agrees: event order and exact data (line breaks, non-ASCII), its own
reconnects with ``Last-Event-ID``, named notices, and CORS from another origin. The demo
page is exercised too, and its screenshot kept as docs/demo.png.

Playwright drives the system's Chromium (``executable_path``); it never downloads one.
Waits are on page state, with generous deadlines only to keep a broken run from hanging.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, expect

from broker.subscriber import CloseReason
from tests.conftest import CHROMIUM, Broker, BrokerFactory, launch_chromium, publish

SCREENSHOT = Path(__file__).parents[1] / "docs" / "demo.png"
WAIT_MS = 30_000  # only so that a broken run fails instead of hanging

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)

# Data a browser must rebuild exactly: every SSE line ending (CR LF and a lone CR arrive
# as LF, as the standard says), blank and edge lines, field-like text, non-ASCII.
SAMPLES = [
    "plain",
    "two\nlines",
    "crlf\r\nline",
    "lone\rcr",
    "trailing break\n",
    "\nleading break",
    "",
    "  spaced  ",
    "data: not a field\nid: nor this",
    "emoji 🎉🚀 and a flag 🇫🇷",
    "漢字 かな カナ 한국어",
    "mixed Ünïcödé\r\n日本語\n\n",
    '{"json": ["kept", "as text"]}',
]

# Collects what a page's EventSource dispatches, on window.
COLLECT = """(url) => {
    window.got = [];
    window.notices = [];
    window.opens = 0;
    window.errors = 0;
    const source = new EventSource(url);
    source.onopen = () => { window.opens += 1; };
    source.onerror = () => { window.errors += 1; };
    source.onmessage = (e) => { window.got.push({ id: e.lastEventId, data: e.data }); };
    source.addEventListener("broker.missed", (e) => {
        window.notices.push({ id: e.lastEventId, data: e.data });
    });
    window.source = source;
}"""


def as_dispatched(data: str) -> str:
    return data.replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with launch_chromium() as launched:
        yield launched


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A page for scripts of the tests' own. Loaded from the broker, it is the demo page,
    whose policy forbids any script but its own: this page ignores the policy."""
    context = await browser.new_context(bypass_csp=True)
    yield await context.new_page()
    await context.close()


@pytest.fixture
async def demo_page(browser: Browser) -> AsyncIterator[Page]:
    """A page that keeps the demo's policy; it is driven through its controls only."""
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    yield await context.new_page()
    await context.close()


def console_errors(page: Page) -> list[str]:
    """Errors the page reports from now on: script failures, policy violations."""
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


async def wait(page: Page, expression: str, arg: Any = None) -> None:
    await page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)


async def test_eventsource_receives_500_events_in_order_with_exact_data(
    broker: Broker, page: Page, client: httpx.AsyncClient
) -> None:
    await page.goto(f"{broker.url}/")
    await page.evaluate(COLLECT, "/events?topic=browser/order")
    await wait(page, "window.opens === 1")
    sent: list[tuple[str, str]] = []
    for start in range(0, 500, 50):
        batch = [SAMPLES[i % len(SAMPLES)] for i in range(start, start + 50)]
        response = await client.post(
            f"{broker.url}/publish",
            json=[{"topic": "browser/order", "data": data} for data in batch],
        )
        assert response.status_code == 200, response.text
        sent += zip(response.json()["ids"], batch, strict=True)
    await wait(page, "window.got.length >= 500")
    got = await page.evaluate("window.got")
    assert got == [{"id": event_id, "data": as_dispatched(data)} for event_id, data in sent]
    assert await page.evaluate("[window.opens, window.errors]") == [1, 0]


async def test_browser_reconnects_by_itself_with_last_event_id_and_loses_nothing(
    make_broker: BrokerFactory, page: Page, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(retry=200)
    await page.goto(f"{broker.url}/")
    await page.evaluate(COLLECT, "/events?topic=browser/resume")
    await wait(page, "window.opens === 1")
    published: list[str] = []

    async def keep_publishing() -> None:
        for i in range(400):
            published.append(await publish(client, broker.url, "browser/resume", f"event {i}"))
            await asyncio.sleep(0.005)  # pacing, so that the stream ends mid-flow

    publisher = asyncio.create_task(keep_publishing())
    for round_ in range(1, 4):
        # The page has a Last-Event-ID by now; the server ends the stream under it.
        await wait(page, "(n) => window.got.length >= n", round_ * 80)
        broker.state.hub.close_all(CloseReason.SHUTDOWN)
        await wait(page, "(n) => window.opens >= n", round_ + 1)
    await publisher
    await wait(page, "(n) => window.got.length >= n", len(published))
    received = [event["id"] for event in await page.evaluate("window.got")]
    assert received == published  # every id once, in order: no gap, no duplicate
    # Each reconnect was the browser's own (one EventSource, its error then open again),
    # resumed from history: a reconnect without Last-Event-ID would have left gaps.
    assert await page.evaluate("[window.opens, window.notices.length]") == [4, 0]
    assert await page.evaluate("window.errors") >= 3
    assert broker.state.stats.replayed > 0


async def test_missed_notice_reaches_its_listener_and_not_onmessage(
    broker: Broker, page: Page, client: httpx.AsyncClient
) -> None:
    ids = [await publish(client, broker.url, "browser/missed", f"kept {i}") for i in range(3)]
    await page.goto(f"{broker.url}/")
    # A resume point history never held: the notice, then every retained event.
    await page.evaluate(COLLECT, "/events?topic=browser/missed&lastEventID=1-0")
    await wait(page, "window.got.length >= 3 && window.notices.length >= 1")
    notices = await page.evaluate("window.notices")
    assert len(notices) == 1
    assert json.loads(notices[0]["data"]) == {"lastEventId": "1-0"}
    assert notices[0]["id"] == ""  # the notice has no id: the resume point stays put
    got = await page.evaluate("window.got")
    assert got == [{"id": event_id, "data": f"kept {i}"} for i, event_id in enumerate(ids)]


async def cross_origin_attempt(page: Page, base: str, topic: str) -> dict[str, Any]:
    """From a page of another origin: open an EventSource on ``base`` and publish to it."""
    result: dict[str, Any] = await page.evaluate(
        """async ([base, topic]) => {
            const result = {};
            const url = `${base}/events?topic=${topic}`;
            const source = new EventSource(url, { withCredentials: true });
            result.stream = await new Promise((resolve) => {
                source.onopen = () => resolve("open");
                source.onerror = () => resolve("error");
            });
            const message = new Promise((resolve) => {
                source.onmessage = (e) => resolve(e.data);
            });
            try {
                const response = await fetch(`${base}/publish`, {
                    method: "POST",
                    headers: { "Content-Type": "application/json" },
                    body: JSON.stringify({ topic, data: "from another origin" }),
                });
                result.publish = response.status;
            } catch (error) {
                result.publish = error.name;
            }
            result.data = result.stream === "open" ? await message : null;
            source.close();
            return result;
        }""",
        [base, topic],
    )
    return result


async def test_cors_from_another_origin(make_broker: BrokerFactory, page: Page) -> None:
    async def app_page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>an app</title>", content_type="text/html")

    other = web.Application()
    other.router.add_get("/", app_page)
    site = TestServer(other, host="127.0.0.1")
    await site.start_server()
    try:
        origin = f"http://127.0.0.1:{site.port}"
        allowing = await make_broker(cors_origin=origin)
        refusing = await make_broker(cors_origin="https://elsewhere.example")
        await page.goto(f"{origin}/")

        allowed = await cross_origin_attempt(page, allowing.url, "browser/cors")
        assert allowed == {"stream": "open", "publish": 200, "data": "from another origin"}

        refused = await cross_origin_attempt(page, refusing.url, "browser/cors")
        assert refused == {"stream": "error", "publish": "TypeError", "data": None}
        # The preflight was refused, so the publish never reached the broker.
        assert refusing.state.stats.published == 0
    finally:
        await site.close()


async def test_demo_page_end_to_end_and_screenshot(
    make_broker: BrokerFactory, demo_page: Page, client: httpx.AsyncClient
) -> None:
    page = demo_page
    broker = await make_broker(retry=300)
    errors = console_errors(page)
    events = page.locator("#events li.event")
    await publish(client, broker.url, "demo/chat", {"user": "ana", "text": "before you came"})
    await page.goto(f"{broker.url}/")

    # Subscribe with a resume id history never held: the notice, then the retained event.
    await page.fill("#topics", "demo/chat, demo/news/*")
    await page.fill("#types", "headline")
    await page.fill("#resume", "1-0")
    await page.click("#connect")
    await expect(page.locator("#state")).to_have_text("connected", timeout=WAIT_MS)
    await expect(events).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("#events li.missed")).to_have_count(1)

    await publish(
        client, broker.url, "demo/news/eu", "Markets open higher\nEurope leads", event="headline"
    )
    # Non-ASCII here keeps to scripts every machine's fonts cover, for the screenshot's
    # sake; emoji and CJK are checked as data in the first test.
    await publish(client, broker.url, "demo/chat", {"user": "bo", "text": "Grüße, Γειά, Привет"})
    await expect(events).to_have_count(3, timeout=WAIT_MS)

    # Markup in event data stays text.
    hostile = '<img src=x onerror="window.injected = true"> <b>bold?</b> café'
    await page.fill("#pub-topic", "demo/chat")
    await page.fill("#pub-data", hostile)
    await page.click("#send")
    await expect(page.locator("#pub-result")).to_contain_text("Published as", timeout=WAIT_MS)
    await expect(events).to_have_count(4, timeout=WAIT_MS)
    newest = events.first
    await expect(newest.locator(".data")).to_have_text(hostile)
    await expect(newest.locator(".topic")).to_have_text("demo/chat")
    await expect(page.locator("#events img, #events b")).to_have_count(0)

    # The server ends the stream: the page shows the browser's own reconnect.
    broker.state.hub.close_all(CloseReason.SHUTDOWN)
    await expect(page.locator("#reconnects")).to_have_text("1", timeout=WAIT_MS)
    await expect(page.locator("#state")).to_have_text("connected", timeout=WAIT_MS)
    await page.fill("#pub-type", "headline")
    await page.fill("#pub-topic", "demo/news/asia")
    await page.fill("#pub-data", "Reconnected without losing an event")
    await page.click("#send")
    await expect(events).to_have_count(5, timeout=WAIT_MS)
    await expect(page.locator("#count")).to_have_text("5")

    # A refused publish shows the broker's error.
    await page.fill("#pub-topic", "demo/*")
    await page.click("#send")
    await expect(page.locator("#pub-result")).to_have_class(
        re.compile(r"\berror\b"), timeout=WAIT_MS
    )
    await expect(page.locator("#pub-result")).to_contain_text("invalid_event")
    await page.fill("#pub-topic", "demo/chat")
    await page.fill("#pub-type", "")
    await page.fill("#pub-data", "Hello from the demo page")
    await page.click("#send")
    await expect(events).to_have_count(6, timeout=WAIT_MS)

    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=SCREENSHOT)
    # No script failed and the page's policy blocked nothing of its own (the refused
    # publish above is logged as a failed load).
    assert [error for error in errors if not error.startswith("Failed to load resource")] == []
