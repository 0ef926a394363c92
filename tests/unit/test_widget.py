"""The live card's trait state, without a browser."""

from __future__ import annotations

import pytest

from aquin_nb.cards.widget import CardWidget

from .test_cards import small_diff


def test_widget_spec_is_json_and_carries_prerendered_charts():
    import json

    widget = small_diff().widget()
    assert isinstance(widget, CardWidget)
    spec = widget.spec
    json.dumps(spec)  # JSON-only traits
    bars = next(section for section in spec["sections"] if section["type"] == "bars")
    assert bars["svg"].startswith("<svg") and bars["svg"].count("<rect") == 3
    assert widget.selected == -1 and widget.token_view == {}
    assert "export default" in widget._esm


def test_selecting_a_feature_without_models_reports_why():
    widget = small_diff().widget()
    widget.selected = 7
    assert widget.token_view == {}
    assert "token views need the models" in widget.error


@pytest.mark.usefixtures("planted_pt")
def test_selecting_the_planted_feature_fills_its_token_view(planted_pt, planted_feature):
    from aquin_nb import sae_diff

    diff = sae_diff("tiny-gpt2", planted_pt, progress=False)
    widget = diff.widget()
    widget.selected = planted_feature
    view = widget.token_view
    assert view["feature"] == planted_feature and widget.error == ""
    first = view["prompts"][0]
    assert len(first["tokens"]) == len(first["base"]) == len(first["checkpoint"])
    assert max(first["checkpoint"]) > max(first["base"])  # the plant makes it fire
    widget.selected = -1
    assert widget.token_view == {}


def test_the_widget_leaves_the_static_card_and_the_results_repr_as_its_fallback():
    diff = small_diff()
    bundle = diff.widget()._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data
    assert 'data-kind="sae_diff"' in data["text/html"] and "aquin-fallback" in data["text/html"]
    assert data["text/plain"] == repr(diff) and "CardWidget object" not in data["text/plain"]
