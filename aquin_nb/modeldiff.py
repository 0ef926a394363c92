"""``model_diff`` (module `modeldiff`): what a fine-tune changed, without a dictionary.

One forward pass per model over the probes gives four signals that need no SAE:

* **KL per token**: KL(base ‖ checkpoint) between the two next-token
  distributions at every real position, per prompt and as the top tokens in
  context, each with what the base and the checkpoint predict next;
* **layer drift**: how far the residual stream after each block moved, relative
  to its norm, and the cosine between base and checkpoint activations;
* **promoted tokens**: per layer, the logit lens of the mean activation
  difference (the activation-difference lens of Minder et al. 2025): the tokens
  the fine-tune pushes the residual stream towards, and away from (see
  `aquin_nb._lens` for how the final norm is handled and why tokens are ranked
  by cosine);
* **weight diff**: per parameter tensor, ‖ΔW‖_F / ‖W‖_F and, for matrices, the
  stable rank of ΔW (‖ΔW‖_F² / σ_max², about r for a rank-r LoRA).

The card suggests the first layer whose drift reaches `DRIFT_THRESHOLD`: where
the fine-tune starts to act, and a good first layer to point an SAE at.

Example:
    >>> import aquin_nb
    >>> md = aquin_nb.model_diff("tiny-gpt2", checkpoint, progress=False)  # block 1 planted
    >>> md.layers["rel_drift"].round(3).tolist()[:2], md.summary["suggested_layer"]
    ([0.0, 0.785], 1)
    >>> md.modules.loc[md.modules["changed"], "module"].tolist()
    ['transformer.h.1.mlp.c_proj.bias']
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from ._activations import token_batches, tokenize_prompts
from ._diff_core import bridge_label, load_pair
from ._errors import AquinError
from ._lens import decode_each, decode_tokens, fast_bfloat16, logit_lens
from ._quiet import quiet_unless_progress
from ._verbs import verb
from .probes import load_prompts
from .results import MODULE_COLUMNS, PROMOTED_COLUMNS, TOKEN_COLUMNS, ModelDiff

logger = logging.getLogger(__name__)

__all__ = ["DRIFT_THRESHOLD", "ModelDiff", "model_diff"]

# The first layer whose residual stream moved by this fraction of its norm is
# where the card points: a layer that moved 5% has visibly changed what it carries.
DRIFT_THRESHOLD = 0.05
TOP_TOKENS = 50
PROMOTED_TOKENS = 10
CONTEXT_BEFORE = 8
STACK_BYTES = 256 * 2**20  # the stable ranks' batched iteration, per stack
SUBSPACE = 16  # vectors in each block of that iteration
LANCZOS_STEPS = 8  # its cap: Gaussian noise of 768 x 3,072 reads under 0.5% off
LOW_PRECISION_ELEMENTS = 2**21  # stacks this large iterate in bfloat16 where that is fast
MERGED_ELEMENTS = 2**18  # matrices smaller than this share a stack with their narrow side's
CHECKED_STEPS = (0, 1, 2, 4)  # Lanczos steps (and the last) that test for convergence
KL_CHUNK_BYTES = 2**20  # logits per KL chunk: a few rows, in cache
DEFAULT_CONTEXT = 1024  # SAELens trains most public SAEs at 128-1,024 tokens


class _TopTokens:
    """The ``k`` positions with the largest KL over the whole pass (a bounded heap)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int, int, int, int]] = []

    def offer(
        self,
        kl: torch.Tensor,
        prompts: torch.Tensor,
        positions: torch.Tensor,
        guesses: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Offer one batch's real positions, flat: KL, prompt and position; ``guesses``
        gives both models' next tokens at the chosen ones (an argmax over the
        vocabulary costs ten times a max, so only the batch's top k pay it)."""
        take = min(self.k, len(kl))
        if not take:
            return
        top = kl.topk(take).indices
        base_next, ckpt_next = guesses(top)
        columns = (kl[top], prompts[top], positions[top], base_next, ckpt_next)
        for item in zip(*(column.tolist() for column in columns), strict=True):
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)

    def frame(self, token_lists: list[list[int]], tokenizer: Any) -> pd.DataFrame:
        """The positions found, largest KL first, as `ModelDiff.tokens`."""
        found = sorted(self.heap, reverse=True)
        pieces: list[list[int]] = []  # per row: the context before, the token, both guesses
        for _, prompt, position, base_id, ckpt_id in found:
            ids = token_lists[prompt]
            pieces += [ids[max(1, position - CONTEXT_BEFORE) : position], [ids[position]]]
            pieces += [[base_id], [ckpt_id]]
        text = decode_each(tokenizer, pieces)
        before, token = text[0::4], text[1::4]
        return pd.DataFrame(
            {
                "prompt": np.array([row[1] for row in found], dtype=np.int64),
                "position": np.array([row[2] for row in found], dtype=np.int64),
                "token": token,
                "context": [f"{left}⟦{right}⟧" for left, right in zip(before, token, strict=True)],
                "kl": np.array([row[0] for row in found], dtype=np.float64),
                "base_next": text[2::4],
                "checkpoint_next": text[3::4],
            },
            columns=list(TOKEN_COLUMNS),
        )


def _residuals_and_logits(bridge: Any, tokens: torch.Tensor, mask: torch.Tensor, hooks: list[Any]):
    """Logits at the real positions (``mask``), flat ``[positions, vocab]`` in the
    order of ``mask.nonzero()``, and the residual stream after every block read
    off its hook point at those positions (``[positions, d_model]`` each).

    The unembedding is handed only the real positions' final-normed stream (a
    pre-hook on the model's output embedding), so padding and BOS cost no
    logits; what the model does after the unembedding (Gemma 2's logit
    soft-capping) still applies, as it is the model's own forward. A model whose
    output embedding cannot be found, or is handed something other than the
    ``[batch, positions, d_model]`` stream, computes every position's logits and
    they are gathered after.
    """
    device = next(bridge.original_model.parameters()).device
    mask = mask.to(device)
    captured: list[torch.Tensor] = []
    handles = [
        hook.register_forward_hook(lambda module, args, output: captured.append(output[mask]))
        for hook in hooks
    ]
    gathered: list[bool] = []

    def real_positions(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = next((name for name in ("input", "hidden_states") if name in kwargs), None)
        stream = args[0] if args else kwargs.get(key) if key else None
        if gathered or not isinstance(stream, torch.Tensor) or stream.shape[:2] != mask.shape:
            return None  # left as it is: the logits are gathered after the forward
        gathered.append(True)
        if args:
            return (stream[mask][None], *args[1:]), kwargs
        assert key is not None
        return args, {**kwargs, key: stream[mask][None]}

    unembedding = bridge.original_model.get_output_embeddings()
    if unembedding is not None:
        handles.append(unembedding.register_forward_pre_hook(real_positions, with_kwargs=True))
    try:
        logits = bridge(tokens.to(device), return_type="logits")
    finally:
        for handle in handles:
            handle.remove()
    return (logits[0] if gathered else logits[mask]), captured


def _next_token_kls(base_logits: torch.Tensor, ckpt_logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ checkpoint) per row of two ``[positions, vocab]`` logit arrays, in row
    chunks small enough to stay in cache."""
    vocab = base_logits.shape[-1]
    ckpt_logits = ckpt_logits.to(base_logits.device)
    rows = max(1, KL_CHUNK_BYTES // (4 * vocab))
    parts = [
        _next_token_kl(base_logits[start : start + rows], ckpt_logits[start : start + rows]).cpu()
        for start in range(0, len(base_logits), rows)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _next_token_kl(base_logits: torch.Tensor, ckpt_logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ checkpoint) per row of logits, Σ p·(log p − log q), from PyTorch's
    fused softmax kernels (each cheaper than one plain ``exp`` over the row)."""
    base_logits, ckpt_logits = base_logits.float(), ckpt_logits.float()
    gap = base_logits.log_softmax(-1) - ckpt_logits.log_softmax(-1)
    return torch.linalg.vecdot(base_logits.softmax(-1), gap).clamp_min(0.0).double()


def _guesses(
    base_logits: torch.Tensor, ckpt_logits: torch.Tensor, chosen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each model's most likely next token at the rows ``chosen`` of the flat logits."""
    base_rows = base_logits[chosen.to(base_logits.device)]
    ckpt_rows = ckpt_logits[chosen.to(ckpt_logits.device)]
    return base_rows.argmax(-1).cpu(), ckpt_rows.argmax(-1).cpu()


Fill = Callable[[torch.Tensor], None]  # writes one ΔW, as float32, into the buffer it is given


def _stable_ranks(deltas: list[torch.Tensor]) -> list[float | None]:
    """‖Δ‖_F² / σ_max² of each matrix; see `_delta_stats`."""
    jobs = [(tuple(d.shape), d.device, _copier(d)) for d in deltas]
    return [rank for _, rank in _delta_stats(jobs)]


def _copier(delta: torch.Tensor) -> Fill:
    def fill(out: torch.Tensor) -> None:
        out.copy_(delta)

    return fill


def _subtracter(weight: torch.Tensor, other: torch.Tensor) -> Fill:
    """ΔW = other − weight, exact in float32 (half-precision values are widened first)."""

    def fill(out: torch.Tensor) -> None:
        left, right = other.to(out.device), weight
        if left.dtype != torch.float32 or right.dtype != torch.float32:
            left, right = left.float(), right.float()
        torch.sub(left, right, out=out)

    return fill


def _delta_stats(
    jobs: list[tuple[tuple[int, ...], torch.device, Fill]],
) -> list[tuple[float, float | None]]:
    """(‖ΔW‖_F, stable rank ‖ΔW‖_F² / σ_max²) of each (shape, device, fill) job.

    Matrices of one shape are stacked, in float32 stacks of at most `STACK_BYTES`
    (one alive at a time), and each ΔW is written once: its norm and σ_max both
    come from the stack. Small matrices (under `MERGED_ELEMENTS`) with the same
    narrow side share one stack whatever their other side: each is written
    transposed if need be, and zero-padded to the widest, which changes neither
    its norm nor its singular values, so a model's many small shapes cost one
    iteration rather than one each. σ_max² comes from `_top_sigma2` (block
    Lanczos); a zero ΔW has no rank (None).
    """
    stats: list[tuple[float, float | None]] = [(0.0, None)] * len(jobs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, (shape, device, _) in enumerate(jobs):
        small = shape[0] * shape[1] < MERGED_ELEMENTS
        key = ("merged", min(shape), device) if small else ("exact", shape, device)
        groups.setdefault(key, []).append(index)
    for (kind, size, device), indices in groups.items():
        if kind == "exact":
            rows, columns = size
        else:  # [narrow, widest]
            rows, columns = size, max(max(jobs[index][0]) for index in indices)
        per_stack = max(1, STACK_BYTES // (4 * rows * columns))
        for start in range(0, len(indices), per_stack):
            chunk = indices[start : start + per_stack]
            stack = torch.empty(len(chunk), rows, columns, dtype=torch.float32, device=device)
            for slot, index in enumerate(chunk):
                shape, _, fill = jobs[index]
                if kind == "exact":
                    fill(stack[slot])
                    continue
                if shape[0] == rows:
                    width = shape[1]
                    fill(stack[slot, :, :width])
                else:  # tall: written into the transpose of its slot
                    width = shape[0]
                    fill(stack[slot, :, :width].T)
                stack[slot, :, width:] = 0.0  # the padding
            norms = _row_summed_norms(stack)
            moved = norms > 0
            sigma2 = torch.zeros_like(norms)
            if bool(moved.any()):
                chosen = stack if bool(moved.all()) else stack[moved]
                sigma2[moved] = _top_sigma2(chosen, norms[moved] ** 2)
            for slot, index in enumerate(chunk):
                norm, top = float(norms[slot]), float(sigma2[slot])
                stats[index] = (norm, norm**2 / top if norm > 0 and top > 0 else None)
            del stack
    return stats


def _row_summed_norms(stack: torch.Tensor) -> torch.Tensor:
    """‖·‖_F of each matrix of a stack, float32 norms of its rows summed in float64.

    PyTorch's float32 norm over a whole large matrix drifts as the running sums
    grow: 7.5e-4 low at 16M elements, 4% at a 128,256 × 2,048 embedding; rows of a
    few thousand elements stay within 1e-8 (tests/unit/test_stats.py).
    """
    rows = torch.linalg.vector_norm(stack, dim=-1)  # [g, rows]
    return torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float64)


def _frobenius(tensor: torch.Tensor) -> float:
    """‖tensor‖_F as `_row_summed_norms` sums it (any shape, any float dtype)."""
    flat = tensor.detach()
    if flat.ndim < 2:
        return float(torch.linalg.vector_norm(flat, dtype=torch.float64))
    return float(_row_summed_norms(flat.float().reshape(1, -1, flat.shape[-1]))[0])


def _top_sigma2(
    stack: torch.Tensor, energy: torch.Tensor, steps: int = LANCZOS_STEPS
) -> torch.Tensor:
    """σ_max² of each matrix of a float32 stack [g, m, n], by block Lanczos on Δ·Δᵀ.

    Works on the narrower side with a block of `SUBSPACE` random vectors; each step
    costs two passes over the stack (Δᵀ·q, then Δ·that) and adds a block to an
    orthonormal Krylov basis Q (fully re-orthogonalised), and σ_max² is estimated
    by the largest eigenvalue of T = Qᵀ·Δ·Δᵀ·Q. It stops when every estimate moves
    by less than 1e-5 of itself, when Q holds the whole space, or after ``steps``;
    in float32 also when trace T, the energy Q holds, is all but 1e-5 of
    ``energy`` (each ‖Δ‖_F²), for then σ_max² is off by at most 1e-5·‖Δ‖_F².
    An update of rank ≤ `SUBSPACE` is exact after one step, and Krylov converges
    on a spectrum with no dominant direction far faster than subspace iteration:
    on Gaussian noise of 768 × 3,072, 8 steps read σ_max² under 0.5% low (the stable
    rank high; tests/unit/test_stats.py bounds it). Where bfloat16 products are fast
    (`fast_bfloat16`) and the stack is large, the passes run on a bfloat16 copy and
    one last float32 pass over the top Ritz vectors gives the estimate, so it is
    always a Rayleigh quotient of the float32 ΔW: never above the true σ_max².
    """
    count, rows, columns = stack.shape
    tall = rows > columns  # then Δ·Δᵀ is taken on the column side: Δ stands for stackᵀ
    narrow = min(rows, columns)
    width = min(SUBSPACE, narrow)
    low = stack
    large = stack.numel() >= LOW_PRECISION_ELEMENTS and rows * columns >= MERGED_ELEMENTS
    if large and fast_bfloat16(stack.device):
        low = stack.to(torch.bfloat16)

    # Δ·Δᵀ·block is two passes, every product taking the stack untransposed (a
    # transposed bfloat16 operand can be 15x slower on CPU): first M = Δᵀ·block
    # (kept as the stack's product gives it), then Δ·M.
    def first_half(block: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        if tall:
            return matrix @ block.to(matrix.dtype)  # [g, rows, w]
        return block.transpose(1, 2).contiguous().to(matrix.dtype) @ matrix  # [g, w, columns]

    def second_half(half: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        if tall:
            return (half.transpose(1, 2).contiguous() @ matrix).float().transpose(1, 2)
        return (matrix @ half.transpose(1, 2).contiguous()).float()

    probe = _probe(count, width, max(rows, columns)).to(stack.device, low.dtype)
    if tall:  # Δ·probe, as rows
        start = (probe @ low).float().transpose(1, 2)
    else:
        start = (low @ probe.transpose(1, 2).contiguous()).float()
    block = torch.linalg.qr(start).Q  # [g, narrow, w]
    basis = block
    projected = torch.zeros(count, 0, 0, dtype=torch.float64, device=stack.device)
    estimate = torch.zeros(count, dtype=torch.float64, device=stack.device)
    vectors: torch.Tensor | None = None
    for step in range(steps):
        half = first_half(block, low)
        if step == 0 and low is stack:
            # T = Mᵀ·M already: when the start block holds all of each ΔW's energy
            # (an update of rank <= SUBSPACE), it is exact without the second pass
            start_t = half.transpose(1, 2) @ half if tall else half @ half.transpose(1, 2)
            start_t = start_t.double()
            start_t = (start_t + start_t.transpose(1, 2)) / 2
            if bool((torch.diagonal(start_t, dim1=1, dim2=2).sum(-1) >= (1 - 1e-5) * energy).all()):
                return torch.linalg.eigvalsh(start_t)[:, -1].clamp_min(0.0)
        image = second_half(half, low)
        column = basis.transpose(1, 2) @ image  # T's newest block column [g, k, w]
        size, old = basis.shape[2], basis.shape[2] - block.shape[2]
        grown = torch.zeros(count, size, size, dtype=torch.float64, device=stack.device)
        grown[:, :old, :old] = projected
        grown[:, :, old:] = column.double()
        grown[:, old:, :old] = column[:, :old].transpose(1, 2).double()
        projected = (grown + grown.transpose(1, 2)) / 2
        last = size == narrow or step == steps - 1
        # captured (float32 only): Q holds all but a sliver of each ΔW's energy
        held = low is stack and bool(
            (torch.diagonal(projected, dim1=1, dim2=2).sum(-1) >= (1 - 1e-5) * energy).all()
        )
        if held or last or step in CHECKED_STEPS:  # T's eigenvalues cost k³: not every step
            if last and low is not stack:  # the Ritz vectors are wanted: one eigh for both
                values, vectors = torch.linalg.eigh(projected)
                values = values[:, -1]
            else:
                values = torch.linalg.eigvalsh(projected)[:, -1]
            converged = held or bool(((values - estimate).abs() <= 1e-5 * values).all())
            estimate = values
            if converged or last:
                break
        image = image - basis @ column
        image = image - basis @ (basis.transpose(1, 2) @ image)  # re-orthogonalised
        block = torch.linalg.qr(image).Q[:, :, : narrow - size]  # the last may be narrower
        basis = torch.cat([basis, block], dim=2)
    if low is stack:
        return estimate.clamp_min(0.0)
    if vectors is None:  # converged before the last step
        vectors = torch.linalg.eigh(projected).eigenvectors
    top = vectors[:, :, -width:].to(basis.dtype)
    ritz = torch.linalg.qr(basis[:, :, : projected.shape[1]] @ top).Q
    # one float32 pass: U = the top Ritz vectors, σ_max² ≥ λ_max(Uᵀ·Δ·Δᵀ·U)
    if tall:
        image = (stack @ ritz).transpose(1, 2)
    else:
        image = ritz.transpose(1, 2).contiguous() @ stack
    gram = (image @ image.transpose(1, 2)).double()
    return torch.linalg.eigvalsh((gram + gram.transpose(1, 2)) / 2)[:, -1].clamp_min(0.0)


@functools.lru_cache(maxsize=16)
def _probe(count: int, width: int, size: int) -> torch.Tensor:
    """The Lanczos start block: seeded, so the same for a shape every time (kept)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(count, width, size, generator=generator)


def _shared_switch(base: Any, checkpoint: Any) -> Any:
    """The `AdapterSwitch` when both sides are views of one model with an adapter."""
    from ._switch import SwitchedBridge

    if isinstance(base, SwitchedBridge) and isinstance(checkpoint, SwitchedBridge):
        if base._switch is checkpoint._switch:
            return base._switch
    return None


def _adapter_rows(base: Any, switch: Any) -> list[dict[str, Any]]:
    """Module rows of a LoRA adapter read as B·A, never merged for the purpose.

    `can_switch` admitted only LoRA adapters that train no bias and save no whole
    module, so every tensor that is not a LoRA layer's base weight is unchanged.
    A plain LoRA layer's ΔW = s·B·A is summed from its factors: with B = Q_B R_B
    and Aᵀ = Q_A R_A, the singular values of ΔW are those of the r × r product
    s·R_B R_Aᵀ, so ‖ΔW‖_F and σ_max are exact. Other variants (DoRA, LoRA on an
    embedding) give their ΔW through PEFT's ``get_delta_weight``.
    """
    from .models import bridge_tensor_paths, bridge_tensors

    switch.use("base")  # the base weights, adapter unmerged
    original = base.original_model
    paths = bridge_tensor_paths(original)
    base_state = bridge_tensors(original)
    rows: list[dict[str, Any]] = []
    dense: dict[int, tuple[tuple[int, ...], torch.device, Fill]] = {}
    sizes: dict[int, float] = {}  # row -> ‖W‖_F of each LoRA layer's base weight
    for name, weight in base_state.items():
        path = paths[name]
        row = _unchanged_row(name, weight)
        rows.append(row)
        if not path.endswith(".base_layer.weight"):
            continue
        layer = original.get_submodule(path.removesuffix(".base_layer.weight"))
        factors, deltas = _lora_parts(layer)
        if not factors and not deltas:
            continue
        sizes[len(rows) - 1] = _frobenius(weight)
        if deltas:
            total = sum(deltas[1:], deltas[0])
            dense[len(rows) - 1] = (tuple(total.shape), total.device, _copier(total))
            continue
        singular = _factor_singular_values(factors)
        row["abs_change"] = float(singular.norm())
        if row["abs_change"]:
            row["stable_rank"] = float(singular.pow(2).sum() / singular[0] ** 2)
    for row_index, (change, rank) in zip(dense, _delta_stats(list(dense.values())), strict=True):
        rows[row_index].update(abs_change=change, stable_rank=rank)
    for row_index, size in sizes.items():
        change = rows[row_index]["abs_change"]
        rows[row_index].update(rel_change=change / size if size else None, changed=change > 0)
    return rows


def _unchanged_row(name: str, weight: torch.Tensor) -> dict[str, Any]:
    """A `ModelDiff.modules` row for the tensor ``name``, filled in as unchanged."""
    return {
        "module": name,
        "shape": " × ".join(map(str, weight.shape)),
        "rel_change": 0.0,
        "abs_change": 0.0,
        "stable_rank": None,
        "changed": False,
    }


def _lora_parts(layer: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """A LoRA layer's active adapters: (s·B, A) factor pairs, or dense ΔWs for the rest."""
    factors: list[tuple[torch.Tensor, torch.Tensor]] = []
    deltas: list[torch.Tensor] = []
    for adapter in getattr(layer, "active_adapters", []):
        plain = (
            adapter in getattr(layer, "lora_A", {})
            and not getattr(layer, "use_dora", {}).get(adapter, False)
            and getattr(layer, "lora_variant", {}).get(adapter) is None
        )
        if plain:
            scaled_b = layer.lora_B[adapter].weight.double() * layer.scaling[adapter]
            factors.append((scaled_b, layer.lora_A[adapter].weight.double()))
        elif hasattr(layer, "get_delta_weight"):
            deltas.append(layer.get_delta_weight(adapter).float())
    if factors and deltas:  # mixed variants on one layer: add them up densely
        deltas += [(b @ a).float() for b, a in factors]
        factors = []
    return factors, deltas


def _factor_singular_values(factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Singular values of Σ B_i·A_i from the factors (transposing ΔW changes none)."""
    b = torch.cat([b for b, _ in factors], dim=1)  # [out, R]
    a = torch.cat([a for _, a in factors], dim=0)  # [R, in]
    _, r_b = torch.linalg.qr(b)
    _, r_a = torch.linalg.qr(a.T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def _module_rows(base: Any, checkpoint: Any) -> list[dict[str, Any]]:
    from .models import bridge_tensors, hf_state_dict

    switch = _shared_switch(base, checkpoint)
    if switch is not None:
        return _adapter_rows(base, switch)
    base_state = hf_state_dict(base)  # the plain HF names, once
    if getattr(checkpoint, "compatibility_mode", False):
        hf_state_dict(checkpoint)  # raises the clear error for processed weights
    ckpt_state = bridge_tensors(checkpoint.original_model)
    rows: list[dict[str, Any]] = []
    matrices: dict[int, tuple[tuple[int, ...], torch.device, Fill]] = {}  # changed ones
    seen: dict[tuple[int, int, torch.Size], int] = {}  # storage pair -> its first row
    copies: dict[int, int] = {}  # row of a tied tensor -> the row it repeats
    for name, weight in base_state.items():
        other = ckpt_state.get(name)
        if other is None or other.shape != weight.shape:
            raise AquinError(
                f"the checkpoint has no tensor {name} of shape {tuple(weight.shape)}; "
                "it is not a fine-tune of this model"
            )
        key = (weight.data_ptr(), other.data_ptr(), weight.shape)
        if key in seen:  # tied weights (an embedding and its unembedding): once
            copies[len(rows)] = seen[key]
            rows.append({"module": name})
            continue
        seen[key] = len(rows)
        row = _unchanged_row(name, weight)
        rows.append(row)
        same = other
        if other.device != weight.device or other.dtype != weight.dtype:
            same = other.to(weight.device, weight.dtype)
        if torch.equal(same, weight):
            continue
        if weight.ndim == 2:  # its norm and rank come from one stacked ΔW
            matrices[len(rows) - 1] = (
                tuple(weight.shape),
                weight.device,
                _subtracter(weight, other),
            )
            continue
        # exact in float32 wherever the two values are within 2x of each other
        change = _frobenius(other.to(weight.device).float() - weight.float())
        size = _frobenius(weight)
        row.update(
            rel_change=change / size if size else (0.0 if change == 0 else None),
            abs_change=change,
            changed=change > 0,
        )
    for index, (change, rank) in zip(matrices, _delta_stats(list(matrices.values())), strict=True):
        size = _frobenius(base_state[rows[index]["module"]])
        rows[index].update(
            rel_change=change / size if size else None,
            abs_change=change,
            stable_rank=rank,
            changed=change > 0,
        )
    for index, first in copies.items():
        rows[index] = {**rows[first], "module": rows[index]["module"]}
    return rows


@verb("model_diff")
@quiet_unless_progress
def model_diff(
    model: Any,
    checkpoint: Any,
    prompts: Any = None,
    name: str | None = None,
    *,
    batch_size: int = 16,
    context_size: int = DEFAULT_CONTEXT,
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> ModelDiff:
    """SAE-free signals of what a fine-tune changed: KL, layer drift, promoted tokens, weights.

    Args:
        model: catalog slug, local model directory, or a loaded ``TransformerBridge``.
        checkpoint: anything `sae_diff` takes (a checkpoint file, an HF or PEFT
            adapter directory, a loaded model).
        prompts: a JSON/JSONL file, a list, or ``None`` for the shipped probe set.
        name: label for the checkpoint; defaults to its file stem.
        context_size: prompts are cut to this many tokens (BOS included).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` for both models.

    Returns a `ModelDiff`; its ``summary["suggested_layer"]`` is the first layer
    whose drift reaches `DRIFT_THRESHOLD`.

    Example:
        >>> md = model_diff("tiny-gpt2", checkpoint, progress=False)
        >>> md.tokens[["context", "base_next", "checkpoint_next"]].shape[1], len(md.layers)
        (3, 4)
    """
    if batch_size < 1:
        raise AquinError(f"batch_size must be at least 1, got {batch_size}")
    base, ckpt, default_name, _ = load_pair(model, checkpoint, device, dtype, switch_adapter=True)
    model_label = (
        bridge_label(base)
        if not isinstance(model, (str, Path))
        else str(getattr(base, "aquin_label", model))
    )
    texts = load_prompts(prompts, base.tokenizer)
    limit = min(int(base.cfg.n_ctx), context_size)
    token_lists = tokenize_prompts(base.tokenizer, texts, prepend_bos=True, max_length=limit)
    for index, ids in enumerate(token_lists):
        if len(ids) < 3:  # BOS and at least two tokens: one next-token step to compare
            raise AquinError(
                f"prompt {index} ({texts[index][:40]!r}) is shorter than 2 tokens; "
                "model_diff compares next-token predictions inside each prompt"
            )
    n_layers = int(base.cfg.n_layers)
    modules = _module_rows(base, ckpt)

    d_model = int(base.cfg.d_model)
    drift = torch.zeros(n_layers, dtype=torch.float64)
    cosine = torch.zeros(n_layers, dtype=torch.float64)
    shift = torch.zeros(n_layers, d_model, dtype=torch.float64)
    n_tokens = 0
    kl_sums = torch.zeros(len(token_lists), dtype=torch.float64)
    kl_maxes = torch.zeros(len(token_lists), dtype=torch.float64)
    kl_counts = torch.zeros(len(token_lists), dtype=torch.float64)
    top = _TopTokens(TOP_TOKENS)
    # hook_resid_post is the bridge's alias of each block's hook_out
    base_hooks = [base.blocks[layer].hook_out for layer in range(n_layers)]
    ckpt_hooks = [ckpt.blocks[layer].hook_out for layer in range(n_layers)]
    # prompts of like length share a batch: less padding to run through both models
    batches = token_batches(token_lists, batch_size=batch_size, skip_first=True, by_length=True)
    total = (len(token_lists) + batch_size - 1) // batch_size
    # inference mode, not just no_grad: no version counters or view tracking on the
    # many small tensors of a forward (2% of a call on tiny-gpt2); nothing made here
    # outlives the call but frames (an adapter's switch leaves inference mode itself)
    with torch.inference_mode():
        progress_bar = tqdm(batches, total=total, desc="model diff", disable=not progress)
        for number, batch in enumerate(progress_bar):
            # alternate which side runs first: an adapter switched on one model
            # then changes side once a batch, not twice
            order = 1 if number % 2 == 0 else -1
            sides = [(base, base_hooks), (ckpt, ckpt_hooks)][::order]
            outputs = [
                _residuals_and_logits(side, batch.tokens, batch.mask, hooks)
                for side, hooks in sides
            ]
            (base_logits, base_acts), (ckpt_logits, ckpt_acts) = outputs[::order]
            rows, positions = batch.mask.nonzero(as_tuple=True)
            prompts = batch.prompt_index[rows]
            kl = _next_token_kls(base_logits, ckpt_logits)
            kl_sums.index_add_(0, prompts, kl)
            kl_counts.index_add_(0, prompts, torch.ones_like(kl))
            kl_maxes.scatter_reduce_(0, prompts, kl, reduce="amax")
            top.offer(kl, prompts, positions, functools.partial(_guesses, base_logits, ckpt_logits))
            n_tokens += len(kl)
            # every layer at once: [layers, real positions, d_model]
            x_base = torch.stack(base_acts).float()
            x_ckpt = torch.stack(ckpt_acts).to(x_base.device).float()
            difference = x_ckpt - x_base
            base_norm, ckpt_norm = x_base.norm(dim=-1), x_ckpt.norm(dim=-1)
            relative = difference.norm(dim=-1) / base_norm.clamp_min(1e-12)
            cosines = torch.linalg.vecdot(x_base, x_ckpt) / (base_norm * ckpt_norm).clamp_min(1e-8)
            drift += relative.sum(-1, dtype=torch.float64).cpu()
            cosine += cosines.sum(-1, dtype=torch.float64).cpu()
            shift += difference.sum(1, dtype=torch.float64).cpu()
            # the batch's logits and activations go before the next batch's forwards
            # (at a 50,257-token vocabulary the logits are 96 MB a side)
            del outputs, base_logits, ckpt_logits, base_acts, ckpt_acts
            del x_base, x_ckpt, difference
    kl_sum, kl_max, kl_count = kl_sums.numpy(), kl_maxes.numpy(), kl_counts.numpy()
    drift_mean, cosine_mean = (drift / n_tokens).numpy(), (cosine / n_tokens).numpy()

    layers = pd.DataFrame(
        {"layer": np.arange(n_layers), "rel_drift": drift_mean, "cosine": cosine_mean}
    )
    promoted = _promoted(base, shift / n_tokens)
    suggested, reason = _suggest_layer(drift_mean)
    prompt_frame = pd.DataFrame(
        {
            "prompt": np.arange(len(token_lists)),
            "text": [text[:200] for text in texts],
            "mean_kl": kl_sum / np.maximum(kl_count, 1),
            "max_kl": kl_max,
            "n_tokens": kl_count.astype(int),
        }
    )
    modules.sort(key=_largest_change_first)
    module_frame = pd.DataFrame(
        {column: [row[column] for row in modules] for column in MODULE_COLUMNS},
        columns=list(MODULE_COLUMNS),
    )
    summary = {
        "model": model_label,
        "checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else default_name,
        "name": name or default_name,
        "n_prompts": len(token_lists),
        "n_tokens": n_tokens,
        "mean_kl": float(kl_sum.sum() / n_tokens),
        "max_kl": float(kl_max.max()),
        "n_layers": n_layers,
        "suggested_layer": suggested,
        "suggestion": reason,
        "drift_threshold": DRIFT_THRESHOLD,
        "n_modules_changed": sum(bool(row["changed"]) for row in modules),
        "n_modules": len(modules),
        "tool_version": __version__,
    }
    return ModelDiff(
        summary=summary,
        tokens=top.frame(token_lists, base.tokenizer),
        prompts=prompt_frame,
        layers=layers,
        promoted=promoted,
        modules=module_frame,
    )


def _promoted(bridge: Any, mean_shift: torch.Tensor) -> pd.DataFrame:
    """The logit lens (`aquin_nb._lens`) of each layer's mean activation difference."""
    moved = [layer for layer, direction in enumerate(mean_shift) if bool(direction.abs().sum())]
    if not moved:
        return pd.DataFrame(columns=list(PROMOTED_COLUMNS))
    lens = logit_lens(bridge, mean_shift[moved], PROMOTED_TOKENS)

    def column(suffix: str) -> torch.Tensor:  # [layer, promoted/suppressed, rank], flat
        return torch.stack([getattr(lens, f"{side}{suffix}") for side in ("top", "bottom")], 1)

    ids, cosines, logits = (column(suffix).reshape(-1) for suffix in ("", "_cosine", "_logit"))
    k = int(lens.top.shape[1])
    # plain lists and typed arrays: pandas converts a numpy array of strings slowly
    return pd.DataFrame(
        {
            "layer": np.repeat(moved, 2 * k),
            "direction": (["promoted"] * k + ["suppressed"] * k) * len(moved),
            "rank": np.tile(np.arange(1, k + 1), 2 * len(moved)),
            "token": decode_tokens(bridge.tokenizer, ids.tolist()),
            "token_id": ids.numpy(),
            "cosine": cosines.double().numpy(),
            "logit": logits.double().numpy(),
        },
        columns=list(PROMOTED_COLUMNS),
    )


def _largest_change_first(row: dict[str, Any]) -> tuple[float, str]:
    change = row["abs_change"]
    return (-change if change == change else math.inf, row["module"])  # NaN last


def _suggest_layer(drift: np.ndarray) -> tuple[int | None, str]:
    """The first layer whose drift reaches `DRIFT_THRESHOLD`, and why, in words."""
    above = np.flatnonzero(drift >= DRIFT_THRESHOLD)
    if len(above):
        layer = int(above[0])
        return layer, (
            f"drift first reaches {DRIFT_THRESHOLD:.0%} at layer {layer} "
            f"({float(drift[layer]):.1%} of the residual norm): the fine-tune starts to act there"
        )
    if float(drift.max()) == 0.0:
        return None, "no layer moved: the checkpoint computes what the base computes"
    peak = int(drift.argmax())
    return peak, (
        f"drift stays under {DRIFT_THRESHOLD:.0%} at every layer; it is largest at layer {peak} "
        f"({float(drift[peak]):.2%})"
    )
