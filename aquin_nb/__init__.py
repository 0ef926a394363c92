"""aquin_nb: see what a fine-tune changed inside a language model, in SAE features.

Importing the package does no work: the verbs load torch and friends on first use.

Example:
    >>> import aquin_nb
    >>> diff = aquin_nb.sae_diff("tiny-gpt2", "runs/lora/checkpoints/checkpoint.pt")  # doctest: +SKIP
    >>> diff.summary["n_changed"]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import AquinError

__version__ = "0.1.0"

__all__ = [
    "AquinError",
    "Capture",
    "Run",
    "SaeAlign",
    "SaeDiff",
    "Simulation",
    "TrainedSae",
    "__version__",
    "capture_activations",
    "connect",
    "disconnect",
    "load_model",
    "load_sae",
    "sae_align",
    "sae_diff",
    "sae_train",
    "simulate",
]

_LAZY = {
    "Simulation": "aquin_nb.simulate",
    "simulate": "aquin_nb.simulate",
    "Capture": "aquin_nb.capture",
    "TrainedSae": "aquin_nb.train",
    "capture_activations": "aquin_nb.capture",
    "sae_train": "aquin_nb.train",
    "Run": "aquin_nb.run",
    "connect": "aquin_nb.mirror",
    "disconnect": "aquin_nb.mirror",
    "SaeAlign": "aquin_nb.align",
    "SaeDiff": "aquin_nb.diff",
    "load_model": "aquin_nb.models",
    "load_sae": "aquin_nb.saes",
    "sae_align": "aquin_nb.align",
    "sae_diff": "aquin_nb.diff",
}

if TYPE_CHECKING:
    from .align import SaeAlign, sae_align
    from .capture import Capture, capture_activations
    from .diff import SaeDiff, sae_diff
    from .mirror import connect, disconnect
    from .models import load_model
    from .run import Run
    from .saes import load_sae
    from .simulate import Simulation, simulate
    from .train import TrainedSae, sae_train


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aquin_nb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
