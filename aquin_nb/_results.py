"""What every result type shares: versioned JSON and the notebook mimebundle."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ._errors import AquinError
from ._io import atomic_write_json

SCHEMA_VERSION = 1


def frame_to_json(frame: pd.DataFrame) -> dict[str, list[Any]]:
    """Column-oriented, with missing values as JSON null rather than NaN."""
    columns: dict[str, list[Any]] = {}
    for name in frame.columns:
        values = frame[name].tolist()
        columns[name] = [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    return columns


def write_result(
    path: str | Path, kind: str, summary: dict[str, Any], **frames: pd.DataFrame
) -> Path:
    payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": kind, "summary": summary}
    for name, frame in frames.items():
        payload[name] = frame_to_json(frame)
    return atomic_write_json(path, payload)


def read_result(path: str | Path, kind: str) -> dict[str, Any]:
    path = Path(path)
    try:
        payload = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AquinError(f"cannot read {kind} result {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise AquinError(f"{path} is not a {kind} result (kind={payload.get('kind')!r})")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise AquinError(
            f"{path} has schema_version {payload.get('schema_version')!r}; "
            f"this aquin_nb reads version {SCHEMA_VERSION}"
        )
    return payload


def mimebundle(result: Any, kind: str) -> dict[str, str]:
    """``text/plain`` always; the HTML card on top when the cards package renders it."""
    bundle = {"text/plain": repr(result)}
    try:
        from .cards import render_html
    except ImportError:  # cards are optional; plain text still works
        return bundle
    bundle["text/html"] = render_html(result, kind)
    return bundle
