"""What the browser tests share: a host page on a portal's origin, reading what the widget shows,
and looking at screenshots."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from devtools.local_stack import LOCAL_PORTAL_TOKEN_SECRET
from usage_meter.logic.auth import issue_portal_token

WIDGET = Path(__file__).resolve().parents[2] / "web" / "usage-meter.js"
EVENTS = ("usage-meter:load", "usage-meter:error", "usage-meter:token-expired")


# Every page keeps each widget event in window.events (the page fixture adds it to each page).
RECORD_EVENTS = f"""window.events = [];
for (const type of {list(EVENTS)!r})
  document.addEventListener(type, (e) => window.events.push({{type, detail: e.detail}}));"""


def host_page(page: Any, origin: str, body: str, *, lang: str = "en-US") -> None:
    """The portal's own page at origin (served by devtools.portal, with the widget's script),
    its body replaced by `body` and its language set to lang; window.events starts empty.
    (A page Playwright fulfilled itself would not do: Chromium does not count it as loopback,
    and its Local Network Access check then refuses the API on 127.0.0.1.)"""
    page.goto(f"{origin}/")
    page.wait_for_function("() => customElements.get('usage-meter')")
    page.evaluate(
        """([body, lang]) => {
          document.documentElement.lang = lang;
          document.body.innerHTML = body;  // the demo's own widget goes: disconnected, it stops
          (window.events ||= []).length = 0;
        }""",
        [body, lang],
    )


def expired_token(customer: str) -> str:
    """Signed like the local stack's tokens, expired an hour ago."""
    secret = LOCAL_PORTAL_TOKEN_SECRET.encode()
    token, _ = issue_portal_token(customer, 60, secret=secret, now=int(time.time()) - 3600)
    return token


def widget_tag(api: str, **attributes: str) -> str:
    attrs = "".join(
        f' {name.replace("_", "-")}="{html.escape(v)}"' for name, v in attributes.items()
    )
    return f'<usage-meter api="{html.escape(api)}"{attrs}></usage-meter>'


def wait_state(page: Any, state: str, selector: str = "usage-meter") -> None:
    page.wait_for_selector(f"{selector}[state={state}]", state="attached")


def events(page: Any, type_: str) -> list[dict[str, Any]]:
    return [e for e in page.evaluate("window.events") if e["type"] == type_]


READ = """(el) => {
  const root = el.shadowRoot;
  const time = (sel, within = root) => {
    const t = within.querySelector(sel);
    return t ? {datetime: t.getAttribute("datetime"), text: t.textContent} : null;
  };
  const meters = [...root.querySelectorAll("[part~=meter]")].map((li) => {
    const bar = li.querySelector("[role=progressbar]");
    const width = (part) => li.querySelector(`[part~=${part}]`).getBoundingClientRect().width;
    const used = li.querySelector("[part~=used]");
    const figures = {};
    for (const dd of li.querySelectorAll("dd"))
      figures[dd.dataset.field] = {value: Number(dd.dataset.value), text: dd.textContent};
    return {
      meter: li.dataset.meter,
      name: li.querySelector("[part~=meter-name]").textContent,
      quantity: Number(used.dataset.quantity),
      included: Number(used.dataset.included),
      used: used.textContent,
      figures,
      aria: Object.fromEntries(["role", "aria-valuemin", "aria-valuenow", "aria-valuemax",
        "aria-valuetext", "aria-labelledby"].map((a) => [a, bar.getAttribute(a)])),
      track: bar.getBoundingClientRect().width,
      included_width: width("bar-included"),
      billable_width: width("bar-billable"),
      period: time("[part~=meter-period] time", li),
    };
  });
  return {
    state: el.getAttribute("state"),
    meters,
    period: time("[part~=period] time"),
    as_of: time("[part~=as-of] time"),
    status: root.querySelector("[part~=status]").textContent,
    error: root.querySelector("[part~=error]")?.textContent ?? null,
    busy: root.querySelector("section").getAttribute("aria-busy"),
  };
}"""


def read_widget(page: Any, selector: str = "usage-meter") -> dict[str, Any]:
    """What the widget shows, from its shadow DOM."""
    return page.eval_on_selector(selector, READ)


def number(page: Any, value: int, lang: str) -> str:
    """value as the page's Intl formats it for lang (what the widget must show)."""
    return page.evaluate("([v, l]) => new Intl.NumberFormat(l).format(v)", [value, lang])


# Pixels of a PNG, decoded by the browser itself (no imaging library needed): per pixel along
# the middle row, its class: "included" (blue), "billable" (red) or "other".
_ROW = """async ([png]) => {
  const img = new Image();
  img.src = "data:image/png;base64," + png;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.width; canvas.height = img.height;
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0);
  const row = g.getImageData(0, Math.floor(img.height / 2), img.width, 1).data;
  const counts = {width: img.width, included: 0, billable: 0, other: 0};
  for (let i = 0; i < row.length; i += 4) {
    const [r, gr, b] = [row[i], row[i + 1], row[i + 2]];
    counts[b > r + 80 && b > gr ? "included" : r > b + 80 && r > gr + 60 ? "billable" : "other"]++;
  }
  return counts;
}"""

_PAGE = """async ([png]) => {
  const img = new Image();
  img.src = "data:image/png;base64," + png;
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.width; canvas.height = img.height;
  const g = canvas.getContext("2d");
  g.drawImage(img, 0, 0);
  const data = g.getImageData(0, 0, img.width, img.height).data;
  const colors = new Map();
  for (let i = 0; i < data.length; i += 16) {
    const key = (data[i] << 16) | (data[i + 1] << 8) | data[i + 2];
    colors.set(key, (colors.get(key) || 0) + 1);
  }
  const samples = data.length / 16;
  const top = Math.max(...colors.values());
  return {width: img.width, height: img.height, colors: colors.size,
          not_background: 1 - top / samples};
}"""


def bar_pixels(page: Any, png: bytes) -> dict[str, int]:
    return page.evaluate(_ROW, [base64.b64encode(png).decode()])


def picture(page: Any, png: bytes) -> dict[str, float]:
    """Colours in a screenshot: how many, and the share of pixels not the commonest one."""
    return page.evaluate(_PAGE, [base64.b64encode(png).decode()])
