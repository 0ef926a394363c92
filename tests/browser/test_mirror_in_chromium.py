"""The web mirror's session page in a real browser (Debian's chromium via Playwright).

A verb runs with sync while the page is open: its row must appear live, go from
Invoked to Completed, and expand to the same card the notebook shows.
Screenshots go to tests/browser/artifacts/.
"""

from __future__ import annotations

import uuid

import pytest

import aquin_nb
from aquin_nb import _events, mirror
from tests.mirror_server import ThreadedServer

from .conftest import ARTIFACTS


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv(mirror.ENV_SPOOL, str(tmp_path / "spool"))
    with ThreadedServer(tmp_path / "mirror.sqlite") as running:
        yield running
    mirror.disconnect(timeout=0.5)


def test_a_synced_verb_appears_live_and_expands_to_its_card(
    browser, server, planted_pt, planted_feature
):
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.goto(f"{server.url}/s/browser-run?token={server.token}")
    assert page.url == f"{server.url}/s/browser-run"  # the token moved into a cookie
    page.wait_for_selector('.aquin-live[data-state="live"]')
    assert page.locator(".aquin-sync-row").count() == 0

    session = aquin_nb.connect("browser-run", url=server.url, token=server.token)
    diff = aquin_nb.sae_diff("tiny-gpt2", planted_pt, name="planted", progress=False)
    assert session.flush(10)

    row = page.locator(".aquin-sync-row").first
    page.wait_for_selector('.aquin-sync-row[data-status="completed"]', timeout=15_000)
    assert row.get_attribute("data-history") == "invoked completed"  # seen live, in order
    assert row.locator(".aquin-status").inner_text() == "Completed"
    assert row.locator(".aquin-tool").inner_text() == "sae_diff"
    assert row.locator(".aquin-name").inner_text() == "planted"

    row.locator("summary").click()
    cells = row.locator('.aquin-card[data-kind="sae_diff"] table.aquin-table tbody tr')
    cells.first.wait_for(timeout=10_000)
    assert cells.count() == 25
    first_feature = cells.first.locator("td").first.inner_text()
    assert first_feature == str(planted_feature) == str(int(diff.top(1)["feature"].iloc[0]))
    assert row.locator("svg.aquin-bars rect").count() > 0
    assert "checkpoint" in row.locator(".aquin-arguments").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "mirror_session.png"), full_page=True)

    # A second verb: its row lands on top, and its panel is the align card.
    aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=64, progress=False)
    assert session.flush(10)
    page.wait_for_selector('.aquin-sync-row[data-tool="sae_align"][data-status="completed"]')
    align_row = page.locator(".aquin-sync-row").first
    assert align_row.get_attribute("data-tool") == "sae_align"
    align_row.locator("summary").click()
    heatmap = align_row.locator('.aquin-card[data-kind="sae_align"] svg.aquin-heatmap rect')
    heatmap.first.wait_for(timeout=10_000)
    assert heatmap.count() == 24 * 24

    page.goto(f"{server.url}/")
    assert page.locator('a[href="/s/browser-run"]').inner_text() == "browser-run"


def test_hostile_text_in_events_is_shown_as_text_never_run(browser, server):
    hostile = '<img src=x onerror="window.__pwned=1">'
    begin = _events.start_event(uuid.uuid4().hex, uuid.uuid4().hex, "sae_diff", {"name": hostile})
    card = {
        "kind": "sae_diff",
        "title": hostile,
        "chips": [{"label": hostile, "value": hostile}],
        "warning": hostile,
        "sections": [
            {
                "type": "bars",
                "title": hostile,
                "bars": [{"feature": hostile, "delta": 1.0}],
                "svg": f"<svg>{hostile}</svg>",
            },
            {
                "type": "table",
                "title": hostile,
                "columns": ["feature", hostile],
                "rows": [{"feature": hostile, hostile: hostile}],
                "select": "feature",
            },
        ],
    }
    done = _events.result_event(
        uuid.uuid4().hex,
        begin["invocation_id"],
        "sae_diff",
        hostile,
        duration_s=0.5,
        error=RuntimeError(hostile),
        card=card,
    )
    with server.client() as client:
        response = client.post("/api/sessions/hostile/events", json={"events": [begin, done]})
        assert response.status_code == 200
    page = browser.new_page()
    page.goto(f"{server.url}/s/hostile?token={server.token}")
    row = page.locator(".aquin-sync-row").first
    row.wait_for()
    assert row.locator(".aquin-name").inner_text() == hostile
    row.locator("summary").click()
    page.locator(".aquin-card").first.wait_for()
    page.wait_for_timeout(300)  # give an injected onerror every chance to fire
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".aquin-card img").count() == 0
    assert hostile in row.locator(".aquin-error").inner_text()
    assert hostile in row.locator(".aquin-card h3").inner_text()
    assert hostile in row.locator(".aquin-card table").inner_text()
