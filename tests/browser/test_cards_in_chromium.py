"""Cards in a real browser: Debian's chromium driven by Playwright (executable_path).

A notebook is executed, exported to HTML with nbconvert, and opened from disk
with the network off. Screenshots go to tests/browser/artifacts/ (git-ignored).
"""

from __future__ import annotations

import pytest

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def exported_notebook(run_notebook):
    from nbconvert import HTMLExporter

    notebook = run_notebook("02_temp_train_and_align")
    body, _ = HTMLExporter(template_name="classic").from_notebook_node(notebook)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "02_temp_train_and_align.html"
    path.write_text(body, encoding="utf-8")
    return path


def test_exported_notebook_renders_tables_bars_heatmap_and_token_views(browser, exported_notebook):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(exported_notebook.as_uri())
    diff_card = page.locator('.aquin-card[data-kind="sae_diff"]').first
    align_card = page.locator('.aquin-card[data-kind="sae_align"]').first
    assert diff_card.locator("table.aquin-table tbody tr").count() == 25
    assert diff_card.locator("svg.aquin-bars rect").count() >= 10
    assert diff_card.locator("svg.aquin-bars").first.bounding_box()["width"] > 100
    assert align_card.locator("svg.aquin-heatmap rect").count() == 24 * 24
    assert align_card.locator("svg.aquin-heatmap").bounding_box()["height"] > 100

    first_view = diff_card.locator(".aquin-tv").first
    assert not first_view.is_visible()
    feature = diff_card.locator("label.aquin-pick").first
    feature_id = feature.inner_text()
    feature.click()
    view = diff_card.locator(f'.aquin-tv[data-token-view="{feature_id}"]')
    assert view.is_visible()
    assert view.locator(".aquin-tokens span").count() > 3
    assert f"feature {feature_id}" in view.inner_text().lower()

    for kind in ("sae_diff", "sae_train", "sae_align", "capture"):
        card = page.locator(f'.aquin-card[data-kind="{kind}"]').first
        card.screenshot(path=str(ARTIFACTS / f"card_{kind}.png"))
    page.close()
