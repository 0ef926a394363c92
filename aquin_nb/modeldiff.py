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

import heapq
import logging
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
from ._lens import logit_lens
from ._quiet import quiet_unless_progress
from ._verbs import verb
from .probes import load_prompts
from .results import PROMOTED_COLUMNS, TOKEN_COLUMNS, ModelDiff

logger = logging.getLogger(__name__)

__all__ = ["DRIFT_THRESHOLD", "ModelDiff", "model_diff"]

# The first layer whose residual stream moved by this fraction of its norm is
# where the card points: a layer that moved 5% has visibly changed what it carries.
DRIFT_THRESHOLD = 0.05
TOP_TOKENS = 50
PROMOTED_TOKENS = 10
CONTEXT_BEFORE = 8
STACK_BYTES = 256 * 2**20  # the stable ranks' batched iteration, per stack
SUBSPACE = 16  # vectors in that iteration's block
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
        base_next: torch.Tensor,
        ckpt_next: torch.Tensor,
    ) -> None:
        """Offer one batch's real positions, flat: KL, prompt, position and both guesses."""
        take = min(self.k, len(kl))
        if not take:
            return
        top = kl.topk(take).indices
        columns = (kl[top], prompts[top], positions[top], base_next[top], ckpt_next[top])
        for item in zip(*(column.tolist() for column in columns), strict=True):
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)

    def rows(self, token_lists: list[list[int]], tokenizer: Any) -> list[dict[str, Any]]:
        rows = []
        for kl, prompt, position, base_next, ckpt_next in sorted(self.heap, reverse=True):
            ids = token_lists[prompt]
            before = tokenizer.decode(ids[max(1, position - CONTEXT_BEFORE) : position])
            rows.append(
                {
                    "prompt": prompt,
                    "position": position,
                    "token": tokenizer.decode([ids[position]]),
                    "context": f"{before}⟦{tokenizer.decode([ids[position]])}⟧",
                    "kl": kl,
                    "base_next": tokenizer.decode([base_next]),
                    "checkpoint_next": tokenizer.decode([ckpt_next]),
                }
            )
        return rows


def _residuals_and_logits(bridge: Any, tokens: torch.Tensor, hooks: list[Any]):
    """Logits, and the residual stream after every block read off its hook point."""
    captured: list[torch.Tensor] = []
    handles = [
        hook.register_forward_hook(lambda module, args, output: captured.append(output))
        for hook in hooks
    ]
    try:
        device = next(bridge.original_model.parameters()).device
        logits = bridge(tokens.to(device), return_type="logits")
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def _kl_and_guesses(
    base_logits: torch.Tensor, ckpt_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL and each model's most likely next token at the real positions, in row chunks
    small enough to stay in cache (no copy of the batch's logits)."""
    vocab = base_logits.shape[-1]
    where = mask.reshape(-1).nonzero()[:, 0]
    base_flat = base_logits.reshape(-1, vocab)
    ckpt_flat = ckpt_logits.reshape(-1, vocab).to(base_logits.device)
    rows = max(1, KL_CHUNK_BYTES // (4 * vocab))
    kl, base_next, ckpt_next = [], [], []
    for start in range(0, len(where), rows):
        chosen = where[start : start + rows]
        base_part, ckpt_part = base_flat[chosen], ckpt_flat[chosen]
        kl.append(_next_token_kl(base_part, ckpt_part).cpu())
        base_next.append(base_part.argmax(-1).cpu())
        ckpt_next.append(ckpt_part.argmax(-1).cpu())
    return torch.cat(kl), torch.cat(base_next), torch.cat(ckpt_next)


def _next_token_kl(base_logits: torch.Tensor, ckpt_logits: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ checkpoint) per row of logits: Σ p·(ℓ_b − ℓ_c) − (lse_b − lse_c)."""
    base_logits, ckpt_logits = base_logits.float(), ckpt_logits.float()
    base_lse = base_logits.logsumexp(-1, keepdim=True)
    ckpt_lse = ckpt_logits.logsumexp(-1)
    probabilities = (base_logits - base_lse).exp_()
    gap = torch.linalg.vecdot(probabilities, base_logits - ckpt_logits)
    return (gap - base_lse.squeeze(-1) + ckpt_lse).clamp_min(0.0).double()


def _stable_ranks(deltas: list[torch.Tensor]) -> list[float]:
    """‖Δ‖_F² / σ_max² of each matrix; see `_lazy_stable_ranks`."""
    return _lazy_stable_ranks([(tuple(d.shape), _held(d)) for d in deltas])


def _lazy_stable_ranks(
    jobs: list[tuple[tuple[int, ...], Callable[[], torch.Tensor]]], tolerance: float = 1e-5
) -> list[float]:
    """‖Δ‖_F² / σ_max² of each (shape, make ΔW) job, σ_max by subspace iteration.

    Matrices of one shape iterate together, batched, in float32 stacks of at most
    `STACK_BYTES` (made when their stack is, so no more than one stack is alive),
    on a block of `SUBSPACE` vectors, until every σ_max² moves by less than
    ``tolerance`` of itself, or for 10 steps. No full SVD. A LoRA update of rank
    ≤ `SUBSPACE` is exact after one step. An update with no dominant direction
    converges at (σ₁₇/σ₁)² a step and stops at the cap, where σ_max² is a lower
    bound and the rank an upper one: on Gaussian noise of 768 × 3,072 it reads
    3% high (tests/unit/test_stats.py measures it).
    """
    ranks = [0.0] * len(jobs)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, (shape, _) in enumerate(jobs):
        by_shape.setdefault(shape, []).append(index)
    for shape, indices in by_shape.items():
        per_stack = max(1, STACK_BYTES // (4 * shape[0] * shape[1]))
        for start in range(0, len(indices), per_stack):
            chunk = indices[start : start + per_stack]
            stack = torch.stack([jobs[index][1]().float() for index in chunk])
            for index, rank in zip(chunk, _subspace_ranks(stack, tolerance), strict=True):
                ranks[index] = rank
            del stack
    return ranks


def _subspace_ranks(stack: torch.Tensor, tolerance: float, iterations: int = 10) -> list[float]:
    if stack.shape[1] > stack.shape[2]:
        stack = stack.transpose(1, 2).contiguous()  # iterate on the narrower side
    squared = torch.linalg.vector_norm(stack, dim=(1, 2), dtype=torch.float64) ** 2
    width = min(SUBSPACE, stack.shape[1])
    generator = torch.Generator(device="cpu").manual_seed(0)
    block = torch.randn(stack.shape[0], stack.shape[2], width, generator=generator)
    block = torch.linalg.qr(block.to(stack.device)).Q  # orthonormal: σ(Δ·block) ≤ σ(Δ)
    sigma2 = torch.zeros(stack.shape[0], dtype=torch.float64, device=stack.device)
    for _ in range(iterations):
        image, triangle = torch.linalg.qr(stack @ block)  # [g, m, w], [g, w, w]
        estimate = torch.linalg.matrix_norm(triangle, ord=2).double() ** 2
        block = torch.linalg.qr(stack.transpose(1, 2) @ image).Q
        converged = bool(((estimate - sigma2).abs() <= tolerance * estimate).all())
        sigma2 = estimate
        if converged:
            break
    return [
        float(total / top) if top > 0 else 0.0
        for total, top in zip(squared.tolist(), sigma2.tolist(), strict=True)
    ]


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
    dense: dict[int, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    for name, weight in base_state.items():
        path = paths[name]
        row = {
            "module": name,
            "shape": " × ".join(map(str, weight.shape)),
            "rel_change": 0.0,
            "abs_change": 0.0,
            "stable_rank": None,
            "changed": False,
        }
        rows.append(row)
        if not path.endswith(".base_layer.weight"):
            continue
        layer = original.get_submodule(path.removesuffix(".base_layer.weight"))
        factors, deltas = _lora_parts(layer)
        if not factors and not deltas:
            continue
        size = float(weight.float().norm())
        if deltas:
            total = sum(deltas[1:], deltas[0])
            change = float(total.norm())
            dense[len(rows) - 1] = (tuple(total.shape), _held(total))
        else:
            singular = _factor_singular_values(factors)
            change = float(singular.norm())
            row["stable_rank"] = float(singular.pow(2).sum() / singular[0] ** 2) if change else None
        row.update(
            rel_change=change / size if size else None,
            abs_change=change,
            changed=change > 0,
        )
    for row_index, rank in zip(dense, _lazy_stable_ranks(list(dense.values())), strict=True):
        rows[row_index]["stable_rank"] = rank if rows[row_index]["changed"] else None
    return rows


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


def _held(delta: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: delta


def _delta_maker(weight: torch.Tensor, other: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: other.to(weight.device).float() - weight.float()


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
    matrices: dict[int, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}  # changed
    seen: dict[tuple[int, int, torch.Size], int] = {}  # storage pair -> its first row
    copies: dict[int, int] = {}  # row of a tied tensor -> the row it repeats
    for name, weight in base_state.items():
        other = ckpt_state.get(name)
        if other is None or other.shape != weight.shape:
            raise AquinError(
                f"the checkpoint has no tensor {name} of shape {tuple(weight.shape)}; "
                "it is not a fine-tune of this model"
            )
        change, size = 0.0, 0.0
        tied = seen.get((weight.data_ptr(), other.data_ptr(), weight.shape))
        if tied is not None:  # tied weights (an embedding and its unembedding): once
            rows.append({**rows[tied], "module": name})
            if tied in matrices:
                copies[len(rows) - 1] = tied
            continue
        seen[(weight.data_ptr(), other.data_ptr(), weight.shape)] = len(rows)
        if not torch.equal(other.to(weight.device, weight.dtype), weight):
            # exact in float32 wherever the two values are within 2x of each other
            delta = other.to(weight.device).float() - weight.float()
            change = float(delta.norm())
            size = float(weight.float().norm())
            if delta.ndim == 2:  # ΔW again when its stack is made, not held till then
                matrices[len(rows)] = (tuple(delta.shape), _delta_maker(weight, other))
        rows.append(
            {
                "module": name,
                "shape": " × ".join(map(str, weight.shape)),
                "rel_change": change / size if size else (0.0 if change == 0 else None),
                "abs_change": change,
                "stable_rank": None,
                "changed": change > 0,
            }
        )
    for row, rank in zip(matrices, _lazy_stable_ranks(list(matrices.values())), strict=True):
        rows[row]["stable_rank"] = rank
    for row, tied in copies.items():
        rows[row]["stable_rank"] = rows[tied]["stable_rank"]
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
    drift = np.zeros(n_layers)
    cosine = np.zeros(n_layers)
    shift = torch.zeros(n_layers, d_model, dtype=torch.float64)
    n_tokens = 0
    kl_sums = torch.zeros(len(token_lists), dtype=torch.float64)
    kl_maxes = torch.zeros(len(token_lists), dtype=torch.float64)
    kl_counts = torch.zeros(len(token_lists), dtype=torch.float64)
    top = _TopTokens(TOP_TOKENS)
    # hook_resid_post is the bridge's alias of each block's hook_out
    base_hooks = [base.blocks[layer].hook_out for layer in range(n_layers)]
    ckpt_hooks = [ckpt.blocks[layer].hook_out for layer in range(n_layers)]
    batches = token_batches(token_lists, batch_size=batch_size, skip_first=True)
    total = (len(token_lists) + batch_size - 1) // batch_size
    with torch.no_grad():
        progress_bar = tqdm(batches, total=total, desc="model diff", disable=not progress)
        for number, batch in enumerate(progress_bar):
            # alternate which side runs first: an adapter switched on one model
            # then changes side once a batch, not twice
            order = 1 if number % 2 == 0 else -1
            sides = [(base, base_hooks), (ckpt, ckpt_hooks)][::order]
            outputs = [_residuals_and_logits(side, batch.tokens, hooks) for side, hooks in sides]
            (base_logits, base_acts), (ckpt_logits, ckpt_acts) = outputs[::order]
            mask = batch.mask.to(base_logits.device)
            rows, positions = batch.mask.nonzero(as_tuple=True)
            prompts = batch.prompt_index[rows]
            kl, base_next, ckpt_next = _kl_and_guesses(base_logits, ckpt_logits, mask)
            kl_sums.index_add_(0, prompts, kl)
            kl_counts.index_add_(0, prompts, torch.ones_like(kl))
            kl_maxes.scatter_reduce_(0, prompts, kl, reduce="amax")
            top.offer(kl, prompts, positions, base_next, ckpt_next)
            n_tokens += len(kl)
            for layer, (x_base, x_ckpt) in enumerate(zip(base_acts, ckpt_acts, strict=True)):
                x_base, x_ckpt = x_base[mask].float(), x_ckpt.to(x_base.device)[mask].float()
                difference = x_ckpt - x_base
                base_norm = x_base.norm(dim=-1)
                drift[layer] += float(
                    (difference.norm(dim=-1) / base_norm.clamp_min(1e-12)).double().sum()
                )
                cosine[layer] += float(
                    torch.nn.functional.cosine_similarity(x_base, x_ckpt, dim=-1).double().sum()
                )
                shift[layer] += difference.double().sum(0).cpu()
    kl_sum, kl_max, kl_count = kl_sums.numpy(), kl_maxes.numpy(), kl_counts.numpy()

    layers = pd.DataFrame(
        {"layer": np.arange(n_layers), "rel_drift": drift / n_tokens, "cosine": cosine / n_tokens}
    )
    promoted = _promoted(base, shift / n_tokens)
    suggested, reason = _suggest_layer(layers)
    prompt_frame = pd.DataFrame(
        {
            "prompt": np.arange(len(token_lists)),
            "text": [text[:200] for text in texts],
            "mean_kl": kl_sum / np.maximum(kl_count, 1),
            "max_kl": kl_max,
            "n_tokens": kl_count.astype(int),
        }
    )
    module_frame = pd.DataFrame(modules).sort_values(
        ["abs_change", "module"], ascending=[False, True], kind="stable"
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
        "n_modules_changed": int(module_frame["changed"].sum()),
        "n_modules": len(module_frame),
        "tool_version": __version__,
    }
    return ModelDiff(
        summary=summary,
        tokens=pd.DataFrame(top.rows(token_lists, base.tokenizer), columns=list(TOKEN_COLUMNS)),
        prompts=prompt_frame,
        layers=layers,
        promoted=promoted,
        modules=module_frame.reset_index(drop=True),
    )


def _promoted(bridge: Any, mean_shift: torch.Tensor) -> pd.DataFrame:
    """The logit lens (`aquin_nb._lens`) of each layer's mean activation difference."""
    moved = [layer for layer, direction in enumerate(mean_shift) if bool(direction.abs().sum())]
    rows = []
    if moved:
        lens = logit_lens(bridge, mean_shift[moved], PROMOTED_TOKENS)
        for index, layer in enumerate(moved):
            for kind, side in (("promoted", "top"), ("suppressed", "bottom")):
                ids = getattr(lens, side)[index].tolist()
                cosines = getattr(lens, f"{side}_cosine")[index].tolist()
                logits = getattr(lens, f"{side}_logit")[index].tolist()
                for rank, (token, cosine, logit) in enumerate(
                    zip(ids, cosines, logits, strict=True)
                ):
                    rows.append(
                        {
                            "layer": layer,
                            "direction": kind,
                            "rank": rank + 1,
                            "token": bridge.tokenizer.decode([token]),
                            "token_id": token,
                            "cosine": cosine,
                            "logit": logit,
                        }
                    )
    return pd.DataFrame(rows, columns=list(PROMOTED_COLUMNS))


def _suggest_layer(layers: pd.DataFrame) -> tuple[int | None, str]:
    above = layers[layers["rel_drift"] >= DRIFT_THRESHOLD]
    if len(above):
        layer = int(above["layer"].iloc[0])
        drift = float(above["rel_drift"].iloc[0])
        return layer, (
            f"drift first reaches {DRIFT_THRESHOLD:.0%} at layer {layer} ({drift:.1%} of the "
            f"residual norm): the fine-tune starts to act there"
        )
    if float(layers["rel_drift"].max()) == 0.0:
        return None, "no layer moved: the checkpoint computes what the base computes"
    peak = int(layers["rel_drift"].idxmax())
    return peak, (
        f"drift stays under {DRIFT_THRESHOLD:.0%} at every layer; it is largest at layer {peak} "
        f"({float(layers['rel_drift'].max()):.2%})"
    )
