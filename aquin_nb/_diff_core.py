"""What `sae_diff` and `sae_trajectory` share: loading, checks, the feature frame, the fit.

Both verbs compare checkpoints with one base model through one SAE, so the
steps before the comparison (resolve and check the base, the SAE and the
prompts) and after it (per-feature frame, the "changed" test, the fit verdict)
live here once. What differs is the loop in between: `sae_diff` runs base and
checkpoint batch by batch side by side; `sae_trajectory` runs the base once
and then each checkpoint (`aquin_nb._passes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from ._activations import context_length, prepare_bridge, tokenize_prompts
from ._errors import AquinError
from ._fit import FIT_MODES, fit_verdict
from ._stats import FitStats, PairedFeatureStats
from .catalog import find_entry
from .probes import load_prompts
from .saes import SaeNumerics, check_sae_fits, load_sae, sae_numerics

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)


def bridge_label(bridge: Any) -> str:
    return str(getattr(bridge, "aquin_label", None) or getattr(bridge.cfg, "model_name", "model"))


def is_bridge(value: Any) -> bool:
    return hasattr(value, "run_with_cache") and hasattr(value, "original_model")


def load_base(model: Any, device: str | None, dtype: Any = None) -> TransformerBridge:
    from .models import load_model

    if isinstance(model, (str, Path)):
        return load_model(model, device=device, dtype=dtype)
    if is_bridge(model):
        check_loaded_dtype(model, dtype, "model")
        return model
    raise AquinError(
        f"model must be a catalog slug, a model directory or a TransformerBridge, "
        f"got {type(model).__name__}"
    )


def check_loaded_dtype(model: Any, dtype: Any, what: str) -> None:
    """Refuse ``dtype`` for a model the caller loaded in another dtype (it is not converted)."""
    if dtype is None:
        return
    from ._dtypes import dtype_name, parse_dtype

    wanted = parse_dtype(dtype)
    module = model.original_model if is_bridge(model) else model
    loaded = next(module.parameters()).dtype
    if loaded != wanted:
        raise AquinError(
            f"the {what} passed in is loaded in {dtype_name(loaded)}, but dtype "
            f"{dtype_name(wanted)} was asked for; load it in {dtype_name(wanted)} "
            f"(aquin_nb.load_model(..., dtype=...)) or leave dtype out"
        )


def load_checkpoint(
    checkpoint: Any, base: TransformerBridge, model: Any, device: str | None, dtype: Any = None
) -> tuple[TransformerBridge, str]:
    """A bridge running ``checkpoint`` (a path or a loaded model) and its default label.

    A checkpoint file is built around its own tensors beside the loaded base
    (`aquin_nb.models.bridge_checkpoint_twin`): the base's weights are not read
    from disk again, and memory is the base plus the checkpoint.
    """
    from ._dtypes import resolve_dtype
    from .models import bridge_checkpoint_twin, load_model, wrap_bridge

    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint).expanduser()
        name = path.stem if path.is_file() else path.name
        base_dtype = next(base.original_model.parameters()).dtype
        if dtype is None or resolve_dtype(dtype, device) == base_dtype:
            if not path.exists():
                raise AquinError(f"checkpoint {path} does not exist")
            twin = bridge_checkpoint_twin(base, path)
            if twin is not None:
                return wrap_bridge(twin, base.tokenizer, bridge_label(base), device=device), name
        source = model if isinstance(model, (str, Path)) else base.cfg.model_name
        bridge = load_model(source, path, device=device, dtype=dtype or base_dtype)
        return bridge, name
    if is_bridge(checkpoint):
        check_loaded_dtype(checkpoint, dtype, "checkpoint")
        return checkpoint, bridge_label(checkpoint)
    if isinstance(checkpoint, torch.nn.Module) and hasattr(checkpoint, "config"):
        check_loaded_dtype(checkpoint, dtype, "checkpoint")
        label = getattr(checkpoint.config, "_name_or_path", "") or "checkpoint"
        bridge = wrap_bridge(checkpoint.eval(), base.tokenizer, label, device=device)  # type: ignore[arg-type]
        return bridge, label
    raise AquinError(
        f"checkpoint must be a path or a loaded model, got {type(checkpoint).__name__}"
    )


class Pair(NamedTuple):
    """A base and a checkpoint, loaded side by side by `load_pair`."""

    base: Any
    checkpoint: Any
    name: str  # the checkpoint's default label
    shared_blocks: int = 0  # leading blocks equal on both sides (`aquin_nb._prefix`)


def load_pair(
    model: Any,
    checkpoint: Any,
    device: str | None,
    dtype: Any = None,
    *,
    switch_adapter: bool = False,
    count_shared: bool = False,
) -> Pair:
    """Base and checkpoint bridges, reading the base's weights once.

    When both are paths, the base model is read from disk once and the checkpoint
    side is built around the checkpoint's own tensors (`aquin_nb.models.checkpoint_twin`:
    no copy of the base). With ``count_shared``, the leading blocks the checkpoint
    left unchanged are counted (``shared_blocks``; comparing them reads both). With
    ``switch_adapter``, a LoRA adapter directory is not copied at all: both sides
    are views of one model with the adapter switched off and on (`aquin_nb._switch`).
    Anything else (loaded models, bridges) is loaded as `load_base` and
    `load_checkpoint` do; ``count_shared`` then compares two bridges' weights where
    they compare like for like (`loaded_prefix`).
    """

    from ._checkpoints import is_peft_adapter
    from ._dtypes import resolve_dtype
    from ._prefix import unchanged_prefix
    from .models import attach_adapter, checkpoint_twin, load_hf_model, wrap_bridge

    if not isinstance(model, (str, Path)) or not isinstance(checkpoint, (str, Path)):
        base = load_base(model, device, dtype)
        ckpt, name = load_checkpoint(checkpoint, base, model, device, dtype)
        return Pair(base, ckpt, name, loaded_prefix(base, ckpt) if count_shared else 0)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise AquinError(f"checkpoint {path} does not exist")
    name = path.stem if path.is_file() else path.name
    dtype = resolve_dtype(dtype, device)
    hf, tokenizer, label = load_hf_model(model, dtype=dtype)
    if switch_adapter and is_peft_adapter(path):
        from ._switch import AdapterSwitch, SwitchedBridge, can_switch

        peft_model = attach_adapter(hf, path)
        reason = can_switch(peft_model)
        if reason is None:
            bridge = wrap_bridge(peft_model.base_model.model, tokenizer, label, device=device)
            switch = AdapterSwitch(peft_model, bridge)
            return Pair(
                SwitchedBridge(bridge, switch, "base", label),
                SwitchedBridge(bridge, switch, "checkpoint", label),
                name,
            )
        logger.info("diffing adapter %s on a second copy of the model: %s", path, reason)
        hf = peft_model.unload()
    checkpoint_hf = checkpoint_twin(hf, path)
    shared = unchanged_prefix(hf, checkpoint_hf) if count_shared else 0
    base = wrap_bridge(hf, tokenizer, label, device=device)
    # the base bridge's tokenizer, which its boot rebuilt with add_bos_token=True: the
    # checkpoint's boot takes it as it is instead of reading the tokenizer files again
    checkpoint_bridge = wrap_bridge(checkpoint_hf, base.tokenizer, label, device=device)
    return Pair(base, checkpoint_bridge, name, shared)


def loaded_prefix(base: Any, checkpoint: Any) -> int:
    """`unchanged_prefix` of two bridges the caller loaded, when their weights compare
    like for like: both as loaded, or both processed by aquin_nb with the same settings
    (processing a block reads only that block and the embeddings, so equal blocks stay
    equal). 0 for a bridge processed some other way, or a switched one (its sides are
    one model already)."""
    from ._prefix import unchanged_prefix
    from ._switch import SwitchedBridge

    processing = [getattr(bridge, "aquin_processing", None) for bridge in (base, checkpoint)]
    for bridge, settings in zip((base, checkpoint), processing, strict=True):
        if isinstance(bridge, SwitchedBridge):
            return 0
        if settings is None and getattr(bridge, "compatibility_mode", True):
            return 0  # processed outside aquin_nb: settings unknown
    if processing[0] != processing[1]:
        return 0
    if type(base.original_model) is not type(checkpoint.original_model):
        return 0
    return unchanged_prefix(base.original_model, checkpoint.original_model)


def check_options(fdr: float, batch_size: int, fit: str) -> None:
    if not 0 < fdr < 1:
        raise AquinError(f"fdr must be between 0 and 1, got {fdr}")
    if batch_size < 1:
        raise AquinError(f"batch_size must be at least 1, got {batch_size}")
    if fit not in FIT_MODES:
        raise AquinError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")


@dataclass
class Prepared:
    """The base side of a comparison, resolved and checked, ready for any checkpoint."""

    base: TransformerBridge
    model_label: str
    n_layers: int
    d_model: int
    sae: Any
    numerics: SaeNumerics
    token_lists: list[list[int]]
    checkpoint: Any = None  # loaded by `prepare` when it was given one
    checkpoint_name: str | None = None
    shared_blocks: int = 0  # leading blocks equal in base and checkpoint

    @property
    def d_sae(self) -> int:
        return int(self.sae.W_dec.shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.base.original_model.parameters()).device

    def check_architecture(self, bridge: Any, what: str = "checkpoint") -> None:
        """Refuse a loaded checkpoint whose shape differs from the base's."""
        if int(bridge.cfg.d_model) != self.d_model or int(bridge.cfg.n_layers) != self.n_layers:
            raise AquinError(
                f"{what} has d_model {bridge.cfg.d_model} and {bridge.cfg.n_layers} layers, "
                f"but {self.model_label} has {self.d_model} and {self.n_layers}"
            )


def prepare(
    model: Any,
    prompts: Any,
    layer: int | None,
    sae: Any,
    device: str | None,
    verb_name: str,
    *,
    dtype: Any = None,
    checkpoint: Any = None,
    switch_adapter: bool = False,
) -> Prepared:
    """Load and check the base, the SAE (the catalog's when ``sae`` is None) and the prompts.

    The base bridge is processed the way the SAE's numerics ask, the SAE moved to
    the base's device, the prompts tokenised as the SAE expects. With
    ``checkpoint``, it is loaded beside the base (`load_pair`), checked and
    processed the same way.
    """
    if checkpoint is None:
        base, pair = load_base(model, device, dtype), None
    else:
        pair = load_pair(
            model, checkpoint, device, dtype, switch_adapter=switch_adapter, count_shared=True
        )
        base = pair.base
    model_label = (
        bridge_label(base)
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
        raise AquinError(f"{verb_name} needs at least 2 prompts for the paired test across prompts")
    prepare_bridge(base, numerics)
    sae_obj = sae_obj.to(next(base.original_model.parameters()).device)
    token_lists = tokenize_prompts(
        base.tokenizer,
        texts,
        prepend_bos=numerics.prepend_bos,
        max_length=context_length(base, numerics),
    )
    prepared = Prepared(base, model_label, n_layers, d_model, sae_obj, numerics, token_lists)
    if pair is not None:
        prepared.check_architecture(pair.checkpoint)
        prepare_bridge(pair.checkpoint, numerics)
        prepared.checkpoint, prepared.checkpoint_name = pair.checkpoint, pair.name
        prepared.shared_blocks = pair.shared_blocks
    return prepared


def feature_frame(
    stats: PairedFeatureStats,
    fdr: float,
    min_rel_delta: float,
    min_abs_delta: float,
    attribution: Any = None,
) -> pd.DataFrame:
    """One row per feature, sorted by ``abs_delta``: `aquin_nb.results.FEATURE_COLUMNS`
    (``label`` left None) when ``attribution`` (`aquin_nb._shift.attribute`) is given,
    else without ``label``, ``shift`` and ``shift_q``."""
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
    columns: dict[str, Any] = {"feature": np.arange(len(base))}
    if attribution is not None:
        columns["label"] = np.full(len(base), None, dtype=object)
    columns.update(base=base, checkpoint=checkpoint, delta=delta, abs_delta=abs_delta)
    if attribution is not None:
        columns["shift"] = attribution.shift
        columns["shift_q"] = false_discovery_control(attribution.p_value, method="bh")
    columns.update(
        base_freq=(stats.base_fires / stats.n_tokens).numpy(),
        checkpoint_freq=(stats.checkpoint_fires / stats.n_tokens).numpy(),
        p_value=p_values,
        q_value=q_values,
        changed=(q_values <= fdr) & effect,
    )
    # by abs_delta, largest first, ties by feature: a stable sort of the arrays (features
    # are numbered in order already), before the frame is built
    order = np.argsort(-abs_delta, kind="stable")
    return pd.DataFrame({name: np.asarray(column)[order] for name, column in columns.items()})


def fit_side(fit: FitStats, fires: torch.Tensor, n_tokens: int, downstream: Any) -> dict[str, Any]:
    """One model's fit figures: explained variance, L0 and the downstream figures."""
    return {
        "explained_variance": fit.explained_variance(),
        "l0": float(fires.sum()) / n_tokens,
        **downstream.figures(),
    }


def fit_summary(
    sides: dict[str, dict[str, Any]],
    mode: str,
    n_downstream: int,
    *,
    model_label: str,
    layer: int,
    checkpoint: Any,
) -> dict[str, Any]:
    """``sides`` (base, checkpoint) with the verdict, its reasons and the warning line."""
    verdict, reasons = fit_verdict(sides["base"], sides["checkpoint"])
    return {
        **sides,
        "mode": mode,
        "n_prompts_downstream": n_downstream,
        "verdict": verdict,
        "reasons": reasons,
        "warning": fit_warning(verdict, reasons, model_label, layer, checkpoint),
    }


def fit_warning(
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


def criteria(fdr: float, min_rel_delta: float, min_abs_delta: float) -> dict[str, Any]:
    return {
        "test": "paired t-test across prompts, Benjamini-Hochberg",
        "fdr": fdr,
        "min_rel_delta": min_rel_delta,
        "min_abs_delta": min_abs_delta,
    }
