"""web/usage-meter.js as shipped: within its size budget, and dependent on nothing."""

import gzip
import re

from tests.browser.widget import WIDGET

BUDGET = 6 * 1024  # bytes, gzipped (README: "Usage widget")


def test_the_widget_fits_its_size_budget():
    size = len(gzip.compress(WIDGET.read_bytes(), compresslevel=9))
    assert size <= BUDGET, f"usage-meter.js is {size} bytes gzipped; the budget is {BUDGET}"


def test_the_widget_imports_and_loads_nothing():
    code = re.sub(r"^\s*//.*$", "", WIDGET.read_text(), flags=re.M)  # comments aside
    assert not re.search(r"^\s*import\b|\bimport\s*\(|\brequire\s*\(", code, re.M)
    assert not re.search(r"https?://", code)  # it calls only the api and token-url it is given
    assert 'customElements.define("usage-meter"' in code
