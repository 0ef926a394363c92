"""Every result type aquin_nb returns, in one torch-free home (DESIGN.md decision 4).

Results are frozen dataclasses holding a ``summary`` of plain JSON types and
pandas DataFrames with the fixed columns documented on each class. They share
one mixin, `Result`: ``to_json(path)`` / ``from_json(path)`` (versioned,
written atomically), ``_repr_mimebundle_`` (``text/plain`` plus the static
card) and ``widget()``. Each class declares its ``kind`` (the JSON's and the
card's) and the ``verb`` that returns it; `RESULT_TYPES` is the registry the
cards and the mirror's event schema read.

This package (one module per result kind, the shared mixin in `_base`) imports
pandas, numpy and the standard library only: reading a result
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

from ._base import RESULT_TYPES, SCHEMA_VERSION, Result, frame_to_json, read_payload
from .align import PAIR_COLUMNS, UNMATCHED_COLUMNS, SaeAlign
from .capture import MANIFEST, Capture
from .dashboards import _ARRAYS, DASHBOARD_COLUMNS, Dashboards, _load_arrays
from .diff import DISPLAY_COLUMNS, FEATURE_COLUMNS, SaeDiff
from .model_diff import (
    LAYER_COLUMNS,
    MODULE_COLUMNS,
    PROMOTED_COLUMNS,
    PROMPT_COLUMNS,
    TOKEN_COLUMNS,
    ModelDiff,
)
from .simulation import Simulation
from .train import LOSS_COLUMNS, ROTATION_COLUMNS, TrainedSae
from .trajectory import (
    FIRST_CHANGED_COLUMNS,
    METRIC_COLUMNS,
    PER_STEP_COLUMNS,
    TRAJECTORY_STEP_COLUMNS,
    SaeTrajectory,
    typed_trajectory_frame,
)

__all__ = [
    "DASHBOARD_COLUMNS",
    "DISPLAY_COLUMNS",
    "FEATURE_COLUMNS",
    "FIRST_CHANGED_COLUMNS",
    "LAYER_COLUMNS",
    "LOSS_COLUMNS",
    "MANIFEST",
    "METRIC_COLUMNS",
    "MODULE_COLUMNS",
    "PAIR_COLUMNS",
    "PER_STEP_COLUMNS",
    "PROMOTED_COLUMNS",
    "PROMPT_COLUMNS",
    "RESULT_TYPES",
    "ROTATION_COLUMNS",
    "SCHEMA_VERSION",
    "TOKEN_COLUMNS",
    "TRAJECTORY_STEP_COLUMNS",
    "UNMATCHED_COLUMNS",
    "Capture",
    "Dashboards",
    "ModelDiff",
    "Result",
    "SaeAlign",
    "SaeDiff",
    "SaeTrajectory",
    "Simulation",
    "TrainedSae",
    "_ARRAYS",
    "_load_arrays",
    "frame_to_json",
    "read_payload",
    "typed_trajectory_frame",
]
