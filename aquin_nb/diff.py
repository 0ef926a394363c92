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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from ._activations import (
    context_length,
    prepare_bridge,
    residual,
    token_batches,
    tokenize_prompts,
)
from ._errors import AquinError
from ._fit import FAST_PROMPTS, FIT_MODES, DownstreamStats, fit_verdict
from ._quiet import quiet_unless_progress
from ._shift import ShiftStats, attribute
from ._stats import FitStats, PairedFeatureStats
from ._tokenview import LiveDiff
from ._verbs import verb
from .catalog import find_entry
from .probes import load_prompts
from .results import DISPLAY_COLUMNS, FEATURE_COLUMNS, SaeDiff
from .saes import check_sae_fits, load_sae, sae_numerics

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)

__all__ = ["DISPLAY_COLUMNS", "FEATURE_COLUMNS", "SaeDiff", "sae_diff"]


def _bridge_label(bridge: Any) -> str:
    return str(getattr(bridge, "aquin_label", None) or getattr(bridge.cfg, "model_name", "model"))


def _load_base(model: Any, device: str | None) -> TransformerBridge:
    from .models import load_model

    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    if hasattr(model, "run_with_cache") and hasattr(model, "original_model"):
        return model
    raise AquinError(
        f"model must be a catalog slug, a model directory or a TransformerBridge, "
        f"got {type(model).__name__}"
    )


def _load_checkpoint(
    checkpoint: Any, base: TransformerBridge, model: Any, device: str | None
) -> tuple[TransformerBridge, str]:
    from .models import load_model, wrap_bridge

    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint).expanduser()
        source = model if isinstance(model, (str, Path)) else base.cfg.model_name
        bridge = load_model(source, path, device=device)
        return bridge, path.stem if path.is_file() else path.name
    if hasattr(checkpoint, "run_with_cache") and hasattr(checkpoint, "original_model"):
        return checkpoint, _bridge_label(checkpoint)
    if isinstance(checkpoint, torch.nn.Module) and hasattr(checkpoint, "config"):
        label = getattr(checkpoint.config, "_name_or_path", "") or "checkpoint"
        bridge = wrap_bridge(checkpoint.eval(), base.tokenizer, label, device=device)  # type: ignore[arg-type]
        return bridge, label
    raise AquinError(
        f"checkpoint must be a path or a loaded model, got {type(checkpoint).__name__}"
    )


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
    if not 0 < fdr < 1:
        raise AquinError(f"fdr must be between 0 and 1, got {fdr}")
    if batch_size < 1:
        raise AquinError(f"batch_size must be at least 1, got {batch_size}")
    if fit not in FIT_MODES:
        raise AquinError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    base = _load_base(model, device)
    model_label = (
        _bridge_label(base)
        if not isinstance(model, (str, Path))
        else str(getattr(base, "aquin_label", model))
    )
    n_layers, d_model = int(base.cfg.n_layers), int(base.cfg.d_model)
    if layer is not None and not 0 <= layer < n_layers:
        raise AquinError(
            f"layer {layer} is out of range: {model_label} has {n_layers} layers (0-{n_layers - 1})"
        )
    if sae is None:
        entry = find_entry(str(model) if isinstance(model, (str, Path)) else model_label)
        if entry is None:
            raise AquinError(
                f"no public SAE is catalogued for {model_label}; pass sae= (a slug, "
                f"RELEASE:SAE_ID, a SAELens directory or a .pt file)"
            )
        sae = entry.slug
    sae_obj = load_sae(sae, layer)
    numerics = sae_numerics(sae_obj, layer)
    check_sae_fits(sae_obj, d_model, n_layers, numerics.layer, model_label)
    texts = load_prompts(prompts, base.tokenizer)
    if len(texts) < 2:
        raise AquinError("sae_diff needs at least 2 prompts for the paired test across prompts")

    ckpt, default_name = _load_checkpoint(checkpoint, base, model, device)
    if int(ckpt.cfg.d_model) != d_model or int(ckpt.cfg.n_layers) != n_layers:
        raise AquinError(
            f"checkpoint has d_model {ckpt.cfg.d_model} and {ckpt.cfg.n_layers} layers, "
            f"but {model_label} has {d_model} and {n_layers}"
        )
    prepare_bridge(base, numerics)
    prepare_bridge(ckpt, numerics)
    sae_device = next(base.original_model.parameters()).device
    sae_obj = sae_obj.to(sae_device)
    sae_dtype = sae_obj.W_dec.dtype

    token_lists = tokenize_prompts(
        base.tokenizer,
        texts,
        prepend_bos=numerics.prepend_bos,
        max_length=context_length(base, numerics),
    )
    d_sae = int(sae_obj.W_dec.shape[0])
    stats = PairedFeatureStats(d_sae)
    base_fit, checkpoint_fit = FitStats(d_model), FitStats(d_model)
    downstream = {"base": DownstreamStats(), "checkpoint": DownstreamStats()}
    shift_stats = ShiftStats(len(token_lists), d_model)
    n_downstream = {"fast": FAST_PROMPTS, "full": len(token_lists), "off": 0}[fit]
    batches = token_batches(token_lists, batch_size=batch_size, skip_first=numerics.prepend_bos)
    total = (len(token_lists) + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="sae diff", disable=not progress):
            mask = batch.mask.to(sae_device)
            row_of_token = torch.arange(len(batch.tokens), device=sae_device)[:, None].expand_as(
                mask
            )[mask]
            x_base = residual(base, batch.tokens, numerics.hook_name)[mask].to(sae_dtype)
            x_ckpt = residual(ckpt, batch.tokens, numerics.hook_name)[mask].to(sae_dtype)
            f_base, f_ckpt = sae_obj.encode(x_base), sae_obj.encode(x_ckpt)
            base_fit.update(x_base, sae_obj.decode(f_base))
            checkpoint_fit.update(x_ckpt, sae_obj.decode(f_ckpt))
            stats.update(f_base, f_ckpt, row_of_token, len(batch.tokens))
            shift_stats.update(
                x_ckpt.double() - x_base.double(), batch.prompt_index.to(sae_device)[row_of_token]
            )
            rows = batch.prompt_index < n_downstream
            if rows.any():
                for side, bridge in (("base", base), ("checkpoint", ckpt)):
                    downstream[side].update(
                        bridge, sae_obj, numerics.hook_name, batch.tokens[rows], batch.mask[rows]
                    )

    attribution = attribute(shift_stats.per_prompt(), sae_obj.W_dec)
    features = _feature_frame(stats, attribution, fdr, min_rel_delta, min_abs_delta)
    features = _with_labels(features, base, sae_obj)
    sides = {
        "base": {
            "explained_variance": base_fit.explained_variance(),
            "l0": float(stats.base_fires.sum()) / stats.n_tokens,
            **downstream["base"].figures(),
        },
        "checkpoint": {
            "explained_variance": checkpoint_fit.explained_variance(),
            "l0": float(stats.checkpoint_fires.sum()) / stats.n_tokens,
            **downstream["checkpoint"].figures(),
        },
    }
    verdict, reasons = fit_verdict(sides["base"], sides["checkpoint"])
    fit_summary: dict[str, Any] = {
        **sides,
        "mode": fit,
        "n_prompts_downstream": min(n_downstream, len(token_lists)),
        "verdict": verdict,
        "reasons": reasons,
        "warning": _fit_warning(verdict, reasons, model_label, numerics.layer, checkpoint),
    }
    if fit_summary["warning"]:
        logger.warning(fit_summary["warning"])
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
        "fit": fit_summary,
        "criteria": {
            "test": "paired t-test across prompts, Benjamini-Hochberg",
            "fdr": fdr,
            "min_rel_delta": min_rel_delta,
            "min_abs_delta": min_abs_delta,
        },
        "shift": _shift_summary(base, attribution, features),
        "tool_version": __version__,
    }
    live = LiveDiff(
        base, ckpt, sae_obj, numerics.hook_name, token_lists, numerics.prepend_bos, numerics
    )
    return SaeDiff(summary=summary, features=features, live=live)


def _fit_warning(
    verdict: str, reasons: list[str], model: str, layer: int, checkpoint: Any
) -> str | None:
    """One line for a ``warn`` or ``fail`` verdict; a fail names the remedy."""
    if verdict == "pass":
        return None
    why = "; ".join(reasons)
    if verdict == "warn":
        return f"the public dictionary may no longer fit: {why}"
    where = f" --checkpoint {checkpoint}" if isinstance(checkpoint, (str, Path)) else ""
    return (
        f"the SAE does not fit, or no longer fits ({why}); its features are not trustworthy "
        f"here: train a "
        f"temporary SAE with `aquin-nb sae train --model {model} --layer {layer}{where}`"
    )


LABELED = 200


def _with_labels(features: pd.DataFrame, bridge: Any, sae: Any) -> pd.DataFrame:
    """Label the features a reader meets first: the top `LABELED` by |Δ| and by |shift|,
    and every feature the shift decomposition chose (others stay ``None``)."""
    from .labels import feature_labels

    by_shift = features["shift"].abs().sort_values(ascending=False, kind="stable")
    chosen = dict.fromkeys(
        [
            *features["feature"].head(LABELED).tolist(),
            *features.loc[by_shift.index[:LABELED], "feature"].tolist(),
        ]
    )
    labels = feature_labels(bridge, sae, [int(f) for f in chosen])
    features["label"] = pd.Series(
        [labels.get(int(f)) for f in features["feature"]], index=features.index, dtype=object
    )
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


def _feature_frame(
    stats: PairedFeatureStats,
    attribution: Any,
    fdr: float,
    min_rel_delta: float,
    min_abs_delta: float,
) -> pd.DataFrame:
    from scipy.stats import false_discovery_control

    base = (stats.base_sum / stats.n_tokens).numpy()
    checkpoint = (stats.checkpoint_sum / stats.n_tokens).numpy()
    delta = checkpoint - base
    abs_delta = np.abs(delta)
    p_values = stats.paired_t_pvalues()
    q_values = false_discovery_control(p_values, method="bh")
    effect = (abs_delta >= min_rel_delta * np.maximum(base, checkpoint)) & (
        abs_delta >= min_abs_delta
    )
    frame = pd.DataFrame(
        {
            "feature": np.arange(len(base)),
            "label": pd.Series([None] * len(base), dtype=object),
            "base": base,
            "checkpoint": checkpoint,
            "delta": delta,
            "abs_delta": abs_delta,
            "shift": attribution.shift,
            "shift_q": false_discovery_control(attribution.p_value, method="bh"),
            "base_freq": (stats.base_fires / stats.n_tokens).numpy(),
            "checkpoint_freq": (stats.checkpoint_fires / stats.n_tokens).numpy(),
            "p_value": p_values,
            "q_value": q_values,
            "changed": (q_values <= fdr) & effect,
        }
    )
    frame = frame.sort_values(["abs_delta", "feature"], ascending=[False, True], kind="stable")
    return frame.reset_index(drop=True)
