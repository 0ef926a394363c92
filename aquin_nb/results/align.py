"""SaeAlign: the matching of two SAEs' features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from ._base import Result

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
