"""Edge sets of the candidate graph, and the matching optimal on one.

Bellman-Ford (`duals`), repair and pricing read each row's edges as one
contiguous run, so an edge set is always sorted by (row, column) with no
duplicate: `Edges` is built sorted (`Edges.of`), merged into a new sorted set
(`Edges.join`), and rejects unsorted arrays, so no consumer has to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Edges:
    """Edges (rows[e], cols[e]) with cosine cos[e], sorted by row then column, unique.

    Example:
        >>> import numpy as np
        >>> edges = Edges.of(np.array([1, 0, 1]), np.array([0, 2, 0]), np.array([0.5, 0.9, 0.1]), 3)
        >>> edges.rows.tolist(), edges.cols.tolist(), edges.cos.tolist()
        ([0, 1], [2, 0], [0.9, 0.5])
    """

    rows: np.ndarray  # int64
    cols: np.ndarray  # int64
    cos: np.ndarray  # float64

    def __post_init__(self) -> None:
        # O(edges), once per edge set: far less than the sort that made it.
        rows, cols = self.rows, self.cols
        if not len(rows) == len(cols) == len(self.cos):
            raise ValueError(
                f"edges need one row, column and cosine each, got "
                f"{len(rows)}, {len(cols)} and {len(self.cos)}"
            )
        if len(rows) > 1:
            same_row = rows[1:] == rows[:-1]
            ordered = (rows[1:] > rows[:-1]) | (same_row & (cols[1:] > cols[:-1]))
            if not bool(ordered.all()):
                raise ValueError(
                    "edges must be sorted by row (then column) without duplicates: "
                    "build them with Edges.of"
                )

    @classmethod
    def of(cls, rows: np.ndarray, cols: np.ndarray, cos: np.ndarray, n_cols: int) -> Edges:
        """These edges sorted by (row, col), each duplicate keeping its first cosine."""
        keys, first = np.unique(rows.astype(np.int64) * n_cols + cols, return_index=True)
        return cls(keys // n_cols, keys % n_cols, cos[first])

    def join(self, rows: np.ndarray, cols: np.ndarray, cos: np.ndarray, n_cols: int) -> Edges:
        """This edge set with these edges joined; an edge already here keeps its cosine."""
        return Edges.of(
            np.concatenate([self.rows, rows]),
            np.concatenate([self.cols, cols]),
            np.concatenate([self.cos, cos]),
            n_cols,
        )

    def join_pairs(
        self, a: torch.Tensor, b: torch.Tensor, rows: np.ndarray, cols: np.ndarray
    ) -> Edges:
        """This edge set with the pairs (rows, cols) of ``a`` and ``b`` joined at their
        float32 cosines (as pricing adds them)."""
        return self.join(rows, cols, pair_cosines(a, b, rows, cols), len(b))

    @cached_property
    def cost(self) -> np.ndarray:
        """Per edge, the cost minimised: ``2 - cos`` (positive, like the potentials' start)."""
        return 2.0 - self.cos

    def row_starts(self, n_rows: int) -> np.ndarray:
        """CSR row pointer: row i's edges are ``rows[starts[i]:starts[i + 1]]``."""
        return np.searchsorted(self.rows, np.arange(n_rows + 1))

    def __len__(self) -> int:
        return len(self.rows)


def solve(n_rows: int, n_cols: int, edges: Edges) -> tuple[np.ndarray, np.ndarray]:
    """The maximum-cosine matching of every row on these edges (SciPy's LAPJVsp)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    # Row-reduced costs (a constant per row does not change which matching is
    # optimal): LAPJVsp only reduces columns itself, and starting from reduced
    # rows it solves 16k random rows 3x faster. The +1 keeps every cost nonzero.
    row_best = np.full(n_rows, -np.inf)
    np.maximum.at(row_best, edges.rows, edges.cos)
    graph = sp.csr_matrix(
        (1.0 + row_best[edges.rows] - edges.cos, (edges.rows, edges.cols)),
        shape=(n_rows, n_cols),
    )
    return min_weight_full_bipartite_matching(graph)


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
