"""The live card's trait state, without a browser."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from aquin_nb.cards import card_spec
from aquin_nb.cards.widget import CardWidget
from aquin_nb.diff import FEATURE_COLUMNS, SaeDiff

from .test_cards import small_diff

WORDS = ["Oven · bake · preheat", "list · keys · return", "river · bank", None]


def dashboard(feature: int, label: str | None = "oven · bake", tokens=None, url=None) -> dict:
    """One feature's dashboard in the shape `Dashboards.feature` returns."""
    tokens = tokens or [" Pre", "heat", " the", " oven"]
    acts = [round(0.1 * (i + 1), 4) for i in range(len(tokens))]

    def side(density: float) -> dict:
        return {
            "contexts": [
                {"tokens": list(tokens), "acts": acts, "peak": len(tokens) - 1, "max": acts[-1]}
            ],
            "density": density,
            "histogram": [3, 1, 0, 2],
            "promoted": [{"token": token, "cosine": 0.3} for token in tokens[:2]],
            "suppressed": [{"token": token, "cosine": -0.2} for token in tokens[2:]],
        }

    return {
        "feature": feature,
        "label": label,
        "url": url,
        "density": 0.125,
        "histogram_edges": [0.001, 0.01, 0.1, 1.0, 10.0],
        "base": side(0.125),
        "checkpoint": side(0.25),
    }


def many_features_diff(n: int = 100, boards: dict[int, dict] | None = None) -> SaeDiff:
    """``n`` features sorted by |Δ| as `sae_diff` sorts them: 60% rise by 0.5-1.0 and
    the rest fall by 0.01-0.4, so every falling feature ranks below the top 25 (as in
    issue 12, where the first negative Δ was 66th)."""
    rising = int(n * 0.6)
    rng = np.random.default_rng(12)
    delta = np.concatenate(
        [rng.uniform(0.5, 1.0, rising), -rng.uniform(0.01, 0.4, n - rising)]
    ).round(6)
    features = rng.permutation(n)
    base = rng.uniform(0.0, 1.0, n)
    frame = pd.DataFrame(
        {
            "feature": features,
            "label": pd.Series([WORDS[f % len(WORDS)] for f in features], dtype=object),
            "base": base,
            "checkpoint": base + delta,
            "delta": delta,
            "abs_delta": np.abs(delta),
            "shift": np.where(np.arange(n) % 7 == 0, delta, 0.0),
            "shift_q": np.full(n, np.nan),
            "base_freq": np.full(n, 0.2),
            "checkpoint_freq": np.full(n, 0.3),
            "p_value": np.full(n, 0.001),
            "q_value": np.full(n, 0.01),
            "changed": np.ones(n, dtype=bool),
        },
        columns=list(FEATURE_COLUMNS),
    )
    frame = frame.sort_values("abs_delta", ascending=False, kind="stable").reset_index(drop=True)
    summary = {
        **small_diff().summary,
        "n_features": n,
        "n_changed": n,
        "mean_abs_delta": float(np.abs(delta).mean()),
        "max_abs_delta": float(np.abs(delta).max()),
    }
    return SaeDiff(summary=summary, features=frame, dashboards=boards or {})


def ask(widget: CardWidget, **query) -> list[dict]:
    widget.query = {**widget.query, **query}
    return widget.page_rows


def test_widget_spec_is_json_and_carries_prerendered_charts():
    widget = small_diff().widget()
    assert isinstance(widget, CardWidget)
    spec = widget.spec
    json.dumps(spec)  # JSON-only traits
    bars = next(section for section in spec["sections"] if section["type"] == "bars")
    assert bars["svg"].startswith("<svg") and bars["svg"].count("<rect") == 3
    assert widget.selected == -1 and widget.token_view == {} and widget.dashboard == {}
    assert "export default" in widget._esm


def test_the_widget_pages_every_feature_not_only_the_cards_top_rows():
    diff = many_features_diff(100)
    widget = diff.widget()
    table = widget.spec["sections"][widget.paged_section]
    assert table["select"] == "feature" and len(table["rows"]) == 25  # the spec's top rows
    assert widget.row_count == widget.total == 100 and widget.page == 0
    assert [row["feature"] for row in widget.page_rows] == diff.features["feature"][:25].tolist()
    assert list(widget.page_rows[0]) == table["columns"]
    json.dumps(widget.page_rows, allow_nan=False)

    rows = ask(widget, page=1, page_size=10)
    assert widget.page == 1 and [row["feature"] for row in rows] == (
        diff.features["feature"][10:20].tolist()
    )
    ask(widget, page=99)  # past the end: the last page
    assert widget.page == 9 and len(widget.page_rows) == 10
    ask(widget, page_size=30, page=3)
    assert widget.page == 3 and len(widget.page_rows) == 10  # 100 = 3 × 30 + 10


def test_sorting_by_delta_ascending_puts_the_most_negative_first():
    diff = many_features_diff(100)
    widget = diff.widget()
    deltas = diff.features["delta"]
    most_negative = int(diff.features["feature"][deltas.idxmin()])
    assert diff.features.index[diff.features["feature"] == most_negative][0] >= 25
    assert all(row["delta"] > 0 for row in widget.page_rows)  # the default page: all rising

    rows = ask(widget, sort="delta", descending=False)
    assert rows[0]["feature"] == most_negative and rows[0]["delta"] == deltas.min()
    assert [row["delta"] for row in rows] == sorted(deltas)[:25]
    rows = ask(widget, page=1)
    assert [row["delta"] for row in rows] == sorted(deltas)[25:50]
    rows = ask(widget, sort="delta", descending=True, page=0)
    assert rows[0]["delta"] == deltas.max()
    rows = ask(widget, sort="label", descending=False)
    labels = [row["label"] for row in rows]
    assert labels[0] == "list · keys · return" and labels == sorted(labels, key=str.casefold)
    ask(widget, page=3)
    assert widget.page_rows[-1]["label"] is None  # features without a label sort last


def test_filtering_matches_the_label_text_or_the_feature_id():
    diff = many_features_diff(100)
    widget = diff.widget()
    ovens = diff.features[diff.features["label"] == WORDS[0]]
    rows = ask(widget, filter="  OVEN ", page_size=100)
    assert widget.total == len(ovens) == 25 and widget.row_count == 100
    assert {row["feature"] for row in rows} == set(ovens["feature"])

    feature = int(diff.features["feature"][70])
    rows = ask(widget, filter=str(feature))
    assert widget.total == 1 and rows[0]["feature"] == feature
    ask(widget, filter=f"#{feature}")
    assert widget.total == 1
    ask(widget, filter="bank", sort="delta", descending=False, page_size=5)
    banks = diff.features[diff.features["label"] == WORDS[2]].sort_values("delta")
    assert widget.total == len(banks)
    assert [row["feature"] for row in widget.page_rows] == banks["feature"][:5].tolist()
    ask(widget, filter="no such feature")
    assert widget.total == 0 and widget.page_rows == [] and widget.page == 0


def test_a_malformed_query_falls_back_to_defaults():
    widget = many_features_diff(40).widget()
    widget.query = {"sort": "<img src=x>", "page": "two", "page_size": -3, "filter": 7}
    assert widget.total == 40 and widget.page == 0 and len(widget.page_rows) == 1
    widget.query = {"page_size": 10**9}
    assert len(widget.page_rows) == 40


def test_other_kinds_page_their_own_rows():
    # A widget made from a spec alone pages the spec's rows.
    spec = card_spec(small_diff())
    widget = CardWidget(spec=spec)
    assert widget.row_count == 4 and [row["feature"] for row in widget.page_rows] == [7, 3, 11, 0]
    # small_diff has no labels or shifts: NaN is not JSON, so they arrive as None.
    assert widget.page_rows[0]["label"] is None and widget.page_rows[0]["shift"] is None
    json.dumps(widget.page_rows, allow_nan=False)
    ask(widget, sort="delta", descending=False)
    assert widget.page_rows[0]["feature"] == 3
    # A card without tables pages nothing.
    empty = CardWidget(spec={**spec, "sections": spec["sections"][:1]})
    assert empty.paged_section == -1 and empty.page_rows == [] and empty.row_count == 0


def test_an_align_widget_reaches_every_pair():
    import aquin_nb

    align = aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=32, progress=False)
    widget = align.widget()
    assert widget.spec["sections"][widget.paged_section]["title"] == "Strongest pairs"
    assert widget.row_count == len(align.pairs) == 32 > 12
    rows = ask(widget, sort="cosine", descending=False)
    assert rows[0]["cosine"] == pytest.approx(float(align.pairs["cosine"].min()))
    ask(widget, filter="31")  # no labels: any column's text
    assert widget.total >= 1 and all("31" in json.dumps(row) for row in widget.page_rows)


def test_selecting_a_feature_without_models_reports_why():
    widget = small_diff().widget()
    widget.selected = 7
    assert widget.token_view == {} and widget.dashboard == {}
    assert "token views need the models" in widget.error


def test_the_selected_features_answer_carries_its_dashboard():
    diff = many_features_diff(100, boards={})
    deepest = int(diff.features["feature"][diff.features["delta"].idxmin()])
    board = dashboard(deepest, label="river · bank", url="https://neuronpedia.org/x/1")
    diff = many_features_diff(100, boards={deepest: board})
    widget = diff.widget()
    assert widget.opens == {str(deepest): ["dashboard"]}
    widget.selected = deepest
    assert widget.dashboard == board and widget.error == ""
    assert widget.token_view == {}  # no models, but the dashboard stands on its own
    json.dumps(widget.dashboard)

    other = int(diff.features["feature"][0])
    widget.selected = other
    assert widget.dashboard == {} and "token views need the models" in widget.error
    widget.selected = -1
    assert widget.dashboard == {} and widget.token_view == {} and widget.error == ""


def test_a_carried_token_view_answers_without_models_and_is_marked():
    view = {"feature": 3, "prompts": [{"tokens": ["a"], "base": [0.0], "checkpoint": [1.0]}]}
    diff = small_diff()
    diff = SaeDiff(
        summary=diff.summary,
        features=diff.features,
        views={3: view},
        dashboards={7: dashboard(7), 3: dashboard(3)},
    )
    widget = diff.widget()
    assert widget.opens == {"7": ["dashboard"], "3": ["dashboard", "view"]}
    widget.selected = 3
    assert widget.token_view == view and widget.dashboard["feature"] == 3 and widget.error == ""


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
    assert widget.opens[str(planted_feature)] == ["view"]  # computed once, then marked
    widget.selected = -1
    assert widget.token_view == {}
    widget.selected = planted_feature
    assert widget.token_view == view


def test_the_widget_leaves_the_static_card_and_the_results_repr_as_its_fallback():
    diff = small_diff()
    bundle = diff.widget()._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data
    assert 'data-kind="sae_diff"' in data["text/html"] and "aquin-fallback" in data["text/html"]
    assert data["text/plain"] == repr(diff) and "CardWidget object" not in data["text/plain"]
