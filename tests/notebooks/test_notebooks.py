"""Every shipped notebook runs top to bottom offline, and its cards carry the results."""

from __future__ import annotations

import pytest

NAMES = ["01_sae_diff", "02_temp_train_and_align", "03_from_your_own_finetune"]


def html_outputs(notebook) -> list[str]:
    return [
        output["data"]["text/html"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "text/html" in output.get("data", {})
    ]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_offline_and_renders_cards(run_notebook, name):
    notebook = run_notebook(name)
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
    cards = [html for html in html_outputs(notebook) if "aquin-card" in html]
    assert cards, "no card was rendered"
    assert all("http://" not in html.split("xmlns")[0] for html in cards)


def test_switching_to_a_real_model_is_explained(run_notebook):
    for name in NAMES:
        notebook = run_notebook(name)
        text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
        assert "gpt2-small" in text and "pythia-70m-deduped" in text


def test_notebook_03_names_each_steps_checkpoint(run_notebook):
    notebook = run_notebook("03_from_your_own_finetune")
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream"
    )
    assert "step_30.pt" in printed and "step_60.pt" in printed
