"""The square loop: solve on the candidates, certify by pricing, add edges, repeat.

Each round matches on the current edges (repairing last round's matching when
pricing freed few rows, else solving again), finds potentials that certify it
there, and prices the edges outside. No violation: the matching is optimal.
Otherwise the violating (and nearly violating) edges join the candidates and
the next round starts from these potentials. Between rounds only the rows left
with violators and the columns whose potential rose need pricing again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .bound import Rounded
from .duals import Duals, potentials, repair
from .edges import Edges, pair_cosines, solve
from .pricing import Pricing, price
from .result import Assignment

logger = logging.getLogger(__name__)

# After pricing adds edges, up to this many rows with violating edges are
# re-matched by shortest augmenting paths (one Dijkstra each); more, and the
# problem is solved again.
REPAIR_MAX_ROWS = 64


@dataclass
class _RoundState:
    """What one round of the square loop hands to the next."""

    edges: Edges  # the candidates: each round's pricing adds to them
    rows: np.ndarray | None = None  # the matching on ``edges``: rows[i] -> cols[i]
    cols: np.ndarray | None = None
    duals: Duals | None = None  # potentials certifying it on ``edges``; None: unsettled
    priced_v: np.ndarray | None = None  # the column potentials the last pricing saw
    last: Pricing | None = None  # the last pricing (its ``after`` bounds carry over)
    gap: float | None = None  # the smallest gap bound any round proved
    rounds: int = 0


def _rematch(state: _RoundState, n_rows: int, n_cols: int) -> None:
    """Match on ``state.edges`` and find potentials that certify the matching there."""
    before, state.duals = state.duals, None
    previous = before[0] if before is not None else None
    if state.cols is not None and before is not None:
        # Few rows with violating edges: re-match just those (shortest
        # augmenting paths) instead of solving the whole problem again.
        u, v, _ = before
        repaired = repair(n_rows, state.edges, state.cols, u, v, REPAIR_MAX_ROWS)
        if repaired is not None:
            state.cols = repaired
            state.duals = potentials(n_rows, state.edges, state.cols, previous)
    if state.duals is None:
        state.rows, state.cols = solve(n_rows, n_cols, state.edges)
        state.duals = potentials(n_rows, state.edges, state.cols, previous)


def _price_round(
    state: _RoundState, rounded: Rounded, threshold: np.ndarray, k: int, progress: bool
) -> Pricing:
    """Price this round's potentials: in full the first time, then only what changed."""
    assert state.duals is not None
    u, v, _ = state.duals
    if state.last is None or state.priced_v is None:
        return price(rounded, u, v, threshold, state.edges, k, progress)
    # Only rows left with violators, and columns whose potential rose, can
    # hold a negative reduced cost that the last pricing did not see.
    after = state.last.after
    raised = np.nonzero(v > state.priced_v + 1e-12)[0]
    unfinished = np.nonzero(after < 0)[0]
    pricing = price(
        rounded, u, v, threshold, state.edges, k, progress, rows=unfinished, raised=raised
    )
    after_floor = np.where(np.isfinite(after), after, 0.0)
    pricing.before = np.minimum(pricing.before, np.minimum(after_floor, 0.0))
    return pricing


def square(
    a: torch.Tensor,
    b: torch.Tensor,
    rounded: Rounded,
    threshold: np.ndarray,
    edges: Edges,
    k: int,
    max_rounds: int,
    progress: bool,
    upper_bound: float,
) -> Assignment:
    """The optimum over all edges when every row is certified within ``max_rounds``;
    otherwise the last matching with a bound on its gap (from the last pricing, or
    ``upper_bound`` when the potentials never settled)."""
    n_rows, n_cols = len(a), len(b)
    state = _RoundState(edges)
    while True:
        state.rounds += 1
        _rematch(state, n_rows, n_cols)
        if state.duals is None:
            break  # potentials did not settle: the gap comes from the upper bound below
        pricing = _price_round(state, rounded, threshold, k, progress)
        logger.info(
            "align round %d: %d violations, %d edges to add",
            state.rounds,
            pricing.violations,
            len(pricing.rows),
        )
        round_gap = float(-pricing.before.sum())
        state.gap = round_gap if state.gap is None else min(state.gap, round_gap)
        if pricing.violations == 0:
            state.gap = 0.0  # every edge outside the candidates has reduced cost >= 0
            break
        if state.rounds >= max_rounds:
            break
        state.priced_v, state.last = state.duals[1], pricing
        state.edges = state.edges.join_pairs(a, b, pricing.rows, pricing.cols)
    rows, cols = state.rows, state.cols
    assert rows is not None and cols is not None
    cosine = pair_cosines(a, b, rows, cols, exact=True)
    gap = state.gap
    if state.duals is None and gap is None:
        gap = max(0.0, upper_bound - float(cosine.sum()))
    return Assignment(rows, cols, cosine, "sparse", gap == 0.0, gap, state.rounds)
