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

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..results import DISPLAY_COLUMNS

TABLE_ROWS = 25
BAR_FEATURES = 10


def _records(frame: Any, columns: list[str]) -> list[dict[str, Any]]:
    rows = []
    for record in frame[columns].to_dict("records"):
        rows.append(
            {
                key: (value.item() if hasattr(value, "item") else value)
                for key, value in record.items()
            }
        )
    return rows


def _card(kind: str, title: str, headline: list[str], chips: list[dict[str, Any]], **rest: Any):
    return {
        "kind": kind,
        "tag": kind.replace("_", " "),
        "title": title,
        "headline": headline,
        "chips": chips,
        "warning": None,
        **rest,
    }


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


LINE_FEATURES = 5
HEATMAP_FEATURES = 20
HEATMAP_STEPS = 40
LINE_POINTS = 200
METRIC_CHARTS = 4


def _plain_number(value: Any) -> Any:
    """A JSON number, or None for NaN (a figure that was not measured)."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _evenly(values: list[Any], most: int) -> list[Any]:
    """At most ``most`` of ``values``, evenly spaced, first and last kept."""
    if len(values) <= most:
        return list(values)
    last = len(values) - 1
    picks = sorted({round(i * last / (most - 1)) for i in range(most)})
    return [values[i] for i in picks]


def sae_trajectory_spec(trajectory: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    """Lines of the top features over the steps, a features x steps heatmap, the fit and
    the run's metrics per step, all on one step axis."""
    s = trajectory.summary
    per_step = trajectory.per_step
    steps = [int(step) for step in per_step["step"]]
    metrics = trajectory.metrics
    span = steps + [int(step) for step in metrics["step"]]
    x_range = [min(span), max(span)] if span else None
    worst = s.get("worst_fit")
    chips = [
        *([{"label": "fit", "value": f"worst {worst}", "warn": worst != "pass"}] if worst else []),
        {"label": "model", "value": s["model"]},
        {"label": "run", "value": s["name"]},
        {"label": "hook", "value": s["hook"]},
        {
            "label": "checkpoints",
            "value": f"{s['n_steps']} (steps {s['first_step']}–{s['last_step']})"
            if s["n_steps"]
            else "none yet",
        },
        {"label": "prompts", "value": s["n_prompts"]},
        {"label": "changed at some step", "value": f"{s['n_ever_changed']} / {s['n_features']}"},
        {"label": "backend", "value": s["backend"]},
    ]
    headline = []
    if s["n_steps"]:
        busiest = per_step.loc[per_step["n_changed"].idxmax()]
        headline.append(
            f"{s['n_steps']} checkpoints, steps {s['first_step']}–{s['last_step']}: "
            f"{s['n_ever_changed']} of {s['n_features']} features changed at some step; "
            f"most at step {int(busiest['step'])} ({int(busiest['n_changed'])} changed)"
        )
        verdicts = per_step["fit_verdict"].tolist()
        headline.append(
            f"fit: {verdicts.count('pass')} pass, {verdicts.count('warn')} warn, "
            f"{verdicts.count('fail')} fail; last step {verdicts[-1]}"
        )
    else:
        headline.append("no checkpoint diffed yet")
    top = trajectory.top(HEATMAP_FEATURES)
    first = trajectory.first_changed()
    labels = s.get("labels") or {}

    def named(feature: int) -> str:
        label = labels.get(str(feature))
        return f"feature {feature} · {label}" if label else f"feature {feature}"

    firsts = [f"{f} at step {first[f]}" for f in top[:LINE_FEATURES] if f in first]
    if firsts:
        headline.append("first changed: " + ", ".join(firsts))
    sections: list[dict[str, Any]] = []
    long = trajectory.steps
    if top:
        series = []
        for feature in top[:LINE_FEATURES]:
            rows_of = long[long["feature"] == feature]
            by_step = dict(zip(rows_of["step"].tolist(), rows_of["delta"].tolist(), strict=True))
            shown = _evenly(steps, LINE_POINTS)
            series.append(
                {"name": named(feature), "x": shown, "y": [by_step.get(x) for x in shown]}
            )
        sections.append(
            {
                "type": "line",
                "name": "features",
                "title": "Top features: Δ across steps",
                "x_range": x_range,
                "series": series,
            }
        )
        shown_steps = _evenly(steps, HEATMAP_STEPS)
        wide = trajectory.wide("delta", top).reindex(columns=shown_steps)
        sections.append(
            {
                "type": "heatmap",
                "name": "delta",
                "title": "Δ per feature and step",
                "values": [[_plain_number(v) for v in row] for row in wide.to_numpy().tolist()],
                "row_labels": top,
                "column_labels": shown_steps,
                "row_name": "feature",
                "column_name": "step",
                "value_label": "Δ",
            }
        )
    if steps:
        shown = _evenly(list(range(len(steps))), LINE_POINTS)
        pick = per_step.iloc[shown]
        sections.append(
            {
                "type": "line",
                "name": "changed",
                "title": "Features changed per step",
                "x_range": x_range,
                "series": [
                    {
                        "name": "n_changed",
                        "x": pick["step"].tolist(),
                        "y": pick["n_changed"].tolist(),
                    }
                ],
            }
        )
        fit_series = [
            {
                "name": "explained variance",
                "x": pick["step"].tolist(),
                "y": [_plain_number(v) for v in pick["explained_variance"]],
            }
        ]
        if pick["ce_loss_recovered"].notna().any():
            fit_series.append(
                {
                    "name": "CE loss recovered",
                    "x": pick["step"].tolist(),
                    "y": [_plain_number(v) for v in pick["ce_loss_recovered"]],
                }
            )
        sections.append(
            {
                "type": "line",
                "name": "fit",
                "title": "Fit per step",
                "x_range": x_range,
                "series": fit_series,
            }
        )
    for metric, points in list(metrics.groupby("metric", sort=True))[:METRIC_CHARTS]:
        points = points.iloc[_evenly(list(range(len(points))), LINE_POINTS)]
        sections.append(
            {
                "type": "line",
                "name": f"metric {metric}",
                "title": f"Training metric: {metric}",
                "x_range": x_range,
                "series": [
                    {
                        "name": str(metric),
                        "x": points["step"].tolist(),
                        "y": points["value"].tolist(),
                    }
                ],
            }
        )
    step_columns = [
        "step",
        "name",
        "n_changed",
        "mean_abs_delta",
        "max_abs_delta",
        "shift_norm",
        "fit_verdict",
        "explained_variance",
        "ce_loss_recovered",
    ]
    step_rows = [
        {key: _plain_number(value) for key, value in row.items()}
        for row in _records(per_step.tail(rows), step_columns)
    ]
    sections.append(
        {"type": "table", "title": "Fit per step", "columns": step_columns, "rows": step_rows}
    )
    feature_columns = ["feature", "label", *list(trajectory.features.columns)[1:]]
    feature_rows = [
        {"label": labels.get(str(row["feature"])), **row}
        for row in _records(trajectory.features.head(rows), list(trajectory.features.columns))
    ]
    sections.append(
        {
            "type": "table",
            "title": "Features by first changed step",
            "columns": feature_columns,
            "rows": feature_rows,
            "select": "feature",
        }
    )
    spec = _card(
        "sae_trajectory", f"{s['model']} vs {s['name']}", headline, chips, sections=sections
    )
    if len(per_step):
        warning = per_step["fit_warning"].iloc[-1]
        spec["warning"] = f"step {steps[-1]}: {warning}" if isinstance(warning, str) else None
    return spec


def model_diff_spec(diff: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    s = diff.summary
    last = s["n_layers"] - 1
    suggested = s["suggested_layer"]
    headline = [
        f"mean KL {s['mean_kl']:.4g} (max {s['max_kl']:.4g}) over {s['n_tokens']} tokens; "
        f"{s['n_modules_changed']} of {s['n_modules']} tensors changed",
        s["suggestion"],
    ]
    for layer in dict.fromkeys(x for x in (suggested, last) if x is not None):
        tokens = diff.promoted_at(layer)
        if tokens:
            headline.append(f"layer {layer} pushes towards: {' · '.join(tokens[:6])}")
    chips = [
        {"label": "model", "value": s["model"]},
        {"label": "checkpoint", "value": s["name"]},
        {"label": "prompts", "value": s["n_prompts"]},
        {"label": "tokens", "value": s["n_tokens"]},
        {"label": "mean KL", "value": f"{s['mean_kl']:.4g}"},
        {"label": "max KL", "value": f"{s['max_kl']:.4g}"},
        {"label": "tensors changed", "value": f"{s['n_modules_changed']} / {s['n_modules']}"},
        {"label": "look at layer", "value": "—" if suggested is None else suggested},
    ]
    layers = diff.layers
    changed = diff.changed_modules().head(BAR_FEATURES)
    bars = [
        {"feature": index, "label": module[-32:], "delta": float(change)}
        for index, (module, change) in enumerate(
            zip(changed["module"], changed["abs_change"], strict=True)
        )
    ]
    shown = last if suggested is None else suggested
    promoted = diff.promoted[diff.promoted["layer"] == shown]
    token_columns = ["context", "kl", "base_next", "checkpoint_next", "prompt"]
    return _card(
        "model_diff",
        f"{s['model']} vs {s['name']}",
        headline,
        chips,
        sections=[
            {
                "type": "line",
                "title": "Drift of the residual stream after each block (‖Δx‖/‖x‖)",
                "x": [int(x) for x in layers["layer"]],
                "y": [float(y) for y in layers["rel_drift"]],
                "x_label": "layer",
            },
            {
                "type": "bars",
                "title": "Most changed tensors (‖ΔW‖_F)",
                "bars": bars,
                "label_width": 220,
            },
            {
                "type": "table",
                "title": "Where the next-token distribution changed most (KL)",
                "columns": token_columns,
                "rows": _records(diff.tokens.head(rows), token_columns),
            },
            {
                "type": "table",
                "title": f"Logit lens of the mean activation difference at layer {shown}",
                "columns": ["direction", "rank", "token", "cosine", "logit"],
                "rows": _records(promoted, ["direction", "rank", "token", "cosine", "logit"]),
            },
        ],
    )


def dashboards_spec(boards: Any, rows: int = TABLE_ROWS) -> dict[str, Any]:
    s = boards.summary
    frame = boards.features
    alive = frame[frame["density"] > 0]
    densities = np.log10(alive["density"].to_numpy()) if len(alive) else np.zeros(0)
    counts, edges = np.histogram(densities, bins=20) if len(alive) else ([0], [0.0, 1.0])
    columns = ["feature", "label", "density", "max_activation"]
    if "checkpoint" in s["sides"]:
        columns += ["checkpoint_density", "checkpoint_max_activation"]
    shown = frame.sort_values(["density", "feature"], ascending=[False, True]).head(rows)
    return _card(
        "dashboards",
        f"{s['model']} · {s['hook']}",
        [
            f"{len(frame)} features over {s['n_tokens']} tokens ({s['n_windows']} windows); "
            f"{s['dead_fraction']:.1%} never fire",
            "boards.feature(i) holds one feature's contexts, histogram and logit lens",
        ],
        [
            {"label": "features", "value": len(frame)},
            {"label": "tokens", "value": s["n_tokens"]},
            {"label": "k", "value": s["k"]},
            {"label": "dead", "value": f"{s['dead_fraction']:.1%}"},
            {"label": "sides", "value": " + ".join(s["sides"])},
        ],
        sections=[
            {
                "type": "histogram",
                "title": "Feature density (log10 of the fraction of tokens where it fires)",
                "counts": [int(c) for c in counts],
                "edges": [float(e) for e in edges],
            },
            {
                "type": "table",
                "title": "Most frequent features",
                "columns": columns,
                "rows": _records(shown, columns),
                "select": "feature",
            },
        ],
    )


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
