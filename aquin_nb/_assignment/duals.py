"""Dual potentials that certify a matching, and repair of a matching that lost them.

Minimising ``cost = 2 - cos`` over the candidate edges, a matching is optimal
exactly when potentials (u, v) exist with u_i + v_j <= cost_ij on every edge and
equality on the matching. `potentials` finds them (Bellman-Ford on the matching's
residual graph); pricing then checks the same inequality on the edges outside
the candidates. When pricing adds edges that violate it, `repair` re-matches
only the rows involved by shortest augmenting paths, instead of solving again.
"""

from __future__ import annotations

import logging

import numpy as np

from .edges import Edges

logger = logging.getLogger(__name__)

# Bellman-Ford sweeps before the potentials are declared unsettled (a negative cycle).
MAX_SWEEPS = 100_000

# Potentials u (per row) and v (per column), and the Bellman-Ford sweeps they took.
Duals = tuple[np.ndarray, np.ndarray, int]


def potentials(
    n: int,
    edges: Edges,
    match_col: np.ndarray,
    initial: np.ndarray | None = None,
    n_cols: int | None = None,
) -> Duals | None:
    """Potentials (u, v) with u_i + v_j <= cost_ij on every edge and equality on the matching.

    With v_j = cost(r(j), j) - u_r(j), each edge gives the difference constraint
    u_i <= u_r(j) + cost_ij - cost(r(j), j); their shortest-path solution
    (Bellman-Ford, only re-relaxing edges whose source moved) exists because the
    matching is optimal on these edges. Returns (u, v, sweeps), or None if it does
    not settle within ``MAX_SWEEPS`` (a negative cycle: the matching is not optimal).

    Rectangular (``n_cols`` > n): unmatched columns have v_j = 0, so their edges
    only cap u from above; those caps must be in ``initial``.
    """
    edge_rows, edge_cols, edge_cost = edges.rows, edges.cols, edges.cost
    n_cols = n if n_cols is None else n_cols
    row_of_col = np.full(n_cols, -1, dtype=np.int64)
    row_of_col[match_col] = np.arange(n)
    matched_cost = np.zeros(n_cols, dtype=np.float64)
    on_match = match_col[edge_rows] == edge_cols
    matched_cost[edge_cols[on_match]] = edge_cost[on_match]
    source = row_of_col[edge_cols]
    keep = (source != edge_rows) & (source >= 0)
    source, target = source[keep], edge_rows[keep]
    weight = edge_cost[keep] - matched_cost[edge_cols[keep]]
    # Bellman-Ford from any start gives the largest solution below it. The first
    # round starts from u_i = -cos(i, match) (every v_j = 2): a strong pair's row
    # then sits far below a weak pair's, which leaves the edges outside the
    # candidates (strong rows to weak columns) with slack, not violations, when
    # they are priced. Later rounds start from the previous potentials, close to
    # the solution, so far fewer edges need relaxing.
    if initial is None:
        u = np.zeros(n)
        u[edge_rows[on_match]] = edge_cost[on_match] - 2.0
    else:
        u = initial.copy()
    moved = np.ones(n, dtype=bool)
    for sweep in range(MAX_SWEEPS):
        active = np.flatnonzero(moved[source])
        if len(active) == 0:
            v = np.where(row_of_col >= 0, matched_cost - u[row_of_col], 0.0)
            logger.debug("dual potentials settled in %d sweeps", sweep)
            return u, v, sweep
        candidate = u[source[active]] + weight[active]
        # Edges are sorted by target row, so each row's candidates are a run:
        # a segmented minimum (reduceat) rather than a scatter.
        targets = target[active]
        starts = np.flatnonzero(np.r_[True, targets[1:] != targets[:-1]])
        best = np.minimum.reduceat(candidate, starts)
        rows = targets[starts]
        lower = best < u[rows] - 1e-12
        moved = np.zeros(n, dtype=bool)
        moved[rows[lower]] = True
        u[rows[lower]] = best[lower]
    logger.warning("dual potentials did not settle; the result carries only a gap bound")
    return None


def repair(
    n: int,
    edges: Edges,
    match_col: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    max_free: int,
) -> np.ndarray | None:
    """Make a matching optimal again after edges were added: successive shortest paths.

    (u, v) are feasible and tight on the matching for the old edges; edges that
    pricing added may violate them. Each row with a violating edge is unmatched
    and its potential lowered until its edges are feasible; then each free row
    is matched again along a shortest augmenting path in reduced costs (Dijkstra,
    SciPy's csgraph, from all free rows at once), updating the potentials as the
    Hungarian method does. Far cheaper than solving again when few rows are
    freed. Returns the new matching (columns per row), or None when more than
    ``max_free`` rows would be freed (solving again is then the better choice).
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import dijkstra

    edge_rows, edge_cols, edge_cost = edges.rows, edges.cols, edges.cost
    reduced = edge_cost - u[edge_rows] - v[edge_cols]
    freed = np.unique(edge_rows[reduced < -1e-12])
    if len(freed) > max_free:
        return None
    match_col, u, v = match_col.copy(), u.copy(), v.copy()
    row_of_col = np.empty(n, dtype=np.int64)
    row_of_col[match_col] = np.arange(n)
    row_of_col[match_col[freed]] = -1
    match_col[freed] = -1
    on_freed = np.isin(edge_rows, freed)
    u[freed] = np.inf
    np.minimum.at(u, edge_rows[on_freed], edge_cost[on_freed] - v[edge_cols[on_freed]])
    # Edges are sorted by row: one CSR structure serves every search. A column is
    # reached through its matched row (the zero-cost matching edge), so each
    # matched column is folded into that row's node; free columns get nodes of
    # their own after the rows. A row's own matching edge becomes a self-loop.
    indptr = edges.row_starts(n)
    while (match_col < 0).any():
        free_rows = np.nonzero(match_col < 0)[0]
        free_cols = np.nonzero(row_of_col < 0)[0]
        nodes = n + len(free_cols)
        node_of_col = row_of_col.copy()
        node_of_col[free_cols] = np.arange(n, nodes)
        weight = np.maximum(edge_cost - u[edge_rows] - v[edge_cols], 0.0)
        graph = sp.csr_matrix(
            (
                weight,
                node_of_col[edge_cols],
                np.concatenate([indptr, np.full(len(free_cols), indptr[-1])]),
            ),
            shape=(nodes, nodes),
        )
        dist, pred, _ = dijkstra(graph, indices=free_rows, return_predecessors=True, min_only=True)
        target = n + int(np.argmin(dist[n:]))
        shortest = dist[target]
        if not np.isfinite(shortest):
            return None  # no augmenting path among these edges (cannot happen with fallbacks)
        # Hungarian potential update: nodes closer than the target move by the difference.
        lift = np.maximum(shortest - dist[:n], 0.0)
        u += lift
        matched = row_of_col >= 0
        v[matched] -= lift[row_of_col[matched]]
        node, col = target, int(free_cols[target - n])
        while True:
            row = int(pred[node])
            previous_col = int(match_col[row])
            match_col[row], row_of_col[col] = col, row
            if previous_col < 0:
                break
            node, col = row, previous_col
    return match_col
