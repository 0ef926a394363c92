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
    per_prompt_coefficients, *_ = np.linalg.lstsq(basis, per_prompt.T, rcond=None)
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
    known for every pick. A pass is made only when a pick has no product yet, and it
    multiplies that row and the `SPECULATE` − 1 best-scoring rows without one, the
    likeliest next picks. On real_size.py's shifts (24,576 features, 32 picks) that
    is 6-8 passes instead of 32, and a block of 16 costs about 1.6 single products.
    """
    norms = decoder.norm(dim=-1).double().cpu().clamp_min(1e-12)
    wanted = torch.as_tensor(target, dtype=torch.float64)
    total = float(wanted @ wanted)
    first = _scores(decoder, wanted[None, :], norms)[:, 0]  # D·target, per unit row
    scores = first.clone()
    chosen = torch.empty(len(first), atoms, dtype=torch.float64)  # D·b_i of the picks
    guessed: dict[int, torch.Tensor] = {}  # D·b of the last pass's guesses
    order: list[int] = []
    for _ in range(atoms):
        scores[order] = 0.0
        best = int(scores.abs().argmax())
        if float(scores[best]) == 0.0:
            break
        order.append(best)
        basis = torch.as_tensor(_unit_rows(decoder, order))  # [|S|, d_model]
        coefficients = torch.linalg.lstsq(basis.T, wanted[:, None]).solution[:, 0]
        residual = wanted - basis.T @ coefficients
        if 1 - float(residual @ residual) / total >= EXPLAINED_STOP or len(order) == atoms:
            break
        if best not in guessed:
            ranked = scores.abs()
            ranked[order] = -1.0
            guesses = [best, *(int(j) for j in ranked.topk(SPECULATE).indices if j != best)]
            guesses = guesses[:SPECULATE]
            products = _scores(decoder, torch.as_tensor(_unit_rows(decoder, guesses)), norms)
            guessed = dict(zip(guesses, products.T, strict=True))
        chosen[:, len(order) - 1] = guessed.pop(best)
        scores = first - chosen[:, : len(order)] @ coefficients
    return order


SPECULATE = 16  # rows multiplied per pass of the decoder in `pursuit`


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
