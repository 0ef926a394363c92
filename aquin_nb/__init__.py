"""aquin_nb: see what a fine-tune changed inside a language model, in SAE features.

Importing the package does no work: the verbs load torch and friends on first use.

Example (``checkpoint`` is any fine-tuned checkpoint of tiny-gpt2, e.g. the one
``aquin-nb demo`` writes to ``demo_out/run/checkpoints/checkpoint.pt``):
    >>> import aquin_nb
    >>> diff = aquin_nb.sae_diff("tiny-gpt2", checkpoint, progress=False)
    >>> diff.summary["n_features"], diff.summary["n_changed"] > 0
    (1536, True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import AquinError

__version__ = "0.1.0"

__all__ = [
    "AquinError",
    "Capture",
    "Dashboards",
    "ModelDiff",
    "Run",
    "SaeAlign",
    "SaeDiff",
    "SaeTrajectory",
    "Simulation",
    "TrainedSae",
    "__version__",
    "capture_activations",
    "connect",
    "disconnect",
    "feature_dashboards",
    "import_explanations",
    "load_model",
    "load_sae",
    "model_diff",
    "sae_align",
    "sae_diff",
    "sae_train",
    "sae_trajectory",
    "simulate",
    "watch",
]

_LAZY = {
    "Simulation": "aquin_nb.results",
    "simulate": "aquin_nb.simulation",
    "Capture": "aquin_nb.results",
    "TrainedSae": "aquin_nb.results",
    "capture_activations": "aquin_nb.capture",
    "sae_train": "aquin_nb.train",
    "Run": "aquin_nb.run",
    "connect": "aquin_nb.mirror",
    "disconnect": "aquin_nb.mirror",
    "SaeAlign": "aquin_nb.results",
    "SaeDiff": "aquin_nb.results",
    "Dashboards": "aquin_nb.results",
    "feature_dashboards": "aquin_nb.dashboards",
    "import_explanations": "aquin_nb.labels",
    "ModelDiff": "aquin_nb.results",
    "model_diff": "aquin_nb.modeldiff",
    "load_model": "aquin_nb.models",
    "load_sae": "aquin_nb.saes",
    "sae_align": "aquin_nb.align",
    "sae_diff": "aquin_nb.diff",
    "SaeTrajectory": "aquin_nb.results",
    "sae_trajectory": "aquin_nb.trajectory",
    "watch": "aquin_nb.watcher",
}

if TYPE_CHECKING:
    from .align import sae_align
    from .capture import capture_activations
    from .dashboards import feature_dashboards
    from .diff import sae_diff
    from .labels import import_explanations
    from .mirror import connect, disconnect
    from .modeldiff import model_diff
    from .models import load_model
    from .results import (
        Capture,
        Dashboards,
        ModelDiff,
        SaeAlign,
        SaeDiff,
        SaeTrajectory,
        Simulation,
        TrainedSae,
    )
    from .run import Run
    from .saes import load_sae
    from .simulation import simulate
    from .train import sae_train
    from .trajectory import sae_trajectory
    from .watcher import watch


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aquin_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
