"""Dashboards: feature dashboards over a reference corpus."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from .._errors import AquinError
from ._base import Result

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
        return self.labels([int(index)])[0]

    def labels(self, features: list[int] | None = None) -> list[str]:
        """`label` of each of ``features`` (all by default), read from the arrays at once."""
        import numpy as np

        from ..labels import offline_label

        arrays = self._arrays()
        if features is None:
            rows = np.arange(len(arrays["base_values"]))
        elif not len(features):
            return []
        else:
            rows = np.asarray(features, dtype=np.int64)
        before = int(arrays["window_before"][0])
        vocab = _vocabulary(arrays)
        # a top context's peak is the token that fired, at `before` in its window;
        # fewer than k firings in the whole corpus leave slots with no value
        peaks = np.where(
            arrays["base_values"][rows] > 0, arrays["base_tokens"][rows][:, :, before], -1
        ).tolist()
        lens = arrays["base_lens_top"][rows].tolist()
        return [
            offline_label([vocab[t] for t in peak if t >= 0], [vocab[t] for t in top])
            for peak, top in zip(peaks, lens, strict=True)
        ]

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
