"""Static HTML for card specs: tables and inline SVG, every string escaped, no CDN."""

from __future__ import annotations

import copy
import html
import math
import uuid
from functools import cache
from pathlib import Path
from typing import Any

_PACKAGE = Path(__file__).resolve().parents[1]


def widget_source(name: str) -> str:
    """A front-end source from ``widgets/`` (packaged as ``aquin_nb/_widgets``)."""
    for folder in (_PACKAGE / "_widgets", _PACKAGE.parent / "widgets"):
        if (folder / name).is_file():
            return (folder / name).read_text("utf-8")
    raise FileNotFoundError(f"widget source {name} is missing from the installation")


@cache
def _css() -> str:
    return widget_source("card.css")


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return _escape(value)


def _chips(spec: dict[str, Any]) -> str:
    parts = []
    for chip in spec["chips"]:
        css = "aquin-chip aquin-warn" if chip.get("warn") else "aquin-chip"
        parts.append(
            f'<span class="{css}">{_escape(chip["label"])} <b>{_escape(chip["value"])}</b></span>'
        )
    return f'<div class="aquin-chips">{"".join(parts)}</div>'


def _headline(spec: dict[str, Any]) -> str:
    lines = "".join(f"<div>{_escape(line)}</div>" for line in spec.get("headline", []))
    return f'<div class="aquin-headline">{lines}</div>' if lines else ""


def _token_view_html(view: dict[str, Any]) -> str:
    """Each prompt twice (base, checkpoint), tokens shaded by the feature's activation."""
    peak = (
        max((max(p["base"] + p["checkpoint"], default=0.0) for p in view["prompts"]), default=0.0)
        or 1.0
    )
    blocks = []
    for prompt in view["prompts"]:
        lines = []
        for side in ("base", "checkpoint"):
            spans = []
            for token, value in zip(prompt["tokens"], prompt[side], strict=True):
                alpha = max(0.0, min(1.0, value / peak))
                spans.append(
                    f'<span style="background: rgba(214,69,80,{alpha:.2f})" '
                    f'title="{value:.3f}">{_escape(token)}</span>'
                )
            lines.append(f"<div><b>{side}</b> {''.join(spans)}</div>")
        blocks.append(f'<div class="aquin-tokens">{"".join(lines)}</div>')
    return "".join(blocks)


def _contexts_html(contexts: list[dict[str, Any]]) -> str:
    """Top contexts, tokens shaded by the feature's activation, the peak underlined."""
    lines = []
    for context in contexts:
        peak = max(context["acts"], default=0.0) or 1.0
        spans = []
        for index, (token, value) in enumerate(
            zip(context["tokens"], context["acts"], strict=True)
        ):
            alpha = max(0.0, min(1.0, value / peak))
            css = ' class="aquin-peak"' if index == context["peak"] else ""
            spans.append(
                f'<span{css} style="background: rgba(214,69,80,{alpha:.2f})" '
                f'title="{value:.3f}">{_escape(token)}</span>'
            )
        lines.append(f'<div class="aquin-tokens">{"".join(spans)}</div>')
    return "".join(lines) or '<div class="aquin-note">never fires in this corpus</div>'


def _dashboard_html(board: dict[str, Any]) -> str:
    """One feature's dashboard: label, link, logit lens, histogram, contexts by side."""
    title = f"Feature {_escape(board['feature'])}"
    if board.get("label"):
        title += f": {_escape(board['label'])}"
    link = ""
    url = board.get("url")
    if isinstance(url, str) and url.startswith(("https://", "http://")):  # never javascript:
        link = (
            f' <a href="{_escape(url)}" target="_blank" rel="noopener noreferrer">Neuronpedia</a>'
        )
    base = board["base"]
    lens = (
        f"<div><b>promotes</b> {_escape(' · '.join(t['token'] for t in base['promoted']))}</div>"
        f"<div><b>suppresses</b> {_escape(' · '.join(t['token'] for t in base['suppressed']))}</div>"
    )
    columns = []
    for side in ("base", "checkpoint"):
        data = board.get(side)
        if not data:
            continue
        edges = board["histogram_edges"]
        histogram = histogram_svg(
            {"counts": data["histogram"] or [0], "edges": [math.log10(e) for e in edges]},
            width=220,
            height=70,
        )
        columns.append(
            f'<div class="aquin-dash-side"><h4>{side}: fires on {data["density"]:.2%} of tokens'
            f"</h4>{histogram}{_contexts_html(data['contexts'])}</div>"
        )
    return (
        f'<div class="aquin-dash" data-dashboard="{_escape(board["feature"])}"><h4>{title}{link}</h4>'
        f'{lens}<div class="aquin-dash-cols">{"".join(columns)}</div></div>'
    )


def _table(table: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    head = "".join(f"<th>{_escape(column)}</th>" for column in table["columns"])
    rows = []
    for row in table["rows"]:
        cells = []
        for column in table["columns"]:
            value = row[column]
            css = ""
            if column == "delta" and isinstance(value, (int, float)):
                css = ' class="aquin-pos"' if value > 0 else ' class="aquin-neg"'
            cells.append(f"<td{css}>{_number(value)}</td>")
        key = table.get("select")
        attribute = f' data-feature="{_escape(row[key])}"' if key else ""
        target = (labels or {}).get(str(row.get(key))) if key else None
        if target:
            # A label for a hidden radio: a click shows the token view, no script needed.
            cells[0] = (
                f'<td><label for="{target}" class="aquin-pick">{_number(row[key])}</label></td>'
            )
        rows.append(f"<tr{attribute}>{''.join(cells)}</tr>")
    return (
        f'<table class="aquin-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def diverging_bars_svg(
    bars: list[dict[str, Any]], width: int = 460, row: int = 15, label_width: int = 60
) -> str:
    """Horizontal bars around a zero line: rising features red to the right, falling blue.

    Each bar is ``{"feature", "delta"}``, with an optional ``label`` drawn instead
    of the feature id.
    """
    if not bars:
        return ""
    width = max(width, label_width + 200)
    half = (width - label_width) / 2
    extent = max(abs(bar["delta"]) for bar in bars) or 1.0
    height = row * len(bars) + 4
    zero = label_width + half
    shapes = [f'<line x1="{zero}" y1="0" x2="{zero}" y2="{height}" stroke="#9aa5b1"/>']
    for index, bar in enumerate(bars):
        length = abs(bar["delta"]) / extent * (half - 4)
        x = zero if bar["delta"] > 0 else zero - length
        color = "#d64550" if bar["delta"] > 0 else "#3b7dd8"
        y = index * row + 2
        name = bar.get("label", f"feature {bar['feature']}")
        shapes.append(
            f'<rect x="{x:.1f}" y="{y}" width="{length:.1f}" height="{row - 3}" fill="{color}">'
            f"<title>{_escape(name)}: {bar['delta']:.4g}</title></rect>"
        )
        shapes.append(
            f'<text x="{label_width - 4}" y="{y + row - 5}" text-anchor="end">'
            f"{_escape(bar.get('label', bar['feature']))}</text>"
        )
    return (
        f'<svg class="aquin-bars" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img">{"".join(shapes)}</svg>'
    )


def histogram_svg(section: dict[str, Any], width: int = 460, height: int = 120) -> str:
    counts, edges = section["counts"], section["edges"]
    peak = max(counts) or 1
    bar_width = width / len(counts)
    shapes = []
    for index, count in enumerate(counts):
        bar_height = count / peak * (height - 16)
        shapes.append(
            f'<rect x="{index * bar_width + 1:.1f}" y="{height - 14 - bar_height:.1f}" '
            f'width="{bar_width - 2:.1f}" height="{bar_height:.1f}" fill="#5b8def">'
            f"<title>[{edges[index]:.2f}, {edges[index + 1]:.2f}): {count}</title></rect>"
        )
    for value, anchor in ((edges[0], "start"), (0.0, "middle"), (edges[-1], "end")):
        x = (value - edges[0]) / (edges[-1] - edges[0]) * width
        shapes.append(f'<text x="{x:.1f}" y="{height - 2}" text-anchor="{anchor}">{value:g}</text>')
    if section.get("marker") is not None:
        x = (section["marker"] - edges[0]) / (edges[-1] - edges[0]) * width
        shapes.append(
            f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 14}" stroke="#b4232c" '
            f'stroke-dasharray="3,2"><title>unrelated baseline {section["marker"]:.3f}</title>'
            f"</line>"
        )
    return (
        f'<svg class="aquin-bars aquin-histogram" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img">{"".join(shapes)}</svg>'
    )


def heatmap_svg(section: dict[str, Any], cell: int = 14) -> str:
    """A square cosine matrix (``cosine``, ``a``, ``b``: 0 white to 1 blue), or a labelled
    rows x columns matrix (``values``, ``row_labels``, ``column_labels``) on a diverging
    scale: positive red, negative blue, null grey."""
    if "values" in section:
        return _labelled_heatmap_svg(section, cell)
    matrix = section["cosine"]
    if not matrix:
        return ""
    size = cell * len(matrix)
    shapes = []
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            shade = max(0.0, min(1.0, value))
            color = f"rgb({int(255 - 200 * shade)},{int(255 - 150 * shade)},{255})"
            shapes.append(
                f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" '
                f'fill="{color}"><title>a {_escape(section["a"][i])} · b '
                f"{_escape(section['b'][j])}: {value:.3f}</title></rect>"
            )
    return (
        f'<svg class="aquin-heatmap" width="{size}" height="{size}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img">{"".join(shapes)}</svg>'
    )


def _labelled_heatmap_svg(section: dict[str, Any], cell: int) -> str:
    matrix = section["values"]
    rows, columns = section["row_labels"], section["column_labels"]
    if not matrix or not columns:
        return ""
    left, top = 48, 14
    width_of = max(cell, min(36, 420 // len(columns)))  # few columns: wider cells
    every = -(-34 // width_of)  # a column label at least every 34 px
    finite = [abs(v) for row in matrix for v in row if isinstance(v, (int, float))]
    extent = max(finite, default=0.0) or 1.0
    what = _escape(section.get("value_label", "value"))
    row_name, column_name = (
        _escape(section.get("row_name", "row")),
        _escape(section.get("column_name", "column")),
    )
    shapes = []
    for j, label in enumerate(columns):
        if j % every == 0:
            shapes.append(
                f'<text x="{left + j * width_of + width_of / 2:.1f}" y="{top - 3}" '
                f'text-anchor="middle">{_escape(label)}</text>'
            )
    for i, row in enumerate(matrix):
        y = top + i * cell
        shapes.append(
            f'<text x="{left - 4}" y="{y + cell - 3}" text-anchor="end">{_escape(rows[i])}</text>'
        )
        for j, value in enumerate(row):
            if isinstance(value, (int, float)):
                shade = max(-1.0, min(1.0, value / extent))
                fade = int(255 - 200 * abs(shade))
                color = f"rgb(255,{fade},{fade})" if shade > 0 else f"rgb({fade},{fade},255)"
                text = f"{value:.4g}"
            else:
                color, text = "#e4e7eb", "not tracked"
            shapes.append(
                f'<rect x="{left + j * width_of}" y="{y}" width="{width_of}" height="{cell}" '
                f'fill="{color}"><title>{row_name} {_escape(rows[i])} · {column_name} '
                f"{_escape(columns[j])}: {what} {_escape(text)}</title></rect>"
            )
    width, height = left + width_of * len(columns) + 2, top + cell * len(matrix) + 2
    return (
        f'<svg class="aquin-heatmap" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img">{"".join(shapes)}</svg>'
    )


LINE_COLORS = ("#5b8def", "#d64550", "#2e9e6a", "#e08a1e", "#8a5bd6", "#3bb0c9", "#c44dbb")


def _line_series(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Several named series (``series``), or the single ``x``/``y`` of older specs."""
    if "series" in section:
        return [s for s in section["series"] if s["x"]]
    return [{"name": "", "x": section["x"], "y": section["y"]}] if section["x"] else []


def line_svg(section: dict[str, Any], width: int = 460, height: int = 120) -> str:
    """Lines over a shared x axis (``x_range`` fixes it, so several charts align); a null
    y leaves a gap; more than one series, or a named one, gets a legend."""
    series = _line_series(section)
    if not series:
        return ""
    xs = [x for s in series for x in s["x"]]
    ys = [y for s in series for y in s["y"] if y is not None]
    x_low, x_high = section.get("x_range") or (min(xs), max(xs) or 1)
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    span_x, span_y = (x_high - x_low) or 1, (y_high - y_low) or 1
    plot_height = height

    def point(x: float, y: float) -> str:
        return (
            f"{(x - x_low) / span_x * (width - 50) + 45:.1f},"
            f"{(1 - (y - y_low) / span_y) * (plot_height - 20) + 5:.1f}"
        )

    shapes = [
        f'<text x="40" y="12" text-anchor="end">{y_high:.3g}</text>',
        f'<text x="40" y="{plot_height - 15}" text-anchor="end">{y_low:.3g}</text>',
        f'<text x="{width - 5}" y="{plot_height - 2}" text-anchor="end">'
        f"{_escape(section.get('x_label', 'step'))} {_escape(x_high)}</text>",
    ]
    if section.get("x_range"):
        shapes.append(f'<text x="45" y="{plot_height - 2}">{_escape(x_low)}</text>')
    named = len(series) > 1 or any(s.get("name") for s in series)
    for index, line in enumerate(series):
        color = LINE_COLORS[index % len(LINE_COLORS)]
        runs: list[list[str]] = [[]]
        for x, y in zip(line["x"], line["y"], strict=True):
            if y is None:
                runs.append([])
            else:
                runs[-1].append(point(x, y))
        title = f"<title>{_escape(line.get('name', ''))}</title>" if line.get("name") else ""
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                shapes.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{color}">{title}</circle>')
            elif run:
                shapes.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                    f'points="{" ".join(run)}">{title}</polyline>'
                )
    if named:
        per_row = 3
        for index, line in enumerate(series):
            row, column = divmod(index, per_row)
            x, y = 45 + column * (width - 50) / per_row, height + 12 + row * 14
            shapes.append(
                f'<rect x="{x:.1f}" y="{y - 8}" width="10" height="3" '
                f'fill="{LINE_COLORS[index % len(LINE_COLORS)]}"/>'
                f'<text x="{x + 14:.1f}" y="{y - 3}">{_escape(line.get("name", ""))}</text>'
            )
        height += 6 + 14 * ((len(series) + per_row - 1) // per_row)
    return (
        f'<svg class="aquin-bars aquin-line" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img">{"".join(shapes)}</svg>'
    )


_SVG = {
    "bars": lambda section: diverging_bars_svg(
        section["bars"], label_width=int(section.get("label_width", 60))
    ),
    "histogram": histogram_svg,
    "heatmap": heatmap_svg,
    "line": line_svg,
}


def live_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` for ``widgets/card.js``: each chart section carries its SVG,
    rendered here with every string escaped.

    An ``svg`` already in the spec is discarded, never trusted: the web mirror
    receives specs from clients. A section whose data cannot be drawn gets an
    ``error`` instead of a chart.
    """
    spec = copy.deepcopy(spec)
    for section in spec["sections"]:
        section.pop("svg", None)
        if section.get("type") not in _SVG:
            continue
        try:
            section["svg"] = _SVG[section["type"]](section)
        except (
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            ZeroDivisionError,
            OverflowError,
        ) as problem:
            section["error"] = f"cannot draw this chart: {type(problem).__name__}"
    return spec


def _section(section: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    body = {
        "bars": lambda: _SVG["bars"](section),
        "table": lambda: _table(section, labels),
        "histogram": lambda: histogram_svg(section),
        "heatmap": lambda: heatmap_svg(section),
        "line": lambda: line_svg(section),
    }[section["type"]]()
    return f'<div class="aquin-section"><h4>{_escape(section["title"])}</h4>{body}</div>'


# Shown when a sanitizer removed the <style> (an untrusted notebook in JupyterLab, GitHub):
# the card keeps its `hidden` attribute and the text stands in, as scikit-learn's repr does.
_FALLBACK_CSS = (
    ".aquin-static > .aquin-fallback { display: none; }"
    ".aquin-static > .aquin-card[hidden] { display: block; }"
)
FALLBACK_NOTE = "(the card's text: trust the notebook, or run the cell again, to see the card)"


def render_spec_html(spec: dict[str, Any]) -> str:
    """The static card: self-contained HTML and inline SVG, every string escaped.

    It degrades to readable text where the styles are stripped: the card itself
    is ``hidden`` unless its stylesheet shows it, and a ``<pre>`` with the CLI's
    text stands in for it.
    """
    from ._text import render_text

    fallback = f"{render_text(spec)}\n\n{FALLBACK_NOTE}"
    return (
        f'<div class="aquin-static"><style>{_css()}{_FALLBACK_CSS}</style>'
        f'<pre class="aquin-fallback">{_escape(fallback)}</pre>{_card_html(spec)}</div>'
    )


def _card_html(spec: dict[str, Any]) -> str:
    kind = spec["kind"].replace("_", " ")
    parts = [
        f'<div class="aquin-card" data-kind="{_escape(spec["kind"])}" hidden="hidden">',
        f'<h3><span class="aquin-kind">{_escape(kind)}</span>{_escape(spec["title"])}</h3>',
        _headline(spec),
        _chips(spec),
    ]
    if spec.get("warning"):
        parts.append(f'<div class="aquin-chip aquin-warn">{_escape(spec["warning"])}</div>')
    views = spec.get("token_views") or {}
    boards = spec.get("dashboards") or {}
    opened = list(dict.fromkeys([*boards, *views]))
    uid = uuid.uuid4().hex[:8]
    labels = {feature: f"aquin-tv-{uid}-{feature}" for feature in opened}
    if opened:
        rules = "".join(
            f"#{target}:checked ~ .aquin-section .{target} {{ display: block; }}"
            for target in labels.values()
        )
        parts.append(f"<style>.aquin-tv {{ display: none; }}{rules}</style>")
        parts.extend(
            f'<input type="radio" name="aquin-tv-{uid}" id="{target}" class="aquin-radio" hidden="hidden">'
            for target in labels.values()
        )
        parts.append(
            '<div class="aquin-note">Click an underlined feature id to open '
            f"{'its dashboard' if boards else 'where it fires most'} "
            f"({len(opened)} features have one).</div>"
        )
    parts.extend(_section(section, labels) for section in spec["sections"])
    if opened:
        panels = []
        for feature in opened:
            body = _dashboard_html(boards[feature]) if feature in boards else ""
            if feature in views:
                body += (
                    f"<h4>Feature {_escape(feature)}: where it fires most in the probes</h4>"
                    f"{_token_view_html(views[feature])}"
                )
            panels.append(
                f'<div class="aquin-tv {labels[feature]}" data-token-view="{_escape(feature)}">'
                f"{body}</div>"
            )
        # Sticky at the bottom of the viewport: the panel opens in sight of the row clicked.
        parts.append(f'<div class="aquin-section aquin-panels">{"".join(panels)}</div>')
    elif "token_views" in spec:
        parts.append(
            '<div class="aquin-note">No feature views in this card: '
            "<code>diff.with_dashboards()</code> adds dashboards (top contexts over a corpus, "
            "logit lens, histogram) and <code>diff.with_token_views()</code> where the top "
            "features fire in the probes.</div>"
        )
    parts.append("</div>")
    return "".join(parts)


def report_page(title: str, cards: list[str]) -> str:
    body = "\n".join(f'<div style="margin: 16px 0">{card}</div>' for card in cards)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_escape(title)}</title>'
        f"</head><body>{body}</body></html>\n"
    )
