"""The live card: an anywidget with JSON-only traits, its ESM and CSS from ``widgets/``.

Sorting and filtering happen in the browser; selecting a feature row sends its
index to Python, which computes that feature's token view lazily.

Example:
    >>> import aquin_nb
    >>> widget = aquin_nb.sae_diff("tiny-gpt2", checkpoint, progress=False).widget()
    >>> widget.selected = 101  # what a click on feature 101 sends from the browser
    >>> widget.token_view["feature"], len(widget.token_view["prompts"])
    (101, 4)
"""

from __future__ import annotations

from typing import Any

import anywidget
import traitlets

from ._html import live_spec, render_spec_html, widget_source
from ._specs import card_spec


class CardWidget(anywidget.AnyWidget):  # type: ignore[misc]
    """One result's card. Traits: ``spec`` (the card spec), ``selected`` (a feature
    index, -1 for none) and ``token_view`` (that feature's token view, or {})."""

    _esm = widget_source("card.js")
    _css = widget_source("card.css")
    spec = traitlets.Dict().tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    token_view = traitlets.Dict().tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, result: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._result = result

    @classmethod
    def for_result(cls, result: Any) -> CardWidget:
        return cls(result=result, spec=live_spec(card_spec(result)))

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """The live view, with the static card and the result's repr as its fallback.

        A saved notebook opened without the widget state (untrusted, nbviewer,
        GitHub) shows the static card instead of ``<CardWidget object at 0x…>``.
        """
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            data["text/html"] = render_spec_html(self.spec)
            if self._result is not None:
                data["text/plain"] = repr(self._result)
        return bundle

    @traitlets.observe("selected")
    def _on_selected(self, change: dict[str, Any]) -> None:
        feature = int(change["new"])
        if feature < 0:
            self.token_view = {}
            return
        source = getattr(self._result, "diff", self._result)  # a Simulation shows its diff
        views = getattr(source, "token_views", None)
        if views is None:
            self.error = "this result has no token views"
            return
        try:
            self.token_view = views([feature])[feature]
            self.error = ""
        except Exception as problem:  # shown in the card instead of lost in the kernel log
            self.token_view = {}
            self.error = str(problem)
