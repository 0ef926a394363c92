"""``sae_diff``: which SAE features a fine-tune moved, base beside checkpoint.

Example:
    >>> import aquin_nb
    >>> diff = aquin_nb.sae_diff("tiny-gpt2", checkpoint, progress=False)  # a planted feature 101
    >>> int(diff.top(1)["feature"][0]), bool(diff.top(1)["changed"][0])
    (101, True)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from ._activations import residual, token_batches
from ._diff_core import (
    bridge_label,
    check_options,
    criteria,
    feature_frame,
    fit_side,
    fit_summary,
    load_base,
    load_checkpoint,
    prepare,
)
from ._fit import FAST_PROMPTS, DownstreamStats
from ._prefix import SharedPrefix
from ._quiet import quiet_unless_progress
from ._shift import ShiftStats, attribute
from ._stats import FitStats, PairedFeatureStats
from ._tokenview import LiveDiff
from ._verbs import verb
from .results import DISPLAY_COLUMNS, FEATURE_COLUMNS, SaeDiff
from .saes import decode as sparse_decode
from .saes import encode, sparse_features

logger = logging.getLogger(__name__)

__all__ = ["DISPLAY_COLUMNS", "FEATURE_COLUMNS", "SaeDiff", "sae_diff"]

# The loaders moved to _diff_core (sae_trajectory shares them); these names stay for
# the modules that import them from here.
_bridge_label, _load_base, _load_checkpoint = bridge_label, load_base, load_checkpoint


@verb("sae_diff")
@quiet_unless_progress
def sae_diff(
    model: Any,
    checkpoint: Any,
    prompts: Any = None,
    layer: int | None = None,
    sae: Any = None,
    name: str | None = None,
    *,
    batch_size: int = 16,
    fdr: float = 0.05,
    min_rel_delta: float = 0.1,
    min_abs_delta: float = 1e-3,
    fit: str = "fast",
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> SaeDiff:
    """Encode the same prompts through base and checkpoint with one SAE and compare.

    Args:
        model: catalog slug, local model directory, or a loaded ``TransformerBridge``.
        checkpoint: a checkpoint path (``{step, state_dict}`` .pt, bare state dict,
            ``.safetensors``, ``save_pretrained`` or PEFT adapter directory), or a
            loaded model / bridge.
        prompts: a JSON/JSONL file, a list, or ``None`` for the shipped probe set.
        layer: the SAE layer; defaults to the catalog's layer or the SAE's own hook.
        sae: anything `load_sae` takes, or an SAE object; defaults to the model's
            public SAE from the catalog.
        name: label for the checkpoint; defaults to its file stem.
        fit: ``"fast"`` (default) measures the downstream fit (CE loss recovered,
            KL with the reconstruction spliced in) on the first 8 prompts,
            ``"full"`` on all of them, ``"off"`` not at all; see `aquin_nb._fit`
            for the figures and the pass/warn/fail thresholds.
        dtype: what the models run in: ``"float32"`` (default), ``"bfloat16"`` or
            ``"float16"``; the SAE encodes in its own dtype and the statistics
            accumulate in float64 either way.

    A PEFT LoRA adapter directory is diffed on one copy of the model, the adapter
    switched off for the base and on for the checkpoint (`aquin_nb._switch`); a
    checkpoint file reads the base's weights from disk once, and the leading
    blocks it left unchanged run once for both sides (`aquin_nb._prefix`).

    A feature counts as **changed** when both hold:

    * significance: a two-sided paired t-test across prompts (prompts are identical
      on both sides, so each prompt gives one paired difference of per-prompt mean
      activations) has a Benjamini-Hochberg q-value ``<= fdr`` over all features;
    * effect size: ``|delta| >= min_rel_delta * max(base, checkpoint)`` and
      ``|delta| >= min_abs_delta`` (``delta`` being the token-mean difference).

    Example:
        >>> diff = sae_diff("tiny-gpt2", checkpoint, name="my-ft", progress=False)
        >>> list(diff.top(3).columns[:5]), diff.summary["name"]
        (['feature', 'label', 'base', 'checkpoint', 'delta'], 'my-ft')
    """
    check_options(fdr, batch_size, fit)
    prepared = prepare(
        model,
        prompts,
        layer,
        sae,
        device,
        "sae_diff",
        dtype=dtype,
        checkpoint=checkpoint,
        switch_adapter=True,
    )
    base, model_label, numerics = prepared.base, prepared.model_label, prepared.numerics
    sae_obj, token_lists, d_model = prepared.sae, prepared.token_lists, prepared.d_model
    ckpt, default_name = prepared.checkpoint, str(prepared.checkpoint_name)
    sae_device = prepared.device
    sae_dtype = sae_obj.W_dec.dtype

    d_sae = int(sae_obj.W_dec.shape[0])
    stats = PairedFeatureStats(d_sae)
    base_fit, checkpoint_fit = FitStats(d_model), FitStats(d_model)
    downstream = {"base": DownstreamStats(), "checkpoint": DownstreamStats()}
    shift_stats = ShiftStats(len(token_lists), d_model)
    n_downstream = {"fast": FAST_PROMPTS, "full": len(token_lists), "off": 0}[fit]
    # Leading blocks the checkpoint left unchanged run once for both sides.
    shared = prepared.shared_blocks
    prefix = SharedPrefix(base, ckpt, shared) if shared else None
    # prompts of like length share a batch (less padding to run through both models);
    # the downstream fit's prompts stay together in the first batches
    batches = token_batches(
        token_lists,
        batch_size=batch_size,
        skip_first=numerics.prepend_bos,
        by_length=True,
        first=n_downstream,
    )
    total = (len(token_lists) + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="sae diff", disable=not progress):
            mask = batch.mask.to(sae_device)
            row_of_token = torch.arange(len(batch.tokens), device=sae_device)[:, None].expand_as(
                mask
            )[mask]
            if prefix is not None:
                x_base, x_ckpt = prefix.residuals(batch.tokens, numerics.hook_name)
            else:
                x_base = residual(base, batch.tokens, numerics.hook_name)
                x_ckpt = residual(ckpt, batch.tokens, numerics.hook_name)
            x_base, x_ckpt = x_base[mask].to(sae_dtype), x_ckpt[mask].to(sae_dtype)
            # sparse where few features fire: the decode and the statistics then cost
            # what the firings cost, and the dense arrays go at once
            f_base = sparse_features(encode(sae_obj, x_base))
            f_ckpt = sparse_features(encode(sae_obj, x_ckpt))
            base_fit.update(x_base, sparse_decode(sae_obj, f_base))
            checkpoint_fit.update(x_ckpt, sparse_decode(sae_obj, f_ckpt))
            stats.update(f_base, f_ckpt, row_of_token, len(batch.tokens))
            shift_stats.update(
                x_ckpt.double() - x_base.double(), batch.prompt_index.to(sae_device)[row_of_token]
            )
            # this batch's [tokens, d_sae] arrays go now, not when the next batch's
            # replace them (they would double the loop's peak: 130 MB at 65,536 features)
            del f_base, f_ckpt, x_base, x_ckpt
            rows = batch.prompt_index < n_downstream
            if rows.any():
                for side, bridge in (("base", base), ("checkpoint", ckpt)):
                    downstream[side].update(
                        bridge, sae_obj, numerics.hook_name, batch.tokens[rows], batch.mask[rows]
                    )

    attribution = attribute(shift_stats.per_prompt(), sae_obj.W_dec)
    features = feature_frame(stats, fdr, min_rel_delta, min_abs_delta, attribution)
    features = _with_labels(features, base, sae_obj)
    sides = {
        "base": fit_side(base_fit, stats.base_fires, stats.n_tokens, downstream["base"]),
        "checkpoint": fit_side(
            checkpoint_fit, stats.checkpoint_fires, stats.n_tokens, downstream["checkpoint"]
        ),
    }
    fit_report = fit_summary(
        sides,
        fit,
        min(n_downstream, len(token_lists)),
        model_label=model_label,
        layer=numerics.layer,
        checkpoint=checkpoint,
    )
    if fit_report["warning"]:
        logger.warning(fit_report["warning"])
    abs_delta = features["abs_delta"].to_numpy()
    summary = {
        "n_features": d_sae,
        "n_changed": int(features["changed"].sum()),
        "mean_abs_delta": float(abs_delta.mean()),
        "max_abs_delta": float(abs_delta.max()),
        "n_prompts": stats.n_prompts,
        "n_tokens": stats.n_tokens,
        "layer": numerics.layer,
        "hook": numerics.hook_name,
        "model": model_label,
        "checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else default_name,
        "name": name or default_name,
        "fit": fit_report,
        "criteria": criteria(fdr, min_rel_delta, min_abs_delta),
        "shift": _shift_summary(base, attribution, features),
        "tool_version": __version__,
    }
    live = LiveDiff(
        base, ckpt, sae_obj, numerics.hook_name, token_lists, numerics.prepend_bos, numerics
    )
    return SaeDiff(summary=summary, features=features, live=live)


LABELED = 200


def _with_labels(features: pd.DataFrame, bridge: Any, sae: Any) -> pd.DataFrame:
    """Label the features a reader meets first: the top `LABELED` by |Δ| and every
    feature the shift decomposition chose (others stay ``None``)."""
    from .labels import feature_labels

    by_shift = features["shift"].abs().sort_values(ascending=False, kind="stable")
    by_shift = by_shift[by_shift > 0]  # the decomposition's support, at most MAX_ATOMS
    chosen = dict.fromkeys(
        [
            *features["feature"].head(LABELED).tolist(),
            *features.loc[by_shift.index[:LABELED], "feature"].tolist(),
        ]
    )
    labels = feature_labels(bridge, sae, [int(f) for f in chosen])
    ids = features["feature"].to_numpy()
    rows = np.flatnonzero(np.isin(ids, np.fromiter(labels, dtype=np.int64, count=len(labels))))
    column = np.full(len(features), None, dtype=object)
    column[rows] = [labels[int(feature)] for feature in ids[rows]]
    features["label"] = pd.Series(column, index=features.index, dtype=object)
    return features


def _shift_summary(bridge: Any, attribution: Any, features: pd.DataFrame) -> dict[str, Any]:
    """How much the fine-tune moved the hook's residual stream, and towards which tokens."""
    from ._lens import decode_tokens, logit_lens

    norm = float(np.linalg.norm(attribution.mean_shift))
    summary: dict[str, Any] = {
        "norm": norm,
        "explained": attribution.explained,
        "n_directions": len(attribution.support),
        "directions": [int(f) for f in attribution.support[:10]],
        "promoted": [],
        "suppressed": [],
    }
    if norm > 0:
        lens = logit_lens(bridge, torch.as_tensor(attribution.mean_shift)[None, :], k=10)
        summary["promoted"] = decode_tokens(bridge.tokenizer, lens.top[0].tolist())
        summary["suppressed"] = decode_tokens(bridge.tokenizer, lens.bottom[0].tolist())
    return summary
