"""Feature dashboards in a real browser (Debian's chromium via Playwright).

The static card opens a feature's dashboard on a click without any script; the
live card (widgets/card.js) opens it in a row right below the row or bar that
was clicked, pages through every feature with Python answering, and works with
the spec alone as the web mirror runs it. Corpus text is hostile here: tokens and
labels holding ``<script>`` and ``<img onerror>`` must show as the text they are
and never run, in the static card and in card.js without a CSP around it.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from aquin_nb.cards import card_spec, render_html
from aquin_nb.cards._html import live_spec, widget_source
from aquin_nb.cards.widget import CardWidget
from aquin_nb.diff import SaeDiff
from tests.unit.test_cards import small_diff
from tests.unit.test_widget import WORDS, dashboard, many_features_diff

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

SCRIPT = "<script>window.__x=1</script>"
IMAGE = '<img src=x onerror="window.__x=1">'
ATTRIBUTE = 'q" onmouseover="window.__x=1" x="'
HOSTILE_TOKENS = [SCRIPT, IMAGE, ATTRIBUTE, " oven"]

# Nothing ran, no handler attribute exists, no element came from the text.
_INJECTED = """() => ({
  ran: typeof window.__x,
  handlers: [...document.querySelectorAll("*")].flatMap((node) => [...node.attributes])
    .filter((a) => a.name.startsWith("on")).map((a) => a.name),
  elements: document.querySelectorAll(".aquin-card script, .aquin-card img").length,
})"""
CLEAN = {"ran": "undefined", "handlers": [], "elements": 0}

# card.js with an anywidget-shaped model. With `answers`, every change the card saves
# goes to the Python CardWidget (window.kernel) and its answer comes back as traits,
# as in a notebook; without, the model holds the spec alone, as the web mirror's does.
_RENDER = """async ([source, state, answers]) => {
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const card = (await import(url)).default;
  const listeners = {};
  const fire = (key) => (listeners[`change:${key}`] || []).forEach((callback) => callback());
  let pending = [];
  window.__sets = [];
  window.__model = {
    get: (key) => state[key],
    set: (key, value) => {
      state[key] = value;
      window.__sets.push([key, value]);
      pending.push(key);
      fire(key);
    },
    on: (event, callback) => { (listeners[event] = listeners[event] || []).push(callback); },
    save_changes: () => {
      const keys = pending;
      pending = [];
      for (const key of keys) {
        if (answers) {
          window.kernel(key, state[key]).then((answer) => {
            for (const [name, value] of Object.entries(answer)) { state[name] = value; fire(name); }
          });
        } else if (key === "selected") {
          state.token_view = (state.spec.token_views || {})[String(state.selected)] || {};
          fire("token_view");
        }
      }
    },
  };
  const host = document.createElement("div");
  host.id = "host";
  document.body.appendChild(host);
  card.render({ model: window.__model, el: host });
}"""
ANSWERS = ("page_rows", "total", "row_count", "page", "token_view", "dashboard", "opens", "error")
STATE = ("spec", "paged_section", "query", "selected", *ANSWERS)


def hostile_diff() -> SaeDiff:
    """The 4-feature diff of test_cards, feature 7 with a dashboard of hostile corpus text
    (its label too) and feature 3 with a hostile token view."""
    diff = small_diff(name=SCRIPT)
    board = dashboard(7, label=SCRIPT + IMAGE, tokens=HOSTILE_TOKENS, url="javascript:window.__x=1")
    view = {
        "feature": 3,
        "prompts": [
            {"tokens": HOSTILE_TOKENS, "base": [0.1, 0.2, 0.3, 0.4], "checkpoint": [0.4] * 4}
        ],
    }
    return SaeDiff(
        summary=diff.summary, features=diff.features, views={3: view}, dashboards={7: board}
    )


def safe_static_diff() -> SaeDiff:
    """hostile_diff with a real Neuronpedia address: the static card links whatever url
    a dashboard carries (see the xfail below)."""
    diff = hostile_diff()
    board = {**diff.dashboards[7], "url": "https://neuronpedia.org/gpt2-small/2-res-jb/7"}
    return SaeDiff(
        summary=diff.summary, features=diff.features, views=diff.views, dashboards={7: board}
    )


def open_static(browser, diff: SaeDiff):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.set_default_timeout(10_000)
    page.set_content(f"<!doctype html><html><body>{render_html(diff)}</body></html>")
    return page, page.locator('.aquin-card[data-kind="sae_diff"]')


def test_static_card_clicking_a_feature_shows_its_dashboard(browser):
    page, card = open_static(browser, safe_static_diff())
    board = card.locator('[data-dashboard="7"]')
    assert board.count() == 1 and not board.is_visible()
    pick = card.locator('tr[data-feature="7"] label.aquin-pick')
    assert pick.inner_text() == "7"
    pick.click()
    expect(board).to_be_visible()
    assert board.locator(".aquin-dash-side").count() == 2  # base beside checkpoint
    assert board.locator(".aquin-tokens span").count() == 2 * len(HOSTILE_TOKENS)
    link = board.locator("a")
    assert link.text_content() == "Neuronpedia" and link.get_attribute("href").startswith(
        "https://"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    card.screenshot(path=str(ARTIFACTS / "static_dashboard.png"))
    page.close()


def test_static_card_shows_hostile_corpus_text_as_text(browser):
    page, card = open_static(browser, safe_static_diff())
    card.locator("label.aquin-pick").first.click()
    board = card.locator('[data-dashboard="7"]')
    expect(board).to_be_visible()
    assert board.locator("h4").first.text_content().startswith(f"Feature 7: {SCRIPT}{IMAGE}")
    spans = board.locator(".aquin-dash-side").first.locator(".aquin-tokens span")
    assert [spans.nth(i).inner_text() for i in range(4)] == HOSTILE_TOKENS
    text = board.inner_text()
    assert f"promotes {SCRIPT} · {IMAGE}" in text and f"suppresses {ATTRIBUTE} · oven" in text
    assert SCRIPT in card.locator("h3").inner_text()
    for target in (*[spans.nth(i) for i in range(4)], board.locator("h4").first):
        target.hover()
        target.click()
    page.wait_for_timeout(200)  # give an injected handler every chance to fire
    assert page.evaluate(_INJECTED) == CLEAN
    page.close()


def test_static_card_does_not_link_a_javascript_url(browser):
    page, card = open_static(browser, hostile_diff())
    card.locator("label.aquin-pick").first.click()
    assert card.locator('[data-dashboard="7"] a').count() == 0
    page.close()


def render_card_js(page, state: dict, answers: bool) -> None:
    # The stylesheet as anywidget adds it (row markers are CSS, never part of the text).
    style = widget_source("card.css")
    page.set_content(
        f"<!doctype html><html><head><style>{style}</style></head><body></body></html>"
    )
    page.evaluate(_RENDER, [widget_source("card.js"), state, answers])


def test_card_js_opens_the_dashboard_below_the_clicked_row_or_bar_from_the_spec_alone(browser):
    """As the web mirror runs card.js: the model answers nothing, the spec carries it all."""
    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(10_000)
    spec = live_spec(card_spec(hostile_diff()))
    render_card_js(page, {"spec": spec, "selected": -1, "token_view": {}, "error": ""}, False)
    card = page.locator("#host .aquin-card")
    table = card.locator("table.aquin-table")
    note = card.locator(".aquin-note").first
    assert note.inner_text().startswith("Click a row or a bar")
    assert "1 feature has a dashboard (◆), 1 a token view (▸)" in note.inner_text()
    assert table.locator('tr[data-feature="7"]').get_attribute("data-opens") == "dashboard"
    assert table.locator('tr[data-feature="3"]').get_attribute("data-opens") == "view"
    assert table.locator('tr[data-feature="11"]').get_attribute("data-opens") is None
    assert table.locator("tbody tr").first.locator("td").first.inner_text() == "7"  # no marker text

    table.locator('tr[data-feature="7"]').click()
    assert page.evaluate("window.__sets") == [["selected", 7]]
    detail = table.locator('tr[data-feature="7"] + tr.aquin-detail')
    expect(detail).to_be_visible()
    board = detail.locator('[data-dashboard="7"]')
    expect(board).to_be_visible()
    assert board.locator("h4").first.text_content() == f"Feature 7: {SCRIPT}{IMAGE}"
    assert board.locator("a").count() == 0  # a javascript: url stays unlinked
    spans = board.locator('[data-side="base"] .aquin-tokens span')
    assert [spans.nth(i).inner_text() for i in range(4)] == HOSTILE_TOKENS
    assert spans.nth(3).get_attribute("class") == "aquin-peak"
    assert f"promotes {SCRIPT} · {IMAGE}" in board.inner_text()
    assert table.locator("tr.aquin-detail").count() == 1

    # A bar opens its feature in the bars' own section; the row's detail closes.
    bars = spec["sections"][0]
    assert bars["type"] == "bars"
    index = [bar["feature"] for bar in bars["bars"]].index(3)
    card.locator("svg.aquin-bars rect").nth(index).click()
    assert page.evaluate("window.__sets")[-1] == ["selected", 3]
    panel = card.locator(".aquin-section").first.locator(".aquin-token-panel")
    expect(panel).to_be_visible()
    assert panel.locator("h4").text_content() == "Feature 3: where it fires most"
    assert [panel.locator(".aquin-tokens span").nth(i).inner_text() for i in range(4)] == (
        HOSTILE_TOKENS
    )
    assert table.locator("tr.aquin-detail").count() == 0

    # A second click on the open row closes it.
    table.locator('tr[data-feature="7"]').click()
    expect(detail).to_be_visible()
    table.locator('tr[data-feature="7"]').click()
    assert page.evaluate("window.__sets")[-1] == ["selected", -1]
    assert table.locator("tr.aquin-detail").count() == 0

    for selector in ("th", "tbody tr", "svg.aquin-bars rect", "h4", ".aquin-tokens span"):
        for i in range(card.locator(selector).count()):
            card.locator(selector).nth(i).hover()
            card.locator(selector).nth(i).click()
    page.wait_for_timeout(200)
    assert page.evaluate(_INJECTED) == CLEAN
    page.close()


def test_card_js_pages_every_feature_with_python_answering(browser):
    """As the notebook runs card.js: the kernel pages, sorts and filters all 100 features,
    and answers a click on the most negative one (ranked 61st by |Δ|) with its dashboard."""
    boards = {}
    deepest = int(many_features_diff().features.sort_values("delta")["feature"].iloc[0])
    boards[deepest] = dashboard(deepest, label=SCRIPT + IMAGE, tokens=HOSTILE_TOKENS)
    diff = many_features_diff(100, boards=boards)
    widget = CardWidget.for_result(diff)

    page = browser.new_page(viewport={"width": 1100, "height": 1000})
    page.set_default_timeout(10_000)

    def kernel(key: str, value):
        setattr(widget, key, value)
        return {name: getattr(widget, name) for name in ANSWERS}

    page.expose_function("kernel", kernel)
    render_card_js(page, {name: getattr(widget, name) for name in STATE}, True)
    card = page.locator("#host .aquin-card")
    table = card.locator("table.aquin-table")
    rows = table.locator("tbody tr[data-feature]")
    status = card.locator(".aquin-rowcount")
    expect(status).to_have_text("100 rows · showing 1–25 · page 1 of 4")
    assert rows.count() == 25 and table.locator(f'tr[data-feature="{deepest}"]').count() == 0
    assert card.locator("button.aquin-pager").first.is_disabled()

    delta = table.locator('th[data-column="delta"]')
    delta.click()
    expect(delta).to_have_text("delta ▾")
    delta.click()
    expect(delta).to_have_text("delta ▴")
    expect(rows.first).to_have_attribute("data-feature", str(deepest))
    ascending = diff.features.sort_values("delta", kind="stable")
    assert rows.first.get_attribute("data-opens") == "dashboard"
    assert widget.query["sort"] == "delta" and widget.query["descending"] is False

    rows.first.click()
    detail = table.locator(f'tr[data-feature="{deepest}"] + tr.aquin-detail')
    board = detail.locator(f'[data-dashboard="{deepest}"]')
    expect(board).to_be_visible()
    assert widget.selected == deepest and widget.dashboard["feature"] == deepest
    assert board.locator("h4").first.text_content() == f"Feature {deepest}: {SCRIPT}{IMAGE}"
    spans = board.locator('[data-side="checkpoint"] .aquin-tokens span')
    assert [spans.nth(i).inner_text() for i in range(4)] == HOSTILE_TOKENS
    assert detail.locator(".aquin-warn").count() == 0  # no models: the dashboard stands alone
    ARTIFACTS.mkdir(exist_ok=True)
    card.screenshot(path=str(ARTIFACTS / "widget_dashboard_below_row.png"))

    card.locator("button.aquin-pager", has_text="next").click()
    expect(status).to_have_text("100 rows · showing 26–50 · page 2 of 4")
    expect(rows.first).to_have_attribute("data-feature", str(ascending["feature"].iloc[25]))
    assert table.locator("tr.aquin-detail").count() == 0  # its row is on page 1 now

    card.locator("input.aquin-filter").fill("RIVER")
    rivers = diff.features[diff.features["label"] == WORDS[2]].sort_values("delta", kind="stable")
    expect(status).to_have_text(f"{len(rivers)} of 100 rows match · showing 1–25 · page 1 of 1")
    assert [rows.nth(i).get_attribute("data-feature") for i in range(3)] == [
        str(f) for f in rivers["feature"][:3]
    ]
    card.locator("input.aquin-filter").fill(str(deepest))
    expect(status).to_have_text("1 of 100 rows match · showing 1–1 · page 1 of 1")

    # Its bar opens the same dashboard in the bars' section.
    bars = widget.spec["sections"][0]["bars"]
    card.locator("svg.aquin-bars rect").nth([b["feature"] for b in bars].index(deepest)).click()
    in_bars = card.locator(".aquin-section").first.locator(f'[data-dashboard="{deepest}"]')
    expect(in_bars).to_be_visible()

    for selector in ("th", "tbody tr", "svg.aquin-bars rect", ".aquin-tokens span"):
        for i in range(card.locator(selector).count()):
            card.locator(selector).nth(i).hover()
    page.wait_for_timeout(200)
    assert page.evaluate(_INJECTED) == CLEAN
    page.close()
