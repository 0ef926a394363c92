"""The trajectory card in chromium: the static page and the live card (widgets/card.js)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from .conftest import ARTIFACTS

pytestmark = pytest.mark.browser

STEPS = (100, 200, 300, 400)
FIT = {"verdict": "pass", "checkpoint": {"explained_variance": 0.9, "l0": 3.0}, "warning": None}


@pytest.fixture(scope="module")
def trajectory():
    """Three features that grow with the step (feature 7 from step 200 on), built without models."""
    from aquin_nb._track import add_step, empty_trajectory

    summary = {
        "model": "tiny-gpt2",
        "name": "run <b>",
        "hook": "blocks.2.hook_resid_pre",
        "n_features": 16,
        "n_prompts": 32,
        "backend": "local",
        "labels": {"3": "def · return", "7": "<script>"},
        "tracking": {"top_k": 3, "max_features": 8},
    }
    metrics = pd.DataFrame(
        {"step": [0, 100, 200, 300, 400], "metric": "loss", "value": [5.0, 4.0, 3.5, 3.2, 3.0]}
    )
    grown = empty_trajectory(summary, metrics.astype({"metric": object}))
    for step in STEPS:
        delta = np.zeros(16)
        delta[3], delta[5] = step / 100, -step / 200
        delta[7] = step / 150 if step >= 200 else 0.0
        frame = pd.DataFrame(
            {
                "feature": np.arange(16),
                "delta": delta,
                "abs_delta": np.abs(delta),
                "q_value": np.where(delta != 0, 1e-4, 1.0),
                "changed": delta != 0,
            }
        ).sort_values(["abs_delta", "feature"], ascending=[False, True])
        grown = add_step(
            grown,
            step=step,
            name=f"step_{step}",
            checkpoint=f"step_{step}.pt",
            frame=frame,
            fit=FIT,
        )
    return grown


def test_the_static_card_draws_lines_heatmap_and_tables(browser, trajectory, tmp_path):
    from aquin_nb.cards import write_report

    path = write_report(tmp_path / "trajectory.html", [trajectory])
    page = browser.new_page(viewport={"width": 1000, "height": 1600})
    page.goto(path.as_uri())
    card = page.locator('.aquin-card[data-kind="sae_trajectory"]')
    top = card.locator("svg.aquin-line").first
    assert top.locator("polyline").count() == 3 and top.locator("circle").count() == 0
    assert "feature 7 · <script>" in top.text_content()  # the label drawn as text
    assert card.locator("svg.aquin-heatmap rect").count() == 3 * len(STEPS)
    assert card.locator("svg.aquin-heatmap").bounding_box()["width"] > 100
    assert card.locator("svg.aquin-line").count() == 4  # features, n_changed, fit, loss
    assert card.locator("table.aquin-table").count() == 2
    assert page.evaluate("() => document.querySelectorAll('script').length") == 0
    ARTIFACTS.mkdir(exist_ok=True)
    card.screenshot(path=str(ARTIFACTS / "card_sae_trajectory.png"))
    page.close()


CARD_PAGE = """<!doctype html><html><head><style>{css}</style></head><body><div id="host"></div>
<script type="module">
{module}
const spec = {spec};
const state = {{ spec, selected: -1, token_view: {{}}, error: "" }};
const model = {{ get: (k) => state[k], set: (k, v) => {{ state[k] = v; }}, on: () => {{}},
  save_changes: () => {{}} }};
card.render({{ model, el: document.getElementById("host") }});
window.rendered = true;
</script></body></html>"""


def test_the_live_card_draws_the_same_sections(browser, trajectory):
    from aquin_nb.cards import card_spec
    from aquin_nb.cards._html import live_spec, widget_source

    spec = live_spec(card_spec(trajectory))
    module = widget_source("card.js").replace("export default", "const card =")
    page = browser.new_page(viewport={"width": 1000, "height": 1600})
    page.set_content(
        CARD_PAGE.format(css=widget_source("card.css"), module=module, spec=json.dumps(spec))
    )
    page.wait_for_function("() => window.rendered === true")
    card = page.locator('.aquin-card[data-kind="sae_trajectory"]')
    assert card.locator("svg.aquin-line").count() == 4
    assert card.locator("svg.aquin-heatmap rect").count() == 3 * len(STEPS)
    assert card.locator("table.aquin-table tbody tr").count() == 4 + 3  # per step, features
    page.close()
