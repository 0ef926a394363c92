"""Checks on what a client sends the receiver: the JSON body and event row ids.

Each turns hostile or careless input into a one-line `ValueError` (or None),
which the app answers with 400, never a traceback and a 500.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Limits on what a posted body may hold (an event is ~7 levels deep; numbers are
# 64-bit counts and finite floats, which is what every reader can handle).
MAX_JSON_DEPTH = 64
MAX_JSON_INTEGER = 2**64 - 1
# Event row ids (``?after=``, ``Last-Event-ID``) are SQLite's 64-bit integers.
MAX_ROW_ID = 2**63 - 1
_ROW_ID = re.compile(r"[0-9]{1,19}")


class _BadJson(ValueError):
    """A body that is JSON but not JSON every reader agrees on."""


def _json_integer(text: str) -> int:
    digits = text.lstrip("-")
    # The length first: int() of a 5,000-digit string raises its own ValueError.
    if len(digits) > 20 or abs(int(text)) > MAX_JSON_INTEGER:
        shown = text if len(text) <= 24 else f"{text[:12]}…({len(digits)} digits)"
        raise _BadJson(f"integer {shown} is out of range (at most 64 bits)")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 24 else f"{text[:12]}…"
        raise _BadJson(f"number {shown} is out of range")
    return value


def _json_constant(name: str) -> Any:
    raise _BadJson(f"{name} is not JSON (numbers must be finite)")


def _json_problem(value: Any) -> str | None:
    """Why a parsed body is refused (too deep, strings that are not Unicode), or None."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string holds a lone surrogate (\\ud800-\\udfff), which is not text"
    return None


def parse_body(body: bytes | bytearray) -> Any:
    """The JSON in ``body``, or `ValueError` with a one-line reason: not UTF-8, not
    JSON, NaN or infinity, an integer beyond 64 bits, or nesting past `MAX_JSON_DEPTH`.

    Example:
        >>> parse_body(b'{"events": [1.5]}')
        {'events': [1.5]}
    """
    try:
        value = json.loads(
            body,
            parse_int=_json_integer,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except RecursionError:
        raise ValueError(f"malformed JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (_BadJson, UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise ValueError(f"malformed JSON: {bad}") from None
    problem = _json_problem(value)
    if problem is not None:
        raise ValueError(f"malformed JSON: {problem}")
    return value


def parse_row_id(text: str | None) -> int | None:
    """The event row id in a query parameter or header: 0 when it is absent, None
    when ``text`` is not a plain decimal within SQLite's 64-bit range.

    Example:
        >>> parse_row_id("12"), parse_row_id(None), parse_row_id("-1"), parse_row_id("1e3")
        (12, 0, None, None)
    """
    if text is None:
        return 0
    if not _ROW_ID.fullmatch(text) or int(text) > MAX_ROW_ID:
        return None
    return int(text)
