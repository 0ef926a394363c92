"""Growing a `SaeTrajectory` one step at a time (pandas only, no torch).

`sae_trajectory` and `watch` both build their result here, step by step, so a
run diffed in one go and the same run watched as it trains (and resumed after a
restart from the JSON it wrote) give the same trajectory. Which features get
rows is decided per step from that step's full feature frame and the features
already tracked, never from a later step: that is what makes appending a step
to a trajectory read back from JSON exact. See `SaeTrajectory` for the rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from ._errors import AquinError
from ._fit import VERDICTS
from .results import (
    FIRST_CHANGED_COLUMNS,
    METRIC_COLUMNS,
    PER_STEP_COLUMNS,
    TRAJECTORY_STEP_COLUMNS,
    SaeTrajectory,
    typed_trajectory_frame,
)

DEFAULT_TOP_K = 16
DEFAULT_MAX_FEATURES = 256


def _empty(name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    return typed_trajectory_frame(name, pd.DataFrame({column: [] for column in columns}))


def empty_trajectory(summary: dict[str, Any], metrics: pd.DataFrame | None = None) -> SaeTrajectory:
    """A trajectory with no step yet; ``summary`` holds the fixed entries."""
    summary = {
        **summary,
        "n_steps": 0,
        "first_step": None,
        "last_step": None,
        "n_ever_changed": 0,
        "worst_fit": None,
    }
    return SaeTrajectory(
        summary=summary,
        steps=_empty("steps", TRAJECTORY_STEP_COLUMNS),
        per_step=_empty("per_step", PER_STEP_COLUMNS).astype({"fit_warning": object}),
        features=_empty("features", FIRST_CHANGED_COLUMNS),
        metrics=metrics if metrics is not None else _empty("metrics", METRIC_COLUMNS),
    )


def tracked_after(
    tracked: list[int], frame: pd.DataFrame, top_k: int, max_features: int
) -> list[int]:
    """``tracked`` plus this step's newcomers: its top ``top_k`` by ``|delta|`` and by
    ``|shift|`` (non-zero) while fewer than ``max_features`` are tracked, then its changed
    features by ``|delta|`` while fewer than half of ``max_features`` are (the rest stays
    for later top features).

    ``frame`` is a full feature frame, sorted by ``abs_delta`` descending.
    """
    known = set(tracked)
    result = list(tracked)
    feature = frame["feature"].to_numpy()
    top = feature[frame["abs_delta"].to_numpy() > 0][:top_k].tolist()
    if "shift" in frame:
        shift = frame["shift"].to_numpy()
        pushed = shift != 0
        by_shift = feature[pushed][np.lexsort((feature[pushed], -np.abs(shift[pushed])))]
        top += by_shift[:top_k].tolist()  # by |shift| descending, ties by feature
    changed = feature[frame["changed"].to_numpy(dtype=bool)].tolist()
    for candidates, room in ((top, max_features), (changed, max(1, max_features // 2))):
        for feature in candidates:
            if len(result) >= room:
                break
            feature = int(feature)
            if feature not in known:
                known.add(feature)
                result.append(feature)
    return result


def add_step(
    trajectory: SaeTrajectory,
    *,
    step: int,
    name: str,
    checkpoint: str,
    frame: pd.DataFrame,
    fit: dict[str, Any],
    shift_norm: float = 0.0,
) -> SaeTrajectory:
    """A new trajectory with ``step`` added: ``frame`` is its full per-feature frame (as
    `SaeDiff.features`; without a ``shift`` column the shifts are 0), ``fit`` its fit
    report (verdict, figures, warning), ``shift_norm`` the mean residual shift's norm."""
    done = set(trajectory.per_step["step"].tolist())
    if step in done:
        raise AquinError(f"step {step} ({checkpoint}) is already in the trajectory")
    tracking = trajectory.summary["tracking"]
    tracked = [int(f) for f in pd.unique(trajectory.steps["feature"])]
    tracked = tracked_after(tracked, frame, tracking["top_k"], tracking["max_features"])
    rows = frame[frame["feature"].isin(tracked)]
    if "shift" not in rows:
        rows = rows.assign(shift=0.0)
    rows = rows.assign(step=step)[list(TRAJECTORY_STEP_COLUMNS)]
    steps = (
        pd.concat([trajectory.steps, rows], ignore_index=True) if len(rows) else trajectory.steps
    )
    steps = steps.sort_values(["step", "feature"], kind="stable").reset_index(drop=True)

    abs_delta = frame["abs_delta"].to_numpy()
    checkpoint_fit = fit["checkpoint"]
    per_step_row = pd.DataFrame(
        [
            {
                "step": step,
                "name": name,
                "checkpoint": checkpoint,
                "n_changed": int(frame["changed"].sum()),
                "mean_abs_delta": float(abs_delta.mean()) if len(abs_delta) else 0.0,
                "max_abs_delta": float(abs_delta.max()) if len(abs_delta) else 0.0,
                "shift_norm": float(shift_norm),
                "fit_verdict": fit["verdict"],
                "explained_variance": checkpoint_fit["explained_variance"],
                "l0": checkpoint_fit["l0"],
                "ce_loss_recovered": _nan_for_none(checkpoint_fit.get("ce_loss_recovered")),
                "kl_div_score": _nan_for_none(checkpoint_fit.get("kl_div_score")),
                "fit_warning": fit.get("warning"),
            }
        ],
        columns=list(PER_STEP_COLUMNS),
    ).astype({"fit_warning": object})
    per_step = pd.concat(
        [trajectory.per_step, per_step_row] if len(trajectory.per_step) else [per_step_row],
        ignore_index=True,
    )
    per_step = typed_trajectory_frame("per_step", per_step)
    per_step = per_step.sort_values("step", kind="stable").reset_index(drop=True)

    features = _first_changed(trajectory.features, frame, step)
    summary = {
        **trajectory.summary,
        "n_steps": len(per_step),
        "first_step": int(per_step["step"].iloc[0]),
        "last_step": int(per_step["step"].iloc[-1]),
        "n_ever_changed": len(features),
        "worst_fit": max(per_step["fit_verdict"], key=VERDICTS.index),
    }
    return dataclasses.replace(
        trajectory,
        summary=summary,
        steps=typed_trajectory_frame("steps", steps),
        per_step=per_step,
        features=features,
    )


def _nan_for_none(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _first_changed(features: pd.DataFrame, frame: pd.DataFrame, step: int) -> pd.DataFrame:
    changed = np.sort(frame.loc[frame["changed"], "feature"].to_numpy(dtype=np.int64))
    feature = features["feature"].to_numpy(dtype=np.int64)
    first = features["first_changed_step"].to_numpy(dtype=np.int64).copy()
    last = features["last_changed_step"].to_numpy(dtype=np.int64).copy()
    count = features["n_steps_changed"].to_numpy(dtype=np.int64).copy()
    seen = np.isin(feature, changed)
    first[seen] = np.minimum(first[seen], step)
    last[seen] = np.maximum(last[seen], step)
    count[seen] += 1
    new = np.setdiff1d(changed, feature)
    columns = {
        "feature": np.concatenate([feature, new]),
        "first_changed_step": np.concatenate([first, np.full(len(new), step)]),
        "last_changed_step": np.concatenate([last, np.full(len(new), step)]),
        "n_steps_changed": np.concatenate([count, np.ones(len(new), dtype=np.int64)]),
    }
    order = np.lexsort((columns["feature"], columns["first_changed_step"]))
    table = pd.DataFrame(
        {name: columns[name][order].astype(np.int64) for name in FIRST_CHANGED_COLUMNS}
    )
    return table
