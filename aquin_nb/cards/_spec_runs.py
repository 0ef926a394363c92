"""The card spec of a run of checkpoints (`SaeTrajectory`)."""

from __future__ import annotations

import math
from typing import Any

from ._spec_parts import TABLE_ROWS, _card, _records

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
