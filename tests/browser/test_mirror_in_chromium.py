"""The web mirror's session page in a real browser (Debian's chromium via Playwright).

A verb runs with sync while the page is open: its row must appear live, go from
Invoked to Completed, and expand to the same card the notebook shows. Hostile
text in events (in text, in attributes: column names, ``select`` values, feature
ids, token views) must show literally and never run, on the mirror page and in
card.js alone, without the page's Content-Security-Policy to fall back on.
Screenshots go to tests/browser/artifacts/.
"""

from __future__ import annotations

import json
import uuid

import pytest

import aquin_nb
from aquin_nb import _events, mirror
from aquin_nb.cards._html import widget_source
from tests.mirror_server import ThreadedServer

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

# Each one sets window.__x if it ever becomes markup rather than text.
ATTRIBUTE = 'q" onmouseover="window.__x=1" style="position:fixed;width:100vw;height:100vh" x="'
SINGLE_QUOTED = "q' onmouseover='window.__x=2' style='position:fixed;width:100vw;height:100vh' x='"
SCRIPT = "<script>window.__x=3</script>"
IMAGE = '<img src=x onerror="window.__x=4">'
HOSTILE = (ATTRIBUTE, SINGLE_QUOTED, SCRIPT, IMAGE)

# What the page must look like after every hover and click: nothing ran, no event
# handler attribute and no injected style exist, no element came from the text.
_INJECTED = """() => {
  const attributes = [...document.querySelectorAll("*")].flatMap((node) => [...node.attributes]);
  return {
    ran: typeof window.__x,
    handlers: attributes.filter((a) => a.name.startsWith("on")).map((a) => a.name),
    styles: attributes.filter((a) => a.name === "style" && a.value.includes("100vw")).length,
    elements: document.querySelectorAll(".aquin-card script, .aquin-card img").length,
  };
}"""
CLEAN = {"ran": "undefined", "handlers": [], "styles": 0, "elements": 0}


def hostile_card() -> dict:
    """A card whose every string a client controls is hostile, attributes included."""
    view = {
        "feature": IMAGE,
        "prompts": [
            {
                "tokens": list(HOSTILE),
                "base": [0.1, 0.2, 0.3, 0.4],
                "checkpoint": [0.4, 0.3, 0.2, 0.1],
            }
        ],
    }
    return {
        "kind": "sae_diff",
        "title": SCRIPT + IMAGE,
        "chips": [
            {"label": IMAGE, "value": ATTRIBUTE},
            {"label": SCRIPT, "value": SINGLE_QUOTED, "warn": True},
        ],
        "warning": SCRIPT,
        "token_views": {"7": view},
        "sections": [
            {
                "type": "table",
                "title": IMAGE,
                "columns": ["feature", ATTRIBUTE, SCRIPT, "delta"],
                "rows": [
                    {"feature": 7, ATTRIBUTE: IMAGE, SCRIPT: SCRIPT, "delta": 0.5},
                    {
                        "feature": ATTRIBUTE,
                        ATTRIBUTE: ATTRIBUTE,
                        SCRIPT: SINGLE_QUOTED,
                        "delta": -0.25,
                    },
                    {"feature": SINGLE_QUOTED, ATTRIBUTE: SCRIPT, SCRIPT: IMAGE, "delta": 0.75},
                ],
                "select": "feature",
            },
            {
                "type": "table",
                "title": SCRIPT,
                "columns": [SINGLE_QUOTED],
                "rows": [{SINGLE_QUOTED: ATTRIBUTE}, {SINGLE_QUOTED: SCRIPT}],
                "select": SINGLE_QUOTED,  # the select key itself is hostile
            },
            {
                "type": "bars",
                "title": SCRIPT,
                "bars": [{"feature": ATTRIBUTE, "delta": 1.0}, {"feature": IMAGE, "delta": -1.0}],
            },
        ],
    }


def poke(page, scope) -> None:
    """Hover and click every header, row and cell under ``scope``, then sweep the page."""
    for selector in ("th", "tbody tr", ".aquin-chip", "h3", "h4", "svg text"):
        for index in range(scope.locator(selector).count()):
            target = scope.locator(selector).nth(index)
            target.hover()
            if selector in ("th", "tbody tr"):
                target.click()
    for x in range(0, 1000, 100):
        for y in range(0, 1000, 100):
            page.mouse.move(x, y)
    page.wait_for_timeout(200)  # give an injected handler every chance to fire


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


def test_hostile_attributes_in_events_stay_text_on_the_mirror_page(browser, server):
    begin = _events.start_event(uuid.uuid4().hex, uuid.uuid4().hex, "sae_diff", {"name": ATTRIBUTE})
    done = _events.result_event(
        uuid.uuid4().hex,
        begin["invocation_id"],
        "sae_diff",
        ATTRIBUTE,
        duration_s=0.5,
        error=RuntimeError(SCRIPT + ATTRIBUTE),
        card=hostile_card(),
    )
    assert "token_views" in done["card"]  # small enough to be sent whole
    with server.client() as client:
        response = client.post("/api/sessions/hostile/events", json={"events": [begin, done]})
        assert response.status_code == 200
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    page.set_default_timeout(10_000)  # a regression fails in seconds, not in 30 s per step
    opened = page.goto(f"{server.url}/s/hostile?token={server.token}")
    assert "script-src 'self'" in opened.headers["content-security-policy"]
    row = page.locator(".aquin-sync-row").first
    row.wait_for()
    assert row.locator(".aquin-name").inner_text() == ATTRIBUTE
    row.locator("summary").click()
    card = row.locator(".aquin-card")
    card.wait_for()

    headers = card.locator("table").first.locator("th")
    assert [headers.nth(i).get_attribute("data-column") for i in range(4)] == [
        "feature",
        ATTRIBUTE,
        SCRIPT,
        "delta",
    ]
    features = card.locator("table").first.locator("tbody tr")
    assert {features.nth(i).get_attribute("data-feature") for i in range(3)} == {
        "7",
        ATTRIBUTE,
        SINGLE_QUOTED,
    }
    second = card.locator("table").nth(1)
    assert second.locator("th").get_attribute("data-column") == SINGLE_QUOTED
    assert second.locator("tbody tr").first.get_attribute("data-feature") == ATTRIBUTE

    poke(page, card)
    assert page.evaluate(_INJECTED) == CLEAN

    # Every hostile string is on the page as the text it is.
    table_text = card.locator("table").first.inner_text()
    for text in HOSTILE:
        assert text in table_text
    assert card.locator("h3").inner_text().endswith(SCRIPT + IMAGE)
    chips = card.locator(".aquin-chips").inner_text()
    assert f"{IMAGE} {ATTRIBUTE}" in chips and f"{SCRIPT} {SINGLE_QUOTED}" in chips
    assert card.locator(".aquin-section h4").first.text_content() == IMAGE
    assert SCRIPT + ATTRIBUTE in row.locator(".aquin-error").inner_text()
    assert ATTRIBUTE in card.locator("svg.aquin-bars").text_content()

    # Row 7 carries a token view of hostile tokens: selecting it shows them as text.
    card.locator('tbody tr[data-feature="7"]').click()
    panel = card.locator(".aquin-token-panel")
    assert panel.locator("h4").text_content() == f"Feature {IMAGE}: where it fires most"
    spans = panel.locator(".aquin-tokens span")
    assert [spans.nth(i).inner_text() for i in range(4)] == list(HOSTILE)
    assert spans.first.get_attribute("title") == "0.100"
    poke(page, panel)
    assert page.evaluate(_INJECTED) == CLEAN
    page.close()


_RENDER = """async ([source, spec]) => {
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const card = (await import(url)).default;
  const state = { spec, selected: -1, token_view: {}, error: "" };
  const listeners = {};
  window.__sets = [];
  window.__saved = 0;
  window.__model = {
    get: (key) => state[key],
    set: (key, value) => {
      state[key] = value;
      window.__sets.push([key, value]);
      (listeners[`change:${key}`] || []).forEach((callback) => callback());
    },
    on: (event, callback) => { (listeners[event] = listeners[event] || []).push(callback); },
    save_changes: () => { window.__saved += 1; },
  };
  const host = document.createElement("div");
  host.id = "host";
  document.body.appendChild(host);
  card.render({ model: window.__model, el: host });
}"""


def test_card_js_keeps_hostile_attributes_text_without_a_csp(browser):
    """card.js as the notebook widget runs it (an anywidget model, no CSP around it):
    escaping must hold on its own, and sorting, filtering and selection still work."""
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    page.set_default_timeout(10_000)  # a regression fails in seconds, not in 30 s per step
    page.set_content("<!doctype html><html><body></body></html>")
    page.evaluate(_RENDER, [widget_source("card.js"), hostile_card()])
    card = page.locator("#host .aquin-card")
    assert card.get_attribute("data-kind") == "sae_diff"
    assert card.locator("h3").inner_text() == f"sae diff{SCRIPT}{IMAGE}"
    # No server drew the bars here, so the section is its title alone.
    assert card.locator("svg").count() == 0

    table = card.locator("table").first
    header = table.locator(f"th[data-column={json.dumps('delta')}]")

    def column(name: str) -> list[str]:
        index = ["feature", ATTRIBUTE, SCRIPT, "delta"].index(name)
        cells = table.locator("tbody tr")
        return [cells.nth(i).locator("td").nth(index).inner_text() for i in range(cells.count())]

    assert column("feature") == ["7", ATTRIBUTE, SINGLE_QUOTED]  # as given
    header.click()
    assert column("delta") == ["0.7500", "0.5000", "-0.2500"] and header.inner_text() == "delta ▾"
    header.click()
    assert column("delta") == ["-0.2500", "0.5000", "0.7500"] and header.inner_text() == "delta ▴"
    assert table.locator("td.aquin-neg").count() == 1 and table.locator("td.aquin-pos").count() == 2
    table.locator("th").nth(1).click()  # sorting by the hostile column works too
    assert table.locator("th").nth(1).inner_text() == f"{ATTRIBUTE} ▾"

    filter_box = card.locator("input.aquin-filter").first
    filter_box.fill("0.25")
    assert column("feature") == [ATTRIBUTE]
    filter_box.fill("")
    assert table.locator("tbody tr").count() == 3

    table.locator('tbody tr[data-feature="7"]').click()
    assert page.evaluate("window.__sets") == [["selected", 7]]
    assert page.evaluate("window.__saved") == 1
    assert table.locator("tr.aquin-selected").get_attribute("data-feature") == "7"

    poke(page, card)
    assert page.evaluate(_INJECTED) == CLEAN

    # The kernel answers a selection with a token view, or an error: both are text.
    view = hostile_card()["token_views"]["7"]
    page.evaluate("(view) => window.__model.set('token_view', view)", view)
    spans = card.locator(".aquin-token-panel .aquin-tokens span")
    assert spans.count() == 2 * len(HOSTILE)
    assert [spans.nth(i).inner_text() for i in range(4)] == list(HOSTILE)
    assert spans.nth(3).get_attribute("title") == "0.400"
    assert spans.first.get_attribute("style") == "background: rgba(214, 69, 80, 0.25);"
    page.evaluate("(error) => window.__model.set('error', error)", SCRIPT + ATTRIBUTE)
    assert card.locator(".aquin-token-panel").inner_text() == SCRIPT + ATTRIBUTE
    poke(page, card)
    assert page.evaluate(_INJECTED) == CLEAN
    page.close()
