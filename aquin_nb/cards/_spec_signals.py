"""Card specs of the SAE-free signals and the feature dashboards."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._spec_parts import BAR_FEATURES, TABLE_ROWS, _card, _records


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
