"""Maximum-cosine one-to-one matching of unit vectors: dense and sparse solvers.

Dense: SciPy's ``linear_sum_assignment`` on the full cosine matrix (8 n² bytes).

Sparse, for dictionaries too large for that:

1. candidates: the cosine matrix is computed block by block (bfloat16 matmul,
   never held whole) and each row keeps its top-k columns; the exact float32
   cosines of those edges are then recomputed. A random permutation of
   fallback edges guarantees a full matching exists. Rows and columns with no
   strong partner (a feature new to one dictionary) also get their top-k edges
   among each other (`_weak_edges`), where the optimum matches them.
2. solve: SciPy's ``min_weight_full_bipartite_matching`` (LAPJVsp) on the
   candidate graph with costs ``2 - cos``.
3. certify: dual potentials of the sparse optimum come from Bellman-Ford on the
   matching's residual graph, started from ``u_i = -cos(i, match)``. A row is
   certified when no edge outside the candidate set can have negative reduced
   cost: first by its top-k threshold (cheap), otherwise by an exact float32
   pricing pass over that row. Edges the pricing finds are added (column
   generation); when warm-started potentials of the same matching settle on the
   larger graph, the matching is still optimal there and is priced again as it
   is, otherwise the problem is solved again. When every row is certified, the
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

# |cos_bf16 - cos_fp32| for unit vectors: inputs rounded to 8-bit mantissas
# (relative error 2^-9 each, summed over |a_k b_k| <= 1) plus the rounding of the
# bf16 output; 0.01 is a safe margin on both.
BF16_ERROR = 0.01
# float32 dot products of unit vectors in d <= 16k dimensions.
FP32_ERROR = 1e-5
NEAR_MARGIN = 0.02
# Warm-started potentials of a still-optimal matching settle in a few sweeps; a
# negative cycle never does, so a trial gives up after this many (about 4 ms
# each at n = 16k) and solves again.
TRIAL_SWEEPS = 48
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


def _candidates(
    a: torch.Tensor, b: torch.Tensor, k: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-k columns per row (bf16 blockwise), their float32 cosines, per row the
    bound on any other column's cosine and on the row's maximum, and per column
    its largest cosine among the kept edges."""
    n_rows, n_cols = len(a), len(b)
    a16, b16_t = a.to(torch.bfloat16), b.to(torch.bfloat16).T.contiguous()
    block = _row_block(n_cols)
    cols = np.empty((n_rows, k), dtype=np.int64)
    exact = np.empty((n_rows, k), dtype=np.float64)
    threshold = np.empty(n_rows, dtype=np.float64)
    row_max = np.empty(n_rows, dtype=np.float64)
    bar = tqdm(total=n_rows, desc="align: candidates", disable=not progress, unit="row")
    for start in range(0, n_rows, block):
        values, index = (a16[start : start + block] @ b16_t).topk(k, dim=1)
        cols[start : start + block] = index.numpy()
        # float32 cosines of the kept edges: batch matmuls over gathered columns,
        # 64 rows at a time so the gathered rows stay in cache.
        block_rows = a[start : start + len(index), :, None]
        for sub in range(0, len(index), 64):
            exact[start + sub : start + sub + len(index[sub : sub + 64])] = (
                torch.bmm(b[index[sub : sub + 64]], block_rows[sub : sub + 64])
                .squeeze(2)
                .double()
                .numpy()
            )
        # Any column outside the top-k has cosine <= the k-th value (+ bf16 error).
        threshold[start : start + block] = values[:, -1].double().numpy() + BF16_ERROR
        row_max[start : start + block] = values[:, 0].double().numpy() + BF16_ERROR
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

    graph = sp.csr_matrix((2.0 - cos, (rows, cols)), shape=(n_rows, n_cols))
    return min_weight_full_bipartite_matching(graph)


def _duals(
    n: int,
    edge_rows: np.ndarray,
    edge_cols: np.ndarray,
    edge_cost: np.ndarray,
    match_col: np.ndarray,
    initial: np.ndarray | None = None,
    max_sweeps: int = 100_000,
    quiet: bool = False,
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Potentials (u, v) with u_i + v_j <= cost_ij on every edge and equality on the matching.

    With v_j = cost(r(j), j) - u_r(j), each edge gives the difference constraint
    u_i <= u_r(j) + cost_ij - cost(r(j), j); their shortest-path solution
    (Bellman-Ford, only re-relaxing edges whose source moved) exists because the
    matching is optimal on these edges. Returns (u, v, sweeps), or None if it does
    not settle within ``max_sweeps`` (a negative cycle: the matching is not optimal).
    """
    row_of_col = np.empty(n, dtype=np.int64)
    row_of_col[match_col] = np.arange(n)
    matched_cost = np.empty(n, dtype=np.float64)
    on_match = match_col[edge_rows] == edge_cols
    matched_cost[edge_cols[on_match]] = edge_cost[on_match]
    source = row_of_col[edge_cols]
    keep = source != edge_rows
    source, target = source[keep], edge_rows[keep]
    weight = edge_cost[keep] - matched_cost[edge_cols[keep]]
    # Bellman-Ford from any start gives the largest solution below it. The first
    # round starts from u_i = -cos(i, match) (every v_j = 2): a strong pair's row
    # then sits far below a weak pair's, which leaves the edges outside the
    # candidates (strong rows to weak columns) with slack, not violations, when
    # they are priced. Later rounds start from the previous potentials, close to
    # the solution, so far fewer edges need relaxing.
    if initial is None:
        row_of_edge_on_match = edge_rows[on_match]
        u = np.zeros(n)
        u[row_of_edge_on_match] = edge_cost[on_match] - 2.0
    else:
        u = initial.copy()
    moved = np.ones(n, dtype=bool)
    for sweep in range(max_sweeps):
        active = moved[source]
        if not active.any():
            v = matched_cost - u[row_of_col]
            logger.debug("dual potentials settled in %d sweeps", sweep)
            return u, v, sweep
        candidate = u[source[active]] + weight[active]
        new_u = u.copy()
        np.minimum.at(new_u, target[active], candidate)
        moved = new_u < u - 1e-12
        u = new_u
    if not quiet:
        logger.warning("dual potentials did not settle; the result carries only a gap bound")
    return None


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
    a: torch.Tensor,
    b: torch.Tensor,
    u: np.ndarray,
    v: np.ndarray,
    threshold: np.ndarray,
    edge_rows: np.ndarray,
    edge_cols: np.ndarray,
    add_per_row: int,
    progress: bool,
    rows: np.ndarray | None = None,
    raised: np.ndarray | None = None,
) -> _Pricing:
    """Exact reduced costs ``2 - cos_ij - u_i - v_j`` of edges outside the candidate set.

    Full pricing (``rows``, all rows by default): outside its candidates row i has
    ``cos_ij <= threshold_i``, so only columns with ``v_j > 2 - u_i - threshold_i``
    can have a negative reduced cost; sorting the columns by ``v`` makes those a
    prefix, and each row is priced against its prefix only. ``raised``: every row
    against those columns only. Between rounds the potentials only fall for rows
    (warm-started Bellman-Ford), so an edge certified earlier can only have lost
    its certificate through a column whose potential rose.
    """
    n_rows, n_cols = len(a), len(b)
    pricing = _Pricing(
        np.empty(0, np.int64), np.empty(0, np.int64), np.zeros(n_rows), np.zeros(n_rows)
    )
    candidates = _candidate_index(edge_rows, edge_cols, n_rows)
    found: tuple[list, list] = ([np.empty(0, np.int64)], [np.empty(0, np.int64)])
    u32 = torch.as_tensor(u, dtype=torch.float32)
    limit = 2.0 - u - threshold
    passes = [(np.arange(n_rows) if rows is None else rows, np.arange(n_cols))]
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
        b_sorted = b[torch.as_tensor(order)]
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
            reduced = 2.0 - a[torch.as_tensor(chunk)] @ b_sorted[:width].T
            reduced -= u32[torch.as_tensor(chunk)][:, None]
            reduced -= v_sorted[None, :width]
            beyond = torch.as_tensor(prefix[chunk])[:, None] <= torch.arange(width)[None, :]
            reduced[beyond] = math.inf  # outside this row's prefix: provably >= 0
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
    top_cols, top_cos, threshold, row_max, col_max = _candidates(a, b, k, progress)
    rng = np.random.default_rng(seed)
    fallback = rng.permutation(n_cols)[:n_rows]
    edge_rows = np.concatenate([np.repeat(np.arange(n_rows), k), np.arange(n_rows)])
    edge_cols = np.concatenate([top_cols.reshape(-1), fallback])
    edge_cos = np.concatenate(
        [top_cos.reshape(-1), pair_cosines(a, b, np.arange(n_rows), fallback)]
    )
    weak = _weak_edges(a, b, row_max, col_max, k)
    if weak is not None:
        edge_rows = np.concatenate([edge_rows, weak[0]])
        edge_cols = np.concatenate([edge_cols, weak[1]])
        edge_cos = np.concatenate([edge_cos, weak[2]])
    edge_rows, edge_cols, edge_cos = _unique_edges(edge_rows, edge_cols, edge_cos, n_cols)
    upper_bound = float(np.maximum(row_max, threshold).sum())

    square = n_rows == n_cols
    duals: tuple[np.ndarray, np.ndarray, int] | None = None
    rows = cols = None
    previous_v: np.ndarray | None = None
    after = after_floor = np.zeros(n_rows)
    gap: float | None = None
    rounds = 0
    while True:
        rounds += 1
        previous = duals[0] if duals is not None else None
        duals = None
        if square and cols is not None:
            # The edges pricing added may leave the matching optimal (violations
            # are often artefacts of the duals): then warm-started potentials
            # settle, and no new solve is needed. A negative cycle never settles.
            duals = _duals(
                n_rows,
                edge_rows,
                edge_cols,
                2.0 - edge_cos,
                cols,
                previous,
                max_sweeps=TRIAL_SWEEPS,
                quiet=True,
            )
        if duals is None:
            rows, cols = _solve(n_rows, n_cols, edge_rows, edge_cols, edge_cos)
            duals = (
                _duals(n_rows, edge_rows, edge_cols, 2.0 - edge_cos, cols, previous)
                if square
                else None
            )
        if duals is None:
            break  # rectangular: the gap comes from the upper bound below
        u, v, _ = duals
        if previous_v is None:
            pricing = _price(a, b, u, v, threshold, edge_rows, edge_cols, k, progress)
        else:
            # Only rows left with violators, and columns whose potential rose, can
            # hold a negative reduced cost that the last pricing did not see.
            raised = np.nonzero(v > previous_v + 1e-12)[0]
            unfinished = np.nonzero(after < 0)[0]
            pricing = _price(
                a,
                b,
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
        edge_rows = np.concatenate([edge_rows, pricing.rows])
        edge_cols = np.concatenate([edge_cols, pricing.cols])
        edge_cos = np.concatenate([edge_cos, pair_cosines(a, b, pricing.rows, pricing.cols)])
        edge_rows, edge_cols, edge_cos = _unique_edges(edge_rows, edge_cols, edge_cos, n_cols)
    assert rows is not None and cols is not None
    cosine = pair_cosines(a, b, rows, cols, exact=True)
    if duals is None and gap is None:
        gap = max(0.0, upper_bound - float(cosine.sum()))
    return Assignment(rows, cols, cosine, "sparse", gap == 0.0, gap, rounds)


def _weak_edges(
    a: torch.Tensor, b: torch.Tensor, row_max: np.ndarray, col_max: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Top-k edges among the weak rows and weak columns (no cosine above `WEAK`).

    A row whose partner is missing (a feature new to one dictionary) must be
    matched to some other unclaimed column, and its global top-k columns are
    mostly claimed by strong pairs. Its best edges among the weak columns are
    what the optimum uses; finding them here, on a submatrix far smaller than
    the whole, saves the pricing rounds that would otherwise discover them.
    Only a speed-up: optimality is still proven by pricing.
    """
    weak_rows = np.nonzero(row_max - BF16_ERROR < WEAK)[0]
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
