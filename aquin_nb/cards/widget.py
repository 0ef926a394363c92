"""The live card: an anywidget with JSON-only traits, its ESM and CSS from ``widgets/``.

The card's main table (for a diff: every feature, not only the spec's top rows)
is paged, sorted and filtered by Python: the front end sets ``query`` and Python
answers with ``page_rows``, ``total`` (rows matching the filter), ``row_count``
and ``page``. Selecting a feature (a row or a bar) sends its index as
``selected``; Python answers with its token view, computed lazily where the
models are at hand, and its dashboard where the result carries one. The front
end opens both right below what was clicked.

Example:
    >>> import aquin_nb
    >>> diff = aquin_nb.sae_diff("tiny-gpt2", checkpoint, progress=False)
    >>> widget = diff.widget()
    >>> widget.row_count, len(widget.page_rows)
    (1536, 25)
    >>> widget.query = {**widget.query, "sort": "delta", "descending": False}
    >>> widget.page_rows[0]["delta"] == float(diff.features["delta"].min())
    True
    >>> widget.selected = 101  # what a click on feature 101 sends from the browser
    >>> widget.token_view["feature"], len(widget.token_view["prompts"])
    (101, 4)
"""

from __future__ import annotations

import math
from typing import Any

import anywidget
import pandas as pd
import traitlets

from ._html import live_spec, render_spec_html, widget_source
from ._spec_parts import TABLE_ROWS
from ._specs import card_spec

MAX_PAGE_SIZE = 500
DEFAULT_QUERY: dict[str, Any] = {
    "sort": None,
    "descending": True,
    "filter": "",
    "page": 0,
    "page_size": TABLE_ROWS,
}


def main_table(spec: dict[str, Any]) -> int:
    """The index of the section the widget pages: the first table whose rows can be
    selected, else the first table; -1 when the card has none."""
    tables = [i for i, s in enumerate(spec.get("sections", [])) if s.get("type") == "table"]
    selectable = [i for i in tables if spec["sections"][i].get("select")]
    return (selectable or tables or [-1])[0]


def _full_frame(result: Any, kind: str, section: dict[str, Any]) -> pd.DataFrame | None:
    """Every row of the result behind the card's main table, in the card's order, or
    None where the result has no such frame (the spec's rows stand in)."""
    source = getattr(result, "diff", result)  # a Simulation pages its diff
    frames = {
        "sae_diff": lambda: source.features,
        "simulation": lambda: source.features,
        "dashboards": lambda: result.features.sort_values(
            ["density", "feature"], ascending=[False, True], kind="stable"
        ),
        "sae_align": lambda: result.pairs,
        "sae_train": lambda: result.features,
        "model_diff": lambda: result.tokens,
        # every feature that changed at some step, with the labels the summary carries
        "sae_trajectory": lambda: result.features.assign(
            label=[
                (result.summary.get("labels") or {}).get(str(feature))
                for feature in result.features["feature"]
            ]
        ),
    }
    if result is None or kind not in frames:
        return None
    try:
        frame = frames[kind]()
    except AttributeError:
        return None
    if not isinstance(frame, pd.DataFrame) or not set(section["columns"]) <= set(frame.columns):
        return None
    return frame


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None  # NaN is not JSON, and None is what a missing label means
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _as_int(value: Any, default: int, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return max(low, min(high, number))


class CardWidget(anywidget.AnyWidget):  # type: ignore[misc]
    """One result's card.

    Traits, all JSON: ``spec`` (the card spec, charts pre-rendered), ``paged_section``
    (the index of the table Python pages, -1 for none), ``query`` (set by the front
    end: ``sort`` column or None, ``descending``, ``filter`` text, ``page`` from 0,
    ``page_size``), ``page_rows``, ``total``, ``row_count`` and ``page`` (Python's
    answer), ``selected`` (a feature index, -1 for none), ``token_view`` and
    ``dashboard`` (that feature's, or {}), ``opens`` (feature → what opens on a click:
    ``"dashboard"``, ``"view"``) and ``error``.
    """

    _esm = widget_source("card.js")
    _css = widget_source("card.css")
    spec = traitlets.Dict().tag(sync=True)
    paged_section = traitlets.Int(-1).tag(sync=True)
    query = traitlets.Dict(DEFAULT_QUERY).tag(sync=True)
    page_rows: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    total = traitlets.Int(0).tag(sync=True)
    row_count = traitlets.Int(0).tag(sync=True)
    page = traitlets.Int(0).tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)
    token_view = traitlets.Dict().tag(sync=True)
    dashboard = traitlets.Dict().tag(sync=True)
    opens = traitlets.Dict().tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, result: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._result = result
        self._views: dict[int, dict[str, Any]] = {}
        self._frame: pd.DataFrame | None = None
        self.paged_section = main_table(self.spec)
        self.opens = self._opens()
        self._answer_query()

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

    # ------------------------------------------------------------------ the main table

    def _table(self) -> tuple[dict[str, Any], pd.DataFrame] | None:
        if self.paged_section < 0:
            return None
        section = self.spec["sections"][self.paged_section]
        if self._frame is None:
            frame = _full_frame(self._result, self.spec.get("kind", ""), section)
            if frame is None:
                frame = pd.DataFrame(section["rows"], columns=section["columns"])
            self._frame = frame[list(section["columns"])].reset_index(drop=True)
        return section, self._frame

    @staticmethod
    def _matching(frame: pd.DataFrame, section: dict[str, Any], text: str) -> pd.DataFrame:
        """Rows whose label contains ``text`` or whose id is ``text`` (``#`` optional);
        a table without labels matches ``text`` in any column."""
        needle = text.strip().casefold()
        if not needle:
            return frame
        key = section.get("select")
        if "label" in frame.columns:
            labels = frame["label"].map(lambda v: v.casefold() if isinstance(v, str) else "")
            mask = labels.str.contains(needle, regex=False)
            if key in frame.columns:
                mask |= frame[key].astype(str).str.casefold() == needle.removeprefix("#")
            return frame[mask]
        mask = pd.Series(False, index=frame.index)
        for column in frame.columns:
            mask |= frame[column].astype(str).str.casefold().str.contains(needle, regex=False)
        return frame[mask]

    @staticmethod
    def _sorted(frame: pd.DataFrame, column: Any, descending: bool) -> pd.DataFrame:
        if column not in frame.columns:
            return frame  # the card's own order (a diff's: |Δ| descending)

        def key(values: pd.Series) -> pd.Series:
            if values.dtype == object or pd.api.types.is_string_dtype(values):
                # labels: case-blind, missing ones last
                return values.map(lambda v: v.casefold() if isinstance(v, str) else None)
            return values

        return frame.sort_values(
            column, ascending=not descending, kind="stable", na_position="last", key=key
        )

    @traitlets.observe("query")
    def _on_query(self, change: dict[str, Any]) -> None:
        self._answer_query()

    def _answer_query(self) -> None:
        table = self._table()
        if table is None:
            return
        section, frame = table
        query = self.query if isinstance(self.query, dict) else {}
        size = _as_int(query.get("page_size"), TABLE_ROWS, 1, MAX_PAGE_SIZE)
        text = query.get("filter")
        shown = self._matching(frame, section, text if isinstance(text, str) else "")
        shown = self._sorted(shown, query.get("sort"), bool(query.get("descending", True)))
        pages = max(1, math.ceil(len(shown) / size))
        page = _as_int(query.get("page"), 0, 0, pages - 1)
        rows = [
            {column: _json_value(value) for column, value in record.items()}
            for record in shown.iloc[page * size : (page + 1) * size].to_dict("records")
        ]
        with self.hold_sync():
            self.page_rows = rows
            self.total = len(shown)
            self.row_count = len(frame)
            self.page = page

    # ------------------------------------------------------------------ a selected feature

    def _source(self) -> Any:
        return getattr(self._result, "diff", self._result)  # a Simulation shows its diff

    def _dashboard_of(self, feature: int) -> dict[str, Any]:
        source = self._source()
        if getattr(type(source), "kind", None) == "dashboards":
            return dict(source.feature(feature))  # every feature of a Dashboards has one
        boards = getattr(source, "dashboards", None) or {}
        return dict(boards.get(feature) or {})

    def _opens(self) -> dict[str, list[str]]:
        """What a click opens at once, per feature (a Dashboards result: every feature)."""
        source = self._source()
        boards = getattr(source, "dashboards", None) or {}
        views = {**(getattr(source, "views", None) or {}), **self._views}
        opened: dict[str, list[str]] = {}
        for feature in dict.fromkeys([*boards, *views]):
            opened[str(feature)] = [
                what for what, held in (("dashboard", boards), ("view", views)) if feature in held
            ]
        return opened

    def _token_view_of(self, feature: int) -> dict[str, Any]:
        """The feature's token view: carried, computed before, or computed now."""
        if feature in self._views:
            return self._views[feature]
        views = getattr(self._source(), "token_views", None)
        if views is None:
            raise LookupError("this result has no token views")
        view = dict(views([feature])[feature])
        self._views[feature] = view
        return view

    @traitlets.observe("selected")
    def _on_selected(self, change: dict[str, Any]) -> None:
        feature = int(change["new"])
        with self.hold_sync():
            if feature < 0:
                self.token_view, self.dashboard, self.error = {}, {}, ""
                return
            try:
                board = self._dashboard_of(feature)
            except Exception as problem:  # shown in the card instead of lost in the kernel log
                self.token_view, self.dashboard, self.error = {}, {}, str(problem)
                return
            try:
                view, error = self._token_view_of(feature), ""
            except Exception as problem:
                # A dashboard stands on its own: a missing token view is only an error
                # when there is nothing else to show.
                view, error = {}, ("" if board else str(problem))
            self.token_view, self.dashboard, self.error = view, board, error
            self.opens = self._opens()
