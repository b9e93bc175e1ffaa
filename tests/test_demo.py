"""The demo page as HTTP sees it: served at ``/`` unless ``--no-demo``, shipped in the
package, locked down by its headers. tests/test_browser.py checks it in a browser."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import pytest

from broker.config import load_config
from broker.web import demo
from tests.conftest import Broker, BrokerFactory

ROOT = Path(__file__).parents[1]
PAGE = ROOT / "broker" / "demo.html"


async def test_served_at_the_root(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.get(f"{broker.url}/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.content == PAGE.read_bytes()
    assert response.headers["Content-Security-Policy"] == demo.CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_head_answers_without_a_body(broker: Broker, client: httpx.AsyncClient) -> None:
    response = await client.head(f"{broker.url}/")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.content == b""


async def test_not_routed_with_no_demo(
    make_broker: BrokerFactory, client: httpx.AsyncClient
) -> None:
    broker = await make_broker(demo=False)
    response = await client.get(f"{broker.url}/")
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, True),
        (["--no-demo"], {}, False),
        ([], {"BROKER_DEMO": "false"}, False),
        (["--demo"], {"BROKER_DEMO": "off"}, True),
        ([], {"BROKER_DEMO": "yes"}, True),
    ],
)
def test_switch_by_flag_and_environment(
    argv: list[str], environ: dict[str, str], expected: bool
) -> None:
    assert load_config(argv, environ=environ).demo is expected


def test_shipped_in_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "demo.html" in project["tool"]["setuptools"]["package-data"]["broker"]
    assert PAGE.read_bytes() == demo.PAGE


def test_policy_allows_exactly_the_inline_blocks() -> None:
    """Inline ``on…=`` handlers or ``style=`` attributes would be blocked by the policy;
    each ``<script>`` and ``<style>`` element has its hash in it."""
    text = PAGE.read_text()
    assert not re.search(r"<[^>]*\s(on[a-z]+|style)\s*=", text)
    scripts = re.findall(r"<script\b", text)
    styles = re.findall(r"<style\b", text)
    policy = demo.CONTENT_SECURITY_POLICY
    script_src = re.search(r"script-src ([^;]+)", policy)
    style_src = re.search(r"style-src ([^;]+)", policy)
    assert script_src is not None
    assert style_src is not None
    assert len(script_src.group(1).split()) == len(scripts) == 1
    assert len(style_src.group(1).split()) == len(styles) == 1
    assert "unsafe" not in policy


def test_page_never_parses_received_text_as_html() -> None:
    """Event data, ids and error details reach the page as text: only ``textContent``
    puts them in the document (tests/test_browser.py shows markup staying text)."""
    text = PAGE.read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in text
