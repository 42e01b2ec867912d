"""The usage widget in a real browser: Debian's Chromium driven by Playwright for Python, against
the local stack (the one `make dev` runs) on free ports.

- portals (package): two demo portals (devtools.portal) on their own loopback origins; the stack
  allows `allowed`'s origin (PortalOrigins), not `other`'s.
- browser_stack (package): the local stack, in memory, with `allowed` as its demo portal; both
  portals mint tokens with its read key.
- browser (package): headless Chromium; page: a fresh context and page per test, which fails the
  test on any uncaught script error.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from devtools.local_stack import LocalStack, StackOptions
from devtools.portal import DemoPortal, seed_demo_usage
from tests.browser.widget import RECORD_EVENTS
from tests.clock import on_real_clock, wait_out_month_end

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (make setup installs Debian's chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is missing (make setup installs requirements-dev.txt)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    # pytest-randomly shuffles modules across packages: each return to this one would start its
    # stack and Chromium (package-scoped) again. Its modules stay together, in their shuffled
    # order, where the first of them landed.
    ours = [item for item in items if here in item.path.parents]
    if ours:
        first = items.index(ours[0])
        others = [item for item in items if here not in item.path.parents]
        items[:] = others[:first] + ours + others[first:]
    # `make test` installs both; a bare pytest on a machine without them skips these tests, but
    # CI runs them whatever happens (there a missing browser fails them).
    reason = _missing()
    if reason is None or os.environ.get("CI"):
        return
    for item in items:
        uses_browser = {"browser", "page"} & set(getattr(item, "fixturenames", ()))
        if here in item.path.parents and uses_browser:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="package", autouse=True)
def _on_the_functions_clock() -> Iterator[None]:
    # The functions run in Lambda emulators and the page in Chromium, on the real clock; the
    # portals and stand-ins in this process must agree with them, whatever clock the run forces
    # on this process (tests/clock.py).
    with on_real_clock():
        yield


@dataclass
class Portals:
    allowed: DemoPortal  # its origin is in the stack's PortalOrigins
    other: DemoPortal  # a loopback origin the API does not allow


@pytest.fixture(scope="package")
def portals() -> Iterator[Portals]:
    quiet = lambda line: None  # noqa: E731
    allowed = DemoPortal(port=0, log=quiet)
    other = DemoPortal(port=0, log=quiet)
    try:
        yield Portals(allowed, other)
    finally:
        allowed.stop()
        other.stop()


@pytest.fixture(scope="package")
def browser_stack(sam_host_build: Path, portals: Portals) -> Iterator[LocalStack]:
    """The stack `make dev` runs, on free ports and in memory, its demo portal on `allowed`."""
    options = StackOptions(
        build_dir=sam_host_build,
        api_port=0,
        table_name="usage-browser-local",
        run_schedules=False,  # flushed on demand
        function_log=lambda function, line: None,
        log=lambda line: None,
        portal_origin=portals.allowed.origin,
    )
    with LocalStack(options) as stack:
        assert stack.api_url is not None and stack.portal_key is not None
        for portal in (portals.allowed, portals.other):
            portal.attach(stack.api_url, stack.portal_key).start()
        yield stack


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(
        locale="en-US", timezone_id="America/Los_Angeles", viewport={"width": 820, "height": 900}
    )
    context.set_default_timeout(30_000)
    context.add_init_script(RECORD_EVENTS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# -- usage to show --------------------------------------------------------------------------------

# Per customer: units recorded then flushed (reported), and units recorded after (pending).
# Meters are the template's: ai_messages with 1,000 included, api_calls with none.
USAGE = {
    "cus_BrowserUnder": ({"ai_messages": 300}, {"ai_messages": 120}),
    "cus_BrowserOver": (
        {"ai_messages": 1200, "api_calls": 40},
        {"ai_messages": 300, "api_calls": 2},
    ),
    "cus_BrowserExact": ({}, {"ai_messages": 1000}),
    "cus_BrowserUnused": ({}, {}),
}


@pytest.fixture(scope="package")
def server(browser_stack: LocalStack) -> requests.Session:
    """The app's side: the stack's admin key."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {browser_stack.server_key}"
    return session


def _record(api: str, server: requests.Session, step: int) -> None:
    events = [
        {
            "stripe_customer_id": customer,
            "meter": meter,
            "quantity": part,
            "idempotency_key": f"{customer}-{meter}-{step}-{i}",
        }
        for customer, steps in USAGE.items()
        for meter, quantity in steps[step].items()
        # in three events: the widget shows their sum
        for i, part in enumerate((quantity // 3, quantity // 3, quantity - 2 * (quantity // 3)))
        if part
    ]
    answer = server.post(f"{api}/v1/events/batch", json={"events": events}, timeout=60)
    assert answer.status_code == 202, answer.text


@pytest.fixture(scope="package")
def usage(browser_stack: LocalStack, portals: Portals, server: requests.Session) -> dict[str, Any]:
    """Record USAGE through the API, flushing in between so reported and pending differ; the
    demo portal's customer gets make dev's sample usage. The API's answer for each customer."""
    api = browser_stack.api_url
    assert api is not None
    # The pages read this month's usage, on the functions' clock, for the package's few minutes
    wait_out_month_end(600)
    _record(api, server, 0)
    # Records the demo's first half and flushes (that flush reports step 0 too), then the rest.
    assert seed_demo_usage(api, str(browser_stack.server_key), portals.allowed.customer)
    _record(api, server, 1)
    answers = {}
    for customer in [*USAGE, portals.allowed.customer]:
        answer = server.get(f"{api}/v1/customers/{customer}/usage", timeout=30)
        assert answer.status_code == 200, answer.text
        answers[customer] = answer.json()
    over = {m["meter"]: m for m in answers["cus_BrowserOver"]["meters"]}
    assert over["ai_messages"]["pending"] == 300 and over["ai_messages"]["reported"] == 1200
    return answers


@pytest.fixture(scope="package")
def mint(browser_stack: LocalStack) -> Any:
    """A portal token for a customer, as a host app's backend gets one (with its read key)."""

    def token(customer: str, ttl_seconds: int = 900) -> str:
        answer = requests.post(
            f"{browser_stack.api_url}/v1/portal-tokens",
            json={"stripe_customer_id": customer, "ttl_seconds": ttl_seconds},
            headers={"Authorization": f"Bearer {browser_stack.portal_key}"},
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])

    return token
