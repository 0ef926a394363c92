"""Plotly figures of the card's charts: the same numbers as the card spec."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import aquin_nb
from aquin_nb import AquinError
from aquin_nb.cards import card_spec
from aquin_nb.cards.figures import FALLING, RISING, figure, figure_names
from aquin_nb.results import TrainedSae

from .test_cards import small_diff
from .test_widget import many_features_diff


def section(result, kind: str) -> dict:
    return next(s for s in card_spec(result)["sections"] if s["type"] == kind)


@pytest.fixture(scope="module")
def align():
    return aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=32, progress=False)


def test_the_bars_of_a_diff_are_its_top_rising_and_falling_features():
    diff = small_diff()
    bars = section(diff, "bars")["bars"]
    fig = diff.figure("bars")
    (trace,) = fig.data
    assert trace.type == "bar" and trace.orientation == "h"
    assert list(trace.x) == [bar["delta"] for bar in bars] == [0.5, 0.1, -0.4]
    assert list(trace.customdata) == [bar["feature"] for bar in bars] == [7, 11, 3]
    assert list(trace.y) == ["feature 7", "feature 11", "feature 3"]
    assert list(trace.marker.color) == [RISING, RISING, FALLING]
    assert fig.layout.yaxis.autorange == "reversed"  # the largest rise on top, as on the card
    assert fig.layout.title.text == "Top ±Δ features"
    # The default is the card's first chart; the title names it too.
    assert figure(diff).data[0].x == trace.x
    assert diff.figure("Top ±Δ features").data[0].x == trace.x


def test_bars_carry_the_features_labels_and_stay_one_bar_per_feature():
    diff = many_features_diff(100)
    bars = section(diff, "bars")["bars"]
    assert len(bars) == 20 and sum(bar["delta"] < 0 for bar in bars) == 10
    (trace,) = diff.figure("bars").data
    labels = diff.features.set_index("feature")["label"]
    for name, bar in zip(trace.y, bars, strict=True):
        label = labels[bar["feature"]]
        assert name == (f"{label} (#{bar['feature']})" if label else f"feature {bar['feature']}")
    assert len(set(trace.y)) == len(bars)  # shared labels must not merge bars
    assert [c == RISING for c in trace.marker.color] == [bar["delta"] > 0 for bar in bars]


def test_the_align_histogram_and_heatmap_equal_the_spec(align):
    assert figure_names(align) == ["histogram", "heatmap"]
    spec_histogram = section(align, "histogram")
    fig = align.figure("histogram")
    (trace,) = fig.data
    edges, counts = spec_histogram["edges"], spec_histogram["counts"]
    assert list(trace.y) == counts and sum(trace.y) == sum(counts)
    bins = list(zip(edges[:-1], edges[1:], strict=True))
    assert list(trace.x) == pytest.approx([(low + high) / 2 for low, high in bins])
    assert list(trace.width) == pytest.approx([high - low for low, high in bins])
    (marker,) = fig.layout.shapes
    assert marker.x0 == marker.x1 == spec_histogram["marker"]
    assert spec_histogram["marker"] == align.summary["baseline_mean_cosine"]

    spec_heatmap = section(align, "heatmap")
    (cells,) = align.figure("heatmap").data
    assert cells.type == "heatmap"
    assert [list(row) for row in cells.z] == spec_heatmap["cosine"]
    assert list(cells.x) == [f"b {value}" for value in spec_heatmap["b"]]
    assert list(cells.y) == [f"a {value}" for value in spec_heatmap["a"]]
    assert align.figure("Strongest pairs, in matched order").data[0].type == "heatmap"


def trained_sae() -> TrainedSae:
    metrics = {"explained_variance": 0.9, "l0": 12.0, "dead_fraction": 0.05}
    summary = {
        "path": "sae.pt",
        "saelens_dir": "sae",
        "model": "tiny-gpt2",
        "checkpoint": "x.pt",
        "layer": 2,
        "hook": "blocks.2.hook_resid_pre",
        "init_from": "public",
        "architecture": "standard",
        "d_sae": 64,
        "steps": 4,
        "tokens": 512,
        "interrupted": False,
        "metrics": {"trained": metrics, "public": None, "n_held_out": 128},
        "name": "tmp",
        "tool_version": "0",
    }
    curve = pd.DataFrame(
        {"step": [0, 1, 2, 3], "loss": [4.0, 2.5, 2.0, 1.75], "mse_loss": [3.0, 2.0, 1.5, 1.25]}
    )
    features = pd.DataFrame({"feature": [], "decoder_cosine": [], "rotation": []})
    return TrainedSae(summary=summary, loss_curve=curve, features=features)


def test_a_training_curve_is_a_scatter_line():
    trained = trained_sae()
    line = section(trained, "line")
    (trace,) = trained.figure("line").data
    assert trace.type == "scatter" and trace.mode == "lines"
    assert list(trace.x) == line["x"] == [0, 1, 2, 3]
    assert list(trace.y) == line["y"] == [4.0, 2.5, 2.0, 1.75]


def test_a_wrong_name_lists_the_charts_there_are(align):
    with pytest.raises(AquinError, match=r"no chart named 'scatter'.*'histogram', 'heatmap'"):
        align.figure("scatter")
    with pytest.raises(AquinError, match=r"'bars'"):
        small_diff().figure("table")  # a table is not a chart


def test_a_card_without_charts_says_so():
    diff = small_diff()
    spec = card_spec(diff)
    from aquin_nb.cards import figures

    with pytest.raises(AquinError, match="draws no charts"):
        figures._choose({**spec, "sections": spec["sections"][1:]}, None)


def test_plotly_is_imported_only_when_a_figure_is_drawn():
    code = (
        "import sys, aquin_nb.cards.figures, aquin_nb.cards.widget; print('plotly' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"
