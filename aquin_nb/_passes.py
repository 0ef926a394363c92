"""The two passes of a trajectory: the base once, then each checkpoint against it.

A pass runs over one shard of the prompts (all of them on the local backend, a
slice of them in a Ray task) and returns accumulators that are sums, so passes
over disjoint shards ``merge`` into the pass over all of them (DESIGN.md
decisions 6 and 11). The base pass keeps what every checkpoint is compared
with: the base's sums, its fit and each prompt's mean feature activation
(`aquin_nb._stats.BaseFeatureStats`). A checkpoint pass runs only the
checkpoint: one truncated forward per batch, against those stored means.

Both passes also sum each prompt's residual-stream activations at the hook
(`ResidualSums`, ``[prompts, d_model]`` float64): a checkpoint's sums minus the
base's are the per-prompt mean shift that `aquin_nb._shift.attribute`
decomposes over the decoder directions, as `sae_diff` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._activations import TokenBatch, residual, token_batches
from ._fit import DownstreamStats
from ._prefix import KeptPrefix
from ._stats import BaseFeatureStats, FitStats, PairedFeatureStats
from .saes import SaeNumerics, encode, sparse_features
from .saes import decode as sparse_decode


@dataclass
class Shard:
    """Consecutive prompts: ``token_lists`` starts at prompt number ``start``."""

    start: int
    token_lists: list[list[int]]


def shards(token_lists: list[list[int]], n_shards: int) -> list[Shard]:
    """``token_lists`` cut into at most ``n_shards`` consecutive, near-equal shards."""
    n_shards = max(1, min(n_shards, len(token_lists)))
    size, extra = divmod(len(token_lists), n_shards)
    cut, start = [], 0
    for index in range(n_shards):
        stop = start + size + (index < extra)
        cut.append(Shard(start, token_lists[start:stop]))
        start = stop
    return cut


class ResidualSums:
    """Each prompt's sum of residual-stream activations at the hook, and its token count."""

    def __init__(self, n_prompts: int, d_model: int) -> None:
        self.sums = torch.zeros(n_prompts, d_model, dtype=torch.float64)
        self.counts = torch.zeros(n_prompts, dtype=torch.float64)

    def update(self, x: torch.Tensor, prompt_of_token: torch.Tensor) -> None:
        rows = prompt_of_token.cpu()
        self.sums.index_add_(0, rows, x.double().cpu())
        self.counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))

    def merge(self, other: ResidualSums) -> ResidualSums:
        """Append ``other``'s prompts (those that follow this one's); returns self."""
        self.sums = torch.cat([self.sums, other.sums])
        self.counts = torch.cat([self.counts, other.counts])
        return self

    def shift_from(self, base: ResidualSums) -> np.ndarray:
        """Per-prompt mean shift, this side minus ``base``: ``[prompts, d_model]``."""
        return ((self.sums - base.sums) / self.counts.clamp_min(1)[:, None]).numpy()


@dataclass
class BasePass:
    features: BaseFeatureStats
    fit: FitStats
    downstream: DownstreamStats
    residual: ResidualSums

    def merge(self, other: BasePass) -> BasePass:
        """``other`` must cover the prompts that follow this pass's."""
        self.features.merge(other.features)
        self.fit.merge(other.fit)
        self.downstream.merge(other.downstream)
        self.residual.merge(other.residual)
        return self


@dataclass
class CheckpointPass:
    features: PairedFeatureStats
    fit: FitStats
    downstream: DownstreamStats
    residual: ResidualSums

    def merge(self, other: CheckpointPass) -> CheckpointPass:
        """``other`` must cover the prompts that follow this pass's."""
        self.features.merge(other.features)
        self.fit.merge(other.fit)
        self.downstream.merge(other.downstream)
        self.residual.merge(other.residual)
        return self


def _batches(
    shard: Shard, batch_size: int, numerics: SaeNumerics, device: torch.device, n_downstream: int
) -> Iterator[tuple[TokenBatch, torch.Tensor, torch.Tensor]]:
    """Each batch with its mask on ``device`` and the row of every counted token.

    Prompts of like length share a batch; the downstream fit's (the run's first
    ``n_downstream``) stay together in the shard's first batches."""
    for batch in token_batches(
        shard.token_lists,
        batch_size=batch_size,
        skip_first=numerics.prepend_bos,
        by_length=True,
        first=n_downstream - shard.start,
    ):
        mask = batch.mask.to(device)
        rows = torch.arange(len(batch.tokens), device=device)[:, None].expand_as(mask)[mask]
        yield batch, mask, rows


def _prompt_of_token(batch: TokenBatch, rows: torch.Tensor) -> torch.Tensor:
    """Each counted token's prompt, numbered within the shard."""
    return batch.prompt_index.to(rows.device)[rows]


def _features(bridge: Any, sae: Any, numerics: SaeNumerics, batch: TokenBatch, mask: torch.Tensor):
    x = residual(bridge, batch.tokens, numerics.hook_name)[mask].to(sae.W_dec.dtype)
    # sparse where few fire: decode and statistics cost what the firings cost
    return x, sparse_features(encode(sae, x))


def _downstream(
    stats: DownstreamStats,
    bridge: Any,
    sae: Any,
    numerics: SaeNumerics,
    batch: TokenBatch,
    shard: Shard,
    n_downstream: int,
) -> None:
    """The downstream fit on the run's first ``n_downstream`` prompts (global numbering)."""
    rows = (batch.prompt_index + shard.start) < n_downstream
    if rows.any():
        stats.update(bridge, sae, numerics.hook_name, batch.tokens[rows], batch.mask[rows])


@torch.no_grad()
def base_pass(
    bridge: Any,
    sae: Any,
    numerics: SaeNumerics,
    shard: Shard,
    *,
    batch_size: int,
    n_downstream: int,
    kept: KeptPrefix | None = None,
) -> BasePass:
    """The base side of ``shard``; with ``kept``, its leading blocks' outputs are kept
    for checkpoints that share them (`aquin_nb._prefix.KeptPrefix`)."""
    device = next(bridge.original_model.parameters()).device
    d_sae, d_model = (int(n) for n in sae.W_dec.shape)
    result = BasePass(
        BaseFeatureStats(d_sae),
        FitStats(d_model),
        DownstreamStats(),
        ResidualSums(len(shard.token_lists), d_model),
    )
    for batch, mask, rows in _batches(shard, batch_size, numerics, device, n_downstream):
        with kept.keeping() if kept else nullcontext():
            x, features = _features(bridge, sae, numerics, batch, mask)
        result.fit.update(x, sparse_decode(sae, features))
        result.features.update(features, rows, len(batch.tokens))
        result.residual.update(x, _prompt_of_token(batch, rows))
        del x, features  # before the next batch's arrive, not when they replace these
        _downstream(result.downstream, bridge, sae, numerics, batch, shard, n_downstream)
    return result


@torch.no_grad()
def checkpoint_pass(
    bridge: Any,
    sae: Any,
    numerics: SaeNumerics,
    shard: Shard,
    base: BasePass,
    *,
    batch_size: int,
    n_downstream: int,
    kept: KeptPrefix | None = None,
    shared_blocks: int = 0,
) -> CheckpointPass:
    """The checkpoint side of ``shard`` against ``base``, the base pass of the same shard.

    With ``kept`` (the base pass's) and ``shared_blocks`` k >= 1 (the checkpoint's
    first k blocks and embeddings are the base's, `aquin_nb._prefix.unchanged_prefix`),
    each batch replays the base's block k - 1 instead of computing those blocks.
    """
    device = next(bridge.original_model.parameters()).device
    d_model = int(sae.W_dec.shape[1])
    result = CheckpointPass(
        base.features.paired(),
        FitStats(d_model),
        DownstreamStats(),
        ResidualSums(len(shard.token_lists), d_model),
    )
    batches = list(_batches(shard, batch_size, numerics, device, n_downstream))
    if len(batches) != len(base.features.batch_means):
        raise RuntimeError("the base pass was computed over other batches than this shard's")
    for number, ((batch, mask, rows), base_means) in enumerate(
        zip(batches, base.features.batch_means, strict=True)
    ):
        replay = kept.replaying(bridge, shared_blocks, number) if kept else nullcontext()
        with replay:
            x, features = _features(bridge, sae, numerics, batch, mask)
        result.fit.update(x, sparse_decode(sae, features))
        result.features.update_checkpoint(features, rows, base_means.to(device))
        result.residual.update(x, _prompt_of_token(batch, rows))
        del x, features  # before the next batch's arrive, not when they replace these
        _downstream(result.downstream, bridge, sae, numerics, batch, shard, n_downstream)
    return result
