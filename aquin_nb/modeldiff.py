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
DEFAULT_CONTEXT = 1024  # SAELens trains most public SAEs at 128-1,024 tokens


class _TopTokens:
    """The ``k`` positions with the largest KL over the whole pass (a bounded heap)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int, int, int, int]] = []

    def offer(self, kl: torch.Tensor, prompts: torch.Tensor, mask: torch.Tensor, guesses) -> None:
        values = kl.masked_fill(~mask, float("-inf")).flatten()
        take = min(self.k, int(mask.sum()))
        if not take:
            return
        top = values.topk(take)
        width = kl.shape[1]
        for value, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, position = divmod(flat, width)
            base_next, ckpt_next = (int(guesses[side][row, position]) for side in (0, 1))
            item = (value, int(prompts[row]), position, base_next, ckpt_next)
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


def _residuals_and_logits(bridge: Any, tokens: torch.Tensor, n_layers: int):
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    device = next(bridge.original_model.parameters()).device
    logits, cache = bridge.run_with_cache(
        tokens.to(device), names_filter=names, return_cache_object=False
    )
    return logits, [cache[name] for name in names]


def _stable_rank(delta: torch.Tensor, iterations: int = 30) -> float:
    """‖Δ‖_F² / σ_max² with σ_max from power iteration (no full SVD on big matrices)."""
    matrix = delta.double()
    vector = torch.ones(matrix.shape[1], dtype=torch.float64) / matrix.shape[1] ** 0.5
    for _ in range(iterations):
        vector = matrix.T @ (matrix @ vector)
        norm = vector.norm()
        if norm == 0:
            return 0.0
        vector /= norm
    sigma = float((matrix @ vector).norm())
    return float(matrix.pow(2).sum()) / sigma**2 if sigma else 0.0


def _module_rows(base: Any, checkpoint: Any) -> list[dict[str, Any]]:
    from .models import hf_state_dict

    base_state = hf_state_dict(base)  # the plain HF names, once
    if getattr(checkpoint, "compatibility_mode", False):
        hf_state_dict(checkpoint)  # raises the clear error for processed weights
    ckpt_state = {
        key.replace("._original_component", ""): value
        for key, value in checkpoint.original_model.state_dict().items()
    }
    rows = []
    for name, weight in base_state.items():
        other = ckpt_state.get(name)
        if other is None or other.shape != weight.shape:
            raise AquinError(
                f"the checkpoint has no tensor {name} of shape {tuple(weight.shape)}; "
                "it is not a fine-tune of this model"
            )
        delta = other.double() - weight.double()
        change = float(delta.norm())
        size = float(weight.double().norm())
        rows.append(
            {
                "module": name,
                "shape": " × ".join(map(str, weight.shape)),
                "rel_change": change / size if size else (0.0 if change == 0 else None),
                "abs_change": change,
                "stable_rank": _stable_rank(delta) if delta.ndim == 2 and change else None,
                "changed": change > 0,
            }
        )
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
    base, ckpt, default_name, _ = load_pair(model, checkpoint, device, dtype)
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
    kl_sum = np.zeros(len(token_lists))
    kl_max = np.zeros(len(token_lists))
    kl_count = np.zeros(len(token_lists))
    top = _TopTokens(TOP_TOKENS)
    batches = token_batches(token_lists, batch_size=batch_size, skip_first=True)
    total = (len(token_lists) + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="model diff", disable=not progress):
            base_logits, base_acts = _residuals_and_logits(base, batch.tokens, n_layers)
            ckpt_logits, ckpt_acts = _residuals_and_logits(ckpt, batch.tokens, n_layers)
            mask = batch.mask.to(base_logits.device)
            base_log = base_logits.float().log_softmax(-1)
            ckpt_log = ckpt_logits.float().log_softmax(-1).to(base_log.device)
            kl = (base_log.exp() * (base_log - ckpt_log)).sum(-1).clamp_min(0.0).double()
            for row, prompt in enumerate(batch.prompt_index.tolist()):
                values = kl[row][mask[row]]
                kl_sum[prompt], kl_count[prompt] = float(values.sum()), len(values)
                kl_max[prompt] = float(values.max())  # a handful of prompts per batch
            guesses = (base_log.argmax(-1), ckpt_log.argmax(-1))
            top.offer(kl.cpu(), batch.prompt_index, mask.cpu(), [g.cpu() for g in guesses])
            n_tokens += int(mask.sum())
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
