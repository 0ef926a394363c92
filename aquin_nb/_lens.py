"""The logit lens of residual-stream directions: which tokens a direction points towards.

Used for the mean activation difference (`model_diff`, `sae_diff`'s shift) and
for SAE decoder rows (feature dashboards and labels). A direction is read
through the model's own final norm (the norm of zero subtracted, so a
LayerNorm's bias adds nothing and LayerNorm and RMSNorm are handled alike;
with the SAE's weight processing applied to the bridge, the folded norm weights
are in the unembedding) and its unembedding. Tokens are ranked by the cosine
between that vector and each token's unembedding row, not by the raw logit:
unembedding rows differ in norm (0.47 to 1.61 on tiny-gpt2), and a raw ranking
puts the same high-norm tokens on top of every direction. A planted
unembedding row comes back first for 100% of tiny-gpt2's tokens by cosine, and
for 41% by raw logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CHUNK_ROWS = 1024
CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Lens:
    """Top and bottom ``k`` token ids per direction, with their cosines and logits."""

    top: torch.Tensor  # [n, k] token ids, most promoted first
    bottom: torch.Tensor  # [n, k] token ids, most suppressed first
    top_cosine: torch.Tensor
    bottom_cosine: torch.Tensor
    top_logit: torch.Tensor
    bottom_logit: torch.Tensor


@torch.no_grad()
def logit_lens(bridge: Any, directions: torch.Tensor, k: int = 10) -> Lens:
    """The lens of each row of ``directions`` ``[n, d_model]``, computed in chunks."""
    hf = bridge.original_model
    parameter = next(hf.parameters())
    unembed = hf.get_output_embeddings().weight
    unembed_norm = unembed.norm(dim=-1).clamp_min(1e-12)
    norm = bridge.ln_final
    zero = norm(
        torch.zeros(1, 1, directions.shape[-1], dtype=parameter.dtype, device=parameter.device)
    )
    k = min(k, unembed.shape[0])
    # rows per chunk: one [rows, vocab] float array of at most CHUNK_BYTES at a time
    rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (4 * int(unembed.shape[0]))))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in Lens.__dataclass_fields__}
    for start in range(0, len(directions), rows):
        chunk = directions[start : start + rows].to(parameter.device, parameter.dtype)
        normed = (norm(chunk[:, None, :]) - zero)[:, 0, :]
        cosine = normed @ unembed.T  # [rows, vocab]: the logits, made cosines in place
        cosine /= unembed_norm[None, :]
        cosine /= normed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for side, largest in (("top", True), ("bottom", False)):
            best = cosine.topk(k, dim=-1, largest=largest)
            logits = torch.einsum("rd,rkd->rk", normed, unembed[best.indices])
            parts[side].append(best.indices.cpu())
            parts[f"{side}_cosine"].append(best.values.float().cpu())
            parts[f"{side}_logit"].append(logits.float().cpu())
        del cosine
    return Lens(**{name: torch.cat(values) for name, values in parts.items()})


def decode_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.decode([int(token)]) for token in ids]
