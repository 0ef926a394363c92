"""Simulation: a forecast fine-tune and its SaeDiff."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .._errors import AquinError
from ._base import Result
from .diff import SaeDiff


@dataclass(frozen=True, eq=False)
class Simulation(Result):
    """A forecast fine-tune: the synthetic checkpoint and its ``SaeDiff`` against the base.

    ``summary``: ``checkpoint`` (path), ``method`` (``ntk-diagonal`` or
    ``exact-linear``), ``curvature``, ``lr``, ``steps``, ``batch_size``,
    ``n_examples``, ``params`` (the filter) and ``n_params`` (tensors moved),
    ``delta_norm``, ``seconds``, ``model``. ``diff`` is the forecast's `SaeDiff`.
    """

    kind: ClassVar[str] = "simulation"
    verb: ClassVar[str] = "simulate"

    summary: dict[str, Any]
    diff: SaeDiff

    def _payload(self) -> dict[str, Any]:
        diff = self.diff
        return {"diff": {"summary": diff.summary, **diff._payload()}}

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> Simulation:
        inner = payload.get("diff")
        if not isinstance(inner, dict) or not isinstance(inner.get("summary"), dict):
            raise AquinError(f"{path}: a simulation result needs its diff")
        return cls(summary=payload["summary"], diff=SaeDiff._from_payload(inner, path))

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Simulation({s['method']}, lr {s['lr']}, {s['steps']} steps, {s['n_params']} tensors: "
            f"nChanged={self.diff.summary['n_changed']} "
            f"meanAbsDelta={self.diff.summary['mean_abs_delta']:.6g})"
        )
