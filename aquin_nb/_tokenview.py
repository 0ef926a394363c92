"""Token views: where a feature fires most, base beside checkpoint.

Computed lazily for a bounded set of features (one extra pass over the probes
for both models), never for all features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._activations import residual, token_batches

MAX_FEATURES = 32


@dataclass
class LiveDiff:
    """What a fresh SaeDiff keeps to compute token views on demand (never serialised)."""

    base: Any
    checkpoint: Any
    sae: Any
    hook: str
    token_lists: list[list[int]]
    skip_first: bool
    numerics: Any = None
    cache: dict[int, dict[str, Any]] = field(default_factory=dict)


@torch.no_grad()
def compute_token_views(
    live: LiveDiff, features: list[int], k: int = 4
) -> dict[int, dict[str, Any]]:
    """For each feature, the ``k`` prompts where it fires most (on either side).

    Each view holds per prompt its tokens and the feature's activation on every
    token, base and checkpoint, so a renderer can shade tokens by strength.
    """
    wanted = [f for f in dict.fromkeys(int(f) for f in features) if f not in live.cache]
    if len(wanted) > MAX_FEATURES:
        raise ValueError(f"token views are computed for at most {MAX_FEATURES} features at once")
    if wanted:
        columns = torch.as_tensor(wanted)
        per_prompt: dict[str, list[torch.Tensor]] = {"base": [], "checkpoint": []}
        device = next(live.base.original_model.parameters()).device
        for batch in token_batches(live.token_lists, batch_size=16, skip_first=False):
            for side, bridge in (("base", live.base), ("checkpoint", live.checkpoint)):
                acts = residual(bridge, batch.tokens, live.hook).to(live.sae.W_dec.dtype)
                feats = live.sae.encode(acts)[..., columns.to(device)].float().cpu()
                mask = batch.mask.clone()
                if live.skip_first:
                    mask[:, 0] = False
                feats[~mask] = 0.0
                per_prompt[side].extend(feats)  # one [pos, n_features] tensor per prompt
        tokenizer = live.base.tokenizer
        for column, feature in enumerate(wanted):
            peaks = (
                torch.stack(
                    [
                        torch.stack([p[:, column].max() for p in per_prompt["base"]]),
                        torch.stack([p[:, column].max() for p in per_prompt["checkpoint"]]),
                    ]
                )
                .max(0)
                .values
            )
            top = peaks.topk(min(k, len(peaks))).indices.tolist()
            prompts = []
            for index in top:
                ids = live.token_lists[index]
                start = 1 if live.skip_first else 0
                prompts.append(
                    {
                        "prompt": index,
                        "tokens": [tokenizer.decode([token]) for token in ids[start:]],
                        "base": [
                            round(float(x), 4)
                            for x in per_prompt["base"][index][start : len(ids), column]
                        ],
                        "checkpoint": [
                            round(float(x), 4)
                            for x in per_prompt["checkpoint"][index][start : len(ids), column]
                        ],
                    }
                )
            live.cache[feature] = {"feature": feature, "prompts": prompts}
    return {int(f): live.cache[int(f)] for f in features}
