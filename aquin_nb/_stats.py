"""Streaming per-feature statistics in O(d_sae) memory (DESIGN.md decision 6).

Nothing here keeps a [tokens x d_sae] matrix past the batch that produced it.
"""

from __future__ import annotations

import numpy as np
import torch


class PairedFeatureStats:
    """Token means, firing counts and per-prompt paired differences, base vs checkpoint.

    The paired test works on prompt means: for prompt ``i`` and feature ``f``,
    ``d_if = mean_checkpoint_if - mean_base_if`` over that prompt's counted tokens.
    Only the sums of ``d`` and ``d**2`` are kept.
    """

    def __init__(self, d_sae: int) -> None:
        zeros = lambda: torch.zeros(d_sae, dtype=torch.float64)  # noqa: E731
        self.base_sum, self.checkpoint_sum = zeros(), zeros()
        self.base_fires, self.checkpoint_fires = zeros(), zeros()
        self.diff_sum, self.diff_sq_sum = zeros(), zeros()
        self.n_tokens = 0
        self.n_prompts = 0

    def update(
        self,
        base: torch.Tensor,  # [tokens, d_sae] feature activations of counted tokens
        checkpoint: torch.Tensor,  # [tokens, d_sae]
        prompt_of_token: torch.Tensor,  # [tokens] row index 0..n_rows-1
        n_rows: int,
    ) -> None:
        # Reduce in the activations' own dtype within the batch (at most a few thousand
        # tokens), then accumulate across batches in float64: no full-size copies.
        rows = prompt_of_token.to(base.device)
        self.base_sum += base.sum(0).double().cpu()
        self.checkpoint_sum += checkpoint.sum(0).double().cpu()
        self.base_fires += (base > 0).sum(0).double().cpu()
        self.checkpoint_fires += (checkpoint > 0).sum(0).double().cpu()
        counts = torch.bincount(rows, minlength=n_rows).clamp_min(1)[:, None]
        per_prompt = torch.zeros((n_rows, base.shape[1]), dtype=base.dtype, device=base.device)
        per_prompt.index_add_(0, rows, checkpoint - base)
        per_prompt = (per_prompt / counts).double().cpu()
        self.diff_sum += per_prompt.sum(0)
        self.diff_sq_sum += (per_prompt**2).sum(0)
        self.n_tokens += int(base.shape[0])
        self.n_prompts += n_rows

    def paired_t_pvalues(self) -> np.ndarray:
        """Two-sided p-values of the paired t-test across prompts, per feature."""
        from scipy import stats

        n = self.n_prompts
        mean = (self.diff_sum / n).numpy()
        variance = ((self.diff_sq_sum - n * (self.diff_sum / n) ** 2) / (n - 1)).clamp_min(0)
        stderr = np.sqrt(variance.numpy() / n)
        # Round-off leaves tiny non-zero variance for constant differences; treat
        # anything below float64 resolution of the mean as zero.
        tiny = stderr <= 1e-12 * np.maximum(np.abs(mean), 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_stat = np.where(tiny, 0.0, mean / np.where(tiny, 1.0, stderr))
        p_values = 2 * stats.t.sf(np.abs(t_stat), df=n - 1)
        # Zero spread: an exactly constant non-zero shift is certain, no shift is null.
        p_values = np.where(tiny, np.where(mean == 0, 1.0, 0.0), p_values)
        return p_values


class FitStats:
    """Explained variance of an SAE's reconstructions on a stream of activations, in O(d_in).

    (L0 needs no pass of its own: it is the firing counts summed over features.)
    """

    def __init__(self, d_in: int) -> None:
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.sq_sum = 0.0
        self.error_sq_sum = 0.0
        self.n = 0

    def update(self, x: torch.Tensor, reconstruction: torch.Tensor) -> None:
        self.sum += x.sum(0).double().cpu()
        self.sq_sum += float((x * x).sum())
        self.error_sq_sum += float(((x - reconstruction) ** 2).sum())
        self.n += int(x.shape[0])

    def explained_variance(self) -> float:
        total_variance = self.sq_sum - float((self.sum**2).sum()) / self.n
        return 1.0 - self.error_sq_sum / total_variance if total_variance > 0 else 0.0
