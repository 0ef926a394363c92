"""Streaming per-feature statistics in O(d_sae) memory (DESIGN.md decision 6).

Nothing here keeps a [tokens x d_sae] matrix past the batch that produced it.
Every accumulator is a set of sums, so two of them over disjoint prompts
``merge`` into the accumulator of all those prompts: that is what lets the Ray
backend map prompt shards and checkpoints over tasks and reduce the results.

`BaseFeatureStats` is the base model's side of a paired comparison, kept so
that many checkpoints can be compared with one base pass (`sae_trajectory`):
beside its sums it holds each prompt's mean activation, ``[prompts, d_sae]``,
which is what the paired test needs from the base.
"""

from __future__ import annotations

import numpy as np
import torch


def prompt_means(
    activations: torch.Tensor,  # [tokens, d_sae]
    prompt_of_token: torch.Tensor,  # [tokens] row index 0..n_rows-1
    n_rows: int,
) -> torch.Tensor:
    """Each row's mean activation over its counted tokens, ``[n_rows, d_sae]`` (same dtype)."""
    rows = prompt_of_token.to(activations.device)
    counts = torch.bincount(rows, minlength=n_rows).clamp_min(1)[:, None]
    sums = torch.zeros(
        (n_rows, activations.shape[1]), dtype=activations.dtype, device=activations.device
    )
    sums.index_add_(0, rows, activations)
    return sums / counts


FIRING_ROWS = 64  # rows at a time in `firing_counts` and the paired differences


def firing_counts(activations: torch.Tensor) -> torch.Tensor:
    """How many rows of ``activations`` ``[tokens, d_sae]`` are above zero, per feature,
    float64 on the CPU. Counted in float32 (exact to 2**24 rows), `FIRING_ROWS` rows at
    a time: the bool mask summed over all rows at once goes through int64 (48 ms and a
    99 MB transient at 254 x 65,536 on the CPU), in float32 it is 31 ms and 66 MB, in
    chunks 11 ms and no transient to speak of."""
    counts = torch.zeros(activations.shape[1], dtype=torch.float32, device=activations.device)
    for start in range(0, len(activations), FIRING_ROWS):
        counts += (activations[start : start + FIRING_ROWS] > 0).to(torch.float32).sum(0)
    return counts.double().cpu()


def side_sums(
    features: torch.Tensor, prompt_of_token: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One side's batch: per-feature sums and firing counts (float64 on the CPU) and each
    row's mean activation ``[n_rows, d_sae]``. From dense features, the means are in
    their dtype and device; from sparse COO ones (`aquin_nb.saes.sparse_features`),
    everything comes from the nonzero entries only, in float64 on the CPU."""
    if not features.is_sparse:
        total = features.sum(0).double().cpu()
        return total, firing_counts(features), prompt_means(features, prompt_of_token, n_rows)
    d_sae = int(features.shape[1])
    features = features.coalesce()
    token, feature = features.indices()
    values = features.values().double()
    total = torch.bincount(feature, weights=values, minlength=d_sae)
    fires = torch.bincount(feature[values > 0], minlength=d_sae).double()
    rows = prompt_of_token.cpu()
    sums = torch.zeros((n_rows, d_sae), dtype=torch.float64)
    sums.index_put_((rows[token], feature), values, accumulate=True)
    return total, fires, sums / torch.bincount(rows, minlength=n_rows).clamp_min(1)[:, None]


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
        if base.is_sparse or checkpoint.is_sparse:
            if base.is_sparse and checkpoint.is_sparse:
                self._update_sparse(base, checkpoint, prompt_of_token, n_rows)
                return
            base, checkpoint = base.to_dense(), checkpoint.to_dense()
        # Reduce in the activations' own dtype within the batch (at most a few thousand
        # tokens), then accumulate across batches in float64: no full-size copies.
        rows = prompt_of_token.to(base.device)
        self.base_sum += base.sum(0).double().cpu()
        self.checkpoint_sum += checkpoint.sum(0).double().cpu()
        self.base_fires += firing_counts(base)
        self.checkpoint_fires += firing_counts(checkpoint)
        counts = torch.bincount(rows, minlength=n_rows).clamp_min(1)[:, None]
        per_prompt = torch.zeros((n_rows, base.shape[1]), dtype=base.dtype, device=base.device)
        for start in range(0, len(rows), FIRING_ROWS):  # no [tokens, d_sae] temporary
            part = slice(start, start + FIRING_ROWS)
            per_prompt.index_add_(0, rows[part], checkpoint[part] - base[part])
        per_prompt = (per_prompt / counts).double().cpu()
        self.diff_sum += per_prompt.sum(0)
        self.diff_sq_sum += (per_prompt**2).sum(0)
        self.n_tokens += int(base.shape[0])
        self.n_prompts += n_rows

    def _update_sparse(
        self, base: torch.Tensor, checkpoint: torch.Tensor, rows: torch.Tensor, n_rows: int
    ) -> None:
        """`update` from sparse COO features: every sum over the nonzero entries only,
        in float64 (so the paired differences are exactly zero where the two sides are
        equal)."""
        base_total, base_fires, base_means = side_sums(base, rows, n_rows)
        ckpt_total, ckpt_fires, ckpt_means = side_sums(checkpoint, rows, n_rows)
        self.base_sum += base_total
        self.checkpoint_sum += ckpt_total
        self.base_fires += base_fires
        self.checkpoint_fires += ckpt_fires
        per_prompt = ckpt_means - base_means
        self.diff_sum += per_prompt.sum(0)
        self.diff_sq_sum += (per_prompt**2).sum(0)
        self.n_tokens += int(base.shape[0])
        self.n_prompts += n_rows

    def update_checkpoint(
        self,
        checkpoint: torch.Tensor,  # [tokens, d_sae] feature activations of counted tokens
        prompt_of_token: torch.Tensor,  # [tokens] row index 0..n_rows-1
        base_prompt_means: torch.Tensor,  # [n_rows, d_sae], from BaseFeatureStats
    ) -> None:
        """Add one batch of the checkpoint side against the base's stored prompt means.

        The base's token sums and firing counts come from `BaseFeatureStats.paired`;
        the paired differences are the checkpoint's prompt means minus the base's.
        """
        n_rows = int(base_prompt_means.shape[0])
        total, fires, means = side_sums(checkpoint, prompt_of_token, n_rows)
        self.checkpoint_sum += total
        self.checkpoint_fires += fires
        per_prompt = means.double().cpu() - base_prompt_means.double().cpu()
        self.diff_sum += per_prompt.sum(0)
        self.diff_sq_sum += (per_prompt**2).sum(0)
        self.n_tokens += int(checkpoint.shape[0])
        self.n_prompts += n_rows

    def merge(self, other: PairedFeatureStats) -> PairedFeatureStats:
        """Add ``other`` (the same comparison over other prompts) into this one; returns self."""
        for name in (
            "base_sum",
            "checkpoint_sum",
            "base_fires",
            "checkpoint_fires",
            "diff_sum",
            "diff_sq_sum",
        ):
            getattr(self, name).add_(getattr(other, name))
        self.n_tokens += other.n_tokens
        self.n_prompts += other.n_prompts
        return self

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
        # squared row norms summed in float64: a float32 sum over a whole large batch
        # drifts, and the variance subtracts two such sums
        self.sq_sum += float(x.norm(dim=-1).double().pow(2).sum())
        self.error_sq_sum += float((x - reconstruction).norm(dim=-1).double().pow(2).sum())
        self.n += int(x.shape[0])

    def merge(self, other: FitStats) -> FitStats:
        """Add ``other`` (the same SAE on other activations) into this one; returns self."""
        self.sum.add_(other.sum)
        self.sq_sum += other.sq_sum
        self.error_sq_sum += other.error_sq_sum
        self.n += other.n
        return self

    def explained_variance(self) -> float:
        total_variance = self.sq_sum - float((self.sum**2).sum()) / self.n
        return 1.0 - self.error_sq_sum / total_variance if total_variance > 0 else 0.0


class BaseFeatureStats:
    """The base side of a paired comparison, computed once for many checkpoints.

    Holds the base's token sums and firing counts (O(d_sae)) and each prompt's
    mean activation (``[prompts, d_sae]``, float32 on the CPU): the paired test
    needs the base's prompt means to pair each checkpoint's with. This is the
    only state that grows with the prompts, and it does not grow with the tokens
    or the number of checkpoints.
    """

    def __init__(self, d_sae: int) -> None:
        self.d_sae = d_sae
        self.base_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.base_fires = torch.zeros(d_sae, dtype=torch.float64)
        self.batch_means: list[torch.Tensor] = []
        self.n_tokens = 0
        self.n_prompts = 0

    def update(
        self,
        base: torch.Tensor,  # [tokens, d_sae]
        prompt_of_token: torch.Tensor,  # [tokens] row index 0..n_rows-1
        n_rows: int,
    ) -> None:
        """Add one batch of base features, dense or sparse (`aquin_nb.saes.sparse_features`)."""
        total, fires, means = side_sums(base, prompt_of_token, n_rows)
        self.base_sum += total
        self.base_fires += fires
        self.batch_means.append(means.float().cpu())
        self.n_tokens += int(base.shape[0])
        self.n_prompts += n_rows

    def merge(self, other: BaseFeatureStats) -> BaseFeatureStats:
        """Append ``other``'s prompts (those that follow this one's) into this one; returns self."""
        self.base_sum.add_(other.base_sum)
        self.base_fires.add_(other.base_fires)
        self.batch_means.extend(other.batch_means)
        self.n_tokens += other.n_tokens
        self.n_prompts += other.n_prompts
        return self

    def paired(self) -> PairedFeatureStats:
        """An empty comparison that already holds this base side's sums: feed it every
        batch of a checkpoint with `PairedFeatureStats.update_checkpoint`."""
        stats = PairedFeatureStats(self.d_sae)
        stats.base_sum.copy_(self.base_sum)
        stats.base_fires.copy_(self.base_fires)
        return stats
