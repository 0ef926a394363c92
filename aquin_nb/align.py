"""``sae_align``: one-to-one matching of two SAEs' decoder directions.

Example:
    >>> import aquin_nb
    >>> align = aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=128, progress=False)
    >>> align.summary["optimal"], round(align.summary["mean_cosine"], 3)  # a dictionary vs itself
    (True, 1.0)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from ._assignment import Assignment, dense_assignment, sparse_assignment
from ._errors import AquinError
from ._quiet import quiet_unless_progress
from ._verbs import verb
from .results import PAIR_COLUMNS, UNMATCHED_COLUMNS, SaeAlign
from .saes import load_sae

logger = logging.getLogger(__name__)

__all__ = ["PAIR_COLUMNS", "UNMATCHED_COLUMNS", "SaeAlign", "sae_align"]

# Beyond this many cells the sparse path (proven optimal, square or not) beats
# SciPy dense: 2-6x at 4096 x 4096, about even at 1024 x 1024 (README figures).
DENSE_MAX_CELLS = 1024 * 1024
# The unrelated-dictionary baseline is solved exactly (dense) up to this size.
BASELINE_EXACT_CELLS = 4096 * 4096
BASELINE_SIDE = 4096
BASELINE_SEED = 1234


def select_features(sae: Any, max_features: int | None, frequencies: Any = None) -> np.ndarray:
    """Which features to align when ``max_features`` caps them.

    By firing frequency when ``frequencies`` is given (the most frequent first),
    otherwise by the feature's gain ``||W_dec[i]|| * ||W_enc[:, i]||`` (the most
    strongly read-and-written first; for unit-norm decoders, the encoder norm).
    Dead features (zero decoder rows) go last either way. Returns sorted indices.
    """
    n = int(sae.W_dec.shape[0])
    if max_features is None or max_features >= n:
        return np.arange(n)
    if max_features < 1:
        raise AquinError(f"max_features must be at least 1, got {max_features}")
    if frequencies is not None:
        score = np.asarray(frequencies, dtype=np.float64)
        if score.shape != (n,):
            raise AquinError(f"frequencies has shape {score.shape}, expected ({n},)")
    else:
        with torch.no_grad():
            score = (sae.W_dec.norm(dim=1) * sae.W_enc.norm(dim=0)).double().cpu().numpy()
    chosen = np.argsort(-score, kind="stable")[:max_features]
    return np.sort(chosen)


def _hook(sae: Any) -> str | None:
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    return getattr(metadata, "hook_name", None) if metadata is not None else None


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(matrix.detach().float().cpu(), dim=1)


def _host_float32(rows: torch.Tensor) -> torch.Tensor:
    """Unit rows as CPU float32: as given when they already are, else moved, widened and
    normalised again (a bf16 unit row widened is off unit length by up to 2^-8)."""
    rows = rows.detach()
    if rows.dtype == torch.float32 and rows.device.type == "cpu":
        return rows
    return torch.nn.functional.normalize(rows.cpu().float(), dim=1)


def match(
    a: torch.Tensor, b: torch.Tensor, method: str = "auto", *, progress: bool = True
) -> Assignment:
    """Max-total-cosine matching of unit rows ``a`` to ``b`` (either may be wider).

    Rows on any device, in any dtype, are matched on the CPU in float32: the solver
    interleaves NumPy with torch, and the sparse solver's bf16 error bound assumes
    float32 accumulation, which CUDA's bf16 matmuls do not promise.
    """
    if method not in ("auto", "dense", "sparse"):
        raise AquinError(f"method must be auto, dense or sparse, got {method!r}")
    a, b = _host_float32(a), _host_float32(b)
    transpose = len(a) > len(b)
    rows, cols = (b, a) if transpose else (a, b)
    if method == "dense" or (method == "auto" and len(rows) * len(cols) <= DENSE_MAX_CELLS):
        result = dense_assignment(rows, cols)
    else:
        result = sparse_assignment(rows, cols, progress=progress)
    if transpose:
        order = np.argsort(result.cols)
        result = Assignment(
            result.cols[order],
            result.rows[order],
            result.cosine[order],
            result.method,
            result.optimal,
            result.gap,
            result.rounds,
        )
    return result


def _baseline(n_a: int, n_b: int, d: int) -> tuple[float, str]:
    """Mean matched cosine of two unrelated random dictionaries of these shapes.

    Exact (same solver) up to 4096 x 4096; beyond, fitted as ``alpha + beta *
    sqrt(ln n)`` (the extreme-value growth of random cosines) on two smaller
    shapes with the same aspect ratio, then evaluated at the real size.
    """
    generator = torch.Generator().manual_seed(BASELINE_SEED)

    def score(rows: int, cols: int) -> float:
        left = _unit_rows(torch.randn(rows, d, generator=generator))
        right = _unit_rows(torch.randn(cols, d, generator=generator))
        return float(match(left, right, method="dense", progress=False).cosine.mean())

    if n_a * n_b <= BASELINE_EXACT_CELLS:
        return score(n_a, n_b), "exact"
    sizes = []
    for side in (BASELINE_SIDE // 2, BASELINE_SIDE):
        scale = side / max(n_a, n_b)
        sizes.append((max(1, round(n_a * scale)), max(1, round(n_b * scale))))
    values = [score(rows, cols) for rows, cols in sizes]
    x = [math.sqrt(math.log(max(rows, cols))) for rows, cols in sizes]
    beta = (values[1] - values[0]) / (x[1] - x[0])
    estimate = values[1] + beta * (math.sqrt(math.log(max(n_a, n_b))) - x[1])
    return estimate, f"extrapolated from {sizes[0]} and {sizes[1]}"


HEATMAP_PAIRS = 24


def _heatmap_block(
    pairs: pd.DataFrame,
    chosen_a: np.ndarray,
    chosen_b: np.ndarray,
    dec_a: torch.Tensor,
    dec_b: torch.Tensor,
) -> dict[str, Any]:
    """Cosines among the strongest pairs' decoders, rows and columns in matched order.

    A good alignment shows as a bright diagonal.
    """
    top = pairs.head(HEATMAP_PAIRS)
    position_a = {int(feature): i for i, feature in enumerate(chosen_a)}
    position_b = {int(feature): i for i, feature in enumerate(chosen_b)}
    rows = dec_a[torch.as_tensor([position_a[int(f)] for f in top["a"]], dtype=torch.long)]
    cols = dec_b[torch.as_tensor([position_b[int(f)] for f in top["b"]], dtype=torch.long)]
    block = (rows @ cols.T).double().numpy()
    return {
        "a": [int(f) for f in top["a"]],
        "b": [int(f) for f in top["b"]],
        "cosine": [[round(float(x), 4) for x in row] for row in block],
    }


def _histogram(cosine: np.ndarray, bins: int = 20) -> dict[str, Any]:
    counts, edges = np.histogram(cosine, bins=bins, range=(-1.0, 1.0))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


@verb("sae_align")
@quiet_unless_progress
def sae_align(
    sae_a: Any,
    sae_b: Any,
    max_features: int | None = None,
    *,
    method: str = "auto",
    force: bool = False,
    frequencies: tuple[Any, Any] | None = None,
    progress: bool = True,
) -> SaeAlign:
    """Match SAE A's decoder directions one-to-one to SAE B's, maximising total cosine.

    Args:
        sae_a, sae_b: anything `load_sae` takes (slug, ``RELEASE:SAE_ID``, SAELens
            directory, ``.pt`` ``{cfg, state_dict}``) or SAE objects.
        max_features: align at most this many features per side, chosen by
            `select_features` (frequency when ``frequencies`` is given, else gain).
        method: ``auto`` (dense SciPy up to 1024 x 1024 cells, sparse beyond),
            ``dense`` or ``sparse``.
        force: align SAEs trained on different hooks.

    Example:
        >>> align = sae_align("tiny-gpt2", "tiny-gpt2", max_features=64, progress=False)
        >>> align.strongest(2)[["a", "b"]].values.tolist() == [[a, a] for a in align.strongest(2)["a"]]
        True
    """
    first, second = load_sae(sae_a), load_sae(sae_b)
    d_a, d_b = int(first.W_dec.shape[1]), int(second.W_dec.shape[1])
    if d_a != d_b:
        raise AquinError(f"the SAEs read different widths: d_in {d_a} (A) vs {d_b} (B)")
    hook_a, hook_b = _hook(first), _hook(second)
    if hook_a and hook_b and hook_a != hook_b and not force:
        raise AquinError(
            f"the SAEs were trained on different hooks: {hook_a} (A) vs {hook_b} (B); "
            f"pass force=True (--force) to align them anyway"
        )
    freq_a, freq_b = frequencies if frequencies is not None else (None, None)
    chosen_a = select_features(first, max_features, freq_a)
    chosen_b = select_features(second, max_features, freq_b)
    dec_a = _unit_rows(first.W_dec[torch.as_tensor(chosen_a)])
    dec_b = _unit_rows(second.W_dec[torch.as_tensor(chosen_b)])
    result = match(dec_a, dec_b, method, progress=progress)

    enc_a = _unit_rows(first.W_enc.T[torch.as_tensor(chosen_a[result.rows])])
    enc_b = _unit_rows(second.W_enc.T[torch.as_tensor(chosen_b[result.cols])])
    encoder_cosine = (enc_a * enc_b).sum(1).double().numpy()
    pairs = pd.DataFrame(
        {
            "a": chosen_a[result.rows],
            "b": chosen_b[result.cols],
            "cosine": result.cosine,
            "encoder_cosine": encoder_cosine,
        }
    )
    pairs = pairs.sort_values(["cosine", "a"], ascending=[False, True], kind="stable")
    pairs = pairs.reset_index(drop=True)
    pairs["rank"] = np.arange(1, len(pairs) + 1)
    pairs = pairs[list(PAIR_COLUMNS)]
    unmatched = pd.DataFrame(
        {
            "side": ["a"] * (len(chosen_a) - len(result.rows))
            + ["b"] * (len(chosen_b) - len(result.cols)),
            "feature": np.concatenate(
                [
                    np.setdiff1d(chosen_a, chosen_a[result.rows]),
                    np.setdiff1d(chosen_b, chosen_b[result.cols]),
                ]
            ).astype(np.int64),
        },
        columns=list(UNMATCHED_COLUMNS),
    )
    heatmap = _heatmap_block(pairs, chosen_a, chosen_b, dec_a, dec_b)
    baseline, baseline_method = _baseline(len(chosen_a), len(chosen_b), d_a)
    cos = result.cosine
    summary = {
        "n_a": len(chosen_a),
        "n_b": len(chosen_b),
        "n_matched": len(cos),
        "mean_cosine": float(cos.mean()),
        "median_cosine": float(np.median(cos)),
        "frac_above_0.5": float((cos > 0.5).mean()),
        "frac_above_0.7": float((cos > 0.7).mean()),
        "frac_above_0.9": float((cos > 0.9).mean()),
        "method": result.method,
        "optimal": bool(result.optimal),
        "gap": None if result.gap is None else float(result.gap),
        "baseline_mean_cosine": baseline,
        "baseline_method": baseline_method,
        "selection": "all"
        if max_features is None
        else ("frequency" if frequencies is not None else "gain (decoder norm x encoder norm)"),
        "heatmap": heatmap,
        "histogram": _histogram(cos),
        "hook_a": hook_a,
        "hook_b": hook_b,
        "d_in": d_a,
        "sae_a": str(sae_a) if isinstance(sae_a, (str, Path)) else type(sae_a).__name__,
        "sae_b": str(sae_b) if isinstance(sae_b, (str, Path)) else type(sae_b).__name__,
        "tool_version": __version__,
    }
    return SaeAlign(summary=summary, pairs=pairs, unmatched=unmatched)
