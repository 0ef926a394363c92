"""The rectangular loop (more columns than rows), and the gap-bounded fallback.

With columns to spare, the columns left unmatched also constrain the duals
(their potential is 0), so each round looks for every row's best unmatched
columns before certifying; see `rectangular`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .bound import Rounded
from .candidates import top_k
from .duals import potentials
from .edges import Edges, pair_cosines, solve
from .pricing import price
from .result import Assignment

logger = logging.getLogger(__name__)


def rectangular(
    a: torch.Tensor,
    b: torch.Tensor,
    rounded: Rounded,
    threshold: np.ndarray,
    edges: Edges,
    k: int,
    max_rounds: int,
    progress: bool,
) -> Assignment | None:
    """More columns than rows: the optimum on the candidates, proven optimal over all edges.

    The dual of matching every row with columns used at most once asks for
    potentials with u_i + v_j <= cost_ij everywhere, v_j <= 0, and v_j = 0 on
    unmatched columns. Unmatched columns therefore cap u_i at cost_ij: each round
    finds every row's top-k among the unmatched columns (their exact cosines
    join the candidates; the k-th bf16 value plus its error bound caps the
    rest), starts Bellman-Ford from those caps, and checks v_j <= 0 on the
    matched columns (u_i >= the row's matched cost). Edges to matched columns
    outside the candidates are priced as in the square case. Returns None when
    ``max_rounds`` pass without a certificate (the caller then bounds the gap).
    """
    n_rows, n_cols = len(a), len(b)
    for round_ in range(1, max_rounds + 1):
        _, cols = solve(n_rows, n_cols, edges)
        free = np.ones(n_cols, dtype=bool)
        free[cols] = False
        free_cols = np.flatnonzero(free)
        free_k = min(k, len(free_cols))
        free_top = top_k(
            a, b[torch.as_tensor(free_cols)], free_k, progress, desc="align: unmatched columns"
        )
        edges = edges.join(
            np.repeat(np.arange(n_rows), free_k),
            free_cols[free_top.cols.reshape(-1)],
            free_top.cos.reshape(-1),
            n_cols,
        )
        # u_i <= 2 - cos_ij for every unmatched j: its edges exactly, the rest by the cap.
        initial = 2.0 - free_top.threshold if free_k < len(free_cols) else np.full(n_rows, np.inf)
        to_free = free[edges.cols]
        np.minimum.at(initial, edges.rows[to_free], edges.cost[to_free])
        duals = potentials(n_rows, edges, cols, initial, n_cols=n_cols)
        if duals is None:
            continue
        u, v, _ = duals
        # v_j <= 0 on matched columns (a small float tolerance, as for the edges).
        if (v[cols] > 1e-12).any() or not np.isfinite(u).all():
            logger.info("align round %d (rectangular): potentials not yet feasible", round_)
            continue  # the new edges to unmatched columns change the optimum: solve again
        pricing = price(rounded, u, v, threshold, edges, k, progress, columns=cols)
        logger.info(
            "align round %d (rectangular): %d violations, %d edges to add",
            round_,
            pricing.violations,
            len(pricing.rows),
        )
        if pricing.violations == 0:
            rows = np.arange(n_rows)
            return Assignment(
                rows, cols, pair_cosines(a, b, rows, cols, exact=True), "sparse", True, 0.0, round_
            )
        edges = edges.join_pairs(a, b, pricing.rows, pricing.cols)
    return None


def gap_bounded(a: torch.Tensor, b: torch.Tensor, edges: Edges, upper_bound: float) -> Assignment:
    """The candidate graph's optimum, with the gap to the sum of each row's best cosine."""
    rows, cols = solve(len(a), len(b), edges)
    cosine = pair_cosines(a, b, rows, cols, exact=True)
    return Assignment(
        rows, cols, cosine, "sparse", False, max(0.0, upper_bound - float(cosine.sum()))
    )
