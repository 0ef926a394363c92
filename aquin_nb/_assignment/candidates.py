"""The first candidate graph: each row's top-k columns, a fallback matching, weak edges.

The cosine matrix is computed block by block (bfloat16 matmul, never held
whole) and each row keeps its top-k columns; the exact float32 cosines of those
edges are then recomputed. The bf16 error bound (`bound`) turns each row's k-th
value into a bound on every other column's cosine, which is what lets pricing
skip most of the matrix. A random permutation of fallback edges guarantees a
full matching exists. Rows and columns with no strong partner (a feature new
to one dictionary) also get their top-k edges among each other
(`weak_edges`), where the optimum matches them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .bound import BF16_OUTPUT, Rounded, row_block
from .edges import Edges, pair_cosines

# A row or column with no cosine above this has no clear partner (see weak_edges).
WEAK = 0.5


class TopK(NamedTuple):
    """Each row's top-k columns and what they bound about the rest of the row."""

    cols: np.ndarray  # [rows, k] column indices, best first (by bf16 cosine)
    cos: np.ndarray  # [rows, k] their float32 cosines, as float64
    threshold: np.ndarray  # per row, a bound on the cosine of any column outside its top k
    row_max: np.ndarray  # per row, a bound on its largest cosine
    col_max: np.ndarray  # per column, its largest cosine among the kept edges


def top_k(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    progress: bool,
    rounded: Rounded | None = None,
    desc: str = "align: candidates",
) -> TopK:
    """Top-k columns per row (bf16 blockwise), their float32 cosines, per row a
    bound on any other column's cosine and on the row's maximum, and per column
    its largest cosine among the kept edges."""
    n_rows, n_cols = len(a), len(b)
    rounded = rounded or Rounded.of(a, b)
    a16, input_error = rounded.a16, rounded.error
    b16_t = rounded.b16.T  # a transposed view multiplies as fast as a copy
    block = row_block(n_cols)
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
    # which is all `weak_edges` needs; a reduction over every block costs as much
    # as the top-k itself).
    col_max = np.full(n_cols, -np.inf)
    np.maximum.at(col_max, cols.reshape(-1), exact.reshape(-1))
    return TopK(cols, exact, threshold, row_max, col_max)


def weak_edges(
    a: torch.Tensor, b: torch.Tensor, row_best: np.ndarray, col_max: np.ndarray, k: int
) -> Edges | None:
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
    sub = top_k(a[weak_rows], b[weak_cols], sub_k, progress=False)
    return Edges.of(
        np.repeat(weak_rows, sub_k), weak_cols[sub.cols.reshape(-1)], sub.cos.reshape(-1), len(b)
    )


def initial_edges(
    a: torch.Tensor, b: torch.Tensor, top: TopK, weak: Edges | None, seed: int
) -> Edges:
    """Every row's top-k edges, a random fallback matching, and the weak edges."""
    n_rows, n_cols = len(a), len(b)
    k = top.cols.shape[1]
    fallback = np.random.default_rng(seed).permutation(n_cols)[:n_rows]
    rows = [np.repeat(np.arange(n_rows), k), np.arange(n_rows)]
    cols = [top.cols.reshape(-1), fallback]
    cos = [top.cos.reshape(-1), pair_cosines(a, b, np.arange(n_rows), fallback)]
    if weak is not None:
        # After the others: an edge found twice keeps its top-k cosine.
        rows.append(weak.rows)
        cols.append(weak.cols)
        cos.append(weak.cos)
    return Edges.of(np.concatenate(rows), np.concatenate(cols), np.concatenate(cos), n_cols)
