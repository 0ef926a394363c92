"""``sae_trajectory``: every checkpoint of a training run against one base, step by step.

A separate verb rather than `sae_diff` over a list: a verb's return type never
depends on what it is given (DESIGN.md decision 4), and `sae_diff` always
returns one `SaeDiff`. Here the base model's activations, features and fit are
computed once; then the checkpoints stream through one at a time, each loaded,
compared with the stored base side and freed before the next, so memory is the
base plus one checkpoint whatever the number of checkpoints (the base side it
keeps is each prompt's mean feature activation, ``[prompts, d_sae]``, and
residual sum, ``[prompts, d_model]``, for the shift decomposition; neither grows
with the tokens or the checkpoints). With ``backend="ray"`` the
checkpoints and prompt shards are mapped over Ray tasks and their sums merged.

Example:
    >>> import aquin_nb
    >>> trajectory = aquin_nb.sae_trajectory("tiny-gpt2", {1: checkpoint, 2: checkpoint},
    ...                                      progress=False)
    >>> trajectory.summary["n_steps"], trajectory.first_changed()[101]
    (2, 1)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import __version__
from ._activations import prepare_bridge
from ._checkpoint_sets import CheckpointRef, describe, resolve_checkpoints, run_checkpoint_dir
from ._diff_core import (
    check_options,
    criteria,
    feature_frame,
    fit_side,
    fit_summary,
    load_checkpoint,
    loaded_prefix,
    prepare,
)
from ._errors import AquinError
from ._fit import FAST_PROMPTS
from ._metrics import find_metrics, read_metrics
from ._passes import BasePass, CheckpointPass, Shard, base_pass, checkpoint_pass
from ._prefix import KeptPrefix
from ._quiet import quiet_unless_progress
from ._shift import attribute
from ._track import DEFAULT_MAX_FEATURES, DEFAULT_TOP_K, add_step, empty_trajectory
from ._verbs import verb
from .results import SaeTrajectory

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SaeTrajectory", "sae_trajectory"]

BACKENDS = ("local", "ray")


class Comparison:
    """The base side of a trajectory, prepared once: the model, the SAE, the prompts,
    the base pass, and the options every step is judged by. `sae_trajectory` and
    `watch` both step checkpoints through one."""

    def __init__(
        self,
        model: Any,
        prompts: Any,
        layer: int | None,
        sae: Any,
        *,
        batch_size: int,
        fdr: float,
        min_rel_delta: float,
        min_abs_delta: float,
        fit: str,
        backend: str,
        prompt_shards: int,
        device: str | None,
        dtype: Any = None,
        verb_name: str = "sae_trajectory",
    ) -> None:
        check_options(fdr, batch_size, fit)
        if backend not in BACKENDS:
            raise AquinError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if prompt_shards < 1:
            raise AquinError(f"prompt_shards must be at least 1, got {prompt_shards}")
        if backend == "ray" and not isinstance(model, (str, Path)):
            raise AquinError(
                "backend='ray' needs the model as a catalog slug or a directory that every "
                "Ray worker can read, not a loaded model"
            )
        self.model = model
        self.device = device
        self.batch_size, self.fit_mode, self.backend = batch_size, fit, backend
        self.fdr, self.min_rel_delta, self.min_abs_delta = fdr, min_rel_delta, min_abs_delta
        self.prepared = prepare(model, prompts, layer, sae, device, verb_name, dtype=dtype)
        # Every checkpoint runs in the base's dtype (Ray workers load it by name).
        self.dtype = str(next(self.prepared.base.original_model.parameters()).dtype)
        n_prompts = len(self.prepared.token_lists)
        self.n_downstream = {"fast": FAST_PROMPTS, "full": n_prompts, "off": 0}[fit]
        self.prompt_shards = prompt_shards
        self._ray: Any = None
        self.kept: KeptPrefix | None = None  # local backend only
        if backend == "ray":
            from ._ray import RayRunner

            self._ray = RayRunner(self, prompt_shards)
            self.base: BasePass = self._ray.base()
        else:
            p = self.prepared
            # the base's leading blocks, for checkpoints that left them unchanged
            self.kept = KeptPrefix(p.base, p.numerics.hook_name)
            self.base = base_pass(
                p.base,
                p.sae,
                p.numerics,
                Shard(0, p.token_lists),
                batch_size=batch_size,
                n_downstream=self.n_downstream,
                kept=self.kept,
            )
        features = self.base.features
        self.base_fit = fit_side(
            self.base.fit, features.base_fires, features.n_tokens, self.base.downstream
        )

    def summary(self, name: str, source: str, top_k: int, max_features: int) -> dict[str, Any]:
        p = self.prepared
        return {
            "model": p.model_label,
            "hook": p.numerics.hook_name,
            "layer": p.numerics.layer,
            "n_features": p.d_sae,
            "n_prompts": self.base.features.n_prompts,
            "n_tokens": self.base.features.n_tokens,
            "name": name,
            "source": source,
            "labels": {},
            "fit_base": {
                **self.base_fit,
                "mode": self.fit_mode,
                "n_prompts_downstream": min(self.n_downstream, len(p.token_lists)),
            },
            "criteria": criteria(self.fdr, self.min_rel_delta, self.min_abs_delta),
            "tracking": {"top_k": top_k, "max_features": max_features},
            "backend": self.backend,
            "tool_version": __version__,
        }

    def check_summary(self, summary: dict[str, Any], where: str) -> None:
        """Refuse to extend a trajectory that was computed some other way."""
        mine = self.summary(summary.get("name", ""), "", 0, 0)
        for key in ("model", "hook", "n_features", "n_prompts", "n_tokens", "criteria"):
            if summary.get(key) != mine[key]:
                raise AquinError(
                    f"{where} was computed with {key} {summary.get(key)!r}, not {mine[key]!r}; "
                    f"write the trajectory to another file or delete it to start over"
                )

    def passes(self, refs: list[CheckpointRef]) -> Iterator[tuple[CheckpointRef, CheckpointPass]]:
        """Each checkpoint's pass, in the order of ``refs``."""
        if self._ray is not None:
            yield from self._ray.passes(refs)
            return
        for ref in refs:
            yield ref, self.local_pass(ref)

    def local_pass(self, ref: CheckpointRef) -> CheckpointPass:
        """Load ``ref``, compare it with the stored base side, and let it go."""
        p = self.prepared
        bridge, _ = load_checkpoint(ref.source, p.base, self.model, self.device)
        p.check_architecture(bridge, f"checkpoint {ref.where} (step {ref.step})")
        prepare_bridge(bridge, p.numerics)
        kept = self.kept
        shared = loaded_prefix(p.base, bridge) if kept is not None and kept.usable else 0
        try:
            return checkpoint_pass(
                bridge,
                p.sae,
                p.numerics,
                Shard(0, p.token_lists),
                self.base,
                batch_size=self.batch_size,
                n_downstream=self.n_downstream,
                kept=kept,
                shared_blocks=shared,
            )
        finally:
            del bridge

    def add(
        self, trajectory: SaeTrajectory, ref: CheckpointRef, result: CheckpointPass
    ) -> SaeTrajectory:
        """``trajectory`` with ``ref``'s step added from its pass."""
        attribution = attribute(
            result.residual.shift_from(self.base.residual), self.prepared.sae.W_dec
        )
        frame = feature_frame(
            result.features, self.fdr, self.min_rel_delta, self.min_abs_delta, attribution
        )
        checkpoint_side = fit_side(
            result.fit,
            result.features.checkpoint_fires,
            result.features.n_tokens,
            result.downstream,
        )
        report = fit_summary(
            {"base": self.base_fit, "checkpoint": checkpoint_side},
            self.fit_mode,
            self.n_downstream,
            model_label=self.prepared.model_label,
            layer=self.prepared.numerics.layer,
            checkpoint=ref.source if isinstance(ref.source, (str, Path)) else None,
        )
        if report["warning"]:
            logger.warning("step %d: %s", ref.step, report["warning"])
        return add_step(
            trajectory,
            step=ref.step,
            name=ref.label,
            checkpoint=ref.where,
            frame=frame,
            fit=report,
            shift_norm=float(np.linalg.norm(attribution.mean_shift)),
        )

    def labelled(self, trajectory: SaeTrajectory) -> SaeTrajectory:
        """``trajectory`` with ``summary["labels"]`` for every tracked feature (offline labels:
        an imported explanation, else the decoder row's logit lens, as `sae_diff` labels)."""
        from .labels import feature_labels

        known = {int(k): v for k, v in (trajectory.summary.get("labels") or {}).items()}
        tracked = [int(f) for f in pd.unique(trajectory.steps["feature"])]
        missing = [f for f in tracked if f not in known]
        if missing:
            known.update(feature_labels(self.prepared.base, self.prepared.sae, missing))
        labels = {str(f): known[f] for f in tracked if known.get(f)}
        return dataclasses.replace(trajectory, summary={**trajectory.summary, "labels": labels})

    def sae_copy(self) -> Any:
        """The SAE on the CPU, for shipping to workers (the prepared one stays put)."""
        return copy.deepcopy(self.prepared.sae).to("cpu")


def metrics_path(checkpoints: Any, metrics: Any) -> Path | None:
    """The metrics file to plot: ``metrics`` when it names one (``False``: none), else the
    run directory's ``metrics.jsonl`` when ``checkpoints`` is a run directory that has one."""
    if metrics is False:
        return None
    if metrics is not None:
        return Path(metrics).expanduser()
    if isinstance(checkpoints, (str, Path)) and Path(checkpoints).expanduser().is_dir():
        folder = run_checkpoint_dir(Path(checkpoints).expanduser())
        return find_metrics(folder) if folder is not None else None
    return None


def _default_name(checkpoints: Any) -> str:
    if isinstance(checkpoints, (str, Path)):
        path = Path(checkpoints).expanduser()
        if path.name == "checkpoints":
            path = path.parent
        return path.name or str(path)
    return "trajectory"


@verb("sae_trajectory")
@quiet_unless_progress
def sae_trajectory(
    model: Any,
    checkpoints: Any,
    prompts: Any = None,
    layer: int | None = None,
    sae: Any = None,
    name: str | None = None,
    *,
    metrics: Any = None,
    top_k: int = DEFAULT_TOP_K,
    max_features: int = DEFAULT_MAX_FEATURES,
    batch_size: int = 16,
    fdr: float = 0.05,
    min_rel_delta: float = 0.1,
    min_abs_delta: float = 1e-3,
    fit: str = "fast",
    backend: str = "local",
    prompt_shards: int = 1,
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> SaeTrajectory:
    """Diff every checkpoint of a run against one base model through one SAE.

    Args:
        model: catalog slug, local model directory, or a loaded ``TransformerBridge``.
        checkpoints: a Run directory or its ``checkpoints/`` folder (the
            ``step_<N>.pt`` files, ordered by step; ``checkpoint.pt``, the latest
            copy, is skipped), a glob (``"runs/ft/checkpoints/step_*.pt"``), a list
            of paths, or ``{step: path or loaded model}``. A file's step comes
            from its name (``step_<N>``, ``checkpoint-<N>``, or any name ending in
            a number), else from its ``step`` field.
        prompts, layer, sae, fdr, min_rel_delta, min_abs_delta, fit, batch_size,
            device, dtype: as in `sae_diff`; every step is judged by the same test.
        name: label of the run (default: the run directory's name).
        metrics: a metrics JSONL (``step`` plus numbers per line) to plot on the
            same step axis; default: ``metrics.jsonl`` of the run directory, if
            any; ``False`` for none.
        top_k, max_features: which features get rows in ``steps`` (see
            `SaeTrajectory`): each step's top ``top_k`` by ``|delta|`` and its changed
            features, at most ``max_features`` in all.
        backend: ``"local"`` or ``"ray"`` (checkpoints and ``prompt_shards``
            prompt shards mapped over Ray tasks; see `aquin_nb._ray`).

    A bad checkpoint (unreadable, another architecture, a duplicate step) stops
    the whole call with an `AquinError` naming its file; nothing is returned.

    Example:
        >>> trajectory = sae_trajectory("tiny-gpt2", {5: checkpoint}, fit="off", progress=False)
        >>> trajectory.per_step[["step", "n_changed"]].values.tolist()[0][0], trajectory.top(1)
        (5, [101])
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise AquinError(f"top_k must be 0 or more, got {top_k!r}")
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 1:
        raise AquinError(f"max_features must be at least 1, got {max_features!r}")
    refs = resolve_checkpoints(checkpoints)
    if backend == "ray":
        loaded = [ref for ref in refs if not isinstance(ref.source, (str, Path))]
        if loaded:
            raise AquinError(
                f"backend='ray' needs checkpoints as paths every worker can read; step "
                f"{loaded[0].step} is a loaded {type(loaded[0].source).__name__}"
            )
    metrics_file = metrics_path(checkpoints, metrics)
    metrics_frame = read_metrics(metrics_file) if metrics_file is not None else None
    comparison = Comparison(
        model,
        prompts,
        layer,
        sae,
        batch_size=batch_size,
        fdr=fdr,
        min_rel_delta=min_rel_delta,
        min_abs_delta=min_abs_delta,
        fit=fit,
        backend=backend,
        prompt_shards=prompt_shards,
        device=device,
        dtype=dtype,
    )
    summary = comparison.summary(
        name or _default_name(checkpoints), describe(checkpoints), top_k, max_features
    )
    summary["metrics"] = str(metrics_file) if metrics_file is not None else None
    trajectory = empty_trajectory(summary, metrics_frame)
    passes = comparison.passes(refs)
    for ref, result in tqdm(passes, total=len(refs), desc="sae trajectory", disable=not progress):
        trajectory = comparison.add(trajectory, ref, result)
    return comparison.labelled(trajectory)
