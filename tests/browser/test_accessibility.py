"""Accessibility of <usage-meter> beyond its ARIA (test_widget.py): contrast of every text and of
the bars, in each state, with the default theme and with the demo portal's; and axe-core's rules
when axe-core is installed (node_modules/axe-core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser.widget import expired_token, host_page, wait_state, widget_tag

pytestmark = pytest.mark.slow
AXE = Path(__file__).resolve().parents[2] / "node_modules" / "axe-core" / "axe.min.js"

# WCAG 2.2 contrast ratios: text (1.4.3, AA) and the parts of a graphic needed to understand it
# (1.4.11): each bar's fills against its track, the track's edge and focus rings against the card.
CONTRAST = """(el) => {
  const root = el.shadowRoot;
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const ratio = (a, b) => {
    const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p);
    return (x + 0.05) / (y + 0.05);
  };
  const background = (node) => {
    for (let n = node; n; n = n.parentElement || n.getRootNode().host) {
      const c = rgb(getComputedStyle(n).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const texts = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    if (!node.textContent.trim()) continue;
    const style = getComputedStyle(node.parentElement);
    const large = parseFloat(style.fontSize) >= 24 ||
      (parseFloat(style.fontSize) >= 18.66 && Number(style.fontWeight) >= 700);
    texts.push({text: node.textContent.trim().slice(0, 40), needed: large ? 3 : 4.5,
      ratio: ratio(rgb(style.color).slice(0, 3), background(node.parentElement))});
  }
  const graphics = [];
  const card = background(root.querySelector("section"));
  for (const bar of root.querySelectorAll("[role=progressbar]")) {
    const track = rgb(getComputedStyle(bar).backgroundColor);
    const edge = rgb(getComputedStyle(bar).boxShadow);
    graphics.push({what: "track edge", needed: 3, ratio: ratio(edge.slice(0, 3), card)});
    for (const part of ["bar-included", "bar-billable"]) {
      const fill = rgb(getComputedStyle(bar.querySelector(`[part~=${part}]`)).backgroundColor);
      graphics.push({what: part, needed: 3, ratio: ratio(fill.slice(0, 3), track)});
    }
  }
  const button = root.querySelector("button");
  button.focus();
  const ring = rgb(getComputedStyle(button).outlineColor);
  graphics.push({what: "focus ring", needed: 3, ratio: ratio(ring, card)});
  return [...texts, ...graphics].filter((c) => c.ratio < c.needed);
}"""


@pytest.mark.parametrize("theme", ["default", "demo portal"])
@pytest.mark.parametrize("state", ["ready", "expired", "error"])
def test_text_and_bars_have_enough_contrast(
    page, portals, browser_stack, usage, mint, theme, state
):
    token = mint("cus_BrowserOver") if state != "expired" else expired_token("cus_BrowserOver")
    api = browser_stack.api_url if state != "error" else "http://127.0.0.1:9"
    if theme == "default":
        host_page(page, portals.allowed.origin, widget_tag(api, token=token))
    else:  # the demo page's own widget, themed by its stylesheet
        page.goto(f"{portals.allowed.origin}/")
        page.eval_on_selector(
            "usage-meter",
            "(el, [api, token]) => { el.removeAttribute('token-url');"
            " el.setAttribute('api', api); el.setAttribute('token', token); }",
            [api, token],
        )
    wait_state(page, state)
    assert page.eval_on_selector("usage-meter", CONTRAST) == []


@pytest.mark.skipif(not AXE.exists(), reason="axe-core is not installed (node_modules/axe-core)")
@pytest.mark.parametrize("state", ["ready", "expired", "error"])
def test_axe_finds_no_violations(browser, portals, browser_stack, usage, mint, state):
    context = browser.new_context(bypass_csp=True)  # axe is injected into the demo page
    page = context.new_page()
    try:
        page.goto(f"{portals.allowed.origin}/")
        token = mint("cus_BrowserOver") if state != "expired" else expired_token("cus_BrowserOver")
        api = browser_stack.api_url if state != "error" else "http://127.0.0.1:9"
        page.eval_on_selector(
            "usage-meter",
            "(el, [api, token]) => { el.removeAttribute('token-url');"
            " el.setAttribute('api', api); el.setAttribute('token', token); }",
            [api, token],
        )
        wait_state(page, state)
        page.add_script_tag(path=str(AXE))
        result = page.evaluate("axe.run(document.querySelector('usage-meter'))")
        violations = [(v["id"], v["impact"], len(v["nodes"])) for v in result["violations"]]
        assert violations == []
        assert result["passes"]  # it did look
    finally:
        context.close()
