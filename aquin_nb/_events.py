"""The mirror's event schema, shared by the client (`mirror`) and the receiver (`server`).

Two event types, both JSON objects with ``schema_version`` 1:

* ``tool.start``: ``event_id``, ``invocation_id``, ``tool``, ``name``, ``time``,
  ``arguments`` (a description of the call, strings and numbers only);
* ``tool.result``: the same ``invocation_id`` and ``tool``, ``status`` (``ok`` or
  ``error``), ``error`` (the message, or ``None``), ``duration_s``, ``summary``
  (the result's summary without its bulky entries) and ``card`` (the card spec,
  or ``None``).

Every event is at most `MAX_EVENT_BYTES` of UTF-8 JSON; `slim_result_event`
trims the card (token views, then table rows, then the whole card) to fit.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from .results import RESULT_TYPES

SCHEMA_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024
MAX_SUMMARY_ENTRY_BYTES = 4 * 1024
MAX_ARGUMENT_CHARS = 200
# The verbs and card kinds come from the result registry: adding a result type
# adds its verb and its card kind to the schema.
TOOLS = tuple(result.verb for result in RESULT_TYPES.values())
CARD_KINDS = tuple(RESULT_TYPES)
EVENT_TYPES = ("tool.start", "tool.result")
STATUSES = ("ok", "error")
SECTION_TYPES = ("bars", "table", "histogram", "heatmap", "line")
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID = re.compile(r"[0-9a-f]{32}")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_session_name(name: str) -> str | None:
    """The problem with a session name, or ``None`` when it is valid."""
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name):
        return (
            f"session name {name!r} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return None


def plain(value: Any) -> Any:
    """``value`` with numpy scalars unwrapped and NaN/inf as ``None``, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return str(value)  # the receiver refuses integers beyond 64 bits
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def encode(payload: Any) -> bytes:
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("utf-8")


def describe_value(value: Any) -> Any:
    """A short, JSON-safe description of one argument (never its bulk)."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= MAX_ARGUMENT_CHARS else value[:MAX_ARGUMENT_CHARS] + "…"
    if isinstance(value, os.PathLike):
        return describe_value(os.fspath(value))
    if isinstance(value, (list, tuple)):
        head = [describe_value(v) for v in value[:3]]
        return {"items": len(value), "head": head}
    if isinstance(value, dict):
        return {"keys": len(value)}
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<{type(value).__name__} {tuple(shape)}>"
    return f"<{type(value).__name__}>"


def describe_arguments(
    function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name, each described by `describe_value`."""
    try:
        bound = inspect.signature(function).bind_partial(*args, **kwargs)
    except TypeError:  # the verb itself will raise the real error
        return {
            "args": [describe_value(a) for a in args],
            **{k: describe_value(v) for k, v in kwargs.items()},
        }
    return {name: describe_value(value) for name, value in bound.arguments.items()}


def invocation_label(arguments: dict[str, Any]) -> str:
    """What the session page shows as the invocation's name."""
    for key in ("name", "checkpoint", "data", "output", "model", "sae_a"):
        value = arguments.get(key)
        if isinstance(value, str) and value:
            return os.path.basename(value.rstrip("/")) or value
    return ""


def start_event(
    event_id: str, invocation_id: str, tool: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "tool.start",
        "event_id": event_id,
        "invocation_id": invocation_id,
        "tool": tool,
        "name": invocation_label(arguments),
        "time": now_iso(),
        "arguments": arguments,
    }


def result_event(
    event_id: str,
    invocation_id: str,
    tool: str,
    name: str,
    *,
    duration_s: float,
    error: BaseException | None = None,
    summary: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> dict[str, Any]:
    message = None
    if error is not None:
        message = f"{type(error).__name__}: {error}"[:2000]
    event = {
        "schema_version": SCHEMA_VERSION,
        "type": "tool.result",
        "event_id": event_id,
        "invocation_id": invocation_id,
        "tool": tool,
        "name": name,
        "time": now_iso(),
        "status": "error" if error is not None else "ok",
        "error": message,
        "duration_s": round(duration_s, 4),
        "summary": slim_summary(summary or {}),
        "card": plain(card) if card is not None else None,
    }
    return slim_result_event(event)


def slim_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without entries over `MAX_SUMMARY_ENTRY_BYTES` (the card shows those)."""
    kept: dict[str, Any] = {}
    omitted = []
    for key, value in plain(summary).items():
        if len(encode(value)) > MAX_SUMMARY_ENTRY_BYTES:
            omitted.append(key)
        else:
            kept[key] = value
    if omitted:
        kept["omitted"] = omitted
    return kept


def slim_result_event(event: dict[str, Any], limit: int = MAX_EVENT_BYTES) -> dict[str, Any]:
    """Trim the card until the event fits in ``limit`` bytes: token views go first,
    then table rows (halved until they fit), then the card itself."""
    if len(encode(event)) <= limit:
        return event
    card = event.get("card")
    if isinstance(card, dict):
        card.pop("token_views", None)
        tables = [s for s in card.get("sections", []) if s.get("type") == "table"]
        while len(encode(event)) > limit and any(len(t["rows"]) > 1 for t in tables):
            for table in tables:
                table["rows"] = table["rows"][: len(table["rows"]) // 2]
    if len(encode(event)) > limit:
        event["card"] = None
        event["summary"] = {"omitted": ["all: over the event size limit"]}
    return event


def _problem(event: Any) -> str | None:
    if not isinstance(event, dict):
        return "an event must be a JSON object"
    if event.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {event.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
    kind = event.get("type")
    if kind not in EVENT_TYPES:
        return f"unknown event type {kind!r}; expected one of {list(EVENT_TYPES)}"
    for key in ("event_id", "invocation_id"):
        if not isinstance(event.get(key), str) or not _ID.fullmatch(event[key]):
            return f"{key} must be 32 lowercase hex digits"
    if event.get("tool") not in TOOLS:
        return f"unknown tool {event.get('tool')!r}; expected one of {list(TOOLS)}"
    if not isinstance(event.get("name"), str) or not isinstance(event.get("time"), str):
        return "name and time must be strings"
    if kind == "tool.start":
        if not isinstance(event.get("arguments"), dict):
            return "tool.start needs an arguments object"
        return None
    if event.get("status") not in STATUSES:
        return f"status must be one of {list(STATUSES)}"
    if event.get("error") is not None and not isinstance(event["error"], str):
        return "error must be a string or null"
    duration = event.get("duration_s")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0:
        return "duration_s must be a non-negative number"
    if not isinstance(event.get("summary"), dict):
        return "summary must be an object"
    return _card_problem(event.get("card"))


def _card_problem(card: Any) -> str | None:
    if card is None:
        return None
    if not isinstance(card, dict) or card.get("kind") not in CARD_KINDS:
        return f"card must be null or a card spec of kind {list(CARD_KINDS)}"
    if not isinstance(card.get("title"), str) or not isinstance(card.get("chips"), list):
        return "card needs a title string and a chips list"
    sections = card.get("sections")
    if not isinstance(sections, list):
        return "card sections must be a list"
    for section in sections:
        if not isinstance(section, dict) or section.get("type") not in SECTION_TYPES:
            return f"card section types must be in {list(SECTION_TYPES)}"
        if section["type"] == "table" and not (
            isinstance(section.get("columns"), list) and isinstance(section.get("rows"), list)
        ):
            return "a table section needs columns and rows lists"
    return None


def schema_problem(event: Any) -> str | None:
    """Why ``event`` does not follow the schema, or ``None`` when it does."""
    return _problem(event)


def size_problem(event: Any) -> str | None:
    size = len(encode(event))
    if size > MAX_EVENT_BYTES:
        return f"event is {size} bytes, over the {MAX_EVENT_BYTES}-byte limit"
    return None


def event_problem(event: Any) -> str | None:
    """Why ``event`` is not a valid mirror event, or ``None`` when it is."""
    return _problem(event) or size_problem(event)
