"""A run's training metrics (JSONL, one object per line with ``step``), as trainers log them.

``{"step": 100, "loss": 2.31, "lr": 0.0002}`` per line; every finite number
beside ``step`` is a metric, anything else (strings, booleans, nested objects)
is left out. The trainer may be writing the file while it is read, so an
unfinished last line is skipped silently; a malformed line elsewhere is skipped
with one warning naming the file and the line. A metric logged more than
`MAX_POINTS` times is thinned evenly (first and last kept), so a trajectory
stays small however long the run logs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ._errors import AquinError
from .results import METRIC_COLUMNS, typed_trajectory_frame

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MAX_POINTS = 1000
MAX_BYTES = 256 * 1024 * 1024


def find_metrics(run_dir: Path) -> Path | None:
    """``metrics.jsonl`` in the run directory (or beside its ``checkpoints/``), if any."""
    for folder in (run_dir, run_dir.parent if run_dir.name == "checkpoints" else None):
        if folder is not None and (folder / METRICS_FILE).is_file():
            return folder / METRICS_FILE
    return None


def read_metrics(path: str | Path) -> pd.DataFrame:
    """The metrics at ``path`` as a long frame: ``step``, ``metric``, ``value``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise AquinError(
                f"metrics file {path} is {size:,} bytes; at most {MAX_BYTES:,} are read"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise AquinError(f"metrics file {path} does not exist") from None
    except OSError as error:
        raise AquinError(f"cannot read metrics file {path}: {error.strerror or error}") from None
    lines = data.split(b"\n")
    if not data.endswith(b"\n"):
        lines = lines[:-1]  # the trainer is still writing the last line
    rows: list[tuple[int, str, float]] = []
    bad: list[int] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            bad.append(number)
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            bad.append(number)
            continue
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                rows.append((step, str(key), float(value)))
    if bad:
        logger.warning(
            "metrics file %s: skipped %d line(s) that are not JSON objects with an integer "
            "'step' (first: line %d)",
            path,
            len(bad),
            bad[0],
        )
    frame = pd.DataFrame(rows, columns=list(METRIC_COLUMNS))
    frame = frame.drop_duplicates(["step", "metric"], keep="last")
    frame = frame.sort_values(["metric", "step"], kind="stable")
    thinned = [_thin(group) for _, group in frame.groupby("metric", sort=True)]
    frame = pd.concat(thinned) if thinned else frame
    return typed_trajectory_frame("metrics", frame.reset_index(drop=True))


def _thin(group: pd.DataFrame) -> pd.DataFrame:
    if len(group) <= MAX_POINTS:
        return group
    keep = np.unique(np.linspace(0, len(group) - 1, MAX_POINTS).round().astype(int))
    return group.iloc[keep]
