"""ModelDiff: SAE-free signals of what a fine-tune changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from ._base import Result

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
