"""Card specs: what a card shows, as plain JSON types, shared by every renderer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..diff import DISPLAY_COLUMNS

TABLE_ROWS = 25
BAR_FEATURES = 10
TOKEN_VIEW_ROWS = 10


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


def sae_diff_spec(diff: Any, token_views: bool = True) -> dict[str, Any]:
    s = diff.summary
    fit = s["fit"]
    chips = [
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
    views: dict[str, Any] = {}
    if token_views and getattr(diff, "live", None) is not None:
        # A bounded, lazy second pass: only the features the card lists first.
        shown = frame.head(TOKEN_VIEW_ROWS)["feature"].tolist()
        views = {str(f): view for f, view in diff.token_views(shown).items()}
    return {
        "kind": "sae_diff",
        "token_views": views,
        "title": f"{s['model']} vs {s['name']}",
        "chips": chips,
        "warning": fit.get("warning"),
        "sections": [
            {
                "type": "bars",
                "title": "Top ±Δ features",
                "bars": sorted(bars, key=lambda bar: -bar["delta"]),
            },
            {
                "type": "table",
                "title": "Features by |Δ|",
                "columns": columns,
                "rows": _records(frame.head(TABLE_ROWS), columns),
                "select": "feature",
            },
        ],
    }


def sae_align_spec(align: Any) -> dict[str, Any]:
    s = align.summary
    proof = "optimal" if s["optimal"] else f"gap ≤ {s['gap']:.3g}"
    chips = [
        {"label": "pairs", "value": f"{s['n_matched']} of {s['n_a']} × {s['n_b']}"},
        {"label": "mean cosine", "value": f"{s['mean_cosine']:.3f}"},
        {"label": "median", "value": f"{s['median_cosine']:.3f}"},
        {"label": "unrelated baseline", "value": f"{s['baseline_mean_cosine']:.3f}"},
        {"label": "> 0.7", "value": f"{s['frac_above_0.7']:.1%}"},
        {"label": "method", "value": s["method"]},
        {"label": "proof", "value": proof, "warn": not s["optimal"]},
    ]
    columns = ["a", "b", "cosine", "encoder_cosine", "rank"]
    return {
        "kind": "sae_align",
        "title": f"{s['sae_a']} ↔ {s['sae_b']}",
        "chips": chips,
        "warning": None,
        "sections": [
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
                "rows": _records(align.strongest(TABLE_ROWS // 2), columns),
            },
            {
                "type": "table",
                "title": "Weakest pairs",
                "columns": columns,
                "rows": _records(align.weakest(TABLE_ROWS // 2), columns),
            },
        ],
    }


def sae_train_spec(trained: Any) -> dict[str, Any]:
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
    if metrics["public"] is not None:
        chips.append(
            {"label": "EV public", "value": f"{metrics['public']['explained_variance']:.3f}"}
        )
    if s["interrupted"]:
        chips.append({"label": "status", "value": "interrupted", "warn": True})
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
                "rows": _records(trained.rotated(TABLE_ROWS), columns),
                "select": "feature",
            }
        )
    return {
        "kind": "sae_train",
        "title": f"{s['model']} layer {s['layer']} · {s['name']}",
        "chips": chips,
        "warning": None,
        "sections": sections,
    }


def capture_spec(capture: Any) -> dict[str, Any]:
    s = capture.summary
    chips = [
        {"label": "model", "value": s["model"]},
        {"label": "checkpoint", "value": s.get("name") or "base"},
        {"label": "position", "value": s["position"]},
        {"label": "prompts", "value": s["n_prompts"]},
        {"label": "rows", "value": s["n_rows"]},
        {"label": "d_model", "value": s["d_model"]},
    ]
    rows = [
        {"layer": int(layer), "hook": s["hooks"][layer], "shape": " × ".join(map(str, shape))}
        for layer, shape in s["shapes"].items()
    ]
    return {
        "kind": "capture",
        "title": str(capture.directory),
        "chips": chips,
        "warning": None,
        "sections": [
            {
                "type": "table",
                "title": "Shards",
                "columns": ["layer", "hook", "shape"],
                "rows": rows,
            }
        ],
    }


SPECS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "sae_diff": sae_diff_spec,
    "sae_align": sae_align_spec,
    "sae_train": sae_train_spec,
    "capture": capture_spec,
}


def card_spec(result: Any, kind: str, token_views: bool = True) -> dict[str, Any]:
    """The JSON card spec of ``result`` (``kind`` as in its JSON, e.g. ``"sae_diff"``).

    ``token_views=False`` skips the diff card's token views (a second model pass),
    as the web mirror does.
    """
    if kind not in SPECS:
        raise KeyError(f"no card spec for {kind!r}; known: {sorted(SPECS)}")
    if kind == "sae_diff":
        return sae_diff_spec(result, token_views)
    return SPECS[kind](result)
