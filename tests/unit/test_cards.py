"""The static card: numbers equal the result's, self-contained, escaped."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from aquin_nb.cards import card_spec, render_html, write_report
from aquin_nb.diff import FEATURE_COLUMNS, SaeDiff


def small_diff(name: str = "my-ft") -> SaeDiff:
    delta = np.array([0.5, -0.4, 0.1, 0.0])
    base = np.array([0.1, 0.6, 0.2, 0.3])
    frame = pd.DataFrame(
        {
            "feature": [7, 3, 11, 0],
            "base": base,
            "checkpoint": base + delta,
            "delta": delta,
            "abs_delta": np.abs(delta),
            "base_freq": [0.1, 0.5, 0.2, 0.3],
            "checkpoint_freq": [0.4, 0.1, 0.2, 0.3],
            "p_value": [0.001, 0.002, 0.5, 1.0],
            "q_value": [0.004, 0.004, 0.66, 1.0],
            "changed": [True, True, False, False],
        },
        columns=list(FEATURE_COLUMNS),
    )
    summary = {
        "n_features": 4,
        "n_changed": 2,
        "mean_abs_delta": 0.25,
        "max_abs_delta": 0.5,
        "n_prompts": 5,
        "n_tokens": 40,
        "layer": 2,
        "hook": "blocks.2.hook_resid_pre",
        "model": "tiny-gpt2",
        "checkpoint": "x.pt",
        "name": name,
        "fit": {
            "base": {"explained_variance": 0.9, "l0": 30.0},
            "checkpoint": {"explained_variance": 0.7, "l0": 25.0},
            "warning": "the SAE explains 20% less variance",
        },
        "criteria": {},
        "tool_version": "0",
    }
    return SaeDiff(summary=summary, features=frame)


def test_spec_numbers_equal_the_result():
    diff = small_diff()
    spec = card_spec(diff, "sae_diff")
    chips = {chip["label"]: chip["value"] for chip in spec["chips"]}
    assert chips["changed"] == "2 / 4" and chips["max |Δ|"] == "0.5"
    assert chips["prompts"] == 5 and chips["tokens"] == 40
    rows = spec["sections"][1]["rows"]
    assert [row["feature"] for row in rows] == [7, 3, 11, 0]
    assert rows[1]["delta"] == -0.4 and rows[0]["checkpoint"] == 0.6
    assert [bar["feature"] for bar in spec["sections"][0]["bars"]] == [7, 11, 3]
    assert spec["warning"].startswith("the SAE explains")


def test_html_is_self_contained_and_has_the_rows_and_bars():
    page = render_html(small_diff(), "sae_diff")
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?://", page)
    assert "<script" not in page
    assert page.count("<tr data-feature=") == 4
    assert page.count("<rect") == 3


def test_text_is_escaped():
    page = render_html(small_diff(name="<script>alert(1)</script>"), "sae_diff")
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_mimebundle_carries_plain_text_and_the_card(tmp_path):
    bundle = small_diff()._repr_mimebundle_()
    assert "2/4 features changed" in bundle["text/plain"]
    assert 'data-kind="sae_diff"' in bundle["text/html"]
    report = write_report(tmp_path / "report.html", [small_diff()])
    assert report.read_text().startswith("<!doctype html>")
