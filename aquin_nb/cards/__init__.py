"""Cards: the only part of aquin_nb that renders (DESIGN.md decision 5).

Each result has one card spec (JSON types only, `card_spec`) that renders as a
static, self-contained HTML card (tables and inline SVG, no CDN), which
``_repr_mimebundle_`` returns and which works in nbviewer, GitHub and exports.

Example:
    >>> from aquin_nb.cards import render_html
    >>> html = render_html(diff, "sae_diff")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._html import render_spec_html, report_page
from ._specs import card_spec

__all__ = ["card_spec", "render_html", "write_report"]


def render_html(result: Any, kind: str) -> str:
    """The static HTML card of ``result``."""
    return render_spec_html(card_spec(result, kind))


def write_report(path: str | Path, results: list[Any], title: str = "aquin_nb report") -> Path:
    """One self-contained HTML page with the card of every result, written atomically."""
    from .._io import atomic_write_text

    specs = [card_spec(result, _kind_of(result)) for result in results]
    return atomic_write_text(path, report_page(title, [render_spec_html(s) for s in specs]))


def _kind_of(result: Any) -> str:
    kinds = {
        "SaeDiff": "sae_diff",
        "SaeAlign": "sae_align",
        "TrainedSae": "sae_train",
        "Capture": "capture",
    }
    name = type(result).__name__
    if name not in kinds:
        raise TypeError(f"no card for {name}")
    return kinds[name]
