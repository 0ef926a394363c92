"""Cards: the only part of aquin_nb that renders (DESIGN.md decision 5).

Each result kind has one card spec (JSON types only, `card_spec`, registered by
the kind its result class declares) that renders four ways: a static,
self-contained HTML card (tables and inline SVG, no CDN) that
``_repr_mimebundle_`` returns and that works in nbviewer, GitHub and exports;
the live anywidget (`widget.CardWidget`); the web mirror's panel; and CLI text
(`render_text`). Rendering only reads the result's data, so a result read back
from JSON renders without torch.

Example:
    >>> import aquin_nb
    >>> align = aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=32, progress=False)
    >>> render_html(align).count('data-kind="sae_align"')
    1
    >>> print(render_text(card_spec(align, rows=1)).splitlines()[0])
    [sae align] tiny-gpt2 ↔ tiny-gpt2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._html import render_spec_html, report_page
from ._specs import SPECS, card_spec
from ._text import render_text

__all__ = ["SPECS", "card_spec", "render_html", "render_text", "write_report"]


def render_html(result: Any, kind: str | None = None) -> str:
    """The static HTML card of ``result``."""
    return render_spec_html(card_spec(result, kind))


def write_report(path: str | Path, results: list[Any], title: str = "aquin_nb report") -> Path:
    """One self-contained HTML page with the card of every result, written atomically."""
    from .._io import atomic_write_text

    cards = [render_spec_html(card_spec(result)) for result in results]
    return atomic_write_text(path, report_page(title, cards))
