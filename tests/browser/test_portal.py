"""The demo portal `make dev` serves, in the browser: its page on an allowed origin gets a token
from its own backend and reads usage cross-origin; the same page on an origin the API does not
allow is refused by the browser (CORS). Screenshots of it, checked; one is the README's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from tests.browser.widget import (
    events,
    expired_token,
    host_page,
    picture,
    read_widget,
    wait_state,
    widget_tag,
)

pytestmark = pytest.mark.slow
README_SHOT = "USAGE_METER_WIDGET_PNG"  # set to docs/widget.png to refresh the README's picture


def test_the_demo_page_reads_usage_from_an_allowed_origin(page, portals, browser_stack, usage):
    answers = []
    page.on(
        "response",
        lambda r: (
            answers.append(r) if r.request.method == "GET" and r.url.endswith("/usage") else None
        ),
    )
    before = portals.allowed.tokens_issued
    page.goto(f"{portals.allowed.origin}/")
    wait_state(page, "ready")

    assert portals.allowed.tokens_issued == before + 1  # from the page's own backend
    [answer] = answers
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == portals.allowed.origin
    shown = read_widget(page)
    expected = usage[portals.allowed.customer]["meters"]
    assert [
        (m["meter"], m["quantity"], m["figures"]["pending"]["value"]) for m in shown["meters"]
    ] == [(m["meter"], m["quantity"], m["pending"]) for m in expected]
    assert any(m["pending"] and m["reported"] for m in expected)  # both kinds on show


def test_the_demo_page_is_refused_from_an_origin_the_api_does_not_allow(
    page, portals, browser_stack, usage
):
    console = []
    page.on("console", lambda message: console.append(message.text))
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url) if r.url.endswith("/usage") else None)
    page.goto(f"{portals.other.origin}/")
    wait_state(page, "error")

    assert portals.other.tokens_issued >= 1  # its own backend answered; the API's answer is hidden
    assert failed == [f"{browser_stack.api_url}/v1/customers/{portals.other.customer}/usage"]
    assert any(
        "blocked by CORS policy" in m and "Access-Control-Allow-Origin" in m for m in console
    )
    assert "unreachable" in read_widget(page)["error"]
    [error] = events(page, "usage-meter:error")
    assert error["detail"]["status"] == 0

    # What the browser saw: the API answers that origin without an allow header.
    preflight = requests.options(
        f"{browser_stack.api_url}/v1/customers/{portals.other.customer}/usage",
        headers={
            "Origin": portals.other.origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
        timeout=30,
    )
    assert "access-control-allow-origin" not in {h.lower() for h in preflight.headers}
    allowed = requests.options(
        f"{browser_stack.api_url}/v1/customers/{portals.other.customer}/usage",
        headers={"Origin": portals.allowed.origin, "Access-Control-Request-Method": "GET"},
        timeout=30,
    )
    assert allowed.headers["access-control-allow-origin"] == portals.allowed.origin


def test_the_portals_token_endpoint_refuses_other_origins(portals, browser_stack):
    url = f"{portals.allowed.origin}/usage-token"
    assert (
        requests.post(url, headers={"Origin": portals.other.origin}, timeout=30).status_code == 403
    )
    mine = requests.post(url, headers={"Origin": portals.allowed.origin}, timeout=60)
    assert mine.status_code == 200 and mine.json()["token"].startswith("upt_")


def _widget_state(page, portals, browser_stack, mint, state):
    """The widget in `state` on a host page of the allowed origin."""
    api, token = browser_stack.api_url, mint("cus_BrowserOver")
    if state == "expired":
        token = expired_token("cus_BrowserOver")
    if state == "error":
        api = "http://127.0.0.1:9"
    held = []
    if state in ("empty", "loading"):

        def answer(route):
            if state == "loading":
                held.append(route)
                return
            fetched = route.fetch()
            route.fulfill(response=fetched, json={**fetched.json(), "meters": []})

        page.route(f"{api}/v1/customers/cus_BrowserOver/usage", answer)
    host_page(page, portals.allowed.origin, widget_tag(api, token=token))
    wait_state(page, state)
    return held


@pytest.mark.parametrize("state", ["loading", "ready", "empty", "error", "expired"])
def test_each_state_is_drawn(page, portals, browser_stack, usage, mint, state):
    held = _widget_state(page, portals, browser_stack, mint, state)
    widget = page.locator("usage-meter")
    shot = picture(page, widget.screenshot())
    box = widget.bounding_box()
    # Not blank: a bordered box with text in it, the bars too when ready.
    assert box["height"] > 60 and shot["colors"] >= 8 and shot["not_background"] > 0.02, shot
    if state == "ready":
        assert shot["colors"] >= 20 and box["height"] > 200, shot
    for route in held:
        route.continue_()


def test_the_demo_page_screenshot(browser, portals, browser_stack, usage, tmp_path):
    # At twice the pixels, as the README shows it.
    context = browser.new_context(
        viewport={"width": 820, "height": 700}, device_scale_factor=2, locale="en-US"
    )
    page = context.new_page()
    try:
        page.goto(f"{portals.allowed.origin}/")
        wait_state(page, "ready")
        page.evaluate("document.fonts.ready")
        shot = picture(page, page.screenshot(full_page=True))
        assert shot["colors"] >= 50 and shot["not_background"] > 0.2, shot
        # The README's picture: the page from its heading to the widget's end.
        top = page.locator("h1").bounding_box()
        widget = page.locator("usage-meter").bounding_box()
        clip = {
            "x": widget["x"] - 32,
            "y": top["y"] - 24,
            "width": widget["width"] + 64,
            "height": widget["y"] + widget["height"] + 28 - (top["y"] - 24),
        }
        path = tmp_path / "widget.png"
        page.screenshot(path=str(path), clip=clip)
        assert picture(page, path.read_bytes())["colors"] >= 50
    finally:
        context.close()
    if os.environ.get(README_SHOT):
        shutil.copyfile(path, Path(os.environ[README_SHOT]))
