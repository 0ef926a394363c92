"""Maximum-cosine one-to-one matching of unit vectors: dense and sparse solvers.

Dense (`result.dense_assignment`): SciPy's ``linear_sum_assignment`` on the
full cosine matrix (8 n² bytes).

Sparse (`sparse.sparse_assignment`), for dictionaries too large for that:

1. candidates (`candidates`): the cosine matrix is computed block by block
   (bfloat16 matmul, never held whole) and each row keeps its top-k columns;
   the exact float32 cosines of those edges are then recomputed. A rigorous
   per-row bound on the bf16 error (`bound.bf16_error`) bounds every other
   column's cosine. A random permutation of fallback edges guarantees a full
   matching exists. Rows and columns with no strong partner (a feature new to
   one dictionary) also get their top-k edges among each other
   (`candidates.weak_edges`), where the optimum matches them. The candidate
   graph is an `edges.Edges`: sorted by row, then column, and de-duplicated.
2. solve: SciPy's ``min_weight_full_bipartite_matching`` (LAPJVsp) on the
   candidate graph with row-reduced costs ``1 + max_j cos_ij - cos_ij``
   (`edges.solve`).
3. certify: dual potentials of the sparse optimum come from Bellman-Ford on the
   matching's residual graph, started from ``u_i = -cos(i, match)``
   (`duals.potentials`). A row is certified when no edge outside the candidate
   set can have negative reduced cost: first by its top-k threshold (cheap),
   otherwise by a pricing pass over that row with bf16 cosines and their error
   bound, a lower bound on every reduced cost (`pricing`). Edges whose bound is
   below a margin are added (column generation); rows with a violating edge are
   then re-matched by shortest augmenting paths from the current potentials
   (`duals.repair`), or, when there are many, the problem is solved again
   (`square`). When every row is certified, the matching is provably optimal;
   otherwise the last pricing gives a bound on the gap to the optimum. With
   more columns than rows, the unmatched columns constrain the duals too
   (`rectangular`).

Example:
    >>> import torch
    >>> a = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    >>> dense_assignment(a, a[torch.arange(49, -1, -1)]).cols[:3].tolist()
    [49, 48, 47]
"""

from .edges import Edges, pair_cosines
from .result import Assignment, dense_assignment
from .sparse import sparse_assignment

__all__ = ["Assignment", "Edges", "dense_assignment", "pair_cosines", "sparse_assignment"]
