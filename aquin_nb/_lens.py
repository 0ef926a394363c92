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

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHUNK_ROWS = 1024
CHUNK_BYTES = 32 * 2**20
VOCAB_CHUNK = 8192  # unembedding rows screened at a time (bfloat16 copies of them)
SCREEN = 4  # candidates rescored in float32, per token wanted
# below this unembedding size the float32 product is cheap and screening costs more
# (tiny-gpt2's 4,096 x 192: 2x slower screened; gpt2-small's 50,257 x 768: 2.2x faster)
SCREEN_MIN_ELEMENTS = 8 * 2**20


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
    """The lens of each row of ``directions`` ``[n, d_model]``, computed in chunks.

    With a float32 unembedding of at least `SCREEN_MIN_ELEMENTS` on a device with
    fast bfloat16 products (`fast_bfloat16`), tokens are screened in bfloat16 and the candidates
    rescored in float32, with a bound that makes the result exact (`_screened`).
    """
    hf = bridge.original_model
    parameter = next(hf.parameters())
    unembed = hf.get_output_embeddings().weight
    tokenizer = getattr(bridge, "tokenizer", None)
    if tokenizer is not None and len(tokenizer) < unembed.shape[0]:
        # rows past the tokenizer's vocabulary pad the matrix to a round size
        # (Pythia's 50,304 for 50,277 tokens, Qwen2's 151,936): not tokens, left out
        unembed = unembed[: len(tokenizer)]
    unembed_norm = unembed.norm(dim=-1).clamp_min(1e-12)
    norm = bridge.ln_final
    zero = norm(
        torch.zeros(1, 1, directions.shape[-1], dtype=parameter.dtype, device=parameter.device)
    )
    k = min(k, unembed.shape[0])
    screen = (
        unembed.dtype == torch.float32
        and unembed.numel() >= SCREEN_MIN_ELEMENTS
        and fast_bfloat16(unembed.device)
    )
    # rows per chunk: one [rows, vocab] float array of at most CHUNK_BYTES at a time
    rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (4 * int(unembed.shape[0]))))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in Lens.__dataclass_fields__}
    for start in range(0, len(directions), rows):
        chunk = directions[start : start + rows].to(parameter.device, parameter.dtype)
        normed = (norm(chunk[:, None, :]) - zero)[:, 0, :]
        if screen:
            chosen = _screened(normed, unembed, unembed_norm, k)
        else:
            chosen = _exact(normed, unembed, unembed_norm, k)
        for side, (indices, cosines) in zip(("top", "bottom"), chosen, strict=True):
            logits = torch.einsum("rd,rkd->rk", normed, unembed[indices])
            parts[side].append(indices.cpu())
            parts[f"{side}_cosine"].append(cosines.float().cpu())
            parts[f"{side}_logit"].append(logits.float().cpu())
    return Lens(**{name: torch.cat(values) for name, values in parts.items()})


Chosen = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _exact(
    normed: torch.Tensor, unembed: torch.Tensor, unembed_norm: torch.Tensor, k: int
) -> Chosen:
    """Top and bottom ``k`` tokens by cosine, (indices, cosines) each, from every logit."""
    cosine = normed @ unembed.T  # [rows, vocab]: the logits, made cosines in place
    cosine /= unembed_norm[None, :]
    cosine /= normed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    top = cosine.topk(k, dim=-1)
    bottom = cosine.topk(k, dim=-1, largest=False)
    return (top.indices, top.values), (bottom.indices, bottom.values)


def _screened(
    normed: torch.Tensor, unembed: torch.Tensor, unembed_norm: torch.Tensor, k: int
) -> Chosen:
    """`_exact`'s answer, with the vocabulary screened in bfloat16.

    Cosines are computed in bfloat16 (inputs and result rounded to 8 bits of
    mantissa, products summed in float32), so each is within ε = 2⁻⁸ + 2⁻⁹ +
    d·2⁻²³ of the float32 one (Cauchy-Schwarz bounds the sum of |u_i w_i| by
    ‖w‖ for a unit direction u). The `SCREEN`·k best by that screen are
    rescored in float32. A token outside them screens below the m-th
    candidate, so is truly below that plus ε: when the k-th rescored candidate
    beats it, the top k are exact. Rows where it does not (near-ties) are
    computed in float32 over the whole vocabulary.
    """
    vocab, width = int(unembed.shape[0]), int(unembed.shape[1])
    wanted = min(SCREEN * k, vocab)
    epsilon = 2**-8 + 2**-9 + width * 2**-23
    unit = normed / normed.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_b = unit.to(torch.bfloat16)
    best: dict[bool, tuple[torch.Tensor, torch.Tensor] | None] = {True: None, False: None}
    for start in range(0, vocab, VOCAB_CHUNK):
        block = unembed[start : start + VOCAB_CHUNK]
        approx = (unit_b @ block.to(torch.bfloat16).T).float()
        approx /= unembed_norm[None, start : start + VOCAB_CHUNK]
        for largest in (True, False):
            found = approx.topk(min(wanted, approx.shape[1]), dim=-1, largest=largest)
            values, indices = found.values, found.indices + start
            held = best[largest]
            if held is not None:
                values = torch.cat([held[0], values], dim=1)
                indices = torch.cat([held[1], indices], dim=1)
                keep = values.topk(min(wanted, values.shape[1]), dim=-1, largest=largest).indices
                values, indices = values.gather(1, keep), indices.gather(1, keep)
            best[largest] = (values, indices)
    chosen = []
    redo = torch.zeros(len(normed), dtype=torch.bool, device=normed.device)
    for largest in (True, False):
        approx_values, candidates = best[largest]  # type: ignore[misc]
        exact = torch.einsum("rd,rmd->rm", unit, unembed[candidates])
        exact /= unembed_norm[candidates]
        picked = exact.topk(k, dim=-1, largest=largest)
        indices = candidates.gather(1, picked.indices)
        if wanted < vocab:  # the last screened candidate bounds every other token
            edge = approx_values[:, -1]
            kth = picked.values[:, -1]
            redo |= kth <= edge + epsilon if largest else kth >= edge - epsilon
        chosen.append((indices, picked.values))
    if bool(redo.any()):  # near-ties at the screen's edge: these rows in float32
        (top_i, top_v), (bottom_i, bottom_v) = chosen
        (exact_top, exact_top_v), (exact_bottom, exact_bottom_v) = _exact(
            normed[redo], unembed, unembed_norm, k
        )
        top_i[redo], top_v[redo] = exact_top, exact_top_v
        bottom_i[redo], bottom_v[redo] = exact_bottom, exact_bottom_v
    return chosen[0], chosen[1]


def fast_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 products beat float32 on ``device``: CUDA with bf16 support, or
    a CPU with AVX512-BF16 or AMX (read from ``/proc/cpuinfo``). ``AQUIN_NB_BF16``
    set to 0 or 1 decides instead."""
    forced = os.environ.get("AQUIN_NB_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return _bfloat16_capable(device)


@functools.lru_cache(maxsize=8)
def _bfloat16_capable(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def decode_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token id decoded alone, as ``tokenizer.decode([id])`` gives it."""
    return decode_each(tokenizer, [[int(token)] for token in ids])


def decode_each(tokenizer: Any, sequences: list[list[int]]) -> list[str]:
    """``[tokenizer.decode(ids) for ids in sequences]``, calling the Rust decoder straight
    where that call is all ``decode`` does (a fast tokenizer that neither overrides
    decoding nor cleans up spaces): 5x faster a sequence. (Its ``decode_batch`` is
    slower for the few hundred short sequences asked for here: it wakes a thread pool.)

    Example:
        >>> import aquin_nb
        >>> tokenizer = aquin_nb.load_model("tiny-gpt2").tokenizer
        >>> ids = tokenizer.encode(" the cat", add_special_tokens=False)
        >>> decode_each(tokenizer, [ids, ids[:1], []])
        [' the cat', ' the', '']
    """
    if _plain_fast_decode(tokenizer.__class__) and not tokenizer.clean_up_tokenization_spaces:
        backend = tokenizer._tokenizer
        return [backend.decode(ids, skip_special_tokens=False) for ids in sequences]
    return [tokenizer.decode(ids) for ids in sequences]


@functools.lru_cache(maxsize=32)
def _plain_fast_decode(kind: Any) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: decode one at a time
        return False
    return (
        issubclass(kind, TokenizersBackend)
        and kind._decode is TokenizersBackend._decode
        and kind.decode is PreTrainedTokenizerBase.decode
    )
