"""Which decoder directions did the fine-tune push? A sparse, signed decomposition of the shift.

Ranking features by |Δ| answers "which features read differently". It does not
answer "which direction did the fine-tune push": a feature whose direction is
added to the residual stream may sit below its threshold on most tokens, so its
mean activation barely moves while features that read the direction negatively
drop. So `sae_diff` also decomposes the mean residual-stream shift at the SAE's
hook over the SAE's unit decoder directions.

**Method: orthogonal matching pursuit** (`pursuit`; the picks of scikit-learn's
``orthogonal_mp``, without its ``d_sae × d_sae`` path array), over
the per-prompt mean shifts (checkpoint − base, BOS and padding excluded):

1. OMP on the mean shift over prompts (each prompt weighted equally) picks at
   most `MAX_ATOMS` decoder directions greedily, stopping early once they
   explain 99.9% of the shift's squared norm;
2. every prompt's shift is then fitted by least squares on that support, so
   each chosen feature gets one coefficient per prompt; their mean is its
   ``shift`` (in residual-stream units along the unit decoder direction; by
   linearity it equals OMP's coefficient), and a two-sided one-sample t-test
   across prompts gives its p-value, Benjamini–Hochberg adjusted over all
   features (``shift_q``). Features outside the support get 0 and q = 1.

Why OMP rather than the lasso: a planted direction that is exactly a decoder
row is recovered exactly, with its full coefficient and no shrinkage; there is
no penalty to tune; and the support is small and ordered by how much of the
shift each direction explains. The test is conditional on the selected support.
Memory holds one shift vector per prompt (``n_prompts × d_model`` float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_ATOMS = 32
EXPLAINED_STOP = 0.999


class ShiftStats:
    """Per-prompt sums of the residual-stream shift at the hook."""

    def __init__(self, n_prompts: int, d_model: int) -> None:
        self.sums = torch.zeros(n_prompts, d_model, dtype=torch.float64)
        self.counts = torch.zeros(n_prompts, dtype=torch.float64)

    def update(self, shift: torch.Tensor, prompt_of_token: torch.Tensor) -> None:
        """``shift`` ``[tokens, d_model]`` (checkpoint − base), each token's prompt index."""
        prompt_of_token = prompt_of_token.cpu()
        self.sums.index_add_(0, prompt_of_token, shift.double().cpu())
        self.counts.index_add_(
            0, prompt_of_token, torch.ones(len(prompt_of_token), dtype=torch.float64)
        )

    def per_prompt(self) -> np.ndarray:
        return (self.sums / self.counts.clamp_min(1)[:, None]).numpy()


@dataclass(frozen=True)
class Attribution:
    """The decomposition: per-feature ``shift`` and p-values, and how well it fits."""

    shift: np.ndarray  # [d_sae]
    p_value: np.ndarray  # [d_sae], 1 outside the support
    support: list[int]  # chosen features, in the order OMP chose them
    explained: float  # fraction of the mean shift's squared norm explained
    mean_shift: np.ndarray  # [d_model]


def attribute(per_prompt: np.ndarray, decoder: Any, max_atoms: int = MAX_ATOMS) -> Attribution:
    """Decompose the shifts ``[n_prompts, d_model]`` over ``decoder`` ``[d_sae, d_model]``."""
    from scipy.stats import ttest_1samp

    decoder = torch.as_tensor(decoder).detach()
    d_sae = int(decoder.shape[0])
    mean_shift = per_prompt.mean(0)
    total = float(mean_shift @ mean_shift)
    shift, p_value = np.zeros(d_sae), np.ones(d_sae)
    if total == 0.0:
        return Attribution(shift, p_value, [], 1.0, mean_shift)
    atoms = min(max_atoms, int(decoder.shape[1]), d_sae)
    order = pursuit(decoder, mean_shift, atoms)
    basis = _unit_rows(decoder, order).T  # [d_model, |S|]
    # torch's solver, not numpy's: OpenBLAS threads left spinning after a numpy
    # solve slow the torch products that follow by 2x on a two-core machine
    per_prompt_coefficients = torch.linalg.lstsq(
        torch.from_numpy(basis),
        torch.from_numpy(np.ascontiguousarray(per_prompt.T)),
        driver="gelsd",
    ).solution.numpy()
    shift[order] = per_prompt_coefficients.mean(1)
    spread = per_prompt_coefficients.std(1)
    varies = spread != 0.0
    chosen = np.asarray(order)
    if varies.any():  # one vectorised test for every chosen feature that varies
        tested = ttest_1samp(per_prompt_coefficients[varies], 0.0, axis=1).pvalue
        p_value[chosen[varies]] = tested
    # identical in every prompt: no doubt, unless it is zero
    p_value[chosen[~varies]] = np.where(shift[chosen[~varies]] != 0.0, 0.0, 1.0)
    residual = mean_shift - basis @ shift[order]
    explained = 1 - float(residual @ residual) / total
    return Attribution(shift, p_value, [int(f) for f in order], explained, mean_shift)


@torch.no_grad()
def pursuit(decoder: torch.Tensor, target: np.ndarray, atoms: int) -> list[int]:
    """Orthogonal matching pursuit of ``target`` over ``decoder``'s unit rows: the rows
    in the order chosen, at most ``atoms``, stopping once they explain `EXPLAINED_STOP`
    of its squared norm.

    scikit-learn's ``orthogonal_mp`` computes the same picks, but with the path it
    allocates a ``d_sae × d_sae`` float64 array (32 GiB at 65,536 features). Here
    the decoder (in its own dtype and device, never copied) is read in passes,
    each a product with a block of unit rows, and a least-squares fit on the few
    rows chosen gives the coefficients ``c``. The residual lies in the span of
    ``target`` and the chosen rows, so every row's score is ``D·target − Σ c_i D·b_i``
    (``b_i`` the chosen unit rows): exact, with no pass of its own, once ``D·b_i`` is
    known for every pick. So after the first pass (``D·target``) a cheap pursuit over
    only the `PREDICT_ROWS` rows that score highest predicts the picks
    (`_predicted_picks`), and one pass multiplies all of them. The exact pursuit then
    runs on those products. When it picks a row that was not predicted, the rest is
    predicted again from there, and one pass multiplies that row and the new
    predictions. The picks are always the exact pursuit's: a wrong prediction costs
    a pass, never a pick. On real_size.py's shifts (24,576 features, 32 picks) that
    is 3-4 passes instead of 32.
    """
    norms = decoder.norm(dim=-1).double().cpu().clamp_min(1e-12)
    wanted = torch.as_tensor(target, dtype=torch.float64)
    total = float(wanted @ wanted)
    first = _scores(decoder, wanted[None, :], norms)[:, 0]  # D·target, per unit row
    scores = first.clone()
    chosen = torch.empty(atoms, len(first), dtype=torch.float64)  # D·b_i of each pick
    multiplied: dict[int, torch.Tensor] = {}  # D·b of every row multiplied so far
    order: list[int] = []
    fit = _Projection(len(wanted), atoms, wanted)
    for _ in range(atoms):
        scores[order] = 0.0
        best = int(scores.abs().argmax())
        if float(scores[best]) == 0.0:
            break
        if not fit.add(torch.as_tensor(_unit_rows(decoder, [best]))[0]):
            break  # in the span of the picks already (as scikit-learn, stop there)
        order.append(best)
        residual, coefficients = fit.residual(), fit.coefficients()
        if 1 - float(residual @ residual) / total >= EXPLAINED_STOP or len(order) == atoms:
            break
        if best not in multiplied:  # the first pick, or a wrong prediction
            ahead = _predicted_picks(decoder, scores, wanted, order, atoms)
            rows = [best, *(row for row in ahead if row not in multiplied)]
            products = _scores(decoder, torch.as_tensor(_unit_rows(decoder, rows)), norms)
            multiplied.update(zip(rows, products.T, strict=True))
        chosen[len(order) - 1] = multiplied.pop(best)
        scores = first - coefficients @ chosen[: len(order)]
    return order


PREDICT_ROWS = 1024  # rows of the cheap pursuit that predicts the exact one's picks
DEPENDENT = 1e-6  # a unit row this close to the span of the picks (float32 rounding) adds nothing


class _Projection:
    """The least-squares fit of ``wanted`` on a growing set of rows, through a QR
    factorisation of them updated one row at a time (Gram-Schmidt, orthogonalised
    twice: as accurate as a Householder QR), so a pick costs O(d·k), not a solve."""

    def __init__(self, width: int, capacity: int, wanted: torch.Tensor) -> None:
        self.q = torch.zeros(width, capacity, dtype=torch.float64)  # orthonormal columns
        self.r = torch.zeros(capacity, capacity, dtype=torch.float64)  # upper triangular
        self.z = torch.zeros(capacity, dtype=torch.float64)  # Qᵀ·wanted
        self.wanted = wanted
        self.size = 0

    def add(self, row: torch.Tensor) -> bool:
        """Add a unit ``row``; False (and nothing added) when it lies in the span of the
        rows already added, to rounding (a dictionary of lower rank than its width)."""
        k, q = self.size, self.q[:, : self.size]
        first = q.T @ row
        column = row - q @ first
        again = q.T @ column
        column -= q @ again
        height = column.norm()
        if float(height) <= DEPENDENT:
            return False
        self.r[:k, k] = first + again
        self.r[k, k] = height
        self.q[:, k] = column / height
        self.z[k] = self.q[:, k] @ self.wanted
        self.size = k + 1
        return True

    def residual(self) -> torch.Tensor:
        return self.wanted - self.q[:, : self.size] @ self.z[: self.size]

    def coefficients(self) -> torch.Tensor:
        k = self.size
        return torch.linalg.solve_triangular(self.r[:k, :k], self.z[:k, None], upper=True)[:, 0]


def _predicted_picks(
    decoder: torch.Tensor, scores: torch.Tensor, wanted: torch.Tensor, order: list[int], atoms: int
) -> list[int]:
    """The picks after ``order`` of a pursuit of ``wanted`` over only the `PREDICT_ROWS`
    rows with the largest ``|scores|`` (every row of a decoder of at most four times
    that): the exact pursuit's next picks for as long as each lies among those rows,
    found without a pass of the decoder. Float32 is enough for a prediction; the
    residual is kept orthogonal to the picks by Gram-Schmidt."""
    ranked = scores.abs()
    ranked[order] = -1.0
    # a small decoder is predicted from every row: a pass over it is cheap, a miss
    # costs a whole new prediction
    limit = len(ranked) if len(ranked) <= 4 * PREDICT_ROWS else PREDICT_ROWS
    top = ranked.topk(min(limit, len(ranked) - len(order))).indices
    rows = decoder[top.to(decoder.device)].float().cpu()  # [rows, d_model]
    rows /= rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    spanned = torch.linalg.qr(torch.as_tensor(_unit_rows(decoder, order)).T).Q.float()
    target = wanted.float()
    residual = target - spanned @ (spanned.T @ target)
    total, picks = float(target @ target), list[int]()
    for _ in range(min(atoms - len(order), len(rows))):
        if 1 - float(residual @ residual) / total >= EXPLAINED_STOP:
            break
        candidates = (rows @ residual).abs()
        candidates[picks] = -1.0
        pick = int(candidates.argmax())
        if float(candidates[pick]) <= 0.0:  # nothing left to explain among these rows
            break
        direction = rows[pick] - spanned @ (spanned.T @ rows[pick])
        height = direction.norm()
        if float(height) <= 1e-4:  # in the span (to float32 rounding): stop
            break
        picks.append(pick)
        direction = direction / height
        spanned = torch.cat([spanned, direction[:, None]], dim=1)
        residual = residual - direction * (direction @ residual)
    return [int(top[pick]) for pick in picks]


def _scores(decoder: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``decoder``'s unit rows times ``rows`` ``[k, d_model]``: ``[d_sae, k]`` float64 on
    the CPU, the product in the decoder's dtype on its device (one pass over it)."""
    product = decoder @ rows.to(decoder.device, decoder.dtype).T
    return product.double().cpu() / norms[:, None]


def _unit_rows(decoder: torch.Tensor, rows: list[int]) -> np.ndarray:
    """``decoder``'s ``rows`` as float64 unit vectors, ``[len(rows), d_model]``."""
    chosen = decoder[torch.as_tensor(rows, dtype=torch.long, device=decoder.device)]
    chosen = chosen.double().cpu()
    return (chosen / chosen.norm(dim=-1, keepdim=True).clamp_min(1e-12)).numpy()
