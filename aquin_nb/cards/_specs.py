"""Card specs: what a card shows, as plain JSON types, shared by every renderer.

One builder per result kind, registered in `SPECS` by the kind the result class
declares (`aquin_nb.results.RESULT_TYPES`). A builder only reads the result's
data: it never runs a model. A spec holds ``kind``, ``tag`` (the CLI's
``[tag]``), ``title``, ``headline`` (one-line statements of what the result
says, the first thing every renderer shows), ``chips``, ``warning`` and
``sections`` (``bars``, ``table``, ``histogram``, ``heatmap``, ``line``); a diff
adds the ``token_views`` it carries. A ``line`` holds one series (``x``, ``y``)
or several (``series``: ``name``, ``x``, ``y``, null y for a gap) and may fix its
``x_range`` so that charts of one card share the step axis; a ``heatmap`` holds
a square ``cosine`` matrix (``a``, ``b``) or a labelled ``values`` matrix
(``row_labels``, ``column_labels``, null for a missing cell).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..results import DISPLAY_COLUMNS
from ._spec_parts import BAR_FEATURES, TABLE_ROWS, _card, _records
from ._spec_runs import sae_trajectory_spec
from ._spec_signals import dashboards_spec, model_diff_spec


def _fit_chip(fit: dict[str, Any]) -> str:
    """``pass · CE recovered 0.998 / 0.991`` (base / checkpoint) when it was measured."""
    recovered = [fit[side].get("ce_loss_recovered") for side in ("base", "checkpoint")]
    if any(value is None for value in recovered):
        return str(fit["verdict"])
    return f"{fit['verdict']} · CE recovered {recovered[0]:.3f} / {recovered[1]:.3f}"


def _named(row: Any) -> str:
    label = row.get("label") if hasattr(row, "get") else None
    return (
        f"{label} (#{int(row['feature'])})"
        if isinstance(label, str) and label
        else f"#{int(row['feature'])}"
    )


def _diff_in_words(diff: Any, n: int = 3) -> list[str]:
    """What changed, in words: labels of the features gained and lost, the directions
    the fine-tune pushed, and the tokens the shift promotes."""
    frame = diff.features
    lines = []
    changed = frame[frame["changed"]] if "changed" in frame else frame.iloc[0:0]
    for word, part in (
        ("gained", changed[changed["delta"] > 0].nlargest(n, "delta")),
        ("lost", changed[changed["delta"] < 0].nsmallest(n, "delta")),
    ):
        if len(part):
            lines.append(
                f"{word}: "
                + "; ".join(f"{_named(row)} {row['delta']:+.3g}" for _, row in part.iterrows())
            )
    shift = diff.summary.get("shift") or {}
    if "shift" in frame and shift.get("directions"):
        pushed = frame.set_index("feature").loc[shift["directions"][:n]].reset_index()
        lines.append(
            "pushed along: "
            + "; ".join(f"{_named(row)} {row['shift']:+.3g}" for _, row in pushed.iterrows())
            + f" ({shift['explained']:.0%} of the shift)"
        )
    if shift.get("promoted"):
        lines.append("the shift promotes: " + " · ".join(t.strip() for t in shift["promoted"][:6]))
    return lines


def sae_diff_spec(diff: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    s = diff.summary
    fit = s["fit"]
    verdict = fit.get("verdict")
    chips = [
        *(
            [{"label": "fit", "value": _fit_chip(fit), "warn": verdict != "pass"}]
            if verdict
            else []
        ),
        {"label": "model", "value": s["model"]},
        {"label": "checkpoint", "value": s["name"]},
        {"label": "hook", "value": s["hook"]},
        {"label": "prompts", "value": s["n_prompts"]},
        {"label": "tokens", "value": s["n_tokens"]},
        {"label": "changed", "value": f"{s['n_changed']} / {s['n_features']}"},
        {"label": "mean |Δ|", "value": f"{s['mean_abs_delta']:.4g}"},
        {"label": "max |Δ|", "value": f"{s['max_abs_delta']:.4g}"},
        {
            "label": "fit base",
            "value": f"EV {fit['base']['explained_variance']:.3f} · L0 {fit['base']['l0']:.1f}",
        },
        {
            "label": "fit checkpoint",
            "value": f"EV {fit['checkpoint']['explained_variance']:.3f} · "
            f"L0 {fit['checkpoint']['l0']:.1f}",
            "warn": bool(fit.get("warning")),
        },
    ]
    frame = diff.features
    columns = list(DISPLAY_COLUMNS)
    rising = frame[frame["delta"] > 0].nlargest(BAR_FEATURES, "delta")
    falling = frame[frame["delta"] < 0].nsmallest(BAR_FEATURES, "delta")
    bars = _records(rising, ["feature", "delta"]) + _records(falling, ["feature", "delta"])
    if "label" in frame:
        labels = frame.set_index("feature")["label"]
        for bar in bars:
            label = labels.get(bar["feature"])
            if isinstance(label, str) and label:
                bar["label"] = f"{label[:26]} (#{bar['feature']})"
    headline = [
        f"nChanged={s['n_changed']} meanAbsDelta={s['mean_abs_delta']:.6g} "
        f"maxAbsDelta={s['max_abs_delta']:.6g}",
        *_diff_in_words(diff),
    ]
    spec = _card(
        "sae_diff",
        f"{s['model']} vs {s['name']}",
        headline,
        chips,
        token_views={str(feature): view for feature, view in diff.views.items()},
        dashboards={str(feature): board for feature, board in diff.dashboards.items()},
        sections=[
            {
                "type": "bars",
                "title": "Top ±Δ features",
                "bars": sorted(bars, key=lambda bar: -bar["delta"]),
                "label_width": 200 if any("label" in bar for bar in bars) else 60,
            },
            {
                "type": "table",
                "title": "Features by |Δ|",
                "columns": columns,
                "rows": _records(frame.head(rows), columns),
                "select": "feature",
            },
        ],
    )
    spec["warning"] = fit.get("warning")
    return spec


def sae_align_spec(align: Any, rows: int = TABLE_ROWS // 2) -> dict[str, Any]:
    s = align.summary
    proof = "optimal" if s["optimal"] else f"gap ≤ {s['gap']:.3g}"
    chips = [
        {"label": "pairs", "value": f"{s['n_matched']} of {s['n_a']} × {s['n_b']}"},
        {"label": "mean cosine", "value": f"{s['mean_cosine']:.3f}"},
        {"label": "median", "value": f"{s['median_cosine']:.3f}"},
        {"label": "unrelated baseline", "value": f"{s['baseline_mean_cosine']:.3f}"},
        {
            "label": "> 0.5 / 0.7 / 0.9",
            "value": f"{s['frac_above_0.5']:.1%} / "
            f"{s['frac_above_0.7']:.1%} / {s['frac_above_0.9']:.1%}",
        },
        {"label": "method", "value": s["method"]},
        {"label": "proof", "value": proof, "warn": not s["optimal"]},
    ]
    headline = [
        f"matched {s['n_matched']}, mean cosine {s['mean_cosine']:.4f}, median "
        f"{s['median_cosine']:.4f}, unrelated baseline {s['baseline_mean_cosine']:.4f} "
        f"({'proven optimal' if s['optimal'] else 'not proven optimal, gap ≤ ' + format(s['gap'], '.4g')})"
    ]
    columns = ["a", "b", "cosine", "encoder_cosine", "rank"]
    return _card(
        "sae_align",
        f"{s['sae_a']} ↔ {s['sae_b']}",
        headline,
        chips,
        sections=[
            {
                "type": "histogram",
                "title": "Matched cosines",
                **s["histogram"],
                "marker": s["baseline_mean_cosine"],
            },
            {"type": "heatmap", "title": "Strongest pairs, in matched order", **s["heatmap"]},
            {
                "type": "table",
                "title": "Strongest pairs",
                "columns": columns,
                "rows": _records(align.strongest(rows), columns),
            },
            {
                "type": "table",
                "title": "Weakest pairs",
                "columns": columns,
                "rows": _records(align.weakest(rows), columns),
            },
        ],
    )


def sae_train_spec(trained: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    s = trained.summary
    metrics = s["metrics"]
    chips = [
        {"label": "model", "value": s["model"]},
        {"label": "hook", "value": s["hook"]},
        {"label": "init", "value": s["init_from"]},
        {"label": "SAE", "value": f"{s['architecture']} · {s['d_sae']}"},
        {"label": "steps", "value": s["steps"]},
        {"label": "tokens", "value": s["tokens"]},
        {"label": "EV trained", "value": f"{metrics['trained']['explained_variance']:.3f}"},
        {"label": "L0 trained", "value": f"{metrics['trained']['l0']:.1f}"},
        {"label": "dead", "value": f"{metrics['trained']['dead_fraction']:.1%}"},
    ]
    headline = []
    for label in ("trained", "public"):
        m = metrics[label]
        if m is not None:
            headline.append(
                f"{label} on {metrics.get('n_held_out', '?')} held-out activations: "
                f"EV {m['explained_variance']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.1%}"
            )
    if metrics["public"] is not None:
        chips.append(
            {"label": "EV public", "value": f"{metrics['public']['explained_variance']:.3f}"}
        )
    if s["interrupted"]:
        chips.append({"label": "status", "value": "interrupted", "warn": True})
    headline.append(f"saved {s['path']} and the SAELens directory {s['saelens_dir']}")
    curve = trained.loss_curve
    step = max(1, len(curve) // 200)
    sections: list[dict[str, Any]] = [
        {
            "type": "line",
            "title": "Training loss",
            "x": [int(x) for x in curve["step"].iloc[::step]],
            "y": [float(y) for y in curve["loss"].iloc[::step]],
        },
    ]
    if len(trained.features):
        columns = ["feature", "decoder_cosine", "rotation"]
        sections.append(
            {
                "type": "table",
                "title": "Most rotated features (vs public)",
                "columns": columns,
                "rows": _records(trained.rotated(rows), columns),
                "select": "feature",
            }
        )
    return _card(
        "sae_train",
        f"{s['model']} layer {s['layer']} · {s['name']}",
        headline,
        chips,
        sections=sections,
    )


def capture_spec(capture: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    s = capture.summary
    chips = [
        {"label": "model", "value": s["model"]},
        {"label": "checkpoint", "value": s.get("name") or "base"},
        {"label": "position", "value": s["position"]},
        {"label": "prompts", "value": s["n_prompts"]},
        {"label": "rows", "value": s["n_rows"]},
        {"label": "d_model", "value": s["d_model"]},
    ]
    table = [
        {"layer": int(layer), "hook": s["hooks"][layer], "shape": " × ".join(map(str, shape))}
        for layer, shape in s["shapes"].items()
    ]
    headline = [
        f"{s['n_rows']} rows × {s['d_model']} per layer from {s['n_prompts']} prompts, "
        f"layers {s['layers']} ({s['position']}), in {capture.directory}"
    ]
    return _card(
        "capture",
        str(capture.directory),
        headline,
        chips,
        sections=[
            {
                "type": "table",
                "title": "Shards",
                "columns": ["layer", "hook", "shape"],
                "rows": table[:rows],
            }
        ],
    )


def simulation_spec(simulation: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    """The forecast's diff card, headed by how the forecast was made."""
    s = simulation.summary
    diff = sae_diff_spec(simulation.diff, rows)
    headline = [
        f"{s['method']}, lr {s['lr']}, {s['steps']} steps on {s['n_examples']} examples, "
        f"{s['n_params']} tensors moved ({s['params']}), |Δθ| {s['delta_norm']:.4g}, "
        f"{s['seconds']:.1f}s",
        f"synthetic checkpoint {s['checkpoint']}",
        *(f"SAE diff: {line}" for line in diff["headline"]),
    ]
    chips = [
        {"label": "method", "value": s["method"]},
        {"label": "lr × steps", "value": f"{s['lr']} × {s['steps']}"},
        {"label": "tensors moved", "value": s["n_params"]},
        *diff["chips"],
    ]
    return {
        **diff,
        "kind": "simulation",
        "tag": "simulate",
        "title": f"forecast: {diff['title']}",
        "headline": headline,
        "chips": chips,
    }


SPECS: dict[str, Callable[..., dict[str, Any]]] = {
    "sae_diff": sae_diff_spec,
    "sae_align": sae_align_spec,
    "sae_train": sae_train_spec,
    "capture": capture_spec,
    "simulation": simulation_spec,
    "sae_trajectory": sae_trajectory_spec,
    "model_diff": model_diff_spec,
    "dashboards": dashboards_spec,
}


def card_spec(result: Any, kind: str | None = None, *, rows: int | None = None) -> dict[str, Any]:
    """The JSON card spec of ``result``; ``rows`` caps each table (default per kind).

    ``kind`` defaults to the result's own and, when given, must match it.

    Example:
        >>> import aquin_nb
        >>> align = aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=32, progress=False)
        >>> spec = card_spec(align)
        >>> spec["kind"], spec["headline"][0][:31]
        ('sae_align', 'matched 32, mean cosine 1.0000,')
    """
    own = getattr(type(result), "kind", None)
    if not isinstance(own, str) or own not in SPECS:
        raise TypeError(f"no card for {type(result).__name__}: known kinds are {sorted(SPECS)}")
    if kind is not None and kind != own:
        raise TypeError(f"{type(result).__name__} is a {own!r} result, not {kind!r}")
    build = SPECS[own]
    return build(result) if rows is None else build(result, rows)
