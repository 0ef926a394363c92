"""TrainedSae: a temporary SAE and how it compares with the public one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from ._base import Result

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
        from ..saes import load_sae

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
