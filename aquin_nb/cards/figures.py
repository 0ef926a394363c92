"""Plotly figures of the charts a card draws, for people who restyle or zoom.

`figure(result, name)` reads the same card spec the static card, the widget
and the mirror draw from, so its numbers are the card's: ``bars`` becomes a
horizontal bar chart (one bar per feature, red where Δ > 0, blue where Δ < 0,
drawn top-down in the card's order), ``histogram`` a bar over the bin edges
(with the unrelated baseline as a dashed vertical line when the card has one),
``heatmap`` a ``go.Heatmap`` and ``line`` a ``go.Scatter``. The static card
stays self-contained SVG: plotly is imported here only, on first use.

A chart is chosen by the section's ``name`` where the spec gives one, else by
its ``type`` (the first chart of that type) or its title; no name means the
card's first chart.

Example:
    >>> import aquin_nb
    >>> align = aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=32, progress=False)
    >>> figure_names(align)
    ['histogram', 'heatmap']
    >>> fig = align.figure("heatmap")
    >>> type(fig).__name__, fig.data[0].type, len(fig.data[0].z)
    ('Figure', 'heatmap', 24)
"""

from __future__ import annotations

from typing import Any

from .._errors import AquinError
from ._specs import card_spec

CHARTS = ("bars", "histogram", "heatmap", "line")
# The static card's colours (``_html.diverging_bars_svg``), so a figure reads the same.
RISING, FALLING = "#d64550", "#3b7dd8"


def _charts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [section for section in spec["sections"] if section.get("type") in CHARTS]


def _name(section: dict[str, Any]) -> str:
    return str(section.get("name") or section["type"])


def figure_names(result: Any) -> list[str]:
    """The names `figure` accepts for ``result``'s charts, in the card's order."""
    return list(dict.fromkeys(_name(section) for section in _charts(card_spec(result))))


def _choose(spec: dict[str, Any], name: str | None) -> dict[str, Any]:
    charts = _charts(spec)
    if not charts:
        raise AquinError(f"the {spec['kind']} card draws no charts, so it has no figure")
    if name is None:
        return charts[0]
    for key in ("name", "type", "title"):
        for section in charts:
            if str(section.get(key, "")).casefold() == str(name).casefold():
                return section
    names = ", ".join(repr(n) for n in dict.fromkeys(_name(section) for section in charts))
    titles = ", ".join(repr(section["title"]) for section in charts)
    raise AquinError(
        f"the {spec['kind']} card has no chart named {name!r}: its charts are {names} "
        f"(titles {titles})"
    )


def figure(result: Any, name: str | None = None) -> Any:
    """A plotly ``Figure`` of the chart ``name`` on ``result``'s card (default: the first).

    Raises `AquinError`, listing the chart names, when the card has no such chart.
    """
    spec = card_spec(result)
    section = _choose(spec, name)
    build = {"bars": _bars, "histogram": _histogram, "heatmap": _heatmap, "line": _line}
    fig = build[section["type"]](section, result)
    fig.update_layout(title=section["title"], template="plotly_white")
    return fig


def _labels_of(result: Any) -> dict[int, str]:
    """Feature → label, for the diffs whose features carry one."""
    source = getattr(result, "diff", result)
    frame = getattr(source, "features", None)
    if frame is None or "label" not in getattr(frame, "columns", ()) or "feature" not in frame:
        return {}
    return {
        int(feature): label
        for feature, label in zip(frame["feature"], frame["label"], strict=True)
        if isinstance(label, str) and label
    }


def _bar_names(bars: list[dict[str, Any]], labels: dict[int, str]) -> list[str]:
    """One unique y-axis category per bar: plotly merges bars that share a category."""
    names = []
    for bar in bars:
        if bar.get("label"):
            names.append(str(bar["label"]))
            continue
        feature = bar["feature"]
        label = labels.get(feature) if isinstance(feature, int) else None
        names.append(f"{label} (#{feature})" if label else f"feature {feature}")
    if len(set(names)) < len(names):
        names = [f"{name} (#{bar['feature']})" for name, bar in zip(names, bars, strict=True)]
    return names


def _bars(section: dict[str, Any], result: Any) -> Any:
    import plotly.graph_objects as go

    bars = section["bars"]
    deltas = [float(bar["delta"]) for bar in bars]
    fig = go.Figure(
        go.Bar(
            x=deltas,
            y=_bar_names(bars, _labels_of(result)),
            orientation="h",
            marker_color=[RISING if delta > 0 else FALLING for delta in deltas],
            customdata=[bar["feature"] for bar in bars],
            hovertemplate="%{y}: %{x:.4g}<extra></extra>",
        )
    )
    # The card draws the largest rise on top; plotly's first category sits at the bottom.
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title=section.get("x_label", "Δ"), zeroline=True)
    return fig


def _histogram(section: dict[str, Any], result: Any) -> Any:
    import plotly.graph_objects as go

    counts, edges = section["counts"], section["edges"]
    fig = go.Figure(
        go.Bar(
            x=[(low + high) / 2 for low, high in zip(edges[:-1], edges[1:], strict=True)],
            y=list(counts),
            width=[high - low for low, high in zip(edges[:-1], edges[1:], strict=True)],
            marker_color="#5b8def",
            customdata=[[low, high] for low, high in zip(edges[:-1], edges[1:], strict=True)],
            hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y}<extra></extra>",
        )
    )
    fig.update_layout(bargap=0.05)
    fig.update_yaxes(title="count")
    if section.get("marker") is not None:
        fig.add_vline(
            x=section["marker"],
            line_dash="dash",
            line_color="#b4232c",
            annotation_text=f"unrelated baseline {section['marker']:.3f}",
        )
    return fig


def _heatmap(section: dict[str, Any], result: Any) -> Any:
    import plotly.graph_objects as go

    if "values" in section:  # a labelled matrix on a diverging scale (the trajectory's)
        rows, columns = section.get("row_name", "row"), section.get("column_name", "column")
        fig = go.Figure(
            go.Heatmap(
                z=section["values"],
                x=[f"{columns} {value}" for value in section["column_labels"]],
                y=[f"{rows} {value}" for value in section["row_labels"]],
                colorscale="RdBu",
                reversescale=True,
                zmid=0.0,
                colorbar={"title": section.get("value_label", "value")},
            )
        )
        fig.update_yaxes(autorange="reversed")
        return fig
    # Categories as strings: numeric ids would make plotly space the cells by value.
    fig = go.Figure(
        go.Heatmap(
            z=section["cosine"],
            x=[f"b {value}" for value in section["b"]],
            y=[f"a {value}" for value in section["a"]],
            colorscale="Blues",
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": "cosine"},
        )
    )
    fig.update_yaxes(autorange="reversed")  # row 0 on top, as the card draws it
    return fig


def _line(section: dict[str, Any], result: Any) -> Any:
    import plotly.graph_objects as go

    series = section.get("series") or [{"x": section["x"], "y": section["y"]}]
    fig = go.Figure(
        [
            go.Scatter(x=list(s["x"]), y=list(s["y"]), mode="lines", name=s.get("name"))
            for s in series
        ]
    )
    fig.update_xaxes(title=section.get("x_label", "step"))
    if section.get("x_range"):  # the card's shared step axis
        fig.update_xaxes(range=list(section["x_range"]))
    fig.update_layout(showlegend=len(series) > 1)
    return fig
