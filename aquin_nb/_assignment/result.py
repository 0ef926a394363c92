"""The matching every solver returns, and the dense solver, which needs nothing else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Assignment:
    rows: np.ndarray  # matched row indices, sorted
    cols: np.ndarray  # matched column per row
    cosine: np.ndarray  # float64 cosine of each pair
    method: str  # "dense" or "sparse"
    optimal: bool
    gap: float | None  # upper bound on (optimal total cosine - ours); 0 when optimal
    rounds: int = 0


def dense_assignment(a: torch.Tensor, b: torch.Tensor) -> Assignment:
    """SciPy's ``linear_sum_assignment`` on the full float64 cosine matrix (8 n² bytes)."""
    from scipy.optimize import linear_sum_assignment

    cosines = (a.double() @ b.double().T).numpy()
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    return Assignment(rows, cols, cosines[rows, cols], "dense", True, 0.0)
