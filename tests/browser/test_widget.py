"""<usage-meter> on a host page of an allowed portal origin, reading the real API: its numbers,
bars, ARIA, keyboard use, states and refresh."""

from __future__ import annotations

import pytest

from tests.browser.conftest import USAGE
from tests.browser.widget import (
    bar_pixels,
    events,
    expired_token,
    host_page,
    number,
    read_widget,
    wait_state,
    widget_tag,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("customer", "lang"),
    [
        ("cus_BrowserUnder", "en-US"),
        ("cus_BrowserOver", "de-DE"),
        ("cus_BrowserExact", "fr-FR"),
        ("cus_BrowserUnused", "en-GB"),
    ],
)
def test_the_widget_shows_the_apis_numbers_in_the_pages_locale(
    page, portals, browser_stack, usage, mint, customer, lang
):
    expected = usage[customer]
    host_page(
        page,
        portals.allowed.origin,
        widget_tag(browser_stack.api_url, token=mint(customer)),
        lang=lang,
    )
    wait_state(page, "ready")
    shown = read_widget(page)

    assert [m["meter"] for m in shown["meters"]] == [m["meter"] for m in expected["meters"]]
    for meter, api in zip(shown["meters"], expected["meters"], strict=True):
        assert (meter["quantity"], meter["included"]) == (api["quantity"], api["included"])
        figures = {name: figure["value"] for name, figure in meter["figures"].items()}
        assert figures == {
            "remaining": api["included_remaining"],
            "billable": api["billable"],
            "pending": api["pending"],
        }
        for figure in meter["figures"].values():
            assert figure["text"] == number(page, figure["value"], lang)
        assert number(page, api["quantity"], lang) in meter["used"]
        if api["included"]:
            assert number(page, api["included"], lang) in meter["used"]
    assert shown["period"]["datetime"] == expected["period"]["start"]
    # What the API said, as the widget fetched it (its own as_of).
    fetched = page.eval_on_selector("usage-meter", "el => el.usage")
    assert {k: v for k, v in fetched.items() if k != "as_of"} == {
        k: v for k, v in expected.items() if k != "as_of"
    }
    assert shown["as_of"]["datetime"] == fetched["as_of"]
    as_of = page.evaluate(
        "([t, l]) => new Intl.DateTimeFormat(l, {dateStyle: 'medium', timeStyle: 'short'})"
        ".format(new Date(t))",
        [fetched["as_of"], lang],
    )
    assert shown["as_of"]["text"] == as_of


def test_the_usage_recorded_splits_into_reported_and_pending_as_recorded(usage):
    # The data the other tests compare against is the one this module meant to record.
    for customer, (reported, pending) in USAGE.items():
        for meter in usage[customer]["meters"]:
            name = meter["meter"]
            assert meter["reported"] == reported.get(name, 0), (customer, meter)
            assert meter["pending"] == pending.get(name, 0), (customer, meter)


def test_each_bar_is_a_progressbar_with_value_maximum_and_name(
    page, portals, browser_stack, usage, mint
):
    host_page(
        page,
        portals.allowed.origin,
        widget_tag(browser_stack.api_url, token=mint("cus_BrowserOver")),
    )
    wait_state(page, "ready")
    for api in usage["cus_BrowserOver"]["meters"]:
        name = api["meter"].replace("_", " ")
        bar = page.get_by_role("progressbar", name=name, exact=True)  # the accessible name
        assert bar.count() == 1
        assert bar.get_attribute("aria-valuemin") == "0"
        assert bar.get_attribute("aria-valuenow") == str(api["quantity"])
        assert bar.get_attribute("aria-valuemax") == str(max(api["quantity"], api["included"]))
        text = bar.get_attribute("aria-valuetext")
        assert f"{api['quantity']:,}" in text and f"{api['billable']:,} billable" in text
    tree = page.locator("usage-meter").aria_snapshot()
    assert 'heading "Usage" [level=2]' in tree
    assert 'progressbar "ai messages"' in tree and 'button "Refresh"' in tree


@pytest.mark.parametrize("customer", ["cus_BrowserUnder", "cus_BrowserOver", "cus_BrowserUnused"])
def test_bars_are_drawn_in_proportion(page, portals, browser_stack, usage, mint, customer):
    host_page(page, portals.allowed.origin, widget_tag(browser_stack.api_url, token=mint(customer)))
    wait_state(page, "ready")
    shown = read_widget(page)
    bars = page.locator("usage-meter").get_by_role("progressbar")
    for i, api in enumerate(usage[customer]["meters"]):
        scale = max(api["quantity"], api["included"]) or 1
        included = (api["quantity"] - api["billable"]) / scale
        billable = api["billable"] / scale
        meter = shown["meters"][i]
        # Layout: the segments' widths
        assert meter["included_width"] == pytest.approx(included * meter["track"], abs=1)
        assert meter["billable_width"] == pytest.approx(billable * meter["track"], abs=1)
        # Pixels: what a screenshot of the bar shows, by colour along its middle
        pixels = bar_pixels(page, bars.nth(i).screenshot())
        width = pixels["width"]
        assert pixels["included"] == pytest.approx(included * width, abs=4), (api, pixels)
        assert pixels["billable"] == pytest.approx(billable * width, abs=4), (api, pixels)


def test_loading_shows_its_state_until_the_answer_comes(page, portals, browser_stack, usage, mint):
    held = []
    url = f"{browser_stack.api_url}/v1/customers/cus_BrowserUnder/usage"
    page.route(url, lambda route: held.append(route))  # held: no answer yet
    host_page(
        page,
        portals.allowed.origin,
        widget_tag(browser_stack.api_url, token=mint("cus_BrowserUnder")),
    )
    wait_state(page, "loading")
    shown = read_widget(page)
    assert shown["status"] == "Loading usage…" and shown["busy"] == "true"
    assert shown["meters"] == []
    while not held:  # the route handler runs while Playwright waits
        page.wait_for_timeout(20)
    held[0].continue_()
    wait_state(page, "ready")
    assert read_widget(page)["busy"] == "false"


def test_an_empty_answer_shows_the_empty_state(page, portals, browser_stack, usage, mint):
    def empty(route):
        answer = route.fetch()
        route.fulfill(response=answer, json={**answer.json(), "meters": []})

    page.route(f"{browser_stack.api_url}/v1/customers/cus_BrowserUnder/usage", empty)
    host_page(
        page,
        portals.allowed.origin,
        widget_tag(browser_stack.api_url, token=mint("cus_BrowserUnder")),
    )
    wait_state(page, "empty")
    empty = page.locator("usage-meter").locator("[part=empty]")  # in its shadow DOM
    assert empty.inner_text() == "No usage to show for this period."


def test_a_meter_with_its_own_period_shows_it(page, portals, browser_stack, usage, mint):
    # The API may give a meter its own period (a subscription item on another schedule).
    own = {
        "start": "2026-10-15T09:30:00Z",
        "end": "2026-11-15T09:30:00Z",
        "source": "stripe_subscription",
    }

    def with_period(route):
        answer = route.fetch()
        body = answer.json()
        body["meters"][0]["period"] = own
        body["meters"][1]["period"] = body["period"]  # the same as the top one: not repeated
        route.fulfill(response=answer, json=body)

    page.route(f"{browser_stack.api_url}/v1/customers/cus_BrowserOver/usage", with_period)
    host_page(
        page,
        portals.allowed.origin,
        widget_tag(browser_stack.api_url, token=mint("cus_BrowserOver")),
    )
    wait_state(page, "ready")
    first, second = read_widget(page)["meters"]
    assert first["period"]["datetime"] == own["start"]
    # Dates in UTC, the end exclusive: what Intl makes of Oct 15 to Nov 15, whatever the time zone
    assert first["period"]["text"] == page.evaluate(
        "new Intl.DateTimeFormat('en-US', {dateStyle: 'medium', timeZone: 'UTC'})"
        ".formatRange(new Date(Date.UTC(2026, 9, 15)), new Date(Date.UTC(2026, 10, 15)))"
    )
    assert second["period"] is None


def test_an_unreachable_api_shows_the_error_state_and_fires_its_event(page, portals, mint):
    host_page(
        page,
        portals.allowed.origin,
        widget_tag("http://127.0.0.1:9", token=mint("cus_BrowserUnder")),
    )
    wait_state(page, "error")
    assert "could not be loaded" in read_widget(page)["error"]
    assert page.locator("usage-meter").get_by_role("alert").count() == 1
    [error] = events(page, "usage-meter:error")
    assert error["detail"]["status"] == 0


def test_an_expired_token_shows_its_state_fires_its_event_and_a_new_token_retries(
    page, portals, browser_stack, usage, mint
):
    fresh = mint("cus_BrowserOver")
    host_page(
        page,
        portals.allowed.origin,
        widget_tag(browser_stack.api_url, token=expired_token("cus_BrowserOver")),
    )
    wait_state(page, "expired")
    shown = read_widget(page)
    assert "session has expired" in shown["error"] and shown["meters"] == []
    [event] = events(page, "usage-meter:token-expired")
    assert event["detail"] == {
        "status": 401,
        "code": "unauthorized",
        "message": "portal token expired",
    }

    # The host answers the event with a new token; the widget loads with it.
    page.eval_on_selector("usage-meter", "(el, t) => el.setAttribute('token', t)", fresh)
    wait_state(page, "ready")
    shown = read_widget(page)
    assert [m["quantity"] for m in shown["meters"]] == [
        m["quantity"] for m in usage["cus_BrowserOver"]["meters"]
    ]


def test_a_host_can_renew_the_token_from_the_event_itself(
    page, portals, browser_stack, usage, mint
):
    fresh = mint("cus_BrowserUnder")
    page.add_init_script(  # the host page's own script
        f"""document.addEventListener("usage-meter:token-expired", (e) => {{
          e.target.setAttribute("token", {fresh!r});
        }});"""
    )
    body = widget_tag(browser_stack.api_url, token=expired_token("cus_BrowserUnder"))
    host_page(page, portals.allowed.origin, body)
    wait_state(page, "ready")
    assert len(events(page, "usage-meter:token-expired")) == 1
    assert len(events(page, "usage-meter:load")) == 1


def test_the_widget_is_reachable_and_usable_by_keyboard(page, portals, browser_stack, usage, mint):
    body = (
        '<button id="before">before</button>'
        + widget_tag(browser_stack.api_url, token=mint("cus_BrowserUnder"))
        + '<button id="after">after</button>'
    )
    host_page(page, portals.allowed.origin, body)
    wait_state(page, "ready")
    focused = (
        "() => document.activeElement.shadowRoot?.activeElement?.getAttribute('part')"
        " ?? document.activeElement.id"
    )
    page.focus("#before")
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "refresh"
    outline = page.evaluate(
        "() => getComputedStyle(document.activeElement.shadowRoot.activeElement).outlineStyle"
    )
    assert outline != "none"  # a visible focus indicator
    page.keyboard.press("Enter")  # refreshes
    page.wait_for_function(
        "() => window.events.filter(e => e.type === 'usage-meter:load').length === 2"
    )
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "after"  # nothing else to stop at: no focus trap

    # In the error state, "Try again" is next after "Refresh", and Enter retries.
    page.eval_on_selector("usage-meter", "el => el.setAttribute('api', 'http://127.0.0.1:9')")
    wait_state(page, "error")
    page.focus("#before")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "retry"
    page.keyboard.press("Space")
    page.wait_for_function(
        "() => window.events.filter(e => e.type === 'usage-meter:error').length === 2"
    )


def test_refresh_polls_no_faster_than_the_floor(page, portals, browser_stack, usage, mint):
    page.clock.install()
    requests_seen = []
    page.on(
        "request",
        lambda r: (
            requests_seen.append(r)
            if r.method == "GET" and r.url.endswith("/cus_BrowserUnder/usage")
            else None
        ),
    )
    body = widget_tag(browser_stack.api_url, token=mint("cus_BrowserUnder"), refresh="5")
    host_page(page, portals.allowed.origin, body)
    wait_state(page, "ready")
    assert page.evaluate("customElements.get('usage-meter').REFRESH_FLOOR") == 30
    assert len(requests_seen) == 1
    page.clock.run_for(29_000)  # asked for every 5 s: the floor holds it to 30 s
    assert len(events(page, "usage-meter:load")) == 1 and len(requests_seen) == 1
    page.clock.run_for(1_500)
    page.wait_for_function(
        "() => window.events.filter(e => e.type === 'usage-meter:load').length === 2"
    )
    assert len(requests_seen) == 2


def test_without_refresh_it_never_polls(page, portals, browser_stack, usage, mint):
    page.clock.install()
    body = widget_tag(browser_stack.api_url, token=mint("cus_BrowserUnder"))
    host_page(page, portals.allowed.origin, body)
    wait_state(page, "ready")
    page.clock.run_for(3_600_000)
    page.wait_for_function("() => true")
    assert len(events(page, "usage-meter:load")) == 1
