"""Every result type aquin_nb returns, in one torch-free module (DESIGN.md decision 4).

Results are frozen dataclasses holding a ``summary`` of plain JSON types and
pandas DataFrames with the fixed columns documented on each class. They share
one mixin, `Result`: ``to_json(path)`` / ``from_json(path)`` (versioned,
written atomically), ``_repr_mimebundle_`` (``text/plain`` plus the static
card) and ``widget()``. Each class declares its ``kind`` (the JSON's and the
card's) and the ``verb`` that returns it; `RESULT_TYPES` is the registry the
cards and the mirror's event schema read.

This module imports pandas and the standard library only: reading a result
back from JSON and rendering its card never loads torch. Anything that needs
the models (a diff's token views, a capture's shards) is an explicit method that
imports its machinery on first use, never a repr.

Example:
    >>> import aquin_nb, tempfile, os
    >>> align = aquin_nb.sae_align("tiny-gpt2", "tiny-gpt2", max_features=64, progress=False)
    >>> path = align.to_json(os.path.join(tempfile.mkdtemp(), "align.json"))
    >>> again = SaeAlign.from_json(path)
    >>> again.summary["n_matched"], round(again.summary["mean_cosine"], 3)
    (64, 1.0)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from ._errors import AquinError
from ._io import atomic_write_json

SCHEMA_VERSION = 1

R = TypeVar("R", bound="Result")
RESULT_TYPES: dict[str, type[Result]] = {}


def frame_to_json(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """Column-oriented, with missing values as JSON null rather than NaN."""
    columns: dict[str, list[Any]] = {}
    for name in frame.columns:
        values = frame[name].tolist()
        columns[name] = [
            None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v for v in values
        ]
    return columns


def _frame_from_json(
    payload: dict[str, Any],
    name: str,
    columns: tuple[str, ...],
    path: Path,
    optional: tuple[str, ...] = (),
):
    data = payload.get(name)
    missing = [column for column in optional if isinstance(data, dict) and column not in data]
    if missing and data:  # an older file: the columns added since read as null
        first = next(iter(data.values()))
        length = len(first) if isinstance(first, list) else 0
        data = {**data, **{column: [None] * length for column in missing}}
    if not isinstance(data, dict) or set(data) != set(columns):
        raise AquinError(f"{path}: '{name}' must have the columns {list(columns)}")
    lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
    if len(lengths) > 1 or -1 in lengths:
        raise AquinError(f"{path}: the columns of '{name}' must be lists of one length")
    return pd.DataFrame({column: _column(data[column]) for column in columns})


def _column(values: list[Any]) -> Any:
    """Text with gaps stays ``object`` so a gap reads back as ``None``, not NaN."""
    if any(v is None for v in values) and any(isinstance(v, str) for v in values):
        return pd.Series(values, dtype=object)
    return values


def read_payload(path: str | Path, kind: str) -> dict[str, Any]:
    """The JSON object at ``path``, checked to be a ``kind`` result of this schema version."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AquinError(f"cannot read {kind} result {path}: {error}") from None
    found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
    if not isinstance(payload, dict) or found != kind:
        raise AquinError(f"{path} is not a {kind} result (kind={found!r})")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise AquinError(
            f"{path} has schema_version {payload.get('schema_version')!r}; "
            f"this aquin_nb reads version {SCHEMA_VERSION}"
        )
    if not isinstance(payload.get("summary"), dict):
        raise AquinError(f"{path} has no summary object")
    return payload


class Result:
    """What every result shares. Subclasses are frozen dataclasses with a ``summary``.

    ``frames`` names the DataFrame fields and their columns; `to_json` writes
    them column-oriented beside the summary. A result with more than summary
    and frames overrides `_payload` / `_from_payload`.
    """

    kind: ClassVar[str]
    verb: ClassVar[str]
    frames: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Columns added since schema_version 1 was first written: older files lack them.
    optional_columns: ClassVar[tuple[str, ...]] = ()
    summary: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        RESULT_TYPES[cls.kind] = cls

    def _payload(self) -> dict[str, Any]:
        return {name: frame_to_json(getattr(self, name)) for name in self.frames}

    @classmethod
    def _from_payload(cls: type[R], payload: dict[str, Any], path: Path) -> R:
        frames = {
            name: _frame_from_json(payload, name, columns, path, cls.optional_columns)
            for name, columns in cls.frames.items()
        }
        return cls(summary=payload["summary"], **frames)  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        """The whole result as JSON types: what `to_json` writes."""
        header = {"schema_version": SCHEMA_VERSION, "kind": self.kind, "summary": self.summary}
        return {**header, **self._payload()}

    def to_json(self, path: str | Path) -> Path:
        """Write the whole result (``schema_version`` 1) atomically; returns the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls: type[R], path: str | Path) -> R:
        """Read a result written by `to_json` (no models needed)."""
        return cls._from_payload(read_payload(path, cls.kind), Path(path))

    def widget(self) -> Any:
        """A live card (anywidget): sortable tables, feature drill-down where there are models."""
        from .cards.widget import CardWidget

        return CardWidget.for_result(self)

    def figure(self, name: str | None = None) -> Any:
        """A plotly ``Figure`` of one chart the card draws (``name``: the chart's ``name``
        in the card spec, e.g. ``"bars"``; default: the first chart), to restyle or zoom."""
        from .cards.figures import figure

        return figure(self, name)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """``text/plain`` always; the static HTML card on top (it only reads data)."""
        bundle = {"text/plain": repr(self)}
        try:
            from .cards import render_html
        except ImportError:  # cards are optional; plain text still works
            return bundle
        bundle["text/html"] = render_html(self)
        return bundle


# ----------------------------------------------------------------------------- sae diff

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
        from ._tokenview import compute_token_views

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
        from ._corpus import read_corpus
        from ._quiet import third_party_quiet
        from .dashboards import _checkpoint_identity, compute_dashboards

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


# ----------------------------------------------------------------------------- sae align

PAIR_COLUMNS = ("a", "b", "cosine", "rank", "encoder_cosine")
UNMATCHED_COLUMNS = ("side", "feature")


@dataclass(frozen=True, eq=False)
class SaeAlign(Result):
    """The matching of SAE A's features to SAE B's.

    ``summary``: ``n_a``, ``n_b`` (features aligned on each side), ``n_matched``,
    ``mean_cosine``, ``median_cosine``, ``frac_above_0.5``/``0.7``/``0.9``,
    ``method`` (``dense`` or ``sparse``), ``optimal`` (proven), ``gap`` (an upper
    bound on the optimal total cosine minus ours; 0 when optimal),
    ``baseline_mean_cosine`` (an unrelated random dictionary of B's shape aligned
    to A the same way) with ``baseline_method``, ``selection``, ``hook_a``,
    ``hook_b``, ``d_in``, ``sae_a``, ``sae_b``, ``tool_version``.

    ``pairs``: one row per matched pair, sorted by cosine descending: ``a``, ``b``
    (feature indices in each SAE), ``cosine`` (of the unit decoder rows), ``rank``
    (1 = strongest) and ``encoder_cosine`` (of the two encoder columns).
    ``unmatched``: the wider side's features left without a partner (``side``,
    ``feature``).
    """

    kind: ClassVar[str] = "sae_align"
    verb: ClassVar[str] = "sae_align"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {
        "pairs": PAIR_COLUMNS,
        "unmatched": UNMATCHED_COLUMNS,
    }

    summary: dict[str, Any]
    pairs: pd.DataFrame
    unmatched: pd.DataFrame

    def strongest(self, k: int = 10) -> pd.DataFrame:
        return self.pairs.head(k).reset_index(drop=True)

    def weakest(self, k: int = 10) -> pd.DataFrame:
        return self.pairs.tail(k).iloc[::-1].reset_index(drop=True)

    def __repr__(self) -> str:
        s = self.summary
        proof = "optimal" if s["optimal"] else f"gap <= {s['gap']:.3g}"
        return (
            f"SaeAlign({s['n_matched']} pairs of {s['n_a']} x {s['n_b']}: mean cosine "
            f"{s['mean_cosine']:.3f} (unrelated baseline {s['baseline_mean_cosine']:.3f}), "
            f"{s['method']}, {proof})"
        )


# ----------------------------------------------------------------------------- sae train

LOSS_COLUMNS = ("step", "loss", "mse_loss")
ROTATION_COLUMNS = ("feature", "decoder_cosine", "rotation")


@dataclass(frozen=True, eq=False)
class TrainedSae(Result):
    """A temporary SAE and how it compares with the public one.

    ``summary``: ``path`` (the ``{cfg, state_dict}`` .pt), ``saelens_dir``,
    ``model``, ``checkpoint``, ``layer``, ``hook``, ``init_from``,
    ``architecture``, ``d_sae``, ``steps``, ``tokens``, ``interrupted``,
    ``metrics`` (``trained`` and ``public``, each with ``explained_variance``,
    ``l0`` and ``dead_fraction`` on the same held-out activations) and
    ``tool_version``.

    ``loss_curve``: ``step``, ``loss``, ``mse_loss``. ``features`` (warm start
    only): ``feature``, ``decoder_cosine`` (to its public self) and
    ``rotation`` (``1 - decoder_cosine``), most rotated first.
    """

    kind: ClassVar[str] = "sae_train"
    verb: ClassVar[str] = "sae_train"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {
        "loss_curve": LOSS_COLUMNS,
        "features": ROTATION_COLUMNS,
    }

    summary: dict[str, Any]
    loss_curve: pd.DataFrame
    features: pd.DataFrame

    def rotated(self, k: int = 20) -> pd.DataFrame:
        """The ``k`` features whose decoder direction moved most from the public SAE."""
        return self.features.head(k).reset_index(drop=True)

    def load(self) -> Any:
        """The trained SAE as an SAELens object."""
        from .saes import load_sae

        return load_sae(self.summary["path"])

    def __repr__(self) -> str:
        s = self.summary
        trained, public = s["metrics"]["trained"], s["metrics"]["public"]
        public_text = (
            f", public EV {public['explained_variance']:.3f}" if public is not None else ""
        )
        return (
            f"TrainedSae({s['model']} layer {s['layer']}, {s['architecture']} d_sae {s['d_sae']}, "
            f"{s['steps']} steps: EV {trained['explained_variance']:.3f}{public_text}"
            f"{', interrupted' if s['interrupted'] else ''})"
        )


# ----------------------------------------------------------------------------- capture

MANIFEST = "manifest.json"


@dataclass(frozen=True, eq=False)
class Capture(Result):
    """A capture directory: ``manifest.json`` plus ``layers/layer_<N>.pt`` shards.

    ``summary`` is the manifest: ``model``, ``checkpoint``, ``name``, ``layers``,
    ``hooks``, ``position``, ``n_prompts``, ``n_rows``, ``d_model``, ``shapes``,
    ``dtype``, ``prepend_bos``, ``processing``, ``sae_layer``, ``created`` and
    ``tool_version``. Each shard holds ``{"activations": [rows, d_model],
    "prompt_index": [rows]}``; with ``position="all"`` a row is a token (BOS
    excluded), otherwise a prompt.
    """

    kind: ClassVar[str] = "capture"
    verb: ClassVar[str] = "capture_activations"

    directory: Path
    summary: dict[str, Any]

    def layer_path(self, layer: int) -> Path:
        return self.directory / "layers" / f"layer_{layer}.pt"

    def load_layer(self, layer: int) -> Any:
        """Layer ``layer``'s activations, ``[rows, d_model]`` (a torch tensor)."""
        from .capture import read_shard

        if layer not in self.summary["layers"]:
            raise AquinError(
                f"capture {self.directory} has no layer {layer} (it has {self.summary['layers']})"
            )
        return read_shard(self.layer_path(layer), self.summary["d_model"])["activations"]

    @classmethod
    def open(cls, directory: str | Path) -> Capture:
        """Read and check a capture directory's manifest."""
        directory = Path(directory)
        path = directory / MANIFEST
        try:
            manifest = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            raise AquinError(f"activations directory {directory} has no {MANIFEST}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise AquinError(f"{path} is not a valid manifest: {error}") from None
        required = {"layers", "d_model", "position", "hooks"}
        if not isinstance(manifest, dict) or not required <= set(manifest):
            missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else required
            raise AquinError(f"{path} is not a valid manifest: missing {missing}")
        return cls(directory=directory, summary=manifest)

    def _payload(self) -> dict[str, Any]:
        return {"directory": str(self.directory)}

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> Capture:
        if not isinstance(payload.get("directory"), str):
            raise AquinError(f"{path}: a capture result needs its directory")
        return cls(directory=Path(payload["directory"]), summary=payload["summary"])

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Capture({self.directory}: {s['model']}{' + ' + s['name'] if s.get('name') else ''}, "
            f"layers {s['layers']}, {s['n_rows']} rows x {s['d_model']} ({s['position']}))"
        )


# ----------------------------------------------------------------------------- simulate


@dataclass(frozen=True, eq=False)
class Simulation(Result):
    """A forecast fine-tune: the synthetic checkpoint and its ``SaeDiff`` against the base.

    ``summary``: ``checkpoint`` (path), ``method`` (``ntk-diagonal`` or
    ``exact-linear``), ``curvature``, ``lr``, ``steps``, ``batch_size``,
    ``n_examples``, ``params`` (the filter) and ``n_params`` (tensors moved),
    ``delta_norm``, ``seconds``, ``model``. ``diff`` is the forecast's `SaeDiff`.
    """

    kind: ClassVar[str] = "simulation"
    verb: ClassVar[str] = "simulate"

    summary: dict[str, Any]
    diff: SaeDiff

    def _payload(self) -> dict[str, Any]:
        diff = self.diff
        return {"diff": {"summary": diff.summary, **diff._payload()}}

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> Simulation:
        inner = payload.get("diff")
        if not isinstance(inner, dict) or not isinstance(inner.get("summary"), dict):
            raise AquinError(f"{path}: a simulation result needs its diff")
        return cls(summary=payload["summary"], diff=SaeDiff._from_payload(inner, path))

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Simulation({s['method']}, lr {s['lr']}, {s['steps']} steps, {s['n_params']} tensors: "
            f"nChanged={self.diff.summary['n_changed']} "
            f"meanAbsDelta={self.diff.summary['mean_abs_delta']:.6g})"
        )


# ----------------------------------------------------------------------------- model diff

TOKEN_COLUMNS = ("prompt", "position", "token", "context", "kl", "base_next", "checkpoint_next")
PROMPT_COLUMNS = ("prompt", "text", "mean_kl", "max_kl", "n_tokens")
LAYER_COLUMNS = ("layer", "rel_drift", "cosine")
PROMOTED_COLUMNS = ("layer", "direction", "rank", "token", "token_id", "cosine", "logit")
MODULE_COLUMNS = ("module", "shape", "rel_change", "abs_change", "stable_rank", "changed")


@dataclass(frozen=True, eq=False)
class ModelDiff(Result):
    """What a fine-tune changed without a dictionary: KL, layer drift, promoted tokens, weights.

    ``summary``: ``model``, ``checkpoint``, ``name``, ``n_prompts``, ``n_tokens``,
    ``mean_kl``, ``max_kl``, ``n_layers``, ``suggested_layer`` (the first layer
    whose drift reaches ``drift_threshold``, else the most-moved layer, ``None``
    when nothing moved) with ``suggestion`` (why, in words), ``n_modules``,
    ``n_modules_changed``, ``tool_version``.

    ============  ==============================================================
    ``tokens``    the positions where the next-token distribution changed most:
                  ``prompt``, ``position``, ``token`` (the token read there),
                  ``context`` (up to 8 tokens before it, the token in ⟦ ⟧),
                  ``kl`` (KL(base ‖ checkpoint) of the next-token
                  distributions), ``base_next`` / ``checkpoint_next`` (each
                  model's most likely next token); largest ``kl`` first
    ``prompts``   per prompt: ``prompt``, ``text`` (first 200 characters),
                  ``mean_kl`` and ``max_kl`` over its real non-BOS positions,
                  ``n_tokens``
    ``layers``    per block: ``layer``, ``rel_drift`` (mean ‖Δx‖/‖x‖ of the
                  residual stream after that block), ``cosine`` (mean cosine of
                  base and checkpoint activations)
    ``promoted``  per layer that moved: ``layer``, ``direction`` (``promoted`` or
                  ``suppressed``), ``rank``, ``token``, ``token_id``, ``cosine``
                  (of the mean activation difference, through the final norm,
                  with the token's unembedding row; the ranking), ``logit`` (the
                  token's logit for that normalised difference): the logit lens
                  of the mean activation difference
    ``modules``   per parameter tensor: ``module`` (its Hugging Face name),
                  ``shape``, ``rel_change`` (‖ΔW‖_F/‖W‖_F; ``None`` when W is
                  zero and changed), ``abs_change`` (‖ΔW‖_F), ``stable_rank``
                  (‖ΔW‖_F²/σ_max², matrices only), ``changed``; most changed first
    ============  ==============================================================
    """

    kind: ClassVar[str] = "model_diff"
    verb: ClassVar[str] = "model_diff"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {
        "tokens": TOKEN_COLUMNS,
        "prompts": PROMPT_COLUMNS,
        "layers": LAYER_COLUMNS,
        "promoted": PROMOTED_COLUMNS,
        "modules": MODULE_COLUMNS,
    }

    summary: dict[str, Any]
    tokens: pd.DataFrame
    prompts: pd.DataFrame
    layers: pd.DataFrame
    promoted: pd.DataFrame
    modules: pd.DataFrame

    def promoted_at(self, layer: int | None = None, direction: str = "promoted") -> list[str]:
        """The tokens pushed ``direction`` at ``layer`` (default: the last layer)."""
        layer = self.summary["n_layers"] - 1 if layer is None else layer
        rows = self.promoted[
            (self.promoted["layer"] == layer) & (self.promoted["direction"] == direction)
        ]
        return rows.sort_values("rank")["token"].tolist()

    def changed_modules(self) -> pd.DataFrame:
        return self.modules[self.modules["changed"]].reset_index(drop=True)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"ModelDiff({s['model']} vs {s['name']}: mean KL {s['mean_kl']:.4g} (max "
            f"{s['max_kl']:.4g}) over {s['n_tokens']} tokens, {s['n_modules_changed']}/"
            f"{s['n_modules']} tensors changed, suggested layer {s['suggested_layer']})"
        )


# ----------------------------------------------------------------------------- sae trajectory

TRAJECTORY_STEP_COLUMNS = ("step", "feature", "delta", "shift", "q_value", "changed")
PER_STEP_COLUMNS = (
    "step",
    "name",
    "checkpoint",
    "n_changed",
    "mean_abs_delta",
    "max_abs_delta",
    "shift_norm",
    "fit_verdict",
    "explained_variance",
    "l0",
    "ce_loss_recovered",
    "kl_div_score",
    "fit_warning",
)
FIRST_CHANGED_COLUMNS = ("feature", "first_changed_step", "last_changed_step", "n_steps_changed")
METRIC_COLUMNS = ("step", "metric", "value")
_TRAJECTORY_DTYPES: dict[str, dict[str, Any]] = {
    "steps": {
        "step": "int64",
        "feature": "int64",
        "delta": "float64",
        "shift": "float64",
        "q_value": "float64",
        "changed": "bool",
    },
    "per_step": {
        "step": "int64",
        "name": object,
        "checkpoint": object,
        "n_changed": "int64",
        "mean_abs_delta": "float64",
        "max_abs_delta": "float64",
        "shift_norm": "float64",
        "fit_verdict": object,
        "explained_variance": "float64",
        "l0": "float64",
        "ce_loss_recovered": "float64",
        "kl_div_score": "float64",
        "fit_warning": object,
    },
    "features": dict.fromkeys(FIRST_CHANGED_COLUMNS, "int64"),
    "metrics": {"step": "int64", "metric": object, "value": "float64"},
}


def typed_trajectory_frame(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the dtypes `SaeTrajectory` documents (JSON nulls become NaN in floats)."""
    dtypes = _TRAJECTORY_DTYPES[name]
    frame = frame.astype({column: dtypes[column] for column in frame.columns if column in dtypes})
    for column in frame.columns:  # text columns hold None, not NaN, where a value is missing
        if dtypes.get(column) is object:
            values = [None if _missing(v) else v for v in frame[column]]
            frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return frame


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True, eq=False)
class SaeTrajectory(Result):
    """Every checkpoint of a run against one base, through one SAE, step by step.

    ``summary`` (plain JSON types): ``model``, ``hook``, ``layer``, ``n_features``,
    ``n_prompts``, ``n_tokens``, ``name``, ``source`` (the checkpoints as given),
    ``labels`` (``{feature: label}`` for the tracked features, as `SaeDiff` labels them),
    ``n_steps``, ``first_step``, ``last_step``, ``n_ever_changed``, ``worst_fit``
    (the worst per-step verdict), ``fit_base`` (the base's fit figures, computed
    once), ``criteria`` (as in `SaeDiff`), ``tracking`` (``top_k``,
    ``max_features``), ``backend``, ``metrics`` (the metrics file or null) and
    ``tool_version``.

    ``steps``, the long table: one row per step and *tracked* feature, sorted by
    step then feature: ``step``, ``feature``, ``delta`` (checkpoint minus base
    token-mean activation), ``shift`` (its coefficient in the decomposition of the
    mean residual shift, as `SaeDiff`'s ``shift``), ``q_value``, ``changed`` (the
    same test as `SaeDiff`). A feature is tracked from the first step at which it
    is among that step's ``top_k`` features by ``|delta|`` or by ``|shift|`` (non-zero)
    or counts as changed,
    and gets a row at every step from then on. At most ``max_features`` features
    are tracked: a step's top ``top_k`` enter while fewer are tracked, its other
    changed features (by ``|delta|``) only while fewer than half are, so the
    features that move most keep room to enter late in a run. The table holds at
    most ``max_features`` rows per step; a feature's missing rows before it was
    tracked mean it was neither changed nor among the top ``top_k`` there.

    ``per_step``: one row per checkpoint: ``step``, ``name``, ``checkpoint``,
    ``n_changed``, ``mean_abs_delta``, ``max_abs_delta`` (over all features, not
    only tracked ones), ``shift_norm`` (the norm of the mean residual shift at the
    hook), ``fit_verdict`` (pass/warn/fail, as `SaeDiff`'s fit),
    the checkpoint's ``explained_variance``, ``l0``, ``ce_loss_recovered``,
    ``kl_div_score`` (NaN where not measured) and ``fit_warning`` (or None).

    ``features``: every feature that counts as changed at some step (tracked or
    not): ``feature``, ``first_changed_step``, ``last_changed_step``,
    ``n_steps_changed``, sorted by first changed step.

    ``metrics``: the run's training metrics on the same step axis, long:
    ``step``, ``metric``, ``value`` (empty when the run logged none).
    """

    kind: ClassVar[str] = "sae_trajectory"
    verb: ClassVar[str] = "sae_trajectory"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {
        "steps": TRAJECTORY_STEP_COLUMNS,
        "per_step": PER_STEP_COLUMNS,
        "features": FIRST_CHANGED_COLUMNS,
        "metrics": METRIC_COLUMNS,
    }

    summary: dict[str, Any]
    steps: pd.DataFrame
    per_step: pd.DataFrame
    features: pd.DataFrame
    metrics: pd.DataFrame

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> SaeTrajectory:
        read = super()._from_payload(payload, path)
        try:
            frames = {
                name: typed_trajectory_frame(name, getattr(read, name)) for name in cls.frames
            }
        except (TypeError, ValueError) as error:
            raise AquinError(f"{path}: a column of the wrong type ({error})") from None
        return cls(summary=read.summary, **frames)

    def first_changed(self) -> dict[int, int]:
        """``{feature: first step at which it counts as changed}`` for every such feature."""
        return {
            int(f): int(s)
            for f, s in zip(
                self.features["feature"], self.features["first_changed_step"], strict=True
            )
        }

    def top(self, k: int = 10) -> list[int]:
        """The ``k`` tracked features with the largest ``|delta|`` at any step."""
        if self.steps.empty:
            return []
        peak = self.steps.assign(abs_delta=self.steps["delta"].abs())
        peak = peak.groupby("feature")["abs_delta"].max().reset_index()
        peak = peak.sort_values(["abs_delta", "feature"], ascending=[False, True], kind="stable")
        return [int(f) for f in peak["feature"].head(k)]

    def describe_step(self, step: int) -> str:
        """One line on ``step``: what `watch` prints as each checkpoint is diffed."""
        row = self.per_step.set_index("step").loc[step]
        return (
            f"step {step} ({row['name']}): {row['n_changed']} features changed, max |Δ| "
            f"{row['max_abs_delta']:.4g}, fit {row['fit_verdict']}"
        )

    def wide(self, value: str = "delta", features: list[int] | None = None) -> pd.DataFrame:
        """Features x steps of ``value`` (``delta``, ``q_value`` or ``changed``); NaN where
        a feature was not yet tracked. Rows: ``features`` (default: `top` 10)."""
        chosen = self.top() if features is None else [int(f) for f in features]
        table = self.steps[self.steps["feature"].isin(chosen)].pivot(
            index="feature", columns="step", values=value
        )
        return table.reindex(index=chosen, columns=self.per_step["step"].tolist())

    def __repr__(self) -> str:
        s = self.summary
        span = f"steps {s['first_step']}-{s['last_step']}" if s["n_steps"] else "no steps yet"
        return (
            f"SaeTrajectory({s['model']} vs {s['name']} @ {s['hook']}: {s['n_steps']} checkpoints "
            f"({span}), {s['n_ever_changed']}/{s['n_features']} features changed at some step, "
            f"worst fit {s['worst_fit']})"
        )


# ----------------------------------------------------------------------------- dashboards

DASHBOARD_COLUMNS = (
    "feature",
    "label",
    "density",
    "max_activation",
    "checkpoint_density",
    "checkpoint_max_activation",
    "url",
)


@dataclass(frozen=True, eq=False)
class Dashboards(Result):
    """Feature dashboards over a reference corpus (see `aquin_nb.dashboards`).

    ``summary``: ``model``, ``checkpoint``, ``sae``, ``hook``, ``layer``,
    ``neuronpedia_id``, ``n_windows``, ``n_tokens``, ``k``, ``sides`` (``base``
    and, with a checkpoint, ``checkpoint``), ``histogram_edges``,
    ``dead_fraction``, ``cache`` (the ``.npz`` holding contexts, histograms
    and logit lens) and ``tool_version``.

    ``features``, one row per feature: ``feature``, ``label``, ``density`` and
    ``max_activation`` on the base (``checkpoint_density`` and
    ``checkpoint_max_activation`` on the checkpoint, NaN without one), ``url``
    (its Neuronpedia page, ``None`` without a ``neuronpedia_id``).
    ``feature(i)`` returns one feature's whole dashboard as plain JSON types.
    """

    kind: ClassVar[str] = "dashboards"
    verb: ClassVar[str] = "feature_dashboards"
    frames: ClassVar[dict[str, tuple[str, ...]]] = {"features": DASHBOARD_COLUMNS}

    summary: dict[str, Any]
    features: pd.DataFrame

    def _arrays(self) -> dict[str, Any]:
        return _load_arrays(self.summary["cache"])

    def _side(self, arrays: dict[str, Any], side: str, index: int) -> dict[str, Any]:
        before = int(arrays["window_before"][0])
        vocab = _vocabulary(arrays)
        contexts = []
        for tokens, acts, value in zip(
            arrays[f"{side}_tokens"][index],
            arrays[f"{side}_acts"][index],
            arrays[f"{side}_values"][index],
            strict=True,
        ):
            if not value > 0:
                continue  # fewer than k firings in the whole corpus
            kept = [
                (vocab[t], round(float(a), 4)) for t, a in zip(tokens, acts, strict=True) if t >= 0
            ]
            peak = sum(1 for t in tokens[:before] if t >= 0)
            contexts.append(
                {
                    "tokens": [t for t, _ in kept],
                    "acts": [a for _, a in kept],
                    "peak": peak,
                    "max": round(float(value), 4),
                }
            )
        lens = {
            direction: [
                {"token": vocab[t], "cosine": round(float(c), 4)}
                for t, c in zip(
                    arrays[f"{side}_lens_{which}"][index],
                    arrays[f"{side}_lens_{which}_cosine"][index],
                    strict=True,
                )
            ]
            for direction, which in (("promoted", "top"), ("suppressed", "bottom"))
        }
        return {
            "contexts": contexts,
            "density": float(arrays[f"{side}_density"][index]),
            "histogram": [int(c) for c in arrays[f"{side}_histogram"][index]],
            **lens,
        }

    def feature(self, index: int) -> dict[str, Any]:
        """Feature ``index``'s dashboard: label, url, and per side its top contexts
        (tokens with the feature's activation on each, the peak's position), density,
        histogram counts (``summary["histogram_edges"]``) and logit-lens tokens."""
        index = int(index)
        if not 0 <= index < len(self.features):
            raise AquinError(
                f"feature {index} is out of range: the SAE has {len(self.features)} features "
                f"(0-{len(self.features) - 1})"
            )
        arrays = self._arrays()
        row = self.features.iloc[index]
        return {
            "feature": index,
            "label": row["label"] if isinstance(row["label"], str) else None,
            "url": row["url"] if isinstance(row["url"], str) else None,
            "density": float(row["density"]),
            "histogram_edges": self.summary["histogram_edges"],
            "base": self._side(arrays, "base", index),
            "checkpoint": (
                self._side(arrays, "checkpoint", index)
                if "checkpoint" in self.summary["sides"]
                else None
            ),
        }

    def label(self, index: int) -> str:
        """The offline label: peak tokens of the top contexts, then logit-lens tokens."""
        from .labels import offline_label

        side = self._side(self._arrays(), "base", int(index))
        peaks = [c["tokens"][c["peak"]] for c in side["contexts"] if c["peak"] < len(c["tokens"])]
        return offline_label(peaks, [item["token"] for item in side["promoted"]])

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"Dashboards({s['model']} @ {s['hook']}: {len(self.features)} features over "
            f"{s['n_tokens']} tokens, k={s['k']}, {s['dead_fraction']:.1%} dead, "
            f"sides {'+'.join(s['sides'])})"
        )


_ARRAYS: dict[str, dict[str, Any]] = {}


def _load_arrays(path: str) -> dict[str, Any]:
    """The dashboard arrays (numpy, no pickle), loaded once per process."""
    import numpy as np

    if path not in _ARRAYS:
        try:
            with np.load(path, allow_pickle=False) as stored:
                _ARRAYS[path] = {name: stored[name] for name in stored.files}
        except (OSError, ValueError) as error:
            raise AquinError(
                f"dashboard cache {path} is unreadable ({error}); compute it again"
            ) from None
    return _ARRAYS[path]


def _vocabulary(arrays: dict[str, Any]) -> list[str]:
    """The token strings stored with the arrays (UTF-8 bytes and offsets, no pickle)."""
    if "_vocab" not in arrays:
        data, offsets = bytes(arrays["vocab_bytes"]), arrays["vocab_offsets"]
        arrays["_vocab"] = [
            data[offsets[i] : offsets[i + 1]].decode("utf-8", "replace")
            for i in range(len(offsets) - 1)
        ]
    return arrays["_vocab"]
