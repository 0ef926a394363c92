"""What every card spec builder shares: the JSON record helper and the card skeleton."""

from __future__ import annotations

from typing import Any

TABLE_ROWS = 25
BAR_FEATURES = 10


def _records(frame: Any, columns: list[str]) -> list[dict[str, Any]]:
    rows = []
    for record in frame[columns].to_dict("records"):
        rows.append(
            {
                key: (value.item() if hasattr(value, "item") else value)
                for key, value in record.items()
            }
        )
    return rows


def _card(kind: str, title: str, headline: list[str], chips: list[dict[str, Any]], **rest: Any):
    return {
        "kind": kind,
        "tag": kind.replace("_", " "),
        "title": title,
        "headline": headline,
        "chips": chips,
        "warning": None,
        **rest,
    }
