"""SaeDiff: per-feature deltas between a base model and a checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from .._errors import AquinError
from ._base import Result

FEATURE_COLUMNS = (
    "feature",
    "label",
    "base",
    "checkpoint",
    "delta",
    "abs_delta",
    "shift",
    "shift_q",
    "base_freq",
    "checkpoint_freq",
    "p_value",
    "q_value",
    "changed",
)
# The columns a reader sees first, in the CLI table and on the card.
DISPLAY_COLUMNS = (
    "feature",
    "label",
    "base",
    "checkpoint",
    "delta",
    "shift",
    "base_freq",
    "checkpoint_freq",
    "p_value",
    "q_value",
    "changed",
)


@dataclass(frozen=True, eq=False)
class SaeDiff(Result):
    """Per-feature activation deltas between a base model and a checkpoint.

    ``summary`` (plain JSON types): ``n_features``, ``n_changed``, ``mean_abs_delta``,
    ``max_abs_delta``, ``n_prompts``, ``n_tokens``, ``layer``, ``hook``, ``model``,
    ``checkpoint``, ``name``, ``fit`` (``{"base": {explained_variance, l0},
    "checkpoint": {...}, "warning": str | None}``), ``criteria`` and ``tool_version``.

    ``features`` has one row per feature, sorted by ``abs_delta`` descending:

    ========================  ===========================================================
    ``feature``               feature index in the SAE
    ``label``                 what the feature is about, in words (an imported Neuronpedia
                              explanation, else an offline label; ``None`` for features
                              the diff did not label, see `aquin_nb.labels`)
    ``base``, ``checkpoint``  mean activation per token over all probe tokens (no BOS/pad)
    ``delta``, ``abs_delta``  ``checkpoint - base`` and its absolute value
    ``shift``                 how far the fine-tune pushed the residual stream along this
                              feature's unit decoder direction (a sparse decomposition of
                              the mean shift, see `aquin_nb._shift`); 0 outside the support
    ``shift_q``               BH-adjusted p-value of ``shift`` (t-test across prompts)
    ``base_freq``,            fraction of probe tokens on which the feature fires (> 0)
    ``checkpoint_freq``
    ``p_value``               two-sided paired t-test across prompts on per-prompt means
    ``q_value``               Benjamini-Hochberg adjusted p-value over all features
    ``changed``               ``q_value <= fdr`` and the effect-size floor (see `sae_diff`)
    ========================  ===========================================================

    ``views`` holds the token views computed so far (`with_token_views`), keyed by
    feature; they travel with the JSON and the card. ``live`` is the handle to the
    models that computes them (never serialised: a diff read from JSON has none).
    """

    kind: ClassVar[str] = "sae_diff"
    verb: ClassVar[str] = "sae_diff"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {"features": FEATURE_COLUMNS}
    optional_columns: ClassVar[tuple[str, ...]] = ("label", "shift", "shift_q")

    summary: dict[str, Any]
    features: pd.DataFrame
    views: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    dashboards: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    live: Any = field(default=None, repr=False)

    def top(self, k: int = 20, by: str = "abs_delta") -> pd.DataFrame:
        """The ``k`` features with the largest ``|delta|`` (``by="abs_delta"``), or the
        ``k`` directions the fine-tune pushed hardest (``by="shift"``, by ``|shift|``)."""
        if by == "abs_delta":
            return self.features.head(k).reset_index(drop=True)
        if by != "shift":
            raise AquinError(f"by must be 'abs_delta' or 'shift', got {by!r}")
        order = self.features.assign(_size=self.features["shift"].abs().fillna(0.0))
        order = order.sort_values(["_size", "feature"], ascending=[False, True], kind="stable")
        return order.drop(columns="_size").head(k).reset_index(drop=True)

    def changed(self) -> pd.DataFrame:
        """Only the features that count as changed."""
        return self.features[self.features["changed"]].reset_index(drop=True)

    def token_views(self, features: list[int] | None = None, k: int = 4) -> dict[int, Any]:
        """Where each feature fires most: ``k`` prompts, token by token, base and checkpoint.

        Computed on demand in one pass over the probes (at most 32 features at a
        time, the top 10 by default) and cached; needs the models, so a SaeDiff
        read back from JSON has none beyond those it was saved with.
        """
        chosen = [int(f) for f in (features if features is not None else self.top_features())]
        if all(f in self.views for f in chosen):
            return {f: self.views[f] for f in chosen}
        if self.live is None:
            raise AquinError(
                "token views need the models; this SaeDiff was read from JSON, run sae_diff again"
            )
        from .._tokenview import compute_token_views

        return compute_token_views(self.live, chosen, k)

    def with_token_views(self, features: list[int] | None = None, k: int = 4) -> SaeDiff:
        """A copy whose card shows token views for ``features`` (default: the top 10).

        Example:
            >>> import aquin_nb
            >>> diff = aquin_nb.sae_diff("tiny-gpt2", checkpoint, progress=False)
            >>> sorted(diff.views), sorted(diff.with_token_views([101, 7]).views)
            ([], [7, 101])
        """
        views = self.token_views(features, k)
        return dataclasses.replace(self, views={**self.views, **views})

    def with_dashboards(
        self,
        corpus: Any = None,
        features: list[int] | None = None,
        *,
        k: int = 10,
        progress: bool = True,
    ) -> SaeDiff:
        """A copy that labels every feature from its dashboard and whose card opens the
        dashboards of ``features`` (default: the top 25 by |Δ| and the top 10 by shift):
        top contexts on the base beside the checkpoint, logit lens, histogram.

        One pass over ``corpus`` (default: the shipped corpus and the probes) per
        model, cached on disk (see `aquin_nb.dashboards`); needs the models.
        """
        if self.live is None:
            raise AquinError(
                "dashboards need the models; this SaeDiff was read from JSON, run sae_diff again"
            )
        from .._corpus import read_corpus
        from .._quiet import third_party_quiet
        from ..dashboards import _checkpoint_identity, compute_dashboards

        live, s = self.live, self.summary
        checkpoint = s["checkpoint"]
        identity = (
            _checkpoint_identity(checkpoint)
            if isinstance(checkpoint, str) and Path(checkpoint).exists()
            else ("object", id(live.checkpoint))
        )
        with third_party_quiet(not progress):
            boards = compute_dashboards(
                live.base,
                live.checkpoint,
                live.sae,
                live.numerics,
                read_corpus(corpus, live.base.tokenizer),
                label=s["model"],
                identity=identity,
                sae_name=s["hook"],
                k=k,
                batch_size=16,
                cache=True,
                progress=progress,
            )
        chosen = (
            features
            if features is not None
            else [
                *self.top(25)["feature"].tolist(),
                *self.top(10, by="shift")["feature"].tolist(),
            ]
        )
        boards_of = {int(f): boards.feature(int(f)) for f in dict.fromkeys(chosen)}
        labels = boards.features.set_index("feature")["label"]
        frame = self.features.copy()
        frame["label"] = pd.Series(
            [labels.get(int(f)) for f in frame["feature"]], index=frame.index, dtype=object
        )
        return dataclasses.replace(
            self, features=frame, dashboards={**self.dashboards, **boards_of}
        )

    def top_features(self, k: int = 10) -> list[int]:
        return [int(f) for f in self.features["feature"].head(k)]

    def _payload(self) -> dict[str, Any]:
        views = {str(feature): view for feature, view in self.views.items()}
        boards = {str(feature): board for feature, board in self.dashboards.items()}
        return {**super()._payload(), "token_views": views, "dashboards": boards}

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> SaeDiff:
        diff = super()._from_payload(payload, path)
        extras: dict[str, Any] = {}
        for key, field_name in (("token_views", "views"), ("dashboards", "dashboards")):
            found = payload.get(key) or {}
            if not isinstance(found, dict):
                raise AquinError(f"{path}: {key} must be an object")
            extras[field_name] = {int(k): v for k, v in found.items()}
        return dataclasses.replace(diff, **extras)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"SaeDiff({s['model']} vs {s['name']} @ {s['hook']}: {s['n_changed']}/"
            f"{s['n_features']} features changed, mean |Δ| {s['mean_abs_delta']:.4g}, "
            f"max |Δ| {s['max_abs_delta']:.4g}, {s['n_prompts']} prompts / {s['n_tokens']} tokens)"
        )
