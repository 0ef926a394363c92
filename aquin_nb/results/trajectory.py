"""SaeTrajectory: every checkpoint of a run against one base."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .._errors import AquinError
from ._base import Result

TRAJECTORY_STEP_COLUMNS = ("step", "feature", "delta", "shift", "q_value", "changed")
PER_STEP_COLUMNS = (
    "step",
    "name",
    "checkpoint",
    "n_changed",
    "mean_abs_delta",
    "max_abs_delta",
    "shift_norm",
    "fit_verdict",
    "explained_variance",
    "l0",
    "ce_loss_recovered",
    "kl_div_score",
    "fit_warning",
)
FIRST_CHANGED_COLUMNS = ("feature", "first_changed_step", "last_changed_step", "n_steps_changed")
METRIC_COLUMNS = ("step", "metric", "value")
_TRAJECTORY_DTYPES: dict[str, dict[str, Any]] = {
    "steps": {
        "step": "int64",
        "feature": "int64",
        "delta": "float64",
        "shift": "float64",
        "q_value": "float64",
        "changed": "bool",
    },
    "per_step": {
        "step": "int64",
        "name": object,
        "checkpoint": object,
        "n_changed": "int64",
        "mean_abs_delta": "float64",
        "max_abs_delta": "float64",
        "shift_norm": "float64",
        "fit_verdict": object,
        "explained_variance": "float64",
        "l0": "float64",
        "ce_loss_recovered": "float64",
        "kl_div_score": "float64",
        "fit_warning": object,
    },
    "features": dict.fromkeys(FIRST_CHANGED_COLUMNS, "int64"),
    "metrics": {"step": "int64", "metric": object, "value": "float64"},
}


def typed_trajectory_frame(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the dtypes `SaeTrajectory` documents (JSON nulls become NaN in floats)."""
    dtypes = _TRAJECTORY_DTYPES[name]
    differ = {
        column: dtypes[column]
        for column in frame.columns
        if column in dtypes and frame[column].dtype != pd.api.types.pandas_dtype(dtypes[column])
    }
    # an astype of columns already typed costs as much as a real one: only the others;
    # either way a new frame, so the caller's is never changed below
    frame = frame.astype(differ) if differ else frame.copy(deep=False)
    for column in frame.columns:  # text columns hold None, not NaN, where a value is missing
        if dtypes.get(column) is object:
            values = [None if _missing(v) else v for v in frame[column]]
            frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True, eq=False)
class SaeTrajectory(Result):
    """Every checkpoint of a run against one base, through one SAE, step by step.

    ``summary`` (plain JSON types): ``model``, ``hook``, ``layer``, ``n_features``,
    ``n_prompts``, ``n_tokens``, ``name``, ``source`` (the checkpoints as given),
    ``labels`` (``{feature: label}`` for the tracked features, as `SaeDiff` labels them),
    ``n_steps``, ``first_step``, ``last_step``, ``n_ever_changed``, ``worst_fit``
    (the worst per-step verdict), ``fit_base`` (the base's fit figures, computed
    once), ``criteria`` (as in `SaeDiff`), ``tracking`` (``top_k``,
    ``max_features``), ``backend``, ``metrics`` (the metrics file or null) and
    ``tool_version``.

    ``steps``, the long table: one row per step and *tracked* feature, sorted by
    step then feature: ``step``, ``feature``, ``delta`` (checkpoint minus base
    token-mean activation), ``shift`` (its coefficient in the decomposition of the
    mean residual shift, as `SaeDiff`'s ``shift``), ``q_value``, ``changed`` (the
    same test as `SaeDiff`). A feature is tracked from the first step at which it
    is among that step's ``top_k`` features by ``|delta|`` or by ``|shift|`` (non-zero)
    or counts as changed,
    and gets a row at every step from then on. At most ``max_features`` features
    are tracked: a step's top ``top_k`` enter while fewer are tracked, its other
    changed features (by ``|delta|``) only while fewer than half are, so the
    features that move most keep room to enter late in a run. The table holds at
    most ``max_features`` rows per step; a feature's missing rows before it was
    tracked mean it was neither changed nor among the top ``top_k`` there.

    ``per_step``: one row per checkpoint: ``step``, ``name``, ``checkpoint``,
    ``n_changed``, ``mean_abs_delta``, ``max_abs_delta`` (over all features, not
    only tracked ones), ``shift_norm`` (the norm of the mean residual shift at the
    hook), ``fit_verdict`` (pass/warn/fail, as `SaeDiff`'s fit),
    the checkpoint's ``explained_variance``, ``l0``, ``ce_loss_recovered``,
    ``kl_div_score`` (NaN where not measured) and ``fit_warning`` (or None).

    ``features``: every feature that counts as changed at some step (tracked or
    not): ``feature``, ``first_changed_step``, ``last_changed_step``,
    ``n_steps_changed``, sorted by first changed step.

    ``metrics``: the run's training metrics on the same step axis, long:
    ``step``, ``metric``, ``value`` (empty when the run logged none).
    """

    kind: ClassVar[str] = "sae_trajectory"
    verb: ClassVar[str] = "sae_trajectory"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {
        "steps": TRAJECTORY_STEP_COLUMNS,
        "per_step": PER_STEP_COLUMNS,
        "features": FIRST_CHANGED_COLUMNS,
        "metrics": METRIC_COLUMNS,
    }

    summary: dict[str, Any]
    steps: pd.DataFrame
    per_step: pd.DataFrame
    features: pd.DataFrame
    metrics: pd.DataFrame

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> SaeTrajectory:
        read = super()._from_payload(payload, path)
        try:
            frames = {
                name: typed_trajectory_frame(name, getattr(read, name)) for name in cls.frames
            }
        except (TypeError, ValueError) as error:
            raise AquinError(f"{path}: a column of the wrong type ({error})") from None
        return cls(summary=read.summary, **frames)

    def first_changed(self) -> dict[int, int]:
        """``{feature: first step at which it counts as changed}`` for every such feature."""
        return {
            int(f): int(s)
            for f, s in zip(
                self.features["feature"], self.features["first_changed_step"], strict=True
            )
        }

    def top(self, k: int = 10) -> list[int]:
        """The ``k`` tracked features with the largest ``|delta|`` at any step."""
        if self.steps.empty:
            return []
        peak = self.steps.assign(abs_delta=self.steps["delta"].abs())
        peak = peak.groupby("feature")["abs_delta"].max().reset_index()
        peak = peak.sort_values(["abs_delta", "feature"], ascending=[False, True], kind="stable")
        return [int(f) for f in peak["feature"].head(k)]

    def describe_step(self, step: int) -> str:
        """One line on ``step``: what `watch` prints as each checkpoint is diffed."""
        row = self.per_step.set_index("step").loc[step]
        return (
            f"step {step} ({row['name']}): {row['n_changed']} features changed, max |Δ| "
            f"{row['max_abs_delta']:.4g}, fit {row['fit_verdict']}"
        )

    def wide(self, value: str = "delta", features: list[int] | None = None) -> pd.DataFrame:
        """Features x steps of ``value`` (``delta``, ``q_value`` or ``changed``); NaN where
        a feature was not yet tracked. Rows: ``features`` (default: `top` 10)."""
        chosen = self.top() if features is None else [int(f) for f in features]
        table = self.steps[self.steps["feature"].isin(chosen)].pivot(
            index="feature", columns="step", values=value
        )
        return table.reindex(index=chosen, columns=self.per_step["step"].tolist())

    def __repr__(self) -> str:
        s = self.summary
        span = f"steps {s['first_step']}-{s['last_step']}" if s["n_steps"] else "no steps yet"
        return (
            f"SaeTrajectory({s['model']} vs {s['name']} @ {s['hook']}: {s['n_steps']} checkpoints "
            f"({span}), {s['n_ever_changed']}/{s['n_features']} features changed at some step, "
            f"worst fit {s['worst_fit']})"
        )
