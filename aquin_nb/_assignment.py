"""Maximum-cosine one-to-one matching of unit vectors: dense and sparse solvers.

Dense: SciPy's ``linear_sum_assignment`` on the full cosine matrix (8 n² bytes).

Sparse, for dictionaries too large for that:

1. candidates: the cosine matrix is computed block by block (bfloat16 matmul,
   never held whole) and each row keeps its top-k columns; the exact float32
   cosines of those edges are then recomputed. A rigorous per-row bound on the
   bf16 error (`_bf16_error`) bounds every other column's cosine. A random
   permutation of fallback edges guarantees a full matching exists. Rows and
   columns with no strong partner (a feature new to one dictionary) also get
   their top-k edges among each other (`_weak_edges`), where the optimum
   matches them.
2. solve: SciPy's ``min_weight_full_bipartite_matching`` (LAPJVsp) on the
   candidate graph with row-reduced costs ``1 + max_j cos_ij - cos_ij``.
3. certify: dual potentials of the sparse optimum come from Bellman-Ford on the
   matching's residual graph, started from ``u_i = -cos(i, match)``. A row is
   certified when no edge outside the candidate set can have negative reduced
   cost: first by its top-k threshold (cheap), otherwise by a pricing pass over
   that row with bf16 cosines and their error bound (a lower bound on every
   reduced cost). Edges whose bound is below a margin are added (column
   generation); rows with a violating edge are then re-matched by shortest
   augmenting paths from the current potentials (`_repair`), or, when there are
   many, the problem is solved again. When every row is certified, the
   matching is provably optimal; otherwise the last pricing gives a bound on
   the gap to the optimum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# bfloat16 keeps 8 significant bits: the output of a bf16 matmul (float32
# accumulation, rounded to bf16) is within 2^-7 |value| of the float32 sum
# whether it is rounded to nearest or truncated (see `_bf16_error`).
BF16_OUTPUT = 2.0**-7
# float32 dot products of unit vectors in d <= 16k dimensions.
FP32_ERROR = 1e-5
NEAR_MARGIN = 0.02
# After pricing adds edges, up to this many rows with violating edges are
# re-matched by shortest augmenting paths (one Dijkstra each); more, and the
# problem is solved again.
REPAIR_MAX_ROWS = 64
# Bellman-Ford sweeps before the potentials are declared unsettled (a negative cycle).
MAX_SWEEPS = 100_000
# A row or column with no cosine above this has no clear partner (see _weak_edges).
WEAK = 0.5


@dataclass(frozen=True)
class Assignment:
    rows: np.ndarray  # matched row indices, sorted
    cols: np.ndarray  # matched column per row
    cosine: np.ndarray  # float64 cosine of each pair
    method: str  # "dense" or "sparse"
    optimal: bool
    gap: float | None  # upper bound on (optimal total cosine - ours); 0 when optimal
    rounds: int = 0


def pair_cosines(
    a: torch.Tensor, b: torch.Tensor, rows: np.ndarray, cols: np.ndarray, exact: bool = False
) -> np.ndarray:
    """Cosines of the given pairs of unit rows: float32 dot products, float64 when ``exact``."""
    out = np.empty(len(rows), dtype=np.float64)
    # Small chunks: the gathered rows stay in cache (4-5x faster than one big gather
    # at d = 2304, where gathering is what costs).
    step = max(64, (1 << 21) // (a.shape[1] * (8 if exact else 4)))
    for start in range(0, len(rows), step):
        left = a[torch.as_tensor(rows[start : start + step])]
        right = b[torch.as_tensor(cols[start : start + step])]
        if exact:
            left, right = left.double(), right.double()
        out[start : start + step] = (left * right).sum(1).double().numpy()
    return out


def dense_assignment(a: torch.Tensor, b: torch.Tensor) -> Assignment:
    from scipy.optimize import linear_sum_assignment

    cosines = (a.double() @ b.double().T).numpy()
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    return Assignment(rows, cols, cosines[rows, cols], "dense", True, 0.0)


ROW_BLOCK_BYTES = 1 << 28


def _row_block(n_cols: int) -> int:
    return max(16, min(8192, ROW_BLOCK_BYTES // (4 * max(n_cols, 1))))


def _rounding_residual(x: torch.Tensor, x16: torch.Tensor) -> torch.Tensor:
    """Per row, an upper bound on the norm of ``x - x16`` (float32, in cache-sized chunks)."""
    out = torch.empty(len(x), dtype=torch.float32)
    step = 256
    for start in range(0, len(x), step):
        rows = slice(start, start + step)
        torch.linalg.vector_norm(x[rows] - x16[rows].float(), dim=1, out=out[rows])
    return out.double() * (1 + 1e-5)  # float32 norm: relative error far below 1e-5


def _bf16_error(
    a: torch.Tensor, a16: torch.Tensor, b: torch.Tensor, b16: torch.Tensor
) -> torch.Tensor:
    """Per row of ``a``: a bound on |a16_i·b16_j - a_i·b_j| for every j, before
    the output rounding (add ``BF16_OUTPUT * |value|`` for that), with ``|a_i|, |b_j| <= 1``.

    With x = x_hi + x_lo (x_hi the bf16 rounding), a·b = a_hi·b_hi + a_lo·b + a_hi·b_lo,
    so by Cauchy-Schwarz the inputs' rounding costs at most |a_lo| + |a_hi| max_j |b_lo|.
    The float32 accumulation of the d exact bf16 products adds at most
    γ_d |a_hi| |b_hi| (γ_d = d u / (1 - d u), u = 2^-24). Measured rounding
    residuals (≈ 0.0017 per unit row) make this ≈ 0.004, against 2^-7 ≈ 0.008 for
    the worst case over all inputs.
    """
    d = a.shape[1]
    unit_roundoff = 2.0**-24
    gamma = d * unit_roundoff / (1 - d * unit_roundoff)
    slack = 1.0 + 1e-6  # the rows are unit length up to float32 rounding
    lo_a = _rounding_residual(a, a16)
    lo_b = float(_rounding_residual(b, b16).max()) if len(b) else 0.0
    hi_a = slack + lo_a
    return lo_a * slack + hi_a * lo_b + gamma * hi_a * (slack + lo_b) + 1e-30


@dataclass(frozen=True)
class _Rounded:
    """bfloat16 copies of both sides and, per row of ``a``, the input part of the
    bound on |a16_i·b16_j - a_i·b_j| (see `_bf16_error`)."""

    a16: torch.Tensor
    b16: torch.Tensor
    error: torch.Tensor  # float64, one per row of a

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> _Rounded:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        return cls(a16, b16, _bf16_error(a, a16, b, b16))

    def bounds(self, approx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per entry of a float32 block of bf16 cosines (rows of ``a`` given), the
        bound on its distance from the exact cosine."""
        return approx.abs().mul_(BF16_OUTPUT).add_(self.error[rows].float()[:, None])


def _candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    progress: bool,
    rounded: _Rounded | None = None,
    desc: str = "align: candidates",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k columns per row (bf16 blockwise), their float32 cosines, per row a
    bound on any other column's cosine and on the row's maximum, and per column
    its largest cosine among the kept edges."""
    n_rows, n_cols = len(a), len(b)
    rounded = rounded or _Rounded.of(a, b)
    a16, input_error = rounded.a16, rounded.error
    b16_t = rounded.b16.T  # a transposed view multiplies as fast as a copy
    block = _row_block(n_cols)
    cols = np.empty((n_rows, k), dtype=np.int64)
    exact = np.empty((n_rows, k), dtype=np.float64)
    threshold = np.empty(n_rows, dtype=np.float64)
    row_max = np.empty(n_rows, dtype=np.float64)
    # Gathered candidate columns, 16 rows' worth at a time: small enough to stay
    # in cache, and reused rather than allocated per step.
    group = 16
    gathered = torch.empty(group * k, b.shape[1], dtype=b.dtype)
    bar = tqdm(total=n_rows, desc=desc, disable=not progress, unit="row")
    for start in range(0, n_rows, block):
        values, index = (a16[start : start + block] @ b16_t).topk(k, dim=1)
        cols[start : start + block] = index.numpy()
        block_rows = a[start : start + len(index), :, None]
        block_exact = torch.empty(len(index), k, 1, dtype=a.dtype)
        for sub in range(0, len(index), group):
            wanted = index[sub : sub + group].reshape(-1)
            torch.index_select(b, 0, wanted, out=gathered[: len(wanted)])
            torch.bmm(
                gathered[: len(wanted)].view(len(wanted) // k, k, -1),
                block_rows[sub : sub + group],
                out=block_exact[sub : sub + group],
            )
        exact[start : start + len(index)] = block_exact[:, :, 0].numpy()
        # Any column outside the top-k has cosine <= the k-th value plus the bf16 error.
        error = input_error[start : start + len(index)].numpy()
        kth, first = values[:, -1].double().numpy(), values[:, 0].double().numpy()
        threshold[start : start + block] = kth + error + BF16_OUTPUT * np.abs(kth)
        row_max[start : start + block] = first + error + BF16_OUTPUT * np.abs(first)
        bar.update(len(index))
    bar.close()
    # A column's best cosine among the kept edges (a lower bound on its maximum,
    # which is all `_weak_edges` needs; a reduction over every block costs as much
    # as the top-k itself).
    col_max = np.full(n_cols, -np.inf)
    np.maximum.at(col_max, cols.reshape(-1), exact.reshape(-1))
    return cols, exact, threshold, row_max, col_max


def _solve(n_rows: int, n_cols: int, rows: np.ndarray, cols: np.ndarray, cos: np.ndarray):
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    # Row-reduced costs (a constant per row does not change which matching is
    # optimal): LAPJVsp only reduces columns itself, and starting from reduced
    # rows it solves 16k random rows 3x faster. The +1 keeps every cost nonzero.
    row_best = np.full(n_rows, -np.inf)
    np.maximum.at(row_best, rows, cos)
    graph = sp.csr_matrix((1.0 + row_best[rows] - cos, (rows, cols)), shape=(n_rows, n_cols))
    return min_weight_full_bipartite_matching(graph)


def _check_sorted(edge_rows: np.ndarray) -> None:
    """`_duals` and `_repair` read each row's edges as one run (as `_unique_edges` sorts them)."""
    if len(edge_rows) > 1 and bool((edge_rows[1:] < edge_rows[:-1]).any()):
        raise ValueError("edges must be sorted by row")


def _duals(
    n: int,
    edge_rows: np.ndarray,
    edge_cols: np.ndarray,
    edge_cost: np.ndarray,
    match_col: np.ndarray,
    initial: np.ndarray | None = None,
    n_cols: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Potentials (u, v) with u_i + v_j <= cost_ij on every edge and equality on the matching.

    With v_j = cost(r(j), j) - u_r(j), each edge gives the difference constraint
    u_i <= u_r(j) + cost_ij - cost(r(j), j); their shortest-path solution
    (Bellman-Ford, only re-relaxing edges whose source moved) exists because the
    matching is optimal on these edges. Returns (u, v, sweeps), or None if it does
    not settle within ``MAX_SWEEPS`` (a negative cycle: the matching is not optimal).

    Rectangular (``n_cols`` > n): unmatched columns have v_j = 0, so their edges
    only cap u from above; those caps must be in ``initial``.
    """
    _check_sorted(edge_rows)
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


def _repair(
    n: int,
    edge_rows: np.ndarray,
    edge_cols: np.ndarray,
    edge_cost: np.ndarray,
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

    _check_sorted(edge_rows)
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
    indptr = np.searchsorted(edge_rows, np.arange(n + 1))
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


@dataclass
class _Pricing:
    """One pricing pass: edges to add, and per row a lower bound on the reduced cost
    of every edge outside the candidate set. ``before`` counts the edges being
    added (for this round's gap bound); ``after`` leaves them out (rows with
    ``after < 0`` still have violating edges and must be priced in full again)."""

    rows: np.ndarray
    cols: np.ndarray
    before: np.ndarray
    after: np.ndarray
    violations: int = 0


def _candidate_index(edge_rows: np.ndarray, edge_cols: np.ndarray, n_rows: int):
    order = np.argsort(edge_rows, kind="stable")
    return edge_cols[order], np.searchsorted(edge_rows[order], np.arange(n_rows + 1))


def _price_block(
    reduced: torch.Tensor,
    chunk: np.ndarray,
    column_ids: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    column_position: np.ndarray,
    add_per_row: int,
    pricing: _Pricing,
    found: tuple[list, list],
) -> None:
    """Mask candidate edges in a [rows, columns] block of reduced costs, pick violators."""
    cols_by_row, indptr = candidates
    width = reduced.shape[1]
    counts = indptr[chunk + 1] - indptr[chunk]
    offsets = np.repeat(np.arange(len(chunk)), counts)
    positions = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in chunk])
    where = column_position[cols_by_row[positions]]
    inside = (where >= 0) & (where < width)
    # Candidate edges satisfy the duals already (reduced cost >= 0): mask them.
    reduced[torch.as_tensor(offsets[inside]), torch.as_tensor(where[inside])] = math.inf
    take = min(add_per_row + 1, width)
    values, index = reduced.topk(take, dim=1, largest=False)
    values64 = values.double().numpy()
    adds = min(add_per_row, take)
    violating = values64[:, :adds] < -FP32_ERROR
    # Edges that are nearly violating join too: the next duals move a little, and
    # having them already saves a round.
    added = values64[:, :adds] < NEAR_MARGIN
    found[0].append(np.repeat(chunk, adds).reshape(len(chunk), adds)[added])
    found[1].append(column_ids[index[:, :adds].numpy()][added])
    pricing.violations += int(violating.sum())
    pricing.before[chunk] = np.minimum(pricing.before[chunk], values64[:, 0] - FP32_ERROR)
    n_added = added.sum(1)
    rest = np.full(len(chunk), np.inf)
    has_rest = n_added < take
    rest[has_rest] = values64[has_rest, n_added[has_rest]]
    pricing.after[chunk] = np.minimum(pricing.after[chunk], rest - FP32_ERROR)


def _price(
    rounded: _Rounded,
    u: np.ndarray,
    v: np.ndarray,
    threshold: np.ndarray,
    edge_rows: np.ndarray,
    edge_cols: np.ndarray,
    add_per_row: int,
    progress: bool,
    rows: np.ndarray | None = None,
    raised: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> _Pricing:
    """Lower bounds on the reduced costs ``2 - cos_ij - u_i - v_j`` of edges outside
    the candidate set: bf16 cosines (AMX matmuls on CPUs that have them, about 4x
    float32) plus their rigorous error bound (`_bf16_error`, ≈ 0.005). An edge
    whose bound is below zero is added to the candidates, where its exact cosine
    is used, even if its exact reduced cost is not negative; so a certified row
    is certified exactly.

    Full pricing (``rows``, all rows by default): outside its candidates row i has
    ``cos_ij <= threshold_i``, so only columns with ``v_j > 2 - u_i - threshold_i``
    can have a negative reduced cost; sorting the columns by ``v`` makes those a
    prefix, and each row is priced against its prefix only. ``raised``: every row
    against those columns only. Between rounds the potentials only fall for rows
    (warm-started Bellman-Ford), so an edge certified earlier can only have lost
    its certificate through a column whose potential rose. ``columns``: price
    only these (the matched ones, in the rectangular case).
    """
    n_rows, n_cols = len(rounded.a16), len(rounded.b16)
    pricing = _Pricing(
        np.empty(0, np.int64), np.empty(0, np.int64), np.zeros(n_rows), np.zeros(n_rows)
    )
    candidates = _candidate_index(edge_rows, edge_cols, n_rows)
    found: tuple[list, list] = ([np.empty(0, np.int64)], [np.empty(0, np.int64)])
    u32 = torch.as_tensor(u, dtype=torch.float32)
    limit = 2.0 - u - threshold
    passes = [
        (
            np.arange(n_rows) if rows is None else rows,
            np.arange(n_cols) if columns is None else columns,
        )
    ]
    if raised is not None and len(raised):
        passes.append((np.arange(n_rows), raised))
    for pass_rows, columns in passes:
        # Columns sorted by potential: row i only needs those with v_j > limit_i, a prefix.
        order = columns[np.argsort(-v[columns], kind="stable")]
        position = np.full(n_cols, -1, dtype=np.int64)
        position[order] = np.arange(len(order))
        sorted_v = v[order]
        prefix = np.searchsorted(-sorted_v, -limit, side="left")
        to_price = pass_rows[prefix[pass_rows] > 0]
        to_price = to_price[np.argsort(prefix[to_price], kind="stable")]
        if len(to_price) == 0:
            continue
        b_sorted = rounded.b16[torch.as_tensor(order)]
        v_sorted = torch.as_tensor(sorted_v, dtype=torch.float32)
        bar = tqdm(total=len(to_price), desc="align: pricing", disable=not progress, unit="row")
        start = 0
        while start < len(to_price):
            remaining = len(to_price) - start
            first_guess = min(_row_block(int(prefix[to_price[start]])), remaining)
            # Rows are sorted by prefix length, so the guess's last row bounds the width.
            block = min(_row_block(int(prefix[to_price[start + first_guess - 1]])), remaining)
            chunk = to_price[start : start + block]
            width = int(prefix[chunk[-1]])
            chunk_rows = torch.as_tensor(chunk)
            approx = (rounded.a16[chunk_rows] @ b_sorted[:width].T).float()
            # 2 - (cos + its bound) - u - v <= the exact reduced cost.
            reduced = rounded.bounds(approx, chunk_rows).add_(approx).neg_().add_(2.0)
            reduced -= u32[chunk_rows][:, None]
            reduced -= v_sorted[None, :width]
            beyond = torch.as_tensor(prefix[chunk])[:, None] <= torch.arange(width)[None, :]
            reduced.masked_fill_(beyond, math.inf)  # outside this row's prefix: provably >= 0
            _price_block(reduced, chunk, order, candidates, position, add_per_row, pricing, found)
            bar.update(len(chunk))
            start += block
        bar.close()
    new_rows, new_cols = np.concatenate(found[0]), np.concatenate(found[1])
    pairs = np.unique(new_rows * n_cols + new_cols)
    pricing.rows, pricing.cols = pairs // n_cols, pairs % n_cols
    pricing.before = np.minimum(pricing.before, 0.0)
    return pricing


def sparse_assignment(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    k: int = 32,
    max_rounds: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Assignment:
    """Optimal (or gap-bounded) assignment of rows of ``a`` to rows of ``b``, len(a) <= len(b)."""
    n_rows, n_cols = len(a), len(b)
    k = min(k, n_cols)
    rounded = _Rounded.of(a, b)
    top_cols, top_cos, threshold, row_max, col_max = _candidates(a, b, k, progress, rounded)
    rng = np.random.default_rng(seed)
    fallback = rng.permutation(n_cols)[:n_rows]
    parts = [
        (np.repeat(np.arange(n_rows), k), top_cols.reshape(-1), top_cos.reshape(-1)),
        (np.arange(n_rows), fallback, pair_cosines(a, b, np.arange(n_rows), fallback)),
    ]
    weak = _weak_edges(a, b, top_cos.max(1), col_max, k)
    if weak is not None:
        parts.append(weak)
    all_rows, all_cols, all_cos = (np.concatenate(column) for column in zip(*parts, strict=True))
    edge_rows, edge_cols, edge_cos = _unique_edges(all_rows, all_cols, all_cos, n_cols)
    upper_bound = float(np.maximum(row_max, threshold).sum())

    if n_rows < n_cols:
        return _sparse_rectangular(
            a, b, rounded, threshold, (edge_rows, edge_cols, edge_cos), k, max_rounds, progress
        ) or _gap_bounded(a, b, edge_rows, edge_cols, edge_cos, upper_bound)

    duals: tuple[np.ndarray, np.ndarray, int] | None = None
    rows = cols = None
    previous_v: np.ndarray | None = None
    after = after_floor = np.zeros(n_rows)
    gap: float | None = None
    rounds = 0
    while True:
        rounds += 1
        before, duals = duals, None
        previous = before[0] if before is not None else None
        cost = 2.0 - edge_cos
        if cols is not None and before is not None:
            # Few rows with violating edges: re-match just those (shortest
            # augmenting paths) instead of solving the whole problem again.
            u, v, _ = before
            repaired = _repair(n_rows, edge_rows, edge_cols, cost, cols, u, v, REPAIR_MAX_ROWS)
            if repaired is not None:
                cols = repaired
                duals = _duals(n_rows, edge_rows, edge_cols, cost, cols, previous)
        if duals is None:
            rows, cols = _solve(n_rows, n_cols, edge_rows, edge_cols, edge_cos)
            duals = _duals(n_rows, edge_rows, edge_cols, cost, cols, previous)
        if duals is None:
            break  # potentials did not settle: the gap comes from the upper bound below
        u, v, _ = duals
        if previous_v is None:
            pricing = _price(rounded, u, v, threshold, edge_rows, edge_cols, k, progress)
        else:
            # Only rows left with violators, and columns whose potential rose, can
            # hold a negative reduced cost that the last pricing did not see.
            raised = np.nonzero(v > previous_v + 1e-12)[0]
            unfinished = np.nonzero(after < 0)[0]
            pricing = _price(
                rounded,
                u,
                v,
                threshold,
                edge_rows,
                edge_cols,
                k,
                progress,
                rows=unfinished,
                raised=raised,
            )
            pricing.before = np.minimum(pricing.before, np.minimum(after_floor, 0.0))
        logger.info(
            "align round %d: %d violations, %d edges to add",
            rounds,
            pricing.violations,
            len(pricing.rows),
        )
        round_gap = float(-pricing.before.sum())
        gap = round_gap if gap is None else min(gap, round_gap)
        if pricing.violations == 0:
            gap = 0.0  # every edge outside the candidates has reduced cost >= 0
            break
        if rounds >= max_rounds:
            break
        previous_v = v
        after = pricing.after
        after_floor = np.where(np.isfinite(after), after, 0.0)
        edge_rows, edge_cols, edge_cos = _add_priced(
            a, b, (edge_rows, edge_cols, edge_cos), pricing
        )
    assert rows is not None and cols is not None
    cosine = pair_cosines(a, b, rows, cols, exact=True)
    if duals is None and gap is None:
        gap = max(0.0, upper_bound - float(cosine.sum()))
    return Assignment(rows, cols, cosine, "sparse", gap == 0.0, gap, rounds)


def _gap_bounded(
    a: torch.Tensor,
    b: torch.Tensor,
    edge_rows: np.ndarray,
    edge_cols: np.ndarray,
    edge_cos: np.ndarray,
    upper_bound: float,
) -> Assignment:
    """The candidate graph's optimum, with the gap to the sum of each row's best cosine."""
    rows, cols = _solve(len(a), len(b), edge_rows, edge_cols, edge_cos)
    cosine = pair_cosines(a, b, rows, cols, exact=True)
    return Assignment(
        rows, cols, cosine, "sparse", False, max(0.0, upper_bound - float(cosine.sum()))
    )


def _sparse_rectangular(
    a: torch.Tensor,
    b: torch.Tensor,
    rounded: _Rounded,
    threshold: np.ndarray,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
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
    edge_rows, edge_cols, edge_cos = edges
    for round_ in range(1, max_rounds + 1):
        _, cols = _solve(n_rows, n_cols, edge_rows, edge_cols, edge_cos)
        free = np.ones(n_cols, dtype=bool)
        free[cols] = False
        free_cols = np.flatnonzero(free)
        free_k = min(k, len(free_cols))
        top, top_cos, free_threshold, _, _ = _candidates(
            a, b[torch.as_tensor(free_cols)], free_k, progress, desc="align: unmatched columns"
        )
        edge_rows, edge_cols, edge_cos = _add_edges(
            (edge_rows, edge_cols, edge_cos),
            np.repeat(np.arange(n_rows), free_k),
            free_cols[top.reshape(-1)],
            top_cos.reshape(-1),
            n_cols,
        )
        cost = 2.0 - edge_cos
        # u_i <= 2 - cos_ij for every unmatched j: its edges exactly, the rest by the cap.
        initial = 2.0 - free_threshold if free_k < len(free_cols) else np.full(n_rows, np.inf)
        to_free = free[edge_cols]
        np.minimum.at(initial, edge_rows[to_free], cost[to_free])
        duals = _duals(n_rows, edge_rows, edge_cols, cost, cols, initial, n_cols=n_cols)
        if duals is None:
            continue
        u, v, _ = duals
        # v_j <= 0 on matched columns (a small float tolerance, as for the edges).
        if (v[cols] > 1e-12).any() or not np.isfinite(u).all():
            logger.info("align round %d (rectangular): potentials not yet feasible", round_)
            continue  # the new edges to unmatched columns change the optimum: solve again
        pricing = _price(rounded, u, v, threshold, edge_rows, edge_cols, k, progress, columns=cols)
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
        edge_rows, edge_cols, edge_cos = _add_priced(
            a, b, (edge_rows, edge_cols, edge_cos), pricing
        )
    return None


def _weak_edges(
    a: torch.Tensor, b: torch.Tensor, row_best: np.ndarray, col_max: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Top-k edges among the weak rows and weak columns (no cosine above `WEAK`).

    A row whose partner is missing (a feature new to one dictionary) must be
    matched to some other unclaimed column, and its global top-k columns are
    mostly claimed by strong pairs. Its best edges among the weak columns are
    what the optimum uses; finding them here, on a submatrix far smaller than
    the whole, saves the pricing rounds that would otherwise discover them.
    Only a speed-up: optimality is still proven by pricing.
    """
    weak_rows = np.nonzero(row_best < WEAK)[0]
    weak_cols = np.nonzero(col_max < WEAK)[0]
    if not 0 < len(weak_rows) <= len(a) // 2 or len(weak_cols) < len(weak_rows):
        return None
    sub_k = min(k, len(weak_cols))
    cols, cos, _, _, _ = _candidates(a[weak_rows], b[weak_cols], sub_k, progress=False)
    return np.repeat(weak_rows, sub_k), weak_cols[cols.reshape(-1)], cos.reshape(-1)


def _unique_edges(
    rows: np.ndarray, cols: np.ndarray, cos: np.ndarray, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges sorted by (row, col) with duplicates dropped."""
    keys, first = np.unique(rows.astype(np.int64) * n_cols + cols, return_index=True)
    return keys // n_cols, keys % n_cols, cos[first]


def _add_edges(
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
    rows: np.ndarray,
    cols: np.ndarray,
    cos: np.ndarray,
    n_cols: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edge set with these edges joined, sorted by (row, col), duplicates dropped."""
    return _unique_edges(
        np.concatenate([edges[0], rows]),
        np.concatenate([edges[1], cols]),
        np.concatenate([edges[2], cos]),
        n_cols,
    )


def _add_priced(
    a: torch.Tensor,
    b: torch.Tensor,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray],
    pricing: _Pricing,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edge set with the edges pricing found, at their float32 cosines."""
    cos = pair_cosines(a, b, pricing.rows, pricing.cols)
    return _add_edges(edges, pricing.rows, pricing.cols, cos, len(b))
