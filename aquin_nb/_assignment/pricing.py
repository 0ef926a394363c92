"""Pricing: proving that no edge outside the candidates could improve the matching.

Given potentials (u, v) that certify the matching on the candidate edges, the
matching is optimal over every edge when no edge outside the candidates has a
negative reduced cost ``2 - cos_ij - u_i - v_j``. Pricing bounds those reduced
costs from below with bf16 cosines and their error bound, and returns the edges
whose bound is negative or nearly so, to be added to the candidates (column
generation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .bound import Rounded, row_block
from .edges import Edges

# float32 dot products of unit vectors in d <= 16k dimensions.
FP32_ERROR = 1e-5
NEAR_MARGIN = 0.02


@dataclass
class Pricing:
    """One pricing pass: edges to add, and per row a lower bound on the reduced cost
    of every edge outside the candidate set. ``before`` counts the edges being
    added (for this round's gap bound); ``after`` leaves them out (rows with
    ``after < 0`` still have violating edges and must be priced in full again)."""

    rows: np.ndarray
    cols: np.ndarray
    before: np.ndarray
    after: np.ndarray
    violations: int = 0


def _price_block(
    reduced: torch.Tensor,
    chunk: np.ndarray,
    column_ids: np.ndarray,
    candidates: tuple[np.ndarray, np.ndarray],
    column_position: np.ndarray,
    add_per_row: int,
    pricing: Pricing,
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


def price(
    rounded: Rounded,
    u: np.ndarray,
    v: np.ndarray,
    threshold: np.ndarray,
    edges: Edges,
    add_per_row: int,
    progress: bool,
    rows: np.ndarray | None = None,
    raised: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> Pricing:
    """Lower bounds on the reduced costs ``2 - cos_ij - u_i - v_j`` of edges outside
    the candidate set: bf16 cosines (AMX matmuls on CPUs that have them, about 4x
    float32) plus their rigorous error bound (`bf16_error`, ≈ 0.005). An edge
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
    pricing = Pricing(
        np.empty(0, np.int64), np.empty(0, np.int64), np.zeros(n_rows), np.zeros(n_rows)
    )
    # Edges are sorted by row: each row's candidate columns are one run.
    candidates = (edges.cols, edges.row_starts(n_rows))
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
            first_guess = min(row_block(int(prefix[to_price[start]])), remaining)
            # Rows are sorted by prefix length, so the guess's last row bounds the width.
            block = min(row_block(int(prefix[to_price[start + first_guess - 1]])), remaining)
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
