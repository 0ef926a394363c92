"""The sparse solver's entry point: candidates, then the square or rectangular loop."""

from __future__ import annotations

import numpy as np
import torch

from .bound import Rounded
from .candidates import initial_edges, top_k, weak_edges
from .rectangular import gap_bounded, rectangular
from .result import Assignment
from .square import square


def sparse_assignment(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    k: int = 32,
    max_rounds: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Assignment:
    """Optimal (or gap-bounded) assignment of rows of ``a`` to rows of ``b``, len(a) <= len(b).

    Example:
        >>> import torch
        >>> a = torch.nn.functional.normalize(torch.randn(300, 16), dim=1)
        >>> found = sparse_assignment(a, a[torch.randperm(300)], progress=False)
        >>> found.optimal, round(float(found.cosine.sum()), 3)
        (True, 300.0)
    """
    n_rows, n_cols = len(a), len(b)
    k = min(k, n_cols)
    rounded = Rounded.of(a, b)
    top = top_k(a, b, k, progress, rounded)
    weak = weak_edges(a, b, top.cos.max(1), top.col_max, k)
    edges = initial_edges(a, b, top, weak, seed)
    # Each row's best cosine is at most the larger of these: no matching beats their sum.
    upper_bound = float(np.maximum(top.row_max, top.threshold).sum())
    if n_rows < n_cols:
        return rectangular(
            a, b, rounded, top.threshold, edges, k, max_rounds, progress
        ) or gap_bounded(a, b, edges, upper_bound)
    return square(a, b, rounded, top.threshold, edges, k, max_rounds, progress, upper_bound)
