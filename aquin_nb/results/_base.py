"""What every result shares: the `Result` mixin, the registry and versioned JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pandas as pd

from .._errors import AquinError
from .._io import atomic_write_json

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
        from ..cards.widget import CardWidget

        return CardWidget.for_result(self)

    def figure(self, name: str | None = None) -> Any:
        """A plotly ``Figure`` of one chart the card draws (``name``: the chart's ``name``
        in the card spec, e.g. ``"bars"``; default: the first chart), to restyle or zoom."""
        from ..cards.figures import figure

        return figure(self, name)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """``text/plain`` always; the static HTML card on top (it only reads data)."""
        bundle = {"text/plain": repr(self)}
        try:
            from ..cards import render_html
        except ImportError:  # cards are optional; plain text still works
            return bundle
        bundle["text/html"] = render_html(self)
        return bundle
