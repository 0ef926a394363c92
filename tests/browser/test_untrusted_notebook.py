"""A card in an untrusted notebook: JupyterLab's own sanitizer, then Debian's chromium.

JupyterLab sanitizes the HTML of untrusted outputs (no <style>, no SVG, no
empty attributes). The static card must still read: the card hides itself and
its text stands in, as scikit-learn's repr does. The sanitizer is the real one
(`@jupyterlab/apputils`, installed from npm by `make browser-deps`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from aquin_nb.cards import render_html
from aquin_nb.cards._html import FALLBACK_NOTE

from ..unit.test_cards import small_diff

pytestmark = pytest.mark.browser

INSTALL = Path(__file__).parent / ".jupyterlab"
SANITIZE = """
import { Sanitizer } from '@jupyterlab/apputils/lib/sanitizer.js';
import { readFileSync } from 'node:fs';
process.stdout.write(new Sanitizer().sanitize(readFileSync(0, 'utf8')));
"""


@pytest.fixture(scope="module")
def jupyterlab_sanitize():
    node = shutil.which("node")
    if node is None or not (INSTALL / "node_modules" / "@jupyterlab" / "apputils").is_dir():
        message = "JupyterLab's sanitizer is not installed (make browser-deps installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    script = INSTALL / "sanitize.mjs"
    script.write_text(SANITIZE)

    def sanitize(html: str) -> str:
        done = subprocess.run(
            [node, str(script)], input=html, capture_output=True, text=True, check=True
        )
        return done.stdout

    return sanitize


def a_diff_with_views():
    diff = small_diff(name="<img src=x onerror=alert(1)>")
    views = {
        7: {
            "feature": 7,
            "prompts": [
                {"prompt": 0, "tokens": ["Pre", "heat"], "base": [0, 1], "checkpoint": [2, 3]}
            ],
        }
    }
    return diff.__class__(summary=diff.summary, features=diff.features, views=views)


def test_sanitized_card_reads_as_text_and_hides_the_rest(browser, jupyterlab_sanitize):
    html = render_html(a_diff_with_views())
    clean = jupyterlab_sanitize(html)
    assert "<style" not in clean and "<svg" not in clean  # what the sanitizer removes
    page = browser.new_page()
    page.set_content(f"<html><body>{clean}</body></html>")
    fallback = page.locator("pre.aquin-fallback")
    assert fallback.is_visible()
    text = fallback.inner_text()
    assert "nChanged=2" in text and FALLBACK_NOTE in text
    assert "<img src=x onerror=alert(1)>" in text  # shown as text, not run
    assert not page.locator(".aquin-card").is_visible()
    assert page.locator("input:visible").count() == 0  # no bare radio buttons
    assert not page.locator(".aquin-tv").first.is_visible()  # no token view shown at once
    page.close()


def test_trusted_card_shows_the_card_and_hides_the_text(browser):
    page = browser.new_page()
    page.set_content(f"<html><body>{render_html(a_diff_with_views())}</body></html>")
    assert page.locator(".aquin-card").is_visible()
    assert not page.locator("pre.aquin-fallback").is_visible()
    page.locator("label.aquin-pick").first.click()
    assert page.locator('.aquin-tv[data-token-view="7"]').is_visible()
    page.close()
